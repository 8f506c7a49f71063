"""Import the published ME-rPPG weights (Keras 3 `.h5`) and initial state (`state.pkl`), and PhysMamba's, as pytrees.

Parameter pytree (K = 32 filters, float32):
  blocks[i]: in_proj (3 or K, K); ds {w (2, 2, K, K), b (K,)};
    layers[j]: conv1 {w (3, 3, K, K), b}; dense1 {w (K, 2K), b}; conv2 {w (3, 3, K, K), b}; proj (2K, K);
      mamba: in_proj (2K, 516), conv_w (12, 384), conv_b (384,), dt_bias (4,), A_log (4,), D (4,),
             norm (128,), out_proj (128, 2K)
  out_proj (K, 32); head: mamba[2] (as above with d 32, 2 heads, k_conv 4), dense {w (32, 1), b (1,)}

PhysMamba (`load_physmamba_params`; C = 64 on the slow stream, 32 on the fast one, d = 2C, R = C / 16):
  conv_bn = {conv: {w (kt, kh, kw, in, out), b (out,)}, bn: {gamma, beta, mean, var (out,)}}
  stem[3]: conv_bn 3->16 (1x5x5), 16->32, 32->64 (3x3x3); slow_in: conv_bn 64->64 (4x1x1); fast_in: 64->32 (2x1x1)
  slow[3], fast[3]: cdc (3, 3, 3, C, C), bn, channel_att {fc1 (C, C/2), fc2 (C/2, C)},
    mamba_layer: norm1, norm2 {gamma, beta (C,)}, channel_att, mamba: in_proj (C, 2d), conv_w (4, d),
      conv_b (d,), x_proj (d, R + 64), dt_proj {w (R, d), b (d,)}, A_log (d, 16), D (d,), out_proj (2d, C)
  fuse[2]: conv_bn 32->64 (3x1x1); slow_up: 64->64, fast_out: 32->32, head_up: 96->48 (3x1x1);
  head {w (48, 1), b (1,)}
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import sys
from pathlib import Path

import h5py
import jax
import numpy as np

from model.config import ME, MEConfig, architecture
from model.me_rppg import param_count
from model.state import MambaState, MEState, SSConvState, TNState
from transforms.published_files import SHA256, PublishedFileError, published_path

WEIGHT_FILES = {"rlap": "ME.rlap.weights.h5", "pure": "ME.pure.weights.h5"}
PHYSMAMBA_WEIGHT_FILES = {"rlap": "PhysMamba.rlap.weights.h5", "pure": "PhysMamba.pure.weights.h5"}
RUN_WEIGHTS, RUN_STATE = "best.weights.h5", "best.state.npz"  # in a `pulsepipe train` run folder
CHAMPION, VERSIONS = "champion", "models"  # a `pulsepipe refresh` registry: the pointer, and models/<version>/
ARCHITECTURE_ATTR = "pulsepipe.architecture"  # JSON of model.config.architecture, in files save_params writes


def _arr(ds) -> np.ndarray:
    return np.asarray(ds[()], dtype=np.float32)  # some layers were saved as float16


def _mamba(g) -> dict:
    # Mamba2.build adds its own variables in the order dt_bias, A_log, D -> vars/0, 1, 2.
    return {
        "in_proj": _arr(g["in_proj/vars/0"]),
        "conv_w": _arr(g["conv1d/vars/0"])[:, 0, :],  # Keras depthwise (k, 1, C) -> (k, C)
        "conv_b": _arr(g["conv1d/vars/1"]),
        "dt_bias": _arr(g["vars/0"]),
        "A_log": _arr(g["vars/1"]),
        "D": _arr(g["vars/2"])[:, 0],
        "norm": _arr(g["norm/vars/0"]),
        "out_proj": _arr(g["out_proj/vars/0"]),
    }


def _conv(g) -> dict:
    return {"w": _arr(g["vars/0"])[0], "b": _arr(g["vars/1"])}  # Conv3D (1, kh, kw, in, out) -> HWIO


def _keras_name(base: str, i: int) -> str:
    return base if i == 0 else f"{base}_{i}"  # Keras auto-names: ssc_block, ssc_block_1, ...


def weights_folder(path: Path) -> Path:
    """A `pulsepipe refresh` registry root (a folder holding the `champion` pointer) as its champion's
    version folder, `models/<version>/` (a run folder's files); any other path as given."""
    pointer = path / CHAMPION
    return path / VERSIONS / pointer.read_text().strip() if pointer.is_file() else path


def weights_path(weights: str | Path) -> Path:
    """The .h5 file of 'rlap', 'pure', a path to a weights file, a training run folder (its best weights),
    or a refresh registry (its champion's) or one of its versions."""
    if str(weights) in WEIGHT_FILES:
        return published_path(WEIGHT_FILES[str(weights)])
    path = weights_folder(Path(weights))
    if path.is_dir():
        if not (path / RUN_WEIGHTS).is_file():
            raise FileNotFoundError(f"{path}: a folder without {RUN_WEIGHTS}: not a `pulsepipe train` run folder "
                                    "(or its run has not validated yet)")
        return path / RUN_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file; use 'rlap', 'pure', a path to an ME .h5 file "
                                "or a training run folder")
    return path


