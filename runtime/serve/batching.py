"""A bounded request queue drained by ONE worker thread (the GPU is one resource), in micro-batches.

    queue = BatchQueue(run_batch, max_queue=16, max_batch=4, batch_wait_s=0.005)
    queue.start()
    job = queue.submit(key, payload, timeout_s=60)        # QueueFull when 16 are already waiting
    result = job.future.result()                          # or await asyncio.wrap_future(job.future)

Requests with the same `key` (pipeline, size, steps, scheduler, scales …: anything that must be
equal to share one pipeline call) are grouped: the worker takes the oldest waiting request, waits
up to `batch_wait_s` for more of the same key (never past `max_batch`), and hands the group to
`run_batch(key, payloads) -> list[result | Exception]` (or a generator of them, in order: each
caller is answered as soon as its own result exists), one entry per payload, so one bad request
never fails its neighbours. Requests whose deadline passed while they waited, or whose caller gave
up (future cancelled), are dropped before they reach the GPU.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

RunBatch = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


class QueueFull(RuntimeError):
    """The bounded queue is full: answer 429 and let the client retry later."""


class QueueClosed(RuntimeError):
    """The queue is shutting down: answer 503."""


class DeadlineExceeded(TimeoutError):
    """The request waited past its deadline before the worker reached it."""


@dataclass(eq=False)
class Job:
    """One queued request: its batch key, the pipeline's input, its deadline and its future."""

    key: Hashable
    payload: Any
    deadline: float
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0  # when its batch began running
    finished: float = 0.0
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    """Callbacks the metrics module plugs in; all optional."""

    on_depth: Callable[[int], None] = lambda depth: None
    on_batch: Callable[[int, float], None] = lambda size, seconds: None  # size, run seconds
    on_wait: Callable[[float], None] = lambda seconds: None  # per job: queue wait
    on_dropped: Callable[[str], None] = lambda reason: None  # 'deadline' | 'cancelled'


class BatchQueue:
    """Bounded FIFO of Jobs with micro-batching by key, executed on one daemon worker thread."""

    def __init__(self, run_batch: RunBatch, max_queue: int = 16, max_batch: int = 1,
                 batch_wait_s: float = 0.0, stats: BatchStats | None = None):
        if max_queue < 1 or max_batch < 1 or batch_wait_s < 0:
            raise ValueError("max_queue and max_batch must be >= 1 and batch_wait_s >= 0")
        self.run_batch = run_batch
        self.max_queue, self.max_batch, self.batch_wait_s = max_queue, max_batch, batch_wait_s
        self.stats = stats or BatchStats()
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="serve-worker", daemon=True)

    # -- caller side (any thread) --------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (once)."""
        self._thread.start()

    def submit(self, key: Hashable, payload: Any, timeout_s: float) -> Job:
        """Queue one request; returns its Job (.future; .enqueued, .started, .finished: monotonic
        seconds). Raises QueueFull or QueueClosed at once."""
        job = Job(key, payload, time.monotonic() + timeout_s)
        with self._cond:
            if self._closed:
                raise QueueClosed("the server is shutting down: retry on another replica")
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"{len(self._jobs)} requests are already waiting (the queue bound): "
                                "retry after a short pause, or add replicas")
            self._jobs.append(job)
            self.stats.on_depth(len(self._jobs))
            self._cond.notify()
        return job

    def depth(self) -> int:
        """Requests waiting (not counting the batch being run)."""
        with self._cond:
            return len(self._jobs)

    @property
    def alive(self) -> bool:
        """True while the worker thread runs."""
        return self._thread.is_alive()

    def close(self, timeout_s: float = 5.0) -> None:
        """Refuse new jobs, fail the waiting ones with QueueClosed, let the running batch finish."""
        with self._cond:
            self._closed = True
            while self._jobs:
                job = self._jobs.popleft()
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(QueueClosed("the server shut down before this request ran"))
            self.stats.on_depth(0)
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # -- worker side ---------------------------------------------------------------------------
    def _usable(self, job: Job, now: float) -> bool:
        """Claim the job for running; False (and its future settled) if it expired or was cancelled."""
        if not job.future.set_running_or_notify_cancel():
            self.stats.on_dropped("cancelled")
            return False
        if now > job.deadline:
            job.future.set_exception(DeadlineExceeded(
                f"waited {now - job.enqueued:.1f} s in the queue, past its deadline: the server is "
                "overloaded; retry later or raise timeout_s"))
            self.stats.on_dropped("deadline")
            return False
        return True

    def _take_batch(self) -> list[Job] | None:
        """Block for the oldest usable job, then gather same-key jobs for up to batch_wait_s."""
        with self._cond:
            while True:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                first = self._jobs.popleft()
                if self._usable(first, time.monotonic()):
                    break
                self.stats.on_depth(len(self._jobs))
            batch = [first]
            until = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                for job in list(self._jobs):
                    if job.key == first.key and len(batch) < self.max_batch:
                        self._jobs.remove(job)
                        if self._usable(job, time.monotonic()):
                            batch.append(job)
                left = until - time.monotonic()
                if len(batch) >= self.max_batch or left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            self.stats.on_depth(len(self._jobs))
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            start = time.monotonic()
            for job in batch:  # the rows of a batch run together (one stacked loop)
                job.started = start
            settled = 0
            try:  # results may be a list or a generator: each future is settled as soon as its result exists
                for job, result in zip(batch, self.run_batch(batch[0].key, [job.payload for job in batch])):
                    job.finished = time.monotonic()
                    _settle(job, result)
                    settled += 1
                if settled != len(batch):
                    raise RuntimeError(f"run_batch returned {settled} results for {len(batch)} requests")
            except BaseException as error:  # noqa: BLE001 - the worker must survive any batch
                for job in batch[settled:]:
                    job.finished = time.monotonic()
                    _settle(job, error)
            for job in batch:
                self.stats.on_wait(job.started - job.enqueued)
            self.stats.on_batch(len(batch), time.monotonic() - start)


def _settle(job: Job, result: Any) -> None:
    if isinstance(result, BaseException):
        job.future.set_exception(result)
    else:
        job.future.set_result(result)
