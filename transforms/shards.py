"""Segment shards: the Parquet schema every stage reads and writes, and its streaming I/O over fsspec.

A recording becomes a run of consecutive *segments* (rows) of at most `SEGMENT_FRAMES` frames at 30 fps,
so a row stays a few MB (900 x 36 x 36 x 3 B = 3.5 MB) whatever the recording's length. Arrays are stored
as plain binary columns with their shape in columns (`n_frames`, `height`, `width`), not as
`fixed_shape_tensor` (about 25x slower to write), and are read back without copies by `np.frombuffer`.

Crops at several sizes (one per model: ME-rPPG reads 36x36, PhysMamba 128x128), all cut from the same face
box: `frames` holds the H x W crops (36x36 from preprocess), and each size of `EXTRA_CROP_SIZES` has its own
nullable column `frames_<size>` (uint8 (T, size, size, 3)), null where the job was not asked for it. A
shard's file metadata names its sizes (`pulsepipe.crop_sizes`, read by `shard_crop_sizes` from the footer
alone); shards of schema segments/1, written before the extra columns, read back with them None. With 128x128
crops a 900-frame row is 44 MB more, so every such row is a row group of its own: readers still hold one row
group (one segment) per recording at a time, and those that want only some sizes read only their columns.

    # blocks: (timestamps, crops, found, boxes, bvp); written under a temp name, renamed when complete
    write_recording("gs://b/out/shards/x.parquet", fs, meta, blocks)
    for seg in read_segments(uri, fs):     # one row group in memory at a time
        seg.frames                          # (n, 36, 36, 3) uint8 view of Arrow memory
        seg.crops(128)                      # (n, 128, 128, 3) from frames_128; None where the shard has none

Engine-free: pyarrow, numpy and fsspec only.
"""
from __future__ import annotations

import collections
import contextlib
import posixpath
import uuid
from typing import IO, Iterable, Iterator, NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transforms.resample import FPS

SEGMENT_FRAMES = 900  # 30 s at 30 fps: about 3.5 MB of 36x36 crops per row
ROW_GROUP_BYTES = 32 * 2**20  # Beam and Ray split work by row group: tens of MB each
CROP_SIZE = 36  # `frames` as preprocess writes them: the tracker's crops, ME-rPPG's and the baselines' input
EXTRA_CROP_SIZES = (128,)  # crop sizes beside `frames`'s, each in its column frames_<size> (PhysMamba's 128)
CROP_SIZES_KEY = b"pulsepipe.crop_sizes"  # file metadata: the crop sizes a shard holds, e.g. "36,128"


