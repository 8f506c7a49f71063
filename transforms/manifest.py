"""The run manifest: `OUT/manifest.parquet`, one row per source recording, ok or failed (the dead letters).

A re-run skips a recording whose previous row is `ok` with the same fingerprint (sizes and mtimes/etags
of all its source files, plus the config hash) and redoes failed and changed ones: `up_to_date`.
"skipped" is a run-time notion (a row carried over unchanged), never a stored status.

Engine-free: pyarrow and fsspec only.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import sys
import time

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from transforms.shards import atomic_file

STATUSES = ("ok", "failed")
# fs.info keys that date or version a file, in order of preference: mtime (local disk, sftp, gcsfs),
# LastModified (s3fs), updated (GCS JSON), ETag/etag (http, stores without a time), created (memory://).
VERSION_KEYS = ("mtime", "LastModified", "updated", "ETag", "etag", "created")


def _field(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


MANIFEST_SCHEMA = pa.schema(
    [
        _field("recording_id", pa.string(), "recording id, unique within the dataset"),
        _field("subject_id", pa.string(), "subject id"),
        _field("dataset", pa.string(), "layout name"),
        _field("source_uri", pa.string(), "URI of the recording's video, frame folder or array file"),
        _field("status", pa.string(), "ok or failed"),
        _field("reason", pa.string(), "why it failed; null when ok", True),
        _field("n_source_frames", pa.int64(), "frames decoded from the source at its own rate", True),
        _field("n_frames", pa.int64(), "frames after resampling to 30 fps", True),
        _field("duration_s", pa.float64(), "n_frames / 30", True),
        _field("n_segments", pa.int32(), "rows of the recording in its shard", True),
        _field("face_fraction", pa.float32(), "fraction of 30 fps frames with a face", True),
        _field("fingerprint", pa.string(), "sha256 of the source files' sizes and mtimes/etags and the config hash"),
        _field("config_hash", pa.string(), "sha256 of the preprocessing config"),
        _field("shard", pa.string(), "shard path relative to OUT; null when failed", True),
        _field("metadata_json", pa.string(), "the recording's metadata from its layout, as JSON"),
        _field("elapsed_s", pa.float64(), "wall time spent on the recording", True),
    ],
    metadata={"pulsepipe.schema": "manifest/1"},
)


def canonical_json(obj) -> str:
    """JSON with sorted keys and no spaces: equal objects give equal strings (and hashes)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def config_hash(config: dict) -> str:
    """sha256 hex of the config's canonical JSON."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def fingerprint(files: list[tuple[str, int, str]], config_hash: str) -> str:
    """sha256 hex of (uri, size, mtime-or-etag) of every source file, in any order, and the config hash."""
    entries = sorted([str(uri), int(size), None if version is None else str(version)] for uri, size, version in files)
    return hashlib.sha256(canonical_json({"files": entries, "config_hash": config_hash}).encode()).hexdigest()


def source_stats(uris: list[str], fs: fsspec.AbstractFileSystem) -> list[tuple[str, int, str | None]]:
    """(uri, size, version) per uri from `fs.info`; version is the first of VERSION_KEYS the filesystem
    gives, as a string (datetimes in ISO format), or None when it gives none (then only the size counts).
    Raises FileNotFoundError for a missing file.
    """
    stats = []
    for uri in uris:
        info = fs.info(uri)
        if info.get("type") == "directory":
            # a frame folder changes when any frame does: its version covers every file inside
            inside = sorted((name, *_size_version(i)) for name, i in fs.find(uri, detail=True).items())
            version = hashlib.sha256(canonical_json(inside).encode()).hexdigest()
            stats.append((uri, sum(size for _, size, _ in inside), version))
        else:
            stats.append((uri, *_size_version(info)))
    return stats


def _size_version(info: dict) -> tuple[int, str | None]:
    version = next((info[k] for k in VERSION_KEYS if info.get(k) is not None), None)
    if isinstance(version, dt.datetime):
        version = version.isoformat()
    return int(info.get("size") or 0), None if version is None else str(version)


def up_to_date(previous: dict | None, fingerprint: str) -> bool:
    """Whether a recording's previous manifest row can be kept: it succeeded with the same fingerprint."""
    return previous is not None and previous["status"] == "ok" and previous["fingerprint"] == fingerprint


def fill_row(row: dict, work, expected: tuple[type[Exception], ...], where: str) -> dict:
    """A manifest row filled by `work() -> fields`: `ok`, or `failed` with the reason, never dropped.

    expected: errors whose message already names the file and the reason; any other exception is a bug and
    is reported as `where: internal error: ...`. Adds `elapsed_s` and prints one progress line to stderr.
    """
    started = time.perf_counter()
    try:
        row.update(work())
        row.update(status="ok", reason=None)
    except expected as e:
        row.update(status="failed", reason=str(e))
    except Exception as e:  # noqa: BLE001 - a bug must not drop the recording: it becomes a dead letter
        row.update(status="failed", reason=f"{where}: internal error: {type(e).__name__}: {e}")
    row["elapsed_s"] = round(time.perf_counter() - started, 3)
    print(f"  {row['dataset']}/{row['recording_id']}: {row['status']}"
          + (f" ({row['reason']})" if row["reason"] else f", {row['n_frames']} frames"), file=sys.stderr)
    return row


def write_manifest(rows: list[dict], uri: str, fs: fsspec.AbstractFileSystem) -> None:
    """Writes the manifest atomically, rows sorted by (dataset, recording_id); missing nullable fields are null.

    Raises ValueError for a row without a required field, an unknown status, a failed row without reason
    or an ok row with one, or a (dataset, recording_id) given twice.
    """
    required = [f.name for f in MANIFEST_SCHEMA if not f.nullable]
    for row in rows:
        missing = [k for k in required if row.get(k) is None]
        if missing:
            raise ValueError(f"{row.get('recording_id')}: manifest row lacks {', '.join(missing)}")
        status, reason = row.get("status"), row.get("reason")
        if status not in STATUSES:
            raise ValueError(f"{row.get('recording_id')}: status {status!r} is not one of {STATUSES}")
        if (status == "ok") != (reason is None):
            raise ValueError(f"{row.get('recording_id')}: an ok row has no reason, a failed row has one")
    rows = sorted(rows, key=lambda r: (r["dataset"], r["recording_id"]))
    keys = [(r["dataset"], r["recording_id"]) for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError("a recording appears twice in the manifest")
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    with atomic_file(uri, fs) as f:
        pq.write_table(table, f, compression="zstd")


def read_manifest(uri: str, fs: fsspec.AbstractFileSystem) -> list[dict]:
    """The manifest's rows in stored order; [] when there is no manifest yet."""
    if not fs.exists(uri):
        return []
    with fs.open(uri, "rb") as f:
        return pq.read_table(f, schema=MANIFEST_SCHEMA).to_pylist()


def by_recording(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Manifest rows keyed by (dataset, recording_id)."""
    return {(r["dataset"], r["recording_id"]): r for r in rows}


def remove_stale_shards(previous: list[dict], rows: list[dict], fs, root: str) -> None:
    """Delete shards named by the previous manifest that no ok row of the new one names.

    A recording gone from the source, failed this time, or no longer chosen must not leave its old shard
    behind for readers of OUT/shards to find.
    """
    live = {r["shard"] for r in rows if r["status"] == "ok"}
    for old in previous:
        if old.get("shard") and old["shard"] not in live and fs.exists(f"{root}/{old['shard']}"):
            fs.rm(f"{root}/{old['shard']}")
