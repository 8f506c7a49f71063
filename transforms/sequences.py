"""Training data for `pulsepipe train`: subject split, fixed-length sequences, seeded batches from shards.

    data = build_training_data(["out/pre", "out/aug"], seq_len=320, val_fraction=0.2, seed=0)
    data.split                         # {"train": [[dataset, subject_id], ...], "val": [...], ...}: JSON
    for batch in iter_batches(data.index, batch_size=8, seed=0, start=DataPosition(0, 0)):
        batch.arrays                   # {"frames": (8, 320, 36, 36, 3) u1, "bvp": (8, 320) f4, "mask": (8, 320) bool}
        save(batch.next)               # resuming there gives the batches an uninterrupted run sees next

Choices, fixed here so that every run makes the same ones (DATA_SETTINGS, for the run's config):
- Split: by subject, `sha256([seed, dataset, subject_id])` mapped into [0, 1) below val_fraction is
  validation, so adding subjects never moves others and every recording of a subject (augmented copies
  included) lands on its side. Only subjects with ground truth count.
- Sequences: consecutive non-overlapping windows of seq_len frames from each training recording; the
  tail shorter than seq_len is dropped, and a recording shorter than seq_len gives none (counted).
  A window with fewer than min_valid_fraction * seq_len usable frames (face found and finite truth), or
  with flat truth over them, is skipped at indexing time (counted).
- Labels: z-score per sequence over its usable frames (`label_norm: zscore-per-sequence`), 0 elsewhere.
- Batches: the last partial batch of an epoch is dropped, so every batch has the same shape under jit.

Memory: the index reads light columns only (ids, frame counts, face_found, bvp: 5 bytes a frame, one
recording at a time), never the frames; a batch holds its own arrays plus one row group of one shard.
Engine-free: numpy, pyarrow and fsspec only.
"""
from __future__ import annotations

import dataclasses
import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, NamedTuple

import fsspec
import numpy as np
import pyarrow.parquet as pq

from transforms.augment import AUGMENTED_MARK
from transforms.manifest import canonical_json, manifest_uri, read_manifest
from transforms.shards import segments_of_table

SEQ_MULTIPLE = 160  # ME-rPPG's chunk: the model carries its state from one 160-frame chunk to the next
LABEL_NORM = "zscore-per-sequence"
DATA_SETTINGS = {"label_norm": LABEL_NORM, "split": "sha256(seed, dataset, subject_id)", "tail": "drop",
                 "partial_batch": "drop", "shuffle": "splitmix64(sha256(seed, epoch))"}
READ_THREADS = 8  # indexing reads small columns of many shards: I/O bound, threads are enough

_INDEX_COLUMNS = ["recording_id", "segment_index", "start_frame", "n_frames", "height", "width", "face_found", "bvp"]
_BATCH_COLUMNS = ["recording_id", "start_frame", "n_frames", "height", "width", "frames", "face_found", "bvp"]


# ---------------------------------------------------------------------------------------------- inputs

class RootManifest(NamedTuple):
    """One input root: its full URI (protocol included), filesystem, path on it and manifest rows."""

    uri: str
    fs: fsspec.AbstractFileSystem
    path: str
    rows: list[dict]


class Recording(NamedTuple):
    """An ok manifest row of an input root."""

    dataset: str
    subject_id: str
    recording_id: str
    shard_uri: str  # full URI: fsspec.core.url_to_fs opens it
    root: str  # the output root it came from, full URI

    @property
    def augmented(self) -> bool:
        return AUGMENTED_MARK in self.recording_id


def load_manifests(roots: Iterable[str], fs: fsspec.AbstractFileSystem | None = None) -> list[RootManifest]:
    """Each root's manifest, in the order given. fs: one filesystem for every root (default: each URI's own).

    Raises ValueError for no roots, a root given twice, or a root without manifest.
    """
    manifests = []
    for uri in roots:
        root_fs, path = fsspec.core.url_to_fs(uri) if fs is None else (fs, fs._strip_protocol(uri))
        path = path.rstrip("/")
        rows = read_manifest(manifest_uri(path), root_fs)
        if not rows:
            raise ValueError(f"{uri}: no manifest.parquet; run `pulsepipe preprocess` (or augment) there first")
        manifests.append(RootManifest(root_fs.unstrip_protocol(path), root_fs, path, rows))
    if not manifests:
        raise ValueError("no input roots given")
    if len({m.uri for m in manifests}) != len(manifests):
        raise ValueError("an input root is given twice")
    return manifests


