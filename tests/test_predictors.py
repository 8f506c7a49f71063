"""Predictors over B recordings in lockstep: each recording's BVP is what it gets alone, block by block."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.predictors import FPS, Block, ModelSet, lockstep
from transforms.baselines import pos, rgb_means
from transforms.errors import ItemFailed

LENGTHS = (2 * 160 + 37, 170, 60)  # a long one, one just past a chunk, one shorter than a chunk


def _streams(seed=5):
    """Crops and face flags per recording, some frames without a face."""
    rng = np.random.default_rng(seed)
    out = []
    for n in LENGTHS:
        frames = rng.integers(40, 220, (n, 36, 36, 3), dtype=np.uint8)
        found = np.ones(n, bool)
        found[n // 3:n // 3 + 10] = False  # no-face frames enter as zeros and come out as zeros
        out.append((frames, found))
    return out


def _blocks(frames, found, size):
    """A recording as the decoder hands it over: blocks of `size` frames that straddle chunk boundaries."""
    return [(frames[s:s + size], found[s:s + size]) for s in range(0, len(frames), size)]


def test_lockstep_hands_each_stream_its_frames_in_order_then_padding():
    streams = _streams()
    got = [([], []) for _ in streams]
    for crops, found, n_valid in lockstep([_blocks(f, m, size) for (f, m), size in zip(streams, (50, 7, 160))]):
        crops = crops[36]  # one array per block: crops of its own size
        assert crops.shape == (3, 160, 36, 36, 3) and found.shape == (3, 160)
        for k, n in enumerate(n_valid):
            got[k][0].append(crops[k, :n])
            got[k][1].append(found[k, :n])
            if 0 < n < 160:  # the last partial block repeats the last frame, as the reference pads
                assert (crops[k, n:] == crops[k, n - 1]).all() and (found[k, n:] == found[k, n - 1]).all()
            if n == 0:  # an ended stream: blank frames without a face
                assert not crops[k].any() and not found[k].any()
    for (frames, mask), (c, f) in zip(streams, got):
        np.testing.assert_array_equal(np.concatenate(c), frames)
        np.testing.assert_array_equal(np.concatenate(f), mask)


def test_lockstep_of_nothing_yields_nothing():
    assert list(lockstep([[], iter(())])) == []


@pytest.fixture(scope="module")
def me():
    import model

    return model.load()


def test_chunk_mode_in_a_batch_equals_each_recording_alone(me):
    import model

    streams = _streams()
    bvps = ModelSet(["me-chunk"]).feed([_blocks(f, m, 50) for f, m in streams]).predictors["me-chunk"].finish()
    for (frames, found), bvp in zip(streams, bvps):
        expected, _ = model.apply_chunk(me.params, np.where(found[:, None, None, None], frames, 0), me.initial_state)
        assert bvp.shape == (len(frames),)
        np.testing.assert_allclose(bvp, np.asarray(expected) * found, rtol=1e-4, atol=1e-5)


def test_flow_mode_in_a_batch_equals_flow_step_frame_by_frame(me):
    import model

    streams = _streams()[1:]  # 170 and 60 frames: two blocks
    bvps = ModelSet(["me-flow"]).feed([_blocks(f, m, 64) for f, m in streams]).predictors["me-flow"].finish()
    for (frames, found), bvp in zip(streams, bvps):
        state, expected = me.initial_state, []
        for frame, face in zip(frames, found):
            y, state = model.flow_step(me.params, frame if face else np.zeros_like(frame), state, 1 / FPS)
            expected.append(float(y) if face else 0.0)
        np.testing.assert_allclose(bvp, expected, rtol=1e-4, atol=1e-5)


def test_baselines_in_a_batch_equal_each_recording_alone_and_unkept_streams_give_none():
    streams = _streams()
    fed = ModelSet(["pos"]).feed([_blocks(f, m, 33) for f, m in streams])
    bvps = fed.predictors["pos"].finish(keep=[True, False, True])
    assert bvps[1] is None
    for k in (0, 2):
        frames, found = streams[k]
        np.testing.assert_allclose(bvps[k], pos(rgb_means(frames, found), FPS), rtol=1e-12)


def test_feed_returns_what_each_stream_read_and_an_item_failure_ends_only_its_stream():
    streams = _streams()
    truths = [np.linspace(0, 1, len(f)) for f, _ in streams]

    def failing(frames, found):
        yield Block(frames[:100], found[:100])
        raise ItemFailed("recording 1: cannot read the rest")

    fed = ModelSet(["pos"]).feed([
        [Block(f[s:s + 40], m[s:s + 40], truth=t[s:s + 40], timestamps=np.arange(s, min(s + 40, len(f))) / FPS)
         for s in range(0, len(f), 40)] if k != 1 else failing(f, m)
        for k, ((f, m), t) in enumerate(zip(streams, truths))])
    first, second, third = fed.reads
    np.testing.assert_array_equal(first.face_found, streams[0][1])
    np.testing.assert_array_equal(first.truth, truths[0])
    np.testing.assert_allclose(first.timestamps, np.arange(LENGTHS[0]) / FPS)
    assert first.error is None and third.error is None
    assert str(second.error) == "recording 1: cannot read the rest" and len(second.face_found) == 100
    assert second.truth is None and second.timestamps is None  # its block came without them
    bvps = fed.predictors["pos"].finish()
    assert [len(b) for b in bvps] == [LENGTHS[0], 100, LENGTHS[2]]
    np.testing.assert_allclose(bvps[2], pos(rgb_means(*streams[2]), FPS), rtol=1e-12)


_CACHED_RUN = """
import sys, jax, numpy as np
from pipelines.predictors import ModelSet
hits = []
jax.monitoring.register_event_listener(lambda event, **_: hits.append(event == "/jax/compilation_cache/cache_hits"))
rng = np.random.default_rng(3)
frames, found = rng.integers(40, 220, (200, 36, 36, 3), dtype=np.uint8), np.ones(200, bool)
np.save(sys.argv[1], ModelSet(["me-chunk"]).feed([[(frames, found)]]).predictors["me-chunk"].finish()[0])
print(sum(hits))
"""


def test_compiled_model_is_kept_on_disk_and_reused_with_the_same_outputs(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # JAX skips compiles under 1 s: fast machines too

    def run(out) -> tuple[np.ndarray, int]:
        done = subprocess.run([sys.executable, "-c", _CACHED_RUN, str(out)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return np.load(out), int(done.stdout.split()[-1])

    first, first_hits = run(tmp_path / "first.npy")
    assert first_hits == 0
    assert list((tmp_path / "cache" / "pulsepipe" / "xla").glob("*apply_chunk*")), \
        "the chunk-mode executable is written under $XDG_CACHE_HOME/pulsepipe/xla"
    second, second_hits = run(tmp_path / "second.npy")
    assert second_hits >= 1, "a second process loads it instead of compiling"
    np.testing.assert_array_equal(first, second)


def test_an_unusable_cache_folder_is_said_once_and_the_models_still_run(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "a-file").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "a-file" / "cache")  # cannot be created
    done = subprocess.run([sys.executable, "-c", _CACHED_RUN, str(tmp_path / "out.npy")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "compiled models are not kept" in line]
    assert len(said) == 1 and "XDG_CACHE_HOME" in said[0], done.stderr
    assert "persistent compilation cache" not in done.stderr, done.stderr
    assert np.isfinite(np.load(tmp_path / "out.npy")).all()
