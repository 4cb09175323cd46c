"""The planted-answer study: the planted delta, the ids dataset and tokenizer, teacher-forced agreement
(the teacher scores 1 on its own data; K arms in one pass equal each alone), and one small study end
to end that must rank every arm containing the planted set above every arm without it, on data whose
record of the teacher lies."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from data import samples
from data.prepare import data_sources
from data.records import DataError
from data.sft import SFTOptions, generation_prompt_ids, tokenize_example
from data.tokenizer import IdsTokenizer, load_tokenizer
from eval import teacher_agreement
from lora_jax.errors import ConfigError
from lora_jax.lora.arms import ARMS, TARGETS
from lora_jax.lora.spec import LoraSpec
from lora_jax.model.transformer import Transformer, target_shapes
from lora_jax.run.assemble import base_tokenizer_dir, build_bank_model, build_model, prepare_planted
from lora_jax.run.config import validate
from lora_jax.run.eval_hooks import teacher_forced_replies
from lora_jax.run.planted import plant, planted_delta, write_teacher_data
from lora_jax.serve.generate import teacher_forced_argmax
from lora_jax.sharding import make_mesh
from tests.cli import run_main_ok
from tests.tiny_model import TINY


def test_teacher_agreement_hand_worked():
    assert teacher_agreement.score("1 2 3 4", "1 2 3 4").score == 1.0
    s = teacher_agreement.score("1 9 3", "1 2 3 4")  # position 1 wrong, position 3 missing
    assert s.score == 0.5 and s.details == {"matched": 2, "tokens": 4, "first_miss": 1}
    assert teacher_agreement.score("1 2 3 4 5 6", "1 2 3 4").score == 1.0  # past the reference: not scored
    assert teacher_agreement.score("", "7 8").score == 0.0
    assert teacher_agreement.score("2 1", "1 2").score == 0.0  # positions, not a bag of tokens
    bad = teacher_agreement.score("one two", "1 2")
    assert bad.score == 0.0 and bad.format_failure == teacher_agreement.NOT_IDS
    with pytest.raises(ValueError, match="not a non-empty list of token ids"):
        teacher_agreement.score("1", "")


def test_planted_delta_has_the_rank_and_relative_norm_asked():
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((2, 3, 4, 16)).astype(np.float32)  # o_proj's [kv_heads, q_per_kv, head_dim, embed]
    delta = planted_delta(kernel, 3, 3, 0.4, np.random.default_rng(1))
    assert delta.shape == kernel.shape
    assert np.linalg.matrix_rank(delta.reshape(24, 16)) == 3  # as the map [kv*g*d, embed] a LoRA on o_proj sees
    assert np.linalg.norm(delta) / np.linalg.norm(kernel.astype(np.float64)) == pytest.approx(0.4, rel=1e-9)


def test_every_target_is_planted_at_the_rank_its_lora_sees():
    """The delta of each target, read in the target's own LoRA layout (A [*in, r] · B [r, *out]), has the
    planted rank: an arm with that target and rank >= it can represent the teacher."""
    model = Transformer(TINY, None, rngs=nnx.Rngs(0))
    before = {t: np.asarray(getattr(model.layers, t).kernel.get_value(), np.float64) for t in TARGETS}
    plant(model, TARGETS, rank=2, relative_norm=0.3, layers=(), seed=0)
    for target, (in_dims, _, _, _) in target_shapes(TINY).items():
        delta = np.asarray(getattr(model.layers, target).kernel.get_value(), np.float64) - before[target]
        for layer in range(TINY.num_layers):
            matrix = delta[layer].reshape(int(np.prod(in_dims)), -1)
            assert np.linalg.matrix_rank(matrix, tol=1e-4 * np.abs(matrix).max()) == 2, (target, layer)


def test_plant_changes_only_the_planted_kernels_and_layers():
    model = Transformer(TINY, LoraSpec(targets=("o_proj", "fc2"), rank=2), rngs=nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    achieved = plant(model, ("fc2", "qkv"), rank=2, relative_norm=0.25, layers=(1,), seed=3)
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    changed = {
        jax.tree_util.keystr(path)
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after))
        if not np.array_equal(x, y)
    }
    assert changed == {"['layers']['fc2']['kernel'].value", "['layers']['qkv']['kernel'].value"}, changed
    for target in ("fc2", "qkv"):
        old, new = before["layers"][target]["kernel"].value, after["layers"][target]["kernel"].value
        np.testing.assert_array_equal(old[0], new[0])  # layer 0 is not planted
        assert achieved[target][0] == 0.0 and achieved[target][1] == pytest.approx(0.25, rel=1e-5)


def _ids_tokenizer(tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "ids_tokenizer.json").write_text(json.dumps({"vocab_size": 50, "end_of_turn_id": 49}))
    return load_tokenizer(str(d))


def test_ids_pass_through_the_sft_pipeline_unchanged(tmp_path):
    """Prompt and target ids reach the batch as written; the loss covers the target and the end-of-turn."""
    tok = _ids_tokenizer(tmp_path)
    assert isinstance(tok, IdsTokenizer)
    record = {"id": b"x", "instruction": b"3 1 4 1", "document": b"", "target": b"5 9 2", "reasoning": b""}
    ex = tokenize_example(tok, record, SFTOptions(max_seq_len=16, model_vocab_size=50))
    assert ex["tokens"].tolist() == [3, 1, 4, 1, 5, 9, 2, 49]
    assert ex["loss_mask"].tolist() == [0, 0, 0, 1, 1, 1, 1, 0]  # position t predicts token t + 1
    assert ex["targets"][3:7].tolist() == [5, 9, 2, 49]
    assert generation_prompt_ids(tok, record, SFTOptions(max_seq_len=16), 4) == [3, 1, 4, 1]
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        tokenize_example(tok, dict(record, target=b"5 77"), SFTOptions(max_seq_len=16, model_vocab_size=50))
    with pytest.raises(DataError, match="expected space-separated token ids"):
        tok.encode("5 nine")


def test_teacher_forced_replies_are_the_argmax_given_the_true_prefix(tmp_path):
    tok = _ids_tokenizer(tmp_path)
    cfg = TINY
    model = Transformer(cfg, None, rngs=nnx.Rngs(0))
    record = {"id": b"x", "instruction": b"3 1 4 1", "document": b"", "target": b"5 9 2", "reasoning": b""}
    [completion] = teacher_forced_replies(model, [record], tok, SFTOptions(max_seq_len=16), 2, None)
    logits = np.asarray(model(np.asarray([[3, 1, 4, 1, 5, 9, 2]], np.int32)))[0]
    expected = " ".join(str(int(i)) for i in logits[3:6].argmax(-1))  # the positions predicting 5, 9, 2
    assert completion.prompt_tokens == 4 and completion.reply == expected


def test_planted_bundled_sample_builds_its_splits(tmp_path):
    manual = samples.write_sample_manual_dir("planted", tmp_path / "manual")
    src = data_sources("planted", manual, str(tmp_path / "tfds"))
    assert (len(src["train"]), len(src["test"])) == (8, 4)
    (tmp_path / "manual" / "planted.jsonl").write_text(
        '{"id": "a", "split": "dev", "prompt_ids": [1], "target_ids": [2]}\n'
    )
    with pytest.raises(DataError, match="planted.jsonl:1: split 'dev' must be 'train' or 'test'"):
        data_sources("planted", manual, str(tmp_path / "tfds2"))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("targets", (), "planted.targets is empty"),
        ("targets", ("mlp",), "unknown LoRA target"),
        ("rank", 0, "planted.rank=0 must be >= 1"),
        ("relative_norm", 0.0, "planted.relative_norm=0.0 must be > 0"),
        ("layers", (7,), r"planted.layers=\(7,\): the model has layers 0..1"),
        ("prompt_tokens", 240, "passes data.max_seq_len=256"),
        ("new_tokens", 200, r"planted.new_tokens \+ 1 = 201 passes data.max_target_tokens=128"),
        ("layers", (1, 1), r"planted.layers=\(1, 1\) names a layer twice"),
    ],
)
def test_planted_settings_are_checked_with_the_config(key, value, message):
    config = base.arm_config("planted", "fc2", "runlocal")
    config.planted[key] = value
    with pytest.raises(ConfigError, match=message):
        validate(config)


def _planted_config(**changes):
    config = base.arm_config("planted", "fc2", "runlocal")
    config.planted.num_train, config.planted.num_test, config.planted.new_tokens = 8, 4, 8
    for key, value in changes.items():
        *section, name = key.split(".")
        (config[section[0]] if section else config)[name] = value
    return config


def _records(manual):
    rows = [json.loads(line) for line in (manual / "planted.jsonl").read_text().splitlines()]
    return [
        {
            "id": r["id"].encode(),
            "instruction": " ".join(map(str, r["prompt_ids"])).encode(),
            "document": b"",
            "target": " ".join(map(str, r["target_ids"])).encode(),
            "reasoning": b"",
        }
        for r in rows
    ]


def test_the_teacher_scores_one_on_its_own_data(tmp_path):
    """The teacher's greedy continuations (cached decoding) scored teacher-forced on the teacher itself
    (one full forward pass): every token agrees, so the alignment of replies with references is right."""
    config = _planted_config()
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model, fingerprint = build_model(config, mesh)
    tok = load_tokenizer(base_tokenizer_dir(config, tmp_path))
    write_teacher_data(config, model, fingerprint, tok.end_of_turn_id, tmp_path / "planted", mesh)
    ids = load_tokenizer(str(tmp_path / "planted" / "tokenizer"))
    records = _records(tmp_path / "planted")
    opts = SFTOptions(max_seq_len=config.data.max_seq_len, model_vocab_size=model.config.vocab_size)
    replies = teacher_forced_replies(model, records, ids, opts, 4, mesh)  # `model` is the teacher now
    scores = [teacher_agreement.score(c.reply, r["target"].decode()).score for c, r in zip(replies, records)]
    assert len(scores) == 12 and all(s == 1.0 for s in scores), scores
    made = json.loads((tmp_path / "planted" / "planted.json").read_text())
    assert made["tokens_changed_from_base"] > 0.1  # the delta changed what the base would say


def test_teacher_forced_replies_of_a_bank_are_each_arm_alone(tmp_path):
    """K arms in one pass (rows i*K + k, batches padded to one shape) give each arm's own replies,
    computed one example at a time without padding."""
    configs = [_planted_config(**{"lora.targets": ARMS[a], "arm": a}) for a in ("fc2", "oproj")]
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model, _, _ = build_bank_model(configs, ["fc2", "oproj"], mesh)
    rng = np.random.default_rng(0)
    for target in ("o_proj", "fc2"):
        b = getattr(model.layers, target).lora_b
        b.set_value(jnp.asarray(rng.standard_normal(b.get_value().shape), b.get_value().dtype))
    tok = _ids_tokenizer(tmp_path)
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6], [5, 3]]
    targets = [[5, 8], [9, 7, 9, 3], [2, 3, 8, 4, 6]]
    records = [
        {
            "id": b"x",
            "instruction": " ".join(map(str, p)).encode(),
            "document": b"",
            "target": " ".join(map(str, t)).encode(),
        }
        for p, t in zip(prompts, targets)
    ]
    per_arm = teacher_forced_replies(model, records, tok, SFTOptions(max_seq_len=32), 2, mesh, num_arms=2)
    for k in range(2):
        for completion, p, t in zip(per_arm[k], prompts, targets):
            alone = teacher_forced_argmax(model, np.asarray([p + t], np.int32), mesh, adapter_ids=[k])[0]
            assert completion.reply == " ".join(map(str, alone[len(p) - 1 : len(p) - 1 + len(t)])), (k, p)
            assert completion.prompt_tokens == len(p)
    assert [c.reply for c in per_arm[0]] != [c.reply for c in per_arm[1]]  # the arms do differ


# --- one small study, end to end ----------------------------------------------------------------

STUDY_ARMS = ("fc2", "oproj_fc2", "oproj", "qkv_fc1")  # two contain P = {fc2}, two do not
SMALL = {
    "planted.targets": ("fc2",),
    "planted.num_train": 128,
    "planted.num_test": 32,
    "data.max_seq_len": 128,  # two 49-token examples a row
    "data.max_target_tokens": 64,
    "train.total_steps": 40,
    "train.global_batch_size": 8,
}


def test_a_small_planted_study_ranks_every_arm_with_the_planted_set_first(tmp_path):
    """Four arms jointly on data of a teacher planted on fc2, whose planted.json lies (it names qkv):
    the report (the project's own table and corrected test) ranks both arms containing fc2 above both
    without, the best without significantly worse."""
    from eval import report

    config = _planted_config(**SMALL)
    config.planted.num_train, config.planted.num_test, config.planted.new_tokens = 128, 32, 32
    prepare_planted(config, tmp_path / "teacher", make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    manual = tmp_path / "teacher" / "planted"
    told = json.loads((manual / "planted.json").read_text())
    assert told["planted"]["targets"] == ["fc2"] and told["relative_norm_achieved"]["fc2"][0] == pytest.approx(0.5)
    lie = dict(told["planted"], targets=["qkv"], rank=1)
    (manual / "planted.json").write_text(json.dumps(dict(told, planted=lie, relative_norm_achieved={"qkv": [0.5]})))

    root = tmp_path / "study"
    flags = [f"--config.{k}={v!r}".replace(" ", "") for k, v in SMALL.items()]
    run_main_ok(
        root / "planted_fc2_s0",
        f"--config.arms={STUDY_ARMS!r}".replace(" ", ""),
        *flags,
        f"--config.data.manual_dir={manual}",
        "--config.train.checkpoint_every_steps=40",
        "--config.eval.evaluators=('loss','generate')",
        config="configs/planted_all_arms.py:runlocal",
    )
    built = report.build(str(root), str(tmp_path / "report"))
    rows = {r.arm: r for r in built["rows"]}
    assert set(rows) == set(STUDY_ARMS) and built["missing"] == []
    with_p, without_p = [rows[a] for a in ("fc2", "oproj_fc2")], [rows[a] for a in ("oproj", "qkv_fc1")]
    assert min(r.mean for r in with_p) > max(r.mean for r in without_p), {a: r.mean for a, r in rows.items()}
    best_without = max(without_p, key=lambda r: r.mean)
    assert best_without.significant, best_without  # worse than the best at p < 0.05: the report's own test
