"""The Apache Beam adapter: a step as `beam.ParDo`, or as a RunInference model handler for model steps.

Locally Beam's Python FnApiRunner runs one worker process per core (never Prism, which downloads a
binary); on a cluster the user's pipeline options pass through. A pipeline cannot return values, so the
results are written as JSON lines under the job's output for the driver to read back.
"""
from __future__ import annotations

import contextlib
import re
import uuid

import fsspec

from pipelines.console import stderr_without
from pipelines.engines import EngineOptions, Worker, in_order, open_workers, runs_model, step_ref

# Beam's local worker processes log at INFO (the pipeline options that set their level do not reach them):
# their start-up and shutdown, and any library's INFO lines; the driver echoes their warnings. Dropped: INFO
# and DEBUG lines, and warnings of the root, __main__ and apache_beam loggers. Errors and the rest pass.
NOISE = re.compile(rb"^((DEBUG|INFO):[\w.]+|WARNING:(root|__main__|apache_beam[\w.]*)):")


def run(step_cls, step_kwargs: dict, envelopes: list[str], opts: EngineOptions, work_uri: str) -> list[dict]:
    import apache_beam as beam
    from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    # the workers get the step by name: only the process that runs it imports it (pipelines.engines.Worker)
    ref = step_ref(step_cls)

    class StepModelHandler(ModelHandler):
        """The step as a RunInference model: built once per worker, one envelope per call."""

        def __init__(self):
            super().__init__(min_batch_size=1, max_batch_size=1)

        def load_model(self):
            return Worker(ref, step_kwargs, opts)

        def run_inference(self, batch, model, inference_args=None):
            for envelope in batch:
                yield PredictionResult(envelope, model(envelope))

    class StepDoFn(beam.DoFn):
        def setup(self):
            self.worker = Worker(ref, step_kwargs, opts)

        def process(self, envelope: str):
            yield self.worker(envelope)

        def teardown(self):
            self.worker.close()

    results_uri = f"{work_uri.rstrip('/')}/.pulsepipe-results-{uuid.uuid4().hex}.json"
    runner, args = _runner(opts)
    before = open_workers()
    with (stderr_without(NOISE), _closing_workers(before),
          beam.Pipeline(runner=runner, options=PipelineOptions(list(args))) as p):
        _ = (
            p
            | "Items" >> beam.Create(envelopes)
            | "Spread over workers" >> beam.Reshuffle()
            | "Run step" >> (
                RunInference(StepModelHandler()) | "Results" >> beam.Map(lambda r: r.inference)
                if runs_model(step_cls) else beam.ParDo(StepDoFn()))
            | "Gather" >> beam.combiners.ToList()
            | "Hand to driver" >> beam.Map(_write_json_lines, results_uri)
        )
    fs, path = fsspec.core.url_to_fs(results_uri)
    try:
        with fs.open(path, "r") as f:
            return in_order(f.read().splitlines(), len(envelopes))
    finally:
        fs.rm(path)


@contextlib.contextmanager
def _closing_workers(before: set):
    """Close the workers this process started during the block (a runner running them in this process)."""
    try:
        yield
    finally:
        for worker in open_workers() - before:
            worker.close()


def _runner(opts: EngineOptions):
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
