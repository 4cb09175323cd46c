"""Decode latency per arm: TTFT and TPOT p50/p95 for the base model, unmerged and merged adapters.

    python benchmarks/decode_latency.py [--arms o_proj,o_proj+fc2,qkv,all] [--batches 1,8]
        [--requests 50] [--peer hf] [--json out.json]

An arm may carry a layer range, `o_proj+fc2@0-3`: adapters on layers 0..3 only (lora.layers).

Bench model: Llama, vocab 32000, hidden 512, intermediate 1408, 8 layers, 8 heads / 4 kv heads,
LoRA rank 16, float32; prompt 128 tokens, 64 new tokens, greedy. Serving convention (vLLM's
benchmark): per request TTFT = time to the first token; TPOT = (time of the last token - time of the
first) / (tokens - 1); p50/p95 over --requests requests after --warmup. Each token is observed as
it is produced (prefill, then one jitted step per token).

Beside our figures: the weight-read bound measured in this process (bytes of weights read per
decode step / streaming read bandwidth), and with --peer hf (needs torch, transformers, peft: the
test extra) Hugging Face `generate` + PEFT on the identical model (unmerged, and
`merge_and_unload`), interleaved request by request with ours, with the ratio ours / HF. Before
timing, each (arm, mode, batch) checks that ours and HF decode the same greedy ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.torch_peer import ATTENTION, pin_torch  # noqa: E402
from lora_jax.io.peft_adapter import HF_MODULES
from lora_jax.lora.spec import LoraSpec
from lora_jax.model.config import ModelConfig
from lora_jax.model.transformer import RuntimeOptions, Transformer
from lora_jax.serve import latency

BENCH = ModelConfig(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1408,
    num_layers=8,
    num_heads=8,
    num_kv_heads=4,
    head_dim=64,
    max_position_embeddings=4096,
)
ARMS = {"o_proj": ("o_proj",), "o_proj+fc2": ("o_proj", "fc2"), "qkv": ("qkv",), "all": ("qkv", "o_proj", "fc1", "fc2")}
PROMPT, NEW, RANK = 128, 64, 16


def percentile(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def read_bandwidth() -> float:
    """Streaming read bytes/s: best of 5 jitted sums over a 512 MiB float32 array."""
    x = jnp.ones((128 * 1024 * 1024,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = min(_timed(lambda: total(x).block_until_ready()) for _ in range(5))
    return x.nbytes / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes(model: Transformer) -> int:
    """Bytes a batch-1 decode step reads: every parameter but the embedding table (one row)."""
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if path[0] != "embed":
            total += var.get_value().nbytes
    return total


class HFRunner:
    def __init__(self, model, batch):
        import torch
        import transformers

        self.torch, self.model = torch, model
        rng = np.random.default_rng(0)
        self.tokens = torch.as_tensor(rng.integers(0, BENCH.vocab_size, size=(batch, PROMPT)))
        times = self.times = []

        class Clock(transformers.StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                times.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        self.stop = transformers.StoppingCriteriaList([Clock()])

    def _generate(self, **extra):
        with self.torch.no_grad():
            return self.model.generate(
                self.tokens,
                attention_mask=self.torch.ones_like(self.tokens),
                max_new_tokens=NEW,
                do_sample=False,
                pad_token_id=0,
                **extra,
            )

    def generated(self) -> np.ndarray:
        """The greedy ids of one request, [batch, NEW]."""
        return self._generate()[:, PROMPT:].numpy()

    def request(self) -> tuple[float, float]:
        self.times.clear()
        start = time.perf_counter()
        self._generate(stopping_criteria=self.stop)
        first, last = self.times[0], self.times[-1]
        return first - start, (last - first) / (len(self.times) - 1)


def parse_arm(arm: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """ "o_proj+fc2@0-3" -> (targets, layers 0..3); no "@" -> every layer."""
    name, _, span = arm.partition("@")
    if not span:
        return ARMS[name], ()
    lo, _, hi = span.partition("-")
    return ARMS[name], tuple(range(int(lo), int(hi or lo) + 1))


def build_pair(targets, workdir, peer: bool, layers=()):
    """(our model with adapters, HF model with the same adapters or None). B is random (non-zero)."""
    from lora_jax.sharding import make_mesh

    if not peer:
        model = Transformer(BENCH, LoraSpec(targets=targets, rank=RANK, alpha=32.0, layers=layers), rngs=nnx.Rngs(0))
        for t in targets:
            b = getattr(model.layers, t).lora_b
            b.set_value(jax.random.normal(jax.random.key(1), b.get_value().shape) * 0.01)
        return model, None
    import peft
    import torch
    import transformers

    from lora_jax.io.hf_checkpoint import load_hf_model
    from lora_jax.io.peft_adapter import read_peft_adapter, set_lora_weights

    torch.manual_seed(0)
    hf_dir = os.path.join(workdir, "base")
    adapter_dir = os.path.join(workdir, "-".join(targets) + "".join(f"_{i}" for i in layers))
    if not os.path.exists(hf_dir):
        cfg = transformers.LlamaConfig(
            vocab_size=BENCH.vocab_size,
            hidden_size=BENCH.hidden_size,
            intermediate_size=BENCH.intermediate_size,
            num_hidden_layers=BENCH.num_layers,
            num_attention_heads=BENCH.num_heads,
            num_key_value_heads=BENCH.num_kv_heads,
            head_dim=BENCH.head_dim,
            max_position_embeddings=BENCH.max_position_embeddings,
        )
        transformers.LlamaForCausalLM(cfg).save_pretrained(hf_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation=ATTENTION
    ).eval()
    modules = [m for t in targets for _, m in HF_MODULES[t]]
    lora_cfg = peft.LoraConfig(
        r=RANK, lora_alpha=32, target_modules=modules, init_lora_weights=False, layers_to_transform=list(layers) or None
    )
    # No end-of-sequence id, as ours has none: HF then decodes NEW tokens on its own, never blocking
    # an id that our greedy decoding may pick (min_new_tokens would block EOS).
    hf.generation_config.eos_token_id = None
    hf = peft.get_peft_model(hf, lora_cfg).eval()
    hf.save_pretrained(adapter_dir)
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    spec, weights = read_peft_adapter(adapter_dir, load_hf_model(hf_dir, None, RuntimeOptions(), mesh).config)
    ours = load_hf_model(hf_dir, spec, RuntimeOptions(), mesh)
    set_lora_weights(ours, weights)
    return ours, hf


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peer", choices=["none", "hf"], default="none")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    peer = args.peer == "hf"
    bandwidth = read_bandwidth()
    rows = []
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; prompt {PROMPT}, {NEW} new tokens, {args.requests} requests")
    if peer:
        print(pin_torch("HF peer", "generate(do_sample=False), its default dynamic KV cache, no EOS id"))
    print(f"{'arm':>10} {'mode':>9} {'b':>2} {'TTFT p50':>9} {'TPOT p50':>9} {'TPOT p95':>9} {'bound':>7}  peer")
    with tempfile.TemporaryDirectory() as workdir:
        for arm in args.arms.split(","):
            targets, layers = parse_arm(arm)
            model, hf = build_pair(targets, workdir, peer, layers)
            for mode, ours_model in latency.variants(model).items():  # base, unmerged, merged
                hf_model = None
                if peer:  # merge_and_unload folds the adapters into the HF model in place: merged comes last
                    hf_model = hf.merge_and_unload() if mode == "merged" else hf
                for batch in (int(x) for x in args.batches.split(",")):
                    ours = latency.Requests(ours_model, batch, PROMPT, NEW)
                    theirs = HFRunner(hf_model, batch) if hf_model is not None else None
                    if peer and mode == "base":
                        with hf.disable_adapter():
                            rows.append(measure(arm, mode, batch, ours, theirs, args, ours_model, bandwidth))
                    else:
                        rows.append(measure(arm, mode, batch, ours, theirs, args, ours_model, bandwidth))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth_bytes_per_s": bandwidth, "rows": rows}, f, indent=1)


def check_same_tokens(arm, mode, batch, ours, theirs) -> None:
    """Ours and HF must decode the same greedy ids before either is timed (else the timings compare
    different work); a mismatch stops the benchmark, naming the first differing position."""
    a, b = ours.generated(), theirs.generated()
    if a.shape != b.shape or not np.array_equal(a, b):
        diff = np.argwhere(a != b) if a.shape == b.shape else [["shape"]]
        raise SystemExit(
            f"{arm} {mode} batch {batch}: our greedy ids differ from HF generate's (first at row, token "
            f"{list(diff[0])} of {a.shape}); not timing"
        )


def measure(arm, mode, batch, ours, theirs, args, model, bandwidth):
    if theirs is not None:
        check_same_tokens(arm, mode, batch, ours, theirs)
    samples = {"ours": [], "hf": []}
    for i in range(args.warmup + args.requests):  # interleaved: ours, HF, ours, HF, ...
        for name, runner in (("ours", ours), ("hf", theirs)):
            if runner is not None:
                ttft, tpot = runner.request()
                if i >= args.warmup:
                    samples[name].append((ttft, tpot))
    row = {"arm": arm, "mode": mode, "batch": batch, "weight_read_bound_s": weight_bytes(model) / bandwidth}
    for name, xs in samples.items():
        if xs:
            ttft, tpot = zip(*xs)
            row[name] = {
                "ttft_p50_ms": 1e3 * percentile(ttft, 50),
                "ttft_p95_ms": 1e3 * percentile(ttft, 95),
                "tpot_p50_ms": 1e3 * percentile(tpot, 50),
                "tpot_p95_ms": 1e3 * percentile(tpot, 95),
            }
    o = row["ours"]
    line = (
        f"{arm:>10} {mode:>9} {batch:>2} {o['ttft_p50_ms']:>8.2f}ms {o['tpot_p50_ms']:>8.2f}ms "
        f"{o['tpot_p95_ms']:>8.2f}ms {1e3 * row['weight_read_bound_s']:>6.2f}ms"
    )
    if "hf" in row:
        h = row["hf"]
        line += f"  HF TPOT p50 {h['tpot_p50_ms']:.2f}ms p95 {h['tpot_p95_ms']:.2f}ms  ours/HF {o['tpot_p50_ms'] / h['tpot_p50_ms']:.2f}"
    print(line, flush=True)
    return row


if __name__ == "__main__":
    main()