def weights_config(weights: str | Path = "rlap") -> MEConfig:
    """The network a weights file holds: the architecture `save_params` recorded in it (a training run's,
    which may be reduced), else the published one."""
    with h5py.File(weights_path(weights), "r") as f:
        recorded = f.attrs.get(ARCHITECTURE_ATTR)
    return ME if recorded is None else dataclasses.replace(ME, **json.loads(recorded))


def load_params(weights: str | Path = "rlap", cfg: MEConfig | None = None) -> dict:
    """The parameter pytree (nested dicts of numpy float32) from 'rlap', 'pure' or an .h5 path, for cfg
    (default: the file's own, `weights_config`; a smaller cfg reads the leading blocks and layers)."""
    cfg = cfg or weights_config(weights)
    with h5py.File(weights_path(weights), "r") as f:
        blocks = []
        for i in range(cfg.n_blocks):
            g = f[f"layers/sequential/layers/{_keras_name('ssc_block', i)}"]
            layers = []
            for j in range(cfg.layers_per_block):
                s = g[f"ssc/layers/{_keras_name('ss_conv', j)}"]
                layers.append({
                    "conv1": _conv(s["conv1/layers/conv3d"]),
                    "dense1": {"w": _arr(s["conv1/layers/dense/vars/0"]), "b": _arr(s["conv1/layers/dense/vars/1"])},
                    "mamba": _mamba(s["mamba"]),
                    "proj": _arr(s["proj/vars/0"]),
                    "conv2": _conv(s["conv2"]),
                })
            blocks.append({"in_proj": _arr(g["in_proj/vars/0"]), "layers": layers, "ds": _conv(g["ds"])})
        head = {
            "mamba": [_mamba(f[f"head/layers/{_keras_name('mamba2', m)}"]) for m in range(cfg.head_layers)],
            "dense": {"w": _arr(f["head/layers/dense/vars/0"]), "b": _arr(f["head/layers/dense/vars/1"])},
        }
        return {"blocks": blocks, "out_proj": _arr(f["layers/sequential_1/layers/dense/vars/0"]), "head": head}


def _keras_arrays(params, cfg: MEConfig) -> dict[str, np.ndarray]:
    """h5 path -> float32 array in its Keras shape: what `load_params` reads, mapped back."""
    out = {}

    def put(path, a, keras_shape=None):
        a = np.asarray(a, np.float32)
        out[path] = a if keras_shape is None else a.reshape(keras_shape)

    def mamba(g, p):
        put(f"{g}/in_proj/vars/0", p["in_proj"])
        k, c = np.shape(p["conv_w"])
        put(f"{g}/conv1d/vars/0", p["conv_w"], (k, 1, c))  # Keras depthwise kernel (k, 1, C)
        put(f"{g}/conv1d/vars/1", p["conv_b"])
        put(f"{g}/vars/0", p["dt_bias"])  # Mamba2.build's own variables, in order: dt_bias, A_log, D
        put(f"{g}/vars/1", p["A_log"])
        put(f"{g}/vars/2", p["D"], (-1, 1))  # D is (h, 1) in Keras
        put(f"{g}/norm/vars/0", p["norm"])
        put(f"{g}/out_proj/vars/0", p["out_proj"])

    def conv(g, p):
        put(f"{g}/vars/0", p["w"], (1, *np.shape(p["w"])))  # HWIO -> Conv3D (1, kh, kw, in, out)
        put(f"{g}/vars/1", p["b"])

    for i, bp in enumerate(params["blocks"][:cfg.n_blocks]):
        g = f"layers/sequential/layers/{_keras_name('ssc_block', i)}"
        put(f"{g}/in_proj/vars/0", bp["in_proj"])
        conv(f"{g}/ds", bp["ds"])
        for j, lp in enumerate(bp["layers"][:cfg.layers_per_block]):
            s = f"{g}/ssc/layers/{_keras_name('ss_conv', j)}"
            conv(f"{s}/conv1/layers/conv3d", lp["conv1"])
            put(f"{s}/conv1/layers/dense/vars/0", lp["dense1"]["w"])
            put(f"{s}/conv1/layers/dense/vars/1", lp["dense1"]["b"])
            mamba(f"{s}/mamba", lp["mamba"])
            put(f"{s}/proj/vars/0", lp["proj"])
            conv(f"{s}/conv2", lp["conv2"])
    for m, mp in enumerate(params["head"]["mamba"][:cfg.head_layers]):
        mamba(f"head/layers/{_keras_name('mamba2', m)}", mp)
    put("head/layers/dense/vars/0", params["head"]["dense"]["w"])
    put("head/layers/dense/vars/1", params["head"]["dense"]["b"])
    put("layers/sequential_1/layers/dense/vars/0", params["out_proj"])
    return out


