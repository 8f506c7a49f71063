"""The run manifest: `OUT/manifest.parquet`, one row per source recording, ok or failed (the dead letters).

A re-run skips a recording whose previous row is `ok` with the same fingerprint (sizes and mtimes/etags
of all its source files, plus the config hash) and whose shard is still the one the row describes (its
size, config hash and source: `shard_problem`), and redoes failed and changed ones: `up_to_date`.
"skipped" is a run-time notion (a row carried over unchanged), never a stored status.

A row is the latest *good* result of its recording: when an attempt fails while the previous shard still
describes the same source (same `source_fingerprint`, the shard intact), the row stays `ok` with that shard
and its old fingerprint, and `latest_failure` says why the attempt failed; the next run tries again.

Engine-free: pyarrow and fsspec only.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from transforms.shards import RECORDING_FIELDS, atomic_file, doc_field, read_segments

STATUSES = ("ok", "failed")
# fs.info keys that date or version a file, in order of preference: mtime (local disk, sftp, gcsfs),
# LastModified (s3fs), updated (GCS JSON), ETag/etag (http, stores without a time), created (memory://).
VERSION_KEYS = ("mtime", "LastModified", "updated", "ETag", "etag", "created")


MANIFEST_SCHEMA = pa.schema(
    [
        *RECORDING_FIELDS,
        doc_field("source_uri", pa.string(), "URI of the recording's video, frame folder or array file"),
        doc_field("status", pa.string(), "ok or failed"),
        doc_field("reason", pa.string(), "why it failed; null when ok", True),
        doc_field("n_source_frames", pa.int64(), "frames decoded from the source at its own rate", True),
        doc_field("n_frames", pa.int64(), "frames after resampling to 30 fps", True),
        doc_field("duration_s", pa.float64(), "n_frames / 30", True),
        doc_field("n_segments", pa.int32(), "rows of the recording in its shard", True),
        doc_field("face_fraction", pa.float32(), "fraction of 30 fps frames with a face", True),
        doc_field("fingerprint", pa.string(), "sha256 of the source files' sizes and mtimes/etags and the config hash"),
        doc_field("config_hash", pa.string(), "sha256 of the preprocessing config"),
        doc_field("shard", pa.string(), "shard path relative to OUT; null when failed", True),
        doc_field("metadata_json", pa.string(), "the recording's metadata from its layout, as JSON"),
        doc_field("elapsed_s", pa.float64(), "wall time spent on the recording", True),
        doc_field("shard_bytes", pa.int64(), "size of the shard when written; null when failed", True),
        doc_field("source_fingerprint", pa.string(), "sha256 of what the shard is made from, without the config",
                  True),
        doc_field("latest_failure", pa.string(), "why the latest attempt failed while this ok row kept its "
                  "previous shard; null otherwise", True),
    ],
    metadata={"pulsepipe.schema": "manifest/1"},
)


def package_version() -> str:
    """The installed pulsepipe's version, which every shard row and report records."""
    try:
        return importlib.metadata.version("pulsepipe")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


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


def source_fingerprint(files: list[tuple[str, int, str]]) -> str:
    """The fingerprint of the source files alone: equal while only the config changes."""
    return fingerprint(files, "")


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


def manifest_uri(root: str) -> str:
    """Where an output root's manifest lies."""
    return f"{root.rstrip('/')}/manifest.parquet"


class ManifestError(ValueError):
    """A manifest that cannot be read; str names its path."""


def read_manifest(uri: str, fs: fsspec.AbstractFileSystem) -> list[dict]:
    """The manifest's rows in stored order; [] when there is no manifest yet. Columns added since a file was
    written read as null. ManifestError (naming `uri`) for a file that is not a readable manifest."""
    if not fs.exists(uri):
        return []
    try:
        with fs.open(uri, "rb") as f:
            return pq.read_table(f, schema=MANIFEST_SCHEMA).to_pylist()
    except (OSError, ValueError, pa.ArrowException) as e:  # a damaged file: ArrowInvalid, a folder: OSError
        raise ManifestError(f"{uri}: not a readable manifest ({type(e).__name__}: "
                            f"{' '.join(str(e).split())})") from None


def by_recording(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Manifest rows keyed by (dataset, recording_id)."""
    return {(r["dataset"], r["recording_id"]): r for r in rows}


def shard_problem(row: dict, fs: fsspec.AbstractFileSystem, root: str) -> str | None:
    """Why an ok row's shard is not the one the row describes, or None when it is: it must exist, have the
    size the row recorded (`shard_bytes`, when known) and hold the row's segments, all with the row's config
    hash and source. A shard deleted, truncated or replaced since (an interrupted run) fails this."""
    uri = f"{root.rstrip('/')}/{row['shard']}"
    try:
        size = fs.size(uri)
        if row.get("shard_bytes") is not None and size != row["shard_bytes"]:
            return f"{uri}: {size} bytes, the manifest says {row['shard_bytes']}"
        segments = [s for s in read_segments(uri, fs, columns=["recording_id", "config_hash", "source_uri"])
                    if s.recording_id == row["recording_id"]]
    except FileNotFoundError:
        return f"{uri}: missing"
    except (OSError, ValueError, pa.ArrowException) as e:
        return f"{uri}: unreadable ({type(e).__name__}: {' '.join(str(e).split())})"
    if row.get("n_segments") is not None and len(segments) != row["n_segments"]:
        return f"{uri}: {len(segments)} segments of {row['recording_id']}, the manifest says {row['n_segments']}"
    if any(s.config_hash != row["config_hash"] for s in segments):
        return f"{uri}: written with another config than the manifest row's"
    if any(s.source_uri != row["source_uri"] for s in segments):
        return f"{uri}: made from another source than {row['source_uri']}"
    return None


def remove_stale_shards(previous: list[dict], rows: list[dict], fs, root: str) -> None:
    """Delete shards named by the previous manifest that no ok row of the new one names.

    A recording gone from the source, failed this time, or no longer chosen must not leave its old shard
    behind for readers of OUT/shards to find.
    """
    live = {r["shard"] for r in rows if r["status"] == "ok"}
    for old in previous:
        if old.get("shard") and old["shard"] not in live and fs.exists(f"{root}/{old['shard']}"):
            fs.rm(f"{root}/{old['shard']}")
