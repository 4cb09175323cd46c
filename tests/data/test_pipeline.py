"""Packing against a numpy reference attention; resumable, process-count independent streams."""

import numpy as np
import pytest

from data import samples
from data.pipeline import PackedBatchIterator
from data.prepare import data_sources
from data.sft import SFTOptions
from data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    tok = Tokenizer(samples.write_tiny_tokenizer(tmp / "tok"))
    src = data_sources("medreason", samples.write_sample_manual_dir("medreason", tmp / "m"), str(tmp / "tfds"))
    return tok, src


def _numpy_lm_nll(tokens, targets, positions, segment_ids, seed=0, vocab=259, dim=16):
    """One attention layer in numpy with RoPE-free position embeddings: per-position nll."""
    rng = np.random.default_rng(seed)
    emb, pos_emb = rng.normal(size=(vocab, dim)), rng.normal(size=(512, dim))
    wq, wk, wv, wo = (rng.normal(size=(dim, dim)) / 4 for _ in range(4))
    x = emb[tokens] + pos_emb[positions]
    q, k, v = x @ wq, x @ wk, x @ wv
    s = q @ k.T / 4
    t = len(tokens)
    allowed = (positions[None, :] <= positions[:, None]) & (segment_ids[None, :] == segment_ids[:, None])
    allowed &= np.tril(np.ones((t, t), bool))
    s = np.where(allowed, s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    logits = (x + (p @ v) @ wo) @ emb.T
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -logp[np.arange(t), targets]


def test_packed_rows_give_each_examples_loss(setup):
    tok, src = setup
    opts = SFTOptions(max_seq_len=512)
    packed = next(PackedBatchIterator(src["train"], tok, opts, 2, seed=1, num_threads=0))
    alone = next(PackedBatchIterator(src["train"], tok, opts, 8, seed=1, pack=False, num_threads=0))
    assert packed["segment_ids"].max() > 1  # really packed
    per_example_packed = []
    for r in range(2):
        nll = _numpy_lm_nll(packed["tokens"][r], packed["targets"][r], packed["positions"][r], packed["segment_ids"][r])
        for seg in range(1, packed["segment_ids"][r].max() + 1):
            m = (packed["segment_ids"][r] == seg) * packed["loss_mask"][r]
            per_example_packed.append((nll * m).sum() / m.sum())
    per_example_alone = []
    for r in range(len(per_example_packed)):
        n = int((alone["segment_ids"][r] > 0).sum())
        nll = _numpy_lm_nll(alone["tokens"][r][:n], alone["targets"][r][:n], alone["positions"][r][:n], np.ones(n, int))
        m = alone["loss_mask"][r][:n]
        per_example_alone.append((nll * m).sum() / m.sum())
    np.testing.assert_allclose(per_example_packed, per_example_alone, rtol=1e-10)


def test_batch_contract(setup):
    tok, src = setup
    b = next(PackedBatchIterator(src["train"], tok, SFTOptions(max_seq_len=256), 4, seed=0))
    assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
        "tokens": ((4, 256), "int32"),
        "targets": ((4, 256), "int32"),
        "loss_mask": ((4, 256), "float32"),
        "segment_ids": ((4, 256), "int32"),
        "positions": ((4, 256), "int32"),
    }
    for r in range(4):
        seg, pos = b["segment_ids"][r], b["positions"][r]
        for s in range(1, seg.max() + 1):
            idx = np.nonzero(seg == s)[0]
            assert (pos[idx] == np.arange(len(idx))).all()  # positions restart per segment
            assert b["loss_mask"][r][idx[-1]] == 0  # the last position of a segment is never a target
            assert (b["targets"][r][idx[:-1]] == b["tokens"][r][idx[1:]]).all()  # shifted within the example
        assert (b["loss_mask"][r][seg == 0] == 0).all()


def test_resume_gives_the_same_batches_also_on_another_process_count(setup):
    tok, src = setup
    opts = SFTOptions(max_seq_len=400)
    full = PackedBatchIterator(src["train"], tok, opts, 4, seed=3)
    for _ in range(3):
        next(full)
    state = full.get_state()
    expected = [next(full) for _ in range(3)]  # crosses an epoch boundary of the 8-record source
    for procs in (1, 2, 4):
        parts = []
        for p in range(procs):
            it = PackedBatchIterator(src["train"], tok, opts, 4, seed=3, process_index=p, process_count=procs)
            it.set_state(state)
            parts.append([next(it) for _ in range(3)])
        for step in range(3):
            for key in expected[step]:
                got = np.concatenate([parts[p][step][key] for p in range(procs)])
                np.testing.assert_array_equal(got, expected[step][key])


def test_eval_keeps_every_example_and_stops(setup):
    tok, src = setup
    it = PackedBatchIterator(src["test"], tok, SFTOptions(max_seq_len=256), 3, train=False, pack=False)
    batches = list(it)
    segments = sum(int((b["segment_ids"].max(1) > 0).sum()) for b in batches)
    assert segments == len(src["test"]) and batches[-1]["tokens"].shape == (3, 256)


def test_nothing_fits_is_an_error_not_a_hang(setup):
    tok, src = setup
    with pytest.raises(ValueError, match="no example fits data.max_seq_len=16"):
        next(PackedBatchIterator(src["train"], tok, SFTOptions(max_seq_len=16), 2))


def test_evaluation_keeps_every_example_and_counts_cut_targets(setup):
    """Training drops what cannot fit; evaluation keeps every example, cutting the target's tail, so the
    longest references still count (GovReport's eval used to lose them)."""
    from data.sft import tokenize_example

    tok, src = setup
    test = [src["test"][i] for i in range(len(src["test"]))]
    full = [tokenize_example(tok, r, SFTOptions(max_seq_len=4096)) for r in test]
    seq_len = min(len(f["tokens"]) for f in full) - 2  # every example is 2+ tokens too long
    opts = SFTOptions(max_seq_len=seq_len, max_target_tokens=3)
    train_view = PackedBatchIterator(src["test"], tok, opts, 2, train=True, pack=False, num_threads=0)
    with pytest.raises(ValueError, match="no example fits"):
        next(train_view)
    eval_opts = SFTOptions(max_seq_len=seq_len, max_target_tokens=3, keep_all=True)
    it = PackedBatchIterator(src["test"], tok, eval_opts, 2, train=False, pack=False, num_threads=0)
    batches = list(it)
    assert sum(int((b["segment_ids"].max(axis=1) > 0).sum()) for b in batches) == len(test)
    assert it.dropped == 0 and it.truncated_targets == len(test)
    for b in batches:
        for r in np.nonzero(b["segment_ids"].max(axis=1) > 0)[0]:
            assert b["loss_mask"][r].sum() > 0 and b["loss_mask"][r, -1] == 0  # targets left; none past the cut
