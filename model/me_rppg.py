"""ME-rPPG as pure functions over a parameter pytree, in its two modes.

chunk: 160-frame chunks in parallel (TN with a least-squares linear trend per chunk, chunked SSD), the
       recurrent state carried from chunk to chunk, so a video of any length is one pass.
flow:  one frame at a time (TN with a recursive moving average, recurrent SSD), constant memory.

The network (open-rppg 0.1.1 `InfinitePulse([2]*4)`):
  frames /255 -> 4 x SSC block -> spatial mean -> out_proj -> 2 x Mamba-2 -> Dense(1) -> BVP
  SSC block:  x1 = in_proj(x); x = SSConv(SSConv(x1)) + x1; x = Conv(2x2, stride 2, 'same')(x)
  SSConv:     x0 = TN(x); x2 = Mamba2(mean_hw(relu(Dense(Conv3x3(x0))))); relu(Conv3x3(x0 + proj(x2)))
Parameters are the nested dicts that `model.weights.load_params` builds (shapes in its docstring); the
recurrent state is `model.state.MEState`. Nothing here is jitted: `apply_chunk`, `flow_step` and
`flow_frames` nest in a caller's jit, scan or grad; `model.apply_chunk` etc. are the same, compiled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp

from model.config import ME, MEConfig
from model.ssd import ssd_chunked, ssd_step
from model.state import MambaState, MEState, SSConvState, TNState


def param_count(params) -> int:
    """Number of values in a parameter pytree."""
    return sum(int(a.size) for a in jax.tree.leaves(params))


# ---------------------------------------------------------------- layers


def _accumulator(dtype):
    """Accumulation dtype for products in `dtype`: float32, or float64 when the products are (gradient checks)."""
    return jnp.promote_types(dtype, jnp.float32)


# The layers over every pixel of every frame carry their own gradients (custom VJPs, the same values as JAX's
# rules): on XLA:CPU the backward is bound by memory traffic, and training recomputes each chunk, writing what
# its pullback reads (model.train). With JAX's rules a chunk kept 630 MB per stream, these keep 290 MB:
# - relu keeps its sign alone (JAX's also keeps a zero array as big as x), TN its output and scale, and a
#   convolution x itself (JAX's rule keeps a reshaped copy of x);
# - SSConv's conv2 reads TN's output plus a per-frame offset (the Mamba-2's projection): `_conv_offset` keeps
#   the two apart, so TN's output is the one array both convolutions of the layer keep, and XLA transposes it
#   once for both weight gradients;
# - a weight gradient x^T g contracts the rows of both operands, and XLA:CPU transposes the left one: JAX puts
#   g there, as wide as x or wider (dense1: 64 channels against 32; in_proj of block 0: 32 against 3);
# - a bias gradient as XLA reduces it is a slow tree of partial sums, where a product with ones is one pass.


def _rows(a):
    return a.reshape(-1, a.shape[-1])


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x, w, dtype):
    """x @ w with the product in `dtype`, accumulated and returned in float32 (or wider). x: (..., k); w: (k, c)."""
    return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=_accumulator(dtype))


def _matmul_fwd(x, w, dtype):
    return _matmul(x, w, dtype), (x, w)


def _matmul_bwd(dtype, residuals, g):
    x, w = residuals
    acc, g = _accumulator(dtype), g.astype(dtype)
    dx = jnp.matmul(g, w.astype(dtype).T, preferred_element_type=acc).astype(x.dtype)
    dw = jax.lax.dot_general(_rows(x).astype(dtype), _rows(g), (((0,), (0,)), ((), ())), preferred_element_type=acc)
    return dx, dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def _add_bias(y, b):
    """y + b over the last axis. y: (..., c); b: (c,)."""
    return y + b


def _add_bias_fwd(y, b):
    return y + b, None


def _add_bias_bwd(_, g):
    # two shorter sums rather than one long one, for float32's sake: a product with ones over the leading
    # axes, then a sum over the second-to-last
    rows = g.reshape(-1, g.shape[-2] * g.shape[-1]) if g.ndim > 2 else g
    return g, jnp.sum((jnp.ones((1, rows.shape[0]), g.dtype) @ rows).reshape(-1, g.shape[-1]), axis=0)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_vjp
def _relu(x):
    """max(x, 0), with jax.nn.relu's gradient (0 at 0), keeping only the sign."""
    return jnp.maximum(x, 0)


