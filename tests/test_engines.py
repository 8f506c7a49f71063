"""The engine adapters: one step class, the same results in input order on Beam and on Ray."""
from __future__ import annotations

import os

import pytest

from pipelines.engines import EngineError, EngineOptions, run_step


class SquareStep:
    """A toy step with setup cost: records which process set it up and how many items it saw."""

    def __init__(self, offset: int):
        self.offset, self.pid, self.seen = offset, os.getpid(), 0

    def __call__(self, item: dict) -> dict:
        self.seen += 1
        if item["x"] < 0:
            return {"error": f"negative input {item['x']}"}
        return {"y": item["x"] ** 2 + self.offset, "pid": self.pid}


class SquareModelStep(SquareStep):
    runs_model = True  # run as a model step: Beam's RunInference, Ray's map_batches


@pytest.fixture(autouse=True)
def workers_import_this_module(monkeypatch):
    # worker processes import steps by module name; real steps live in pipelines/, this one here
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")])))


@pytest.mark.parametrize("engine", ["beam", "ray"])
def test_results_come_back_in_input_order(engine, tmp_path):
    items = [{"x": x} for x in [5, 3, -1, 8, 0, 2, 7]]
    results = run_step(SquareStep, {"offset": 1}, items, EngineOptions(engine, workers=2), str(tmp_path))
    assert [r.get("y") for r in results] == [26, 10, None, 65, 1, 5, 50]
    assert results[2] == {"error": "negative input -1"}
    assert all(r["pid"] != os.getpid() for r in results if "pid" in r), "work ran in worker processes"
    assert not list(tmp_path.iterdir()), "the hand-over file is removed"


@pytest.mark.parametrize("engine", ["beam", "ray"])
def test_model_steps_run_as_model_steps_with_the_same_results(engine, tmp_path):
    # Beam: a RunInference model handler; Ray: map_batches over an actor pool
    items = [{"x": x} for x in [5, 3, -1, 8, 0, 2, 7]]
    opts = EngineOptions(engine, workers=2)
    batched = run_step(SquareModelStep, {"offset": 1}, items, opts, str(tmp_path))
    assert [r.get("y") for r in batched] == [26, 10, None, 65, 1, 5, 50]


def test_no_items_starts_no_engine(tmp_path):
    assert run_step(SquareStep, {"offset": 0}, [], EngineOptions("ray"), str(tmp_path)) == []


def test_gpu_request_on_a_machine_without_gpus_fails_with_the_reason(tmp_path):
    opts = EngineOptions("ray", workers=1, num_gpus=1)
    with pytest.raises(EngineError, match="GPU per worker asked for"):
        run_step(SquareStep, {"offset": 0}, [{"x": 1}], opts, str(tmp_path))


def test_a_local_ray_start_that_times_out_is_tried_once_more(tmp_path, monkeypatch, capfd):
    import subprocess
    import sys

    import ray

    real_init, calls, left_behind = ray.init, [], []

    def init_timing_out_once(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:  # as Ray's timeout does: processes started, then the exception
            left_behind.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]))
            raise Exception("The current node timed out during startup. This could happen because ...")
        return real_init(**kwargs)

    monkeypatch.setattr(ray, "init", init_timing_out_once)
    results = run_step(SquareStep, {"offset": 0}, [{"x": 3}], EngineOptions("ray", workers=1), str(tmp_path))
    assert [r["y"] for r in results] == [9] and len(calls) == 2
    assert left_behind[0].wait(timeout=10) is not None, "what the failed start left running is ended"
    assert "Ray did not start (The current node timed out during startup." in capfd.readouterr().err


def test_other_ray_start_errors_are_not_retried(tmp_path, monkeypatch):
    import ray

    calls = []

    def init_failing(**kwargs):
        calls.append(kwargs)
        raise ValueError("bad argument")

    monkeypatch.setattr(ray, "init", init_failing)
    with pytest.raises(ValueError, match="bad argument"):
        run_step(SquareStep, {"offset": 0}, [{"x": 3}], EngineOptions("ray", workers=1), str(tmp_path))
    assert len(calls) == 1


def test_worker_and_gpu_counts_are_checked_as_they_are_parsed(capsys):
    import argparse

    from pipelines.engines import add_engine_arguments

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser, gpus=True)
    for bad in (["--workers", "-1"], ["--workers", "two"], ["--gpus-per-worker", "-1"], ["--gpus-per-worker", "nan"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
        assert f"argument {bad[0]}: expected" in capsys.readouterr().err  # what is wrong, not a type's name
    args = parser.parse_args(["--workers", "3", "--gpus-per-worker", "0.5"])
    assert (args.workers, args.gpus_per_worker) == (3, 0.5)


@pytest.mark.parametrize("engine", ["ray", "beam"])
def test_a_step_that_kills_its_worker_ends_the_run_with_an_error(tmp_path, engine):
    # Ray Data would retry such an item on fresh workers forever; our runs try it TASK_RETRIES more times
    import subprocess
    import sys

    code = f"""
import os
from pipelines.engines import EngineOptions, run_step

class DiesOnTwo:
    def __call__(self, item):
        if item["x"] == 2:
            os._exit(1)  # as the kernel's OOM killer would end it
        return {{"y": item["x"]}}

try:
    run_step(DiesOnTwo, {{}}, [{{"x": i}} for i in range(4)], EngineOptions({engine!r}, workers=1), {str(tmp_path)!r})
except Exception as e:
    print("the run ended:", type(e).__name__)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert "the run ended:" in done.stdout, done.stderr[-2000:]
