"""The tiny random model shared by the LoRA, program and accounting tests."""

from lora_jax.model.config import ModelConfig

TINY = ModelConfig(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)


def sample_batches(tmp, n: int, max_seq_len: int, rows: int = 8) -> list[dict]:
    """`n` packed batches of the bundled MedReason samples (the tiny tokenizer), written under tmp."""
    from data import samples
    from data.pipeline import PackedBatchIterator
    from data.prepare import data_sources
    from data.sft import SFTOptions
    from data.tokenizer import Tokenizer

    tok = Tokenizer(samples.write_tiny_tokenizer(tmp / "tok"))
    src = data_sources("medreason", samples.write_sample_manual_dir("medreason", tmp / "m"), str(tmp / "tfds"))
    it = PackedBatchIterator(src["train"], tok, SFTOptions(max_seq_len=max_seq_len), rows, seed=0, num_threads=0)
    return [next(it) for _ in range(n)]


def set_keys(config, changes: dict):
    """config with {"section.name": value} set (keys as --config.section.name would name them)."""
    for key, value in changes.items():
        *sections, name = key.split(".")
        node = config
        for section in sections:  # "optim.lr_per_target.fc1": nested sections
            node = node[section]
        node[name] = value
    return config


def forward_with_cache(model, tokens, positions, segment_ids, cache, layer_params=None):
    """Runs tokens [batch, time] through the model, writing their k/v into the cache.

    Returns (float32 logits [batch, time, vocab], new cache). Prefill is a call with the whole
    (left-padded, segment 0 on padding) prompt; each decode step a call with time = 1. layer_params:
    per-layer arrays (`split_layers`, with a cache of `init_cache(per_layer=True)`), as the Stepper decodes.
    """
    h, cache = model.hidden_states(tokens, positions, segment_ids, cache=cache, layer_params=layer_params)
    return model.logits_from_hidden(h), cache
