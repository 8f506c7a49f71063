"""Thin engine adapters: run one job step over a list of items on Apache Beam or Ray Data.

A step is a class that workers import by name (module:qualname, never `__main__`): heavy setup (a face
detector, a model) in `__init__(**kwargs)`, one item per `__call__(item: dict) -> dict`, items and results
JSON-able, and an optional `close()`. A step that holds a model declares `runs_model = True`: Beam runs it
as a RunInference model handler, Ray as `map_batches` on an actor pool, one item per call either way. Each
job writes its step once; `run_step` maps it onto `pipelines.engines.beam` or `pipelines.engines.ray` and
hands the results back in input order.

Each worker runs its step in a supervised child process (`pipelines.engines.supervisor`), so an item that
kills its process (or, with `--item-timeout`, hangs it) is retried and then answered by the step's
`lost(item, reason)`, a failed result, while the run goes on; `split(item)` lets a step holding several
things per item (a bucket) retry them one by one. With a journal folder, each result is recorded there as
its item finishes (`pipelines.journal`), so a job whose driver is killed can resume from what was done.

Local defaults start nothing and download nothing: Beam runs on its Python FnApiRunner (never Prism,
which fetches a binary) with one worker process per core; Ray starts in-process with this machine's
cores. On a cluster, Beam pipeline options pass through unchanged (--runner=DataflowRunner ...) and
Ray joins --ray-address.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import weakref
from contextlib import redirect_stderr
from dataclasses import dataclass, field

from pipelines import journal
from pipelines.arguments import number_at_least, positive_number, whole_number
from pipelines.engines.supervisor import Supervised, load_step_class, step_ref  # noqa: F401 - for the adapters
from pipelines.errors import JobError

ENGINES = ("beam", "ray")


class EngineError(JobError):
    """The engine cannot run the job as asked (e.g. GPUs asked for and absent); str says why."""


@dataclass(frozen=True)
class EngineOptions:
    engine: str = "beam"
    workers: int = 0  # local parallelism; 0: one per core
    ray_address: str | None = None  # join this Ray cluster instead of starting one in-process
    pipeline_args: tuple[str, ...] = field(default_factory=tuple)  # Beam pipeline options, passed through
    num_gpus: float = 0.0  # per worker, for steps that run a model on a GPU
    isolate: bool = True  # each worker's step in a supervised child process (see the module's docstring)
    item_timeout_s: float | None = None  # isolated: a child with no answer to an item for this long is killed

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
    g.add_argument("--item-timeout", type=positive_number("a number of seconds"), default=None, metavar="S",
                   help="kill a worker that has given no answer to an item for S seconds; the item is tried "
                        "again on a fresh worker, like one whose worker crashed, and fails with that reason "
                        "after 3 attempts (default: no limit)")
    if gpus:
        g.add_argument("--gpus-per-worker", type=number_at_least(0, "a number of GPUs (0.5: two workers share one)"),
                       default=0.0, metavar="N",
                       help="GPUs per model worker. Ray: num_gpus of each actor, locally one actor per share "
                            "of this machine's GPUs; local Beam: one worker on a GPU; Beam on a cluster: give it "
                            "too (without it the workers keep JAX on the CPU), with the runner's accelerator "
                            "options. Needs JAX with CUDA (pip install -e '.[gpu]'). Default 0: CPU")


def engine_options(args: argparse.Namespace) -> EngineOptions:
    extra = tuple(getattr(args, "pipeline_args", ()) or ())
    if extra and args.engine != "beam":
        raise JobError(f"unrecognized arguments: {' '.join(extra)} "
                       "(only --engine beam passes pipeline options through)")
    return EngineOptions(args.engine, args.workers, args.ray_address, extra, getattr(args, "gpus_per_worker", 0.0),
                         item_timeout_s=args.item_timeout)


def run_step(step_cls, step_kwargs: dict, items: list[dict], opts: EngineOptions, work_uri: str,
             journal_uri: str | None = None) -> list[dict]:
    """Apply step_cls(**step_kwargs) to every item on the chosen engine; results in the order of items.

    work_uri: a folder every worker can write (the job's output): Beam leaves its results there for the
    driver to read, as a pipeline cannot return values. journal_uri: where workers record each result as
    its item finishes (`pipelines.journal`), or None.
    """
    if not items:
        return []
    if opts.engine not in ENGINES:
        raise ValueError(f"unknown engine {opts.engine!r}; choose one of {', '.join(ENGINES)}")
    if step_cls.__module__ == "__main__":
        raise ValueError(f"{step_cls.__qualname__}: a step must live in a module its workers can import, "
                         "not in __main__")
    if opts.num_gpus and opts.local:
        opts = _local_gpu_workers(opts)
    if opts.engine == "beam":
        from pipelines.engines import beam as engine
    else:
        from pipelines.engines import ray as engine
    return engine.run(step_cls, step_kwargs, envelopes(items, journal_uri), opts, work_uri)


# ---- what both adapters share: items in envelopes, answered by the step, gathered in order -----------

def envelopes(items: list[dict], journal_uri: str | None = None) -> list[str]:
    """JSON envelopes carrying each item's position, so results come back in input order from any engine,
    and with a journal, where the item's result is to be recorded."""
    return [json.dumps({"index": i, "item": item, **({"record": journal.record_uri(journal_uri, item)}
                                                     if journal_uri else {})}, sort_keys=True)
            for i, item in enumerate(items)]


class Worker:
    """What an engine worker holds: the step named by ref (`step_ref`), in a supervised child process
    (opts.isolate, with opts.item_timeout_s) or in this one.
    Called with an envelope, it returns the result envelope, recorded first in the journal when the
    envelope names a record. keep_log: see `answer`."""

    def __init__(self, ref: str, step_kwargs: dict, opts: EngineOptions, keep_log: bool = False):
        self.step = (Supervised(ref, step_kwargs, keep_log, timeout_s=opts.item_timeout_s) if opts.isolate
                     else _InProcess(ref, step_kwargs, keep_log))
        _OPEN_WORKERS.add(self)

    def __call__(self, envelope: str) -> str:
        result = self.step.answer(envelope)
        record = json.loads(envelope).get("record")
        if record:
            journal.write_record(record, json.loads(result)["result"])
        return result

    def close(self) -> None:
        if self in _OPEN_WORKERS:
            _OPEN_WORKERS.discard(self)
            self.step.close()


# this process's open workers: an engine that ran them here (Beam in memory, whose RunInference never closes
# its model) closes them after its run, so their children end with it rather than with this process
_OPEN_WORKERS: "weakref.WeakSet[Worker]" = weakref.WeakSet()


def open_workers() -> set[Worker]:
    return set(_OPEN_WORKERS)


class _InProcess:
    """The step in this process: what `Supervised` offers, without the isolation."""

    def __init__(self, ref: str, step_kwargs: dict, keep_log: bool):
        self.instance, self.keep_log = load_step_class(ref)(**step_kwargs), keep_log

    def answer(self, envelope: str) -> str:
        return answer(self.instance, envelope, self.keep_log)

    def close(self) -> None:
        close(self.instance)


def answer(step, envelope: str, keep_log: bool = False) -> str:
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


def close(step) -> None:
    closer = getattr(step, "close", None)
    if closer is not None:
        closer()


def in_order(results: list[str], n: int) -> list[dict]:
    """The results of n items, from result envelopes in any order."""
    found = sorted((json.loads(e) for e in results), key=lambda e: e["index"])
    if [e["index"] for e in found] != list(range(n)):
        raise RuntimeError(f"engine returned {len(found)} results for {n} items")
    return [e["result"] for e in found]


def runs_model(step_cls) -> bool:
    """Whether the step declares that it holds a model (see the module's docstring)."""
    return bool(getattr(step_cls, "runs_model", False))


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
