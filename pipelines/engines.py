"""Thin engine adapters: run one job step over a list of items on Apache Beam or Ray Data.

A step is a class: heavy setup (a face detector, a model) in `__init__(**kwargs)`, one item per
`__call__(item: dict) -> dict`, items and results JSON-able. Each job writes its step once; this module
maps it onto `beam.ParDo` or Ray Data `map` and hands the results back to the driver in input order.

Local defaults start nothing and download nothing: Beam runs on its Python FnApiRunner (never Prism,
which fetches a binary) with one worker process per core; Ray starts in-process with this machine's
cores. On a cluster, Beam pipeline options pass through unchanged (--runner=DataflowRunner ...) and
Ray joins --ray-address.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import io
import json
import logging
import os
import re
import signal
import sys
import threading
import uuid
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field

import fsspec

from pipelines.errors import JobError

ENGINES = ("beam", "ray")
RAY_TASK_RETRIES = 2  # fresh workers for an item whose step killed its worker, before the run fails


class EngineError(JobError):
    """The engine cannot run the job as asked (e.g. GPUs asked for and absent); str says why."""


@dataclass(frozen=True)
class EngineOptions:
    engine: str = "beam"
    workers: int = 0  # local parallelism; 0: one per core
    ray_address: str | None = None  # join this Ray cluster instead of starting one in-process
    pipeline_args: tuple[str, ...] = field(default_factory=tuple)  # Beam pipeline options, passed through
    num_gpus: float = 0.0  # per worker, for steps that run a model on a GPU

    @property
    def local(self) -> bool:
        """Runs on this machine: Ray started in-process, or Beam's local runner (no --runner given)."""
        if self.engine == "ray":
            return not self.ray_address
        return not any(a.startswith("--runner") for a in self.pipeline_args)

    @property
    def local_workers(self) -> int:
        return self.workers or os.cpu_count() or 1


def add_engine_arguments(p: argparse.ArgumentParser, gpus: bool = False) -> None:
    """The engine options; gpus: the job runs a model, so its workers may ask for GPUs."""
    g = p.add_argument_group("engine")
    g.add_argument("--engine", choices=ENGINES, default="beam", help="Apache Beam or Ray Data (default: beam)")
    g.add_argument("--workers", type=whole_number(0), default=0, metavar="N",
                   help="worker processes (default: locally one per core; on a Ray cluster as many as it has room for)")
    g.add_argument("--ray-address", help="address of a running Ray cluster (default: start Ray in-process)")
    if gpus:
        g.add_argument("--gpus-per-worker", type=number_at_least(0, "a number of GPUs (0.5: two workers share one)"),
                       default=0.0, metavar="N",
                       help="GPUs per model worker. Ray: num_gpus of each actor, locally one actor per share "
                            "of this machine's GPUs; local Beam: one worker on a GPU; Beam on a cluster: give it "
                            "too (without it the workers keep JAX on the CPU), with the runner's accelerator "
                            "options. Needs JAX with CUDA (pip install -e '.[gpu]'). Default 0: CPU")


def whole_number(minimum: int = 0):
    """An argparse type: a whole number of at least `minimum`, with an error that says so."""
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number, {minimum} or more, got {text!r}")
        return int(text)
    return parse


