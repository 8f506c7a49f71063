"""The chunked SSD against the plain recurrence (`lax.scan` over `ssd_step`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.ssd import ssd_chunked as ssd_chunked_eager
from model.ssd import ssd_step

ssd_chunked = jax.jit(ssd_chunked_eager, static_argnums=4)  # eager op-by-op runs compile every op

B, H, P, N = 2, 3, 4, 5


def _inputs(t, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, t, H, P)).astype(np.float32)
    A = (-np.exp(rng.normal(size=(B, t, H))) * 0.3).astype(np.float32)  # log-decays <= 0
    Bm = rng.normal(size=(B, t, N)).astype(np.float32)
    C = rng.normal(size=(B, t, N)).astype(np.float32)
    s0 = rng.normal(size=(B, H, P, N)).astype(np.float32)
    return x, A, Bm, C, s0


@jax.jit
def _scan(x, A, Bm, C, s0):
    def step(s, inp):
        y, s = ssd_step(s, *inp)
        return s, y

    time_first = [jnp.moveaxis(v, 1, 0) for v in (x, A, Bm, C)]
    s, y = jax.lax.scan(step, s0, time_first)
    return jnp.moveaxis(y, 0, 1), s


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("t", [32, 37, 5])  # whole chunks; a partial last chunk; shorter than one chunk
def test_chunked_equals_scan(t):
    x, A, Bm, C, s0 = _inputs(t)
    y, s = ssd_chunked(x, A, Bm, C, 16, s0)
    y_ref, s_ref = _scan(x, A, Bm, C, s0)
    assert y.shape == (B, t, H, P) and s.shape == (B, H, P, N)
    _close(y, y_ref)
    _close(s, s_ref)  # the state after the last real frame, not after the padding


def test_zero_initial_state_is_default():
    x, A, Bm, C, s0 = _inputs(20)
    y0, s_0 = ssd_chunked(x, A, Bm, C, 8)
    y1, s_1 = ssd_chunked(x, A, Bm, C, 8, jnp.zeros_like(s0))
    _close(y0, y1)
    _close(s_0, s_1)


def test_chunked_prefix_then_steps():
    t, split = 45, 32
    x, A, Bm, C, s0 = _inputs(t, seed=1)
    y_ref, s_ref = _scan(x, A, Bm, C, s0)
    y_pre, s = ssd_chunked(x[:, :split], A[:, :split], Bm[:, :split], C[:, :split], 16, s0)
    ys = [y_pre]
    for i in range(split, t):
        y_t, s = ssd_step(s, x[:, i], A[:, i], Bm[:, i], C[:, i])
        ys.append(y_t[:, None])
    _close(jnp.concatenate(ys, axis=1), y_ref)
    _close(s, s_ref)


def test_jit_equals_no_jit():
    x, A, Bm, C, s0 = _inputs(40, seed=2)
    y, s = ssd_chunked_eager(x, A, Bm, C, 16, s0)
    y_j, s_j = ssd_chunked(x, A, Bm, C, 16, s0)
    _close(y, y_j)
    _close(s, s_j)
