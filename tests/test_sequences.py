"""Training data: subject split, sequences across segments, mask and labels, seeded resumable batches, fingerprint,
and reads that touch only the row groups a batch needs."""
from __future__ import annotations

import json
import uuid
import zlib
from typing import NamedTuple

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from shard_helpers import read_recording
from transforms.manifest import read_manifest, write_manifest
from transforms.resample import FPS
from transforms.sequences import (
    DATA_SETTINGS, LABEL_NORM, DataPosition, batches_per_epoch, build_training_data, data_fingerprint, epoch_order,
    iter_batches, load_manifests, normalise_labels, read_batch, split_subjects,
)
from transforms.shards import read_segments, shard_path, write_recording

SEG = 100  # small segments: every 160-frame sequence spans two or three of them
T = 160


class Spec(NamedTuple):
    dataset: str
    subject_id: str
    recording_id: str
    n_frames: int
    truth: bool = True


def _arrays(seed: int, n: int, truth: bool):
    """One recording: t (n,), crops (n, 36, 36, 3), found (n,), boxes (n, 4), bvp (n,) with NaN gaps, or None."""
    rng = np.random.default_rng(seed)
    found = rng.random(n) > 0.15
    crops = rng.integers(0, 256, (n, 36, 36, 3), dtype=np.uint8) * found[:, None, None, None].astype(np.uint8)
    boxes = np.where(found[:, None], 10.0, np.nan) * np.ones((n, 4))
    bvp = np.sin(np.arange(n) / FPS * 2 * np.pi * 1.2) * 3 + 5 + rng.standard_normal(n) * 0.1
    bvp[rng.random(n) < 0.1] = np.nan  # truth missing here and there: masked
    return np.arange(n) / FPS, crops, found, boxes, bvp if truth else None


def _write_root(fs, root: str, specs: list[Spec], row_group_bytes: int = 1, failed: tuple[str, ...] = ()) -> None:
    """Shards and a manifest under root; row_group_bytes=1 makes every segment its own row group."""
    rows = []
    for i, spec in enumerate(specs):
        meta = dict(recording_id=spec.recording_id, subject_id=spec.subject_id, dataset=spec.dataset,
                    source_uri=f"/src/{spec.recording_id}", source_size=1, source_mtime="1", config_hash="c",
                    package_version="0", augment_scale=1.2 if "@x" in spec.recording_id else None)
        arrays = _arrays(zlib.crc32(f"{spec.dataset}/{spec.recording_id}".encode()), spec.n_frames, spec.truth)
        shard = shard_path(spec.dataset, spec.recording_id)
        write_recording(f"{root}/{shard}", fs, meta, [arrays], segment_frames=SEG, row_group_bytes=row_group_bytes)
        rows.append(_manifest_row(spec, shard=shard, n_frames=spec.n_frames))
    rows += [_manifest_row(Spec("synthetic", "s999", rid, 0), status="failed", reason="broken") for rid in failed]
    write_manifest(rows, f"{root}/manifest.parquet", fs)


def _manifest_row(spec: Spec, **values) -> dict:
    row = dict(recording_id=spec.recording_id, subject_id=spec.subject_id, dataset=spec.dataset,
               source_uri=f"/src/{spec.recording_id}", status="ok", fingerprint=f"fp-{spec.recording_id}",
               config_hash="c", metadata_json="{}")
    return {**row, **values}


@pytest.fixture(params=["file", "memory"])
def place(request, tmp_path):
    """(fs, a fresh directory URI) on local disk and on memory://."""
    if request.param == "file":
        yield fsspec.filesystem("file"), str(tmp_path)
    else:
        fs, root = fsspec.filesystem("memory"), f"memory://seq-{uuid.uuid4().hex}"
        yield fs, root
        fs.rm(root, recursive=True)


