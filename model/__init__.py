"""pulsepipe models: ME-rPPG and PhysMamba in JAX, with the published weights.

    m = model.load()                                    # rlap weights
    bvp, state = model.apply_chunk(m.params, frames, m.init_state())    # frames uint8 (T, 36, 36, 3)
    y, state = model.flow_step(m.params, frame, m.init_state())         # one frame at a time
    bvp, state = model.flow_frames(m.params, frames, m.init_state())    # flow mode over a run, one call

    pm = model.load("physmamba", weights="rlap")                        # PhysMamba, no state
    bvp = model.physmamba_chunk(pm.params, frames)                      # frames uint8 (128, 128, 128, 3)

`model.apply_chunk`, `flow_step`, `flow_frames` and `physmamba_chunk` are the compiled entry points: the
functions of `model.me_rppg` (and `model.physmamba`) under one top-level `jax.jit` with XLA_CPU_OPTIONS (cfg
static; `.lower` for ahead-of-time compiles). Only a top-level jit takes compiler options, so a caller that
nests the model in its own jit, scan or grad (a trainer) calls `model.me_rppg.apply_chunk` etc. (and
`model.physmamba.physmamba_chunk`), which are plain functions.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from model import me_rppg, physmamba
from model.config import ME, PHYSMAMBA, MEConfig, PhysMambaConfig
from model.me_rppg import param_count
from model.state import MambaState, MEState, SSConvState, TNState, init_state, state_bytes

__all__ = ["XLA_CPU_OPTIONS", "MEConfig", "MEModel", "MEState", "MambaState", "PhysMambaConfig", "PhysMambaModel",
           "SSConvState", "TNState", "apply_chunk", "flow_frames", "flow_step", "init_state", "load", "param_count",
           "physmamba_chunk", "state_bytes"]

# YNNPACK fusions (on by default in jaxlib 0.10) run each convolution on one thread; XLA's own (Eigen)
# convolutions use every core, which makes chunk mode ~1.5x faster on 2 cores.
XLA_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse: one arena, no separately mapped blocks, no trimming.

    XLA:CPU allocates every execution's buffers afresh, and glibc returns big freed blocks to the system, so
    each training step page-faults its gigabytes back in (about 1.3 us per 4 KiB page on a 2-core VM: a
    fifth of a step). Kept, the memory is reused: training steps are 5-12% faster (bench_train.py), and the
    peak is lower and flat in the sequence length, but the process's resident memory no longer shrinks after
    a peak. Call before the first JAX computation (the arena limit binds threads started later). Returns
    False where the C library is not glibc (nothing set).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # <malloc.h>
    return all(mallopt(option, value) == 1 for option, value in
               ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)))


def _compiled(fun):
    return jax.jit(fun, static_argnames="cfg", compiler_options=XLA_CPU_OPTIONS)


apply_chunk = _compiled(me_rppg.apply_chunk)
flow_step = _compiled(me_rppg.flow_step)
flow_frames = _compiled(me_rppg.flow_frames)
physmamba_chunk = _compiled(physmamba.physmamba_chunk)


@dataclasses.dataclass(frozen=True)
class MEModel:
    cfg: MEConfig
    params: Any  # pytree of float32 arrays
    initial_state: MEState  # the published initial state, batch 1

    def init_state(self, batch: int = 1) -> MEState:
        return init_state(batch, self.initial_state)


@dataclasses.dataclass(frozen=True)
class PhysMambaModel:
    cfg: PhysMambaConfig
    params: Any  # pytree of float32 arrays


def load(name: str = "me-rppg", weights: str | Path = "rlap", precision: str = "float32") -> MEModel | PhysMambaModel:
    """Load a model by name ('me-rppg' or 'physmamba') with 'rlap', 'pure' or a path to a weights file.

    precision (ME-rPPG only): dtype of the convolutions' products, "float32" (the published model) or
    "bfloat16" (for GPUs); pass `cfg=m.cfg` to apply_chunk / flow_step / flow_frames.
    """
    if name == "physmamba":
        if precision != "float32":
            raise ValueError(f"physmamba runs in float32 only, got precision={precision!r}")
        from model.weights import load_physmamba_params

        return PhysMambaModel(PHYSMAMBA, jax.tree.map(jnp.asarray, load_physmamba_params(weights)))
    if name != "me-rppg":
        raise ValueError(f"unknown model {name!r}; available: 'me-rppg', 'physmamba'")
    if not jnp.issubdtype(jnp.dtype(precision), jnp.floating):  # TypeError if not a dtype
        raise ValueError(f"precision must be a floating dtype such as float32 or bfloat16, got {precision!r}")
    # imported here, not with the package: `python -m model.weights` runs that module as __main__
    from model.weights import load_initial_state, load_params, weights_config

    cfg = weights_config(weights)  # a training run's network may be reduced
    params = jax.tree.map(jnp.asarray, load_params(weights, cfg))
    state = jax.tree.map(jnp.asarray, load_initial_state(cfg, weights))
    return MEModel(dataclasses.replace(cfg, compute_dtype=precision), params, state)
