"""The Ray Data adapter: a step as a callable class on an actor pool (`map`, or `map_batches` for model
steps), one item per call; Ray started in-process with this machine's cores, or joined at --ray-address.

What a step prints to stderr (its progress lines) travels back with its result and the driver prints it
as results stream in: Ray's own forwarding of worker output drops what its log monitor has not read by
the time the job ends.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import sys
import threading

from pipelines.console import stderr_without
from pipelines.engines import EngineError, EngineOptions, Worker, in_order, runs_model, step_ref
from pipelines.processes import descendants, terminate

# fresh actors for an item whose actor process died, before the run fails, where the step runs in the actor
# itself (isolate=False), so that a step killing its process cannot loop forever. Isolated, the step's own
# crashes end only its supervised child (pipelines.engines.supervisor, which bounds them), so an actor dies
# only with its node or by an outside kill: its item is retried until Ray places a fresh actor, as Ray Data
# does by default. No count would do there: a node lost abruptly is marked dead only when the GCS health
# checks have missed it (about 15 s by default), and each retry until then fails at once (from 0.1 s apart).
TASK_RETRIES = 2
CONNECT_TIMEOUT_S = 30.0  # joining --ray-address: Ray's own client retries an unreachable cluster for minutes
AUTH_FACT = ("Ray 2.60 clusters started with token authentication (the default of `ray start --head`) need "
             "RAY_AUTH_MODE=token set on this client as well, and the cluster's token (~/.ray/auth_token, "
             "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)")
# what Ray's native client logs while it retries a cluster it cannot reach: the driver says it in one line
CONNECT_NOISE = re.compile(rb"^\[[^]]*\] \w+\.(h|cc):\d+: (Failed to|Timed out|.*GCS)")
# Ray's core worker logs an error for every Ray Data actor pool, whose actors always get their constructor
# through the object store (ray-project/ray#53727); it concerns restarts after a lost object, never our results.
NOISE = re.compile(rb"^\[[^]]*\] core_worker\.cc:\d+: Actor with class name: .* has constructor arguments "
                   rb"in the object store")


class _RayStep:
    """Ray Data actor: one step per worker (pipelines.engines.Worker), rows carry JSON envelopes."""

    def __init__(self, ref: str, step_kwargs: dict, opts: EngineOptions):
        self.worker = Worker(ref, step_kwargs, opts, keep_log=True)

    def __call__(self, row: dict) -> dict:
        return {"envelope": self.worker(row["envelope"])}

    def __del__(self):  # Ray Data's teardown (`__ray_shutdown__`) when an actor exits gracefully; an actor
        if hasattr(self, "worker"):  # still running at ray.shutdown is ended without it, its children with it
            self.worker.close()


class _RayModelStep(_RayStep):
    """The same actor for `map_batches`: a batch of envelopes per call."""

    def __call__(self, batch: dict) -> dict:
        return {"envelope": [self.worker(e) for e in batch["envelope"]]}


def run(step_cls, step_kwargs: dict, envelopes: list[str], opts: EngineOptions, work_uri: str) -> list[dict]:
    import ray

    if not os.isatty(2):  # what Ray forwards from its workers, without colour codes in a log file
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    with stderr_without(NOISE), connected(opts.ray_address, opts.local_workers):
        return _run_on_actors(ray, step_cls, step_kwargs, envelopes, opts)


@contextlib.contextmanager
def connected(ray_address: str | None, num_cpus: int):
    """Ray for the block: the cluster at ray_address, or started in-process with num_cpus; left as it
    was found (a Ray this process already holds is used, and not shut down)."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        quiet = dict(logging_level=logging.ERROR, log_to_driver=True)  # workers' errors still show
        if ray_address:
            _join(ray, ray_address, **quiet)
        else:
            _start_local(ray, num_cpus=num_cpus, include_dashboard=False, **quiet)
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def _run_on_actors(ray, step_cls, step_kwargs, envelopes: list[str], opts: EngineOptions) -> list[dict]:
    import ray.data

    _check_gpus(ray, opts.num_gpus)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if opts.ray_address and not opts.workers:  # a cluster: grow the pool as its resources allow
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=len(envelopes))
    else:
        pool = ray.data.ActorPoolStrategy(size=min(opts.local_workers, len(envelopes)))
    ds = ray.data.from_items([{"envelope": e} for e in envelopes], override_num_blocks=len(envelopes))
    # an item whose actor died is tried on fresh actors (see TASK_RETRIES). The bound travels as a remote
    # arg, a way Ray deprecates for 2.64 and has no named parameter for yet. The step travels by name: only
    # its process imports it.
    actors = dict(fn_constructor_args=(step_ref(step_cls), step_kwargs, opts), compute=pool,
                  max_task_retries=-1 if opts.isolate else TASK_RETRIES, num_cpus=1,
                  num_gpus=opts.num_gpus or None)
    if runs_model(step_cls):
        out = ds.map_batches(_RayModelStep, batch_size=1, batch_format="numpy", **actors)
    else:
        out = ds.map(_RayStep, **actors)
    results = []
    for row in out.iter_rows():  # streamed as workers finish items, so progress shows as it happens
        sys.stderr.write(json.loads(row["envelope"])["log"])
        results.append(row["envelope"])
    return in_order(results, len(envelopes))