# (recording lengths: 357 spans 4 segments with a 37-frame tail; 480 is exact; 120 is too short for T)
SPECS = [Spec("synthetic", "s001", "s001-r01", 357), Spec("synthetic", "s001", "s001-r02", 480),
         Spec("synthetic", "s002", "s002-r01", 120), Spec("other", "s001", "s001-r01", 330),
         Spec("synthetic", "s003", "s003-r01", 400, truth=False)]


# ------------------------------------------------------------------------------------------------ split

def test_split_is_stable_when_subjects_are_added_and_writable():
    keys = [("synthetic", f"s{i:03d}") for i in range(60)]
    split = split_subjects(keys, 0.3, seed=1)
    bigger = split_subjects(keys + [("pure", f"p{i:02d}") for i in range(40)], 0.3, seed=1)
    assert set(map(tuple, split["val"])) <= set(map(tuple, bigger["val"]))
    assert set(map(tuple, split["train"])) <= set(map(tuple, bigger["train"]))
    assert 5 < len(split["val"]) < 30 and split["val"] == sorted(split["val"])
    assert split_subjects(list(reversed(keys)) * 2, 0.3, seed=1) == split  # order and repeats do not matter
    assert split_subjects(keys, 0.3, seed=2)["val"] != split["val"]
    assert json.loads(json.dumps(split)) == split


def test_split_keeps_both_sides_non_empty_and_checks_the_fraction():
    two = [("d", "a"), ("d", "b")]
    tiny = split_subjects(two, 1e-12, seed=0)
    assert len(tiny["val"]) == 1 and len(tiny["train"]) == 1
    assert split_subjects(two, 0.0, seed=0)["val"] == []
    single = split_subjects([("d", "a")], 0.9, seed=0)
    assert (single["train"], single["val"]) == ([["d", "a"]], [])  # one subject: it trains
    most = split_subjects([("d", s) for s in "abc"], 0.999999, seed=0)
    assert len(most["train"]) == 1 and len(most["val"]) == 2
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="val_fraction"):
            split_subjects(two, bad, seed=0)


def test_augmented_copies_follow_their_subject_and_stay_out_of_validation(place):
    fs, base = place
    subjects = [f"s{i:03d}" for i in range(8)]
    _write_root(fs, f"{base}/pre", [Spec("synthetic", s, f"{s}-r01", 200) for s in subjects])
    _write_root(fs, f"{base}/aug", [Spec("synthetic", s, f"{s}-r01@x1.200", 170) for s in subjects])
    data = build_training_data([f"{base}/pre", f"{base}/aug"], seq_len=T, val_fraction=0.5, seed=3)
    val = {s for _, s in data.split["val"]}
    assert val and len(val) < len(subjects)
    assert {r.subject_id for r in data.index.recordings} == set(subjects) - val
    assert sum(r.augmented for r in data.index.recordings) == len(subjects) - len(val)  # copies train with them
    assert sorted(r.recording_id for r in data.validation) == sorted(f"{s}-r01" for s in val)
    assert data.counts.n_val_augmented == len(val) and data.counts.n_val_recordings == len(val)
    for rec in data.validation:  # the trainer opens these URIs itself for whole-recording inference
        rec_fs, path = fsspec.core.url_to_fs(rec.shard_uri)
        assert {s.recording_id for s in read_segments(path, rec_fs, columns=["recording_id"])} == {rec.recording_id}


def test_no_ground_truth_is_a_clear_error(place):
    fs, base = place
    _write_root(fs, base, [Spec("folder", "s001", "s001-r01", 200, truth=False)])
    with pytest.raises(ValueError, match="no recording has ground truth"):
        build_training_data([base], seq_len=T, val_fraction=0.2, seed=0)


# ------------------------------------------------------------------------------------------- sequences

