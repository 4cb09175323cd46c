"""The evaluator registry, driven by config: `config.eval.evaluators` names what runs every
`eval.eval_every_steps` steps and at the end of training (and once in mode=eval).

  loss      — token-level loss on the test split (`eval_loss`, `eval_truncated_targets`);
  generate  — the dataset's suite (`config.eval.suites.<data.name>`): greedy generation and the
              study's metric; `<workdir>/eval/<suite>.json` holds the aggregate, the format
              failures and every example's prediction, reference and score;
  latency   — this run's own model decoding (`config.eval.latency`): TTFT and TPOT p50/p95 of the
              base, the adapters unmerged and merged (lora_jax/serve/latency.py), in `<workdir>/eval/latency.json`.

An evaluator is a function (EvalContext, step) -> {result name: value}; add one with @evaluator.
The context carries functions (test loss, completions), never the trainer or a model.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

import jax
from etils import epath

from eval.generation_suite import run_suite
from eval.suites import EvalConfigError, suite_of

EVALUATORS: dict[str, Callable] = {}


def evaluator(name: str):
    def register(fn):
        EVALUATORS[name] = fn
        return fn

    return register


@dataclasses.dataclass(kw_only=True)
class EvalContext:
    config: object
    workdir: epath.Path
    writer: object  # clu metric writer
    sources: dict  # split -> records (the dataset's common schema)
    complete: Callable  # (records, Suite) -> [generation_suite.Completion or None], the model as it is now
    eval_loss: Callable[[], tuple[float, int]]  # -> (loss, truncated targets) on the test split
    adapter: str | None  # the adapter scored (a path), None for the base model
    adapter_source: str  # "training" | "checkpoint" | "peft" | "base"
    write_text: Callable[[epath.Path, str], None]  # (path, text): the run's atomic text write
    latency: Callable[[], dict] | None = None  # -> {"variants": {"base"|…: {"tpot_ms_p95", …}}, "device", "mesh", …}


def check_evaluators(config) -> None:
    unknown = [n for n in config.eval.evaluators if n not in EVALUATORS]
    if unknown:
        raise EvalConfigError(f"eval.evaluators has {', '.join(unknown)}; valid: {', '.join(EVALUATORS)}")
    if "generate" in config.eval.evaluators:
        suite_of(config)


def run_evaluators(ctx: EvalContext, step: int, names=None) -> dict:
    """Runs every configured evaluator (or those of `names`); returns their results by evaluator name."""
    return {name: EVALUATORS[name](ctx, step) for name in (ctx.config.eval.evaluators if names is None else names)}


@evaluator("loss")
def loss_evaluator(ctx: EvalContext, step: int) -> dict:
    loss, truncated = ctx.eval_loss()
    scalars = {"eval_loss": loss, "eval_truncated_targets": truncated}
    ctx.writer.write_scalars(step, scalars)
    return scalars


@evaluator("generate")
def generate_evaluator(ctx: EvalContext, step: int) -> dict:
    suite = suite_of(ctx.config)
    source = ctx.sources[suite.split]
    n = len(source) if not suite.num_examples else min(suite.num_examples, len(source))
    result = run_suite([source[i] for i in range(n)], suite, ctx.complete)
    examples = result.pop("examples")
    summary = dict(
        result,
        suite=suite.name,
        dataset=ctx.config.data.name,
        arm=ctx.config.arm,  # the scored adapter's arm (mode=eval labels an adapter by its own targets)
        targets=list(ctx.config.lora.targets),
        split=suite.split,
        metric=suite.metric,
        step=step,
        adapter=ctx.adapter,
        adapter_source=ctx.adapter_source,
    )
    if jax.process_index() == 0:
        out = epath.Path(ctx.workdir) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        ctx.write_text(out / f"{suite.name}.json", json.dumps(dict(summary, examples=examples), indent=1))
        prefix = f"eval/{suite.name}"
        ctx.writer.write_scalars(
            step,
            {
                f"{prefix}/{suite.metric}": result["score"],
                f"{prefix}/format_failures": result["format_failures"],
                f"{prefix}/dropped_prompt_too_long": result["dropped_prompt_too_long"],
                f"{prefix}/bad_references": result["bad_references"],
            },
        )
        ctx.writer.write_texts(step, {f"{prefix}/samples": _samples_markdown(examples[: suite.samples_to_log])})
        print(
            f"eval {suite.name}: {suite.metric} {result['score']:.4f} over {result['num_examples']} examples, "
            f"{result['format_failures']} format failures, {result['dropped_prompt_too_long']} prompts too long",
            flush=True,
        )
    return summary


def _samples_markdown(rows: list[dict]) -> str:
    def quote(text: str) -> str:
        return "\n".join("    " + line for line in (text or "(empty)").splitlines()) or "    (empty)"

    parts = []
    for r in rows:
        parts.append(
            f"**{r['id']}** — score {r['score']}"
            + (f", format failure: {r['format_failure']}" if r.get("format_failure") else "")
            + f"\n\nprediction:\n\n{quote(r['prediction'])}\n\nreference:\n\n{quote(r['reference'])}"
        )
    return "\n\n---\n\n".join(parts) or "(no examples)"


@evaluator("latency")
def latency_evaluator(ctx: EvalContext, step: int) -> dict:
    settings = ctx.config.eval.latency
    measured = ctx.latency()
    variants = measured["variants"]
    base_p95 = variants["base"]["tpot_ms_p95"]
    result = {
        "step": step,
        "adapter": ctx.adapter,
        "adapter_source": ctx.adapter_source,
        "batch_size": settings.batch_size,
        "prompt_tokens": settings.prompt_tokens,
        "new_tokens": settings.new_tokens,
        # where it was decoded: the serving mesh (lora_jax/sharding.py serving_mesh), not the training mesh
        "device": measured["device"],
        "device_count": measured["device_count"],
        "mesh": measured["mesh"],
        "variants": variants,
        # the study's figure: how much slower a token is with the adapters served unmerged
        "tpot_p95_increase_unmerged": variants["unmerged"]["tpot_ms_p95"] / base_p95 - 1 if base_p95 else None,
        "tpot_p95_increase_merged": variants["merged"]["tpot_ms_p95"] / base_p95 - 1 if base_p95 else None,
    }
    if jax.process_index() == 0:
        out = epath.Path(ctx.workdir) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        ctx.write_text(out / "latency.json", json.dumps(result, indent=1))
        ctx.writer.write_scalars(
            step,
            {
                f"latency/{v}/{k}": x
                for v, stats in variants.items()
                for k, x in stats.items()
                if k.endswith(("p50", "p95"))
            },
        )
        u = variants["unmerged"]
        print(
            f"latency: TPOT p95 {u['tpot_ms_p95']:.2f} ms unmerged, {variants['merged']['tpot_ms_p95']:.2f} merged, "
            f"{base_p95:.2f} base; TTFT p50 {u['ttft_ms_p50']:.1f} ms",
            flush=True,
        )
    return result
