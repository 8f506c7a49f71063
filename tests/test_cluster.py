"""A real multi-node Ray cluster on this machine: Ray's own harness (`ray.cluster_utils.Cluster`, a head and
two worker nodes of one CPU each) runs `pulsepipe preprocess --ray-address` in a separate driver process.
An undisturbed run's shards equal a local run's byte for byte; a worker node removed gracefully, or lost
abruptly (removed without grace, or its raylet SIGKILLed) while it holds a recording, ends with the same
outputs; and no Ray process of the test outlives it.

Every Ray process of the test listens and talks on 127.0.0.1 only (checked on its sockets): the nodes are
started on that address, and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps the driver from rewriting the
cluster's address 127.0.0.1 to this machine's interface address, where nothing listens (Ray does that on
Linux so that other hosts can join: `ray._private.services.get_node_ip_address`). Each cluster keeps its
files under its own RAY_TMPDIR, so its address file (`ray_current_cluster`) never makes another process's
plain `ray.init()` join it. Its processes are told apart from any other Ray on this machine by a marker in
their environment, which every process Ray starts inherits.
"""
from __future__ import annotations

import glob
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import fsspec
import pytest

from transforms import synth
from transforms.manifest import read_manifest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
N, SECONDS = 6, 20  # recordings of about 3 s of work each on a one-CPU node: a node is lost while it holds one
NODE = {"node_ip_address": "127.0.0.1", "num_cpus": 1}
MARK = "PULSEPIPE_CLUSTER_TEST"
JOB_TIMEOUT_S = 300  # a run that survives a lost node takes under a minute here, much of it Ray noticing the loss
BUSY_TIMEOUT_S = 120  # for the job to start a recording on the worker node to lose
GONE_TIMEOUT_S = 30  # for the processes of an ended job, or of a stopped cluster, to exit


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    synth.write_cohort(out, subjects=N, seconds=SECONDS, seed=5, size=(160, 120))
    return out


@pytest.fixture(scope="module")
def local_run(cohort, tmp_path_factory) -> Path:
    """The job on Ray started in-process by the driver, under a Ray folder of its own."""
    root = tmp_path_factory.mktemp("local")
    ray_tmp = tempfile.mkdtemp(prefix="ppray-", dir="/tmp")
    try:
        code, log = run_job(cohort, root / "out", root / "driver.log", {"RAY_TMPDIR": ray_tmp}, "--workers", "2")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert code == 0, log[-3000:]
    return root / "out"


def test_an_undisturbed_cluster_run_equals_a_local_run_and_stays_on_loopback(cohort, local_run, tmp_path):
    seen, sockets = {}, []
    with LocalCluster() as cluster:
        def while_running(driver):
            cluster.busy_worker_node(driver)
            seen.update(cluster.processes())
            sockets.extend(tcp_sockets(seen))

        code, log = run_job(cohort, tmp_path / "out", tmp_path / "driver.log", cluster.env, "--ray-address",
                            cluster.address, during=while_running)
        assert code == 0, log[-3000:]
        cluster.assert_job_workers_end()
    assert cluster.leftovers == {}, "Ray processes outlived the cluster"
    # what the marker finds is the whole cluster: the checks for leftovers miss nothing
    commands = [cmd.split()[0] for cmd in seen.values()]
    assert sum(c.endswith("/gcs_server") for c in commands) == 1 and sum(c.endswith("/raylet") for c in commands) == 3
    assert any(is_job_worker(cmd) for cmd in seen.values()), seen
    assert sockets and all(loopback(local) and loopback(remote) for local, remote in sockets), sockets
    assert_same_outputs(tmp_path / "out", local_run)


LOSSES = {
    "removed gracefully": lambda harness, node: harness.remove_node(node),
    "removed abruptly": lambda harness, node: harness.remove_node(node, allow_graceful=False),
    "raylet SIGKILLed": lambda harness, node: os.kill(raylet_pid(node), signal.SIGKILL),
}


@pytest.mark.parametrize("loss", LOSSES)
def test_a_worker_node_lost_mid_job_changes_no_output(cohort, local_run, tmp_path, loss):
    out = tmp_path / "out"
    with LocalCluster() as cluster:
        def lose_a_node(driver):
            node = cluster.busy_worker_node(driver)
            LOSSES[loss](cluster.cluster, node)
            assert driver.poll() is None and len(shard_files(out)) < N, "the node was lost before the job ended"

        code, log = run_job(cohort, out, tmp_path / "driver.log", cluster.env, "--ray-address", cluster.address,
                            during=lose_a_node)
        assert code == 0, log[-3000:]
        cluster.assert_job_workers_end()  # the lost node's too: after a raylet SIGKILL, Ray's watchdogs end them
    assert cluster.leftovers == {}, "Ray processes outlived the cluster"
    assert_same_outputs(out, local_run)


# ---- the cluster --------------------------------------------------------------------------------------