@pytest.mark.parametrize("row_group_bytes", [1, 2**30], ids=["group-per-segment", "one-group"])
def test_sequences_equal_the_source_frames_across_segments(place, row_group_bytes):
    fs, base = place
    _write_root(fs, base, SPECS, row_group_bytes=row_group_bytes, failed=("s009-r01",))
    data = build_training_data([base], seq_len=T, val_fraction=0.0, seed=0, min_valid_fraction=0.1)
    c = data.counts
    assert (c.n_failed, c.n_without_truth, c.n_train_recordings, c.n_too_short) == (1, 1, 4, 1)
    assert c.n_sequences == 2 + 3 + 0 + 2 and c.n_tail_frames == 37 + 0 + 120 + 10
    assert c.n_low_mask == c.n_flat == 0
    index = data.index
    starts = sorted((index.recordings[r].dataset, index.recordings[r].recording_id, s)
                    for r, s in zip(index.recording, index.start_frame))
    assert starts == [("other", "s001-r01", 0), ("other", "s001-r01", 160), ("synthetic", "s001-r01", 0),
                      ("synthetic", "s001-r01", 160), ("synthetic", "s001-r02", 0), ("synthetic", "s001-r02", 160),
                      ("synthetic", "s001-r02", 320)]
    arrays, provenance = read_batch(index, np.arange(len(index))[::-1])  # any order, rows as asked
    for row, (dataset, rid, start) in enumerate(provenance):
        ref = read_recording(f"{base}/{shard_path(dataset, rid)}", fs)  # brute force: every segment joined
        window = slice(start, start + T)
        mask = ref.face_found[window] & np.isfinite(ref.bvp[window])
        np.testing.assert_array_equal(arrays["frames"][row], ref.frames[window])
        np.testing.assert_array_equal(arrays["mask"][row], mask)
        np.testing.assert_allclose(arrays["bvp"][row], normalise_labels(ref.bvp[None, window], mask[None])[0])
    assert arrays["frames"].shape == (7, T, 36, 36, 3) and arrays["frames"].dtype == np.uint8
    assert arrays["bvp"].dtype == np.float32 and arrays["mask"].dtype == bool


def test_labels_are_zscored_over_masked_frames_and_zero_elsewhere():
    rng = np.random.default_rng(0)
    bvp = (rng.standard_normal((3, T)) * 4 + 7).astype(np.float32)
    bvp[0, :20] = np.nan
    mask = rng.random((3, T)) > 0.3
    mask &= np.isfinite(bvp)
    z = normalise_labels(bvp, mask)
    assert z.dtype == np.float32 and np.all(z[~mask] == 0.0)
    for row in range(3):
        kept = bvp[row][mask[row]].astype(np.float64)
        np.testing.assert_allclose(z[row][mask[row]], (kept - kept.mean()) / kept.std(), rtol=1e-5, atol=1e-6)
        assert abs(z[row][mask[row]].mean()) < 1e-5 and abs(z[row][mask[row]].std() - 1) < 1e-5
    assert np.all(normalise_labels(np.ones((1, T), np.float32), np.ones((1, T), bool)) == 0)  # flat: no division
    assert LABEL_NORM == DATA_SETTINGS["label_norm"] == "zscore-per-sequence"


def test_windows_without_enough_usable_frames_or_with_flat_truth_are_skipped(tmp_path):
    fs, base = fsspec.filesystem("file"), str(tmp_path)
    _write_root(fs, base, [Spec("synthetic", "s001", "s001-r01", 3 * T)])
    uri = f"{base}/{shard_path('synthetic', 's001-r01')}"
    ref = read_recording(uri, fs)
    bvp, found = ref.bvp.copy(), ref.face_found.copy()
    found[:T] = False  # window 0: no face at all
    bvp[T:2 * T] = np.where(np.isfinite(bvp[T:2 * T]), 1.5, np.nan)  # window 1: flat truth
    meta = dict(recording_id="s001-r01", subject_id="s001", dataset="synthetic", source_uri="/src", source_size=1,
                source_mtime="1", config_hash="c", package_version="0")
    write_recording(uri, fs, meta, [(ref.timestamps, ref.frames, found, ref.face_box, bvp)], segment_frames=SEG)
    data = build_training_data([base], seq_len=T, val_fraction=0.0, seed=0)
    assert (data.counts.n_low_mask, data.counts.n_flat, data.counts.n_sequences) == (1, 1, 1)
    assert list(data.index.start_frame) == [2 * T]


