"""BVP predictors over 30 fps face crops: ME-rPPG (chunk, flow), PhysMamba and the GREEN/CHROM/POS baselines.

Every predictor serves a batch of B recordings in lockstep: `lockstep` cuts the B crop streams into
aligned blocks of `BLOCK` frames, each predictor takes one block of all B per `push` (one device call for
the ME-rPPG modes) and returns each recording's whole BVP at `finish`. A recording of any length passes
in memory bounded by two blocks of crops plus one float per frame; B = 1 is a single video. Frames
without a face enter the model as zeros (as in the published implementation) and their BVP is zeroed.
Each model reads crops of its own size (`CROP_SIZES`: ME-rPPG and the baselines 36x36, PhysMamba
128x128); a stream carries every size its models need, as {size: crops}. PhysMamba runs its own 128-frame
chunks over the blocks, one device call per chunk of all B (`PhysMambaPredictor`).
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
from transforms.shards import CROP_SIZE
from transforms.resample import FPS

BLOCK = 160  # frames per push: one ME-rPPG chunk, so chunk mode compiles one shape whatever the lengths
ME_NAMES = ("me-chunk", "me-flow")
PHYSMAMBA = "physmamba"
WEIGHTED_NAMES = ME_NAMES + (PHYSMAMBA,)  # models that take weights, as NAME:WEIGHTS
MODEL_NAMES = WEIGHTED_NAMES + tuple(BASELINES)
PHYSMAMBA_CROP = 128  # PhysMamba's crop size (model.config.PhysMambaConfig.image; checked at load)
CROP_SIZES = {**{name: CROP_SIZE for name in MODEL_NAMES}, PHYSMAMBA: PHYSMAMBA_CROP}  # each model's crops
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
    crops: np.ndarray | dict  # {size: (n, size, size, 3) uint8} at each size the models read, or one array
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

    def __iter__(self) -> Iterator[tuple[dict, np.ndarray]]:
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


def by_size(crops: np.ndarray | dict) -> dict[int, np.ndarray]:
    """{size: (n, size, size, 3) uint8} of a block's crops: a dict as given, one array by its own size."""
    if isinstance(crops, dict):
        return {s: np.asarray(c, np.uint8) for s, c in crops.items()}
    crops = np.asarray(crops, np.uint8)
    return {crops.shape[1]: crops}


def lockstep(streams: list[Iterable[tuple[np.ndarray | dict, np.ndarray]]], size: int = BLOCK
             ) -> Iterator[tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]]:
    """Cut B streams of (crops, face_found (n,) bool) blocks into aligned blocks; crops as `by_size` takes
    them, the same sizes in every stream.

    Yields ({S: crops (B, size, S, S, 3)}, face_found (B, size), n_valid (B,)) until every stream has ended:
    the first n_valid[k] frames of row k are stream k's next frames. A stream's last partial block is
    padded by repeating its last frame and flag (as the published `process_video` pads its last chunk),
    an ended stream by blank frames without a face; padding never reaches a recording's output.
    """
    iters = [iter(s) for s in streams]
    pending: list[list[tuple[dict, np.ndarray]]] = [[] for _ in iters]
    counts = [0] * len(iters)
    live = [True] * len(iters)
    shapes = None
    while True:
        for k, it in enumerate(iters):
            while live[k] and counts[k] < size:
                block = next(it, None)
                if block is None:
                    live[k] = False
                elif len(block[1]):
                    crops = by_size(block[0])
                    pending[k].append((crops, np.asarray(block[1], bool)))
                    counts[k] += len(block[1])
                    shapes = {s: c.shape[1:] for s, c in crops.items()}
        if not any(counts):
            return
        crops = {s: np.zeros((len(iters), size, *shape), np.uint8) for s, shape in shapes.items()}
        found = np.zeros((len(iters), size), bool)
        n_valid = np.minimum(counts, size)
        for k, n in enumerate(n_valid):
            if not n:
                continue
            c = {s: np.concatenate([b[0][s] for b in pending[k]]) for s in crops}
            f = np.concatenate([b[1] for b in pending[k]])
            for s, out in crops.items():
                out[k, :n], out[k, n:] = c[s][:n], c[s][n - 1]
            found[k, :n], found[k, n:] = f[:n], f[n - 1]
            pending[k] = [({s: cs[n:] for s, cs in c.items()}, f[n:])] if len(f) > n else []
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
    """{name: (kind, weights or None)}; ValueError for no names or an unknown one.

    names: model names, ME-rPPG and PhysMamba ones optionally with their weights as `me-chunk:pure` or
    `physmamba:rlap` (rlap, pure or a path; default `weights`).
    """
    if not names:
        raise ValueError(f"no model given; choose from {', '.join(MODEL_NAMES)}")
    specs = {}
    for name in names:
        if name in specs:
            raise ValueError(f"model {name!r} is given twice")
        kind, _, w = name.partition(":")
        if kind not in MODEL_NAMES or (w and kind not in WEIGHTED_NAMES):
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)} "
                             "(ME-rPPG as me-chunk:WEIGHTS with rlap, pure, a path or a training run folder; "
                             "PhysMamba as physmamba:WEIGHTS with rlap, pure or a path)")
        specs[name] = kind, (w or weights) if kind in WEIGHTED_NAMES else None
    return specs


