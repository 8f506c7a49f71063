"""Dataset adapters: every layout, written in its exact on-disk form (tests/dataset_layouts.py), is listed with
the right ids, files and metadata; its truth reads back as written and its frames decode with their times;
broken truth is reported with the file's path; listing and truth reading work through fsspec's memory://
as well as on local paths."""
from __future__ import annotations

import json
import pickle
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from dataset_layouts import BROKEN, WRITERS, write_pure
from transforms.datasets import LAYOUTS, TruthError, adapter
from transforms.video import VideoError

LOCAL = fsspec.filesystem("file")
WITH_TRUTH = [layout for layout in LAYOUTS if layout != "folder"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """dataset(layout, broken=False) -> (root, {recording_id: Expected}), each written once per module."""
    written = {}

    def get(layout: str, broken: bool = False):
        if (layout, broken) not in written:
            root = tmp_path_factory.mktemp(f"{layout}{'-broken' if broken else ''}")
            written[layout, broken] = root, WRITERS[layout](root, BROKEN[layout] if broken else None)
        return written[layout, broken]

    return get


def relative(root, uri: str) -> str:
    prefix = str(root).rstrip("/") + "/"
    assert uri.startswith(prefix), f"{uri} is not under {root}"
    return uri[len(prefix):]


def to_memory(root: Path) -> tuple[str, fsspec.AbstractFileSystem]:
    """A copy of the tree at `root` in fsspec's memory filesystem; returns its root URI."""
    fs = fsspec.filesystem("memory")
    base = f"/pulsepipe-{uuid.uuid4().hex[:8]}"
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            fs.pipe(f"{base}/{path.relative_to(root).as_posix()}", path.read_bytes())
    return f"memory:/{base}", fs


@pytest.mark.parametrize("layout", LAYOUTS)
def test_listing_finds_every_recording_with_its_files_and_metadata(dataset, layout):
    root, expected = dataset(layout)
    recordings = adapter(layout).list_recordings(str(root), LOCAL)
    assert [r.recording_id for r in recordings] == sorted(expected)
    for rec in recordings:
        want = expected[rec.recording_id]
        assert rec.problem is None, rec.problem
        assert (rec.dataset, rec.subject_id) == (layout, want.subject_id)
        assert {relative(root, f) for f in rec.files} == set(want.files)
        assert rec.video in rec.files
        assert {k: rec.metadata.get(k) for k in want.metadata} == want.metadata
        assert json.loads(json.dumps(rec.metadata)) == rec.metadata  # JSON-able, for the manifest
        assert pickle.loads(pickle.dumps(rec)) == rec  # crosses process boundaries


@pytest.mark.parametrize("layout", LAYOUTS)
def test_truth_reads_back_as_written(dataset, layout):
    root, expected = dataset(layout)
    module = adapter(layout)
    for rec in module.list_recordings(str(root), LOCAL):
        truth = module.read_truth(rec, LOCAL)
        want = expected[rec.recording_id]
        if want.truth_t_s is None:
            assert truth is None
            continue
        np.testing.assert_allclose(truth.t_s, want.truth_t_s, rtol=0, atol=1e-6, err_msg=rec.recording_id)
        np.testing.assert_allclose(truth.ppg, want.truth_ppg, rtol=1e-6, atol=1e-6, err_msg=rec.recording_id)
        assert truth.t_s.dtype == truth.ppg.dtype == np.float64


@pytest.mark.parametrize("layout", LAYOUTS)
def test_frame_blocks_yield_every_frame_with_its_time(dataset, layout):
    root, expected = dataset(layout)
    module = adapter(layout)
    for rec in module.list_recordings(str(root), LOCAL):
        want = expected[rec.recording_id]
        blocks = list(module.frame_blocks(rec, {f: f for f in rec.files}, 16))
        assert all(1 <= len(t) == len(f) <= 16 for t, f in blocks)
        times = np.concatenate([t for t, _ in blocks])
        frames = np.concatenate([f for _, f in blocks])
        np.testing.assert_allclose(times, want.frame_t_s, rtol=0, atol=want.time_atol, err_msg=rec.recording_id)
        assert frames.dtype == np.uint8 and frames.shape == want.frames.shape
        np.testing.assert_array_equal(frames, want.frames, err_msg=rec.recording_id)


@pytest.mark.parametrize("layout", WITH_TRUTH)
def test_broken_truth_is_reported_with_its_file(dataset, layout):
    """Missing, short or unreadable truth: `problem` at listing or TruthError at read_truth, naming the file."""
    root, expected = dataset(layout, broken=True)
    module = adapter(layout)
    recordings = {r.recording_id: r for r in module.list_recordings(str(root), LOCAL)}
    assert sorted(recordings) == sorted(expected)  # broken recordings are listed, not dropped
    for name, rec in recordings.items():
        if expected[name].broken is None:
            module.read_truth(rec, LOCAL)  # untouched recordings of the same root still read
            continue
        kind, damaged = expected[name].broken
        path = f"{root}/{damaged}"
        if rec.problem is not None:
            assert path in rec.problem and "\n" not in rec.problem, (kind, rec.problem)
            continue
        with pytest.raises(TruthError) as error:
            module.read_truth(rec, LOCAL)
        assert error.value.path == path and str(error.value).startswith(f"{path}: "), (kind, str(error.value))
        assert "\n" not in str(error.value)
        if kind == "short-truth":
            assert "too short" in error.value.reason


def outcome(module, rec, fs, root) -> tuple:
    """How a recording reads: its problem, its TruthError or its truth; the root is cut from messages."""
    if rec.problem is not None:
        return "problem", rec.problem.replace(str(root), "ROOT")
    try:
        truth = module.read_truth(rec, fs)
    except TruthError as e:
        return "error", str(e).replace(str(root), "ROOT")
    return "truth", None if truth is None else (truth.t_s.tolist(), truth.ppg.tolist())


@pytest.mark.parametrize("layout, broken", [(layout, False) for layout in LAYOUTS] +
                         [(layout, True) for layout in WITH_TRUTH])
def test_listing_and_truth_work_through_memory_filesystem(dataset, layout, broken):
    """The same recordings, metadata, problems, truth and errors from a memory:// copy as from local files."""
    root, _ = dataset(layout, broken)
    module = adapter(layout)
    mem_root, fs = to_memory(root)
    try:
        local = module.list_recordings(str(root), LOCAL)
        remote = module.list_recordings(mem_root, fs)
        assert [r.recording_id for r in remote] == [r.recording_id for r in local]
        for rec, twin in zip(remote, local):
            assert (rec.subject_id, rec.metadata) == (twin.subject_id, twin.metadata)
            assert relative(mem_root, rec.video) == relative(root, twin.video)
            assert [relative(mem_root, f) for f in rec.files] == [relative(root, f) for f in twin.files]
            assert outcome(module, rec, fs, mem_root) == outcome(module, twin, LOCAL, root)
    finally:
        fs.rm(mem_root, recursive=True)


def test_pure_reads_the_nested_layout_of_the_archives(tmp_path):
    expected = write_pure(tmp_path, nested=True)
    module = adapter("pure")
    recordings = module.list_recordings(str(tmp_path), LOCAL)
    assert [r.recording_id for r in recordings] == sorted(expected)
    for rec in recordings:
        want = expected[rec.recording_id]
        assert rec.problem is None and {relative(tmp_path, f) for f in rec.files} == set(want.files)
        np.testing.assert_allclose(module.read_truth(rec, LOCAL).t_s, want.truth_t_s, rtol=0, atol=1e-6)


def test_ubfc_folder_without_video_is_listed_with_its_problem(tmp_path):
    (tmp_path / "subject5").mkdir()
    (tmp_path / "subject5" / "ground_truth.txt").write_text("1 2\n70 70\n0 0.5\n")
    (tmp_path / "not-a-recording").mkdir()
    [rec] = adapter("ubfc-rppg").list_recordings(str(tmp_path), LOCAL)
    assert rec.recording_id == "subject5" and rec.problem == f"{tmp_path}/subject5/vid.avi: missing"


def test_ubfc_dataset_1_names_its_videos_and_subjects_otherwise(tmp_path):
    for folder, videos in (("5-gt", ["vid_5gt.avi"]), ("after-exercise", ["vid.avi"]), ("10-gt", ["a.avi", "b.avi"])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "gtdump.xmp").write_text("11,72,98,100\n28,72,98,101\n")
        for v in videos:
            (tmp_path / folder / v).write_bytes(b"")
    recs = {r.recording_id: r for r in adapter("ubfc-rppg").list_recordings(str(tmp_path), LOCAL)}
    assert {k: r.subject_id for k, r in recs.items()} == {"10-gt": "10", "5-gt": "5", "after-exercise": "10"}
    assert recs["5-gt"].video == f"{tmp_path}/5-gt/vid_5gt.avi" and recs["5-gt"].problem is None
    assert recs["10-gt"].problem == f"{tmp_path}/10-gt: 2 videos, none named vid.avi (a.avi, b.avi): which is the recording?"


def test_an_empty_pure_session_folder_says_so(tmp_path):
    (tmp_path / "06-02").mkdir()
    [rec] = adapter("pure").list_recordings(str(tmp_path), LOCAL)
    assert rec.problem.startswith(f"{tmp_path}/06-02: empty folder, no frames and no 06-02.json")


def test_rlap_prefers_physrecorders_lossless_files(tmp_path):
    folder = tmp_path / "p001" / "R1"
    folder.mkdir(parents=True)
    for name in ("video_ZIP_H264.mp4", "video_ZIP_RAW_BGRA.avi", "video_RAW_YUV420.avi", "BVP.csv", "frames_timestamp.csv"):
        (folder / name).write_bytes(b"")
    [rec] = adapter("rlap").list_recordings(str(tmp_path), LOCAL)
    assert rec.video.endswith("/p001/R1/video_RAW_YUV420.avi")  # raw I420, as PhysRecorder names it


def test_rlap_frame_times_must_match_the_decoded_frames(dataset, tmp_path):
    root, _ = dataset("rlap")
    module = adapter("rlap")
    rec = next(r for r in module.list_recordings(str(root), LOCAL) if r.recording_id == "p001/R1")
    times_csv = next(f for f in rec.files if f.endswith("frames_timestamp.csv"))
    short = tmp_path / "frames_timestamp.csv"
    short.write_text("".join(Path(times_csv).read_text().splitlines(keepends=True)[:-3]))
    local = {f: f for f in rec.files} | {times_csv: str(short)}
    with pytest.raises(VideoError, match="more frames than the 57 rows of frames_timestamp.csv"):
        list(module.frame_blocks(rec, local, 16))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_missing_root_is_an_error_naming_it(layout, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such dataset folder"):
        adapter(layout).list_recordings(str(tmp_path / "absent"), LOCAL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_says_what_its_root_holds(layout):
    assert adapter(layout).LAYOUT.startswith("ROOT/")  # the error for an input without recordings quotes it
