"""ME-rPPG as pure functions over a parameter pytree, in its two modes.

chunk: 160-frame chunks in parallel (TN with a least-squares linear trend per chunk, chunked SSD), the
       recurrent state carried from chunk to chunk, so a video of any length is one pass.
flow:  one frame at a time (TN with a recursive moving average, recurrent SSD), constant memory.

The network (open-rppg 0.1.1 `InfinitePulse([2]*4)`):
  frames /255 -> 4 x SSC block -> spatial mean -> out_proj -> 2 x Mamba-2 -> Dense(1) -> BVP
  SSC block:  x1 = in_proj(x); x = SSConv(SSConv(x1)) + x1; x = Conv(2x2, stride 2, 'same')(x)
  SSConv:     x0 = TN(x); x2 = Mamba2(mean_hw(relu(Dense(Conv3x3(x0))))); relu(Conv3x3(x0 + proj(x2)))
Parameters are the nested dicts that `model.weights.load_params` builds; shapes are in its docstring.
"""
from __future__ import annotations

import math
from functools import wraps
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ME, MEConfig
from model.ssd import ssd_chunked, ssd_step


# ---------------------------------------------------------------- recurrent state


class TNState(NamedTuple):
    mean: jax.Array  # (b, H, W, K) moving average of the input
    var: jax.Array  # (b, H, W, K) moving average of the squared deviation


class MambaState(NamedTuple):
    ssd: jax.Array  # (b, h, p, N)
    conv: jax.Array  # (b, k_conv, conv_dim) last k_conv inputs of the causal conv


class SSConvState(NamedTuple):
    tn: TNState
    mamba: MambaState


class MEState(NamedTuple):
    blocks: tuple  # n_blocks tuples of layers_per_block SSConvState
    head: tuple  # head_layers MambaState

    @staticmethod
    def zeros(batch: int, cfg: MEConfig = ME) -> "MEState":
        """The reference's `init_state`: zero state, TN variance 1e-5."""

        def mamba(d_model, headdim, k_conv):
            d_inner = cfg.expand * d_model
            return MambaState(
                jnp.zeros((batch, d_inner // headdim, headdim, cfg.d_state), jnp.float32),
                jnp.zeros((batch, k_conv, d_inner + 2 * cfg.d_state), jnp.float32),
            )

        blocks = tuple(
            tuple(
                SSConvState(
                    TNState(jnp.zeros((batch, s, s, cfg.filters)), jnp.full((batch, s, s, cfg.filters), 1e-5)),
                    mamba(cfg.block_d_model, cfg.block_headdim, cfg.block_k_conv),
                )
                for _ in range(cfg.layers_per_block)
            )
            for s in cfg.sizes
        )
        head = tuple(mamba(cfg.head_width, cfg.head_headdim, cfg.head_k_conv) for _ in range(cfg.head_layers))
        return MEState(blocks, head)


def init_state(batch: int, source: "MEState | MEConfig | None" = None) -> MEState:
    """Initial state for `batch` streams.

    source: an MEState of batch 1 (the published one, `model.weights.load_initial_state()`), which is
    broadcast to the batch; or an MEConfig / None for `MEState.zeros`.
    """
    if source is None or isinstance(source, MEConfig):
        return MEState.zeros(batch, source or ME)
    return jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(a)[:1], (batch, *a.shape[1:])), source)


def state_bytes(state: MEState) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state))


def param_count(params) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


# ---------------------------------------------------------------- layers


def _dense(x, p, dtype=jnp.float32):
    """x @ w + b with the product in `dtype` (bfloat16 on request), accumulated and returned in float32."""
    return jnp.matmul(x.astype(dtype), p["w"].astype(dtype), preferred_element_type=jnp.float32) + p["b"]


def _conv2d(x, p, stride=1, dtype=jnp.float32):
    """Keras Conv3D with a (1, kh, kw) kernel, 'same' padding, on every frame. x: (b, l, H, W, C).
    Products in `dtype`, accumulated and returned in float32."""
    b, l = x.shape[:2]
    y = jax.lax.conv_general_dilated(
        x.reshape(b * l, *x.shape[2:]).astype(dtype), p["w"].astype(dtype), (stride, stride), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32,
    )
    return (y + p["b"]).reshape(b, l, *y.shape[1:])  # (b, l, H', W', C')


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


