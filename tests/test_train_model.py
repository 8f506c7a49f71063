"""Training ME-rPPG: initialisers, saving weights, loss masks, dropout, gradients, the step, data parallel.

The gradient tests run the published weights on test_model_me's small configuration (12x12 frames, 16-frame
chunks, one block of one SSConv layer, one head Mamba-2 layer) over two chunks, so the state carried from the
first chunk to the second is in every gradient. Most of their time is XLA compiling the chunk's forward and
backward; tests that share a (dtype, dropout) share those compiles.
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import train
from model.config import ME, MEConfig, architecture
from model.initializers import init_params
from model.state import MEState
from model.weights import check_weights, load_params, save_params, weights_config, weights_path

SMALL = MEConfig(chunk=16, image=12, n_blocks=1, layers_per_block=1, head_layers=1)
NO_DROPOUT = train.TrainHParams(dropout=0.0)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(jnp.asarray, load_params("rlap", SMALL))


def _batch(batch=2, chunks=2, seed=0, cfg=SMALL):
    rng = np.random.default_rng(seed)
    t = chunks * cfg.chunk
    mask = rng.random((batch, t)) > 0.25
    mask[0, :cfg.chunk] = False  # sequence 0's loss sees the first chunk only through the carried state
    bvp = np.where(mask, rng.standard_normal((batch, t)), 0.0).astype(np.float32)
    frames = rng.integers(40, 220, (batch, t, cfg.image, cfg.image, 3), dtype=np.uint8)
    return {"frames": frames, "bvp": bvp, "mask": mask}


def _max_rel_diff(a, b) -> float:
    """Largest |a - b| of any leaf, relative to that leaf's largest |b|."""
    d = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30)), a, b)
    return max(jax.tree.leaves(d))


# ---------------------------------------------------------------- initialisers and saving


def test_init_params_has_the_published_structure_and_shapes():
    ours, published = init_params(jax.random.key(0)), load_params("rlap")
    assert jax.tree.structure(ours) == jax.tree.structure(published)
    assert jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, ours, published)) \
        == [True] * len(jax.tree.leaves(published))
    small = init_params(jax.random.key(0), SMALL)
    assert jax.tree.structure(small) == jax.tree.structure(load_params("rlap", SMALL))


def test_init_params_follows_keras_defaults():
    p = init_params(jax.random.key(1))
    k = ME.filters
    layer = p["blocks"][1]["layers"][0]

    def uniform(a, fan_in, fan_out):
        limit = np.sqrt(6 / (fan_in + fan_out))
        a = np.asarray(a)
        assert np.abs(a).max() <= limit and np.abs(a).max() > 0.9 * limit
        assert abs(a.std() / (limit / np.sqrt(3)) - 1) < 0.1  # the std of U(-limit, limit)
        assert abs(a.mean()) < 0.1 * limit

    uniform(layer["conv1"]["w"], 9 * k, 9 * k)  # Conv3D (1, 3, 3, K, K): fans scaled by the receptive field
    uniform(layer["dense1"]["w"], k, 2 * k)
    uniform(layer["mamba"]["in_proj"], 2 * k, 516)
    uniform(layer["mamba"]["conv_w"], 12, 12 * 384)  # depthwise Conv1D kernel (12, 1, 384)
    uniform(p["blocks"][0]["in_proj"], 3, k)
    for a in (layer["conv1"]["b"], layer["dense1"]["b"], layer["mamba"]["conv_b"], p["head"]["dense"]["b"]):
        assert not np.any(a)
    np.testing.assert_array_equal(layer["mamba"]["norm"], 1.0)
    heads = np.stack([l["mamba"]["A_log"] for b in p["blocks"] for l in b["layers"]])  # Mamba2's own: glorot too
    assert np.abs(heads).max() <= np.sqrt(6 / 8) and heads.std() > 0.2
    assert np.abs(layer["mamba"]["D"]).max() <= np.sqrt(6 / 5)  # D is (h, 1) in Keras


def test_init_params_is_deterministic_per_key():
    a, b, c = (init_params(jax.random.key(s), SMALL) for s in (3, 3, 4))
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))
    assert not np.array_equal(a["out_proj"], c["out_proj"])


