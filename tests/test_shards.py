"""Segment shards: round trips on disk and memory://, zero-copy reads, segmenting, atomic and deterministic writes."""
from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shard_helpers import read_recording
from transforms.resample import FPS
from transforms.shards import (
    SCHEMA, RecordingCounts, Segment, SegmentBuilder, ShardWriter, read_segments, segments_of_table, write_recording,
)

SEG = 50  # small segments keep the tests fast; the default (900) is only a number


def _meta(rid: str, augment_scale=None) -> dict:
    return dict(recording_id=rid, subject_id=rid.split("-")[0], dataset="synthetic", source_uri=f"/src/{rid}/video.avi",
                source_size=1234, source_mtime="1700000000.5", config_hash="c0ffee", package_version="0.1.0",
                augment_scale=augment_scale)


def _recording(seed: int, n: int, with_bvp: bool, hw=(36, 36)):
    """Arrays of one 30 fps recording: t (n,), crops (n, H, W, 3), found (n,), boxes (n, 4), bvp (n,) or None."""
    rng = np.random.default_rng(seed)
    found = rng.random(n) > 0.2
    boxes = np.where(found[:, None], rng.uniform(0, 400, (n, 4)), np.nan)
    crops = rng.integers(0, 256, (n, *hw, 3), dtype=np.uint8) * found[:, None, None, None].astype(np.uint8)
    bvp = rng.standard_normal(n) if with_bvp else None
    return np.arange(n) / FPS, crops, found, boxes, bvp


def _blocks(arrays, sizes):
    """The recording cut into blocks of the given sizes (the last takes the rest)."""
    t, crops, found, boxes, bvp = arrays
    edges = np.cumsum([0, *sizes, len(t)]).clip(max=len(t))
    for a, b in zip(edges[:-1], edges[1:]):
        if b > a or len(t) == 0:
            yield t[a:b], crops[a:b], found[a:b], boxes[a:b], None if bvp is None else bvp[a:b]


def _rows(meta, blocks):
    """The segment rows of one recording pushed block by block through a SegmentBuilder."""
    builder = SegmentBuilder(meta, SEG)
    rows = [row for block in blocks for row in builder.push(*block)]
    return rows + builder.finish()


# (recording_id, frames, with bvp, augment scale): lengths not a multiple of SEG, one exact, one short
RECORDINGS = [("s001-r01", 137, True, None), ("s001-r02", 100, False, None), ("s002-r01", 23, True, 1.25)]


def _all_rows():
    rows, arrays = [], {}
    for i, (rid, n, with_bvp, scale) in enumerate(RECORDINGS):
        arrays[rid] = _recording(i, n, with_bvp)
        rows += _rows(_meta(rid, scale), _blocks(arrays[rid], [64] * 10))
    return rows, arrays


@pytest.fixture(params=["file", "memory"])
def target(request, tmp_path):
    """(fs, directory URI) on a temporary local dir and on a fresh memory:// dir."""
    if request.param == "file":
        yield fsspec.filesystem("file"), str(tmp_path)
    else:
        fs, root = fsspec.filesystem("memory"), f"memory://test-shards-{uuid.uuid4().hex}"
        yield fs, root
        fs.rm(root, recursive=True)


def test_schema_documents_every_column_and_stores_arrays_as_binary():
    assert all(f.metadata and f.metadata[b"doc"] for f in SCHEMA)
    binary = {f.name for f in SCHEMA if f.type == pa.binary()}
    assert binary == {"timestamps", "frames", "frames_128", "face_found", "face_box", "bvp"}
    assert [f.name for f in SCHEMA if f.nullable] == ["frames_128", "bvp", "augment_scale"]
    assert list(Segment._fields) == SCHEMA.names


