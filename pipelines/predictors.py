"""BVP predictors over 30 fps face crops: ME-rPPG (chunk, flow) and the GREEN/CHROM/POS baselines.

Every predictor serves a batch of B recordings in lockstep: `lockstep` cuts the B crop streams into
aligned blocks of `BLOCK` frames, each predictor takes one block of all B per `push` (one device call for
the ME-rPPG modes) and returns each recording's whole BVP at `finish`. A recording of any length passes
in memory bounded by two blocks of crops plus one float per frame; B = 1 is a single video. Frames
without a face enter the model as zeros (as in the published implementation) and their BVP is zeroed.
`ModelSet.feed` runs the lot and returns, with the predictors, what each stream read (`StreamRead`).
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from transforms.baselines import BASELINES, rgb_means
from transforms.errors import ItemFailed
from transforms.resample import FPS

BLOCK = 160  # frames per push: one ME-rPPG chunk, so chunk mode compiles one shape whatever the lengths
ME_NAMES = ("me-chunk", "me-flow")
MODEL_NAMES = ME_NAMES + tuple(BASELINES)
PRECISIONS = ("float32", "bfloat16")  # of ME-rPPG's convolutions: the published model's, or for GPUs


def compile_cache_dir() -> Path:
    """Where compiled ME-rPPG executables are kept across runs: $XDG_CACHE_HOME/pulsepipe/xla."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pulsepipe" / "xla"


@functools.cache  # once per process
def use_compile_cache() -> None:
    """Turn on JAX's persistent compilation cache, unless JAX_COMPILATION_CACHE_DIR already chose a place.

    Every worker of every run compiles the same few shapes (one per batch size and precision), seconds each
    on a CPU; with the cache only the first run on a machine pays. A cached executable is the one the
    compiler would build again, so outputs are unchanged. The setting is JAX's, for the whole process:
    `ModelSet` turns it on, so a program that uses it caches its own slow compiles there too.
    """
    import jax

    if jax.config.jax_compilation_cache_dir is not None:
        return
    path = compile_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # JAX would warn at every compile instead
        print(f"pulsepipe: compiled models are not kept across runs: cannot create {path} ({e.strerror}); "
              "set XDG_CACHE_HOME or JAX_COMPILATION_CACHE_DIR to a writable folder", file=sys.stderr)
        return
    jax.config.update("jax_compilation_cache_dir", str(path))


class Block(NamedTuple):
    """One block of a stream for `ModelSet.feed`: crops for the models, and per-frame facts handed back."""
    crops: np.ndarray  # (n, 36, 36, 3) uint8
    face_found: np.ndarray  # (n,) bool
    truth: np.ndarray | None = None  # (n,) ground-truth BVP, where the source has it
    timestamps: np.ndarray | None = None  # (n,) seconds, where the caller wants them back


class StreamRead(NamedTuple):
    """What one stream handed `ModelSet.feed`: its blocks' per-frame facts joined, or the error that ended it."""
    face_found: np.ndarray  # (n,) bool, every frame the models saw
    truth: np.ndarray | None  # (n,) float64; None when a block came without
    timestamps: np.ndarray | None  # (n,) float64 seconds; None when a block came without
    error: ItemFailed | None  # what ended the stream early; None when it ran to its end


class Fed(NamedTuple):
    """What `ModelSet.feed` returns."""
    predictors: dict  # {name: predictor}, ready for `finish`
    reads: list[StreamRead]  # one per stream, in the streams' order


class _Tap:
    """A stream on its way into `lockstep`: its crops and flags pass on, its per-frame facts are kept for
    `read` (never its crops: memory stays bounded), and an ItemFailed ends it there."""

    def __init__(self, stream: Iterable):
        self._stream = stream
        self._kept: list[Block] = []
        self._error: ItemFailed | None = None

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        try:
            for block in self._stream:
                block = Block(*block)
                self._kept.append(block._replace(crops=None))
                yield block.crops, block.face_found
        except ItemFailed as e:  # one stream's bad input must not end the others
            self._error = e

    def read(self) -> StreamRead:
        kept = self._kept
        return StreamRead(_joined([b.face_found for b in kept], bool), _joined([b.truth for b in kept], np.float64),
                          _joined([b.timestamps for b in kept], np.float64), self._error)


def _joined(parts: list[np.ndarray | None], dtype) -> np.ndarray | None:
    """Per-block arrays as one array of dtype; None if a block has none."""
    if any(p is None for p in parts):
        return None
    return np.concatenate([np.asarray(p, dtype) for p in parts]) if parts else np.zeros(0, dtype)


