"""Import the published ME-rPPG weights (Keras 3 `.h5`) and initial state (`state.pkl`) as pytrees.

Parameter pytree (K = 32 filters, float32):
  blocks[i]: in_proj (3 or K, K); ds {w (2, 2, K, K), b (K,)};
    layers[j]: conv1 {w (3, 3, K, K), b}; dense1 {w (K, 2K), b}; conv2 {w (3, 3, K, K), b}; proj (2K, K);
      mamba: in_proj (2K, 516), conv_w (12, 384), conv_b (384,), dt_bias (4,), A_log (4,), D (4,),
             norm (128,), out_proj (128, 2K)
  out_proj (K, 32); head: mamba[2] (as above with d 32, 2 heads, k_conv 4), dense {w (32, 1), b (1,)}
"""
from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import h5py
import numpy as np

from model.config import ME, MEConfig
from transforms.published_files import SHA256, PublishedFileError, published_path

WEIGHT_FILES = {"rlap": "ME.rlap.weights.h5", "pure": "ME.pure.weights.h5"}


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


def weights_path(weights: str | Path) -> Path:
    if str(weights) in WEIGHT_FILES:
        return published_path(WEIGHT_FILES[str(weights)])
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file; use 'rlap', 'pure' or a path to an ME .h5 file")
    return path


def load_params(weights: str | Path = "rlap", cfg: MEConfig = ME) -> dict:
    """The parameter pytree (nested dicts of numpy float32) from 'rlap', 'pure' or an .h5 path."""
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


def h5_value_count(weights: str | Path = "rlap") -> int:
    """Number of stored values in a weights file, counted from the file alone."""
    sizes = []
    with h5py.File(weights_path(weights), "r") as f:
        f.visititems(lambda _, o: sizes.append(o.size) if isinstance(o, h5py.Dataset) else None)
    return int(sum(sizes))


def load_initial_state(cfg: MEConfig = ME):
    """The published initial state (batch 1) as an MEState.

    `state.pkl` is a pickle (of jax arrays), so it is unpickled only after its sha256 check.
    """
    from model.me_rppg import MambaState, MEState, SSConvState, TNState

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


def check_published() -> None:
    """Raise PublishedFileError unless every published file is present with its sha256."""
    for name in SHA256:
        published_path(name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.weights", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="verify the published files and print the ME parameter count")
    args = ap.parse_args(argv)
    if not args.check:
        ap.print_help()
        return 0
    try:
        check_published()
    except PublishedFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from model.me_rppg import param_count

    for name in WEIGHT_FILES:
        print(f"ME-rPPG {name}: {param_count(load_params(name)):,} parameters")
    print(f"all {len(SHA256)} published files present with the expected sha256")
    return 0


if __name__ == "__main__":
    sys.exit(main())
