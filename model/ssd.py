"""State space duality (SSD, Mamba-2) core as free functions.

Index letters used in the einsums:
  b batch, c chunk, l and s time within a chunk (l: output, s: input), z chunk boundary (c + 1 of them),
  h head, p head dimension, n state dimension.

The SSM per head h, with scalar decay a_t = A_t (already multiplied by dt, so a_t <= 0):
    state_t = exp(a_t) * state_{t-1} + x_t B_t^T     (p, n)
    y_t     = state_t C_t                            (p,)
x is the input already multiplied by dt; B and C are shared by all heads (one group), as in ME-rPPG.
"""
from __future__ import annotations

import jax.numpy as jnp


def _cumsum(a, axis=-1):
    """Cumulative sum as a product with a triangular matrix: XLA on CPU lowers jnp.cumsum to a log-depth
    scan of many small ops, slow to compile; these sums are short (one chunk), so the product is cheap."""
    t = a.shape[axis]
    tri = jnp.triu(jnp.ones((t, t), a.dtype))  # tri[k, i] = 1 for k <= i
    return jnp.moveaxis(jnp.tensordot(jnp.moveaxis(a, axis, -1), tri, axes=1), -1, axis)


def segsum(a):
    """exp(segsum(a))[..., i, j] = prod_{k=j+1..i} exp(a_k) for i >= j, 0 above the diagonal.

    a: (..., T) -> (..., T, T). A masked cumulative sum, as the reference computes it, rather than a
    difference of cumulative sums, which loses precision when the decays are large.
    """
    t = a.shape[-1]
    x = jnp.broadcast_to(a[..., :, None], (*a.shape, t))  # x[..., i, j] = a_i
    x = jnp.where(jnp.tril(jnp.ones((t, t), bool), -1), x, 0.0)
    x = _cumsum(x, axis=-2)  # sum_{k=j+1..i} a_k
    return jnp.where(jnp.tril(jnp.ones((t, t), bool)), x, -jnp.inf)


def ssd_chunked(x, A, B, C, chunk, init_state=None):
    """SSD over whole chunks in parallel, state carried between chunks.

    x: (b, t, h, p); A: (b, t, h); B, C: (b, t, n); init_state: (b, h, p, n) or None (zeros).
    Returns y (b, t, h, p) and the state after the last frame (b, h, p, n).
    t need not be a multiple of chunk: the tail is padded with x = B = C = 0 and A = 0, under which the
    state passes through unchanged, so the outputs of real frames and the final state are exact.
    """
    b, t, h, p = x.shape
    n = B.shape[-1]
    pad = -t % chunk
    if pad:
        x, A, B, C = (jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2)) for v in (x, A, B, C))
    c = (t + pad) // chunk
    x = x.reshape(b, c, chunk, h, p)
    B = B.reshape(b, c, chunk, n)
    C = C.reshape(b, c, chunk, n)
    A = A.reshape(b, c, chunk, h).transpose(0, 3, 1, 2)  # (b, h, c, l)
    A_cum = _cumsum(A)
    if init_state is None:
        init_state = jnp.zeros((b, h, p, n), x.dtype)

    # 1. Diagonal blocks: outputs from inputs of the same chunk (a masked, decayed attention).
    L = jnp.exp(segsum(A))  # (b, h, c, l, s)
    y_diag = jnp.einsum("bcln,bcsn,bhcls,bcshp->bclhp", C, B, L, x)

    # 2. States within chunks: the state each chunk builds from its own inputs, starting from zero.
    decay_states = jnp.exp(A_cum[..., -1:] - A_cum)  # (b, h, c, l)
    states = jnp.einsum("bcln,bhcl,bclhp->bchpn", B, decay_states, x)

    # 3. Recurrence between chunks: the state entering each chunk, and the final state.
    states = jnp.concatenate([init_state[:, None], states], axis=1)  # (b, c + 1, h, p, n)
    decay_chunk = jnp.exp(segsum(jnp.pad(A_cum[..., -1], [(0, 0), (0, 0), (1, 0)])))  # (b, h, z, c + 1)
    new_states = jnp.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]

    # 4. State to output: each frame reads the state entering its chunk, decayed up to that frame.
    y_off = jnp.einsum("bcln,bchpn,bhcl->bclhp", C, states, jnp.exp(A_cum))

    y = (y_diag + y_off).reshape(b, c * chunk, h, p)[:, :t]
    return y, final_state


def ssd_step(state, x_t, A_t, B_t, C_t):
    """One frame of the recurrence.

    state: (b, h, p, n); x_t: (b, h, p); A_t: (b, h); B_t, C_t: (b, n). Returns y_t (b, h, p), new state.
    """
    state = state * jnp.exp(A_t)[..., None, None] + x_t[..., None] * B_t[:, None, None, :]
    y_t = jnp.einsum("bhpn,bn->bhp", state, C_t)
    return y_t, state
