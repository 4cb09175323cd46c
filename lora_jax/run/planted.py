"""The planted-answer study's teacher and its dataset (data.name="planted").

The teacher is the run's own base model with a low-rank delta planted on the kernels of a module set
P (config.planted.targets): for each planted layer l and module, W_l <- W_l + D_l with D_l = U V of
rank `planted.rank` (U, V standard normal, seeded) scaled so that ||D_l||_F = relative_norm *
||W_l||_F (a fused kernel, e.g. qkv [embed, kv_heads, slots, head_dim], is one matrix
[embed, kv_heads * slots * head_dim]: the delta reaches q, k and v alike). The dataset is the teacher's
greedy continuations (this project's `generate`) of random prompts, written as token ids to a manual
dir that data/planted/ builds into train and test splits. An arm whose targets contain P can
represent the teacher exactly (when its rank >= the planted rank); the study should find that.

planted.json in the manual dir records how the teacher was made, for the reader only: no ranking or
selection code reads it.
"""

from __future__ import annotations

import json
import logging

import jax
import ml_collections
import numpy as np
from etils import epath

from lora_jax.errors import ConfigError
from lora_jax.lora.arms import validate_targets
from lora_jax.model.transformer import target_shapes
from lora_jax.serve.generate import GenerationOptions, generate

BATCH = 64  # prompts continued per generate call (all prompts have one length: no padding)
FILE, SPEC_FILE, TOKENIZER = "planted.jsonl", "planted.json", "tokenizer"


def check_planted(config: ml_collections.ConfigDict, num_layers: int) -> None:
    """config.planted's values (ConfigError naming the key): what the teacher needs before anything runs."""
    p = config.planted
    if not p.targets:
        raise ConfigError("planted.targets is empty: name the module set P the teacher's delta sits on")
    validate_targets(p.targets)
    for key, low in (("rank", 1), ("num_train", 1), ("num_test", 1), ("prompt_tokens", 1), ("new_tokens", 1)):
        if p[key] < low:
            raise ConfigError(f"planted.{key}={p[key]} must be >= {low}")
    if not p.relative_norm > 0:
        raise ConfigError(f"planted.relative_norm={p.relative_norm} must be > 0")
    bad = [layer for layer in p.layers if not 0 <= layer < num_layers]
    if bad:
        raise ConfigError(f"planted.layers={tuple(p.layers)}: the model has layers 0..{num_layers - 1}")
    if len(set(p.layers)) != len(p.layers):
        raise ConfigError(f"planted.layers={tuple(p.layers)} names a layer twice")
    if p.new_tokens + 1 > config.data.max_target_tokens:  # the continuation + its end-of-turn
        raise ConfigError(
            f"planted.new_tokens + 1 = {p.new_tokens + 1} passes data.max_target_tokens={config.data.max_target_tokens}"
            " (training would drop the longest continuations)"
        )
    longest = p.prompt_tokens + p.new_tokens + 1  # + the end-of-turn the example ends with
    if longest > config.data.max_seq_len:
        raise ConfigError(
            f"planted.prompt_tokens + new_tokens + 1 = {longest} passes data.max_seq_len={config.data.max_seq_len}"
        )


def planted_delta(
    kernel: np.ndarray, n_in: int, rank: int, relative_norm: float, rng: np.random.Generator
) -> np.ndarray:
    """A delta of rank `rank` for one layer's kernel [*in, *out] (its first n_in axes are the input:
    the map is the matrix [prod(in), prod(out)], as the target's LoRA sees it), float64, with
    ||delta||_F = relative_norm * ||kernel||_F."""
    w = kernel.reshape(int(np.prod(kernel.shape[:n_in])), -1).astype(np.float64)
    delta = rng.standard_normal((w.shape[0], rank)) @ rng.standard_normal((rank, w.shape[1]))
    delta *= relative_norm * np.linalg.norm(w) / np.linalg.norm(delta)
    return delta.reshape(kernel.shape)


def plant(model, targets, rank: int, relative_norm: float, layers, seed: int) -> dict[str, list[float]]:
    """Adds the planted delta to the model's base kernels in place (each keeps its dtype and sharding);
    returns the achieved ||delta||_F / ||W||_F per target and layer (after the cast to the kernel's dtype)."""
    rng = np.random.default_rng(seed)
    achieved, shapes = {}, target_shapes(model.config)
    for target in validate_targets(targets):
        n_in = len(shapes[target][0])  # o_proj [kv_heads, q_per_kv, head_dim] -> embed: three input axes
        param = getattr(model.layers, target).kernel
        old = param.get_value()
        stacked = np.asarray(jax.device_get(old), np.float64)  # [layers, *in, *out]
        new = stacked.copy()
        for layer in layers or range(stacked.shape[0]):
            new[layer] += planted_delta(stacked[layer], n_in, rank, relative_norm, rng)
        cast = np.asarray(new, dtype=np.dtype(old.dtype))
        param.set_value(jax.device_put(cast, old.sharding))
        after = np.asarray(cast, np.float64)
        achieved[target] = [
            float(np.linalg.norm(after[i] - stacked[i]) / np.linalg.norm(stacked[i])) for i in range(stacked.shape[0])
        ]
    return achieved


