"""Training ME-rPPG: the published recipe, with gradients through chunk mode at flat memory.

Recipe (open-rppg 0.1.1): Adam with Keras's defaults (lr 1e-3, b1 0.9, b2 0.999, eps 1e-7), MSE, batch 32;
the forward pass starts from a zero state (`MEState.zeros`), TN takes each 160-frame chunk's own linear
trend, and GaussianDropout(0.5) multiplies each SSConv's pooled features before its Mamba-2 and out_proj's
output by 1 + sqrt(rate / (1 - rate)) * N(0, 1).

A sequence of T = k * 160 frames is one example, its state carried from chunk to chunk. Gradients ("chunked",
the default): a forward pass over the chunks keeps only the state entering each chunk and the outputs y
(b, T); the loss and dL/dy come from the whole y (so a per-sequence Pearson loss works); then chunk by chunk,
last to first, each chunk is recomputed under `jax.vjp` from its entering state and pulls (dL/dy of the chunk,
dL/d state leaving it) back to parameter gradients and dL/d state entering it. Both passes are host loops over
jitted per-chunk functions, compiled once per chunk shape: memory is the carried states (1.6 MB per stream and
chunk) and one chunk's residuals (~290 MB per stream), whatever T, and no XLA:CPU loop is differentiated (the
backward of a rolled `lax.scan` is ~40x slower there, jax-ml/jax#40150). On 2 CPU cores a step costs about 4
forward passes (3.5-4.6 from run to run on a shared AVX-512 VM, 4.1-4.9 on an AVX2 one): the forward pass, the
recompute (1.1-1.2) and the pullback (about 2.3, the convolutions' weight gradients costing XLA:CPU about
twice their forward). Call `model.keep_freed_memory()` first, as `pulsepipe train` does: with glibc's defaults
the per-chunk buffers are page-faulted in afresh every step and fragment its arenas, and the peak grows with
T. "whole" (value_and_grad of the unrolled sequence, memory growing with T) and "remat" (`jax.checkpoint` per
chunk in a `lax.scan`) give the same gradients, for tests and for backends where they are fast.

Data parallel: a `Mesh` over the local devices with axis "data"; batches sharded along B, the train state
replicated; XLA sums the gradients across devices. The same code runs on one device. Across processes (one
per host under `jax.distributed`, e.g. Ray Train's workers): each process takes its consecutive slice of
every batch (`transforms.sequences.iter_batches(part=...)`) and keeps its own copy of the train state; the
loss's denominator, the loss and the gradients are summed over processes (`process_allgather`), so every
process applies the same update and each micro-batch draws the dropout of its place in the whole batch.

Batch: {"frames": uint8 (B, T, 36, 36, 3), "bvp": float32 (B, T) normalised label, 0 where masked,
        "mask": bool (B, T), frames with a face and ground truth}; only masked-in frames enter the loss.
Train state: {"params", "opt_state", "step", "rng"}, a plain dict.
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model import XLA_CPU_OPTIONS
from model.config import ME, MEConfig
from model.me_rppg import _network, chunk_mode, frames_to_unit
from model.state import MEState

METHODS = ("chunked", "whole", "remat")
LOSSES = ("mse", "neg_pearson")


# ---------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class TrainHParams:
    lr: float = 1e-3  # peak learning rate
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-7  # Keras Adam's epsilon (optax's default is 1e-8)
    schedule: str = "constant"  # "constant" | "cosine": linear warmup to lr, cosine decay to 0 at total_steps
    warmup_steps: int = 0
    total_steps: int = 0  # cosine only
    clip_norm: float | None = None  # clip the gradients' global norm to this; None: off
    loss: str = "mse"  # "mse" over masked-in frames | "neg_pearson": 1 - Pearson r per sequence, averaged
    dropout: float = 0.5  # GaussianDropout rate at the published sites; 0: off
    compute_dtype: str = "float32"  # products of the convolutions and dense1 -> MEConfig.compute_dtype
    batch_size: int = 32  # the published recipe's; the data side batches by it
    method: str = "chunked"  # how gradients go through the chunks (see the module docstring)
    # sequences per forward/backward pass, gradients summed over the passes (the batch's own gradient when
    # dropout is off); memory holds micro_batch sequences' activations, not the batch's. 0: the whole batch
    micro_batch: int = 0

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.schedule == "cosine" and self.total_steps <= self.warmup_steps:
            raise ValueError(f"cosine needs total_steps > warmup_steps, got {self.total_steps}, {self.warmup_steps}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.micro_batch < 0 or (self.micro_batch and self.batch_size % self.micro_batch):
            raise ValueError(f"micro_batch must divide batch_size {self.batch_size}, got {self.micro_batch}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not jnp.issubdtype(jnp.dtype(self.compute_dtype), jnp.floating):
            raise ValueError(f"compute_dtype must be a floating dtype, got {self.compute_dtype!r}")


def model_config(hp: TrainHParams, cfg: MEConfig = ME) -> MEConfig:
    """The network's config for training with hp (its compute dtype)."""
    return dataclasses.replace(cfg, compute_dtype=hp.compute_dtype)


