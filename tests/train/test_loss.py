import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax.train.loss import chunked_cross_entropy


@pytest.mark.parametrize("cap", [None, 2.0])
def test_chunked_loss_and_gradient_equal_the_full_softmax_cross_entropy(cap):
    """cap: Gemma's final soft-capping, cap * tanh(logits / cap), differentiated by jax in the reference
    and by hand (the factor 1 - tanh²) in the chunked loss; logits of about ±4 make the cap bite."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 37, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(53, 16)), jnp.float32)  # [vocab, embed]
    tgt = jnp.asarray(rng.integers(0, 53, size=(2, 37)))
    mask = jnp.asarray(rng.random((2, 37)) > 0.3, jnp.float32)

    def full(h):
        logits = jnp.einsum("btd,vd->btv", h, w)
        logits = logits if cap is None else cap * jnp.tanh(logits / cap)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
        return jnp.sum(nll * mask)

    def chunked(h):
        return chunked_cross_entropy(h, w, tgt, mask, chunk=8, softcap=cap)[0]  # 37 = 4 chunks of 8 + padding

    np.testing.assert_allclose(chunked(h), full(h), rtol=1e-5)
    np.testing.assert_allclose(jax.jit(jax.grad(chunked))(h), jax.grad(full)(h), atol=1e-5)
    assert float(chunked_cross_entropy(h, w, tgt, mask, chunk=8)[1]) == float(mask.sum())