def tn_chunk(x, eps: float):
    """TN over one chunk: remove each pixel-channel's least-squares linear trend, divide by its RMS.

    x: (b, L, H, W, K). The returned state is what the reference reports (chunk mean, squared residual of
    the chunk's first frame); chunk mode never reads it.
    """
    l = x.shape[1]
    t = jnp.linspace(0.0, 1.0, l, dtype=x.dtype)
    tc = (t - 0.5).reshape(l, 1, 1, 1)
    # Sums of the offsets from the first frame: features far from zero with a small spread would otherwise
    # carry the mean's rounding into the residual, which the division by the spread amplifies.
    x0 = x[:, :1]
    mean = x0 + jnp.mean(x - x0, axis=1, keepdims=True)  # (b, 1, H, W, K)
    slope = jnp.sum((x - mean) * tc, axis=1, keepdims=True) / jnp.sum(tc * tc)
    res = x - mean - slope * tc  # residual from the least-squares line; each reduction re-reads x
    var = jnp.mean(res * res, axis=1, keepdims=True)
    sq0 = res[:, 0] * res[:, 0]
    return res * jax.lax.rsqrt(var + eps), TNState(mean[:, 0], sq0)


def tn_step(x, state: TNState, dt, half_life: float, eps: float):
    """TN flow on one frame: recursive moving averages replace the linear trend. x: (b, H, W, K)."""
    decay = jnp.exp(-math.log(2) / half_life * dt)
    mean = (1 - decay) * x + decay * state.mean
    var = (1 - decay) * (x - state.mean) ** 2 + decay * state.var
    return jnp.tanh((x - mean) / jnp.sqrt(var + eps) / 3) * 3, TNState(mean, var)


def _ssconv(p, x, state: SSConvState, cfg: MEConfig, flow_dt):
    """SSConv layer. x: (b, l, H, W, K), l = 1 in flow mode (flow_dt is not None)."""
    if flow_dt is None:
        x0, tn_state = tn_chunk(x, cfg.tn_eps)
    else:
        x0, tn_state = tn_step(x[:, 0], state.tn, flow_dt, cfg.tn_half_life, cfg.tn_eps)
        x0 = x0[:, None]
    dtype = cfg.compute_dtype
    x1 = jax.nn.relu(_dense(_conv2d(x0, p["conv1"], dtype=dtype), p["dense1"], dtype))  # (b, l, H, W, 2K)
    x2 = jnp.mean(jnp.mean(x1, axis=2), axis=2)  # (b, l, 2K); one axis at a time: XLA CPU reduces both at once slower
    if flow_dt is None:
        x2, m_state = mamba_chunk(p["mamba"], x2, state.mamba, cfg.chunk, cfg.norm_eps)
    else:
        x2, m_state = mamba_step(p["mamba"], x2[:, 0], state.mamba, cfg.norm_eps)
        x2 = x2[:, None]
    x0 = x0 + (x2 @ p["proj"])[:, :, None, None]  # (b, l, H, W, K)
    return jax.nn.relu(_conv2d(x0, p["conv2"], dtype=dtype)), SSConvState(tn_state, m_state)


def _network(params, x, state: MEState, cfg: MEConfig, flow_dt=None):
    """x: (b, l, 36, 36, 3) float in [0, 1] -> BVP (b, l), new state."""
    # cfg decides how many blocks, layers and head layers run (a smaller cfg runs a prefix of the network).
    blocks = []
    for bp, bs in zip(params["blocks"][:cfg.n_blocks], state.blocks):
        x = x1 = x @ bp["in_proj"]  # (b, l, H, W, K)
        layers = []
        for lp, ls in zip(bp["layers"][:cfg.layers_per_block], bs):
            x, s = _ssconv(lp, x, ls, cfg, flow_dt)
            layers.append(s)
        x = _conv2d(x + x1, bp["ds"], stride=2, dtype=cfg.compute_dtype)  # (b, l, ceil(H/2), ceil(W/2), K)
        blocks.append(tuple(layers))
    x = jnp.mean(x, axis=(2, 3)) @ params["out_proj"]  # (b, l, 32)
    head = []
    for mp, ms in zip(params["head"]["mamba"][:cfg.head_layers], state.head):
        if flow_dt is None:
            x, s = mamba_chunk(mp, x, ms, cfg.chunk, cfg.norm_eps)
        else:
            x, s = mamba_step(mp, x[:, 0], ms, cfg.norm_eps)
            x = x[:, None]
        head.append(s)
    return _dense(x, params["head"]["dense"])[..., 0], MEState(tuple(blocks), tuple(head))