def test_seq_len_must_be_a_multiple_of_160(tmp_path):
    for bad in (0, 100, 1800):
        with pytest.raises(ValueError, match="multiple of 160"):
            build_training_data([str(tmp_path)], seq_len=bad, val_fraction=0.0, seed=0)


# ----------------------------------------------------------------------------------------------- batches

def test_epoch_order_is_a_permutation_from_seed_and_epoch_only():
    order = epoch_order(1000, seed=5, epoch=0)
    assert sorted(order) == list(range(1000))
    np.testing.assert_array_equal(order, epoch_order(1000, seed=5, epoch=0))
    assert not np.array_equal(order, epoch_order(1000, seed=5, epoch=1))
    assert not np.array_equal(order, epoch_order(1000, seed=6, epoch=0))
    assert epoch_order(10, seed=0, epoch=0).tolist() == PINNED_ORDER  # same on every machine and numpy version


PINNED_ORDER = [8, 0, 6, 3, 2, 1, 5, 7, 4, 9]


def test_resuming_from_a_position_gives_the_batches_of_an_uninterrupted_run(tmp_path):
    fs, base = fsspec.filesystem("file"), str(tmp_path)
    _write_root(fs, base, SPECS)
    index = build_training_data([base], seq_len=T, val_fraction=0.0, seed=0, min_valid_fraction=0.1).index
    assert batches_per_epoch(len(index), 3) == 2  # 7 sequences: the partial batch of 1 is dropped
    run = list(iter_batches(index, 3, seed=11, epochs=3))
    assert [b.position for b in run] == [DataPosition(e, b) for e in range(3) for b in range(2)]
    assert [b.next for b in run[:-1]] == [b.position for b in run[1:]]
    epochs = [[p for b in run if b.position.epoch == e for p in b.provenance] for e in range(3)]
    assert all(len(set(e)) == 6 for e in epochs) and epochs[0] != epochs[1]  # distinct rows, reshuffled
    for k in (1, 2, 3):
        resumed = list(iter_batches(index, 3, seed=11, start=run[k - 1].next, epochs=3))
        assert len(resumed) == len(run) - k
        for a, b in zip(resumed, run[k:]):
            assert (a.position, a.provenance) == (b.position, b.provenance)
            for key in ("frames", "bvp", "mask"):
                np.testing.assert_array_equal(a.arrays[key], b.arrays[key])
    for n in (1, 3):  # the parts of a multi-process run are the whole batch's rows, in order
        parts = [list(iter_batches(index, 3, seed=11, epochs=3, part=(p, n))) for p in range(n)]
        for k, whole in enumerate(run):
            assert sum((part[k].provenance for part in parts), ()) == whole.provenance
            np.testing.assert_array_equal(np.concatenate([part[k].arrays["frames"] for part in parts]),
                                          whole.arrays["frames"])
    with pytest.raises(ValueError, match="does not split into 2 equal parts"):
        next(iter_batches(index, 3, seed=11, part=(0, 2)))
    with pytest.raises(ValueError, match="data position"):
        next(iter_batches(index, 3, seed=11, start=DataPosition(0, 2)))
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(iter_batches(index, 8, seed=11))


# ------------------------------------------------------------------------------------------- fingerprint

