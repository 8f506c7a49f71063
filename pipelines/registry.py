"""A model registry for `pulsepipe refresh`: versions, the champion pointer, the history, the frozen split.

    REGISTRY/                  a local folder or any fsspec URI (gs://...; credentials from the environment)
      models/<version>/        v0001, v0002, ...: best.weights.h5 + best.state.npz (a train run folder's best
                               weights, so `me-chunk:REGISTRY/models/<version>` loads as a run folder does),
                               model_card.json, config.json, curves.png (train's); metrics.parquet, report.html +
                               report/ (evaluate's, on the held-out split); refresh.html (the refresh report);
                               refresh.json (recipe, data fingerprint, lineage, decision), written LAST: a
                               version without it is an unfinished write and is ignored (and replaced)
      champion                 the champion's version name, one line, replaced whole (atomic_file: temp +
                               rename, or a copy of the whole temp object): readers see the old or the new
      history.parquet          one row per refresh (HISTORY_SCHEMA), failed ones too, replaced whole
      split.json               the held-out subjects, frozen by the first version
      .pulsepipe.lock          while a refresh runs (pipelines.lock)

`model.weights.weights_path` resolves a local REGISTRY to models/<champion>/, so evaluate, infer and live
take a registry wherever they take weights.
"""
from __future__ import annotations

import json
import posixpath
import shutil
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from model.weights import CHAMPION, VERSIONS
from transforms.shards import atomic_file, is_local

VERSION_INFO = "refresh.json"
SPLIT = "split.json"
HISTORY = "history.parquet"
# what a version keeps of its train run folder (weights, card, settings, curves) and of its evaluation
RUN_FILES = ("best.weights.h5", "best.state.npz", "best.json", "model_card.json", "config.json", "curves.png")
EVAL_FILES = ("metrics.parquet", "report.html")
HISTORY_SCHEMA = pa.schema([
    ("refresh_id", pa.string()), ("started", pa.string()), ("seconds", pa.float64()),
    ("status", pa.string()),  # ok, failed
    ("decision", pa.string()),  # promoted, kept, nothing changed, failed
    ("reason", pa.string()), ("phase", pa.string()),  # the phase that failed, else null
    ("champion_before", pa.string()), ("champion_after", pa.string()), ("candidate", pa.string()),
    ("data_fingerprint", pa.string()), ("recordings_added", pa.int64()), ("changes_json", pa.string()),
    ("candidate_mae", pa.float64()), ("candidate_mae_lo", pa.float64()), ("candidate_mae_hi", pa.float64()),
    ("champion_mae", pa.float64()), ("champion_mae_lo", pa.float64()), ("champion_mae_hi", pa.float64()),
    ("report", pa.string()), ("command", pa.string()),
])


def version_name(number: int) -> str:
    return f"v{number:04d}"


class Registry:
    """One registry root; every read and write of it goes through here."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(uri)
        self.root = root.rstrip("/")
        self.local = is_local(self.fs)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _read_json(self, *parts: str) -> dict | None:
        try:
            with self.fs.open(self._path(*parts), "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def _write_json(self, obj: dict, *parts: str) -> None:
        with atomic_file(self._path(*parts), self.fs) as f:
            f.write((json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())

    # ---- the champion and the versions

    def champion(self) -> str | None:
        try:
            with self.fs.open(self._path(CHAMPION), "r") as f:
                return f.read().strip() or None
        except FileNotFoundError:
            return None

    def promote(self, version: str) -> None:
        """The champion pointer replaced whole, pointing at `version` (which must be complete)."""
        if self.info(version) is None:
            raise ValueError(f"{self.uri}: version {version} is not complete")
        with atomic_file(self._path(CHAMPION), self.fs) as f:  # replaced whole: readers see one or the other
            f.write(f"{version}\n".encode())

    def info(self, version: str) -> dict | None:
        """A complete version's refresh.json, None for an absent or unfinished one."""
        return self._read_json(VERSIONS, version, VERSION_INFO)

    def versions(self) -> list[str]:
        """The complete versions, oldest first."""
        if not self.fs.isdir(self._path(VERSIONS)):
            return []
        names = sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self._path(VERSIONS), detail=False))
        return [n for n in names if self.fs.isfile(self._path(VERSIONS, n, VERSION_INFO))]

    def next_version(self) -> str:
        done = self.versions()
        return version_name(int(done[-1][1:]) + 1 if done else 1)

    def add_version(self, version: str, run_dir: Path, eval_dir: Path, refresh_html: str, info: dict) -> str:
        """Write models/<version>/ from the train run folder, the evaluation folder and the refresh report,
        refresh.json last; returns the version's URI. An unfinished earlier write of it is replaced."""
        target = self._path(VERSIONS, version)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)
        self.fs.makedirs(target, exist_ok=True)
        files = [run_dir / n for n in RUN_FILES] + [eval_dir / n for n in EVAL_FILES]
        for src in [f for f in files if f.is_file()]:
            self.fs.put_file(str(src), posixpath.join(target, src.name))
        if (eval_dir / "report").is_dir():
            self.fs.makedirs(posixpath.join(target, "report"), exist_ok=True)
            for png in sorted((eval_dir / "report").iterdir()):
                self.fs.put_file(str(png), posixpath.join(target, "report", png.name))
        self.fs.pipe_file(posixpath.join(target, "refresh.html"), refresh_html.encode())
        self._write_json(info, VERSIONS, version, VERSION_INFO)
        return f"{self.uri}/{VERSIONS}/{version}"

    def local_folder(self, version: str, cache: Path) -> Path:
        """A local folder holding the version's weights (h5py reads local files): the version itself on a
        local registry, else a copy under `cache` (made once: versions never change once complete)."""
        if self.local:
            return Path(self._path(VERSIONS, version))
        folder = cache / version
        if not (folder / RUN_FILES[0]).is_file():
            shutil.rmtree(folder, ignore_errors=True)
            tmp = cache / f".{version}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name in RUN_FILES:
                src = self._path(VERSIONS, version, name)
                if self.fs.isfile(src):
                    self.fs.get_file(src, str(tmp / name))
            tmp.rename(folder)
        return folder

    # ---- the frozen split and the history

    def split(self) -> dict | None:
        return self._read_json(SPLIT)

    def freeze_split(self, split: dict) -> None:
        self._write_json(split, SPLIT)

    def history(self) -> list[dict]:
        try:
            with self.fs.open(self._path(HISTORY), "rb") as f:
                return pq.read_table(f, schema=HISTORY_SCHEMA).to_pylist()
        except FileNotFoundError:
            return []

    def append_history(self, row: dict) -> None:
        """history.parquet with `row` added, replaced whole (a reader never sees half a file)."""
        rows = self.history() + [{k: row.get(k) for k in HISTORY_SCHEMA.names}]
        with atomic_file(self._path(HISTORY), self.fs) as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA), f)