def learning_rate(hp: TrainHParams) -> optax.Schedule:
    """Learning rate by step."""
    if hp.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, hp.lr, hp.warmup_steps, hp.total_steps, end_value=0.0)
    return optax.constant_schedule(hp.lr)


def optimizer(hp: TrainHParams) -> optax.GradientTransformation:
    """Adam (Keras's defaults unless hp says otherwise), after optional global-norm clipping."""
    adam = optax.adam(learning_rate(hp), b1=hp.b1, b2=hp.b2, eps=hp.eps)
    return adam if hp.clip_norm is None else optax.chain(optax.clip_by_global_norm(hp.clip_norm), adam)


# ---------------------------------------------------------------- init


def data_mesh(devices=None) -> Mesh:
    """A 1-d mesh with axis "data" over `devices` (default: this process's devices)."""
    return Mesh(np.asarray(jax.local_devices() if devices is None else devices), ("data",))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Place a batch's arrays on the mesh, split along B (which the device count must divide)."""
    n = mesh.devices.size
    b = len(batch["frames"])
    if b % n:
        raise ValueError(f"batch of {b} does not split over {n} devices; use a multiple of {n}")
    return jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))


def init_train_state(params, hp: TrainHParams, seed: int = 0, mesh: Mesh | None = None) -> dict:
    """Train state from a parameter pytree (published, `init_params` or a checkpoint's), replicated on mesh.
    The state holds copies: train_step donates its buffers, and the caller's arrays stay usable."""
    replicated = NamedSharding(mesh or data_mesh(), PartitionSpec())
    params = jax.device_put(jax.tree.map(jnp.array, params), replicated)  # copies, in their own dtype
    return {
        "params": params,
        "opt_state": jax.device_put(optimizer(hp).init(params), replicated),
        "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
        "rng": jax.device_put(jax.random.key(seed), replicated),
    }


def zero_state(batch: int, params, cfg: MEConfig) -> MEState:
    """The training forward pass's initial state: `MEState.zeros` in the parameters' dtype (a scan's carry
    keeps its dtype; float64 in gradient checks)."""
    dtype = jax.tree.leaves(params)[0].dtype
    return jax.tree.map(lambda a: a.astype(dtype), MEState.zeros(batch, cfg))


# ---------------------------------------------------------------- forward (training mode)


def gaussian_dropout(key, rate: float):
    """Keras GaussianDropout(rate) in training: x * (1 + sqrt(rate / (1 - rate)) * N(0, 1)), a fresh draw
    per site. Returns a Mode.dropout, (x, site) -> x."""
    std = math.sqrt(rate / (1 - rate))
    return lambda x, site: x * (1 + std * jax.random.normal(jax.random.fold_in(key, site), x.shape, x.dtype))


def chunk_forward(params, frames, state: MEState, key, c, rate: float, cfg: MEConfig):
    """Training forward pass of chunk c of a sequence. frames: uint8 (b, L, 36, 36, 3) -> y (b, L), state.

    The dropout key of chunk c is fold_in(key, c) (then per site), so a recomputed chunk draws the same noise.
    """
    mode = chunk_mode(cfg)
    if rate:  # rate 0 leaves inference's identity in place: no noise is drawn
        mode = dataclasses.replace(mode, dropout=gaussian_dropout(jax.random.fold_in(key, c), rate))
    x = frames_to_unit(frames, jax.tree.leaves(params)[0].dtype)  # (b, L, 36, 36, 3) in the params' dtype
    return _network(params, x, state, cfg, mode)


