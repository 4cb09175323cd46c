"""The callables eval/ receives from a run: completion over a model, the test-split loss, latency."""

from __future__ import annotations

import dataclasses

import numpy as np

from data.sft import SFTOptions, example_pixels, generation_prompt_ids, prompt_opens_think, tokenize_example
from data.tokenizer import Tokenizer
from eval.generation_suite import Completion
from lora_jax.run.config import check_latency
from lora_jax.serve import latency
from lora_jax.serve.generate import GenerationOptions, complete, teacher_forced_argmax
from lora_jax.sharding import check_serving_mesh, global_batch

PAD_MULTIPLE = 64  # prompt lengths are bucketed so that few shapes compile


def stop_ids(tok: Tokenizer) -> tuple[int, ...]:
    """The chat template's end-of-turn token and EOS: a row stops at either."""
    ids = {tok.end_of_turn_id}
    eos = tok.special_tokens.get("eos_token")
    if eos:
        ids.add(tok.token_id(eos))
    return tuple(sorted(ids))


def completion_fn(model_fn, tok: Tokenizer, sft: SFTOptions, mesh=None, seed: int = 0, num_arms: int = 0):
    """(records, suite) -> [Completion(prompt tokens, reply, think_opened) or None]: greedy (or the
    suite's temperature) batched decoding of the model `model_fn()` returns, from prompts rendered and
    cut exactly as training renders the generation prompt so that prompt + max_new_tokens fit
    min(data.max_seq_len, the model's context); None where even the cut prompt cannot fit.
    think_opened: the template's generation prompt opens a `<think>` trace (data/sft.py
    `prompt_opens_think`), so each reply starts inside it and the scorer needs its `</think>`.

    num_arms = K > 0: `model_fn()` is a bank model and the result is one such list per arm, all
    decoded in one pass (each prompt once per arm in the same batch, per-row adapter ids)."""

    opened = prompt_opens_think(tok)

    def run(records, suite):
        if suite.teacher_forced:
            return teacher_forced_replies(model_fn(), records, tok, sft, suite.batch_size, mesh, num_arms)
        model = model_fn()
        context = min(sft.max_seq_len, model.config.max_position_embeddings)
        opts = dataclasses.replace(sft, max_seq_len=context)
        prompts = [generation_prompt_ids(tok, r, opts, suite.max_new_tokens) for r in records]
        fits = [len(p) + suite.max_new_tokens <= context for p in prompts]
        kept = [p for p, ok in zip(prompts, fits) if ok]
        gen = GenerationOptions(
            max_new_tokens=suite.max_new_tokens,
            temperature=suite.temperature,
            stop_ids=stop_ids(tok),
            prefill_chunk=suite.prefill_chunk,
        )
        arms = max(num_arms, 1)
        rows = [p for p in kept for _ in range(arms)]  # prompt-major: a batch holds the same prompts as alone
        pixels = None
        if opts.tokens_per_image:  # LLaVA: each prompt's images
            kept_records = [r for r, ok in zip(records, fits) if ok]
            pixels = [example_pixels(r, opts) for r in kept_records for _ in range(arms)]
        texts = (
            complete(
                model,
                rows,
                gen,
                tok.decode,
                stop_strings=suite.stop,
                batch_size=suite.batch_size * arms,
                seed=seed,
                mesh=mesh,
                pad_multiple=PAD_MULTIPLE,
                adapter_ids=[k for _ in kept for k in range(arms)] if num_arms else None,
                pixels=pixels,
            )
            if kept
            else []
        )
        per_arm = []
        for k in range(arms):
            replies = iter(texts[k::arms])
            per_arm.append([Completion(len(p), next(replies), opened) if ok else None for p, ok in zip(prompts, fits)])
        return per_arm if num_arms else per_arm[0]

    return run


