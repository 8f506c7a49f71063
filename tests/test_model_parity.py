"""Our ME-rPPG against the published Keras implementation (fixture from tests/fixtures/make_me_parity.py)."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "me_parity.npz"


@pytest.fixture(scope="module")
def fixture():
    if not FIXTURE.exists():
        pytest.skip(f"{FIXTURE} missing: run `make fixtures`")
    return dict(np.load(FIXTURE))


@pytest.fixture(scope="module")
def published():
    from model.weights import load_initial_state, load_params

    return {w: load_params(w) for w in ("rlap", "pure")}, load_initial_state()


def _assert_matches(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    r = np.corrcoef(ours, ref)[0, 1]
    err = np.max(np.abs(ours - ref)) / np.std(ref)
    assert r >= 0.999 and err <= 1e-3, f"r={r:.6f}, max|err|/std={err:.2e}"


@pytest.mark.parametrize("weights", ["rlap", "pure"])
def test_chunk_mode(fixture, published, weights):
    from model.me_rppg import apply_chunk

    params, state0 = published
    bvp, _ = apply_chunk(params[weights], jnp.asarray(fixture["frames"]), state0)
    _assert_matches(bvp, fixture[f"chunk_{weights}"])


@jax.jit
def _flow_over(params, frames, state):
    """flow_step over a run of frames, as one compiled scan (one compile for both weight sets)."""
    from model.me_rppg import flow_step

    def step(s, frame):
        y, s = flow_step(params, frame, s)
        return s, y

    return jax.lax.scan(step, state, frames)[1]


@pytest.mark.parametrize("weights", ["rlap", "pure"])
def test_flow_mode(fixture, published, weights):
    params, state = published
    frames = jnp.asarray(fixture["frames"][: int(fixture["n_flow"])])
    _assert_matches(_flow_over(params[weights], frames, state), fixture[f"flow_{weights}"])