def test_save_params_round_trips_in_the_published_layout(tmp_path):
    def datasets(path):
        with h5py.File(path, "r") as f:
            out = {}
            f.visititems(lambda name, o: out.__setitem__(name, o.shape) if isinstance(o, h5py.Dataset) else None)
            return out

    for name, p in (("fresh", init_params(jax.random.key(0))), ("rlap", load_params("rlap"))):
        path = save_params(p, tmp_path / f"{name}.weights.h5")
        back = load_params(path)
        assert jax.tree.structure(back) == jax.tree.structure(p)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(p)):
            assert a.dtype == np.float32 and np.array_equal(a, np.asarray(b))
        assert check_weights(path) == model.param_count(p)
        assert datasets(path) == datasets(weights_path("rlap"))  # every Keras path and shape, nothing else
    small = init_params(jax.random.key(1), SMALL)  # a prefix of the network saves as the same prefix
    back = load_params(save_params(small, tmp_path / "small.weights.h5", SMALL))  # the file names its network
    assert weights_config(tmp_path / "small.weights.h5") == dataclasses.replace(ME, **architecture(SMALL))
    assert weights_config("rlap") == ME
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(small)))
    assert sorted(os.listdir(tmp_path)) == ["fresh.weights.h5", "rlap.weights.h5", "small.weights.h5"]  # no temp


# ---------------------------------------------------------------- config, optimiser, loss


def test_optimizer_is_adam_with_keras_epsilon_and_the_schedules():
    hp = train.TrainHParams()
    assert (hp.lr, hp.b1, hp.b2, hp.eps, hp.dropout, hp.batch_size) == (1e-3, 0.9, 0.999, 1e-7, 0.5, 32)
    g = {"w": jnp.array([1e-6, -2e-7, 3.0])}
    tx = train.optimizer(hp)
    update, _ = tx.update(g, tx.init(g))
    # first Adam step: m_hat = g, v_hat = g^2, so update = -lr g / (|g| + eps); eps matters for small g
    np.testing.assert_allclose(update["w"], -1e-3 * g["w"] / (jnp.abs(g["w"]) + 1e-7), rtol=1e-5)
    # b1 = b2 = 0: update = -lr g / (|g| + eps) of the clipped g, (3, 4) -> (0.6, 0.8)
    clip = train.optimizer(train.TrainHParams(clip_norm=1.0, b1=0.0, b2=0.0, eps=1.0))
    g = {"w": jnp.array([3.0, 4.0])}
    np.testing.assert_allclose(clip.update(g, clip.init(g))[0]["w"], -1e-3 * np.array([0.6 / 1.6, 0.8 / 1.8]),
                               rtol=1e-5)
    lr = train.learning_rate(train.TrainHParams(schedule="cosine", warmup_steps=10, total_steps=110))
    np.testing.assert_allclose([lr(0), lr(10), lr(60), lr(110)], [0.0, 1e-3, 5e-4, 0.0], atol=1e-9)
    with pytest.raises(ValueError, match="cosine"):
        train.TrainHParams(schedule="cosine")
    with pytest.raises(ValueError, match="loss"):
        train.TrainHParams(loss="mae")


@pytest.mark.parametrize("kind", train.LOSSES)
def test_masked_frames_never_count_in_the_loss(kind):
    rng = np.random.default_rng(0)
    y, bvp = rng.standard_normal((2, 2, 48))
    mask = rng.random((2, 48)) > 0.4
    loss, dy = jax.value_and_grad(train.sequence_loss)(y, bvp, mask, kind)
    y2 = np.where(mask, y, 1e3)
    bvp2 = np.where(mask, bvp, np.nan)  # even a NaN label on a masked frame
    loss2, dy2 = jax.value_and_grad(train.sequence_loss)(y2, bvp2, mask, kind)
    assert float(loss) == float(loss2) and np.isfinite(float(loss))
    np.testing.assert_array_equal(dy, dy2)
    assert not np.any(np.asarray(dy)[~mask])
    if kind == "mse":
        np.testing.assert_allclose(loss, np.mean((y - bvp)[mask] ** 2), rtol=1e-6)
    else:
        r = [np.corrcoef(y[i][mask[i]], bvp[i][mask[i]])[0, 1] for i in range(2)]
        np.testing.assert_allclose(loss, 1 - np.mean(r), rtol=1e-5)
        perfect = train.sequence_loss(3 * bvp + 1, bvp, mask, kind)
        assert abs(float(perfect)) < 1e-6
    assert float(train.sequence_loss(y, bvp, np.zeros_like(mask), kind)) == 0.0  # nothing to learn from