def without_subjects(manifests: list[RootManifest], subjects: Iterable[tuple[str, str]]) -> list[RootManifest]:
    """The manifests without the rows of these (dataset, subject_id) pairs: subjects kept out of training
    (`pulsepipe refresh`'s frozen held-out split) are gone from the split, the index, the counts and the
    data fingerprint, as if never preprocessed."""
    drop = {(str(d), str(s)) for d, s in subjects}
    if not drop:
        return manifests
    return [m._replace(rows=[r for r in m.rows if (r["dataset"], r["subject_id"]) not in drop]) for m in manifests]


def data_fingerprint(manifests: list[RootManifest]) -> str:
    """sha256 hex of the roots in order and, per root, its rows' (dataset, recording_id, fingerprint, status)
    sorted: it changes when a recording is added, removed, redone from changed sources, or fails."""
    entries = [{"root": m.uri,
                "rows": sorted([r["dataset"], r["recording_id"], r["fingerprint"], r["status"]] for r in m.rows)}
               for m in manifests]
    return hashlib.sha256(canonical_json(entries).encode()).hexdigest()


def ok_recordings(manifests: list[RootManifest]) -> list[Recording]:
    """The ok rows of every root, roots in order, each root's rows in manifest order.

    Raises ValueError when a (dataset, recording_id) appears in two roots: it would count twice.
    """
    seen: dict[tuple[str, str], str] = {}
    recordings = []
    for m in manifests:
        for r in m.rows:
            if r["status"] != "ok":
                continue
            key = (r["dataset"], r["recording_id"])
            if key in seen:
                raise ValueError(f"{key[0]}/{key[1]} is in both {seen[key]} and {m.uri}")
            seen[key] = m.uri
            recordings.append(Recording(r["dataset"], r["subject_id"], r["recording_id"],
                                        m.fs.unstrip_protocol(f"{m.path}/{r['shard']}"), m.uri))
    return recordings


# ----------------------------------------------------------------------------------------------- split

def hash64(*parts) -> int:
    """64 bits of the sha256 of the parts' canonical JSON: the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(canonical_json(list(parts)).encode()).digest()[:8], "big")


def unit_hash(*parts) -> float:
    """hash64 mapped into [0, 1)."""
    return hash64(*parts) / 2**64


def split_subjects(keys: Iterable[tuple[str, str]], val_fraction: float, seed: int) -> dict:
    """Subjects into train and validation by a stable hash: JSON-ready, for the run folder.

    keys: (dataset, subject_id) pairs (repeats are fine). A subject is validation when
    unit_hash(seed, dataset, subject_id) < val_fraction, so its side depends on nothing else. Two fixes
    keep both sides usable, and only apply while a side would be empty: with val_fraction > 0 and >= 2
    subjects, the subject with the smallest hash goes to validation; with no training subject, the one
    with the largest hash goes to training (so a single subject always trains).
    Returns {"method", "seed", "val_fraction", "train": [[dataset, subject_id], ...], "val": [...]},
    both lists sorted.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    subjects = sorted({(str(d), str(s)) for d, s in keys}, key=lambda k: unit_hash(seed, *k))  # by hash
    val = {k for k in subjects if unit_hash(seed, *k) < val_fraction}
    if val_fraction > 0 and len(subjects) >= 2 and not val:
        val = {subjects[0]}
    if subjects and len(val) == len(subjects):
        val.discard(subjects[-1])
    return {"method": DATA_SETTINGS["split"], "seed": seed, "val_fraction": val_fraction,
            "train": sorted([list(k) for k in subjects if k not in val]), "val": sorted([list(k) for k in val])}


def validation_keys(split: dict) -> set[tuple[str, str]]:
    """split_subjects' validation subjects as a set of (dataset, subject_id)."""
    return {(d, s) for d, s in split["val"]}