def _relu_fwd(x):
    return _relu(x), x > 0


def _relu_bwd(positive, g):
    return (jnp.where(positive, g, 0),)


_relu.defvjp(_relu_fwd, _relu_bwd)


def _dense(x, p, dtype=None):
    """x @ w + b with the product in `dtype` (bfloat16 on request; None: the operands' own), accumulated and
    returned in float32 (or wider)."""
    return _add_bias(_matmul(x, p["w"], jnp.result_type(x, p["w"]) if dtype is None else dtype), p["b"])


def _conv_frames(x, w, stride: int, dtype):
    """conv_general_dilated on every frame, 'same' padding. x: (b, l, H, W, C); w: (kh, kw, C, C')."""
    b, l = x.shape[:2]
    y = jax.lax.conv_general_dilated(
        x.reshape(b * l, *x.shape[2:]).astype(dtype), w.astype(dtype), (stride, stride), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=_accumulator(dtype),
    )
    return y.reshape(b, l, *y.shape[1:])  # (b, l, H', W', C')


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, stride: int, dtype):
    """_conv_frames with JAX's own gradients, keeping x itself."""
    return _conv_frames(x, w, stride, dtype)


def _conv_fwd(x, w, stride, dtype):
    return _conv_frames(x, w, stride, dtype), (x, w)


def _conv_bwd(stride, dtype, saved, g):
    return jax.vjp(partial(_conv_frames, stride=stride, dtype=dtype), *saved)[1](g)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _tap_sums(a, axis: int, k: int):
    """For each tap t of a k-wide 'same' kernel: the sum of `a` over the positions of `axis` whose tap-t input
    lies inside the image (the rest read the zero padding). a: (..., n, ...) -> (..., k, ...) at `axis`."""
    n, lo = a.shape[axis], (k - 1) // 2
    total, sums = jnp.sum(a, axis), []
    for t in range(k):  # the total less the few border positions whose tap t falls outside
        s = total
        if lo > t:
            s = s - jnp.sum(jax.lax.slice_in_dim(a, 0, lo - t, axis=axis), axis)
        if t > lo:
            s = s - jnp.sum(jax.lax.slice_in_dim(a, n - (t - lo), n, axis=axis), axis)
        sums.append(s)
    return jnp.stack(sums, axis)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _conv_offset(x, c, w, b, dtype):
    """_conv_frames(x + c, w) + b with c constant over each frame: x (b, l, H, W, C), c (b, l, C) ->
    (b, l, H, W, C'). Stride 1, 'same' padding; products in `dtype`, accumulated in float32 (or wider)."""
    return _conv_frames(x + c[:, :, None, None], w, 1, dtype) + b


def _conv_offset_fwd(x, c, w, b, dtype):
    return _conv_offset(x, c, w, b, dtype), (x, c, w, b[:0])  # b[:0]: the bias's dtype, no values


