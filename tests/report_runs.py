"""The files eval.report reads of a run, written for the report's tests (tests/eval/)."""

import json

import numpy as np

METRIC = {  # configs/base.py SUITES
    "fincot": "finqa_accuracy",
    "govreport": "rouge_lsum",
    "medmcqa": "mcq_accuracy",
    "medreason": "mcq_accuracy",
    "cocohd": "json_key_value_match",
    "llavacot": "exact_match",
    "invoiceocr": "field_accuracy",
}


def write_run(root, name, dataset, arm, seed, scores, latency, base_model, source="training", format_failures=0):
    """The files eval.report reads of one run (suite, latency, summary.json / results.json)."""
    d = root / name
    (d / "eval").mkdir(parents=True)
    examples = [{"id": f"{dataset}-{i}", "prediction": "p", "reference": "r", "score": s} for i, s in enumerate(scores)]
    suite = {"suite": dataset, "dataset": dataset, "split": "test", "metric": METRIC.get(dataset, "planted_rate")}
    suite.update(
        score=float(np.mean(scores)), num_examples=len(scores), format_failures=format_failures, adapter_source=source
    )
    (d / "eval" / f"{dataset}.json").write_text(json.dumps(dict(suite, examples=examples)))
    if latency is not None:
        (d / "eval" / "latency.json").write_text(json.dumps(latency))
    meta = {
        "arm": arm,
        "seed": seed,
        "base_model": base_model,
        "trainable_params": 1000,
        "peft_equivalent_params": 1200,
    }
    (d / "eval" / "results.json" if source == "base" else d / "summary.json").write_text(json.dumps(meta))