def lockstep(streams: list[Iterable[tuple[np.ndarray, np.ndarray]]], size: int = BLOCK
             ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Cut B streams of (crops (n, 36, 36, 3) uint8, face_found (n,) bool) blocks into aligned blocks.

    Yields (crops (B, size, 36, 36, 3), face_found (B, size), n_valid (B,)) until every stream has ended:
    the first n_valid[k] frames of row k are stream k's next frames. A stream's last partial block is
    padded by repeating its last frame and flag (as the published `process_video` pads its last chunk),
    an ended stream by blank frames without a face; padding never reaches a recording's output.
    """
    iters = [iter(s) for s in streams]
    pending: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in iters]
    counts = [0] * len(iters)
    live = [True] * len(iters)
    shape = None
    while True:
        for k, it in enumerate(iters):
            while live[k] and counts[k] < size:
                block = next(it, None)
                if block is None:
                    live[k] = False
                elif len(block[0]):
                    pending[k].append((np.asarray(block[0], np.uint8), np.asarray(block[1], bool)))
                    counts[k] += len(block[0])
                    shape = block[0].shape[1:]
        if not any(counts):
            return
        crops = np.zeros((len(iters), size, *shape), np.uint8)
        found = np.zeros((len(iters), size), bool)
        n_valid = np.minimum(counts, size)
        for k, n in enumerate(n_valid):
            if not n:
                continue
            c, f = np.concatenate([b[0] for b in pending[k]]), np.concatenate([b[1] for b in pending[k]])
            crops[k, :n], found[k, :n] = c[:n], f[:n]
            crops[k, n:], found[k, n:] = c[n - 1], f[n - 1]
            pending[k] = [(c[n:], f[n:])] if len(c) > n else []
            counts[k] -= n
        yield crops, found, n_valid


def feed(predictors: dict, streams: list[Iterable[Block | tuple[np.ndarray, np.ndarray]]]) -> Fed:
    """Predictors made for B streams (`ModelSet.predictors`, or an `MEPredictor` of a model in memory) over
    the streams in lockstep; returns them, ready for `finish`, and what each stream read (see ModelSet.feed)."""
    taps = [_Tap(s) for s in streams]
    for crops, found, n_valid in lockstep(taps):
        for p in predictors.values():
            p.push(crops, found, n_valid)
    return Fed(predictors, [t.read() for t in taps])


def parse_models(names, weights: str = "rlap") -> dict[str, tuple[str, str | None]]:
    """{name: (kind, ME weights or None)}; ValueError for no names or an unknown one.

    names: model names, ME-rPPG ones optionally with their weights as `me-chunk:pure` (rlap, pure or a
    path; default `weights`).
    """
    if not names:
        raise ValueError(f"no model given; choose from {', '.join(MODEL_NAMES)}")
    specs = {}
    for name in names:
        if name in specs:
            raise ValueError(f"model {name!r} is given twice")
        kind, _, w = name.partition(":")
        if kind not in MODEL_NAMES or (w and kind not in ME_NAMES):
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)} "
                             "(ME-rPPG as me-chunk:WEIGHTS with rlap, pure, a path or a training run folder)")
        specs[name] = kind, (w or weights) if kind in ME_NAMES else None
    return specs


def _me_weights(specs: dict[str, tuple[str, str | None]]) -> list[str]:
    """The distinct ME weights that `parse_models`'s specs name, sorted."""
    return sorted({w for _, w in specs.values() if w is not None})


def check_models(names, weights: str = "rlap") -> None:
    """Raise ValueError, naming the model or the weights file, for what `ModelSet(names)` would fail on:
    a driver checks here before it starts workers. Reads each ME weights file (no JAX, no compile)."""
    from model.weights import load_params

    for w in _me_weights(parse_models(names, weights)):
        try:
            load_params(w)
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - h5py raises OSError, a wrong layout KeyError
            raise ValueError(f"{w}: cannot read ME-rPPG weights from it ({type(e).__name__}: {e})") from None


class ModelSet:
    """Models loaded once for a whole run; `predictors(batch)` gives fresh state for B recordings.

    names: see `parse_models`. Each distinct set of ME weights is read once, however many modes use it.
    precision: of ME-rPPG's convolutions, "float32" (the published model) or "bfloat16" (for GPUs).
    cpu_only: keep this process's JAX off any GPU: a CPU worker on a machine with CUDA JAX would
    otherwise take the GPU and most of its memory (JAX reserves 75% per process).
    """

    def __init__(self, names, weights: str = "rlap", precision: str = "float32", cpu_only: bool = False):
        self.names = tuple(names)
        self._specs = parse_models(self.names, weights)
        self._me = {}
        me_weights = _me_weights(self._specs)
        if me_weights:  # the baselines need no JAX
            import jax

            import model

            if cpu_only:
                jax.config.update("jax_platforms", "cpu")  # before JAX's first use in the process
            use_compile_cache()
            self._me = {w: model.load("me-rppg", weights=w, precision=precision) for w in me_weights}

    def predictors(self, batch: int = 1) -> dict:
        """{name: predictor} with fresh state, for `batch` recordings run in lockstep."""
        return {name: self._make(*self._specs[name], batch) for name in self.names}

    def feed(self, streams: list[Iterable[Block | tuple[np.ndarray, np.ndarray]]]) -> Fed:
        """Every model over B streams in lockstep; returns the predictors, ready for `finish`, and what each
        stream read. A stream yields `Block`s (or (crops, face_found) pairs); an ItemFailed it raises ends
        that stream, is its read's `error`, and the others go on."""
        return feed(self.predictors(len(streams)), streams)

    def _make(self, kind: str, weights: str | None, batch: int):
        if kind in ME_NAMES:
            return MEPredictor(self._me[weights], kind.removeprefix("me-"), batch)
        return BaselinePredictor(kind, batch)


class _Blocks:
    """What every predictor keeps per block (face flags, real-frame counts) to cut each stream out, and
    `finish`, which gives each stream's output (None for streams not kept: too short, failed, ...)."""

    def __init__(self, batch: int):
        self.batch = batch
        self._found: list[np.ndarray] = []
        self._valid: list[np.ndarray] = []
        self._out: list = []  # the model's per-block (B, size, ...) output, on the device until finish()

    def _keep(self, found: np.ndarray, n_valid: np.ndarray) -> None:
        if found.shape[0] != self.batch:
            raise ValueError(f"block is for {found.shape[0]} recordings, the predictor for {self.batch}")
        self._found.append(found)
        self._valid.append(n_valid)

    def finish(self, keep=None) -> list[np.ndarray | None]:
        host = [np.asarray(b) for b in self._out]  # one transfer per block, then views
        return [self._output(self._stream(host, k), self._stream(self._found, k)) if keep is None or keep[k] else None
                for k in range(self.batch)]

    def _stream(self, blocks: list[np.ndarray], k: int) -> np.ndarray:
        """Stream k's real frames of per-block (B, size, ...) arrays, concatenated."""
        return np.concatenate([b[k, :v[k]] for b, v in zip(blocks, self._valid)]) if blocks else np.zeros(0)

    def _output(self, out: np.ndarray, found: np.ndarray) -> np.ndarray:
        return out.astype(np.float64) * found  # BVP of no-face frames is zeroed


class MEPredictor(_Blocks):
    """ME-rPPG over blocks of every stream, one device call per block, state carried between blocks.

    mode "chunk": each block is one 160-frame chunk (`apply_chunk`). Mode "flow": frame by frame with the
    recursive state, as a real-time client runs it (`flow_frames` scans `flow_step` over the block).
    """

    def __init__(self, me, mode: str, batch: int = 1):
        import model

        if mode == "chunk" and me.cfg.chunk != BLOCK:
            raise ValueError(f"chunk mode needs blocks of one chunk ({me.cfg.chunk} frames), got {BLOCK}")
        super().__init__(batch)
        self._me = me
        self._run = model.apply_chunk if mode == "chunk" else functools.partial(model.flow_frames, dt=1.0 / FPS)
        self._state = me.init_state(batch)

    def push(self, crops: np.ndarray, found: np.ndarray, n_valid: np.ndarray) -> None:
        self._keep(found, n_valid)
        # JAX's async dispatch returns at once, so the model overlaps with reading the next block
        frames = np.where(found[..., None, None, None], crops, 0)
        bvp, self._state = self._run(self._me.params, frames, self._state, cfg=self._me.cfg)
        self._out.append(bvp)


class BaselinePredictor(_Blocks):
    """GREEN, CHROM or POS on the spatial mean colour of each face crop."""

    def __init__(self, name: str, batch: int = 1):
        super().__init__(batch)
        self._method = BASELINES[name]

    def push(self, crops: np.ndarray, found: np.ndarray, n_valid: np.ndarray) -> None:
        self._keep(found, n_valid)
        b, size = found.shape
        self._out.append(rgb_means(crops.reshape(b * size, *crops.shape[2:]), found.reshape(-1)).reshape(b, size, 3))

    def _output(self, means: np.ndarray, found: np.ndarray) -> np.ndarray:
        return self._method(means, FPS)