def validation_recordings(recordings: Iterable[Recording], split: dict) -> list[Recording]:
    """The validation subjects' whole recordings, augmented copies left out, in the order given."""
    val = validation_keys(split)
    return [r for r in recordings if not r.augmented and (r.dataset, r.subject_id) in val]


# ------------------------------------------------------------------------------------------------ index

class Segments(NamedTuple):
    """Where a recording's frames lie in its shard: one entry per segment, in time order."""

    start_frame: np.ndarray  # (n_segments,) int64
    n_frames: np.ndarray  # (n_segments,) int64
    row_group: np.ndarray  # (n_segments,) int64: the Parquet row group holding the segment


class Windows(NamedTuple):
    """Per-window facts about a recording's consecutive seq_len windows (its tail left out)."""

    n_valid: np.ndarray  # (n_windows,) frames with a face and finite truth
    flat: np.ndarray  # (n_windows,) bool: truth constant (or absent) over those frames


class Scan(NamedTuple):
    """What indexing reads of one recording: its segments, size and usable-label facts (no frames)."""

    segments: Segments
    n_frames: int
    frame_shape: tuple[int, int, int]  # (H, W, 3)
    has_truth: bool  # a bvp column with at least one finite value
    windows: Windows


def scan_recording(rec: Recording, fs: fsspec.AbstractFileSystem, seq_len: int) -> Scan:
    """Reads the light columns of a recording's shard, one row group at a time.

    Holds the recording's face_found and bvp (5 bytes a frame), never its frames. Raises ValueError for
    a shard without the recording's segments or with segments missing or out of order.
    """
    path = fs._strip_protocol(rec.shard_uri)
    starts, lengths, groups, valid, bvp, shapes = [], [], [], [], [], set()
    next_frame = 0
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        for group in range(parquet.num_row_groups):
            for seg in segments_of_table(parquet.read_row_group(group, columns=_INDEX_COLUMNS)):
                if seg.recording_id != rec.recording_id:
                    continue
                if (seg.segment_index, seg.start_frame) != (len(starts), next_frame):
                    raise ValueError(f"{rec.shard_uri}: segment {seg.segment_index} at frame {seg.start_frame}, "
                                     f"expected segment {len(starts)} at frame {next_frame}")
                starts.append(seg.start_frame)
                lengths.append(seg.n_frames)
                groups.append(group)
                next_frame += seg.n_frames
                shapes.add((seg.height, seg.width, 3))
                truth = np.full(seg.n_frames, np.nan, np.float32) if seg.bvp is None else seg.bvp
                valid.append(seg.face_found & np.isfinite(truth))
                bvp.append(truth)
    if not starts:
        raise ValueError(f"{rec.shard_uri}: no segments of {rec.recording_id}")
    if len(shapes) > 1:
        raise ValueError(f"{rec.shard_uri}: crop sizes change within the recording: {sorted(shapes)}")
    valid, bvp = np.concatenate(valid), np.concatenate(bvp)
    segments = Segments(*(np.asarray(v, np.int64) for v in (starts, lengths, groups)))
    return Scan(segments, len(valid), shapes.pop(), bool(valid.any()), _windows(valid, bvp, seq_len))


def _windows(valid: np.ndarray, bvp: np.ndarray, seq_len: int) -> Windows:
    n = len(valid) // seq_len
    v = valid[:n * seq_len].reshape(n, seq_len)  # (n_windows, seq_len)
    b = bvp[:n * seq_len].reshape(n, seq_len)
    hi = np.where(v, b, -np.inf).max(axis=1, initial=-np.inf)
    lo = np.where(v, b, np.inf).min(axis=1, initial=np.inf)
    return Windows(v.sum(axis=1), ~(hi > lo))


class Shard(NamedTuple):
    """How the batch reader opens one indexed recording."""

    fs: fsspec.AbstractFileSystem
    path: str
    segments: Segments


class DataCounts(NamedTuple):
    """What indexing kept and left out, for the trainer's log ("N recordings too short")."""

    n_failed: int  # manifest rows not ok: never read
    n_without_truth: int  # ok recordings with no finite ground truth: left out
    n_train_recordings: int  # training subjects' recordings with truth, augmented copies included
    n_too_short: int  # of those, shorter than seq_len: no sequence
    n_sequences: int  # windows indexed
    n_low_mask: int  # windows skipped: fewer usable frames than the minimum
    n_flat: int  # windows skipped: truth constant over their usable frames
    n_tail_frames: int  # frames dropped at recording ends (tails shorter than seq_len)
    n_val_recordings: int  # validation subjects' original recordings with truth
    n_val_augmented: int  # augmented copies of validation subjects: used on neither side


