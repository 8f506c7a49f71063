"""PhysMamba (SlowFast Temporal Difference Mamba) as pure functions over a parameter pytree.

The network is open-rppg 0.1.1's Keras `PhysMamba` as it runs, quirks included (the parity target is that
code, not the PyTorch original):
  frames -> diff-normalise -> stem (3 x Conv3D+BN+ReLU, two 1x2x2 max-pools)      (b, T, H/4, W/4, 64)
  slow = Conv(4x1x1, stride 4)(stem); fast = Conv(2x1x1, stride 2)(stem)         (b, T/4, ., ., 64), (b, T/2, ., ., 32)
  2 x [slow = pool(block(slow)); fast = pool(block(fast)); slow += fuse(fast)]    spatial /2 each
  slow = up(block(slow)); fast = conv_elu(block(fast)); x = up(concat(fast, slow)) (b, T, H/16, W/16, 48)
  BVP = standardise_t(Conv1x1x1(mean_hw(x)))                                      (b, T)
  block:  CDC(theta) -> BN -> ReLU -> MambaLayer -> ChannelAttention
  MambaLayer over the flattened sequence (b, T*H*W, C):
          y = LN2(x + BiMamba(LN1(x))), back to (b, T, H, W, C), then its own ChannelAttention

The selective scan is the published formula (see `selective_scan`), whose float32 underflow zeroes the
state at most positions; it is computed in chunks that skip those positions. Parameters are the nested
dicts `model.weights.load_physmamba_params` builds (shapes in its docstring). Nothing here is jitted:
`model.physmamba_chunk` is `physmamba_chunk` compiled.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from model.config import PHYSMAMBA, PhysMambaConfig

# ---------------------------------------------------------------- layers


def _bn_fold(w, b, bn, eps: float):
    """A conv's kernel (..., O) and bias (O,) with the inference BatchNorm after it folded in."""
    scale = bn["gamma"] * jax.lax.rsqrt(bn["var"] + eps)
    return w * scale, (b - bn["mean"]) * scale + bn["beta"]


