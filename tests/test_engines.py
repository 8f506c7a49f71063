"""The engine adapters: one step class, the same results in input order on Beam and on Ray."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from pipelines.engines import EngineError, EngineOptions, run_step
from pipelines.engines.ray import START_ATTEMPTS


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


# Ray runs in the default set through the beam-and-ray equality tests of each job; its variants here are slow,
# to keep `make test` within its time
ENGINES = ["beam", pytest.param("ray", marks=pytest.mark.slow)]


@pytest.mark.parametrize("engine", ENGINES)
def test_results_come_back_in_input_order(engine, tmp_path):
    items = [{"x": x} for x in [5, 3, -1, 8, 0, 2, 7]]
    results = run_step(SquareStep, {"offset": 1}, items, EngineOptions(engine, workers=2), str(tmp_path))
    assert [r.get("y") for r in results] == [26, 10, None, 65, 1, 5, 50]
    assert results[2] == {"error": "negative input -1"}
    assert all(r["pid"] != os.getpid() for r in results if "pid" in r), "work ran in worker processes"
    assert not list(tmp_path.iterdir()), "the hand-over file is removed"


@pytest.mark.parametrize("engine", ENGINES)
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


@pytest.mark.parametrize("error", [
    Exception("The current node timed out during startup. This could happen because ..."),  # raylet
    RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_0123"),  # GCS
])
def test_a_local_ray_start_that_times_out_is_started_again(tmp_path, monkeypatch, capfd, error):
    import subprocess
    import sys

    import ray

    real_init, calls, left_behind = ray.init, [], []

    def init_timing_out_once(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:  # as Ray's timeout does: processes started, then the exception
            left_behind.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]))
            raise error
        return real_init(**kwargs)

    monkeypatch.setattr(ray, "init", init_timing_out_once)
    results = run_step(SquareStep, {"offset": 0}, [{"x": 3}], EngineOptions("ray", workers=1), str(tmp_path))
    # a second real timeout (Ray's own flake) takes a third start
    assert [r["y"] for r in results] == [9] and 2 <= len(calls) <= START_ATTEMPTS
    assert left_behind[0].wait(timeout=10) is not None, "what the failed start left running is ended"
    assert f"Ray did not start ({error}); starting it again" in capfd.readouterr().err


@pytest.mark.parametrize("error, starts", [
    (RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_0123"), START_ATTEMPTS),
    (ValueError("bad argument"), 1),  # not a start-up timeout: not retried
])
def test_a_ray_start_that_keeps_failing_gives_up(tmp_path, monkeypatch, capfd, error, starts):
    import ray

    calls = []

    def init_failing(**kwargs):
        calls.append(kwargs)
        raise error

    monkeypatch.setattr(ray, "init", init_failing)
    with pytest.raises(type(error), match=str(error)):
        run_step(SquareStep, {"offset": 0}, [{"x": 3}], EngineOptions("ray", workers=1), str(tmp_path))
    assert len(calls) == starts
    assert capfd.readouterr().err.count("starting it again") == starts - 1


def test_worker_and_gpu_counts_and_the_item_timeout_are_checked_as_they_are_parsed(capsys):
    import argparse

    from pipelines.engines import add_engine_arguments, engine_options

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser, gpus=True)
    for bad in (["--workers", "-1"], ["--workers", "two"], ["--gpus-per-worker", "-1"], ["--gpus-per-worker", "nan"],
                ["--item-timeout", "0"], ["--item-timeout", "inf"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
        assert f"argument {bad[0]}: expected" in capsys.readouterr().err  # what is wrong, not a type's name
    args = parser.parse_args(["--workers", "3", "--gpus-per-worker", "0.5", "--item-timeout", "90"])
    assert (args.workers, args.gpus_per_worker) == (3, 0.5)
    assert engine_options(args).item_timeout_s == 90
    assert engine_options(parser.parse_args([])).item_timeout_s is None  # no limit unless asked


# ---- crash isolation: a step that kills its process (pipelines.engines.supervisor) -----------------------

class NamedStep(SquareStep):
    """SquareStep on items naming a recording, which PULSEPIPE_TEST_KILL can make kill its process."""

    def lost(self, item: dict, reason: str) -> dict:
        return {"lost": f"{item['recording_id']}: {reason}", "pid": os.getpid()}


class NamedModelStep(NamedStep):
    """A model step over buckets {"things": [items]}, whose parts are retried alone after a death."""

    runs_model = True

    def __call__(self, bucket: dict) -> dict:
        return {"ys": [super(NamedModelStep, self).__call__(item) for item in bucket["things"]]}

    def lost(self, bucket: dict, reason: str) -> dict:
        return {"ys": [super(NamedModelStep, self).lost(item, reason) for item in bucket["things"]]}

    @staticmethod
    def split(bucket: dict) -> list[dict]:
        return [{"things": [item]} for item in bucket["things"]]


def die_the_first(marks: str, deaths: int) -> None:
    """SIGKILL this process the first `deaths` times it is called, counted in files under `marks`."""
    died = len(list(Path(marks).iterdir()))
    if died < deaths:
        (Path(marks) / str(died)).touch()
        os.kill(os.getpid(), signal.SIGKILL)


class DyingLostStep(NamedStep):
    """NamedStep whose `lost` kills its process the first `deaths` times it is asked."""

    def __init__(self, offset: int, marks: str, deaths: int):
        super().__init__(offset)
        self.marks, self.deaths = marks, deaths

    def lost(self, item: dict, reason: str) -> dict:
        die_the_first(self.marks, self.deaths)
        return super().lost(item, reason)


class DyingStartStep(NamedStep):
    """NamedStep whose set-up kills its process the first `deaths` times."""

    def __init__(self, offset: int, marks: str, deaths: int):
        die_the_first(marks, deaths)
        super().__init__(offset)


def named(xs) -> list[dict]:
    return [{"x": x, "recording_id": f"r{x}"} for x in xs]


@pytest.mark.parametrize("engine", ENGINES)
def test_an_item_that_kills_its_worker_fails_alone_and_one_killed_once_succeeds(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("PULSEPIPE_TEST_KILL", "r2:99,r4:1")  # r2: every attempt (poison); r4: the first only
    results = run_step(NamedStep, {"offset": 0}, named(range(6)), EngineOptions(engine, workers=2), str(tmp_path))
    assert [r.get("y") for r in results] == [0, 1, None, 9, 16, 25]
    assert results[2]["lost"] == "r2: worker died while processing (signal 9) after 3 attempts"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("engine", ENGINES)
def test_a_bucket_that_kills_its_worker_is_retried_one_item_at_a_time(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("PULSEPIPE_TEST_KILL", "r2:99,r5:1")
    buckets = [{"things": named([0, 1, 2])}, {"things": named([3, 4, 5])}]
    results = run_step(NamedModelStep, {"offset": 0}, buckets, EngineOptions(engine, workers=2), str(tmp_path))
    ys = [y for r in results for y in r["ys"]]
    assert [y.get("y") for y in ys] == [0, 1, None, 9, 16, 25]  # r5's bucket died once, then each part worked
    # r2's bucket died once whole, then r2 alone twice more
    assert ys[2]["lost"] == "r2: worker died while processing (signal 9) after 3 attempts"


@pytest.mark.parametrize("engine", ENGINES)
def test_an_item_that_hangs_its_worker_is_killed_after_the_timeout_and_fails_alone(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("PULSEPIPE_TEST_HANG", "r1:99,r3:1")  # r1: every attempt; r3: the first only
    opts = EngineOptions(engine, workers=2, item_timeout_s=2)
    results = run_step(NamedStep, {"offset": 0}, named(range(5)), opts, str(tmp_path))
    assert [r.get("y") for r in results] == [0, None, 4, 9, 16]
    assert results[1]["lost"] == "r1: worker died while processing (no answer in 2 s: killed) after 3 attempts"


def test_a_worker_that_dies_recording_a_lost_item_is_replaced_up_to_3_times(tmp_path, monkeypatch):
    monkeypatch.setenv("PULSEPIPE_TEST_KILL", "r1:99")
    (tmp_path / "marks").mkdir()
    (tmp_path / "work").mkdir()
    kwargs = {"offset": 0, "marks": str(tmp_path / "marks"), "deaths": 2}
    results = run_step(DyingLostStep, kwargs, named(range(3)), EngineOptions("beam", workers=1), str(tmp_path / "work"))
    assert [r.get("y") for r in results] == [0, None, 4]
    assert results[1]["lost"] == "r1: worker died while processing (signal 9) after 3 attempts"
    assert len(list((tmp_path / "marks").iterdir())) == 2  # lost's first two children did die
    with pytest.raises(Exception, match=r"worker died in lost\(.*\) of item 1 on each of 3 tries, the last: signal 9"):
        run_step(DyingLostStep, {**kwargs, "deaths": 99}, named(range(3)), EngineOptions("beam", workers=1),
                 str(tmp_path / "work"))


def test_a_worker_killed_while_it_sets_up_is_started_again_up_to_3_times(tmp_path, capsys):
    from pipelines.engines.supervisor import Supervised, WorkerDied, step_ref

    ref = step_ref(DyingStartStep)
    (tmp_path / "marks").mkdir()
    kwargs = {"offset": 1, "marks": str(tmp_path / "marks"), "deaths": 2}
    worker = Supervised(ref, kwargs)  # its step's set-up is no item's fault: the third start is the one
    try:
        answer = json.loads(worker.answer(json.dumps({"index": 0, "item": {"x": 3, "recording_id": "r3"}})))
    finally:
        worker.close()
    assert answer["result"]["y"] == 10
    assert capsys.readouterr().err.count(f"worker died while starting {ref}: signal 9; starting a fresh one") == 2
    with pytest.raises(WorkerDied, match=rf"^while starting {ref}: signal 9 on 3 starts$"):
        Supervised(ref, {**kwargs, "deaths": 99})
    assert len(list((tmp_path / "marks").iterdir())) == 5  # 2, then 3 more deaths


def test_the_step_runs_in_one_child_per_worker_that_outlives_items(tmp_path):
    results = run_step(NamedStep, {"offset": 0}, named(range(6)), EngineOptions("beam", workers=1), str(tmp_path))
    assert len({r["pid"] for r in results}) == 1, "one step instance for the worker's items, not one per item"
    opts = EngineOptions("beam", workers=1, pipeline_args=("--direct_running_mode=in_memory",))
    in_process = run_step(NamedStep, {"offset": 0}, named(range(2)), opts, str(tmp_path))
    assert {r["pid"] for r in in_process} != {os.getpid()}, "isolated even when the engine runs in this process"
    unisolated = run_step(NamedStep, {"offset": 0}, named(range(2)),
                          EngineOptions("beam", workers=1, pipeline_args=opts.pipeline_args, isolate=False),
                          str(tmp_path))
    assert {r["pid"] for r in unisolated} == {os.getpid()}


def test_a_step_without_lost_ends_the_run_naming_the_item(tmp_path, monkeypatch):
    monkeypatch.setenv("PULSEPIPE_TEST_KILL", "r1:99")
    with pytest.raises(Exception, match=r"worker died while processing \(signal 9\) after 3 attempts: item 1 "
                                        r'\{"recording_id": "r1", "x": 1\}; test_engines:SquareStep has no lost'):
        run_step(SquareStep, {"offset": 0}, named(range(3)), EngineOptions("beam", workers=1), str(tmp_path))


def test_a_step_defined_in_main_is_refused(tmp_path):
    Step = type("Step", (SquareStep,), {"__module__": "__main__"})
    with pytest.raises(ValueError, match="must live in a module its workers can import"):
        run_step(Step, {"offset": 0}, [{"x": 1}], EngineOptions("beam", workers=1), str(tmp_path))
