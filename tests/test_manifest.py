"""The run manifest: round trip, order, validation, fingerprints and source stats."""
from __future__ import annotations

import json
import os
import uuid

import fsspec
import pytest

from transforms.manifest import (
    MANIFEST_SCHEMA, ManifestError, by_recording, config_hash, fingerprint, read_manifest, shard_problem, source_stats,
    up_to_date, write_manifest,
)


def _row(dataset: str, rid: str, status: str = "ok", **extra) -> dict:
    ok = status == "ok"
    return dict(
        recording_id=rid, subject_id=rid.split("-")[0], dataset=dataset, source_uri=f"/src/{rid}.avi", status=status,
        reason=None if ok else "VideoError: cannot decode", n_source_frames=750 if ok else None,
        n_frames=900 if ok else None, duration_s=30.0 if ok else None, n_segments=1 if ok else None,
        face_fraction=0.5 if ok else None, fingerprint=f"fp-{rid}", config_hash="c0ffee",
        shard=f"shards/{dataset}/{rid}.parquet" if ok else None, metadata_json=json.dumps({"skin": 3}),
        elapsed_s=1.5, shard_bytes=4096 if ok else None, source_fingerprint=f"src-{rid}", latest_failure=None,
        **extra,
    )


@pytest.fixture(params=["file", "memory"])
def target(request, tmp_path):
    if request.param == "file":
        yield fsspec.filesystem("file"), str(tmp_path)
    else:
        fs, root = fsspec.filesystem("memory"), f"memory://test-manifest-{uuid.uuid4().hex}"
        yield fs, root
        if fs.exists(root):
            fs.rm(root, recursive=True)


def test_round_trip_sorted_by_dataset_and_recording(target):
    fs, root = target
    rows = [_row("ubfc-rppg", "s2-r1"), _row("pure", "s9-r1", "failed"), _row("ubfc-rppg", "s1-r2"),
            _row("pure", "s1-r1")]
    uri = f"{root}/manifest.parquet"
    write_manifest(rows, uri, fs)
    back = read_manifest(uri, fs)
    assert [(r["dataset"], r["recording_id"]) for r in back] == [
        ("pure", "s1-r1"), ("pure", "s9-r1"), ("ubfc-rppg", "s1-r2"), ("ubfc-rppg", "s2-r1")]
    assert back[1] == _row("pure", "s9-r1", "failed")
    assert back[0] == _row("pure", "s1-r1")
    assert list(back[0]) == MANIFEST_SCHEMA.names
    assert fs.ls(root, detail=False) == [fs._strip_protocol(uri)]  # no temp file left


def test_absent_manifest_reads_as_empty(target):
    fs, root = target
    assert read_manifest(f"{root}/manifest.parquet", fs) == []


def test_rewrite_replaces_and_bad_rows_leave_the_old_manifest(tmp_path):
    fs, uri = fsspec.filesystem("file"), str(tmp_path / "manifest.parquet")
    write_manifest([_row("pure", "a")], uri, fs)
    write_manifest([_row("pure", "b")], uri, fs)
    assert [r["recording_id"] for r in read_manifest(uri, fs)] == ["b"]
    for bad, match in [
        ([_row("pure", "c", status="skipped")], "status"),
        ([{**_row("pure", "c"), "reason": "why"}], "reason"),
        ([_row("pure", "c", status="failed") | {"reason": None}], "reason"),
        ([_row("pure", "c"), _row("pure", "c")], "twice"),
        ([{**_row("pure", "c"), "fingerprint": None}], "lacks fingerprint"),
    ]:
        with pytest.raises(ValueError, match=match):
            write_manifest(bad, uri, fs)
    assert [r["recording_id"] for r in read_manifest(uri, fs)] == ["b"]
    assert os.listdir(tmp_path) == ["manifest.parquet"]


def test_config_hash_is_canonical():
    a = config_hash({"fps": 30, "crop": {"size": 36, "detect_every": 5}})
    assert a == config_hash({"crop": {"detect_every": 5, "size": 36}, "fps": 30})
    assert a != config_hash({"fps": 30, "crop": {"size": 36, "detect_every": 4}})
    assert len(a) == 64 and int(a, 16) >= 0


def test_fingerprint_changes_with_size_mtime_or_config_only():
    files = [("gs://b/s1/vid.avi", 1000, "2024-01-01T00:00:00+00:00"), ("gs://b/s1/gt.txt", 20, "1700000000.0")]
    base = fingerprint(files, "c1")
    assert fingerprint(list(reversed(files)), "c1") == base  # order of the files does not matter
    assert fingerprint([tuple(f) for f in files], "c1") == base
    assert fingerprint([files[0], ("gs://b/s1/gt.txt", 21, "1700000000.0")], "c1") != base
    assert fingerprint([files[0], ("gs://b/s1/gt.txt", 20, "1700000001.0")], "c1") != base
    assert fingerprint(files, "c2") != base
    assert fingerprint(files[:1], "c1") != base