# What Ray says when a local start times out: the raylet never registered, or the GCS never wrote its port
STARTUP_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")
START_ATTEMPTS = 3


def _start_local(ray, **init_args) -> None:
    """ray.init, again (up to START_ATTEMPTS in all) when a start times out: now and then a local raylet never
    registers (ray-project/ray#50474), or the GCS does not write its port within Ray's 30 s; on this 2-core
    machine about one start in ten to thirty, and a new start works."""
    for attempt in range(1, START_ATTEMPTS + 1):
        before = descendants()
        try:
            ray.init(**init_args)
            return
        except Exception as e:  # Ray raises a bare Exception (raylet) or a RuntimeError (GCS port) for these
            if attempt == START_ATTEMPTS or not any(words in str(e) for words in STARTUP_TIMEOUTS):
                raise
            terminate(descendants() - before)  # the failed start's GCS, dashboard, monitors: no Ray object knows them
            ray.shutdown()
            print(f"pulsepipe: Ray did not start ({str(e).splitlines()[0]}); starting it again", file=sys.stderr)


def _join(ray, address: str, **init_args) -> None:
    """ray.init(address=...) within CONNECT_TIMEOUT_S, else EngineError in one line. A hung connect cannot
    be interrupted, so it runs in a daemon thread that the ending process leaves behind."""
    _check_listening(address)
    outcome = {}

    def connect():
        try:
            ray.init(address=address, **init_args)
        except BaseException as e:  # noqa: BLE001 - handed to the driver's thread, which says it
            outcome["error"] = e

    worker = threading.Thread(target=connect, name="ray-connect", daemon=True)
    with stderr_without(CONNECT_NOISE):
        worker.start()
        worker.join(CONNECT_TIMEOUT_S)
    if worker.is_alive():
        raise EngineError(f"--ray-address {address}: no Ray cluster answered within {CONNECT_TIMEOUT_S:g} s. "
                          f"{AUTH_FACT}")
    if "error" in outcome:
        e = outcome["error"]
        first = (str(e).strip().splitlines() or [""])[0]
        raise EngineError(f"--ray-address {address}: cannot join the Ray cluster ({type(e).__name__}: {first}). "
                          f"{AUTH_FACT}") from None


def _check_listening(address: str) -> None:
    """EngineError at once when nothing listens at a HOST:PORT (or ray://HOST:PORT) address; other forms
    ("auto") only Ray resolves."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise EngineError(f"--ray-address {address}: nothing answers there ({why}); is the cluster running? "
                          f"{AUTH_FACT}") from None


def _check_gpus(ray, num_gpus: float) -> None:
    # an actor asking for a GPU the cluster lacks waits forever: fail now, with the reason
    if num_gpus and ray.cluster_resources().get("GPU", 0) < num_gpus:
        raise EngineError(f"{num_gpus:g} GPU per worker asked for, but the Ray cluster has "
                          f"{ray.cluster_resources().get('GPU', 0):g} GPUs")