def _chunks(frames, cfg: MEConfig) -> list:
    """(B, T, ...) -> T / L views (B, L, ...), host-side (numpy or jax)."""
    return [frames[:, i:i + cfg.chunk] for i in range(0, frames.shape[1], cfg.chunk)]


_jit = partial(jax.jit, compiler_options=XLA_CPU_OPTIONS)
_chunk_forward = _jit(chunk_forward, static_argnames=("rate", "cfg"))


def _placed(params, batch: dict, key):
    """Params and key replicated, the batch split along B, on the params' mesh (init_train_state's) or else
    the default device; returns them and the split sharding. jit compiles per input placement, so every
    chunk's inputs are placed alike: the per-chunk functions compile once."""
    sharding = jax.tree.leaves(params)[0].sharding
    mesh = sharding.mesh if isinstance(sharding, NamedSharding) else data_mesh(jax.local_devices()[:1])
    replicated = NamedSharding(mesh, PartitionSpec())
    by_batch = NamedSharding(mesh, PartitionSpec("data"))
    return jax.device_put(params, replicated), shard_batch(batch, mesh), jax.device_put(key, replicated), by_batch


def _forward_chunks(params, frames, key, rate: float, cfg: MEConfig, by_batch):
    """Chunk by chunk, from a zero state (inputs from _placed): the chunks, their outputs [(B, L)] and the
    states entering them."""
    chunks = [jax.device_put(f, by_batch) for f in _chunks(frames, cfg)]  # no-op for slices kept split
    state = jax.device_put(zero_state(frames.shape[0], params, cfg), by_batch)
    states, ys = [], []
    for c, chunk in enumerate(chunks):
        states.append(state)
        y, state = _chunk_forward(params, chunk, state, key, c, rate, cfg)
        state = jax.device_put(state, by_batch)  # as the zero state was placed: no second compile
        ys.append(y)
    return chunks, ys, states  # nothing reads the state after the last chunk


def train_forward(params, frames, key, hp: TrainHParams, cfg: MEConfig = ME):
    """The training forward pass from a zero state. frames: uint8 (B, T, 36, 36, 3) -> y (B, T)."""
    cfg = model_config(hp, cfg)
    params, placed, key, by_batch = _placed(params, {"frames": frames}, key)
    _, ys, _ = _forward_chunks(params, placed["frames"], key, hp.dropout, cfg, by_batch)
    return jnp.concatenate(ys, axis=1)


# ---------------------------------------------------------------- loss


def loss_denominator(mask, kind: str):
    """What sequence_loss divides by: the batch's masked-in frames (mse) or its sequences with at least two
    (neg_pearson); given to each micro-batch, the micro-batches' losses add up to the batch's."""
    if kind == "mse":
        return jnp.maximum(jnp.sum(mask), 1)
    return jnp.maximum(jnp.sum(jnp.sum(mask, axis=1) >= 2), 1)


def sequence_loss(y, bvp, mask, kind: str = "mse", denominator=None):
    """Loss over masked-in frames. y, bvp: (B, T); mask: bool (B, T).

    mse: mean squared error over all masked-in frames of the batch.
    neg_pearson: 1 - Pearson r of each sequence over its masked-in frames, averaged over sequences with at
    least two. Masked-out frames never count, whatever their labels (even NaN) or outputs.
    denominator: loss_denominator of the whole batch when this is one micro-batch of it (default: its own).
    """
    denominator = loss_denominator(mask, kind) if denominator is None else denominator
    err = jnp.where(mask, y - bvp, 0.0)  # where first: a masked label never reaches the gradient
    if kind == "mse":
        return jnp.sum(err * err) / denominator
    n = jnp.sum(mask, axis=1)  # (B,)
    yv, bv = jnp.where(mask, y, 0.0), jnp.where(mask, bvp, 0.0)
    yc = jnp.where(mask, yv - (jnp.sum(yv, 1) / jnp.maximum(n, 1))[:, None], 0.0)  # centred on masked-in frames
    bc = jnp.where(mask, bv - (jnp.sum(bv, 1) / jnp.maximum(n, 1))[:, None], 0.0)
    r = jnp.sum(yc * bc, 1) / jnp.sqrt(jnp.sum(yc * yc, 1) * jnp.sum(bc * bc, 1) + 1e-12)  # (B,)
    return jnp.sum(jnp.where(n >= 2, 1.0 - r, 0.0)) / denominator


