"""pulsepipe models: ME-rPPG in JAX, with the published weights.

    m = model.load()                                    # rlap weights
    bvp, state = model.apply_chunk(m.params, frames, m.init_state())    # frames uint8 (T, 36, 36, 3)
    y, state = model.flow_step(m.params, frame, m.init_state())         # one frame at a time
    bvp, state = model.flow_frames(m.params, frames, m.init_state())    # flow mode over a run, one call
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.config import ME, MEConfig
from model.me_rppg import MEState, apply_chunk, flow_frames, flow_step, init_state, param_count

__all__ = ["MEConfig", "MEModel", "MEState", "apply_chunk", "flow_frames", "flow_step", "init_state", "load", "param_count"]


@dataclass(frozen=True)
class MEModel:
    cfg: MEConfig
    params: Any  # pytree of float32 arrays
    initial_state: MEState  # the published initial state, batch 1

    def init_state(self, batch: int = 1) -> MEState:
        return init_state(batch, self.initial_state)


def load(name: str = "me-rppg", weights: str | Path = "rlap", precision: str = "float32") -> MEModel:
    """Load a model by name with 'rlap', 'pure' or a path to a weights file.

    precision: dtype of the convolutions' products, "float32" (the published model) or "bfloat16" (for
    GPUs); pass `cfg=m.cfg` to apply_chunk / flow_step / flow_frames.
    """
    if name != "me-rppg":
        raise ValueError(f"unknown model {name!r}; available: 'me-rppg'")
    import dataclasses

    import jax

    if not jax.numpy.issubdtype(jax.numpy.dtype(precision), jax.numpy.floating):  # TypeError if not a dtype
        raise ValueError(f"precision must be a floating dtype such as float32 or bfloat16, got {precision!r}")

    from model.weights import load_initial_state, load_params

    params = jax.tree.map(jax.numpy.asarray, load_params(weights, ME))
    state = jax.tree.map(jax.numpy.asarray, load_initial_state(ME))
    return MEModel(dataclasses.replace(ME, compute_dtype=precision), params, state)