def number_at_least(minimum: float, what: str):
    """An argparse type: a finite number of at least `minimum`; the error names `what` it is."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not minimum <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what} of at least {minimum:g}, got {text!r}")
        return value
    return parse


def engine_options(args: argparse.Namespace) -> EngineOptions:
    extra = tuple(getattr(args, "pipeline_args", ()) or ())
    if extra and args.engine != "beam":
        raise JobError(f"unrecognized arguments: {' '.join(extra)} "
                       "(only --engine beam passes pipeline options through)")
    return EngineOptions(args.engine, args.workers, args.ray_address, extra, getattr(args, "gpus_per_worker", 0.0))


def run_step(step_cls, step_kwargs: dict, items: list[dict], opts: EngineOptions, work_uri: str,
             model_batch: int = 0) -> list[dict]:
    """Apply step_cls(**step_kwargs) to every item on the chosen engine; results in the order of items.

    work_uri: a folder every worker can write (the job's output): Beam leaves its results there for the
    driver to read, as a pipeline cannot return values.
    model_batch: for steps that hold a model, up to this many items per call: Beam runs the step as a
    RunInference model handler (one model per worker, batched elements), Ray as `map_batches`.
    """
    if not items:
        return []
    if opts.num_gpus and opts.local:
        opts = _local_gpu_workers(opts)
    if opts.engine == "beam":
        with _stderr_without(_BEAM_NOISE):
            return _run_beam(step_cls, step_kwargs, items, opts, work_uri, model_batch)
    if opts.engine == "ray":
        if not os.isatty(2):  # what Ray forwards from its workers, without colour codes in a log file
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        with _stderr_without(_RAY_NOISE):
            return _run_ray(step_cls, step_kwargs, items, opts, model_batch)
    raise ValueError(f"unknown engine {opts.engine!r}; choose one of {', '.join(ENGINES)}")


def _envelopes(items: list[dict]) -> list[str]:
    # JSON envelopes carry the position, so results come back in input order from any engine
    return [json.dumps({"index": i, "item": item}, sort_keys=True) for i, item in enumerate(items)]


def _answer(step, envelope: str, keep_log: bool = False) -> str:
    """The step on one envelope's item: the result envelope. keep_log: what the step prints to stderr goes
    into the envelope (as "log") instead of this process's stderr; if the step fails, it is printed."""
    e = json.loads(envelope)
    if not keep_log:
        return json.dumps({"index": e["index"], "result": step(e["item"])}, sort_keys=True)
    log = io.StringIO()
    try:
        with redirect_stderr(log):
            result = step(e["item"])
        return json.dumps({"index": e["index"], "result": result, "log": log.getvalue()}, sort_keys=True)
    except BaseException:
        sys.stderr.write(log.getvalue())  # no envelope will carry it
        raise


def _close(step) -> None:
    close = getattr(step, "close", None)
    if close is not None:
        close()


def _in_order(envelopes, n: int) -> list[dict]:
    results = sorted((json.loads(e) for e in envelopes), key=lambda e: e["index"])
    if [e["index"] for e in results] != list(range(n)):
        raise RuntimeError(f"engine returned {len(results)} results for {n} items")
    return [e["result"] for e in results]


# ---- Apache Beam ------------------------------------------------------------------------------------

def _run_beam(step_cls, step_kwargs, items, opts: EngineOptions, work_uri: str, model_batch: int) -> list[dict]:
    import apache_beam as beam
    from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    class StepModelHandler(ModelHandler):
        """The step as a RunInference model: built once per worker, called on batches of envelopes."""

        def __init__(self):
            super().__init__(min_batch_size=1, max_batch_size=model_batch)

        def load_model(self):
            return step_cls(**step_kwargs)

        def run_inference(self, batch, model, inference_args=None):
            for envelope in batch:
                yield PredictionResult(envelope, _answer(model, envelope))

    class StepDoFn(beam.DoFn):
        def setup(self):
            self.step = step_cls(**step_kwargs)

        def process(self, envelope: str):
            yield _answer(self.step, envelope)

        def teardown(self):
            _close(self.step)

    results_uri = f"{work_uri.rstrip('/')}/.pulsepipe-results-{uuid.uuid4().hex}.json"
    runner, args = _beam_runner(opts)
    with beam.Pipeline(runner=runner, options=PipelineOptions(list(args))) as p:
        _ = (
            p
            | "Items" >> beam.Create(_envelopes(items))
            | "Spread over workers" >> beam.Reshuffle()
            | "Run step" >> (
                beam.ParDo(StepDoFn()) if not model_batch
                else RunInference(StepModelHandler()) | "Results" >> beam.Map(lambda r: r.inference))
            | "Gather" >> beam.combiners.ToList()
            | "Hand to driver" >> beam.Map(_write_json_lines, results_uri)
        )
    fs, path = fsspec.core.url_to_fs(results_uri)
    try:
        with fs.open(path, "r") as f:
            return _in_order(f.read().splitlines(), len(items))
    finally:
        fs.rm(path)


# Beam's local worker processes log at INFO (the pipeline options that set their level do not reach them):
# their start-up and shutdown, and any library's INFO lines; the driver echoes their warnings. Dropped: INFO
# and DEBUG lines, and warnings of the root, __main__ and apache_beam loggers. Errors and the rest pass.
_BEAM_NOISE = re.compile(rb"^((DEBUG|INFO):[\w.]+|WARNING:(root|__main__|apache_beam[\w.]*)):")
# Ray's core worker logs an error for every Ray Data actor pool, whose actors always get their constructor
# through the object store (ray-project/ray#53727); it concerns restarts after a lost object, never our results.
_RAY_NOISE = re.compile(rb"^\[[^]]*\] core_worker\.cc:\d+: Actor with class name: .* has constructor arguments "
                        rb"in the object store")


@contextmanager
def _stderr_without(noise: re.Pattern):
    """Filter this process's stderr (file descriptor 2, which the engine's local worker processes inherit and
    its native code writes to) through a thread that drops the lines `noise` matches while the job runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump():
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if not noise.match(line):
                    os.write(saved, line)

    thread = threading.Thread(target=pump, name="engine-log-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer here; the workers holding it have ended with the job
        thread.join(timeout=10)
        if not thread.is_alive():
            os.close(saved)


def _local_gpu_workers(opts: EngineOptions) -> EngineOptions:
    """Local workers that ask for GPUs: check this machine has them and run one worker per GPU share
    (Ray pins each actor to its GPUs; Beam's local workers cannot be pinned, so it runs one)."""
    # the driver only counts GPUs; without this its JAX client would reserve most of the GPU memory the
    # workers need (they inherit the setting too, so several processes can share one GPU)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    gpus = len(jax.devices("gpu")) if jax.default_backend() == "gpu" else 0
    if gpus < opts.num_gpus:
        raise EngineError(f"{opts.num_gpus:g} GPU per worker asked for, but JAX on this machine sees {gpus} "
                          f"(backend: {jax.default_backend()}); install JAX with CUDA (pip install -e '.[gpu]') "
                          "or leave out --gpus-per-worker")
    workers = 1 if opts.engine == "beam" else int(gpus // opts.num_gpus)
    return dataclasses.replace(opts, workers=min(opts.local_workers, workers))


def _beam_runner(opts: EngineOptions):
    if not opts.local:
        return None, opts.pipeline_args  # a cluster runner named by the user
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    local = ("--direct_running_mode=multi_processing", f"--direct_num_workers={opts.local_workers}",
             "--default_sdk_harness_log_level=WARNING")
    return FnApiRunner(), (*local, *opts.pipeline_args)


def _write_json_lines(lines: list[str], uri: str) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(path, "w") as f:
        f.write("\n".join(lines))


# ---- Ray Data ---------------------------------------------------------------------------------------

class _RayStep:
    """Ray Data actor: one step instance per worker, rows carry JSON envelopes.

    What the step prints to stderr (its progress lines) travels back in the envelope and the driver prints
    it as the result arrives: Ray's own forwarding of worker output drops what its log monitor has not read
    by the time the job ends.
    """

    def __init__(self, step_cls, step_kwargs):
        self.step = step_cls(**step_kwargs)

    def __call__(self, row: dict) -> dict:
        return {"envelope": self.run(row["envelope"])}

    def run(self, envelope: str) -> str:
        return _answer(self.step, envelope, keep_log=True)

    def __del__(self):  # Ray Data's teardown (`__ray_shutdown__`) when an actor exits gracefully; an actor
        if hasattr(self, "step"):  # still running at ray.shutdown is ended without it, its process freed whole
            _close(self.step)


class _RayModelStep(_RayStep):
    """The same actor for `map_batches`: a batch of envelopes per call."""

    def __call__(self, batch: dict) -> dict:
        return {"envelope": [self.run(e) for e in batch["envelope"]]}


def _run_ray(step_cls, step_kwargs, items, opts: EngineOptions, model_batch: int) -> list[dict]:
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        quiet = dict(logging_level=logging.ERROR, log_to_driver=True)  # workers' errors still show
        if opts.ray_address:
            ray.init(address=opts.ray_address, **quiet)
        else:
            _start_local_ray(ray, num_cpus=opts.local_workers, include_dashboard=False, **quiet)
    try:
        import ray.data

        _check_gpus(ray, opts.num_gpus)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        ray.data.DataContext.get_current().enable_progress_bars = False
        if opts.ray_address and not opts.workers:  # a cluster: grow the pool as its resources allow
            pool = ray.data.ActorPoolStrategy(min_size=1, max_size=len(items))
        else:
            pool = ray.data.ActorPoolStrategy(size=min(opts.local_workers, len(items)))
        ds = ray.data.from_items([{"envelope": e} for e in _envelopes(items)], override_num_blocks=len(items))
        # an item whose step kills its worker (out of memory, a crash in native code) is tried on a fresh
        # worker RAY_TASK_RETRIES more times, then the run ends with the error: Ray Data retries forever.
        # It travels as a remote arg, a way Ray deprecates for 2.64 and has no named parameter for yet.
        actors = dict(fn_constructor_args=(step_cls, step_kwargs), compute=pool, max_task_retries=RAY_TASK_RETRIES,
                      num_cpus=1, num_gpus=opts.num_gpus or None)
        if model_batch:
            out = ds.map_batches(_RayModelStep, batch_size=model_batch, batch_format="numpy", **actors)
        else:
            out = ds.map(_RayStep, **actors)
        envelopes = []
        for row in out.iter_rows():  # streamed as workers finish items, so progress shows as it happens
            sys.stderr.write(json.loads(row["envelope"])["log"])
            envelopes.append(row["envelope"])
        return _in_order(envelopes, len(items))
    finally:
        if started_here:
            ray.shutdown()


def _start_local_ray(ray, **init_args) -> None:
    """ray.init, once more if the first start times out: now and then a local raylet never registers
    (ray-project/ray#50474; seen once here in about thirty starts); a second start works."""
    before = _descendants()
    try:
        ray.init(**init_args)
    except Exception as e:  # Ray raises a bare Exception for its start-up timeout
        if "timed out during startup" not in str(e):
            raise
        # the failed start's processes (its GCS, dashboard, monitors) are known to no Ray object: end them
        for pid in _descendants() - before:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        ray.shutdown()
        print(f"pulsepipe: Ray did not start ({str(e).splitlines()[0]}); starting it once more", file=sys.stderr)
        ray.init(**init_args)


def _descendants() -> set[int]:
    """The ids of this process's descendants, read from /proc (empty where there is none)."""
    parent = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # a process that ended meanwhile
            continue
        parent[int(stat.split("/")[2])] = int(fields[1])
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


def _check_gpus(ray, num_gpus: float) -> None:
    # an actor asking for a GPU the cluster lacks waits forever: fail now, with the reason
    if num_gpus and ray.cluster_resources().get("GPU", 0) < num_gpus:
        raise EngineError(f"{num_gpus:g} GPU per worker asked for, but the Ray cluster has "
                           f"{ray.cluster_resources().get('GPU', 0):g} GPUs")
