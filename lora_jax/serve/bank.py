"""Several trained adapters served over one base in one batch: PEFT adapter directories -> a bank model.

`bank_from_adapters(base, {"oproj": dir, "fc2": dir, …})` gives a Transformer with an AdapterBank over
`base`'s frozen arrays (shared, not copied); decode it with per-row `adapter_ids` (generate.py).
Adapters trained on different bases must not share a batch: each adapter's base is read from the
`lora_jax_base.json` our runs write beside the adapter (the exact base fingerprint), else from PEFT's
`base_model_name_or_path`; two different ones, or one that is not the serving base's, are refused.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx

from lora_jax.errors import ConfigError
from lora_jax.io.peft_adapter import BASE_FILE, read_peft_adapter
from lora_jax.lora.bank import AdapterBank
from lora_jax.model.arm_views import ArmViews, key_names
from lora_jax.model.transformer import Transformer


def adapter_base(adapter_dir: str) -> tuple[str, str]:
    """(kind, base) an adapter was trained on: ("fingerprint", …) from our runs, else
    ("name_or_path", PEFT's base_model_name_or_path), or ("", "") when the directory does not say."""
    d = epath.Path(adapter_dir)
    if (d / BASE_FILE).exists():
        return "fingerprint", json.loads((d / BASE_FILE).read_text())["base_model"]
    path = d / "adapter_config.json"
    name = json.loads(path.read_text()).get("base_model_name_or_path") or "" if path.exists() else ""
    return ("name_or_path", name) if name else ("", "")


def check_same_base(adapters: dict[str, str], base_fingerprint: str | None = None) -> None:
    """A clear error when the adapters were trained on different bases (or not on the serving base)."""
    seen: dict[tuple[str, str], str] = {}
    for name, d in adapters.items():
        kind, base = adapter_base(d)
        if not kind:
            continue
        if kind == "fingerprint" and base_fingerprint and base != base_fingerprint:
            raise ConfigError(
                f"adapter {name} ({d}) was trained on base {base}, not on the base served here ({base_fingerprint})"
            )
        for (other_kind, other_base), other in seen.items():
            if other_kind == kind and other_base != base:
                raise ConfigError(
                    f"adapters trained on different bases cannot share a batch: {other} ({adapters[other]}) on "
                    f"{other_base}, {name} ({d}) on {base}"
                )
        seen.setdefault((kind, base), name)


def bank_from_adapters(base: Transformer, adapters: dict[str, str], base_fingerprint: str | None = None):
    """A bank model over `base`'s frozen weights with the PEFT adapters in `adapters` (name -> dir), in
    that order (adapter id k = the k-th name). `base` may carry adapters of its own; they are not used."""
    if not adapters:
        raise ConfigError("no adapters to serve")
    check_same_base(adapters, base_fingerprint)
    read = [read_peft_adapter(d, base.config) for d in adapters.values()]
    bank = AdapterBank(tuple(adapters), tuple(spec for spec, _ in read))
    model = nnx.eval_shape(lambda: Transformer(base.config, bank, base.options, rngs=nnx.Rngs(0)))
    _, _, frozen = nnx.split(base, nnx.LoRAParam, ...)
    nnx.update(model, frozen)
    views = ArmViews.build(base.config, bank, base.options)
    arm_states = []
    for k, (_, weights) in enumerate(read):

        def value(path, _, weights=weights):
            target, kind = key_names(path)[-2:]
            return jnp.asarray(weights[target][0 if kind == "lora_a" else 1], jnp.float32)

        arm_states.append(jax.tree_util.tree_map_with_path(value, views.templates[k]))
    nnx.update(model, views.stack_lora(nnx.state(model, nnx.LoRAParam), arm_states))
    return model
