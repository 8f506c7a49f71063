"""infra/: the cluster files agree with the versions this package pins, so an image runs what CI tested."""
from __future__ import annotations

import importlib.metadata
import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "infra/docker/Dockerfile").read_text()


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def test_beam_sdk_image_matches_the_installed_apache_beam():
    # the boot program and the SDK must be the same release, or Dataflow workers fail to start
    (tag,) = re.findall(r"FROM apache/beam_python3\.11_sdk:(\S+)", DOCKERFILE)
    assert _minor(tag) == _minor(importlib.metadata.version("apache-beam"))


def test_every_place_installs_the_same_open_rppg_wheel():
    pins = set(re.findall(r"open-rppg==(\S+)", DOCKERFILE + (ROOT / "Makefile").read_text()))
    assert pins == {"0.1.1"}


def test_ray_cluster_matches_the_installed_ray_and_has_cpu_and_gpu_workers():
    spec = yaml.safe_load((ROOT / "infra/ray/raycluster.yaml").read_text())["spec"]
    assert _minor(spec["rayVersion"]) == _minor(importlib.metadata.version("ray"))
    groups = {g["groupName"]: g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]}
    assert groups["gpu"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert groups["gpu"]["image"].endswith(":gpu") and groups["cpu"]["image"].endswith(":cpu")


def test_dataflow_launcher_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "infra/dataflow/preprocess.sh")], check=True)
