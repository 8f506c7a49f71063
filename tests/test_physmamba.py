"""PhysMamba: parity with the published Keras implementation, the selective scan against a plain loop,
batching, input checks and the weight import.

The fixture (tests/fixtures/make_physmamba_parity.py, run in the reference venv) holds the published
model's outputs on one 128-frame chunk for both weight sets, on a 32-frame 32x32 chunk (the same network at
a small size: the weights do not depend on it, and T == H as the head needs) and on two single blocks.
The 128-frame input is not stored: the script's `chunk_frames()` makes it again, checked by its sha256.
"""
import dataclasses
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import physmamba
from model.config import PHYSMAMBA, PhysMambaConfig
from tests.parity import load_parity_fixture

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "physmamba_parity.npz"
SMALL = dataclasses.replace(PHYSMAMBA, frames=32, image=32)
N_PARAMS = 759_297  # values stored in each published .h5 (194 tensors)
# XLA's CPU backend spends the small-size tests compiling; its cheaper optimisation level cuts that by 3x.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_compiled = {}


def _small_chunk(params, frames):
    """model.physmamba_chunk(params, frames, cfg=SMALL), compiled once per input shape with FAST_COMPILE."""
    frames = jnp.asarray(frames)
    if frames.shape not in _compiled:
        _compiled[frames.shape] = model.physmamba_chunk.lower(params, frames, cfg=SMALL).compile(
            compiler_options=FAST_COMPILE)
    return _compiled[frames.shape](params, frames)


def _load_script():
    spec = importlib.util.spec_from_file_location("make_physmamba_parity", FIXTURES / "make_physmamba_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports numpy only; Keras is imported inside its run_reference
    return module


maker = _load_script()


@pytest.fixture(scope="module")
def fixture():
    return load_parity_fixture(FIXTURE)


@pytest.fixture(scope="module")
def params():
    return {w: model.load("physmamba", weights=w).params for w in ("rlap", "pure")}


def _assert_matches(ours, ref):
    """The issue's bound: Pearson r >= 0.999 and max |error| <= 1e-3 of the reference's std."""
    ours, ref = np.asarray(ours, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    r = np.corrcoef(ours, ref)[0, 1]
    err = np.max(np.abs(ours - ref)) / np.std(ref)
    assert r >= 0.999 and err <= 1e-3, f"r={r:.6f}, max|err|/std={err:.2e}"


# ---------------------------------------------------------------- parity with the published model


@pytest.mark.parametrize("name, stream, index", [("block1", "slow", 0), ("block4", "fast", 0)])
def test_single_block_matches_published(fixture, params, name, stream, index):
    x = maker.block_input(name)
    assert maker.sha256(x) == str(fixture[f"{name}_input_sha256"]), "block input generator changed"
    p = params["rlap"][stream][index]
    y = jax.jit(lambda p, x: physmamba.block(p, x, PHYSMAMBA))(p, jnp.asarray(x))
    assert y.shape == fixture[f"{name}_rlap"].shape
    _assert_matches(y, fixture[f"{name}_rlap"])


@pytest.mark.parametrize("weights", ["rlap", "pure"])
def test_small_chunk_matches_published(fixture, params, weights):
    frames = maker.small_frames()
    assert maker.sha256(frames) == str(fixture["small_frames_sha256"]), "small frame generator changed"
    bvp = _small_chunk(params[weights], frames)
    assert bvp.shape == (32,)
    _assert_matches(bvp, fixture[f"small_bvp_{weights}"])


@pytest.mark.parametrize("weights", ["rlap", "pure"])  # ~13 s for both on 2 loaded cores, most of it compiling
def test_full_chunk_matches_published(fixture, params, weights):
    frames = maker.chunk_frames()
    assert maker.sha256(frames) == str(fixture["chunk_frames_sha256"]), "chunk frame generator changed"
    bvp = model.physmamba_chunk(params[weights], jnp.asarray(frames))
    assert bvp.shape == (128,)
    _assert_matches(bvp, fixture[f"bvp_{weights}"])


@pytest.mark.parametrize("kernel, stride, padding, t", [
    ((1, 5, 5), (1, 1, 1), "SAME", 4),  # stem 1
    ((3, 3, 3), (1, 1, 1), "SAME", 5),  # stem 2, 3 and the CDC
    ((4, 1, 1), (4, 1, 1), "VALID", 8),  # slow stream
    ((2, 1, 1), (2, 1, 1), "VALID", 8),  # fast stream
    ((3, 1, 1), (2, 1, 1), "SAME", 8),  # fusion: TF padding puts the odd zero frame after
    ((3, 1, 1), (2, 1, 1), "SAME", 7),
])
def test_conv3d_as_2d_equals_the_3d_convolution(kernel, stride, padding, t):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, t, 6, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((*kernel, 3, 4)), jnp.float32)
    want = jax.lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    got = physmamba._conv3d(x, w, stride, padding)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the selective scan


def _published_scan_loop(u, delta, A, B, C, D, eps=1e-12):
    """The published selective_scan, one time step at a time in float32. u, delta: (b, L, d); B, C: (b, L, n)."""
    u, delta, A, B, C, D = (np.asarray(a, np.float32) for a in (u, delta, A, B, C, D))
    b, L, d = u.shape
    e = np.empty((b, L, d, A.shape[1]), np.float32)
    s = np.zeros((b, d, A.shape[1]), np.float32)  # sum_{s>t} delta[s] * A, from the end
    for t in range(L - 1, -1, -1):
        e[:, t] = np.exp(s)
        s = s + delta[:, t, :, None] * A
    y = np.empty((b, L, d), np.float32)
    acc = np.zeros((b, d, A.shape[1]), np.float32)
    for t in range(L):
        acc = acc + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :] * e[:, t]
        y[:, t] = np.einsum("bdn,bn->bd", acc / (e[:, t] + np.float32(eps)), C[:, t]) + u[:, t] * D
    return y


