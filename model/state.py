"""ME-rPPG's recurrent state: what each layer carries from one chunk (or frame) to the next.

A stream's state is an MEState pytree of float32 arrays, b streams on the leading axis:
  blocks[i][j]: SSConvState(tn: TNState, mamba: MambaState) of block i's SSConv layer j
  head[m]:      MambaState of head Mamba-2 layer m
Its own module so that the network (model.me_rppg) and the importer of the published state
(model.weights) both build it without importing each other.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from model.config import ME, MEConfig


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
    """Bytes of a state, all streams."""
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state))