def doc_field(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    """A schema field with its meaning in the field's metadata (`doc`), read by whoever opens the file."""
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


def crop_column(size: int) -> str:
    """The column of crops of `size`: frames_<size> for EXTRA_CROP_SIZES, else `frames`."""
    return f"frames_{size}" if size in EXTRA_CROP_SIZES else "frames"


def shard_path(dataset: str, recording_id: str) -> str:
    """Where a recording's shard lies, relative to a job's output root."""
    return f"shards/{dataset}/{recording_id}.parquet"


# The fields that name a recording: the first of every table the jobs write (shards, manifests).
RECORDING_FIELDS = (
    doc_field("recording_id", pa.string(), "recording id, unique within the dataset"),
    doc_field("subject_id", pa.string(), "subject id"),
    doc_field("dataset", pa.string(), "layout name of the source, e.g. ubfc-rppg"),
)

SCHEMA = pa.schema(
    [
        *RECORDING_FIELDS,
        doc_field("segment_index", pa.int32(), "0, 1, 2, ... in time order within the recording"),
        doc_field("start_frame", pa.int64(), "index of the segment's first frame in the 30 fps recording"),
        doc_field("n_frames", pa.int32(), "frames in this segment (T); the last segment may be short"),
        doc_field("fps", pa.float32(), "frame rate after resampling: always 30"),
        doc_field("height", pa.int16(), "crop height H in pixels"),
        doc_field("width", pa.int16(), "crop width W in pixels"),
        doc_field("timestamps", pa.binary(), "float64 little-endian (T,): seconds from the recording start, 30 fps grid"),
        doc_field("frames", pa.binary(), "uint8 (T, H, W, 3) RGB face crops, C order"),
        *(doc_field(crop_column(size), pa.binary(),
                    f"uint8 (T, {size}, {size}, 3) RGB face crops from the same face boxes as frames, C order; "
                    f"null unless the job's crop_sizes list {size}", True) for size in EXTRA_CROP_SIZES),
        doc_field("face_found", pa.binary(), "uint8 (T,): 1 where a face was found, else 0 (crop is zeros)"),
        doc_field("face_box", pa.binary(),
               "float32 little-endian (T, 4): crop box (y0, y1, x0, x1) in source pixels, NaN without face"),
        doc_field("bvp", pa.binary(),
               "float32 little-endian (T,): ground-truth PPG on the frame times; null without truth", True),
        doc_field("source_uri", pa.string(), "URI of the source video, frame folder or array file"),
        doc_field("source_size", pa.int64(), "source size in bytes, as fsspec's info gives it"),
        doc_field("source_mtime", pa.string(), "source mtime or etag, as fsspec's info gives it"),
        doc_field("config_hash", pa.string(), "sha256 of the preprocessing config (transforms.manifest.config_hash)"),
        doc_field("package_version", pa.string(), "pulsepipe version that wrote the row"),
        doc_field("augment_scale", pa.float32(), "time-scale factor of an augmented recording; null for originals", True),
    ],
    metadata={"pulsepipe.schema": "segments/2"},  # segments/1: without the frames_<size> columns
)

# Per-recording scalars a SegmentBuilder copies onto every row (augment_scale may be left out: None).
META_FIELDS = ("recording_id", "subject_id", "dataset", "source_uri", "source_size", "source_mtime",
               "config_hash", "package_version", "augment_scale")
# Binary columns: (dtype on disk, per-frame shape given (height, width)).
_ARRAYS = {
    "timestamps": ("<f8", lambda h, w: ()),
    "frames": ("u1", lambda h, w: (h, w, 3)),
    "face_found": ("u1", lambda h, w: ()),
    "face_box": ("<f4", lambda h, w: (4,)),
    "bvp": ("<f4", lambda h, w: ()),
    **{crop_column(s): ("u1", lambda h, w, s=s: (s, s, 3)) for s in EXTRA_CROP_SIZES},
}
_SHAPE_COLUMNS = ("n_frames", "height", "width")


class Segment(collections.namedtuple("Segment", SCHEMA.names, defaults=(None,) * len(SCHEMA.names))):
    """One row of a shard: a field per SCHEMA column, in its order. Arrays are read-only views of the row's
    bytes (Arrow buffer or bytes): no copies. timestamps (T,) float64 seconds; frames (T, H, W, 3) uint8;
    face_found (T,) bool (the stored 0/1 bytes viewed as bool); face_box (T, 4) float32 (y0, y1, x0, x1);
    bvp (T,) float32; frames_<size> (T, size, size, 3) uint8 (see `crops`).

    Fields not read (read_segments(columns=...)) are None; bvp is None for recordings without truth, and
    frames_<size> for shards made without that size.
    """

    __slots__ = ()

    def crops(self, size: int) -> np.ndarray | None:
        """The (T, size, size, 3) crops: `frames` when they are that size, else its frames_<size> column;
        None where the segment has none (or that column was not read)."""
        if self.frames is not None and self.frames.shape[1:3] == (size, size):
            return self.frames
        return getattr(self, crop_column(size)) if size in EXTRA_CROP_SIZES else None

    @property
    def extra_crops(self) -> dict[int, np.ndarray]:
        """{size: crops} of the extra sizes the segment holds (for SegmentBuilder.push's `extra`)."""
        return {s: c for s in EXTRA_CROP_SIZES if (c := getattr(self, crop_column(s))) is not None}

    @classmethod
    def from_row(cls, row: dict) -> "Segment":
        """A Segment viewing a row dict whose binary columns are bytes or pyarrow Buffers (both zero-copy)."""
        values = {k: v for k, v in row.items() if k in cls._fields and k not in _ARRAYS}
        for name, (dtype, frame_shape) in _ARRAYS.items():
            buf = row.get(name)
            if buf is not None:
                shape = (row["n_frames"], *frame_shape(row["height"], row["width"]))
                arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
                values[name] = arr.view(np.bool_) if name == "face_found" else arr
        return cls(**values)


class SegmentBuilder:
    """Cuts one recording's 30 fps blocks into segment rows, in order, holding at most one segment plus a block.

    meta: the per-recording values of META_FIELDS (augment_scale may be absent for originals).
    push(timestamps (n,), crops (n, H, W, 3) uint8, face_found (n,), boxes (n, 4), bvp (n,) or None,
    extra {size: (n, size, size, 3) uint8} for sizes of EXTRA_CROP_SIZES, or None) returns the rows completed
    by the block (each `segment_frames` frames); finish() returns the final short one. The rows are the same
    however the recording is split into blocks; bvp and each extra size are given for every block or none.
    """

    def __init__(self, meta: dict, segment_frames: int = SEGMENT_FRAMES):
        missing = [k for k in META_FIELDS if k not in meta and k != "augment_scale"]
        if missing:
            raise ValueError(f"segment meta lacks {', '.join(missing)}")
        if segment_frames < 1:
            raise ValueError("segment_frames must be at least 1")
        self.meta = {k: meta.get(k) for k in META_FIELDS}
        self.segment_frames = segment_frames
        self._pending: list[tuple[np.ndarray, ...]] = []  # blocks not yet in a row, each in stored dtypes
        self._n_pending = 0
        self._next_index = 0
        self._next_frame = 0
        self._has_bvp: bool | None = None  # fixed by the first block
        self._extra_sizes: tuple[int, ...] | None = None  # likewise
        self._hw: tuple[int, int] | None = None
        self._finished = False

    def push(self, timestamps, crops, face_found, boxes, bvp=None, extra=None) -> list[dict]:
        if self._finished:
            raise RuntimeError("push after finish")
        block = self._checked(timestamps, crops, face_found, boxes, bvp, extra or {})
        if len(block[0]):
            self._pending.append(block)
            self._n_pending += len(block[0])
        if self._n_pending < self.segment_frames:
            return []
        columns = self._take_pending()
        n_full = len(columns[0]) // self.segment_frames
        rows = [self._row([c[i * self.segment_frames:(i + 1) * self.segment_frames] for c in columns])
                for i in range(n_full)]
        rest = [c[n_full * self.segment_frames:] for c in columns]
        if len(rest[0]):
            self._pending, self._n_pending = [tuple(rest)], len(rest[0])
        return rows

    def finish(self) -> list[dict]:
        """The last, short segment (if any frames are left); the builder takes no blocks after this."""
        self._finished = True
        return [self._row(self._take_pending())] if self._n_pending else []

    def _take_pending(self) -> list[np.ndarray]:
        columns = [np.concatenate(parts) if len(parts) > 1 else parts[0] for parts in zip(*self._pending)]
        self._pending, self._n_pending = [], 0
        return columns

    def _checked(self, timestamps, crops, face_found, boxes, bvp, extra: dict) -> tuple[np.ndarray, ...]:
        n = len(timestamps)
        crops = np.asarray(crops)
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[0] != n or crops.shape[3] != 3:
            raise ValueError(f"crops must be ({n}, H, W, 3) uint8, got {crops.shape} {crops.dtype}")
        if self._hw is None:
            self._hw = crops.shape[1:3]
        elif crops.shape[1:3] != self._hw:
            raise ValueError(f"crop size changed from {self._hw} to {crops.shape[1:3]}")
        if self._has_bvp is None:
            self._has_bvp = bvp is not None
        elif self._has_bvp != (bvp is not None):
            raise ValueError("bvp must be given for every block of a recording or for none")
        sizes = tuple(sorted(extra))
        if self._extra_sizes is None:
            unknown = set(sizes) - set(EXTRA_CROP_SIZES)
            if unknown:
                raise ValueError(f"extra crop sizes {sorted(unknown)} have no column; known: {EXTRA_CROP_SIZES}")
            self._extra_sizes = sizes
        elif sizes != self._extra_sizes:
            raise ValueError(f"extra crop sizes changed from {self._extra_sizes} to {sizes}")
        for size in sizes:
            c = extra[size]
            if c.dtype != np.uint8 or c.shape != (n, size, size, 3):
                raise ValueError(f"{size}x{size} crops must be ({n}, {size}, {size}, 3) uint8, got {c.shape} {c.dtype}")
        block = (
            np.asarray(timestamps, dtype="<f8").reshape(n),
            crops,
            np.asarray(face_found, dtype=bool).astype("u1").reshape(n),  # 0/1 only: readers view it as bool
            np.asarray(boxes, dtype="<f4").reshape(n, 4),
        )
        block += (np.asarray(bvp, dtype="<f4").reshape(n),) if self._has_bvp else ()
        return block + tuple(extra[size] for size in sizes)

    def _row(self, columns: list[np.ndarray]) -> dict:
        timestamps, frames, found, boxes = columns[:4]
        extra = dict(zip(self._extra_sizes, columns[4 + self._has_bvp:]))
        n = len(timestamps)
        values = dict(
            self.meta, segment_index=self._next_index, start_frame=self._next_frame, n_frames=n, fps=FPS,
            height=self._hw[0], width=self._hw[1],
            timestamps=timestamps.tobytes(),  # tobytes writes C order whatever the input's layout
            frames=frames.tobytes(), face_found=found.tobytes(), face_box=boxes.tobytes(),
            bvp=columns[4].tobytes() if self._has_bvp else None,
            **{crop_column(s): extra[s].tobytes() if s in extra else None for s in EXTRA_CROP_SIZES},
        )
        self._next_index += 1
        self._next_frame += n
        return {name: values[name] for name in SCHEMA.names}


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether fs is the local file system (paths are the OS's own)."""
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


@contextlib.contextmanager
def atomic_file(uri: str, fs: fsspec.AbstractFileSystem) -> Iterator[IO[bytes]]:
    """A binary file that appears at `uri` only when the block ends without error.

    Writes `.tmp-<uuid>-<name>` beside the target (a leading dot keeps dataset readers off it), then
    `fs.mv`: a rename on local disks; on object stores a copy whose target is never seen half-written.
    On error the temp file is removed and the target is left as it was.
    """
    parent, name = posixpath.split(uri)
    tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{name}")
    fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        fs.mv(tmp, uri)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(tmp)
        raise


def _parquet_writer(sink, schema: pa.Schema) -> pq.ParquetWriter:
    # Dictionaries and min/max statistics only pay off on the small columns; on MB-sized binary values
    # they cost time and are dropped anyway. Snappy: face crops shrink only 2-8% even with zstd, which
    # halves the read speed. No time stamps go into the file: same rows, same bytes.
    small = [f.name for f in schema if f.type != pa.binary()]
    return pq.ParquetWriter(sink, schema, use_dictionary=small, write_statistics=small, compression="snappy")


class _Aborted(Exception):
    """Thrown into atomic_file to make it drop the temp file."""


class ShardWriter:
    """Writes segment rows to one Parquet shard, atomically (see atomic_file). A context manager.

    Rows are buffered until they hold `row_group_bytes` of arrays, then written as one row group
    (`row_group_size` = that many rows), so row groups are ~row_group_bytes whatever the segment size.
    The footer names the crop sizes of the rows (CROP_SIZES_KEY), for `shard_crop_sizes`.
    """

    def __init__(self, uri: str, fs: fsspec.AbstractFileSystem, row_group_bytes: int = ROW_GROUP_BYTES):
        self.uri, self.row_group_bytes = uri, row_group_bytes
        self._stack = contextlib.ExitStack()
        self._file = self._stack.enter_context(atomic_file(uri, fs))
        self._writer = None
        try:
            self._writer = _parquet_writer(self._file, SCHEMA)
        except BaseException:
            self._stack.__exit__(_Aborted, _Aborted(), None)
            raise
        self._rows: list[dict] = []
        self._bytes = 0
        self.n_rows = 0
        self._crop_sizes: tuple[int, ...] | None = None  # of the first row; SegmentBuilder keeps them alike

    def write(self, row: dict) -> None:
        if self._crop_sizes is None:
            self._crop_sizes = row_crop_sizes(row)
        self._rows.append(row)
        self._bytes += sum(len(row[k]) for k in _ARRAYS if row.get(k) is not None)
        if self._bytes >= self.row_group_bytes:
            self._flush()

    def write_rows(self, rows: Iterable[dict]) -> None:
        for row in rows:
            self.write(row)

    def close(self) -> None:
        """Writes the last row group and the footer, then moves the file to its target."""
        if self._writer is None:
            return
        try:
            self._flush()
            if self._crop_sizes is not None:
                self._writer.add_key_value_metadata({CROP_SIZES_KEY: ",".join(map(str, self._crop_sizes))})
            self._writer.close()
        except BaseException:
            self.abort()
            raise
        self._writer = None
        self._stack.close()  # the rename; atomic_file removes the temp file itself if that fails

    def abort(self) -> None:
        """Drops everything written: nothing appears at the target."""
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        with contextlib.suppress(Exception):
            writer.close()  # a closed writer does not try again when garbage-collected
        self._stack.__exit__(_Aborted, _Aborted(), None)  # atomic_file sees an error: removes the temp file

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _flush(self) -> None:
        if self._rows:
            table = pa.Table.from_pylist(self._rows, schema=SCHEMA)
            self._writer.write_table(table, row_group_size=len(self._rows))
            self.n_rows += len(self._rows)
        self._rows, self._bytes = [], 0


def row_crop_sizes(row: dict) -> tuple[int, ...]:
    """The crop sizes a segment row holds: `frames`'s (height) and each non-null frames_<size>, ascending."""
    return tuple(sorted({int(row["height"])} | {s for s in EXTRA_CROP_SIZES if row.get(crop_column(s)) is not None}))


def shard_crop_sizes(uri: str, fs: fsspec.AbstractFileSystem) -> tuple[int, ...] | None:
    """The crop sizes a shard holds, from its footer alone (no row is read); None for a shard written
    before the footer named them (schema segments/1: `frames` only, of the height its rows say)."""
    with fs.open(uri, "rb") as f:
        value = (pq.ParquetFile(f).metadata.metadata or {}).get(CROP_SIZES_KEY)
    return None if value is None else tuple(int(v) for v in value.decode().split(",") if v)


class RecordingCounts(NamedTuple):
    n_frames: int  # 30 fps frames written
    n_face: int  # of those, frames with a face
    n_segments: int  # rows written


def write_recording(uri: str, fs: fsspec.AbstractFileSystem, meta: dict, blocks: Iterable[tuple],
                    segment_frames: int = SEGMENT_FRAMES, check=None,
                    row_group_bytes: int = ROW_GROUP_BYTES) -> RecordingCounts:
    """One recording's shard, streamed: blocks into segment rows (SegmentBuilder) into a ShardWriter.

    blocks: (timestamps (n,), crops (n, H, W, 3) uint8, face_found (n,), boxes (n, 4), bvp (n,) or None).
    Memory holds one segment plus one block whatever the recording's length. check(counts) runs once
    every block is written, before the shard appears: what it raises (or what the blocks raise) leaves
    nothing at `uri`, and a previous shard there stays as it was.
    """
    builder = SegmentBuilder(meta, segment_frames)
    n_frames = n_face = n_segments = 0
    with ShardWriter(uri, fs, row_group_bytes) as writer:
        for block in blocks:
            rows = builder.push(*block)
            writer.write_rows(rows)
            n_frames += len(block[0])
            n_face += int(np.count_nonzero(block[2]))
            n_segments += len(rows)
        rows = builder.finish()
        writer.write_rows(rows)
        counts = RecordingCounts(n_frames, n_face, n_segments + len(rows))
        if check is not None:
            check(counts)
    return counts


def segments_of_table(table: pa.Table) -> Iterator[Segment]:
    """Segments viewing a table with (some of) SCHEMA's columns; binary columns are not copied."""
    for batch in table.to_batches():
        columns = {}
        for name in batch.schema.names:
            col = batch.column(name)
            columns[name] = _value_buffers(col) if name in _ARRAYS else col.to_pylist()
        for i in range(batch.num_rows):
            yield Segment.from_row({name: values[i] for name, values in columns.items()})


def _value_buffers(arr: pa.Array) -> list[pa.Buffer | None]:
    """Each value of a binary array as a slice of the array's data buffer (no copy), None where null."""
    # pyarrow's per-value scalars (arr[i].as_buffer()) copy the bytes; slicing by the offsets does not
    _, offsets, data = arr.buffers()
    offset_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    ends = np.frombuffer(offsets, offset_type)[arr.offset:arr.offset + len(arr) + 1].tolist()
    valid = arr.is_valid().to_pylist()
    data = data if data is not None else pa.py_buffer(b"")
    return [data.slice(a, b - a) if ok else None for a, b, ok in zip(ends[:-1], ends[1:], valid)]


def read_segments(uri: str, fs: fsspec.AbstractFileSystem, columns: list[str] | None = None) -> Iterator[Segment]:
    """Segments of a shard in file order, one row group in memory at a time.

    columns: a subset of SCHEMA's names to read (the shape columns are added when an array is asked for).
    Columns the file lacks (frames_<size> in a shard of an older schema) come back None.
    """
    if columns is not None:
        unknown = set(columns) - set(SCHEMA.names)
        if unknown:
            raise ValueError(f"unknown columns {sorted(unknown)}")
        if any(c in _ARRAYS for c in columns):
            columns = list(columns) + [c for c in _SHAPE_COLUMNS if c not in columns]
    with fs.open(uri, "rb") as f:
        parquet = pq.ParquetFile(f)
        if columns is not None:
            columns = [c for c in columns if c in parquet.schema_arrow.names]
        for i in range(parquet.num_row_groups):
            yield from segments_of_table(parquet.read_row_group(i, columns=columns))
