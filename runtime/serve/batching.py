"""A bounded request queue drained by ONE worker thread (the GPU is one resource), in micro-batches.

    queue = BatchQueue(run_batch, max_queue=16, max_batch=4, batch_wait_s=0.005)
    queue.start()
    job = queue.submit(key, payload, timeout_s=60)        # QueueFull when 16 are already waiting
    result = job.future.result()                          # or await asyncio.wrap_future(job.future)

Requests with the same `key` (pipeline, size, steps, scheduler, scales …: anything that must be
equal to share one pipeline call) are grouped: the worker takes the oldest waiting request, waits
up to `batch_wait_s` for more of the same key (never past `max_batch`), and hands the group to
`run_batch(key, payloads, stops) -> list[result | Exception]` (or a generator of them, in order:
each caller is answered as soon as its own result exists), one entry per payload, so one bad request
never fails its neighbours. `stops[i]()` turns True once request i is no longer wanted (its deadline
passed, its caller gave up, or the server's shutdown grace ran out): a pipeline checks it between
denoising steps and stops a batch all of whose requests are unwanted.

The queue counts only live requests: one whose deadline passes or whose caller gives up
(`drop(job, reason)`, or its future cancelled) leaves the queue at once, so `depth()` and the bound
never count dead requests.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

StopCheck = Callable[[], bool]
RunBatch = Callable[[Hashable, Sequence[Any], Sequence[StopCheck]], Sequence[Any]]


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
    abandoned: bool = False  # its caller was answered without it (deadline, hang-up): stop running it


@dataclass
class BatchStats:
    """Callbacks the metrics module plugs in; all optional."""

    on_depth: Callable[[int], None] = lambda depth: None
    on_batch: Callable[[int, float], None] = lambda size, seconds: None  # size, run seconds
    on_wait: Callable[[float], None] = lambda seconds: None  # per job: queue wait
    on_dropped: Callable[[str], None] = lambda reason: None  # waiting job dropped: 'deadline' | 'cancelled'


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
        self._stop_running_at = float("inf")  # monotonic time after which a running batch is stopped
        self._running = 0  # requests in the batch being run
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
            self._drop_expired(time.monotonic())
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"{len(self._jobs)} requests are already waiting (the queue bound): "
                                "retry after a short pause, or add replicas")
            self._jobs.append(job)
            self.stats.on_depth(len(self._jobs))
            self._cond.notify()
        job.future.add_done_callback(lambda future: self._discard(job) if future.cancelled() else None)
        return job

    def drop(self, job: Job, reason: str) -> None:
        """The caller of `job` gives up ('deadline': answered 504; 'cancelled': the client left).

        A waiting job leaves the queue at once (its future fails with DeadlineExceeded, or is
        cancelled); a running one is marked abandoned, so its batch stops between denoising steps
        once all of its requests are abandoned."""
        with self._cond:
            if job in self._jobs:
                self._jobs.remove(job)
                if reason != "deadline":
                    job.future.cancel()
                elif job.future.set_running_or_notify_cancel():
                    job.future.set_exception(DeadlineExceeded("its deadline passed while it waited in the queue"))
                self.stats.on_dropped(reason)
                self.stats.on_depth(len(self._jobs))
            else:
                job.abandoned = True

    def depth(self) -> int:
        """Requests waiting and still wanted (not counting the batch being run)."""
        with self._cond:
            self._drop_expired(time.monotonic())
            return len(self._jobs)

    def running(self) -> int:
        """Requests in the batch the worker is running now (0 when idle)."""
        return self._running

    @property
    def alive(self) -> bool:
        """True while the worker thread runs."""
        return self._thread.is_alive()

    def close(self, timeout_s: float = 5.0, stop_running_after_s: float | None = None) -> None:
        """Refuse new jobs, fail the waiting ones with QueueClosed, let the running batch finish.

        stop_running_after_s: from now, the running batch's stop checks turn True after this many
        seconds (a shutdown grace period). timeout_s: how long to wait for the worker (0: return at once).
        """
        with self._cond:
            self._closed = True
            if stop_running_after_s is not None:
                self._stop_running_at = min(self._stop_running_at, time.monotonic() + stop_running_after_s)
            while self._jobs:
                job = self._jobs.popleft()
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(QueueClosed("the server is shutting down and this request had not "
                                                         "started: retry on another replica"))
            self.stats.on_depth(0)
            self._cond.notify_all()
        if timeout_s > 0 and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _discard(self, job: Job) -> None:
        """A waiting job whose future was cancelled leaves the queue at once."""
        with self._cond:
            if job in self._jobs:
                self._jobs.remove(job)
                self.stats.on_dropped("cancelled")
                self.stats.on_depth(len(self._jobs))

    def _drop_expired(self, now: float) -> None:
        """Fail and remove the waiting jobs whose deadline passed (caller holds the lock)."""
        expired = [job for job in self._jobs if now > job.deadline]
        for job in expired:
            self._jobs.remove(job)
            self._usable(job, now)  # settles it with DeadlineExceeded (or sees it cancelled)
        if expired:
            self.stats.on_depth(len(self._jobs))

    def _should_stop(self, job: Job) -> bool:
        """True once the running job is no longer wanted: abandoned, past its deadline, or past the
        shutdown grace period."""
        now = time.monotonic()
        return job.abandoned or job.future.cancelled() or now > job.deadline or now > self._stop_running_at

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
            self._running = len(batch)
            settled = 0
            try:  # results may be a list or a generator: each future is settled as soon as its result exists
                stops = [lambda job=job: self._should_stop(job) for job in batch]
                for job, result in zip(batch, self.run_batch(batch[0].key, [job.payload for job in batch], stops)):
                    job.finished = time.monotonic()
                    _settle(job, result)
                    settled += 1
                if settled != len(batch):
                    raise RuntimeError(f"run_batch returned {settled} results for {len(batch)} requests")
            except BaseException as error:  # noqa: BLE001 - the worker must survive any batch
                for job in batch[settled:]:
                    job.finished = time.monotonic()
                    _settle(job, error)
            self._running = 0
            for job in batch:
                self.stats.on_wait(job.started - job.enqueued)
            self.stats.on_batch(len(batch), time.monotonic() - start)


def _settle(job: Job, result: Any) -> None:
    if isinstance(result, BaseException):
        job.future.set_exception(result)
    else:
        job.future.set_result(result)