@dataclasses.dataclass(frozen=True)
class SequenceIndex:
    """Every training sequence as (recording, start frame): arrays of ints, no frames.

    Sequence i is frames [start_frame[i], start_frame[i] + seq_len) of recordings[recording[i]].
    """

    seq_len: int
    frame_shape: tuple[int, int, int]  # (H, W, 3)
    recordings: tuple[Recording, ...]
    shards: tuple[Shard, ...]  # parallel to recordings
    recording: np.ndarray  # (n_sequences,) int64 index into recordings
    start_frame: np.ndarray  # (n_sequences,) int64

    def __len__(self) -> int:
        return len(self.start_frame)


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """All `pulsepipe train` needs of its inputs: see build_training_data."""

    split: dict  # split_subjects' result
    index: SequenceIndex
    validation: tuple[Recording, ...]  # whole recordings for validation inference
    counts: DataCounts
    fingerprint: str  # data_fingerprint of the inputs: --resume refuses when it changed


def check_seq_len(seq_len: int) -> None:
    if seq_len < SEQ_MULTIPLE or seq_len % SEQ_MULTIPLE:
        raise ValueError(f"seq_len must be a positive multiple of {SEQ_MULTIPLE} frames, got {seq_len}")


def build_training_data(roots: Iterable[str], *, seq_len: int, val_fraction: float, seed: int,
                        min_valid_fraction: float = 0.5, fs: fsspec.AbstractFileSystem | None = None,
                        read_threads: int = READ_THREADS,
                        exclude_subjects: Iterable[tuple[str, str]] = ()) -> TrainingData:
    """Reads the roots' manifests and the light columns of their ok shards; splits, indexes, counts.

    roots: output roots of `pulsepipe preprocess` / `augment` (any fsspec URI). min_valid_fraction: a
    window needs at least ceil(min_valid_fraction * seq_len) usable frames (face found, finite truth).
    exclude_subjects: (dataset, subject_id) pairs left out entirely (`without_subjects`).
    Raises ValueError for a bad seq_len or fraction, and when no ok recording has ground truth.
    """
    check_seq_len(seq_len)
    if not 0.0 < min_valid_fraction <= 1.0:
        raise ValueError(f"min_valid_fraction must be in (0, 1], got {min_valid_fraction}")
    manifests = without_subjects(load_manifests(roots, fs), exclude_subjects)
    fs_of = {m.uri: m.fs for m in manifests}
    recordings = ok_recordings(manifests)
    with ThreadPoolExecutor(max(1, read_threads)) as pool:
        scans = list(pool.map(lambda r: scan_recording(r, fs_of[r.root], seq_len), recordings))
    labelled = [(r, s) for r, s in zip(recordings, scans) if s.has_truth]
    if not labelled:
        raise ValueError(f"no recording has ground truth (bvp) in {', '.join(m.uri for m in manifests)}: "
                         f"{len(recordings)} ok recordings, none with truth; training needs labels")
    if len({s.frame_shape for _, s in labelled}) > 1:
        raise ValueError(f"crop sizes differ between recordings: {sorted({s.frame_shape for _, s in labelled})}")
    split = split_subjects([(r.dataset, r.subject_id) for r, _ in labelled], val_fraction, seed)
    val = validation_keys(split)
    train = [(r, s) for r, s in labelled if (r.dataset, r.subject_id) not in val]
    index, counts = _index(train, seq_len, int(np.ceil(min_valid_fraction * seq_len)), fs_of)
    validation = tuple(validation_recordings([r for r, _ in labelled], split))
    n_val_augmented = sum(r.augmented and (r.dataset, r.subject_id) in val for r, _ in labelled)
    counts = DataCounts(n_failed=sum(r["status"] != "ok" for m in manifests for r in m.rows),
                        n_without_truth=len(recordings) - len(labelled), **counts,
                        n_val_recordings=len(validation), n_val_augmented=n_val_augmented)
    return TrainingData(split, index, validation, counts, data_fingerprint(manifests))


