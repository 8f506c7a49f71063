"""The skeleton that preprocess and augment share: items that each write one recording's shard, and the
manifest that records every item, `ok` or `failed` with its reason.

    with lock.claimed_output(output_uri, wait_for_lock):         # writable, and this run's alone
        previous = manifest_rows(output_uri)                      # JobError for a damaged manifest
        todo, kept = plan(candidates, previous, output_uri)       # keeps what is unchanged and intact
        rows, done = run(Step, step_kwargs, todo, kept, previous, opts, output_uri)
    log(summary({...counts...}, done, rows=rows))

A step's `__call__` returns `fill_row(row, work, where)`: the row filled by `work()` (ending with
`shard_fields`), or failed with the reason, never dropped.

A good shard stays until a run succeeds for it, while it still shows its source: an attempt that fails
(a config change, a crash) keeps the previous shard and its ok row, with the failure in `latest_failure`,
when the source is unchanged (`settled`); a source that changed and now fails loses its old shard, which
shows files that are gone. A run whose every attempt failed alike for a reason of the job's changes
nothing (`failed_alike`).
"""
from __future__ import annotations

import posixpath
import time
from concurrent.futures import ThreadPoolExecutor

import fsspec

from pipelines import journal
from pipelines.console import progress
from pipelines.engines import EngineOptions, run_step, step_ref
from pipelines.errors import JobError
from transforms.errors import ItemFailed
from transforms.manifest import (MANIFEST_SCHEMA, ManifestError, by_recording, manifest_uri, read_manifest,
                                 remove_stale_shards, shard_problem, up_to_date, write_manifest)
from transforms.resample import FPS
from transforms.shards import shard_path

VERIFY_THREADS = 8  # checking kept shards reads only their footers and small columns: I/O bound
INTERNAL = "internal error"  # how fill_row names a failure that is no fault of the item: a bug, the environment


def fill_row(row: dict, work, where: str) -> dict:
    """A manifest row filled by `work() -> fields`: `ok`, or `failed` with the reason, never dropped.

    ItemFailed's message already names the file and the reason; any other exception is a bug, reported as
    `where: internal error: ...`. Adds `elapsed_s` and prints the item's progress line.
    """
    started = time.perf_counter()
    try:
        row.update(work())
        row.update(status="ok", reason=None)
    except ItemFailed as e:
        row.update(status="failed", reason=str(e))
    except Exception as e:  # noqa: BLE001 - a bug must not drop the recording: it becomes a dead letter
        row.update(status="failed", reason=f"{where}: {INTERNAL}: {type(e).__name__}: {e}")
    row["elapsed_s"] = round(time.perf_counter() - started, 3)
    progress(f"{row['dataset']}/{row['recording_id']}: {row['status']}"
             + (f" ({row['reason']})" if row["reason"] else f", {row['n_frames']} frames"))
    return row


def failing(reason: str):
    """A `work` for fill_row that fails with reason, which names the file."""
    def work() -> dict:
        raise ItemFailed(reason)
    return work


def shard_fields(counts, fs, root: str, shard: str) -> dict:
    """The manifest fields of a shard just written (counts: transforms.shards.RecordingCounts), with its
    size, which later runs check before they trust it."""
    return {"n_frames": counts.n_frames, "duration_s": counts.n_frames / FPS, "n_segments": counts.n_segments,
            "face_fraction": counts.n_face / max(counts.n_frames, 1), "shard": shard,
            "shard_bytes": fs.size(f"{root.rstrip('/')}/{shard}")}


def manifest_rows(root_uri: str) -> list[dict]:
    """The manifest rows of an output root, [] where it has none; JobError naming a manifest that cannot
    be read (a damaged file is not taken for an empty output: that would redo and delete everything)."""
    fs, root = fsspec.core.url_to_fs(root_uri)
    try:
        return read_manifest(manifest_uri(root), fs)
    except ManifestError as e:
        raise JobError(f"{e}; move it away to start afresh (every recording is then made again)") from None


def plan(candidates: list[tuple[tuple[str, str], dict]], previous: list[dict], output_uri: str | None = None
         ) -> tuple[list[dict], list[dict]]:
    """Work items, and the previous rows to keep: those `ok` with the same fingerprint (`up_to_date`) whose
    shard under output_uri is still the one they describe (`shard_problem`); a shard deleted, truncated or
    replaced since is made again. Without output_uri (no output yet) shards are not checked.

    candidates: ((dataset, recording_id), work item with its `fingerprint`) pairs.
    """
    before = by_recording(previous)
    unchanged = {key: before[key] for key, item in candidates if up_to_date(before.get(key), item["fingerprint"])}
    problems = _shard_problems(unchanged, output_uri) if output_uri else {}
    todo, kept = [], []
    for key, item in candidates:
        if key in unchanged and not problems.get(key):
            kept.append(unchanged[key])
        else:
            todo.append(item)
            if problems.get(key):
                progress(f"{key[0]}/{key[1]}: made again: {problems[key]}")
    return todo, kept


def _shard_problems(rows: dict[tuple[str, str], dict], output_uri: str) -> dict[tuple[str, str], str | None]:
    fs, root = fsspec.core.url_to_fs(output_uri)
    with ThreadPoolExecutor(VERIFY_THREADS) as pool:
        found = list(pool.map(lambda r: shard_problem(r, fs, root), rows.values()))
    return dict(zip(rows, found))