# ---------------------------------------------------------------- public entry points


# XLA CPU options for both modes. YNNPACK fusions (on by default in jaxlib 0.10) run each convolution on one
# thread; XLA's own (Eigen) convolutions use every core, which makes chunk mode ~1.5x faster on 2 cores.
_XLA_CPU = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _jit(fun):
    """jax.jit with the _XLA_CPU options. Only a top-level jit takes compiler options, so a call made while
    tracing (the function nested in a caller's jit or scan) goes to the same function jitted without them;
    `.lower` is the top-level one's."""
    fast = jax.jit(fun, static_argnames="cfg", compiler_options=_XLA_CPU)
    nested = jax.jit(fun, static_argnames="cfg")

    @wraps(fun)
    def call(*args, **kwargs):
        traced = any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves((args, kwargs)))
        return (nested if traced else fast)(*args, **kwargs)

    call.lower = fast.lower
    return call


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


@_jit
def apply_chunk(params, frames, state: MEState, cfg: MEConfig = ME):
    """Chunk mode over a run of frames.

    frames: uint8 (b, T, 36, 36, 3) or (T, 36, 36, 3), any T >= 1. Returns BVP (b, T) or (T,), new state.
    Whole 160-frame chunks run under `lax.scan` with the state carried, so memory does not grow with T
    and splitting a video at multiples of 160 frames gives the same output as one pass. A final partial
    chunk is handled as the reference's `process_video` does: padded to 160 frames by repeating its last
    frame, run, only the real outputs kept. Its state is discarded (as the reference does): the returned
    state is the one after the last *whole* chunk, so continue a stream only after multiples of 160.
    Compiled once per (batch, T): for videos of many lengths, call it on fixed-length segments (a
    multiple of 160 frames) carrying the state, so that only the last segment's length is new.
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

    def body(s, inputs):
        chunk_frames, keep = inputs
        y, s_new = _network(params, chunk_frames.astype(jnp.float32) / 255.0, s, cfg)
        return jax.tree.map(lambda new, old: jnp.where(keep, new, old), s_new, s), y

    # One scan over all chunks, so one copy of the network is compiled and memory is constant in T.
    state, ys = jax.lax.scan(body, state, (chunks, whole))  # ys: (c, b, L)
    bvp = ys.swapaxes(0, 1).reshape(b, n_chunks * cfg.chunk)[:, :t]
    return (bvp[0] if single else bvp), state


def _flow_frame(params, frame, state: MEState, dt, cfg: MEConfig):
    """One flow step on uint8 frames (b, 36, 36, 3) -> BVP (b,), new state."""
    x = (frame.astype(jnp.float32) / 255.0)[:, None]  # (b, 1, 36, 36, 3)
    y, state = _network(params, x, state, cfg, flow_dt=jnp.asarray(dt, jnp.float32))
    return y[:, 0], state


@_jit
def flow_step(params, frame, state: MEState, dt=1 / 30, cfg: MEConfig = ME):
    """Flow mode, one frame. frame: uint8 (b, 36, 36, 3) or (36, 36, 3); dt: seconds since the last frame.

    Returns BVP (b,) or a scalar, and the new state.
    """
    _check_frames(frame, cfg, 3, "flow_step")
    single = frame.ndim == 3
    x = frame[None] if single else frame
    _check_state(state, x.shape[0], "flow_step")
    y, state = _flow_frame(params, x, state, dt, cfg)
    return (y[0] if single else y), state


@_jit
def flow_frames(params, frames, state: MEState, dt=1 / 30, cfg: MEConfig = ME):
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