def _weights(specs: dict[str, tuple[str, str | None]], physmamba: bool = False) -> list[str]:
    """The distinct ME (or, with physmamba, PhysMamba) weights that `parse_models`'s specs name, sorted."""
    return sorted({w for kind, w in specs.values() if w is not None and (kind == PHYSMAMBA) == physmamba})


def model_crop_sizes(names, weights: str = "rlap") -> dict[str, int]:
    """{name: the crop size it reads} (see CROP_SIZES); ValueError as `parse_models`."""
    return {name: CROP_SIZES[kind] for name, (kind, _) in parse_models(names, weights).items()}


def check_models(names, weights: str = "rlap") -> None:
    """Raise ValueError, naming the model or the weights file, for what `ModelSet(names)` would fail on:
    a driver checks here before it starts workers. Reads each weights file (no JAX, no compile)."""
    from model.weights import load_params, load_physmamba_params

    specs = parse_models(names, weights)
    for what, load, ws in (("ME-rPPG", load_params, _weights(specs)),
                           ("PhysMamba", load_physmamba_params, _weights(specs, physmamba=True))):
        for w in ws:
            try:
                load(w)
            except FileNotFoundError as e:
                raise ValueError(str(e)) from None
            except Exception as e:  # noqa: BLE001 - h5py raises OSError, a wrong layout KeyError
                raise ValueError(f"{w}: cannot read {what} weights from it ({type(e).__name__}: {e})") from None


class ModelSet:
    """Models loaded once for a whole run; `predictors(batch)` gives fresh state for B recordings.

    names: see `parse_models`. Each distinct set of weights is read once, however many modes use it.
    precision: of ME-rPPG's convolutions, "float32" (the published model) or "bfloat16" (for GPUs).
    cpu_only: keep this process's JAX off any GPU: a CPU worker on a machine with CUDA JAX would
    otherwise take the GPU and most of its memory (JAX reserves 75% per process).
    """

    def __init__(self, names, weights: str = "rlap", precision: str = "float32", cpu_only: bool = False):
        self.names = tuple(names)
        self._specs = parse_models(self.names, weights)
        self.crop_sizes = tuple(sorted(set(model_crop_sizes(self.names, weights).values())))  # what streams carry
        self._me, self._physmamba = {}, {}
        me_weights, physmamba_weights = _weights(self._specs), _weights(self._specs, physmamba=True)
        if me_weights or physmamba_weights:  # the baselines need no JAX
            import jax

            import model

            if cpu_only:
                jax.config.update("jax_platforms", "cpu")  # before JAX's first use in the process
            use_compile_cache()
            self._me = {w: model.load("me-rppg", weights=w, precision=precision) for w in me_weights}
            self._physmamba = {w: model.load("physmamba", weights=w) for w in physmamba_weights}

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
        if kind == PHYSMAMBA:
            return PhysMambaPredictor(self._physmamba[weights], batch)
        return BaselinePredictor(kind, batch)


class _Blocks:
    """What every predictor keeps per block (face flags, real-frame counts) to cut each stream out, and
    `finish`, which gives each stream's output (None for streams not kept: too short, failed, ...)."""

    crop_size = CROP_SIZE  # the crops `push` reads

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

    def _crops(self, crops: dict) -> np.ndarray:
        """This model's crops of a block's {size: crops}."""
        if self.crop_size not in crops:
            raise ValueError(f"{type(self).__name__} reads {self.crop_size}x{self.crop_size} crops; the block has "
                             f"{', '.join(f'{s}x{s}' for s in crops) or 'none'}")
        return crops[self.crop_size]

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

    def push(self, crops: dict, found: np.ndarray, n_valid: np.ndarray) -> None:
        self._keep(found, n_valid)
        # JAX's async dispatch returns at once, so the model overlaps with reading the next block
        frames = np.where(found[..., None, None, None], self._crops(crops), 0)
        bvp, self._state = self._run(self._me.params, frames, self._state, cfg=self._me.cfg)
        self._out.append(bvp)