class LocalCluster:
    """A head and two worker nodes on 127.0.0.1, for a `with` block, with `env` set meanwhile (what its
    processes and a driver joining it at `address` need). On leaving the block, the cluster is shut down
    (also after a failure) and `leftovers` holds its processes still running GONE_TIMEOUT_S later, which
    are then killed."""

    def __init__(self):
        self.marker = uuid.uuid4().hex
        self.temp = tempfile.mkdtemp(prefix="ppray-", dir="/tmp")  # short: Ray's unix sockets live under it
        self.env = {"RAY_TMPDIR": self.temp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", MARK: self.marker}
        self.saved = {k: os.environ.get(k) for k in self.env}
        self.cluster, self.workers, self.leftovers = None, [], {}

    def __enter__(self) -> "LocalCluster":
        from ray.cluster_utils import Cluster

        # until the end: the harness also finds its address file by RAY_TMPDIR, and removes it on shutdown
        os.environ.update(self.env)
        try:
            self.cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
            self.workers = [self.cluster.add_node(**NODE) for _ in range(2)]
            self.cluster.wait_for_nodes()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.cluster is not None:
                self.cluster.shutdown()
        finally:
            self.leftovers = wait_until_gone(self.processes)
            for pid in self.leftovers:
                kill(pid)
            shutil.rmtree(self.temp, ignore_errors=True)
            for k, v in self.saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    @property
    def address(self) -> str:
        return self.cluster.address

    def processes(self) -> dict[int, str]:
        """pid: command line of every running process of this cluster."""
        return marked(self.marker)

    def busy_worker_node(self, driver: subprocess.Popen):
        """The first worker node seen running an item of the driver's job (its actor inside a call)."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while time.monotonic() < deadline and driver.poll() is None:
            running = [ppid(pid) for pid, cmd in self.processes().items() if is_busy_actor(cmd)]
            for node in self.workers:
                if raylet_pid(node) in running:
                    return node
            time.sleep(0.05)
        raise AssertionError(f"no worker node ran an item within {BUSY_TIMEOUT_S} s (driver exit {driver.poll()})")

    def assert_job_workers_end(self) -> None:
        """Once the driver has exited, its actors and their step processes end, on every node."""
        left = wait_until_gone(lambda: {pid: cmd for pid, cmd in self.processes().items() if is_job_worker(cmd)})
        assert left == {}, f"processes of the ended job still run: {left}"


def raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def is_busy_actor(cmd: str) -> bool:
    return cmd.startswith("ray::MapWorker(") and cmd.split()[0].endswith(".submit")  # Ray's title inside a call


def is_job_worker(cmd: str) -> bool:
    return cmd.startswith("ray::MapWorker(") or "pipelines.engines.supervisor" in cmd


# ---- the job ------------------------------------------------------------------------------------------

def run_job(cohort: Path, out: Path, log_path: Path, env: dict, *engine_args: str, during=None) -> tuple[int, str]:
    """`pulsepipe preprocess --engine ray` on the cohort in a driver process: (exit status, its output).
    during(driver) runs while it works; the driver is killed if it outlives JOB_TIMEOUT_S."""
    argv = [sys.executable, "-m", "pipelines.cli", "preprocess", "--layout", "synthetic", "--input", str(cohort),
            "--output", str(out), "--engine", "ray", *engine_args]
    with open(log_path, "w") as log:  # a file, not a pipe: nothing blocks the driver while `during` runs
        driver = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        try:
            if during is not None:
                during(driver)
            driver.wait(timeout=JOB_TIMEOUT_S)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    return driver.returncode, log_path.read_text()


def shard_files(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("shards/**/*.parquet") if not p.name.startswith("."))


def assert_same_outputs(out: Path, expected: Path) -> None:
    """The same files, shards equal byte for byte, every row ok and the same but for its timing."""
    def files(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def rows(root):
        found = read_manifest(str(root / "manifest.parquet"), fsspec.filesystem("file"))
        return sorted(({k: v for k, v in r.items() if k != "elapsed_s"} for r in found), key=lambda r: r["shard"])

    assert files(out) == files(expected)
    assert len(shard_files(out)) == N
    for shard in shard_files(expected):
        assert (out / shard.relative_to(expected)).read_bytes() == shard.read_bytes(), shard.name
    assert [r["status"] for r in rows(out)] == ["ok"] * N
    assert rows(out) == rows(expected)


# ---- processes and sockets, from /proc --------------------------------------------------------------

def marked(marker: str) -> dict[int, str]:
    """pid: command line of every running process started with MARK=marker in its environment."""
    needle, found = f"{MARK}={marker}".encode(), {}
    for path in glob.glob("/proc/[0-9]*/environ"):
        pid = int(path.split("/")[2])
        try:
            if needle in Path(path).read_bytes().split(b"\0"):
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:  # ended meanwhile
            continue
    return {pid: cmd for pid, cmd in found.items() if cmd}  # a zombie has no command line: it runs no more


def wait_until_gone(find) -> dict[int, str]:
    """What find() still returns after GONE_TIMEOUT_S, or {} as soon as it returns nothing."""
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while (left := find()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def tcp_sockets(processes: dict[int, str]) -> list[tuple[str, str | None]]:
    """(local address, remote address or None when listening) of every TCP socket the processes hold."""
    inodes = set()
    for pid in processes:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                listening = fields[3] == "0A"
                found.append((_address(fields[1], family), None if listening else _address(fields[2], family)))
    return found


def _address(hex_address: str, family: int) -> str:
    """An address of /proc/net/tcp*: 32-bit words of hex digits, each in this machine's byte order."""
    host = bytes.fromhex(hex_address.split(":")[0])
    words = b"".join(host[i:i + 4][::-1] for i in range(0, len(host), 4)) if sys.byteorder == "little" else host
    return socket.inet_ntop(family, words)


def loopback(address: str | None) -> bool:
    if address is None:
        return True
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)