def _frames_at(x, start: int, step: int, count: int):
    """Frames start + step * j, j < count, of x (b, T, ...), zeros where outside [0, T). Padding each tap
    on its own lets XLA fuse it into the concatenation that reads it."""
    t = x.shape[1]
    before = min(count, -(start // step)) if start < 0 else 0
    after = min(count - before, max(0, count - ((t - 1 - start) // step + 1)))
    first, last = start + step * before, start + step * (count - after - 1)
    taken = x[:, first:last + 1:step]
    return jnp.pad(taken, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))


def _conv3d(x, w, stride=(1, 1, 1), padding="SAME"):
    """Keras Conv3D without bias (TF padding). x: (b, T, H, W, I); w: (kt, kh, kw, I, O) -> (b, T', H', W', O).

    Runs as one 2D conv over every output frame with the kt input frames it reads stacked as channels:
    the same sums, and on XLA:CPU 2-3x faster than its 3D convolution.
    """
    kt, kh, kw, i, o = w.shape
    st, t = stride[0], x.shape[1]
    if padding == "SAME":
        t_out = -(-t // st)
        left = max((t_out - 1) * st + kt - t, 0) // 2
    else:
        t_out, left = (t - kt) // st + 1, 0
    # output frame j reads input frames j * st + d - left, d < kt
    x = jnp.concatenate([_frames_at(x, d - left, st, t_out) for d in range(kt)], axis=-1)  # (b, T', H, W, kt*I)
    b = x.shape[0]
    k = w.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * i, o)  # channel d * I + c reads tap d, channel c
    y = jax.lax.conv_general_dilated(x.reshape(b * t_out, *x.shape[2:]), k, stride[1:], padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(b, t_out, *y.shape[1:])


def _conv_bn(x, p, eps: float, stride=(1, 1, 1), padding="SAME"):
    """Conv3D with bias, then inference BatchNorm. p: {conv: {w, b}, bn: {gamma, beta, mean, var}}."""
    w, b = _bn_fold(p["conv"]["w"], p["conv"]["b"], p["bn"], eps)
    return _conv3d(x, w, stride, padding) + b


def _s2d_kernel(w):
    """A 'same' 5x5 (or 3x3) kernel (kh, kw, I, O) as the 3x3 kernel (3, 3, 4I, 4O) that reads and writes
    frames in 2x2 space-to-depth layout (channels ordered phase row, phase column, channel)."""
    kh = w.shape[0]
    # select[i, p, a, y] = 1 where tap i, input phase p, output phase a read kernel row y
    select = np.zeros((3, 2, 2, kh), np.float32)
    for i, p, a in np.ndindex(3, 2, 2):
        y = 2 * (i - 1) + p - a + kh // 2
        if 0 <= y < kh:
            select[i, p, a, y] = 1
    k = jnp.einsum("ipay,jrbx,yxco->ijprcabo", select, select, w)  # (3, 3, 2, 2, I, 2, 2, O)
    return k.reshape(3, 3, 4 * w.shape[2], 4 * w.shape[3])


def _conv_relu_pool(x, p, eps: float):
    """Conv3D (1, 5, 5) 'same' + BN + ReLU + MaxPool (1, 2, 2), the stem's first block.

    Runs on 2x2 space-to-depth frames: 3x3 taps over 4x the channels, the four output phases side by side,
    so the pool is a max over them; the same products, and ~1.7x faster than a 5x5 conv over 3 channels.
    x: (b, T, H, W, I) -> (b, T, H/2, W/2, O).
    """
    w, bias = _bn_fold(p["conv"]["w"][0], p["conv"]["b"], p["bn"], eps)  # (5, 5, I, O)
    b, t, h, wd, c = x.shape
    xs = x.reshape(b * t, h // 2, 2, wd // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    xs = xs.reshape(b * t, h // 2, wd // 2, 4 * c)  # (b*T, H/2, W/2, 4I)
    y = jax.lax.conv_general_dilated(xs, _s2d_kernel(w), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y.reshape(b, t, h // 2, wd // 2, 4, -1).max(axis=4)  # the 2x2 pool; max and ReLU commute
    return jax.nn.relu(y + bias)


def _max_pool_hw(x):
    """MaxPool3D((1, 2, 2)), 'valid'. (b, T, H, W, C) -> (b, T, H/2, W/2, C)."""
    b, t, h, w, c = x.shape
    return x[:, :, :h // 2 * 2, :w // 2 * 2].reshape(b, t, h // 2, 2, w // 2, 2, c).max(axis=(3, 5))


def _upsample_t(x):
    """UpSampling3D((2, 1, 1)): every frame twice."""
    return jnp.repeat(x, 2, axis=1)


def _layer_norm(x, p, eps: float):
    """Keras LayerNormalization over the last axis (population variance)."""
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * (jax.lax.rsqrt(var + eps) * p["gamma"]) + p["beta"]


def _channel_attention(x, p):
    """ChannelAttention3D: x * sigmoid(fc(mean_thw x) + fc(max_thw x)), fc = 1x1x1 convs C -> C/2 -> C."""
    def fc(v):
        return jax.nn.relu(v @ p["fc1"]) @ p["fc2"]

    avg = jnp.mean(x, axis=(1, 2, 3))  # (b, C)
    mx = jnp.max(x, axis=(1, 2, 3))
    return x * jax.nn.sigmoid(fc(avg) + fc(mx))[:, None, None, None]


def cdc_kernel(w, theta: float):
    """The last `CDC` of the module: conv(x, w) - theta * conv(x, tdc) with tdc (1, 1, 1, I, O) the sum of
    w's first and last temporal slices; both convs are linear in w, so one conv with tdc taken off the
    centre tap gives the same. w: (3, 3, 3, I, O)."""
    tdc = jnp.sum(w[0], axis=(0, 1)) + jnp.sum(w[-1], axis=(0, 1))  # (I, O)
    return w.at[1, 1, 1].add(-theta * tdc)


# ---------------------------------------------------------------- selective scan


def selective_scan(u, delta, A, B, C, D, chunk: int, eps: float, reverse: bool = False):
    """The module's last `selective_scan`, as written, on one direction.

    u, delta: (b, L, d); A: (d, n), negative; B, C: (b, L, n); D: (d,). Returns y (b, L, d).
    Published formula, with e[t] = exp(sum_{s>t} delta[s] A) (a reversed cumulative sum):
        x[t] = cumsum_{s<=t}(delta[s] u[s] B[s] e[s]) / (e[t] + eps);   y[t] = x[t] . C[t] + u[t] D
    In exact arithmetic x is the Mamba state; in float32 e underflows to exactly 0 once the decay to the
    end passes about e^-88 (e^-104 with subnormals), and x[t] is 0 there (e is non-decreasing in t, so
    the cumulative sum is 0 too); where e is below ~eps, x is scaled down by e / (e + eps).
    Rewrites, equal in exact arithmetic: sum_s delta[s] A = A sum_s delta[s] (over (b, L, d), not
    (b, L, d, n)); both cumulative sums run chunk by chunk with a carry; chunks before the first one where
    any e is non-zero are skipped (their x is exactly 0): with the published weights all but the last
    ~140 positions.
    reverse: the same on every input flipped in time, the output flipped back (without flipping them).
    """
    b, L, d = u.shape
    q = min(chunk, L)
    n_chunks = -(-L // q)
    n_pad = n_chunks * q - L
    # padded positions come last in scan order, so they change no real output
    pad = lambda a: jnp.pad(a, [(0, 0), (n_pad, 0) if reverse else (0, n_pad)] + [(0, 0)] * (a.ndim - 2))
    u_p, delta_p, B_p, C_p = pad(u), pad(delta), pad(B), pad(C)

    def chunk_at(a, c):  # chunk c in scan order, (b, q, ...)
        if reverse:
            return jax.lax.dynamic_slice_in_dim(a, (n_chunks - 1 - c) * q, q, axis=1)[:, ::-1]
        return jax.lax.dynamic_slice_in_dim(a, c * q, q, axis=1)

    # sum_{s>t} delta[s] = (sum over the later chunks) + (sum over the later positions of t's chunk)
    chunk_sums = delta_p.reshape(b, n_chunks, q, d).sum(axis=2)  # (b, n_chunks, d)
    chunk_sums = chunk_sums[:, ::-1] if reverse else chunk_sums  # in scan order
    from_c = jnp.cumsum(chunk_sums[:, ::-1], axis=1)[:, ::-1]  # over chunks c, c + 1, ...
    later = jnp.concatenate([from_c[:, 1:], jnp.zeros_like(from_c[:, :1])], axis=1)  # over chunks after c
    # e is non-decreasing in t: a chunk whose last e is 0 everywhere is 0 throughout, as are those before it
    alive = jnp.any(jnp.exp(later[..., None] * A) > 0, axis=(0, 2, 3))  # (n_chunks,); the last is alive
    first = jnp.argmax(alive)

    def body(c, carry):
        ys, acc = carry  # ys (b, n_chunks * q, d) in input order; acc (b, d, n): the cumulative sum so far
        dl = chunk_at(delta_p, c)  # (b, q, d)
        shifted = jnp.concatenate([dl[:, 1:], jnp.zeros_like(dl[:, :1])], axis=1)
        tail = jnp.cumsum(shifted[:, ::-1], axis=1)[:, ::-1] + later[:, c][:, None]  # sum_{s>t} delta[s]
        e = jnp.exp(tail[..., None] * A)  # (b, q, d, n)
        terms = (dl * chunk_at(u_p, c))[..., None] * chunk_at(B_p, c)[:, :, None, :] * e
        csum = acc[:, None] + jnp.cumsum(terms, axis=1)  # (b, q, d, n)
        y = jnp.einsum("bqdn,bqn->bqd", csum / (e + eps), chunk_at(C_p, c)) + chunk_at(ys, c)  # (b, q, d)
        start = (n_chunks - 1 - c) * q if reverse else c * q
        return jax.lax.dynamic_update_slice_in_dim(ys, y[:, ::-1] if reverse else y, start, axis=1), csum[:, -1]

    # y = u D everywhere, plus x . C where the loop runs
    acc = jnp.zeros((b, d, A.shape[1]), u.dtype)
    ys, _ = jax.lax.fori_loop(first, n_chunks, body, (u_p * D, acc))
    return ys[:, n_pad:] if reverse else ys[:, :L]


def bidirectional_scan(u, delta, A, B, C, D, chunk: int, eps: float):
    """`bidirectional_selective_scan`: the forward scan reads B, C[..., :n]; the backward one u and delta
    flipped in time but B, C[..., n:] not (as written), its output flipped back; concatenated.

    u, delta: (b, L, d); A: (d, n); B, C: (b, L, 2n). Returns (b, L, 2d).
    The backward scan runs as a reverse scan on u, delta and B, C[..., n:] flipped: the same sums, and
    B, C (n = 16 wide) are cheaper to flip than u, delta (d = 64 or 128).
    """
    n = A.shape[1]
    fwd = selective_scan(u, delta, A, B[..., :n], C[..., :n], D, chunk, eps)
    bwd = selective_scan(u, delta, A, B[:, ::-1, n:], C[:, ::-1, n:], D, chunk, eps, reverse=True)
    return jnp.concatenate([fwd, bwd], axis=-1)


def bimamba(p, x, cfg: PhysMambaConfig):
    """BiMamba over a sequence. x: (b, L, C) -> (b, L, C); inner width d = expand * C."""
    d = p["A_log"].shape[0]
    xr = x @ p["in_proj"]  # (b, L, 2d)
    u, res = xr[..., :d], xr[..., d:]
    # Keras Conv1D 'same', depthwise, kernel k: k - 1 zeros split (k-1)//2 before, the rest after
    k = p["conv_w"].shape[0]
    up = jnp.pad(u, [(0, 0), ((k - 1) // 2, k - 1 - (k - 1) // 2), (0, 0)])
    L = u.shape[1]
    u = jax.nn.silu(sum(up[:, j:j + L] * p["conv_w"][j] for j in range(k)) + p["conv_b"])
    x_dbl = u @ p["x_proj"]  # (b, L, R + 4N)
    r = p["dt_proj"]["w"].shape[0]
    delta = jax.nn.softplus(x_dbl[..., :r] @ p["dt_proj"]["w"] + p["dt_proj"]["b"])  # (b, L, d)
    n2 = 2 * cfg.d_state
    B, C = x_dbl[..., r:r + n2], x_dbl[..., r + n2:]
    y = bidirectional_scan(u, delta, -jnp.exp(p["A_log"]), B, C, p["D"], cfg.scan_chunk, cfg.scan_eps)
    gate = jax.nn.silu(res)
    return jnp.concatenate([y[..., :d] * gate, y[..., d:] * gate], axis=-1) @ p["out_proj"]


def mamba_layer(p, x, cfg: PhysMambaConfig):
    """MambaLayer. x: (b, T, H, W, C) -> (b, T, H, W, C), the Mamba over the flattened T*H*W sequence."""
    seq = x.reshape(x.shape[0], -1, x.shape[-1])  # (b, T*H*W, C)
    y = _layer_norm(seq + bimamba(p["mamba"], _layer_norm(seq, p["norm1"], cfg.ln_eps), cfg), p["norm2"], cfg.ln_eps)
    return _channel_attention(y.reshape(x.shape), p["channel_att"])


def block(p, x, cfg: PhysMambaConfig):
    """A stream block: CDC -> BN -> ReLU -> MambaLayer -> ChannelAttention. x: (b, T, H, W, C), same out."""
    w, b = _bn_fold(cdc_kernel(p["cdc"], cfg.theta), 0.0, p["bn"], cfg.bn_eps)
    x = jax.nn.relu(_conv3d(x, w) + b)
    return _channel_attention(mamba_layer(p["mamba_layer"], x, cfg), p["channel_att"])


# ---------------------------------------------------------------- network


def normalise_frames(frames):
    """The loader's preprocessing. uint8 (b, T, H, W, 3) -> float32 (b, T, H, W, 3): x / 255, frame
    differences x[t+1] - x[t], each frame and channel standardised over H, W (population std, + 1e-6),
    the last difference repeated so that T frames give T."""
    x = frames.astype(jnp.float32) / 255.0
    x = x[:, 1:] - x[:, :-1]
    x = (x - jnp.mean(x, axis=(2, 3), keepdims=True)) / (jnp.std(x, axis=(2, 3), keepdims=True) + 1e-6)
    return jnp.concatenate([x, x[:, -1:]], axis=1)


def network(params, x, cfg: PhysMambaConfig = PHYSMAMBA):
    """The Keras model's call. x: (b, T, H, W, 3) normalised frames, T == H -> BVP (b, T), standardised."""
    eps, h_in = cfg.bn_eps, x.shape[2]
    stem = params["stem"]
    x = _conv_relu_pool(x, stem[0], eps)  # (b, T, H/2, W/2, 16)
    x = jax.nn.relu(_conv_bn(x, stem[1], eps))  # (b, T, H/2, W/2, 32)
    x = _max_pool_hw(jax.nn.relu(_conv_bn(x, stem[2], eps)))  # (b, T, H/4, W/4, 64)
    s = jax.nn.relu(_conv_bn(x, params["slow_in"], eps, (4, 1, 1), "VALID"))  # (b, T/4, H/4, W/4, 64)
    f = jax.nn.relu(_conv_bn(x, params["fast_in"], eps, (2, 1, 1), "VALID"))  # (b, T/2, H/4, W/4, 32)
    for i in range(2):
        s = _max_pool_hw(block(params["slow"][i], s, cfg))
        f = _max_pool_hw(block(params["fast"][i], f, cfg))
        s = s + jax.nn.relu(_conv_bn(f, params["fuse"][i], eps, (2, 1, 1)))  # fast (T/2) onto slow (T/4)
    s = _upsample_t(block(params["slow"][2], s, cfg))  # (b, T/2, H/16, W/16, 64)
    s = jax.nn.elu(_conv_bn(s, params["slow_up"], eps))
    f = jax.nn.elu(_conv_bn(block(params["fast"][2], f, cfg), params["fast_out"], eps))  # (b, T/2, H/16, W/16, 32)
    x = jnp.concatenate([f, s], axis=-1)  # (b, T/2, H/16, W/16, 96)
    x = jax.nn.elu(_conv_bn(_upsample_t(x), params["head_up"], eps))  # (b, T, H/16, W/16, 48)
    x = jnp.mean(x, axis=(2, 3)) @ params["head"]["w"] + params["head"]["b"]  # (b, T, 1)
    # The published reshape is to (-1, H): one row per recording only because T == H.
    x = x.reshape(-1, h_in)
    return (x - jnp.mean(x, axis=1, keepdims=True)) / (jnp.std(x, axis=1, keepdims=True) + cfg.output_eps)


# ---------------------------------------------------------------- public entry point


def _check_frames(frames, cfg: PhysMambaConfig):
    shape = tuple(frames.shape)
    want = (cfg.frames, *cfg.frame_shape)
    if frames.dtype != jnp.uint8 or len(shape) not in (4, 5) or shape[-4:] != want:
        raise ValueError(f"physmamba_chunk: expected uint8 frames of shape {('batch',) + want} or {want}, "
                         f"got {frames.dtype} {shape}")


def physmamba_chunk(params, frames, cfg: PhysMambaConfig = PHYSMAMBA):
    """One chunk through PhysMamba, the loader's preprocessing inside.

    frames: uint8 (b, T, H, W, 3) or (T, H, W, 3), T = cfg.frames, H = W = cfg.image (128 for the
    published model). Returns BVP (b, T) or (T,), standardised over time. Chunks share no state.
    """
    _check_frames(frames, cfg)
    single = frames.ndim == 4
    x = frames[None] if single else frames
    bvp = network(params, normalise_frames(x), cfg)
    return bvp[0] if single else bvp