def test_round_trip(target):
    fs, root = target
    rows, arrays = _all_rows()
    uri = f"{root}/shards/part-0.parquet"
    with ShardWriter(uri, fs, row_group_bytes=100_000) as writer:
        writer.write_rows(rows)
    assert writer.n_rows == len(rows)
    assert fs.ls(f"{root}/shards", detail=False) == [fs._strip_protocol(uri)]  # no temp file left

    segments = list(read_segments(uri, fs))
    order = [(r["recording_id"], r["segment_index"]) for r in rows]
    assert [(s.recording_id, s.segment_index) for s in segments] == order
    for rid, n, with_bvp, scale in RECORDINGS:
        t, crops, found, boxes, bvp = arrays[rid]
        own = [s for s in segments if s.recording_id == rid]
        assert [s.n_frames for s in own] == [SEG] * (n // SEG) + ([n % SEG] if n % SEG else [])
        assert [s.start_frame for s in own] == list(np.cumsum([0] + [s.n_frames for s in own[:-1]]))
        assert all(s.fps == 30.0 and (s.height, s.width) == (36, 36) and s.augment_scale == scale for s in own)
        assert all(s.source_mtime == "1700000000.5" and s.source_size == 1234 for s in own)
        np.testing.assert_array_equal(np.concatenate([s.timestamps for s in own]), t)
        np.testing.assert_array_equal(np.concatenate([s.frames for s in own]), crops)
        np.testing.assert_array_equal(np.concatenate([s.face_found for s in own]), found)
        np.testing.assert_array_equal(np.concatenate([s.face_box for s in own]), boxes.astype(np.float32))
        if with_bvp:
            np.testing.assert_array_equal(np.concatenate([s.bvp for s in own]), bvp.astype(np.float32))
        else:
            assert all(s.bvp is None for s in own)

        whole = read_recording(uri, fs, rid)
        assert (whole.n_frames, whole.start_frame, whole.frames.shape) == (n, 0, (n, 36, 36, 3))
        np.testing.assert_array_equal(whole.frames, crops)
        assert whole.face_found.dtype == np.bool_ and whole.face_box.shape == (n, 4)


def test_frames_are_views_of_arrow_memory(tmp_path):
    fs, uri = fsspec.filesystem("file"), str(tmp_path / "a.parquet")
    write_recording(uri, fs, _meta("s001-r01"), [_recording(0, 120, True)], SEG)
    with fs.open(uri, "rb") as f:
        table = pq.ParquetFile(f).read_row_group(0)
    frames_data = np.frombuffer(table.column("frames").chunks[0].buffers()[2], np.uint8)  # the column's data buffer
    for seg in segments_of_table(table):
        for arr in (seg.frames, seg.timestamps, seg.face_box, seg.bvp, seg.face_found):
            assert not arr.flags.owndata and not arr.flags.writeable
        assert np.shares_memory(seg.frames, frames_data)
    root = next(read_segments(uri, fs)).frames
    while isinstance(root, np.ndarray):  # down the chain of views to the memory's owner
        root = root.base
    assert isinstance(root, pa.Buffer)


def test_columns_subset_reads_only_those(tmp_path):
    fs, uri = fsspec.filesystem("file"), str(tmp_path / "a.parquet")
    write_recording(uri, fs, _meta("s001-r01"), [_recording(0, 120, False)], SEG)
    segs = list(read_segments(uri, fs, columns=["recording_id", "face_found"]))
    assert [s.n_frames for s in segs] == [50, 50, 20]  # shape columns come along with an array
    assert segs[0].frames is None and segs[0].face_found.shape == (50,) and segs[0].config_hash is None
    with pytest.raises(ValueError, match="unknown columns"):
        list(read_segments(uri, fs, columns=["nope"]))


@pytest.mark.parametrize("sizes", [[1] * 7 + [3, 200, 5], [49, 1, 50, 37], [SEG], [10_000]])
def test_uneven_blocks_give_the_same_rows_as_one_block(sizes):
    arrays = _recording(3, 237, True)
    whole = _rows(_meta("s003-r01"), [arrays])
    assert _rows(_meta("s003-r01"), _blocks(arrays, sizes)) == whole
    assert [r["n_frames"] for r in whole] == [50, 50, 50, 50, 37]


def test_builder_emits_full_segments_as_they_complete_and_checks_its_input():
    t, crops, found, boxes, bvp = _recording(4, 130, False)
    builder = SegmentBuilder(_meta("s004-r01"), segment_frames=SEG)
    assert builder.push(t[:40], crops[:40], found[:40], boxes[:40]) == []
    assert [r["segment_index"] for r in builder.push(t[40:130], crops[40:130], found[40:130], boxes[40:130])] == [0, 1]
    assert [(r["segment_index"], r["start_frame"], r["n_frames"]) for r in builder.finish()] == [(2, 100, 30)]
    with pytest.raises(RuntimeError):
        builder.push(t[:1], crops[:1], found[:1], boxes[:1])
    builder = SegmentBuilder(_meta("s004-r01"), segment_frames=SEG)
    builder.push(t[:5], crops[:5], found[:5], boxes[:5])
    with pytest.raises(ValueError, match="bvp"):
        builder.push(t[:5], crops[:5], found[:5], boxes[:5], np.zeros(5))
    with pytest.raises(ValueError, match="crop size"):
        builder.push(t[:5], crops[:5, :30], found[:5], boxes[:5])
    with pytest.raises(ValueError, match="lacks"):
        SegmentBuilder({"recording_id": "x"})
    assert SegmentBuilder(_meta("empty")).finish() == []


def test_an_error_inside_the_writer_leaves_nothing(target):
    fs, root = target
    uri = f"{root}/shards/part-0.parquet"
    rows, _ = _all_rows()
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(uri, fs, row_group_bytes=10_000) as writer:
            writer.write_rows(rows)  # several row groups already in the temp file
            raise RuntimeError("boom")
    assert not fs.exists(uri) and fs.ls(f"{root}/shards", detail=False) == []


def test_an_existing_shard_survives_a_failed_rewrite(tmp_path):
    fs, uri = fsspec.filesystem("file"), str(tmp_path / "a.parquet")
    rows, _ = _all_rows()
    with ShardWriter(uri, fs) as writer:
        writer.write_rows(rows)
    before = fs.cat(uri)
    with pytest.raises(pa.ArrowInvalid):
        with ShardWriter(uri, fs) as writer:
            writer.write_rows([{**rows[0], "frames": "not bytes", "n_frames": "x"}])
    assert fs.cat(uri) == before and fs.ls(str(tmp_path), detail=False) == [uri]


def test_row_groups_hold_about_the_bytes_asked_for(tmp_path):
    fs, uri = fsspec.filesystem("file"), str(tmp_path / "a.parquet")
    rows = _rows(_meta("s005-r01"), [_recording(5, 1000, True)])  # 20 rows of ~200 kB
    row_bytes = sum(len(rows[0][k]) for k in ("timestamps", "frames", "face_found", "face_box", "bvp"))
    with ShardWriter(uri, fs, row_group_bytes=4 * row_bytes) as writer:
        writer.write_rows(rows)
    meta = pq.ParquetFile(uri).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4] * 5
    assert meta.metadata[b"pulsepipe.schema"] == b"segments/2"  # the Arrow schema (with docs) travels in the file