def test_fingerprint_changes_with_a_manifest_row_and_only_then(tmp_path):
    fs, base = fsspec.filesystem("file"), str(tmp_path)
    _write_root(fs, f"{base}/a", SPECS[:2])
    _write_root(fs, f"{base}/b", SPECS[3:4])
    roots = [f"{base}/a", f"{base}/b"]
    before = data_fingerprint(load_manifests(roots))
    rows = read_manifest(f"{base}/a/manifest.parquet", fs)

    def fingerprint_with(changed_rows):
        write_manifest(changed_rows, f"{base}/a/manifest.parquet", fs)
        return data_fingerprint(load_manifests(roots))

    assert fingerprint_with([{**r, "elapsed_s": 9.0} for r in reversed(rows)]) == before  # not an input
    assert fingerprint_with([{**rows[0], "fingerprint": "new"}, rows[1]]) != before
    assert fingerprint_with([{**rows[0], "status": "failed", "reason": "x"}, rows[1]]) != before
    assert fingerprint_with(rows[:1]) != before
    assert fingerprint_with(rows) == before
    assert data_fingerprint(load_manifests(roots[::-1])) != before
    assert build_training_data(roots, seq_len=T, val_fraction=0.0, seed=0).fingerprint == before


# ------------------------------------------------------------------------------------------------ memory

class CountingFS:
    """A filesystem that records every (path, offset, size) read through the files it opens."""

    def __init__(self, fs):
        self.fs, self.reads, self.opened = fs, [], []

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def open(self, path, mode="rb", **kwargs):
        self.opened.append(path)
        return _CountingFile(self.fs.open(path, mode, **kwargs), path, self.reads)


class _CountingFile:
    def __init__(self, f, path, reads):
        self._f, self._path, self._reads = f, path, reads

    def __getattr__(self, name):
        return getattr(self._f, name)

    def read(self, n=-1):
        offset = self._f.tell()
        data = self._f.read(n)
        self._reads.append((self._path, offset, len(data)))
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _frames_chunks(path: str) -> list[tuple[int, int]]:
    """[start, end) bytes of the frames column chunk of every row group of a shard."""
    meta = pq.ParquetFile(path).metadata
    col = meta.schema.to_arrow_schema().get_field_index("frames")
    chunks = []
    for g in range(meta.num_row_groups):
        c = meta.row_group(g).column(col)
        start = min(o for o in (c.dictionary_page_offset, c.data_page_offset) if o is not None)
        chunks.append((start, start + c.total_compressed_size))
    return chunks


def test_indexing_reads_no_frames_and_a_batch_only_the_row_groups_it_overlaps(tmp_path):
    base = str(tmp_path)
    _write_root(fsspec.filesystem("file"), base, [Spec("synthetic", "s001", "s001-r01", 800)])
    path = f"{base}/{shard_path('synthetic', 's001-r01')}"
    chunks = _frames_chunks(path)
    assert len(chunks) == 8  # one segment per row group

    size = fsspec.filesystem("file").size(path)

    def groups_read(reads):
        # pyarrow reads the footer with one speculative read of the file's last 64 KB: not a row group's
        return {g for p, off, n in reads if p == path and off + n < size
                for g, (a, b) in enumerate(chunks) if n and off < b and off + n > a}

    fs = CountingFS(fsspec.filesystem("file"))
    index = build_training_data([base], seq_len=T, val_fraction=0.0, seed=0, fs=fs, min_valid_fraction=0.1).index
    assert groups_read(fs.reads) == set()  # the index never reads a frame
    fs.reads.clear()
    seq = int(np.flatnonzero(index.start_frame == 160)[0])  # frames 160-319: segments 1, 2 and 3
    read_batch(index, [seq])
    assert groups_read(fs.reads) == {1, 2, 3}
    fs.reads.clear()
    fs.opened.clear()
    both = [seq, int(np.flatnonzero(index.start_frame == 640)[0])]  # + frames 640-799: segments 6 and 7
    read_batch(index, both)
    assert groups_read(fs.reads) == {1, 2, 3, 6, 7}
    assert fs.opened == [path]  # two rows of one recording: its shard opened once