def test_bad_batches_are_rejected(params):
    good = _batch()
    for bad, match in (({"frames": good["frames"][:, :20]}, "multiple of the chunk"),
                       ({"frames": good["frames"].astype(np.float32)}, "uint8"),
                       ({"mask": good["mask"][:, :16]}, "mask")):
        with pytest.raises(ValueError, match=match):
            train.loss_and_grads(params, {**good, **bad}, jax.random.key(0), NO_DROPOUT, SMALL)


# ---------------------------------------------------------------- forward pass and dropout


def test_training_forward_without_dropout_equals_apply_chunk(params):
    frames = _batch()["frames"]
    y = train.train_forward(params, frames, jax.random.key(0), NO_DROPOUT, SMALL)
    ref, _ = model.apply_chunk(params, jnp.asarray(frames), MEState.zeros(2, SMALL), cfg=SMALL)
    assert y.shape == (2, 2 * SMALL.chunk)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


def test_gaussian_dropout_is_kerass():
    x = jnp.ones((8, 160, 64))
    key = jax.random.key(0)
    noisy = train.gaussian_dropout(key, 0.5)(x, 0)
    assert abs(float(noisy.mean()) - 1) < 0.02 and abs(float(noisy.std()) - 1) < 0.02  # sqrt(0.5 / 0.5)
    assert abs(float(train.gaussian_dropout(key, 0.2)(x, 0).std()) - 0.5) < 0.01  # sqrt(0.2 / 0.8)
    assert not np.array_equal(noisy, train.gaussian_dropout(key, 0.5)(x, 1))  # each site its own draw
    np.testing.assert_array_equal(train.gaussian_dropout(key, 0.0)(x * 3, 0), x * 3)


def test_dropout_is_deterministic_per_key_and_fresh_per_step(params):
    frames = _batch()["frames"]
    hp = train.TrainHParams()  # dropout 0.5, as published
    rng = jax.random.key(7)
    step0, step1 = (jax.random.fold_in(rng, s) for s in (0, 1))  # train_step's key for steps 0 and 1
    a = train.train_forward(params, frames, step0, hp, SMALL)
    np.testing.assert_array_equal(a, train.train_forward(params, frames, step0, hp, SMALL))
    b = train.train_forward(params, frames, step1, hp, SMALL)
    clean = train.train_forward(params, frames, step0, NO_DROPOUT, SMALL)
    assert not np.allclose(a, b, atol=1e-3) and not np.allclose(a, clean, atol=1e-3)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", train.LOSSES)
def test_gradient_equals_finite_differences_float64(params, kind):
    batch = _batch(seed=1)
    hp = train.TrainHParams(dropout=0.0, loss=kind, compute_dtype="float64")
    key = jax.random.key(0)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        loss, grads = train.loss_and_grads(p64, batch, key, hp, SMALL)
        assert grads["out_proj"].dtype == jnp.float64

        def loss_at(p):
            y = train.train_forward(p, batch["frames"], key, hp, SMALL)
            return float(train.sequence_loss(y, batch["bvp"], batch["mask"], kind))

        np.testing.assert_allclose(float(loss), loss_at(p64), rtol=1e-12)
        leaves, treedef = jax.tree.flatten(p64)
        for seed in range(3):
            rng = np.random.default_rng(seed)
            v = [rng.standard_normal(a.shape) * (float(jnp.std(a)) + 1e-2) for a in leaves]  # scaled per leaf
            v = jax.tree.unflatten(treedef, v)
            # A tiny step: the ReLUs' kinks, crossed by some of ~10^6 units at h = 1e-5, cost central
            # differences up to 1e-2 there; at 1e-8 in float64 few are crossed and rounding is ~1e-8.
            h = 1e-8
            fd = (loss_at(jax.tree.map(lambda a, d: a + h * d, p64, v))
                  - loss_at(jax.tree.map(lambda a, d: a - h * d, p64, v))) / (2 * h)
            exact = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(v)))
            np.testing.assert_allclose(exact, fd, rtol=2e-5, atol=1e-7)