def test_same_rows_give_identical_bytes(target):
    fs, root = target
    rows, _ = _all_rows()
    for name in ("a", "b"):
        with ShardWriter(f"{root}/{name}.parquet", fs, row_group_bytes=50_000) as writer:
            writer.write_rows(rows)
    assert fs.cat(f"{root}/a.parquet") == fs.cat(f"{root}/b.parquet")


def test_read_recording_needs_an_id_for_a_mixed_shard_and_finds_gaps(tmp_path):
    fs, uri = fsspec.filesystem("file"), str(tmp_path / "a.parquet")
    rows, _ = _all_rows()
    own = [r for r in rows if r["recording_id"] == "s001-r01"]

    def write(rows):
        with ShardWriter(uri, fs) as writer:
            writer.write_rows(rows)

    write(rows)
    with pytest.raises(ValueError, match="several recordings"):
        read_recording(uri, fs)
    write([own[0], own[2]])
    with pytest.raises(ValueError, match="does not follow"):
        read_recording(uri, fs)
    write(own[1:])
    with pytest.raises(ValueError, match="first segment"):
        read_recording(uri, fs)


def test_write_recording_streams_blocks_into_one_shard_and_counts_them(target):
    fs, root = target
    uri = f"{root}/shards/s006-r01.parquet"
    arrays = _recording(6, 137, True)
    counts = write_recording(uri, fs, _meta("s006-r01"), _blocks(arrays, [64] * 10), SEG, row_group_bytes=100_000)
    assert counts == RecordingCounts(n_frames=137, n_face=int(arrays[2].sum()), n_segments=3)
    assert [(s.segment_index, s.n_frames) for s in read_segments(uri, fs)] == [(0, 50), (1, 50), (2, 37)]
    np.testing.assert_array_equal(read_recording(uri, fs).frames, arrays[1])
    assert fs.ls(f"{root}/shards", detail=False) == [fs._strip_protocol(uri)]  # no temp file left


def test_write_recording_check_runs_before_the_shard_appears(tmp_path):
    fs, uri = fsspec.filesystem("file"), str(tmp_path / "a.parquet")
    seen = []
    write_recording(uri, fs, _meta("s007-r01"), [_recording(7, 120, False)], SEG, check=seen.append)
    assert seen == [RecordingCounts(120, int(_recording(7, 120, False)[2].sum()), 3)]
    before = fs.cat(uri)

    def refuse(counts):
        assert not fs.exists(uri) or fs.cat(uri) == before  # the new shard is not in place yet
        raise ValueError("too few faces")

    with pytest.raises(ValueError, match="too few faces"):
        write_recording(uri, fs, _meta("s007-r01"), [_recording(8, 60, False)], SEG, check=refuse)
    assert fs.cat(uri) == before and fs.ls(str(tmp_path), detail=False) == [uri]
