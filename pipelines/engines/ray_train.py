"""Ray Train's JaxTrainer as the engine of a multi-process job (`pulsepipe train --workers N`): N workers,
each one process of a `jax.distributed` run, on this machine's Ray or a cluster's (--ray-address).

    result = run_workers(loop, config, workers=2, opts)   # loop(config) in every worker; process 0's result

On GPUs, Ray Train's JAX backend starts `jax.distributed` itself. On CPUs it does not (Ray 2.60 sets it up
for TPUs and GPUs only), so the workers do: process 0 picks the coordinator's address, Ray Train's
`broadcast_from_rank_zero` hands it to the others, and XLA's CPU collectives go over gloo. A local run's
coordinator listens on 127.0.0.1.
"""
from __future__ import annotations

import os
import re
import socket
import sys
import tempfile

from pipelines.console import stderr_without
from pipelines.engines import EngineError

# Ray Train's own account of its controller and worker group, on the driver's stdout and stderr: the job's
# lines (process 0's) and errors still show
NOISE = re.compile(rb"^\S*\((TrainController|PlacementGroupCleaner) pid=|.*(Reporting training result|JAX "
                   rb"distributed service on|\[Gloo\] Rank|core_worker\.cc:\d+: Actor with class name)")


class Interrupted(EngineError):
    """Ctrl-C while the workers ran: Ray Train has stopped them."""


def run_workers(loop, config: dict, workers: int, ray_address: str | None = None, gpus_per_worker: float = 0,
                cpus_per_worker: float = 1) -> dict:
    """loop(config) -> dict in each of `workers` Ray Train workers; returns process 0's dict. EngineError
    (one line) for a worker that failed, with its error; Interrupted after a Ctrl-C."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.jax import JaxConfig, JaxTrainer

    from pipelines.engines.ray import connected

    worker_config = {"loop": loop, "config": config, "gpus": bool(gpus_per_worker),
                     "loopback": not ray_address}  # a local run's coordinator stays on 127.0.0.1
    with (connected(ray_address, max(os.cpu_count() or 1, int(workers * cpus_per_worker))),
          tempfile.TemporaryDirectory(prefix="pulsepipe-ray-train-") as storage):  # Ray Train's own records
        trainer = JaxTrainer(
            _worker, train_loop_config=worker_config,
            jax_config=JaxConfig(use_gpu=bool(gpus_per_worker)),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(gpus_per_worker),
                                         resources_per_worker={"CPU": cpus_per_worker,
                                                               **({"GPU": gpus_per_worker} if gpus_per_worker else {})}),
            run_config=RunConfig(name="pulsepipe-train", storage_path=storage,
                                 failure_config=FailureConfig(max_failures=0)))
        try:
            with stderr_without(NOISE), stderr_without(NOISE, fd=1):
                result = trainer.fit()
        except (KeyboardInterrupt, SystemExit):  # Ray's wait for the controller turns a Ctrl-C into SystemExit(1)
            raise Interrupted("interrupted: the training workers are stopped") from None
        except Exception as e:  # noqa: BLE001 - Ray Train wraps the worker's error: say it in one line
            raise EngineError(f"a training worker failed: {_first_line(e)}") from None
        if result.error is not None:
            raise EngineError(f"a training worker failed: {_first_line(result.error)}")
        return dict(result.metrics or {})


def _first_line(e: BaseException) -> str:
    cause = e
    while cause.__cause__ is not None:  # Ray Train's TrainingFailedError -> the worker's own exception
        cause = cause.__cause__
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def _worker(worker_config: dict) -> None:
    import jax
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero

    if not worker_config["gpus"]:
        jax.config.update("jax_platforms", "cpu")  # not a search for TPUs and GPUs, with its warnings
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    started = world > 1 and not worker_config["gpus"]  # on GPUs Ray Train started jax.distributed
    if started:
        address = broadcast_from_rank_zero(_coordinator(worker_config["loopback"]) if rank == 0 else None)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(address, world, rank, coordinator_bind_address=address)  # not all interfaces
    try:
        result = worker_config["loop"](worker_config["config"])
        ray.train.report(result if rank == 0 else {})
    finally:
        if started:
            jax.distributed.shutdown()  # all together: the coordinator lives in process 0
        sys.stdout.flush()


def _coordinator(loopback: bool) -> str:
    """HOST:PORT for jax.distributed's coordinator, in process 0: a free port on this node."""
    import ray.util

    host = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"