def _published_bidirectional_loop(u, delta, A, B, C, D):
    n = A.shape[1]
    fwd = _published_scan_loop(u, delta, A, B[..., :n], C[..., :n], D)
    bwd = _published_scan_loop(u[:, ::-1], delta[:, ::-1], A, B[..., n:], C[..., n:], D)  # B, C unflipped
    return np.concatenate([fwd, bwd[:, ::-1]], axis=-1)


def _scan_inputs(b, L, d, n, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((b, L, d)).astype(np.float32)
    delta = np.log1p(np.exp(rng.standard_normal((b, L, d)) * 0.5)).astype(np.float32)  # softplus, ~0.7
    A = -np.exp(rng.standard_normal((d, n)) * 0.3).astype(np.float32)
    B = rng.standard_normal((b, L, 2 * n)).astype(np.float32)
    C = rng.standard_normal((b, L, 2 * n)).astype(np.float32)
    D = rng.standard_normal(d).astype(np.float32)
    return u, delta, A, B, C, D


@pytest.mark.parametrize("L, chunk", [(700, 64), (300, 512)])  # several chunks, the last partial; one chunk
def test_bidirectional_scan_equals_the_published_loop(L, chunk):
    u, delta, A, B, C, D = _scan_inputs(2, L, 8, 4)
    want = _published_bidirectional_loop(u, delta, A, B, C, D)
    got = jax.jit(physmamba.bidirectional_scan, static_argnums=(6, 7))(u, delta, A, B, C, D, chunk, 1e-12)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
    # The underflow regime the formula is known for: away from the end of the forward scan (the start of
    # the backward one) the state is exactly 0 and y = u * D.
    zero = want == np.concatenate([u * D, u * D], axis=-1)
    assert zero[:, :L - 200, :8].all() and zero[:, 200:, 8:].all()


def test_scan_without_underflow_runs_every_chunk():
    # With little decay (small delta) nothing underflows: no chunk is skipped, the carry crosses them all.
    u, delta, A, B, C, D = _scan_inputs(1, 256, 4, 4, seed=1)
    delta = delta * 1e-3
    want = _published_bidirectional_loop(u, delta, A, B, C, D)
    got = physmamba.bidirectional_scan(u, delta, A, B, C, D, 32, 1e-12)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- batching, inputs, weights


def test_batch_equals_single_calls(params):
    rng = np.random.default_rng(3)
    frames = np.stack([maker.small_frames(), rng.integers(40, 220, (32, 32, 32, 3), dtype=np.uint8)])
    batch = _small_chunk(params["rlap"], frames)
    assert batch.shape == (2, 32)
    for i in range(2):
        single = _small_chunk(params["rlap"], frames[i])
        np.testing.assert_allclose(np.asarray(batch[i]), np.asarray(single), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, dtype", [
    ((128, 128, 128, 3), np.float32),  # not uint8
    ((127, 128, 128, 3), np.uint8),  # not a whole chunk
    ((128, 64, 64, 3), np.uint8),  # an ME-sized or other crop
    ((128, 128, 128), np.uint8),  # no channel axis
    ((1, 2, 128, 128, 128, 3), np.uint8),  # too many axes
])
def test_wrong_inputs_raise_value_error(params, shape, dtype):
    with pytest.raises(ValueError, match="physmamba_chunk: expected uint8"):
        physmamba.physmamba_chunk(params["rlap"], jnp.zeros(shape, dtype))


def test_config_needs_frames_equal_to_image():
    with pytest.raises(ValueError, match="frames == image"):
        PhysMambaConfig(frames=160, image=128)


def test_load_returns_params_and_config(params):
    m = model.load("physmamba", weights="pure")
    assert m.cfg == PHYSMAMBA
    assert model.param_count(m.params) == N_PARAMS
    with pytest.raises(ValueError, match="unknown model"):
        model.load("physnet")


@pytest.mark.parametrize("weights", ["rlap", "pure"])
def test_every_stored_value_is_imported(weights):
    from model.weights import check_physmamba_weights

    assert check_physmamba_weights(weights) == N_PARAMS


def test_published_weights_are_sha256_checked(tmp_path, monkeypatch):
    from model.weights import load_physmamba_params
    from transforms.published_files import PublishedFileError, weights_dir

    src = weights_dir() / "PhysMamba.rlap.weights.h5"
    bad = tmp_path / "PhysMamba.rlap.weights.h5"
    data = src.read_bytes()
    bad.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    monkeypatch.setenv("PULSEPIPE_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(PublishedFileError, match="sha256"):
        load_physmamba_params("rlap")