def teacher_forced_replies(model, records, tok: Tokenizer, sft: SFTOptions, batch_size: int, mesh, num_arms: int = 0):
    """[Completion(prompt tokens, reply)] where the reply is the model's most likely token at each of
    the target's positions given the target's true prefix (teacher forcing), decoded like a reply;
    the end-of-turn that closes the target is not part of it. Each example is tokenized as training
    tokenizes it (evaluation keeps every example); None for one whose prompt alone passes the context
    (dropped and counted, as in generation). num_arms = K > 0: a bank model, one list per arm."""
    opts = dataclasses.replace(
        sft, keep_all=True, max_seq_len=min(sft.max_seq_len, model.config.max_position_embeddings)
    )
    tokenized = [tokenize_example(tok, r, opts) for r in records]
    examples = [ex for ex in tokenized if ex is not None]
    arms = max(num_arms, 1)
    per_arm = [[] for _ in range(arms)]
    if not examples:
        return [[None] * len(records) for _ in range(arms)] if num_arms else [None] * len(records)
    predicted = []
    for start in range(0, len(examples), batch_size):
        group = examples[start : start + batch_size]
        group += [group[-1]] * (batch_size - len(group))  # one compiled shape for every batch
        rows = [ex["tokens"] for ex in group for _ in range(arms)]
        length = -(-max(len(r) for r in rows) // PAD_MULTIPLE) * PAD_MULTIPLE
        tokens = np.zeros((len(rows), min(length, model.config.max_position_embeddings)), np.int32)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
        ids = [k for _ in group for k in range(arms)] if num_arms else None
        predicted.extend(teacher_forced_argmax(model, tokens, mesh, adapter_ids=ids))
    i = 0
    for ex in tokenized:
        if ex is None:
            for k in range(arms):
                per_arm[k].append(None)
            continue
        scored = np.nonzero(ex["loss_mask"])[0]
        if len(scored) and ex["targets"][scored[-1]] == tok.end_of_turn_id:
            scored = scored[:-1]  # the turn's end is the template's, not the reference's
        for k in range(arms):
            reply = tok.decode(predicted[i * arms + k][scored].tolist())
            per_arm[k].append(Completion(int(scored[0]) + 1 if len(scored) else len(ex["tokens"]), reply))
        i += 1
    return per_arm if num_arms else per_arm[0]


def latency_fn(model_fn, config, context: int):
    """() -> latency.measure's {"variants": {"base"|"unmerged"|"merged": TTFT/TPOT stats}, "device",
    "device_count", "mesh"} of the model as it is now (eval.latency), decoded on the serving mesh
    eval.latency.mesh picks (sharding.serving_mesh), not on the training mesh.
    The settings are validated with the config (run.config.validate, before anything is written);
    checked again here, against this model's context (and a LLaVA's image placeholders, which
    latency.Requests puts before the prompt), for callers that skip validation; not at all when
    "latency" is not in eval.evaluators (nothing will call the result)."""
    if "latency" in config.eval.evaluators:
        model = model_fn()
        llava = getattr(model, "llava_config", None)
        check_latency(config, context, llava.tokens_per_image if llava else 0)
        check_serving_mesh(config.eval.latency.mesh, model.config.num_kv_heads)

    def run():
        s = config.eval.latency
        return latency.measure(model_fn(), s.batch_size, s.prompt_tokens, s.new_tokens, s.requests, s.warmup, s.mesh)

    return run


def loss_on_test_split(eval_step, lora, frozen, it, config, batch_sh) -> tuple[float, int]:
    """(mean token loss, examples whose target tail was cut) over the test split (eval.max_eval_batches).
    With an adapter bank the loss is per arm, [K]."""
    nll, count = 0.0, 0.0
    for i, local in enumerate(it):
        if config.eval.max_eval_batches and i >= config.eval.max_eval_batches:
            break
        out = eval_step(lora, frozen, global_batch(local, batch_sh, config.eval.batch_size))
        nll, count = nll + np.asarray(out["nll_sum"], np.float64), count + float(out["target_tokens"])
    return nll / max(count, 1.0), it.truncated_targets
