"""Crash isolation: a worker's step in a supervised child process, so an item that kills it (SIGKILL, a crash
in native code, an out-of-memory kill) fails alone instead of ending the run.

Each engine worker keeps one long-lived child (`Supervised`) that builds the step once and answers
envelopes sent over a pipe, so models and detectors still load once per worker and only small JSON
crosses. When the child dies mid-item, the supervisor notes the signal, starts a fresh child and tries
the item again, up to ATTEMPTS times in all; then the step's `lost(item, reason)` answers it (a failed
row naming the item: "worker died while processing (signal 9) after 3 attempts"). With a timeout, a child
that gives no answer within it is killed and counts as dead ("no answer in 600 s: killed"), so an item that
hangs its worker (a decoder spinning on a corrupt file) fails alone too. An item holding
several things (a bucket of recordings) whose step declares `split(item)` is tried one part at a time
after a death, so only the part that kills its worker fails; the parts' results, dicts of lists, are
joined key by key. A child that dies in `split` or `lost` is replaced and asked again, up to ATTEMPTS times.
A step without `lost` ends the run with the item named.

The child is a fresh interpreter (`python -c CHILD`, what multiprocessing's `spawn` does, without
re-running the parent's main module): forking a process that holds JAX/XLA or
engine threads is unsafe. It ends when its parent does (its pipe closes, or its parent changes).

Test-only fault injection: with PULSEPIPE_TEST_KILL=RECORDING_ID:TIMES[,RECORDING_ID:TIMES...] in the
environment, a child SIGKILLs itself on the first TIMES attempts at an item naming that recording (its
"recording_id" at any depth); TIMES >= ATTEMPTS makes it a poison item. PULSEPIPE_TEST_HANG, in the same
form, makes it sleep instead, never answering. Nothing else reads them.
"""
from __future__ import annotations

import importlib
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from multiprocessing.connection import Connection

ATTEMPTS = 3  # tries at an item whose processing kills its worker, each on a fresh child
TEST_KILL, TEST_HANG = "PULSEPIPE_TEST_KILL", "PULSEPIPE_TEST_HANG"
WATCH_PARENT_S = 1.0
# the child's command (not `-m`: this module is imported with its package before it would run as __main__)
CHILD = "import sys; from pipelines.engines.supervisor import main; main(int(sys.argv[1]), int(sys.argv[2]))"


class WorkerDied(RuntimeError):
    """The child died; str says how ("signal 9", "exit status 1")."""


class StepError(RuntimeError):
    """The step raised in its child and the exception could not travel back; str holds its traceback."""


def step_ref(step_cls) -> str:
    """module:qualname, how a child (or any engine worker) imports the step class."""
    return f"{step_cls.__module__}:{step_cls.__qualname__}"


def load_step_class(ref: str):
    module, _, name = ref.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


