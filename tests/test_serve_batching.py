"""BatchQueue: bounded, micro-batches by key, per-request errors, drops expired and cancelled jobs."""
from __future__ import annotations

import threading
import time

import pytest

from runtime.serve.batching import BatchQueue, DeadlineExceeded, QueueClosed, QueueFull


class Recorder:
    """run_batch double: records batches; payload 'boom' fails alone; waits on `gate` if set."""

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[tuple] = []
        self.gate = gate

    def __call__(self, key, payloads):
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append((key, list(payloads)))
        return [ValueError("boom") if p == "boom" else f"{key}:{p}" for p in payloads]


def test_same_key_requests_share_a_batch_and_errors_stay_per_request():
    gate = threading.Event()
    run = Recorder(gate)
    queue = BatchQueue(run, max_queue=8, max_batch=3, batch_wait_s=0.05)
    queue.start()
    first = queue.submit("a", 0, 5)  # the worker takes it and blocks on the gate
    time.sleep(0.1)
    jobs = [queue.submit(key, p, 5) for key, p in [("a", 1), ("b", 2), ("a", "boom"), ("a", 3), ("a", 4)]]
    gate.set()
    assert first.future.result(5) == "a:0"
    assert jobs[0].future.result(5) == "a:1"
    with pytest.raises(ValueError, match="boom"):
        jobs[2].future.result(5)
    assert [j.future.result(5) for j in (jobs[1], jobs[3], jobs[4])] == ["b:2", "a:3", "a:4"]
    sizes = [(key, len(p)) for key, p in run.batches]
    assert sizes[0] == ("a", 1) and ("a", 3) in sizes and ("b", 1) in sizes and max(n for _, n in sizes) <= 3
    queue.close()


def test_bound_expired_and_cancelled_jobs():
    gate = threading.Event()
    run = Recorder(gate)
    queue = BatchQueue(run, max_queue=2, max_batch=1)
    queue.start()
    running = queue.submit("k", "running", 5)
    time.sleep(0.1)
    expiring = queue.submit("k", "late", 0.05)
    cancelled = queue.submit("k", "gone", 5)
    with pytest.raises(QueueFull, match="retry"):
        queue.submit("k", "third", 5)
    assert cancelled.future.cancel()
    time.sleep(0.1)
    gate.set()
    assert running.future.result(5) == "k:running"
    with pytest.raises(DeadlineExceeded, match="deadline"):
        expiring.future.result(5)
    assert [p for _, p in run.batches] == [["running"]]  # neither the late nor the cancelled job ran
    queue.close()
    with pytest.raises(QueueClosed):
        queue.submit("k", "after", 5)


def test_a_crashing_run_batch_fails_its_jobs_and_the_worker_survives():
    calls = []

    def run(key, payloads):
        calls.append(payloads)
        if len(calls) == 1:
            raise RuntimeError("engine lost")
        return payloads

    queue = BatchQueue(run, max_queue=4)
    queue.start()
    with pytest.raises(RuntimeError, match="engine lost"):
        queue.submit("k", 1, 5).future.result(5)
    assert queue.submit("k", 2, 5).future.result(5) == 2 and queue.alive
    queue.close()


def test_a_generator_run_batch_answers_each_request_as_soon_as_it_is_done():
    gate = threading.Event()

    def run(key, payloads):
        for index, payload in enumerate(payloads):
            if index == 1:
                gate.wait(5)  # the second request is still running ...
            yield payload

    queue = BatchQueue(run, max_queue=4, max_batch=2, batch_wait_s=0.2)
    queue.start()
    first, second = queue.submit("k", 1, 5), queue.submit("k", 2, 5)
    assert first.future.result(2) == 1 and not second.future.done()  # ... while the first is answered
    gate.set()
    assert second.future.result(5) == 2
    queue.close()


def test_stacked_requests_are_split_to_fit_the_engine_batch():
    from runtime.serve.served import _chunks

    assert list(_chunks([0, 1, 2, 3], [1, 2, 1, 1], None)) == [[0, 1, 2, 3]]
    assert list(_chunks([0, 1, 2, 3], [1, 2, 1, 1], 2)) == [[0], [1], [2, 3]]
    assert list(_chunks([0, 2], [3, 1], 2)) == [[0], [2]]  # too big alone: the pipeline reports it
    assert list(_chunks([], [], 4)) == []
