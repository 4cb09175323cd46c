"""A generation suite as configured in `config.eval.suites.<dataset>` (see configs/base.py)."""

from __future__ import annotations

import dataclasses

SPLITS = ("test", "train")


class EvalConfigError(ValueError):
    """An eval setting that cannot run (eval/ never imports lora_jax: lora_jax.run turns this into its
    one-line ConfigError, with the same message)."""


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str  # the dataset; results go to <workdir>/eval/<name>.json
    split: str  # the dataset split scored
    metric: str  # a name in eval.metrics.METRICS
    num_examples: int  # the first N examples of the split (0 = all)
    max_new_tokens: int
    stop: tuple[str, ...]  # stop strings (the end-of-turn and EOS ids always stop a row)
    batch_size: int
    prefill_chunk: int  # 0 = prefill the whole prompt at once
    temperature: float  # 0 = greedy, as the study scores
    samples_to_log: int  # generations written to TensorBoard as text
    # True: the reply is the model's most likely token at each of the reference's positions given the
    # reference's own prefix (one forward pass, no free generation): the planted study's teacher agreement.
    teacher_forced: bool = False


def suite_of(config) -> Suite:
    """The suite of config.data.name, checked (EvalConfigError naming the key)."""
    from eval.metrics import METRICS

    name = config.data.name
    if name not in config.eval.suites:
        raise EvalConfigError(
            f"eval.suites has no suite for data.name={name!r}; valid: {', '.join(config.eval.suites)}"
        )
    s = config.eval.suites[name]
    key = f"eval.suites.{name}"
    if s.metric not in METRICS:
        raise EvalConfigError(f"{key}.metric={s.metric!r} is unknown; valid: {', '.join(METRICS)}")
    if s.split not in SPLITS:
        raise EvalConfigError(f"{key}.split={s.split!r} is unknown; valid: {', '.join(SPLITS)}")
    for field, low in (("num_examples", 0), ("max_new_tokens", 1), ("batch_size", 1), ("prefill_chunk", 0)):
        if getattr(s, field) < low:
            raise EvalConfigError(f"{key}.{field}={getattr(s, field)} must be >= {low}")
    if s.temperature < 0:
        raise EvalConfigError(f"{key}.temperature={s.temperature} must be >= 0")
    return Suite(
        name,
        s.split,
        s.metric,
        s.num_examples,
        s.max_new_tokens,
        tuple(s.stop),
        s.batch_size,
        s.prefill_chunk,
        float(s.temperature),
        config.eval.samples_to_log,
        bool(s.teacher_forced),
    )