def continuations(model, prompts: np.ndarray, new_tokens: int, end_of_turn: int, mesh) -> list[list[int]]:
    """Greedy continuations of equal-length prompts [n, prompt_tokens], each cut before its end-of-turn."""
    opts = GenerationOptions(max_new_tokens=new_tokens, stop_ids=(end_of_turn,))
    out = []
    for start in range(0, len(prompts), BATCH):
        group = prompts[start : start + BATCH]
        full = np.concatenate([group, np.repeat(group[-1:], BATCH - len(group), axis=0)])  # one compiled shape
        ids, lengths = generate(model, full, np.ones_like(full), opts, mesh=mesh)
        for row in range(len(group)):
            cont = [int(i) for i in ids[row, : lengths[row]]]
            out.append(cont[:-1] if cont and cont[-1] == end_of_turn else cont)
    return out


def _settings(config) -> dict:
    return json.loads(json.dumps(config.planted.to_dict()))  # tuples as lists, as planted.json holds them


def teacher_data_matches(manual_dir: epath.Path, config, fingerprint: str, end_of_turn: int) -> bool:
    """The manual dir holds a finished teacher's data made with these planted settings on this base and
    end-of-turn id (preparation's reuse check; nothing that ranks arms reads planted.json)."""
    if not (manual_dir / FILE).exists() or not (manual_dir / SPEC_FILE).exists():
        return False
    made = json.loads((manual_dir / SPEC_FILE).read_text())
    decided_by = (made.get("planted"), made.get("base_model"), made.get("end_of_turn_id"))
    return decided_by == (_settings(config), fingerprint, end_of_turn)


def write_teacher_data(
    config, model, fingerprint: str, end_of_turn: int, manual_dir: epath.Path, mesh, write: bool = True
) -> None:
    """Plants the delta in `model` (a fresh copy of the base: its adapters are zero), continues the
    prompts with the base and with the teacher, and (`write`: process 0) writes the manual dir;
    planted.jsonl last, so a killed write leaves no dataset that looks finished."""
    p = config.planted
    vocab = model.config.vocab_size
    rng = np.random.default_rng(p.seed)
    n = p.num_train + p.num_test
    prompts = rng.integers(0, vocab - 1, size=(n, p.prompt_tokens))
    prompts = np.where(prompts >= end_of_turn, prompts + 1, prompts).astype(np.int32)  # any id but end-of-turn
    base = continuations(model, prompts, p.new_tokens, end_of_turn, mesh)
    achieved = plant(model, p.targets, p.rank, p.relative_norm, tuple(p.layers), p.seed + 1)
    teacher = continuations(model, prompts, p.new_tokens, end_of_turn, mesh)
    changed = [sum(a != b for a, b in zip(t, s)) + abs(len(t) - len(s)) for t, s in zip(teacher, base)]
    rows = [
        {
            "id": f"planted-{i}",
            "split": "train" if i < p.num_train else "test",
            "prompt_ids": prompts[i].tolist(),
            "target_ids": teacher[i],
        }
        for i in range(n)
        if teacher[i]  # a teacher that ends at once gives no target (counted below)
    ]
    record = {
        "planted": _settings(config),
        "base_model": fingerprint,
        "end_of_turn_id": end_of_turn,
        "relative_norm_achieved": achieved,
        # continuations that ran out of budget before the teacher's end-of-turn: their training
        # example still ends with one (the template's), a position teacher_agreement never scores
        "hit_the_budget": sum(len(t) == p.new_tokens for t in teacher),
        "empty_continuations": n - len(rows),
        # how far the teacher is from its base: the share of continuation tokens the delta changed
        "tokens_changed_from_base": sum(changed) / max(sum(max(len(t), len(s)) for t, s in zip(teacher, base)), 1),
    }
    if not write:
        return
    (manual_dir / FILE).unlink(missing_ok=True)  # another teacher's data: never half-replaced
    manual_dir.mkdir(parents=True, exist_ok=True)
    (manual_dir / TOKENIZER).mkdir(exist_ok=True)
    ids_tokenizer = {"vocab_size": vocab, "end_of_turn_id": end_of_turn}
    (manual_dir / TOKENIZER / "ids_tokenizer.json").write_text(json.dumps(ids_tokenizer))
    (manual_dir / SPEC_FILE).write_text(json.dumps(record, indent=1))
    tmp = manual_dir / f"{FILE}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(manual_dir / FILE)
    logging.info("planted teacher: %s", json.dumps(record))
    print(
        f"planted teacher on {', '.join(p.targets)}: {len(rows)} continuations, "
        f"{record['tokens_changed_from_base']:.0%} of the base's tokens changed",
        flush=True,
    )
