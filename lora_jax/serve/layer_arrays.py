"""Per-layer arrays for decoding: the decoder layers' stacked weights sliced once, outside any jit.

A decode step that slices its layer's weights out of the stacked `[layers, ...]` arrays makes a
copy of every weight at every step on XLA:CPU (a dynamic-slice under the layer scan, a static slice
unrolled), so each weight is read twice per token. `Transformer.hidden_states(layer_params=...)`
runs the layers unrolled over these arrays instead (the Stepper in generate.py does).
"""

from __future__ import annotations

import jax


def split_layers(*models) -> list[tuple[dict, ...]]:
    """Each model's decoder-layer arrays, one dict per layer (`hidden_states(layer_params=...)`), sliced
    here, outside any jit, so that a decode step reads each weight in place. A Llava gives its language
    model's. The slices are copies: while they are held, the layer weights take their memory twice.
    An array the models share (the same object: `serve.latency.variants` gives base, unmerged and
    merged one frozen base) is sliced once, for all of them. A slice keeps the stacked array's
    sharding less its layer axis (tensor-parallel serving stays tensor-parallel)."""
    memo: dict[int, tuple[jax.Array, list[jax.Array]]] = {}

    def per_layer(x, n):
        if id(x) not in memo:  # the entry holds x, so its id is not reused while memo lives
            slices = [x[i] for i in range(n)]
            if isinstance(x.sharding, jax.sharding.NamedSharding):
                spec = tuple(x.sharding.spec)
                if spec and spec[0] is not None:  # sharding.py never shards "layers"; a rule that did would
                    raise ValueError(f"the layer axis is sharded ({spec[0]!r}): slices would gather it")
                sharding = x.sharding.update(spec=jax.sharding.PartitionSpec(*spec[1:]))  # memory kind kept
                slices = jax.device_put(slices, sharding)
            memo[id(x)] = (x, slices)
        return memo[id(x)][1]

    out = []
    for model in models:
        model = getattr(model, "language", model)
        n = model.config.num_layers
        stacked = jax.tree.map(lambda x, n=n: per_layer(x, n), model.layers.arrays())
        out.append(
            tuple(jax.tree.map(lambda xs, i=i: xs[i], stacked, is_leaf=lambda x: isinstance(x, list)) for i in range(n))
        )
    return out