class Supervised:
    """A step in a supervised child process: `answer(envelope) -> result envelope`, like
    `pipelines.engines.answer` on an in-process step; `close()` ends the child."""

    def __init__(self, ref: str, step_kwargs: dict, keep_log: bool = False, attempts: int = ATTEMPTS,
                 timeout_s: float | None = None):
        self.ref, self.step_kwargs, self.keep_log, self.attempts = ref, step_kwargs, keep_log, attempts
        self.timeout_s = timeout_s  # the longest wait for an answer (to an item, lost or split); None: no limit
        self.proc = self.conn = None
        self.hooks: dict[str, bool] = {}
        self._lock = threading.Lock()  # Beam may share one model step between threads
        self._start()

    def answer(self, envelope: str) -> str:
        e = json.loads(envelope)
        with self._lock:
            notes: list[str] = []
            result, log = self._answer(e, 0, notes)
            e = {"index": e["index"], "result": result}
            if self.keep_log:
                e["log"] = "".join(f"  {n}\n" for n in notes) + log
            else:
                for n in notes:
                    print(f"  {n}", file=sys.stderr, flush=True)
            return json.dumps(e, sort_keys=True)

    # bound at definition: __del__ may run at interpreter exit, when module globals are already None
    def close(self, _gone=(OSError, EOFError, subprocess.TimeoutExpired)) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        try:
            self.conn.send(("close", None))
            proc.wait(timeout=30)
        except _gone:
            proc.kill()
            proc.wait()
        self.conn.close()

    def __del__(self):
        self.close()

    # ---- the retries -------------------------------------------------------------------------------

    def _answer(self, e: dict, used: int, notes: list[str]) -> tuple[object, str]:
        """(result, log) for envelope e whose item has been tried `used` times already."""
        while True:
            try:
                return self._ask("run", {**e, "attempt": used + 1})
            except WorkerDied as died:
                used += 1
                notes.append(f"item {e['index']}: worker died while processing ({died}), attempt {used} of "
                             f"{self.attempts}")
                why = f"worker died while processing ({died}) after {used} attempts"
                if self.hooks.get("split"):
                    parts = self._ask_again("split", e["item"], e["index"], notes)[0]
                    if len(parts) > 1:
                        answers = [self._answer({**e, "item": p}, used, notes) for p in parts]
                        return _joined([r for r, _ in answers]), "".join(log for _, log in answers)
                if used < self.attempts:
                    continue
                if not self.hooks.get("lost"):
                    raise WorkerDied(f"{why}: item {e['index']} {json.dumps(e['item'], sort_keys=True)[:300]}; "
                                     f"{self.ref} has no lost(item, reason) to record it") from None
                return self._ask_again("lost", {**e, "reason": why}, e["index"], notes)

    def _ask_again(self, op: str, payload, index: int, notes: list[str]) -> tuple[object, str]:
        """_ask for `split` and `lost`, which run no model: a child that dies in one (killed for memory beside
        it, say) is replaced and asked again, up to `attempts` times, so the item is still answered."""
        return self._retried(
            lambda: self._ask(op, payload),
            lambda died, tried: notes.append(f"item {index}: worker died in {op} ({died}), try {tried} of "
                                             f"{self.attempts}"),
            lambda died, tried: f"worker died in {op}({json.dumps(payload, sort_keys=True)[:300]}) of item {index} "
                                f"on each of {tried} tries, the last: {died}")

    def _retried(self, call, note, last):
        """call() again while it raises WorkerDied, `attempts` times at most; note(died, tried) after each death
        but the last, which raises WorkerDied(last(died, tried))."""
        for tried in range(1, self.attempts + 1):
            try:
                return call()
            except WorkerDied as died:
                if tried == self.attempts:
                    raise WorkerDied(last(died, tried)) from None
                note(died, tried)

    def _ask(self, op: str, payload) -> tuple[object, str]:
        """The child's (answer, log) to one request; WorkerDied if it died meanwhile or gave no answer within
        the timeout (then it is killed); a fresh one is started for the next request."""
        if self.proc is not None and self.proc.poll() is not None:  # it died between items: none to retry
            print(f"  worker died between items ({self._reap()}); starting a fresh one", file=sys.stderr, flush=True)
        if self.proc is None:
            self._start()
        try:
            self.conn.send((op, payload))
            if self.timeout_s is not None and not self.conn.poll(self.timeout_s):
                self.proc.kill()
                self._reap()
                raise WorkerDied(f"no answer in {self.timeout_s:g} s: killed")
            status, value, log = self.conn.recv()
        except (EOFError, OSError):
            raise WorkerDied(self._reap()) from None
        if status == "error":
            raise _exception(value)
        return value, log

    def _start(self) -> None:
        """A fresh child with the step built; one killed while it builds the step is replaced, up to
        `attempts` times, as the step's setup is no item's fault."""
        self._retried(self._start_once,
                      lambda died, _: print(f"  worker died {died}; starting a fresh one", file=sys.stderr, flush=True),
                      lambda died, tried: f"{died} on {tried} starts")

    def _start_once(self) -> None:
        parent_end, child_end = _pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}
        with warnings.catch_warnings():  # JAX warns of any fork; this one execs at once, which is safe
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
            self.proc = subprocess.Popen([sys.executable, "-c", CHILD, *map(str, child_end)], pass_fds=child_end,
                                         env=env, stdin=subprocess.DEVNULL)
        for fd in child_end:
            os.close(fd)
        self.conn = _Duplex(Connection(parent_end[0]), Connection(parent_end[1]))
        try:
            self.conn.send((self.ref, self.step_kwargs, self.keep_log))
            status, value, _ = self.conn.recv()
        except (EOFError, OSError):
            raise WorkerDied(f"while starting {self.ref}: {self._reap()}") from None
        if status == "error":
            self.close()
            raise _exception(value)
        self.hooks = value

    def _reap(self) -> str:
        proc, self.proc = self.proc, None
        self.conn.close()
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # the pipe broke but the child lives on: end it
            proc.kill()
            code = proc.wait()
        return f"signal {-code}" if code < 0 else f"exit status {code}"


def _joined(results: list[dict]) -> dict:
    """The results of an item's parts as one: each key's lists concatenated."""
    out: dict = {}
    for r in results:
        for k, v in r.items():
            out.setdefault(k, []).extend(v)
    return out


