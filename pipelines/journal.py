"""What a run leaves to resume from: one record per finished item, written as it finishes.

    OUT/.pulsepipe-journal/<run key>/<item key>.json

The run key is a hash of the step and its settings, the item key a hash of the item itself (its
fingerprint included), so a record only ever stands for the same work asked again. A worker writes an
item's record once the item is complete (its shard in place), atomically (a temp name, then a move),
one small file per item, so the same holds on object stores, where nothing can be appended. A driver
killed at any moment leaves only whole records; the re-run with the same command reads them
(`finished`), checks them as the job requires (a shard still there as recorded) and redoes the rest.
The run that completes removes the journal (`clear`) with the temp files killed writers left
(`remove_temp_files`).
"""
from __future__ import annotations

import hashlib
import json
import posixpath

import fsspec

from transforms.manifest import canonical_json
from transforms.shards import atomic_file

FOLDER = ".pulsepipe-journal"
TEMP_PREFIXES = (".tmp-", ".pulsepipe-results-")  # atomic_file's temp names; Beam's hand-over to the driver


def key(obj) -> str:
    """A short hash naming what obj (JSON-able) holds."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:32]


def run_uri(output_uri: str, step_name: str, step_kwargs: dict) -> str:
    """The journal folder of a run of step_name with step_kwargs on output_uri."""
    return f"{output_uri.rstrip('/')}/{FOLDER}/{key({'step': step_name, 'kwargs': step_kwargs})}"


def record_uri(journal_uri: str, item: dict) -> str:
    return f"{journal_uri}/{key(item)}.json"


def write_record(uri: str, result) -> None:
    """The finished item's result, whole or not at all."""
    fs, path = fsspec.core.url_to_fs(uri)
    with atomic_file(path, fs) as f:
        f.write(json.dumps(result, sort_keys=True).encode())


def finished(journal_uri: str, items: list[dict]) -> dict[int, dict]:
    """{position in items: recorded result} for the items the journal holds a record of."""
    fs, folder = fsspec.core.url_to_fs(journal_uri)
    if not fs.exists(folder):
        return {}
    present = {posixpath.basename(p) for p in fs.ls(folder, detail=False)}
    wanted = {i: f"{folder}/{key(item)}.json" for i, item in enumerate(items)
              if f"{key(item)}.json" in present}
    texts = fs.cat(list(wanted.values())) if wanted else {}
    by_path = {fs._strip_protocol(p): t for p, t in texts.items()}
    return {i: json.loads(by_path[fs._strip_protocol(p)]) for i, p in wanted.items()}


def clear(output_uri: str) -> None:
    """Remove the output's journal, every run's: what completes a run supersedes them all."""
    fs, root = fsspec.core.url_to_fs(output_uri)
    folder = f"{root.rstrip('/')}/{FOLDER}"
    if fs.exists(folder):
        fs.rm(folder, recursive=True)


def remove_temp_files(output_uri: str, folders=()) -> None:
    """Remove what writers killed mid-file left in the output root and in its sub-folders `folders`: temp
    files that never became their targets. Only the run holding the output's lock may call this."""
    fs, root = fsspec.core.url_to_fs(output_uri)
    root = root.rstrip("/")
    for folder in [root, *(f"{root}/{sub}" for sub in sorted(folders))]:
        if not fs.isdir(folder):
            continue
        for path in fs.ls(folder, detail=False):
            if posixpath.basename(path).startswith(TEMP_PREFIXES) and fs.isfile(path):
                fs.rm(path)