def test_source_stats_follow_the_files(tmp_path):
    fs = fsspec.filesystem("file")
    path = tmp_path / "vid.avi"
    path.write_bytes(b"x" * 10)
    os.utime(path, (1_700_000_000, 1_700_000_000))
    [(uri, size, version)] = source_stats([str(path)], fs)
    assert (uri, size, float(version)) == (str(path), 10, 1_700_000_000.0)
    fp = fingerprint(source_stats([str(path)], fs), "c")
    assert fingerprint(source_stats([str(path)], fs), "c") == fp  # stable while nothing changes
    os.utime(path, (1_700_000_100, 1_700_000_100))
    assert fingerprint(source_stats([str(path)], fs), "c") != fp
    with pytest.raises(FileNotFoundError):
        source_stats([str(tmp_path / "missing.avi")], fs)


def test_source_stats_on_memory_use_the_creation_time():
    fs, uri = fsspec.filesystem("memory"), f"memory://test-manifest-{uuid.uuid4().hex}/v.avi"
    fs.pipe(uri, b"abc")
    try:
        [(_, size, version)] = source_stats([uri], fs)
        assert size == 3 and version == fs.info(uri)["created"].isoformat()
    finally:
        fs.rm(uri)


def test_up_to_date_keeps_only_unchanged_successes():
    rows = by_recording([_row("pure", "a"), _row("pure", "b", "failed")])
    assert up_to_date(rows[("pure", "a")], "fp-a")
    assert not up_to_date(rows[("pure", "a")], "fp-other")
    assert not up_to_date(rows[("pure", "b")], "fp-b")  # failed ones are redone
    assert not up_to_date(rows.get(("pure", "new")), "fp-new")


def test_a_frame_folder_changes_when_any_frame_inside_changes(tmp_path):
    fs = fsspec.filesystem("file")
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"x" * (i + 1))
    before = source_stats([str(folder)], fs)
    assert before[0][1] == 6
    (folder / "1.png").write_bytes(b"yy")
    os.utime(folder / "1.png", (1_000_000, 1_000_000))
    assert source_stats([str(folder)], fs) != before


def _written_shard(root, config_hash: str = "c0ffee", source_uri: str = "/src/a.avi") -> dict:
    """A two-segment shard of recording `a` under root, and the ok manifest row a job writes for it."""
    import numpy as np

    from transforms.shards import shard_path, write_recording

    fs, shard = fsspec.filesystem("file"), shard_path("pure", "a")
    meta = {"recording_id": "a", "subject_id": "s1", "dataset": "pure", "source_uri": source_uri, "source_size": 10,
            "source_mtime": "1", "config_hash": config_hash, "package_version": "test"}
    n = 50
    block = (np.arange(n) / 30, np.zeros((n, 4, 4, 3), np.uint8), np.ones(n, bool), np.zeros((n, 4), np.float32), None)
    counts = write_recording(f"{root}/{shard}", fs, meta, [block], segment_frames=30)
    return {**_row("pure", "a"), "source_uri": source_uri, "config_hash": config_hash, "shard": shard,
            "n_segments": counts.n_segments, "shard_bytes": fs.size(f"{root}/{shard}")}


def test_shard_problem_accepts_the_shard_a_row_describes_and_says_what_differs(tmp_path):
    fs, root = fsspec.filesystem("file"), str(tmp_path)
    row = _written_shard(root)
    path = tmp_path / row["shard"]
    assert shard_problem(row, fs, root) is None
    assert shard_problem({**row, "shard_bytes": None}, fs, root) is None  # a manifest from before the column
    assert "says 7" in shard_problem({**row, "shard_bytes": 7}, fs, root)
    assert "written with another config" in shard_problem({**row, "config_hash": "other"}, fs, root)
    assert "another source" in shard_problem({**row, "source_uri": "/src/b.avi"}, fs, root)
    assert "segments of a" in shard_problem({**row, "n_segments": 5}, fs, root)
    path.write_bytes(path.read_bytes()[: row["shard_bytes"] // 2])
    assert "bytes, the manifest says" in shard_problem(row, fs, root)
    assert "unreadable" in shard_problem({**row, "shard_bytes": None}, fs, root)  # truncated: no footer
    path.unlink()
    assert shard_problem(row, fs, root).endswith("missing")


def test_a_damaged_manifest_is_an_error_naming_it_not_an_empty_one(tmp_path):
    fs, uri = fsspec.filesystem("file"), str(tmp_path / "manifest.parquet")
    write_manifest([_row("pure", "a")], uri, fs)
    data = (tmp_path / "manifest.parquet").read_bytes()
    (tmp_path / "manifest.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError, match=f"^{uri}: not a readable manifest"):
        read_manifest(uri, fs)


def test_a_manifest_from_before_the_new_columns_reads_them_as_null(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    new = ("shard_bytes", "source_fingerprint", "latest_failure")
    old = pa.schema([f for f in MANIFEST_SCHEMA if f.name not in new])
    row = {k: v for k, v in _row("pure", "a").items() if k in old.names}
    pq.write_table(pa.Table.from_pylist([row], schema=old), tmp_path / "manifest.parquet")
    [back] = read_manifest(str(tmp_path / "manifest.parquet"), fsspec.filesystem("file"))
    assert back == {**row, "shard_bytes": None, "source_fingerprint": None, "latest_failure": None}