@partial(_jit, static_argnames="kind")
def _loss_and_dy(ys: list, bvp, mask, kind: str, denominator):
    """The loss of the whole outputs and its gradient, split back into chunks: [(B, L)] -> loss, [(B, L)]."""
    loss, dy = jax.value_and_grad(lambda y: sequence_loss(y, bvp, mask, kind, denominator))(jnp.concatenate(ys, axis=1))
    return loss, jnp.split(dy, len(ys), axis=1)  # dy (B, T) -> T / L of (B, L)


# ---------------------------------------------------------------- gradients


def chunk_linearized(params, frames, state, key, c, rate: float, cfg: MEConfig):
    """Chunk c run from the state entering it, with what its backward needs: ((y (B, L), state leaving it),
    pullback), where pullback((dy, dL/d state leaving it)) -> (parameter gradients, dL/d state entering it)."""
    return jax.vjp(lambda p, s: chunk_forward(p, frames, s, key, c, rate, cfg), params, state)


# The recompute and the pullback are two compiled functions, the residuals handed from one to the other as
# buffers: in one XLA:CPU module they cost ~30% more (XLA fuses the transposes that the weight gradients of
# the convolutions and dense layers need into the recomputation, as slow strided loops).
_chunk_linearized = _jit(chunk_linearized, static_argnames=("rate", "cfg"))


@partial(_jit, donate_argnames="grads")
def _chunk_pullback(pullback, dy, dstate, grads):
    """pullback (from chunk_linearized) applied, the parameter gradients added to grads (donated, updated in
    place). The residuals are not donated: some are the parameters' own buffers."""
    dparams, dstate = pullback((dy, dstate))
    return jax.tree.map(jnp.add, grads, dparams), dstate


def _grads_chunked(params, batch, key, rate, kind, cfg, by_batch, denominator):
    """The chunk-by-chunk backward of the module docstring; inputs from _placed."""
    chunks, ys, states = _forward_chunks(params, batch["frames"], key, rate, cfg, by_batch)
    loss, dys = _loss_and_dy(ys, batch["bvp"], batch["mask"], kind, denominator)
    grads = jax.device_put(jax.tree.map(jnp.zeros_like, params), jax.tree.leaves(params)[0].sharding)
    dstate = jax.device_put(jax.tree.map(jnp.zeros_like, states[0]), by_batch)  # nothing reads the last state
    for c in reversed(range(len(chunks))):  # last to first, the state's cotangent carried back
        dy = jax.device_put(dys[c], by_batch)
        _, pullback = _chunk_linearized(params, chunks[c], states[c], key, c, rate, cfg)
        grads, dstate = _chunk_pullback(pullback, dy, dstate, grads)
        # one chunk's residuals (~290 MB a sequence) at a time: without the wait, the next chunk's would be
        # allocated when it is dispatched, while this pullback still runs
        del pullback
        dstate = jax.block_until_ready(dstate)
        dstate = jax.device_put(dstate, by_batch)
    return loss, grads


def _sequence_forward(params, frames, key, rate, cfg, remat: bool):
    """The whole sequence in one trace: unrolled over chunks, or a `lax.scan` with each chunk checkpointed."""
    state = zero_state(frames.shape[0], params, cfg)
    if not remat:
        ys = []
        for c, chunk in enumerate(_chunks(frames, cfg)):
            y, state = chunk_forward(params, chunk, state, key, c, rate, cfg)
            ys.append(y)
        return jnp.concatenate(ys, axis=1)  # (B, T)
    n = frames.shape[1] // cfg.chunk
    chunks = frames.reshape(frames.shape[0], n, cfg.chunk, *frames.shape[2:]).swapaxes(0, 1)  # (n, B, L, ...)

    @jax.checkpoint  # keep only each chunk's entering state; recompute its inside on the way back
    def body(s, xs):
        y, s = chunk_forward(params, xs[0], s, key, xs[1], rate, cfg)
        return s, y

    _, ys = jax.lax.scan(body, state, (chunks, jnp.arange(n)))  # ys: (n, B, L)
    return ys.swapaxes(0, 1).reshape(frames.shape[0], -1)  # (B, T)