def _index(train: list[tuple[Recording, Scan]], seq_len: int, min_valid: int,
           fs_of: dict) -> tuple[SequenceIndex, dict]:
    """The sequences of the training recordings, and the training-side counts of DataCounts."""
    which, starts = [], []
    low = flat = 0
    for i, (_, scan) in enumerate(train):
        enough = scan.windows.n_valid >= min_valid
        keep = np.flatnonzero(enough & ~scan.windows.flat)
        low += int(np.count_nonzero(~enough))
        flat += int(np.count_nonzero(enough & scan.windows.flat))
        which.append(np.full(len(keep), i, np.int64))
        starts.append(keep.astype(np.int64) * seq_len)
    shards = tuple(Shard(fs_of[r.root], fs_of[r.root]._strip_protocol(r.shard_uri), s.segments) for r, s in train)
    shape = train[0][1].frame_shape if train else (0, 0, 3)
    index = SequenceIndex(seq_len, shape, tuple(r for r, _ in train), shards,
                          np.concatenate(which or [np.zeros(0, np.int64)]),
                          np.concatenate(starts or [np.zeros(0, np.int64)]))
    counts = dict(n_train_recordings=len(train), n_too_short=sum(s.n_frames < seq_len for _, s in train),
                  n_sequences=len(index), n_low_mask=low, n_flat=flat,
                  n_tail_frames=sum(s.n_frames % seq_len for _, s in train))
    return index, counts


# ---------------------------------------------------------------------------------------------- batches

class DataPosition(NamedTuple):
    """Where a run stands in its data: batch `batch` (0-based) of epoch `epoch`."""

    epoch: int
    batch: int


class Provenance(NamedTuple):
    """Where one batch row comes from."""

    dataset: str
    recording_id: str
    start_frame: int


class Batch(NamedTuple):
    position: DataPosition  # this batch's
    next: DataPosition  # where to resume after this batch
    arrays: dict  # {"frames": (B, T, H, W, 3) uint8, "bvp": (B, T) float32, "mask": (B, T) bool}
    provenance: tuple[Provenance, ...]  # (B,)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic): a bijection that scrambles every bit."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def epoch_order(n_sequences: int, seed: int, epoch: int) -> np.ndarray:
    """(n_sequences,) int64: the order of the sequences in an epoch, a permutation from (seed, epoch) only.

    Sorting splitmix64 keys (not numpy's Generator, whose streams may change between versions) keeps the
    order the same on every machine and numpy version; the keys are distinct, so no ties.
    """
    base = np.uint64(hash64("epoch", seed, epoch))
    return np.argsort(_splitmix64(base ^ np.arange(n_sequences, dtype=np.uint64)), kind="stable")


