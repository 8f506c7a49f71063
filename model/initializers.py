"""ME-rPPG parameters from scratch, with the initialisers the published Keras model builds with.

Keras defaults (open-rppg 0.1.1 `InfinitePulse`, Keras 3): Dense and Conv kernels glorot_uniform
(uniform in +-sqrt(6 / (fan_in + fan_out)), fans from the Keras kernel shape: a conv's receptive field
times its in/out channels), biases zeros. Mamba2.build adds dt_bias (h,), A_log (h,) and D (h, 1) with
`add_weight` and no initializer, which Keras 3 makes glorot_uniform too (a 1-d shape has fan_in =
fan_out = h); its RMSNorm weight is Constant(1). The pytree is the one `model.weights.load_params` builds
(structure and shapes in its docstring), numpy float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ME, MEConfig


@dataclass(frozen=True)
class _Init:
    """One parameter to draw: `kind` glorot | zeros | ones, stored `shape`, and the Keras variable's shape
    (which the fans come from) when the importer reshapes it."""

    kind: str
    shape: tuple
    keras_shape: tuple | None = None


def _fans(shape: tuple) -> tuple[int, int]:
    """Keras's compute_fans: (in, out); conv kernels (..., in, out) scale both by the receptive field."""
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _value(spec: _Init, unit: np.ndarray) -> np.ndarray:
    """The parameter from `unit`, its share of uniform draws in [-1, 1) (used by glorot only)."""
    if spec.kind != "glorot":
        return np.full(spec.shape, 1.0 if spec.kind == "ones" else 0.0, np.float32)
    fan_in, fan_out = _fans(spec.keras_shape or spec.shape)
    return (math.sqrt(6.0 / (fan_in + fan_out)) * unit).reshape(spec.shape)  # U(-limit, limit)


def _dense(d_in: int, d_out: int) -> dict:
    return {"w": _Init("glorot", (d_in, d_out)), "b": _Init("zeros", (d_out,))}


def _conv(k: int, d_in: int, d_out: int) -> dict:
    # Keras Conv3D kernel (1, k, k, in, out), stored HWIO: the same fans.
    return {"w": _Init("glorot", (k, k, d_in, d_out)), "b": _Init("zeros", (d_out,))}


def _mamba(d_model: int, headdim: int, k_conv: int, cfg: MEConfig) -> dict:
    d_inner = cfg.expand * d_model
    h = d_inner // headdim
    conv_dim = d_inner + 2 * cfg.d_state
    return {
        "in_proj": _Init("glorot", (d_model, 2 * d_inner + 2 * cfg.d_state + h)),  # z, xBC, dt
        "conv_w": _Init("glorot", (k_conv, conv_dim), (k_conv, 1, conv_dim)),  # depthwise Conv1D (k, 1, C)
        "conv_b": _Init("zeros", (conv_dim,)),
        "dt_bias": _Init("glorot", (h,)),
        "A_log": _Init("glorot", (h,)),
        "D": _Init("glorot", (h,), (h, 1)),
        "norm": _Init("ones", (d_inner,)),
        "out_proj": _Init("glorot", (d_inner, d_model)),
    }


def _spec(cfg: MEConfig) -> dict:
    """The parameter pytree with an _Init at each leaf."""
    k = cfg.filters

    def layer():
        return {
            "conv1": _conv(3, k, k),
            "dense1": _dense(k, 2 * k),
            "mamba": _mamba(cfg.block_d_model, cfg.block_headdim, cfg.block_k_conv, cfg),
            "proj": _Init("glorot", (2 * k, k)),
            "conv2": _conv(3, k, k),
        }

    blocks = [
        {
            "in_proj": _Init("glorot", (cfg.channels if i == 0 else k, k)),
            "layers": [layer() for _ in range(cfg.layers_per_block)],
            "ds": _conv(2, k, k),
        }
        for i in range(cfg.n_blocks)
    ]
    head = {
        "mamba": [_mamba(cfg.head_width, cfg.head_headdim, cfg.head_k_conv, cfg) for _ in range(cfg.head_layers)],
        "dense": _dense(cfg.head_width, 1),
    }
    return {"blocks": blocks, "out_proj": _Init("glorot", (k, cfg.head_width)), "head": head}


def init_params(key, cfg: MEConfig = ME) -> dict:
    """A fresh parameter pytree (numpy float32, as load_params) for `cfg`, the same for the same key."""
    specs, treedef = jax.tree.flatten(_spec(cfg))  # _Init is not a pytree node: one leaf per parameter
    sizes = [math.prod(s.shape) if s.kind == "glorot" else 0 for s in specs]
    # one draw for all kernels: a draw per shape would compile the random generator once per shape
    unit = np.asarray(jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0))
    starts = np.cumsum([0, *sizes])
    return jax.tree.unflatten(treedef, [_value(s, unit[a:a + n]) for s, a, n in zip(specs, starts, sizes)])