@pytest.mark.slow
def test_chunked_whole_and_remat_gradients_agree(params):
    batch = _batch(seed=2)
    hp = train.TrainHParams()  # with dropout: every method draws the same noise
    key = jax.random.key(3)
    loss, grads = train.loss_and_grads(params, batch, key, hp, SMALL, method="chunked")
    for method in ("whole", "remat"):
        loss_m, grads_m = train.loss_and_grads(params, batch, key, hp, SMALL, method=method)
        np.testing.assert_allclose(loss_m, loss, rtol=1e-6)
        assert _max_rel_diff(grads_m, grads) < 2e-5, method


@pytest.mark.slow
def test_bfloat16_compute_trains_close_to_float32(params):
    batch = _batch(seed=4)
    loss, grads = train.loss_and_grads(params, batch, jax.random.key(0), NO_DROPOUT, SMALL)
    hp16 = train.TrainHParams(dropout=0.0, compute_dtype="bfloat16")
    loss16, grads16 = train.loss_and_grads(params, batch, jax.random.key(0), hp16, SMALL)
    assert grads16["out_proj"].dtype == jnp.float32  # parameters and gradients stay float32
    np.testing.assert_allclose(loss16, loss, rtol=2e-2)
    cos = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads16)))
    norms = float(train.optax.global_norm(grads) * train.optax.global_norm(grads16))
    assert cos / norms > 0.99


# ---------------------------------------------------------------- the step


def test_learning_rate_zero_leaves_params_unchanged(params):
    before = jax.tree.map(np.array, params)
    hp = train.TrainHParams(lr=0.0, dropout=0.0)
    state = train.init_train_state(params, hp, seed=0)
    state, metrics = train.train_step(state, _batch(seed=5), hp, SMALL)
    assert sorted(metrics) == ["grad_norm", "loss", "lr"]
    assert int(state["step"]) == 1 and float(metrics["lr"]) == 0.0 and float(metrics["grad_norm"]) > 0
    for a, b, c in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(c, b)  # the caller's arrays survive the donated step


def test_masked_out_labels_change_neither_loss_nor_gradients(params):
    batch = _batch(seed=5)
    relabelled = {**batch, "bvp": np.where(batch["mask"], batch["bvp"], 5.0).astype(np.float32)}
    key = jax.random.key(0)
    loss_a, grads_a = train.loss_and_grads(params, batch, key, NO_DROPOUT, SMALL)
    loss_b, grads_b = train.loss_and_grads(params, relabelled, key, NO_DROPOUT, SMALL)
    assert float(loss_a) == float(loss_b)
    assert _max_rel_diff(grads_b, grads_a) == 0.0


@pytest.mark.parametrize("kind", train.LOSSES)
def test_micro_batches_sum_to_the_batch_gradient(params, kind):
    batch, key = _batch(batch=4, seed=7), jax.random.key(0)
    whole = dataclasses.replace(NO_DROPOUT, loss=kind, batch_size=4)
    loss_a, grads_a = train.loss_and_grads(params, batch, key, whole, SMALL)
    loss_b, grads_b = train.loss_and_grads(params, batch, key, dataclasses.replace(whole, micro_batch=2), SMALL)
    assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-6)
    # leaves the loss cannot move (the output bias under Pearson) are rounding-level in both: compare those
    # against the largest gradient anywhere
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_a))
    for got, want in zip(jax.tree.leaves(grads_b), jax.tree.leaves(grads_a)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale)
    with pytest.raises(ValueError, match="micro_batch must divide"):
        dataclasses.replace(whole, micro_batch=3)