def batches_per_epoch(n_sequences: int, batch_size: int) -> int:
    """Full batches in an epoch: the last partial batch is dropped, so batch shapes stay fixed for jit."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return n_sequences // batch_size


def iter_batches(index: SequenceIndex, batch_size: int, seed: int, start: DataPosition = DataPosition(0, 0),
                 epochs: int | None = None, part: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
    """Batches from `start` on, through epoch `epochs - 1` (forever when None), as an uninterrupted run sees them.

    part (p, n): only the p-th of n equal, consecutive slices of every batch's rows, what process p of a
    multi-process run reads (the batch is the same whatever n). Raises ValueError when the index holds fewer
    sequences than one batch, `start` lies past an epoch, or n does not divide batch_size.
    """
    p, n = part
    if batch_size % n or not 0 <= p < n:
        raise ValueError(f"part {part}: a batch of {batch_size} does not split into {n} equal parts")
    rows = slice(p * batch_size // n, (p + 1) * batch_size // n)
    n_batches = batches_per_epoch(len(index), batch_size)
    if n_batches == 0:
        raise ValueError(f"{len(index)} training sequences: fewer than one batch of {batch_size}")
    if not (start.epoch >= 0 and 0 <= start.batch < n_batches):
        raise ValueError(f"data position {tuple(start)} is outside epochs of {n_batches} batches")
    epoch = start.epoch
    while epochs is None or epoch < epochs:
        order = epoch_order(len(index), seed, epoch)
        for b in range(start.batch if epoch == start.epoch else 0, n_batches):
            arrays, provenance = read_batch(index, order[b * batch_size:(b + 1) * batch_size][rows])
            after = DataPosition(epoch, b + 1) if b + 1 < n_batches else DataPosition(epoch + 1, 0)
            yield Batch(DataPosition(epoch, b), after, arrays, provenance)
        epoch += 1


def read_batch(index: SequenceIndex, sequence_ids: np.ndarray) -> tuple[dict, tuple[Provenance, ...]]:
    """The batch contract for these sequences, rows in the order given, and each row's provenance.

    Returns ({"frames": (B, T, H, W, 3) uint8, "bvp": (B, T) float32 z-scored (normalise_labels),
    "mask": (B, T) bool = face_found & finite truth}, provenance (B,)). Each shard is opened once and each
    row group it needs read once, whatever the order of the rows.
    """
    ids = np.asarray(sequence_ids, np.int64)
    which, starts = index.recording[ids], index.start_frame[ids]
    frames = np.zeros((len(ids), index.seq_len, *index.frame_shape), np.uint8)  # (B, T, H, W, 3)
    found = np.zeros((len(ids), index.seq_len), bool)
    bvp = np.full((len(ids), index.seq_len), np.nan, np.float32)
    for r in np.unique(which):
        rows = np.flatnonzero(which == r)
        _fill(index.recordings[r], index.shards[r], rows, starts[rows], index.seq_len, (frames, found, bvp))
    mask = found & np.isfinite(bvp)
    provenance = tuple(Provenance(index.recordings[r].dataset, index.recordings[r].recording_id, int(s))
                       for r, s in zip(which, starts))
    return {"frames": frames, "bvp": normalise_labels(bvp, mask), "mask": mask}, provenance


def _fill(rec: Recording, shard: Shard, rows: np.ndarray, starts: np.ndarray, seq_len: int, out: tuple) -> None:
    """Copies frames, face_found and bvp of windows [start, start + seq_len) of one recording into rows of out."""
    seg = shard.segments
    ends = seg.start_frame + seg.n_frames
    overlaps = (seg.start_frame[None, :] < starts[:, None] + seq_len) & (ends[None, :] > starts[:, None])
    groups = np.unique(seg.row_group[overlaps.any(axis=0)])  # only the row groups the windows touch
    filled = np.zeros(len(rows), np.int64)
    with shard.fs.open(shard.path, "rb") as f:
        parquet = pq.ParquetFile(f)
        for group in groups:
            for s in segments_of_table(parquet.read_row_group(int(group), columns=_BATCH_COLUMNS)):
                if s.recording_id != rec.recording_id:
                    continue
                for k, (row, start) in enumerate(zip(rows, starts)):
                    a, b = max(start, s.start_frame), min(start + seq_len, s.start_frame + s.n_frames)
                    if a >= b:
                        continue
                    src, dst = slice(a - s.start_frame, b - s.start_frame), slice(a - start, b - start)
                    out[0][row, dst] = s.frames[src]
                    out[1][row, dst] = s.face_found[src]
                    if s.bvp is not None:
                        out[2][row, dst] = s.bvp[src]
                    filled[k] += b - a
    if (filled != seq_len).any():  # the shard no longer matches the index: rewritten since it was built
        raise ValueError(f"{rec.shard_uri}: frames missing from an indexed sequence; rebuild the index")


def normalise_labels(bvp: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(B, T) float32: each row's bvp minus its mean over the masked-in frames, divided by their std
    (ddof 0), and 0.0 where masked out. A row with no masked-in frame, or a flat one, comes back all 0."""
    x = np.where(mask, bvp, 0.0).astype(np.float64)
    n = np.maximum(mask.sum(axis=1, keepdims=True), 1)
    centred = np.where(mask, x - x.sum(axis=1, keepdims=True) / n, 0.0)
    std = np.sqrt((centred**2).sum(axis=1, keepdims=True) / n)
    return np.divide(centred, std, out=np.zeros_like(centred), where=std > 0).astype(np.float32)