def _conv_offset_bwd(dtype, saved, g):
    # By linearity, conv(x + c) = conv(x) + conv(c): the weight gradient is x's (the same x, transposed once,
    # as the layer's other convolution) plus c times each tap's sum of g over the pixels whose input lies
    # inside the frame, and those sums give c's and the bias's gradients too. Nothing of x + c is kept.
    x, c, w, b = saved
    y, pullback = jax.vjp(partial(_conv_frames, stride=1, dtype=dtype), x, w)
    dx, dw = pullback(g.astype(y.dtype))
    kh, kw = w.shape[:2]
    sums = _tap_sums(_tap_sums(g, 3, kw), 2, kh)  # (b, l, kh, kw, C')
    dc = jnp.einsum("blijd,ijcd->blc", sums, w.astype(sums.dtype))
    dw = dw + jnp.einsum("blc,blijd->ijcd", c.astype(sums.dtype), sums).astype(dw.dtype)
    db = jnp.sum(sums[:, :, (kh - 1) // 2, (kw - 1) // 2], axis=(0, 1))  # the centre tap reads every pixel
    return dx, dc.astype(c.dtype), dw, db.astype(b.dtype)


_conv_offset.defvjp(_conv_offset_fwd, _conv_offset_bwd)


def _conv2d(x, p, stride=1, dtype=jnp.float32):
    """Keras Conv3D with a (1, kh, kw) kernel, 'same' padding, on every frame. x: (b, l, H, W, C).
    Products in `dtype`, accumulated and returned in float32 (or wider)."""
    return _add_bias(_conv(x, p["w"], stride, dtype), p["b"])  # (b, l, H', W', C')


def _mamba_split(p, u):
    """in_proj and its split. u: (..., d) -> z (..., d_inner), xBC (..., d_inner + 2N), dt (..., h)."""
    d_inner = p["out_proj"].shape[0]
    zxbcdt = u @ p["in_proj"]
    n_xbc = p["conv_w"].shape[1]
    return zxbcdt[..., :d_inner], zxbcdt[..., d_inner:d_inner + n_xbc], zxbcdt[..., d_inner + n_xbc:]


def _mamba_out(p, y, x, z, eps):
    """D skip, gated RMSNorm, out_proj. y, x: (..., h, p); z: (..., d_inner)."""
    y = y + x * p["D"][:, None]
    y = y.reshape(*y.shape[:-2], -1) * jax.nn.silu(z)  # (..., d_inner)
    y = y * jax.lax.rsqrt(jnp.mean(y * y, -1, keepdims=True) + eps) * p["norm"]
    return y @ p["out_proj"]


def mamba_chunk(p, u, state: MambaState, chunk: int, eps: float):
    """Mamba-2 over a run of frames. u: (b, l, d) -> (b, l, d), new state."""
    b, l, _ = u.shape
    h, d_inner = p["A_log"].shape[0], p["out_proj"].shape[0]
    n = (p["conv_w"].shape[1] - d_inner) // 2
    k = p["conv_w"].shape[0]
    z, xbc, dt = _mamba_split(p, u)
    dt = jax.nn.softplus(dt + p["dt_bias"])  # (b, l, h)
    # Causal depthwise conv; like the reference, the kept window is k frames of which the last k-1 are read.
    window = jnp.concatenate([state.conv, xbc], axis=1)  # (b, k + l, conv_dim)
    xbc = sum(window[:, 1 + j:1 + j + l] * p["conv_w"][j] for j in range(k)) + p["conv_b"]
    xbc = jax.nn.silu(xbc)
    x = xbc[..., :d_inner].reshape(b, l, h, d_inner // h)  # (b, l, h, p)
    B, C = xbc[..., d_inner:d_inner + n], xbc[..., d_inner + n:]
    A = -jnp.exp(p["A_log"])
    y, ssd_state = ssd_chunked(x * dt[..., None], A * dt, B, C, chunk, state.ssd)
    return _mamba_out(p, y, x, z, eps), MambaState(ssd_state, window[:, -k:])


def mamba_step(p, u, state: MambaState, eps: float):
    """Mamba-2 on one frame. u: (b, d) -> (b, d), new state."""
    h, d_inner = p["A_log"].shape[0], p["out_proj"].shape[0]
    n = (p["conv_w"].shape[1] - d_inner) // 2
    z, xbc, dt = _mamba_split(p, u)
    dt = jax.nn.softplus(dt + p["dt_bias"])  # (b, h)
    window = jnp.concatenate([state.conv[:, 1:], xbc[:, None]], axis=1)  # (b, k, conv_dim)
    xbc = jax.nn.silu(jnp.einsum("bkc,kc->bc", window, p["conv_w"]) + p["conv_b"])
    x = xbc[:, :d_inner].reshape(u.shape[0], h, d_inner // h)  # (b, h, p)
    B, C = xbc[:, d_inner:d_inner + n], xbc[:, d_inner + n:]
    A = -jnp.exp(p["A_log"])
    y, ssd_state = ssd_step(state.ssd, x * dt[..., None], A * dt, B, C)
    return _mamba_out(p, y, x, z, eps), MambaState(ssd_state, window)


def _tn_trend(x, eps: float):
    """TN over one chunk as plain expressions: (normalised x, chunk mean (b, 1, H, W, K), squared residual of
    the first frame (b, H, W, K), 1 / RMS (b, 1, H, W, K))."""
    l = x.shape[1]
    tc = _centred_time(l, x.dtype)
    # Sums of the offsets from the first frame: features far from zero with a small spread would otherwise
    # carry the mean's rounding into the residual, which the division by the spread amplifies.
    x0 = x[:, :1]
    mean = x0 + jnp.mean(x - x0, axis=1, keepdims=True)  # (b, 1, H, W, K)
    slope = jnp.sum((x - mean) * tc, axis=1, keepdims=True) / jnp.sum(tc * tc)
    res = x - mean - slope * tc  # residual from the least-squares line; each reduction re-reads x
    scale = jax.lax.rsqrt(jnp.mean(res * res, axis=1, keepdims=True) + eps)
    return res * scale, mean, res[:, 0] * res[:, 0], scale


def _centred_time(l: int, dtype):
    """The chunk's frame times on [0, 1], centred: (l, 1, 1, 1)."""
    return (jnp.linspace(0.0, 1.0, l, dtype=dtype) - 0.5).reshape(l, 1, 1, 1)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def tn_chunk(x, eps: float):
    """TN over one chunk: remove each pixel-channel's least-squares linear trend, divide by its RMS.

    x: (b, L, H, W, K). The returned state is what the reference reports (chunk mean, squared residual of
    the chunk's first frame); chunk mode never reads it. Its gradient is in closed form, from the output and
    the scale alone (see the layers' note above).
    """
    y, mean, sq0, _ = _tn_trend(x, eps)
    return y, TNState(mean[:, 0], sq0)


def _tn_chunk_fwd(x, eps):
    y, mean, sq0, scale = _tn_trend(x, eps)
    return (y, TNState(mean[:, 0], sq0)), (y, scale)


def _tn_chunk_bwd(eps, saved, cotangents):
    # residual r = y / scale is x's projection off {1, t}, r = P x with P symmetric: so dx = P dr, with
    # dr = scale * (gy - y * mean_t(gy * y)) from y = r * rsqrt(mean_t(r^2) + eps), plus 2 r dsq0 at frame 0;
    # and mean = mean_t(x) adds dmean / L to every frame.
    y, scale = saved
    gy, (gmean, gsq0) = cotangents
    l = y.shape[1]
    tc = _centred_time(l, y.dtype)
    first = (jnp.arange(l) == 0).reshape(l, 1, 1, 1)
    dr = scale * (gy - y * jnp.mean(gy * y, axis=1, keepdims=True))
    dr = dr + jnp.where(first, 2 * (y / scale) * gsq0[:, None], 0)
    slope = jnp.sum(dr * tc, axis=1, keepdims=True) / jnp.sum(tc * tc)
    return (dr - jnp.mean(dr, axis=1, keepdims=True) - slope * tc + gmean[:, None] / l,)


tn_chunk.defvjp(_tn_chunk_fwd, _tn_chunk_bwd)


def tn_step(x, state: TNState, dt, half_life: float, eps: float):
    """TN flow on one frame: recursive moving averages replace the linear trend. x: (b, H, W, K)."""
    decay = jnp.exp(-math.log(2) / half_life * dt)
    mean = (1 - decay) * x + decay * state.mean
    var = (1 - decay) * (x - state.mean) ** 2 + decay * state.var
    return jnp.tanh((x - mean) / jnp.sqrt(var + eps) / 3) * 3, TNState(mean, var)


# ---------------------------------------------------------------- modes


def _no_dropout(x, site: int):
    return x


@dataclass(frozen=True)
class Mode:
    """The two sequence layers of one mode, with their hyper-parameters bound; the rest of the network is
    the same in both modes. x and u hold l frames: a chunk (l = cfg.chunk), or one frame in flow mode.

    tn:      (x (b, l, H, W, K), TNState) -> normalised x (b, l, H, W, K), TNState
    mamba:   (p, u (b, l, d), MambaState) -> (b, l, d), MambaState
    dropout: (x (b, l, d), site) -> x, at the published GaussianDropout sites: site i * layers_per_block + j
             before SSConv (i, j)'s Mamba-2, site n_blocks * layers_per_block after out_proj. Identity
             (inference); model.train sets the training noise.
    """

    tn: Callable
    mamba: Callable
    dropout: Callable = _no_dropout


def chunk_mode(cfg: MEConfig) -> Mode:
    """Chunk mode for runs of cfg.chunk frames."""
    return Mode(
        tn=lambda x, state: tn_chunk(x, cfg.tn_eps),  # the trend is the chunk's own: no TN state is read
        mamba=lambda p, u, state: mamba_chunk(p, u, state, cfg.chunk, cfg.norm_eps),
    )


def flow_mode(cfg: MEConfig, dt) -> Mode:
    """Flow mode for a frame `dt` seconds after the last one (l = 1)."""

    def tn(x, state):
        y, state = tn_step(x[:, 0], state, dt, cfg.tn_half_life, cfg.tn_eps)
        return y[:, None], state

    def mamba(p, u, state):
        y, state = mamba_step(p, u[:, 0], state, cfg.norm_eps)
        return y[:, None], state

    return Mode(tn, mamba)


# ---------------------------------------------------------------- network


def _ssconv(p, x, state: SSConvState, cfg: MEConfig, mode: Mode, site: int = 0):
    """SSConv layer. x: (b, l, H, W, K) -> (b, l, H, W, K), new state. site: its dropout site (see Mode)."""
    x0, tn_state = mode.tn(x, state.tn)
    dtype = cfg.compute_dtype
    x1 = _relu(_dense(_conv2d(x0, p["conv1"], dtype=dtype), p["dense1"], dtype))  # (b, l, H, W, 2K)
    x2 = jnp.mean(jnp.mean(x1, axis=2), axis=2)  # (b, l, 2K); one axis at a time: XLA CPU reduces both at once slower
    x2, m_state = mode.mamba(p["mamba"], mode.dropout(x2, site), state.mamba)
    y = _conv_offset(x0, x2 @ p["proj"], p["conv2"]["w"], p["conv2"]["b"], dtype)  # conv2 of x0 + x2 @ proj
    return _relu(y), SSConvState(tn_state, m_state)


def _network(params, x, state: MEState, cfg: MEConfig, mode: Mode):
    """x: (b, l, 36, 36, 3) float in [0, 1] -> BVP (b, l), new state."""
    # cfg decides how many blocks, layers and head layers run (a smaller cfg runs a prefix of the network).
    blocks = []
    for i, (bp, bs) in enumerate(zip(params["blocks"][:cfg.n_blocks], state.blocks)):
        x = x1 = _matmul(x, bp["in_proj"], jnp.result_type(x, bp["in_proj"]))  # (b, l, H, W, K)
        layers = []
        for j, (lp, ls) in enumerate(zip(bp["layers"][:cfg.layers_per_block], bs)):
            x, s = _ssconv(lp, x, ls, cfg, mode, site=i * cfg.layers_per_block + j)
            layers.append(s)
        x = _conv2d(x + x1, bp["ds"], stride=2, dtype=cfg.compute_dtype)  # (b, l, ceil(H/2), ceil(W/2), K)
        blocks.append(tuple(layers))
    x = mode.dropout(jnp.mean(x, axis=(2, 3)) @ params["out_proj"], cfg.n_blocks * cfg.layers_per_block)  # (b, l, 32)
    head = []
    for mp, ms in zip(params["head"]["mamba"][:cfg.head_layers], state.head):
        x, s = mode.mamba(mp, x, ms)
        head.append(s)
    return _dense(x, params["head"]["dense"])[..., 0], MEState(tuple(blocks), tuple(head))


# ---------------------------------------------------------------- public entry points


def frames_to_unit(frames, dtype=jnp.float32):
    """uint8 frames -> `dtype` in [0, 1], the network's input (float64 for gradient checks)."""
    return frames.astype(dtype) / 255.0


def _check_frames(frames, cfg: MEConfig, single_ndim: int, what: str):
    shape = tuple(frames.shape)
    if frames.dtype != jnp.uint8 or len(shape) not in (single_ndim, single_ndim + 1) or shape[-3:] != cfg.frame_shape:
        raise ValueError(
            f"{what}: expected uint8 frames of shape {('batch',) + ('T',) * (single_ndim == 4) + cfg.frame_shape} "
            f"or without the batch axis, got {frames.dtype} {shape}"
        )
    if single_ndim == 4 and shape[-4] < 1:
        raise ValueError(f"{what}: need at least one frame, got shape {shape}")


def _check_state(state: MEState, batch: int, what: str):
    got = state.blocks[0][0].tn.mean.shape[0]
    if got != batch:
        raise ValueError(f"{what}: state is for batch {got}, frames have batch {batch}; use init_state({batch}, ...)")


def apply_chunk(params, frames, state: MEState, cfg: MEConfig = ME):
    """Chunk mode over a run of frames.

    frames: uint8 (b, T, 36, 36, 3) or (T, 36, 36, 3), any T >= 1. Returns BVP (b, T) or (T,), new state.
    Whole 160-frame chunks run under `lax.scan` with the state carried, so memory does not grow with T
    and splitting a video at multiples of 160 frames gives the same output as one pass. A final partial
    chunk is handled as the reference's `process_video` does: padded to 160 frames by repeating its last
    frame, run, only the real outputs kept. Its state is discarded (as the reference does): the returned
    state is the one after the last *whole* chunk, so continue a stream only after multiples of 160.
    Compiled (`model.apply_chunk`) once per (batch, T): for videos of many lengths, call it on
    fixed-length segments (a multiple of 160 frames) carrying the state, so that only the last segment's
    length is new.
    """
    _check_frames(frames, cfg, 4, "apply_chunk")
    single = frames.ndim == 4
    x = frames[None] if single else frames
    b, t = x.shape[:2]
    _check_state(state, b, "apply_chunk")
    n_chunks, rem = -(-t // cfg.chunk), t % cfg.chunk
    if rem:  # pad the partial chunk with its last frame repeated, as the reference does
        x = jnp.concatenate([x, jnp.repeat(x[:, -1:], cfg.chunk - rem, axis=1)], axis=1)
    chunks = x.reshape(b, n_chunks, cfg.chunk, *x.shape[2:]).swapaxes(0, 1)  # (c, b, L, 36, 36, 3) uint8
    whole = jnp.arange(n_chunks) < t // cfg.chunk  # a padded chunk's state is not kept
    mode = chunk_mode(cfg)

    def body(s, inputs):
        chunk_frames, keep = inputs
        y, s_new = _network(params, frames_to_unit(chunk_frames), s, cfg, mode)
        return jax.tree.map(lambda new, old: jnp.where(keep, new, old), s_new, s), y

    # One scan over all chunks, so one copy of the network is compiled and memory is constant in T.
    state, ys = jax.lax.scan(body, state, (chunks, whole))  # ys: (c, b, L)
    bvp = ys.swapaxes(0, 1).reshape(b, n_chunks * cfg.chunk)[:, :t]
    return (bvp[0] if single else bvp), state


def _flow_frame(params, frame, state: MEState, dt, cfg: MEConfig):
    """One flow step on uint8 frames (b, 36, 36, 3) -> BVP (b,), new state."""
    x = frames_to_unit(frame)[:, None]  # (b, 1, 36, 36, 3)
    y, state = _network(params, x, state, cfg, flow_mode(cfg, jnp.asarray(dt, jnp.float32)))
    return y[:, 0], state


def flow_step(params, frame, state: MEState, dt=1 / ME.fps, cfg: MEConfig = ME):
    """Flow mode, one frame. frame: uint8 (b, 36, 36, 3) or (36, 36, 3); dt: seconds since the last frame.

    Returns BVP (b,) or a scalar, and the new state.
    """
    _check_frames(frame, cfg, 3, "flow_step")
    single = frame.ndim == 3
    x = frame[None] if single else frame
    _check_state(state, x.shape[0], "flow_step")
    y, state = _flow_frame(params, x, state, dt, cfg)
    return (y[0] if single else y), state


def flow_frames(params, frames, state: MEState, dt=1 / ME.fps, cfg: MEConfig = ME):
    """Flow mode over a run of frames at a fixed dt: flow_step on each frame in turn under `lax.scan`.

    frames: uint8 (b, T, 36, 36, 3) or (T, 36, 36, 3). Returns BVP (b, T) or (T,), and the new state.
    The same outputs as T calls of flow_step, in one call (no dispatch per frame), for offline evaluation.
    """
    _check_frames(frames, cfg, 4, "flow_frames")
    single = frames.ndim == 4
    x = frames[None] if single else frames
    _check_state(state, x.shape[0], "flow_frames")

    def body(s, frame):
        y, s = _flow_frame(params, frame, s, dt, cfg)
        return s, y

    state, ys = jax.lax.scan(body, state, x.swapaxes(0, 1))  # ys: (T, b)
    return (ys[:, 0] if single else ys.swapaxes(0, 1)), state
