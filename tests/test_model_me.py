"""ME-rPPG structure: chunk splitting, partial chunks, batching, input checks, parameter count.

These run the published weights on a small configuration to keep compiles and runs short: 12x12 frames,
16-frame chunks (the weights depend on neither) and a prefix of the network (one block of one SSConv layer,
one head Mamba-2 layer), which goes through the same code with the same state handling. Parity of the whole
network at full size is in test_model_parity.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import MEState, apply_chunk, flow_frames, flow_step, init_state, me_rppg, param_count, state_bytes
from model.config import ME, MEConfig

SMALL = MEConfig(chunk=16, image=12, n_blocks=1, layers_per_block=1, head_layers=1)
# XLA's CPU backend spends most of these tests compiling; its cheaper optimisation level halves that.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_compiled = {}


def _run(fn, params, x, state, *dynamic):
    """fn(params, x, state, *dynamic, cfg=SMALL) for a compiled entry point (model.apply_chunk, ...), compiled
    once per input shape with FAST_COMPILE."""
    x = jnp.asarray(x)
    key = (fn, x.shape, len(dynamic))
    if key not in _compiled:
        _compiled[key] = fn.lower(params, x, state, *dynamic, cfg=SMALL).compile(compiler_options=FAST_COMPILE)
    return _compiled[key](params, x, state, *dynamic)


@pytest.fixture(scope="module")
def params():
    from model.weights import load_params

    return jax.tree.map(jnp.asarray, load_params("rlap"))


def _frames(t, batch=None, seed=0):
    shape = (t, 12, 12, 3) if batch is None else (batch, t, 12, 12, 3)
    return np.random.default_rng(seed).integers(60, 200, shape, dtype=np.uint8)


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_split_at_chunk_boundaries_equals_one_pass(params):
    frames = _frames(37)  # 2 whole chunks and 5 frames
    s0 = init_state(1, SMALL)
    y_all, s_all = _run(apply_chunk, params, frames, s0)
    y_a, s_a = _run(apply_chunk, params, frames[:16], s0)
    y_b, s_b = _run(apply_chunk, params, frames[16:], s_a)
    assert y_all.shape == (37,)
    _close(jnp.concatenate([y_a, y_b]), y_all)
    jax.tree.map(_close, s_b, s_all)  # both: the state after the last whole chunk (frame 32)


def test_partial_chunk_does_not_change_earlier_outputs_or_state(params):
    frames = _frames(21)  # same shapes as above: no new compiles
    s0 = init_state(1, SMALL)
    y, s = _run(apply_chunk, params, frames, s0)
    y16, s16 = _run(apply_chunk, params, frames[:16], s0)
    assert y.shape == (21,)
    _close(y[:16], y16)
    jax.tree.map(_close, s, s16)  # the padded chunk's state is discarded


def test_flow_streams_in_a_batch_are_independent(params):
    frames = _frames(3, batch=2, seed=1)
    same = frames.copy()
    same[1] = frames[0]
    s_a = s_b = init_state(2, SMALL)
    for i in range(3):
        y_a, s_a = _run(flow_step, params, frames[:, i], s_a, 1 / 30)
        y_b, s_b = _run(flow_step, params, same[:, i], s_b, 1 / 30)
        _close(y_a[0], y_b[0])  # stream 0 does not see what stream 1 gets
        _close(y_b[0], y_b[1])
    assert y_a.shape == (2,) and not np.allclose(y_a[0], y_a[1])
    y_slow, _ = _run(flow_step, params, frames[:, 0], init_state(2, SMALL), 1 / 15)
    y_std, _ = _run(flow_step, params, frames[:, 0], init_state(2, SMALL), 1 / 30)
    assert not np.allclose(y_slow, y_std)  # dt is honoured (and traced: no recompile)


def test_flow_frames_equals_flow_step_frame_by_frame(params):
    frames = _frames(3, batch=2, seed=1)
    s = s0 = init_state(2, SMALL)
    ys = []
    for i in range(3):
        y, s = _run(flow_step, params, frames[:, i], s, 1 / 30)
        ys.append(y)
    y_run, s_run = _run(flow_frames, params, frames, s0, 1 / 30)
    assert y_run.shape == (2, 3)
    _close(y_run, jnp.stack(ys, axis=1))
    jax.tree.map(_close, s_run, s)


def test_nested_in_a_callers_jit_equals_top_level(params):
    # The plain function of model.me_rppg, nested in a caller's jit (with the caller's options), against the
    # entry point that model compiles at the top level with its own XLA options.
    frames = jnp.asarray(_frames(16))
    s0 = init_state(1, SMALL)
    y, s = _run(apply_chunk, params, frames, s0)
    nested = jax.jit(lambda p, f, st: me_rppg.apply_chunk(p, f, st, cfg=SMALL), compiler_options=FAST_COMPILE)
    y_nested, s_nested = nested(params, frames, s0)
    _close(y_nested, y)
    jax.tree.map(_close, s_nested, s)


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((10, 36, 36, 3), np.float32),  # not uint8
        np.zeros((10, 32, 32, 3), np.uint8),  # wrong crop size
        np.zeros((10, 36, 36, 4), np.uint8),  # not RGB
        np.zeros((36, 36, 3), np.uint8),  # a single frame is not a run of frames
        np.zeros((1, 2, 10, 36, 36, 3), np.uint8),  # too many axes
        np.zeros((0, 36, 36, 3), np.uint8),  # no frames
    ],
)
def test_apply_chunk_rejects_bad_frames(params, frames):
    with pytest.raises(ValueError):
        apply_chunk(params, frames, init_state(1))


def test_bad_flow_frame_and_state_batch(params):
    with pytest.raises(ValueError):
        flow_step(params, np.zeros((36, 20, 3), np.uint8), init_state(1))  # wrong crop size
    with pytest.raises(ValueError):
        flow_step(params, np.zeros((36, 36, 3), np.int32), init_state(1))  # not uint8
    with pytest.raises(ValueError, match="batch"):
        apply_chunk(params, np.zeros((3, 10, 36, 36, 3), np.uint8), init_state(2))


def test_parameter_count_matches_file(params):
    from model.weights import check_weights  # what `python -m model.weights --check` runs on each file

    assert param_count(params) == check_weights("rlap") == 604_909
    from model.weights import load_params

    assert param_count(load_params("pure")) == check_weights("pure")


def test_check_fails_on_a_stored_value_not_imported(tmp_path):
    import shutil

    import h5py

    from model.weights import check_weights, weights_path

    path = shutil.copy(weights_path("rlap"), tmp_path / "extra.weights.h5")
    with h5py.File(path, "a") as f:
        f["layers/unused/vars/0"] = np.zeros(3, np.float32)  # a layer the network does not have
    with pytest.raises(ValueError, match="604,912 values stored, 604,909 imported"):
        check_weights(path)


def test_load_and_initial_state():
    import model

    m = model.load()
    assert m.cfg == ME and param_count(m.params) == 604_909
    s = m.init_state(3)
    assert s.blocks[0][0].tn.mean.shape == (3, 36, 36, 32)
    assert s.head[1].ssd.shape == (3, 2, 32, 128) and s.blocks[3][1].mamba.conv.shape == (3, 12, 384)
    np.testing.assert_array_equal(s.blocks[1][0].tn.var[2], m.initial_state.blocks[1][0].tn.var[0])
    assert float(jnp.abs(m.initial_state.blocks[0][1].tn.mean).mean()) > 0.1  # the published, non-zero state
    zeros = MEState.zeros(3)
    assert jax.tree.structure(zeros) == jax.tree.structure(s)
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(zeros), jax.tree.leaves(s)))
    assert 1.5e6 < state_bytes(s) / 3 < 1.7e6  # about 1.6 MB per stream in float32
    with pytest.raises(ValueError):
        model.load("physnet")


def _tn_plain(x):
    y, mean, sq0, _ = me_rppg._tn_trend(x, 2e-6)
    return y, me_rppg.TNState(mean[:, 0], sq0)


# (ours, the plain expressions whose JAX rules ours must equal, the shapes of the differentiated inputs)
LAYERS = {
    "dense": (lambda dtype: lambda x, w, b: me_rppg._add_bias(me_rppg._matmul(x, w, dtype), b),
              lambda dtype: lambda x, w, b: jnp.matmul(x.astype(dtype), w.astype(dtype),
                                                      preferred_element_type=me_rppg._accumulator(dtype)) + b,
              [(2, 3, 5, 4, 6), (6, 7), (7,)]),
    "conv": (lambda dtype: lambda x, w: me_rppg._conv(x, w, 2, dtype),
             lambda dtype: lambda x, w: me_rppg._conv_frames(x, w, 2, dtype), [(2, 3, 5, 4, 6), (3, 3, 6, 7)]),
    "conv_offset": (lambda dtype: lambda x, c, w, b: me_rppg._conv_offset(x, c, w, b, dtype),
                    lambda dtype: lambda x, c, w, b: me_rppg._conv_frames(x + c[:, :, None, None], w, 1, dtype) + b,
                    [(2, 3, 5, 4, 6), (2, 3, 6), (3, 3, 6, 7), (7,)]),
    "relu": (lambda dtype: me_rppg._relu, lambda dtype: jax.nn.relu, [(2, 3, 5, 4, 6)]),
    "tn": (lambda dtype: lambda x: me_rppg.tn_chunk(x, 2e-6), lambda dtype: _tn_plain, [(2, 7, 5, 4, 6)]),
}


# bfloat16 for the layers with products
@pytest.mark.parametrize("layer,dtype", [(layer, dtype) for layer in sorted(LAYERS) for dtype in ("float64", "bfloat16")
                                         if dtype == "float64" or layer in ("conv", "conv_offset", "dense")])
def test_layer_vjps_equal_jax_own_rules(layer, dtype):
    """The layers with their own VJPs (for XLA:CPU's speed and the residuals' size) give JAX's rules' gradients
    for the plain expressions: in float64 to rounding, and with bfloat16 products as JAX rounds them."""
    ours, plain, shapes = LAYERS[layer]
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        args = [jnp.asarray(rng.standard_normal(s) * 2 + 0.5) for s in shapes]  # float64, some of them negative
        want_y, want_vjp = jax.vjp(plain(dtype), *args)
        got_y, got_vjp = jax.vjp(ours(dtype), *args)
        for got, want in zip(jax.tree.leaves(got_y), jax.tree.leaves(want_y)):
            np.testing.assert_array_equal(got, want)  # the forward is the plain expression itself
        g = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)).astype(a.dtype), want_y)
        tol = 1e-12 if dtype == "float64" else 2e-2
        for got, want in zip(got_vjp(g), want_vjp(g)):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(jnp.max(jnp.abs(want))))


KEEP_FREED = """
import resource, sys
import numpy as np
import model
if sys.argv[1] == "kept":
    assert model.keep_freed_memory()
faults = []
for _ in range(3):  # 256 MiB each time, freed in between
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(2**26, np.float32)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del a
print(faults[-1])
"""


def test_keep_freed_memory_reuses_freed_blocks():
    """After model.keep_freed_memory, a freed 256 MiB block is reused (almost no page faults the next time);
    with glibc's defaults it goes back to the system and is faulted in again (65,536 pages of 4 KiB)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMPY_MADVISE_HUGEPAGE="0")  # 4 KiB pages, so that faults count pages
    faults = {how: int(subprocess.run([sys.executable, "-c", KEEP_FREED, how], capture_output=True, text=True,
                                      check=True, env=env, timeout=120).stdout)
              for how in ("kept", "default")}
    assert faults["kept"] < 1000 < 60000 < faults["default"], faults
