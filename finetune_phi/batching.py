"""Dynamic batching: concurrent requests to one model are decoded together.

A worker thread takes the first waiting request, collects whatever else arrives within a short
window (up to max_batch_size), and decodes them as one batch (Generator.run keeps each request's
own settings). With max_batch_size=1 it serves one request at a time: "batching off".
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

from .generation import Generator, Row


class QueueTimeout(Exception):
    """A request waited longer than max_queue_wait_ms before its batch started."""

    def __init__(self, waited_ms: float, limit_ms: int):
        super().__init__(f"waited {waited_ms:.0f} ms in the queue (max_queue_wait_ms={limit_ms})")


class Batcher:
    def __init__(self, generator: Generator, max_batch_size: int = 16, window_ms: float = 5,
                 max_queue_wait_ms: int = 5_000, name: str = "model"):
        if max_batch_size < 1:
            raise ValueError(f"max batch size must be at least 1, got {max_batch_size}")
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.window = window_ms / 1000
        self.max_queue_wait_ms = max_queue_wait_ms
        self.queue: queue.Queue = queue.Queue()
        self.batches = 0  # counters for tests and the benchmark
        self.rows = 0
        self.thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self.thread.start()

    def submit(self, row: Row) -> Future:
        """Queue a row. Until its batch starts, `future.cancel()` withdraws it (and returns True);
        after that the future is running and only `row.cancel` stops it, at the next token."""
        future: Future = Future()
        self.queue.put((future, row, time.monotonic()))
        return future

    def close(self):
        self.queue.put(None)

    def _collect(self) -> list | None:
        """The next batch: the first live request, then whatever else arrives within the window.
        Requests withdrawn while queued are dropped here, so they take no place in a batch."""
        batch, deadline = [], 0.0
        while len(batch) < self.max_batch_size:
            if not batch:
                item = self.queue.get()
            else:
                try:  # take what is already waiting at once, then wait out the window for more
                    item = self.queue.get_nowait() if self.queue.qsize() else self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            if item is None:  # closed: finish this batch first
                if batch:
                    self.queue.put(None)
                return batch or None
            future, row, _ = item
            if row.cancel.is_set():
                future.cancel()  # abandoned while queued (client gone, timed out): nobody wants an answer
            if future.cancelled():
                continue
            if not batch:
                deadline = time.monotonic() + self.window
            batch.append(item)
        return batch

    def _loop(self):
        while (batch := self._collect()) is not None:
            ready = []
            now = time.monotonic()
            for future, row, queued in batch:
                if not future.set_running_or_notify_cancel():
                    continue  # withdrawn by its caller (future.cancel()) just now
                waited_ms = (now - queued) * 1000
                if waited_ms > self.max_queue_wait_ms:  # callers that do not watch the deadline themselves
                    future.set_exception(QueueTimeout(waited_ms, self.max_queue_wait_ms))
                else:
                    ready.append((future, row))
            if not ready:
                continue
            try:
                results = self.generator.run([row for _, row in ready])
            except Exception as e:  # noqa: BLE001 - each caller gets the error; the worker lives on
                for future, _ in ready:
                    future.set_exception(e)
                continue
            self.batches += 1
            self.rows += len(ready)
            for (future, _), result in zip(ready, results):
                future.set_result(result)