@partial(_jit, static_argnames=("rate", "kind", "cfg", "remat"))
def _grads_traced(params, batch, key, rate, kind, cfg, remat):
    def loss_fn(p):
        return sequence_loss(_sequence_forward(p, batch["frames"], key, rate, cfg, remat), batch["bvp"],
                             batch["mask"], kind)

    return jax.value_and_grad(loss_fn)(params)


def _check_batch(batch: dict, cfg: MEConfig):
    frames = batch["frames"]
    b, t = frames.shape[:2]
    if frames.dtype != np.uint8 or frames.ndim != 5 or tuple(frames.shape[2:]) != cfg.frame_shape:
        raise ValueError(f"frames: expected uint8 (B, T, {', '.join(map(str, cfg.frame_shape))}), "
                         f"got {frames.dtype} {tuple(frames.shape)}")
    if t == 0 or t % cfg.chunk:
        raise ValueError(f"frames: T = {t} is not a positive multiple of the chunk, {cfg.chunk}")
    for name in ("bvp", "mask"):
        if tuple(batch[name].shape) != (b, t):
            raise ValueError(f"{name}: expected shape {(b, t)}, got {tuple(batch[name].shape)}")


def loss_and_grads(params, batch: dict, key, hp: TrainHParams, cfg: MEConfig = ME, method: str | None = None):
    """Loss of a batch and its gradients with respect to params, by `method` (default hp.method):
    "chunked" (flat memory), "whole" or "remat"; all give the same values."""
    cfg = model_config(hp, cfg)
    _check_batch(batch, cfg)
    method = method or hp.method
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "chunked":
        if jax.process_count() > 1:  # their loss divides by the process's own part
            raise ValueError(f"method {method!r} runs in one process; across processes use 'chunked'")
        params, batch, key, _ = _placed(params, batch, key)
        return _grads_traced(params, batch, key, hp.dropout, hp.loss, cfg, method == "remat")
    b = batch["frames"].shape[0]  # this process's part of the batch
    m = hp.micro_batch or b
    if b % m:
        raise ValueError(f"micro_batch {m} does not divide the batch of {b}")
    processes = jax.process_count()
    # a host number (no device of its own), of the whole batch: every process's part divides by the same
    denominator = float(_process_sum(loss_denominator(np.asarray(batch["mask"]), hp.loss)))
    first = jax.process_index() * (b // m)  # this process's first micro-batch in the whole batch
    loss = grads = None
    for g in range(0, b, m):  # one micro-batch's activations in memory at a time
        part = {k: v[g:g + m] for k, v in batch.items()}
        part_key = key if m == b and processes == 1 else jax.random.fold_in(key, first + g // m)  # its own draw
        placed_params, part, part_key, by_batch = _placed(params, part, part_key)
        part_loss, part_grads = _grads_chunked(placed_params, part, part_key, hp.dropout, hp.loss, cfg, by_batch,
                                               denominator)
        loss = part_loss if loss is None else loss + part_loss
        grads = part_grads if grads is None else jax.tree.map(jnp.add, grads, part_grads)
    if processes > 1:
        loss, grads = _process_sum((loss, grads), like=(loss, grads))
    return loss, grads


def _process_sum(tree, like=None):
    """tree summed over the processes of a `jax.distributed` run, in process order (the same on each); with
    `like`, placed as like's leaves are. One process: tree unchanged."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    summed = jax.tree.map(lambda a: np.sum(a, axis=0), multihost_utils.process_allgather(tree))
    return summed if like is None else jax.tree.map(lambda a, l: jax.device_put(a.astype(l.dtype), l.sharding),
                                                    summed, like)


# ---------------------------------------------------------------- step


@partial(_jit, static_argnames="hp", donate_argnums=0)
def _update(state: dict, grads, loss, hp: TrainHParams):
    """One optimiser update of the (donated) train state, and the step's metrics."""
    updates, opt_state = optimizer(hp).update(grads, state["opt_state"], state["params"])
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": learning_rate(hp)(state["step"])}
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}, metrics


def train_step(state: dict, batch: dict, hp: TrainHParams, cfg: MEConfig = ME):
    """One training step on a batch (numpy, or sharded with `shard_batch`). Returns the new state (the old
    one is donated: do not reuse it) and metrics {loss, grad_norm, lr} as device scalars."""
    key = jax.random.fold_in(state["rng"], state["step"])  # a fresh dropout draw per step
    loss, grads = loss_and_grads(state["params"], batch, key, hp, cfg)
    return _update(state, grads, loss, hp)