def test_steps_on_one_batch_reduce_its_loss(params):
    batch, hp = _batch(seed=5), NO_DROPOUT  # the published learning rate
    state = train.init_train_state(params, hp, seed=0)
    losses = []
    for _ in range(3):
        state, metrics = train.train_step(state, batch, hp, SMALL)
        losses.append(float(metrics["loss"]))
    assert int(state["step"]) == 3 and losses[2] < losses[0], losses


DATA_PARALLEL = """
import json, jax, jax.numpy as jnp, numpy as np
from model import train
from model.weights import load_params
from tests.test_train_model import SMALL, _batch
assert jax.device_count() == 2, jax.devices()
assert jnp.ones(1).dtype == jnp.float64  # float64: rounding does not hide a difference between the meshes
params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), load_params("rlap", SMALL))
hp, batch, out = train.TrainHParams(compute_dtype="float64"), _batch(batch=4, seed=6), {}
for n in (1, 2):
    mesh = train.data_mesh(jax.devices()[:n])
    state = train.init_train_state(params, hp, seed=1, mesh=mesh)
    sharded = train.shard_batch(batch, mesh)
    assert len(sharded["frames"].sharding.device_set) == n
    _, grads = train.loss_and_grads(state["params"], sharded, jax.random.key(2), hp, SMALL)
    state, metrics = train.train_step(state, sharded, hp, SMALL)
    p = state["params"]["out_proj"]
    assert len(p.sharding.device_set) == n and p.is_fully_replicated
    out[n] = [[np.asarray(a).tolist() for a in jax.tree.leaves(t)] for t in (grads, state["params"])]
    out[n].append(float(metrics["loss"]))
try:
    train.shard_batch(_batch(batch=3), train.data_mesh())
    out["uneven"] = "accepted"
except ValueError as e:
    out["uneven"] = str(e)
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_two_devices_take_the_same_step_as_one():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "JAX_ENABLE_X64": "1"}
    run = subprocess.run([sys.executable, "-c", DATA_PARALLEL], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.split("RESULT", 1)[1])
    (grads1, params1, loss1), (grads2, params2, loss2) = out["1"], out["2"]
    np.testing.assert_allclose(loss2, loss1, rtol=1e-6)
    for a, b in zip(grads2 + params2, grads1 + params1):  # gradients: the two halves' summed across devices
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert "does not split over 2 devices" in out["uneven"]


MULTI_PROCESS = """
import hashlib, json, sys, jax, numpy as np
from model import train
from model.weights import load_params
from tests.test_train_model import SMALL, _batch
rank, world, address = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if world > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, world, rank)
hp = train.TrainHParams(micro_batch=2)  # dropout on: each micro-batch draws the noise of its place in the batch
batch = _batch(batch=4, seed=7)
part = {k: v[rank * 4 // world:(rank + 1) * 4 // world] for k, v in batch.items()}
state = train.init_train_state(load_params("rlap", SMALL), hp, seed=3)
losses = []
for _ in range(2):
    state, metrics = train.train_step(state, part, hp, SMALL)
    losses.append(float(metrics["loss"]))
digest = hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in jax.tree.leaves(state["params"]))).hexdigest()
print("RESULT" + json.dumps({"losses": losses, "params_sha256": digest}), flush=True)
if world > 1:
    jax.distributed.shutdown()  # together: a process that leaves first takes the coordinator with it
"""


@pytest.mark.slow
def test_two_processes_each_with_half_the_batch_take_the_same_steps_as_one():
    import socket

    with socket.socket() as s:  # a free port on loopback for the coordinator
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def start(rank, world):
        return subprocess.Popen([sys.executable, "-c", MULTI_PROCESS, str(rank), str(world), address], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    runs = [start(0, 1), start(0, 2), start(1, 2)]
    try:
        outs = [r.communicate(timeout=900) for r in runs]
    finally:
        for r in runs:
            r.kill()
    results = []
    for r, (out, err) in zip(runs, outs):
        assert r.returncode == 0, "\n".join(line for line in err.splitlines() if not line.lstrip().startswith("@"))[-3000:]
        results.append(json.loads(out.split("RESULT", 1)[1]))
    one, *two = results
    for other in two:  # one micro-batch per process: the same sums in the same order, so the same bits
        assert other == one