def _exception(payload: tuple[bytes | None, str]) -> BaseException:
    """The step's exception from its child, with the child's traceback as a note."""
    pickled, tb = payload
    try:
        e = pickle.loads(pickled) if pickled is not None else None
    except Exception:  # noqa: BLE001 - an exception type the parent cannot rebuild
        e = None
    if not isinstance(e, BaseException):
        return StepError(f"the step raised in its worker process:\n{tb}")
    e.add_note(f"in the step's worker process:\n{tb}")
    return e


# ---- the pipes: one each way, framed by multiprocessing's Connection ---------------------------------

class _Duplex:
    def __init__(self, reader: Connection, writer: Connection):
        self.reader, self.writer = reader, writer

    def send(self, obj) -> None:
        self.writer.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def recv(self):
        return pickle.loads(self.reader.recv_bytes())

    def poll(self, timeout_s: float) -> bool:
        """Whether an answer is there to read within timeout_s (or the other end closed)."""
        return self.reader.poll(timeout_s)

    def close(self) -> None:
        for c in (self.reader, self.writer):
            if not c.closed:
                c.close()


def _pipe() -> tuple[tuple[int, int], tuple[int, int]]:
    """((parent reads, parent writes), (child reads, child writes))."""
    down_r, down_w = os.pipe()  # parent -> child
    up_r, up_w = os.pipe()  # child -> parent
    for fd in (up_r, down_w):
        os.set_inheritable(fd, False)
    return (up_r, down_w), (down_r, up_w)


# ---- the child --------------------------------------------------------------------------------------

def _serve(conn: _Duplex) -> None:
    from pipelines.engines import answer, close

    ref, step_kwargs, keep_log = conn.recv()
    try:
        step_cls = load_step_class(ref)
        step = step_cls(**step_kwargs)
    except Exception as e:  # noqa: BLE001 - handed to the parent, which raises it
        conn.send(("error", _pickled(e), None))
        return
    conn.send(("ok", {"lost": hasattr(step, "lost"), "split": hasattr(step, "split")}, ""))
    try:
        while True:
            try:
                op, payload = conn.recv()
            except EOFError:  # the parent is gone
                return
            if op == "close":
                return
            try:
                if op == "run":
                    _test_fault(payload)
                    env = json.loads(answer(step, json.dumps(payload), keep_log=keep_log))
                    conn.send(("ok", env["result"], env.get("log", "")))
                elif op == "lost":
                    lost = lambda item: step.lost(item, payload["reason"])  # noqa: E731
                    env = json.loads(answer(lost, json.dumps(payload), keep_log=keep_log))
                    conn.send(("ok", env["result"], env.get("log", "")))
                else:  # split
                    conn.send(("ok", step.split(payload), ""))
            except Exception as e:  # noqa: BLE001 - the step's bug: the parent raises it, as in-process
                conn.send(("error", _pickled(e), None))
    finally:
        close(step)


def _pickled(e: BaseException) -> tuple[bytes | None, str]:
    tb = "".join(traceback.format_exception(e))
    try:
        return pickle.dumps(e), tb
    except Exception:  # noqa: BLE001 - an exception that cannot be pickled travels as text
        return None, tb


def _test_fault(envelope: dict) -> None:
    """The test-only faults (see the module's docstring)."""
    for name, fault in ((TEST_KILL, lambda: os.kill(os.getpid(), signal.SIGKILL)), (TEST_HANG, lambda: time.sleep(3600))):
        for entry in filter(None, os.environ.get(name, "").split(",")):
            recording_id, _, times = entry.rpartition(":")
            if envelope["attempt"] <= int(times) and recording_id in _recording_ids(envelope["item"]):
                fault()


def _recording_ids(obj) -> set:
    if isinstance(obj, dict):
        found = {obj["recording_id"]} if isinstance(obj.get("recording_id"), str) else set()
        return found.union(*(_recording_ids(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(_recording_ids(v) for v in obj))
    return set()


def _watch_parent() -> None:
    """End this child when its parent is gone, even mid-item (its pipe says so only between items)."""
    parent = os.getppid()
    while True:
        threading.Event().wait(WATCH_PARENT_S)
        if os.getppid() != parent:
            os._exit(1)


def main(read_fd: int, write_fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the driver's to handle; it ends us
    threading.Thread(target=_watch_parent, name="watch-parent", daemon=True).start()
    try:
        _serve(_Duplex(Connection(read_fd), Connection(write_fd)))
    except (BrokenPipeError, EOFError):  # the parent is gone: nobody to answer
        pass