def save_params(params, path: str | Path, cfg: MEConfig = ME) -> Path:
    """Write a parameter pytree (numpy or jax arrays) as a Keras 3 `.h5` in the published layout, float32.

    `load_params(path, cfg)` returns the same arrays; for the full cfg the file passes `check_weights`.
    Written to a temporary name and renamed, so a reader never sees half a file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs[ARCHITECTURE_ATTR] = json.dumps(architecture(cfg), sort_keys=True)
        for name, a in _keras_arrays(params, cfg).items():
            f.create_dataset(name, data=a)
    tmp.replace(path)
    return path


def _stored_value_count(weights: str | Path) -> int:
    """Number of values stored in a weights file, counted from the file alone."""
    sizes = []
    with h5py.File(weights_path(weights), "r") as f:
        f.visititems(lambda _, o: sizes.append(o.size) if isinstance(o, h5py.Dataset) else None)
    return int(sum(sizes))


def check_weights(weights: str | Path = "rlap") -> int:
    """The parameter count of a weights file; ValueError unless `load_params` imports every value it
    stores (a value left behind is a layer the network does not run)."""
    n, stored = param_count(load_params(weights)), _stored_value_count(weights)
    if n != stored:
        raise ValueError(f"{weights_path(weights)}: {stored:,} values stored, {n:,} imported as parameters")
    return n


def save_run_weights(run: str | Path, params, initial_state: MEState, cfg: MEConfig = ME) -> None:
    """A training run's best weights, `run/best.weights.h5`, and the inference state that goes with them,
    `run/best.state.npz`: what `weights_path(run)` and `load_initial_state(cfg, run)` read."""
    run = Path(run)
    leaves = {f"{i:03d}": np.asarray(a, np.float32) for i, a in enumerate(jax.tree.leaves(initial_state))}
    tmp = run / f".{RUN_STATE}.tmp.npz"
    np.savez(tmp, **leaves)
    tmp.replace(run / RUN_STATE)  # the state first: best.weights.h5 appearing means both are there
    save_params(params, run / RUN_WEIGHTS, cfg)


def load_initial_state(cfg: MEConfig | None = None, weights: str | Path = "rlap") -> MEState:
    """The initial inference state (batch 1) that goes with `weights`: a training run folder's own
    (`save_run_weights`), else the published one; cfg defaults to the weights' own (`weights_config`).

    `state.pkl` is a pickle (of jax arrays), so it is unpickled only after its sha256 check.
    """
    cfg = cfg or weights_config(weights)
    run_state = weights_folder(Path(weights)) / RUN_STATE
    if str(weights) not in WEIGHT_FILES and run_state.is_file():
        template, treedef = jax.tree.flatten(MEState.zeros(1, cfg))
        with np.load(run_state) as stored:
            leaves = [stored[k] for k in sorted(stored.files)]
        if [a.shape for a in leaves] != [a.shape for a in template]:
            raise ValueError(f"{run_state}: the state's shapes do not fit the ME-rPPG config")
        return jax.tree.unflatten(treedef, leaves)
    with open(published_path("state.pkl"), "rb") as f:
        raw = pickle.load(f)  # nested lists/dicts of jax arrays, the reference's state layout

    def mamba(s):  # [ssd (1, 1, h, p, n), conv (1, k, C)]
        return MambaState(np.asarray(s[0], np.float32)[:, 0], np.asarray(s[1], np.float32))

    blocks = tuple(
        tuple(
            SSConvState(
                TNState(np.asarray(l["tn"]["xmean"], np.float32)[:, 0], np.asarray(l["tn"]["x2mean"], np.float32)[:, 0]),
                mamba(l["mamba"]),
            )
            for l in raw[i]
        )
        for i in range(cfg.n_blocks)
    )
    head = tuple(mamba(raw[cfg.n_blocks + m]) for m in range(cfg.head_layers))
    return MEState(blocks, head)


# ---------------------------------------------------------------- PhysMamba


def physmamba_weights_path(weights: str | Path) -> Path:
    """The PhysMamba .h5 file of 'rlap', 'pure' (sha256-checked) or a path to one."""
    if str(weights) in PHYSMAMBA_WEIGHT_FILES:
        return published_path(PHYSMAMBA_WEIGHT_FILES[str(weights)])
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file; use 'rlap', 'pure' or a path to a PhysMamba .h5 file")
    return path


def _fc(g) -> np.ndarray:
    return _arr(g["vars/0"])[0, 0, 0]  # 1x1x1 Conv3D (1, 1, 1, in, out) without bias -> (in, out)


def _conv_bn(g) -> dict:
    # Keras BatchNormalization stores gamma, beta, moving_mean, moving_variance as vars/0..3.
    bn = g["layers/batch_normalization/vars"]
    return {"conv": {"w": _arr(g["layers/conv3d/vars/0"]), "b": _arr(g["layers/conv3d/vars/1"])},
            "bn": {k: _arr(bn[str(i)]) for i, k in enumerate(("gamma", "beta", "mean", "var"))}}


def _channel_att(g) -> dict:
    return {"fc1": _fc(g["fc/layers/conv3d"]), "fc2": _fc(g["fc/layers/conv3d_1"])}


def _physmamba_block(g) -> dict:
    m, ml = g["layers/mamba_layer/mamba"], g["layers/mamba_layer"]
    norm = lambda n: {"gamma": _arr(ml[f"{n}/vars/0"]), "beta": _arr(ml[f"{n}/vars/1"])}
    bn = g["layers/batch_normalization/vars"]
    return {
        "cdc": _arr(g["layers/cdc/vars/0"]),
        "bn": {k: _arr(bn[str(i)]) for i, k in enumerate(("gamma", "beta", "mean", "var"))},
        "mamba_layer": {
            "norm1": norm("norm1"),
            "mamba": {
                "in_proj": _arr(m["in_projection/vars/0"]),
                "conv_w": _arr(m["conv1d/vars/0"])[:, 0, :],  # Keras depthwise (k, 1, d) -> (k, d)
                "conv_b": _arr(m["conv1d/vars/1"]),
                "x_proj": _arr(m["x_projection/vars/0"]),
                "dt_proj": {"w": _arr(m["delta_t_projection/vars/0"]), "b": _arr(m["delta_t_projection/vars/1"])},
                "A_log": _arr(m["vars/0"]),  # BiMamba.build adds A_log, then D
                "D": _arr(m["vars/1"]),
                "out_proj": _arr(m["out_projection/vars/0"]),
            },
            "norm2": norm("norm2"),
            "channel_att": _channel_att(ml["channel_att"]),
        },
        "channel_att": _channel_att(g["layers/channel_attention3d"]),
    }


def load_physmamba_params(weights: str | Path = "rlap") -> dict:
    """The PhysMamba parameter pytree (nested dicts of numpy float32) from 'rlap', 'pure' or an .h5 path."""
    with h5py.File(physmamba_weights_path(weights), "r") as f:
        # upsample1 and upsample2 are unnamed Sequentials: Keras stored them as layers/sequential_12, _13.
        return {
            "stem": [_conv_bn(f[f"conv_block{i}"]) for i in (1, 2, 3)],
            "slow_in": _conv_bn(f["conv_block4"]),
            "fast_in": _conv_bn(f["conv_block5"]),
            "slow": [_physmamba_block(f[f"block{i}"]) for i in (1, 2, 3)],
            "fast": [_physmamba_block(f[f"block{i}"]) for i in (4, 5, 6)],
            "fuse": [_conv_bn(f[f"fuse_{i}/conv"]) for i in (1, 2)],
            "slow_up": _conv_bn(f["layers/sequential_12"]),
            "fast_out": _conv_bn(f["conv_block6"]),
            "head_up": _conv_bn(f["layers/sequential_13"]),
            "head": {"w": _arr(f["conv_last/vars/0"])[0, 0, 0], "b": _arr(f["conv_last/vars/1"])},
        }


def check_physmamba_weights(weights: str | Path = "rlap") -> int:
    """The parameter count of a PhysMamba weights file; ValueError unless every stored value is imported."""
    path = physmamba_weights_path(weights)
    n, stored = param_count(load_physmamba_params(path)), _stored_value_count(path)
    if n != stored:
        raise ValueError(f"{path}: {stored:,} values stored, {n:,} imported as parameters")
    return n


def check_published() -> None:
    """Raise PublishedFileError unless every published file is present with its sha256."""
    for name in SHA256:
        published_path(name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.weights", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="verify the published files and that every value of each weights file is imported")
    args = ap.parse_args(argv)
    if not args.check:
        ap.print_help()
        return 0
    try:
        check_published()
        counts = {name: check_weights(name) for name in WEIGHT_FILES}
        physmamba_counts = {name: check_physmamba_weights(name) for name in PHYSMAMBA_WEIGHT_FILES}
    except (PublishedFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, n in counts.items():
        print(f"ME-rPPG {name}: {n:,} parameters, every stored value imported")
    for name, n in physmamba_counts.items():
        print(f"PhysMamba {name}: {n:,} parameters, every stored value imported")
    print(f"all {len(SHA256)} published files present with the expected sha256")
    return 0


if __name__ == "__main__":
    sys.exit(main())
