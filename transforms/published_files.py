"""The published files this project reproduces: data files of the `open-rppg==0.1.1` wheel.

The wheel is installed with `pip install --no-deps` so its files are on disk; its Python package is never
imported (it pulls keras, onnxruntime and a GUI OpenCV). Each file is checked against its sha256 before use.
Set PULSEPIPE_WEIGHTS_DIR to a folder holding the same files to use them from elsewhere.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path

WHEEL = "open-rppg==0.1.1"

SHA256 = {
    "ME.rlap.weights.h5": "d774c0fcca06255c6a59c774314751617731901c26dcc9e12519101f6a42f6dc",
    "ME.pure.weights.h5": "2135995cb4161d1d4c7c3aa45d333dc6b1f5818b0652d11da9fc0fb0b6e11bf0",
    "state.pkl": "d894487c5f0162dd798a8e7f8aabedb958b48cab8e4a31abdd433f97826c57f4",
    "blaze_face_short_range.tflite": "b4578f35940bf5a1a655214a1cce5cab13eba73c1297cd78e1a04c2380b0152f",
    "PhysMamba.rlap.weights.h5": "e92c4c5817ff01b79be3ab5541c83f0a1b24f6afdc5fa212d2bc42e16d50a0c0",
    "PhysMamba.pure.weights.h5": "113b1189737cbc37933bb15e2af523c23f7f2fdc8fa13409f34586916a92f2a3",
}

HOW_TO_GET = (
    f"install the published files with `pip install --no-deps {WHEEL}` (the Makefile does this), "
    "or set PULSEPIPE_WEIGHTS_DIR to a folder that holds them"
)


class PublishedFileError(RuntimeError):
    """A published file is missing or is not the expected one."""


def weights_dir() -> Path:
    """The folder holding the wheel's `rppg/weights/*` files."""
    override = os.environ.get("PULSEPIPE_WEIGHTS_DIR")
    if override:
        return Path(override)
    try:
        dist = importlib.metadata.distribution("open-rppg")
    except importlib.metadata.PackageNotFoundError:
        raise PublishedFileError(f"the {WHEEL} wheel is not installed: {HOW_TO_GET}") from None
    return Path(dist.locate_file("rppg/weights"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def published_path(name: str) -> Path:
    """Path of one published file, after checking that it exists and has the expected sha256."""
    if name not in SHA256:
        raise PublishedFileError(f"unknown published file {name!r}; known: {sorted(SHA256)}")
    path = weights_dir() / name
    if not path.is_file():
        raise PublishedFileError(f"{path}: missing; {HOW_TO_GET}")
    got = sha256_of(path)
    if got != SHA256[name]:
        raise PublishedFileError(f"{path}: sha256 {got} is not the published {SHA256[name]}; {HOW_TO_GET}")
    return path