def run(step_cls, step_kwargs: dict, todo: list[dict], kept: list[dict], previous: list[dict],
        opts: EngineOptions, output_uri: str) -> tuple[list[dict], list[dict]]:
    """Run the step on the work items, settle each attempt against its previous row (`settled`), remove the
    shards no row names any more and write the manifest. Returns (every manifest row, the attempts' rows).

    JobError, with nothing removed and the manifest as it was, when every attempt failed alike for a reason
    of the job's (`failed_alike`).
    """
    fs, root = fsspec.core.url_to_fs(output_uri)
    results = _run_resumable(step_cls, step_kwargs, todo, opts, output_uri)
    done = [{**r, "source_fingerprint": item.get("source_fingerprint")} for item, r in zip(todo, results)]
    before = by_recording(previous)
    reason = failed_alike(done, before)
    if reason:
        journal.clear(output_uri)  # nothing to resume from: the next run tries them all again
        raise JobError(f"all {len(done)} recordings to make failed the same way, so this run changed nothing "
                       f"(no shard removed, the manifest as it was): {reason}")
    rows = [{**manifest_row(r), "latest_failure": None} for r in kept]  # up to date: no failure is the latest
    rows += [settled(r, before.get((r["dataset"], r["recording_id"])), fs, root) for r in done]
    remove_stale_shards(previous, rows, fs, root)
    write_manifest(rows, manifest_uri(root), fs)
    journal.clear(output_uri)  # the manifest now holds every result
    journal.remove_temp_files(output_uri, {posixpath.dirname(shard_path(r["dataset"], r["recording_id"]))
                                           for r in rows})
    return rows, done


def _run_resumable(step_cls, step_kwargs: dict, todo: list[dict], opts: EngineOptions, output_uri: str
                   ) -> list[dict]:
    """The step's results for the work items, each recorded in the run's journal as it finishes. Items
    that an interrupted run with the same step and settings finished are taken from its journal when
    their shard is still the one recorded (`shard_problem`); only the others run."""
    journal_uri = journal.run_uri(output_uri, step_ref(step_cls), step_kwargs)
    recorded = journal.finished(journal_uri, todo)
    problems = _shard_problems({i: r for i, r in recorded.items() if r["status"] == "ok"}, output_uri)
    finished = {i: r for i, r in recorded.items() if not problems.get(i)}
    if finished:
        progress(f"{len(finished)} of {len(todo)} taken from the journal of an interrupted run")
    fresh = iter(run_step(step_cls, step_kwargs, [item for i, item in enumerate(todo) if i not in finished], opts,
                          output_uri, journal_uri))
    return [finished[i] if i in finished else next(fresh) for i in range(len(todo))]


def failed_alike(done: list[dict], before: dict[tuple[str, str], dict]) -> str | None:
    """The reason when two or more attempts all failed alike (the same reason once the file each names
    first is left out) for a fault of the job: an internal error (a bug, the environment), or recordings that
    had succeeded before (`before`: previous rows by key). New recordings that fail alike, say two corrupt
    videos, are dead letters like any other. Else None."""
    if len(done) < 2 or any(r["status"] == "ok" for r in done):
        return None
    causes = {r["reason"].split(": ", 1)[-1] for r in done}
    if len(causes) != 1:
        return None
    had_succeeded = any(before.get((r["dataset"], r["recording_id"]), {}).get("status") == "ok" for r in done)
    return " ".join(done[0]["reason"].split()) if had_succeeded or causes.pop().startswith(INTERNAL) else None


def settled(attempt: dict, old: dict | None, fs, root: str) -> dict:
    """The manifest row after an attempt: the attempt's own, or, when it failed while the previous ok row's
    shard still describes the same source and is intact, that previous row with the failure as its
    `latest_failure` (readers keep the last good result; the next run tries again, the fingerprints
    differing). A source that changed and now fails loses its old shard: it shows files that are gone."""
    keeps = (attempt["status"] == "failed" and old is not None and old["status"] == "ok"
             and old.get("source_fingerprint") is not None
             and old["source_fingerprint"] == attempt.get("source_fingerprint")
             and shard_problem(old, fs, root) is None)
    return {**manifest_row(old), "latest_failure": attempt["reason"]} if keeps else manifest_row(attempt)


def manifest_row(row: dict) -> dict:
    """The row with exactly the manifest's fields (null where it has none)."""
    return {name: row.get(name) for name in MANIFEST_SCHEMA.names}


def summary(counts: dict[str, object], done: list[dict], notes: list[str] = (), rows: list[dict] = ()) -> str:
    """A one-line table of `counts` (header: value), then the notes, then one line per failed item (saying
    so when the manifest `rows` keep its previous shard)."""
    cells = {k: f"{v:.1f}" if isinstance(v, float) else str(v) for k, v in counts.items()}
    widths = {k: max(len(k) + 2, len(v) + 2, 8) for k, v in cells.items()}
    lines = ["".join(f"{k:>{widths[k]}}" for k in cells), "".join(f"{v:>{widths[k]}}" for k, v in cells.items())]
    lines += list(notes)
    kept_old = {(r["dataset"], r["recording_id"]) for r in rows if r.get("latest_failure")}
    lines += [f"failed: {r['recording_id']}: {r['reason']}"
              + ("; its previous shard is kept" if (r["dataset"], r["recording_id"]) in kept_old else "")
              for r in done if r["status"] == "failed"]
    return "\n".join(lines)