class PhysMambaPredictor(_Blocks):
    """PhysMamba over every stream: 128-frame chunks with no state and no overlap, one device call
    (`model.physmamba_chunk`) per chunk of all B streams, as the published `process_video` runs it.

    The lockstep blocks (160 frames) are gathered into chunks; a stream's last partial chunk is padded by
    repeating its last real frame and face flag, and only its real outputs are kept. At most one chunk
    plus one block of crops is held, whatever the lengths.
    """

    crop_size = PHYSMAMBA_CROP

    def __init__(self, pm, batch: int = 1):
        super().__init__(batch)
        if pm.cfg.image != self.crop_size:
            raise ValueError(f"PhysMamba reads {pm.cfg.image}x{pm.cfg.image} crops, streams carry {self.crop_size}")
        self._pm, self._chunk = pm, pm.cfg.frames
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # pushed (crops, found) not yet in a chunk
        self._n_pending = 0
        self._n_real = np.zeros(batch, np.int64)  # real frames pushed per stream, chunked or not
        self._n_run = 0  # frames of each stream already run

    def push(self, crops: dict, found: np.ndarray, n_valid: np.ndarray) -> None:
        if found.shape[0] != self.batch:
            raise ValueError(f"block is for {found.shape[0]} recordings, the predictor for {self.batch}")
        self._pending.append((self._crops(crops), found))
        self._n_pending += found.shape[1]
        self._n_real += n_valid
        while self._n_pending >= self._chunk:
            self._run(*self._take(self._chunk))

    def finish(self, keep=None) -> list[np.ndarray | None]:
        if self._n_pending:  # the last partial chunk, padded to a whole one
            self._run(*self._take(self._n_pending))
        return super().finish(keep)

    def _take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next n pending frames of every stream (crops (B, n, S, S, 3), found (B, n))."""
        crops, found = (np.concatenate(parts, axis=1) for parts in zip(*self._pending))
        self._pending = [(crops[:, n:], found[:, n:])] if crops.shape[1] > n else []
        self._n_pending -= n
        return crops[:, :n], found[:, :n]

    def _run(self, crops: np.ndarray, found: np.ndarray) -> None:
        b, n = found.shape
        chunk = np.zeros((b, self._chunk, *crops.shape[2:]), np.uint8)
        flags = np.zeros((b, self._chunk), bool)
        chunk[:, :n], flags[:, :n] = crops, found
        n_valid = np.clip(self._n_real - self._n_run, 0, self._chunk)
        for k, v in enumerate(n_valid):
            if 0 < v < self._chunk:  # a stream's last chunk: its last real frame repeated, as the reference pads
                chunk[k, v:], flags[k, v:] = chunk[k, v - 1], flags[k, v - 1]
        self._n_run += self._chunk
        self._keep(flags, n_valid)
        import jax

        import model

        if self._out:  # one chunk queued behind the running one at most: each holds 6 MB of crops per stream,
            jax.block_until_ready(self._out[-1])  # and reading outpaces the model, so the queue would grow
        # zeros where no face, as the published model sees them; async dispatch overlaps the next block
        self._out.append(model.physmamba_chunk(self._pm.params, np.where(flags[..., None, None, None], chunk, 0)))


class BaselinePredictor(_Blocks):
    """GREEN, CHROM or POS on the spatial mean colour of each face crop."""

    def __init__(self, name: str, batch: int = 1):
        super().__init__(batch)
        self._method = BASELINES[name]

    def push(self, crops: dict, found: np.ndarray, n_valid: np.ndarray) -> None:
        self._keep(found, n_valid)
        b, size = found.shape
        crops = self._crops(crops)
        self._out.append(rgb_means(crops.reshape(b * size, *crops.shape[2:]), found.reshape(-1)).reshape(b, size, 3))

    def _output(self, means: np.ndarray, found: np.ndarray) -> np.ndarray:
        return self._method(means, FPS)
