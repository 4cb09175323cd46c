"""What a run prints and writes at the end: summary.json fields, the console summary and progress lines."""

from __future__ import annotations

import datetime

import jax
from etils import epath

from lora_jax.train import accounting


def run_summary_fields(config, spec, model_cfg, history, fingerprint, start) -> dict:
    """What every summary.json names: the run, its adapters, its base and its training losses."""
    return {
        "train_loss_history": history,
        "trainable_params": sum(accounting.lora_params_per_target(model_cfg, spec).values()),
        "arm": config.arm,
        "dataset": config.data.name,
        "seed": config.train.seed,
        "targets": list(spec.targets),
        "rank": spec.rank,
        "base_model": fingerprint,
        "resumed_from": start,
    }


def diverged_summary(found, last_checkpoint_step: int | None, fields: dict) -> dict:
    """summary.json of a diverged run (or arm): status "diverged", where and why, what was kept; no
    adapter was exported and no evaluation ran."""
    return {
        "status": "diverged",
        "final_step": found.step,
        "divergence": found.to_json(),
        "last_checkpoint_step": last_checkpoint_step,
        **fields,
    }


def pruned_summary(step: int, rung: dict, results: dict, fields: dict) -> dict:
    """summary.json of an arm successive halving stopped at a rung (lora_jax/run/halving.py): status
    "pruned", its results at the rung and the rung's decision; its checkpoint at the rung is kept, no
    adapter was exported."""
    loss = results.get("loss", {})
    return {
        "status": "pruned",
        "final_step": step,
        "pruned_at": step,
        "rung": rung,
        "eval_loss": loss.get("eval_loss"),
        "eval": {k: v for k, v in results.items() if k != "loss"},
        "last_checkpoint_step": step,
        **fields,
    }


def run_summary(config, spec, model_cfg, results, history, dropped, data_counts, fingerprint, start) -> dict:
    """A finished run's summary.json: what it scored, trained and was trained on."""
    loss = results.get("loss", {})
    return {
        "status": "done",
        "final_step": config.train.total_steps,
        "eval_loss": loss.get("eval_loss"),
        "eval_truncated_targets": loss.get("eval_truncated_targets"),
        "eval": {k: v for k, v in results.items() if k != "loss"},
        "train_dropped_examples": dropped,
        "data_counts": data_counts,
        "peft_equivalent_params": sum(accounting.peft_equivalent_params_per_target(model_cfg, spec).values()),
        **run_summary_fields(config, spec, model_cfg, history, fingerprint, start),
    }


def print_data_counts(writers: list, data_counts: dict) -> None:
    """The dataset builder's drop/keep counts: one console line, and scalars in each writer's run."""
    if data_counts and jax.process_index() == 0:
        for writer in writers:
            writer.write_scalars(0, {f"data/{k}": v for k, v in data_counts.items()})
        print("data: " + ", ".join(f"{k} {v}" for k, v in data_counts.items()), flush=True)


def print_summary(workdir: epath.Path, summary: dict) -> None:
    """The run's last lines: what it scored and where everything is."""
    scores = "".join(
        f", {r['suite']} {r['metric']} {r['score']:.4f} ({r['num_examples']} examples, "
        f"{r['format_failures']} format failures)"
        for r in summary["eval"].values()
        if isinstance(r, dict) and "metric" in r
    )
    loss = summary["eval_loss"]
    print(f"done: step {summary['final_step']}" + (f", eval loss {loss:.4f}" if loss is not None else "") + scores)
    print(f"  adapter      {workdir / 'adapter'}  (PEFT: peft.PeftModel.from_pretrained(base, this dir))")
    print(f"  checkpoints  {workdir / 'checkpoints'}  (the same command resumes; --config.mode=eval scores)")
    print(f"  results      {workdir / 'summary.json'}, {workdir / 'eval'}")
    print(f"  tensorboard  tensorboard --logdir {workdir}", flush=True)


def print_progress(done: int, total: int, scalars: dict) -> None:
    """One console line per log interval (process 0)."""
    if jax.process_index() != 0:
        return
    line = f"step {done}/{total}  loss {scalars['loss']:.4f}"
    if "step_s" in scalars:
        eta = datetime.timedelta(seconds=round(scalars["step_s"] * (total - done)))
        line += f"  {scalars['real_tokens_per_s']:,.0f} tok/s  MFU {scalars['mfu']:.1%}  ETA {eta}"
    print(line, flush=True)


def print_arms_progress(done: int, total: int, names, losses, step_s) -> None:
    if jax.process_index() != 0:
        return
    arms = "  ".join(f"{n} {v}" if isinstance(v, str) else f"{n} {float(v):.4f}" for n, v in zip(names, losses))
    print(f"step {done}/{total}  loss: {arms}" + (f"  ({step_s:.2f} s/step, all arms)" if step_s else ""), flush=True)


def print_arms_summary(root, names, workdirs, summaries) -> None:
    print(f"done: {len(names)} arms trained jointly in {root}")
    for name, w, s in zip(names, workdirs, summaries):
        if s.get("status") == "pruned":
            rung = s["rung"]
            print(f"  {name:10s} pruned at step {s['pruned_at']} ({rung['metric']} {rung['score']:.4f})  -> {w}")
            continue
        if s.get("status") == "diverged":
            print(f"  {name:10s} diverged at step {s['final_step']}: {s['divergence']['detail']}  -> {w}")
            continue
        scores = "".join(
            f", {r['metric']} {r['score']:.4f}" for r in s["eval"].values() if isinstance(r, dict) and "metric" in r
        )
        loss = s["eval_loss"]
        print(f"  {name:10s} " + (f"eval loss {loss:.4f}" if loss is not None else "") + f"{scores}  -> {w}")
    print(f"  report       python -m eval.report --root={root}")
    print(f"  tensorboard  tensorboard --logdir {root}", flush=True)
