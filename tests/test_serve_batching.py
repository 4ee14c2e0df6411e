"""BatchQueue: bounded, micro-batches by key, per-request errors, drops expired and cancelled jobs."""
from __future__ import annotations

import threading
import time

import pytest

from runtime.serve.batching import BatchQueue, BatchStats, DeadlineExceeded, QueueClosed, QueueFull


class Recorder:
    """run_batch double: records batches; payload 'boom' fails alone; waits on `gate` if set."""

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[tuple] = []
        self.gate = gate

    def __call__(self, key, payloads, stops):
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

    def run(key, payloads, stops):
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

    def run(key, payloads, stops):
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


def test_dropped_and_expired_jobs_leave_the_queue_at_once():
    """A waiting job whose caller gives up frees its slot now (not when the worker reaches it), counted
    by reason; a running one is only marked, and its stop check turns True."""
    gate, dropped = threading.Event(), []
    seen_stops = []

    def run(key, payloads, stops):
        seen_stops.append(stops)
        gate.wait(5)
        return payloads

    queue = BatchQueue(run, max_queue=2, max_batch=1, stats=BatchStats(on_dropped=dropped.append))
    queue.start()
    running = queue.submit("k", "running", 5)
    time.sleep(0.1)
    timed_out, left = queue.submit("k", "late", 5), queue.submit("k", "gone", 5)
    with pytest.raises(QueueFull):
        queue.submit("k", "third", 5)
    queue.drop(timed_out, "deadline")
    queue.drop(left, "cancelled")
    assert queue.depth() == 0 and dropped == ["deadline", "cancelled"]
    with pytest.raises(DeadlineExceeded):
        timed_out.future.result(1)
    assert left.future.cancelled()
    expiring = queue.submit("k", "expiring", 0.05)  # nobody drops it: its deadline does
    time.sleep(0.1)
    assert queue.depth() == 0 and dropped[-1] == "deadline"
    with pytest.raises(DeadlineExceeded):
        expiring.future.result(1)
    assert not seen_stops[0][0]() and queue.running() == 1
    queue.drop(running, "deadline")  # running: marked, its batch sees the stop
    assert seen_stops[0][0]() and queue.depth() == 0
    gate.set()
    assert running.future.result(5) == "running"
    time.sleep(0.05)
    assert queue.running() == 0
    queue.close()


def test_close_fails_the_waiting_jobs_and_stops_the_running_batch_after_the_grace():
    gate = threading.Event()
    stops_seen = []

    def run(key, payloads, stops):
        stops_seen.append(stops[0])
        gate.wait(5)
        return payloads

    queue = BatchQueue(run, max_queue=4)
    queue.start()
    running = queue.submit("k", 1, 60)
    time.sleep(0.1)
    waiting = queue.submit("k", 2, 60)
    queue.close(timeout_s=0, stop_running_after_s=0.2)
    with pytest.raises(QueueClosed, match="shutting down"):
        waiting.future.result(1)
    assert not stops_seen[0]()
    time.sleep(0.3)
    assert stops_seen[0]()
    gate.set()
    assert running.future.result(5) == 1
    queue.close()
