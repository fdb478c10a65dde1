"""Dynamic batching for the model server: concurrent requests of one version run as one model call.

A request's rows are queued; the queue is flushed when ``window`` seconds have passed since its
first request arrived, or as soon as it holds ``max_batch`` rows. A flush groups the queued
requests by row shape and dtype (requests whose rows differ never share a call), concatenates
each group, runs it once and hands every request its own slice of the outputs (and of the
drift scores). If a batched call fails, its requests are run one by one, so each gets its own
answer or its own error. The queue holds at most ``max_queue`` requests; one more raises
:class:`QueueFull` (the server answers 503 with ``Retry-After``).

Everything runs on the event-loop thread (models run inline there), so there are no locks: the
timer is a ``loop.call_later`` callback and results travel through futures.

With ``pad``, a batch is padded with zero rows to the next power of two (capped at
``max_batch``): TFLite interpreters have static shapes and are cached per shape, so a few
bucket sizes keep them warm where every distinct size would build a new one. Rows are
independent in the served models, so padding never changes a real row's answer.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

import numpy as np

# run(x) -> (outputs by name, drift scores or None), one row of each per row of x
RunFn = Callable[[np.ndarray], "tuple[dict[str, np.ndarray], np.ndarray | None]"]


class QueueFull(Exception):
    """The batch queue is full: the client should retry after ``retry_after`` seconds."""

    def __init__(self, pending: int, retry_after: int = 1):
        super().__init__(f"the batch queue is full ({pending} requests waiting); retry in {retry_after}s")
        self.retry_after = retry_after


class Batcher:
    def __init__(self, run: RunFn, window: float, max_batch: int, max_queue: int, pad: bool = False):
        if window < 0 or max_batch < 1 or max_queue < 1:
            raise ValueError("batching needs window >= 0, max_batch >= 1 and max_queue >= 1")
        self.run = run
        self.window = window
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.pad = pad
        self.pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self.rows = 0
        self.timer: asyncio.TimerHandle | None = None
        # statistics (the bench and the tests read them through the drift/monitor JSON)
        self.batches = 0
        self.batched_requests = 0
        self.largest = 0

    async def submit(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """The outputs (and drift scores) of ``x``'s rows, computed in a batch with other requests."""
        if len(self.pending) >= self.max_queue:
            raise QueueFull(len(self.pending))
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.pending.append((x, fut))
        self.rows += x.shape[0]
        if self.rows >= self.max_batch:
            self.flush()
        elif self.timer is None:
            self.timer = loop.call_later(self.window, self.flush)
        return await fut

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        pending, self.pending, self.rows = self.pending, [], 0
        groups: dict[tuple, list[tuple[np.ndarray, asyncio.Future]]] = {}
        for item in pending:
            x = item[0]
            groups.setdefault((x.shape[1:], x.dtype.str), []).append(item)
        for items in groups.values():
            start = 0
            while start < len(items):  # chunks of at most max_batch rows (a bigger request runs alone)
                end, rows = start, 0
                while end < len(items) and (end == start or rows + items[end][0].shape[0] <= self.max_batch):
                    rows += items[end][0].shape[0]
                    end += 1
                self._run_group(items[start:end], rows)
                start = end

    def _bucket(self, rows: int) -> int:
        size = 1
        while size < rows:
            size *= 2
        return max(rows, min(size, self.max_batch))

    def _run_group(self, items: list[tuple[np.ndarray, asyncio.Future]], rows: int) -> None:
        live = [(x, f) for x, f in items if not f.done()]  # a cancelled request (client gone) drops out
        if not live:
            return
        self.batches += 1
        self.batched_requests += len(live)
        self.largest = max(self.largest, rows)
        if len(live) == 1:
            self._run_one(*live[0])
            return
        xs = [x for x, _ in live]
        n = sum(x.shape[0] for x in xs)
        size = self._bucket(n) if self.pad else n
        if size > n:
            xs.append(np.zeros((size - n, *xs[0].shape[1:]), xs[0].dtype))
        try:
            outs, errors = self.run(np.concatenate(xs))
        except Exception:  # noqa: BLE001 - one bad request must not fail the others: run them one by one
            for x, f in live:
                self._run_one(x, f)
            return
        pos = 0
        for x, f in live:
            k = x.shape[0]
            f.set_result(({name: o[pos:pos + k] for name, o in outs.items()},
                          None if errors is None else errors[pos:pos + k]))
            pos += k

    def _run_one(self, x: np.ndarray, fut: asyncio.Future) -> None:
        try:
            fut.set_result(self.run(x))
        except Exception as exc:  # noqa: BLE001 - the request's own error, raised in its handler
            fut.set_exception(exc)

    def stats(self) -> dict[str, Any]:
        return {"window_us": round(self.window * 1e6), "max_batch": self.max_batch, "max_queue": self.max_queue,
                "batches": self.batches, "requests": self.batched_requests, "largest_batch": self.largest,
                "queued": len(self.pending)}
