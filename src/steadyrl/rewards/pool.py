"""A process pool for slow reward functions: a timeout per call, results in prompt order.

    pool = RewardPool("my_rewards.py:verify", workers=4, timeout_s=10.0)
    outcomes = pool.map(records, completions)   # one per completion, in order: a RewardValue,
    pool.close()                                # CallFailed (raised / bad value / worker died) or CallTimedOut

Each worker is a process that loads the reward by name once and then scores one (record, completion) at a
time. The timeout of a call runs from the moment its worker starts it (not from submission, so a long queue
never times a call out). A call past its timeout is ended by killing its worker (the only way to stop
arbitrary Python, or a verifier stuck in C); a fresh worker takes its place. Processes that the reward
function itself started are not killed with it. Outcomes are indexed by position, so the result is the same
whatever order the workers finish in.

Workers are started with ``forkserver`` where the platform has it (a clean server process forks each worker:
safe with CUDA and threads in the trainer, and a worker replacing a killed one starts in milliseconds), else
``spawn``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import sys
import time
import traceback
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any

from steadyrl.rewards.functions import (
    InvalidRewardValue,
    RewardFunctionError,
    RewardValue,
    absolute_spec,
    load_reward_function,
    to_reward_value,
)

_JOIN_S = 2.0


@dataclass(frozen=True)
class CallFailed:
    """A call that produced no reward: ``kind`` is "raised", "invalid" (a value that is not a reward) or "died"."""

    kind: str
    error_type: str
    message: str
    traceback: str = ""


@dataclass(frozen=True)
class CallTimedOut:
    """A call still running after ``seconds``; its worker was killed."""

    seconds: float


Outcome = RewardValue | CallFailed | CallTimedOut


def call_reward(function, record: dict[str, Any], completion: str, reward_kwargs: dict[str, Any]) -> Outcome:
    """One call, its exception or bad return value captured (used in this process and in the workers)."""
    try:
        value = function(record, completion, **reward_kwargs)
    except Exception as error:
        frames = traceback.format_exception(type(error), error, error.__traceback__, limit=-3)
        return CallFailed("raised", type(error).__name__, str(error), "".join(frames))
    try:
        return to_reward_value(value)
    except InvalidRewardValue as error:
        return CallFailed("invalid", "InvalidRewardValue", str(error))


def _worker_main(conn, spec: str, reward_kwargs: dict[str, Any], sys_path: list[str]) -> None:
    sys.path[:] = sys_path
    try:
        function = load_reward_function(spec)
    except Exception as error:
        conn.send(("load_error", f"{type(error).__name__}: {error}"))
        return
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        index, record, completion = job
        conn.send((index, call_reward(function, record, completion, reward_kwargs)))


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # the server imports these once; each worker is a fork of it (a __main__ script is imported there too,
        # as the default preload does, so that workers do not each import it again)
        context.set_forkserver_preload(["__main__", "steadyrl.rewards.pool"])
        return context
    return multiprocessing.get_context("spawn")


class _Worker:
    def __init__(self, context, spec: str, reward_kwargs: dict[str, Any]) -> None:
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(
            target=_worker_main,
            args=(child_conn, spec, reward_kwargs, list(sys.path)),
            name="steadyrl-reward",
            daemon=True,
        )
        self.process.start()
        child_conn.close()

    def stop(self, kill: bool = False) -> None:
        if not kill:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.conn.send(None)
            self.process.join(_JOIN_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(_JOIN_S)
        self.conn.close()


def _stop_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop()
    workers.clear()


class RewardPool:
    """``workers`` processes calling the reward ``spec`` (see :func:`load_reward_function`).

    Args:
      spec: ``"path/to/file.py:function"`` or ``"package.module:function"``; a relative file path is resolved
        against the working directory now.
      reward_kwargs: passed to every call as keyword arguments (must pickle).
      workers: number of processes (>= 1), started at the first ``map``.
      timeout_s: seconds a call may run; None = no limit.
    """

    def __init__(
        self,
        spec: str,
        reward_kwargs: dict[str, Any] | None = None,
        *,
        workers: int,
        timeout_s: float | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1 for a pool, got {workers}")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds (or None for no limit), got {timeout_s}")
        self.spec = absolute_spec(spec)
        self.reward_kwargs = dict(reward_kwargs or {})
        self.workers = workers
        self.timeout_s = timeout_s
        self._context = _context()
        self._idle: list[_Worker] = []
        self._all: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._all)

    def _new_worker(self) -> _Worker:
        worker = _Worker(self._context, self.spec, self.reward_kwargs)
        self._all.append(worker)
        return worker

    def _retire(self, worker: _Worker, kill: bool) -> None:
        worker.stop(kill=kill)
        self._all.remove(worker)

    def map(self, records: list[dict[str, Any]], completions: list[str]) -> list[Outcome]:
        """The outcome of ``reward(records[i], completions[i], **reward_kwargs)`` for every i, in order."""
        if len(records) != len(completions):
            raise ValueError(f"got {len(records)} records but {len(completions)} completions")
        while len(self._all) < self.workers:
            self._idle.append(self._new_worker())
        outcomes: list[Outcome | None] = [None] * len(records)
        pending = deque(range(len(records)))
        busy: dict[_Worker, tuple[int, float]] = {}  # worker -> (index, deadline)
        while pending or busy:
            while self._idle and pending:
                worker, index = self._idle.pop(), pending.popleft()
                try:
                    worker.conn.send((index, records[index], completions[index]))
                except (BrokenPipeError, OSError):  # died while idle: replace it and retry the job
                    self._retire(worker, kill=True)
                    self._idle.append(self._new_worker())
                    pending.appendleft(index)
                    continue
                deadline = time.monotonic() + self.timeout_s if self.timeout_s is not None else float("inf")
                busy[worker] = (index, deadline)
            wait_s = None
            if self.timeout_s is not None:
                wait_s = max(0.0, min(deadline for _, deadline in busy.values()) - time.monotonic())
            handles = [w.conn for w in busy] + [w.process.sentinel for w in busy]
            ready = set(multiprocessing.connection.wait(handles, timeout=wait_s))
            now = time.monotonic()
            for worker, (index, deadline) in list(busy.items()):
                message = None
                if worker.conn in ready or worker.process.sentinel in ready:
                    try:
                        message = worker.conn.recv() if worker.conn.poll() else None
                    except (EOFError, OSError):
                        message = None
                if message is not None and message[0] == "load_error":
                    self.close()
                    raise RewardFunctionError(f"a reward worker could not load {self.spec}: {message[1]}")
                if message is not None:
                    outcomes[message[0]] = message[1]
                    del busy[worker]
                    self._idle.append(worker)
                elif worker.process.sentinel in ready and not worker.process.is_alive():
                    code = worker.process.exitcode
                    outcomes[index] = CallFailed(
                        "died", "WorkerDied", f"the reward worker process exited with code {code} during the call"
                    )
                    del busy[worker]
                    self._retire(worker, kill=True)
                    self._idle.append(self._new_worker())
                elif now >= deadline:
                    outcomes[index] = CallTimedOut(self.timeout_s)
                    del busy[worker]
                    self._retire(worker, kill=True)
                    self._idle.append(self._new_worker())
        return outcomes  # type: ignore[return-value]

    def close(self) -> None:
        """Stop every worker (idempotent); the pool starts new ones if ``map`` is called again."""
        _stop_all(self._all)
        self._idle.clear()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
