"""Dynamic batching for the model server: concurrent requests of one version run as one model call.

A request's rows are queued; the queue is flushed, whichever comes first:

* as soon as it holds ``max_batch`` rows;
* as soon as it holds one request per open HTTP connection (``clients()``): an HTTP/1.1 connection
  carries one request at a time, so nobody else can send one -- at 2 connections two requests
  make a batch at once, at 64 the batch fills up to 64 without waiting for the window;
* when the event loop has gone ``idle_rounds`` iterations (default 2; 0 turns it off) without
  another request joining: the server has nothing else to do, and waiting would leave the CPU
  idle -- the batcher is work-conserving: under load, requests pile up while the server is busy
  parsing others and running the previous batch, so batches grow with the load by themselves;
* when ``window`` seconds have passed since its first request arrived (the upper bound).

At low concurrency batching only costs latency (a batch of one still waits for the loop to go
idle), so while recent batches average fewer than ``BYPASS_BELOW`` requests a request that finds
the queue empty runs at once, as without batching; every ``PROBE_EVERY``-th still goes through
the queue, so rising load is noticed and batching resumes. A flush groups the queued
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

import argparse
import asyncio
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

# run(x) -> (outputs by name, drift scores or None), one row of each per row of x
RunFn = Callable[[np.ndarray], "tuple[dict[str, np.ndarray], np.ndarray | None]"]


IDLE_ROUNDS = 2      # loop iterations without an arrival before an early flush
BYPASS_BELOW = 2.0   # mean requests per batch (moving average) under which requests run at once
PROBE_EVERY = 16     # ... except every this many, which is queued to measure the load again


@dataclass
class BatchConfig:
    """The server's batching settings (``--batching`` ...): the default of every version, which the
    routing file's ``"batching": {"<version>": true|false}`` overrides."""

    enabled: bool = False
    window: float = 0.0005      # seconds the first request of a batch waits for others at most
    max_batch: int = 64         # rows per model call
    max_queue: int = 1024       # requests waiting; one more is answered 503 + Retry-After
    idle_rounds: int = IDLE_ROUNDS
    clients: Callable[[], int] | None = None  # open HTTP connections (set once the HTTP server exists)

    def open_connections(self) -> int:
        return self.clients() if self.clients is not None else 0

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        env = os.environ.get
        p.add_argument("--batching", default=env("BATCHING", "off"), choices=["off", "on"],
                       help="dynamic batching of concurrent serving_default requests (the routing file's "
                            "'batching' overrides it per version)")
        p.add_argument("--batch-window-us", type=int, default=int(env("BATCH_WINDOW_US", "500")),
                       help="microseconds the first request of a batch waits for others at most")
        p.add_argument("--batch-idle-rounds", type=int, default=int(env("BATCH_IDLE_ROUNDS", str(IDLE_ROUNDS))),
                       help="flush a batch once the event loop has run this many iterations without a new request "
                            "(work-conserving: the CPU never idles while requests wait); 0 = wait for the window, "
                            "a full batch or one request per open connection")
        p.add_argument("--max-batch", type=int, default=int(env("MAX_BATCH", "64")), help="rows per batched model call")
        p.add_argument("--batch-queue", type=int, default=int(env("BATCH_QUEUE", "1024")),
                       help="requests waiting for a batch; beyond it requests are answered 503 + Retry-After")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BatchConfig":
        if args.batch_window_us < 0 or args.batch_idle_rounds < 0 or args.max_batch < 1 or args.batch_queue < 1:
            raise ValueError("--batch-window-us and --batch-idle-rounds must be >= 0, --max-batch and "
                             "--batch-queue >= 1")
        return cls(args.batching == "on", args.batch_window_us / 1e6, args.max_batch, args.batch_queue,
                   args.batch_idle_rounds)


class QueueFull(Exception):
    """The batch queue is full: the client should retry after ``retry_after`` seconds."""

    def __init__(self, pending: int, retry_after: int = 1):
        super().__init__(f"the batch queue is full ({pending} requests waiting); retry in {retry_after}s")
        self.retry_after = retry_after


class Batcher:
    def __init__(self, run: RunFn, window: float, max_batch: int, max_queue: int, pad: bool = False,
                 idle_rounds: int = IDLE_ROUNDS, clients: Callable[[], int] | None = None):
        if window < 0 or max_batch < 1 or max_queue < 1:
            raise ValueError("batching needs window >= 0, max_batch >= 1 and max_queue >= 1")
        self.run = run
        self.window = window
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.pad = pad
        self.idle_rounds = idle_rounds
        self.clients = clients or (lambda: 0)
        self.pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self.rows = 0
        self.timer: asyncio.TimerHandle | None = None
        self.arrivals = 0          # requests ever submitted: the idle check compares it across loop iterations
        self.first = 0.0           # loop time of the oldest queued request
        self.mean = float(BYPASS_BELOW)  # moving average of requests per batch
        self.since_probe = 0
        self.bypassed = 0
        self.idle_check = False    # an idle check is scheduled
        # statistics (the bench and the tests read them through the drift/monitor JSON)
        self.batches = 0
        self.batched_requests = 0
        self.largest = 0

    def run_at_once(self) -> bool:
        """Should the next request skip the queue? (low concurrency: no one to batch with, do not wait)

        The caller then runs it itself, as without batching; otherwise it calls :meth:`submit`.
        """
        if not self.pending and self.mean < BYPASS_BELOW and self.since_probe < PROBE_EVERY:
            self.since_probe += 1
            self.bypassed += 1
            return True
        return False

    async def submit(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """The outputs (and drift scores) of ``x``'s rows, computed in a batch with other requests."""
        self.since_probe = 0
        if len(self.pending) >= self.max_queue:
            raise QueueFull(len(self.pending))
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.pending:
            self.first = loop.time()
        self.pending.append((x, fut))
        self.rows += x.shape[0]
        self.arrivals += 1
        clients = self.clients()
        if self.rows >= self.max_batch or 0 < clients <= len(self.pending):
            self.flush()
        elif self.idle_rounds > 0:  # the idle check runs every loop iteration anyway: it keeps the window too
            if not self.idle_check:
                self.idle_check = True
                loop.call_soon(self._check_idle, self.arrivals, 0)
        elif self.timer is None:
            self.timer = loop.call_later(self.window, self.flush)
        return await fut

    def _check_idle(self, seen: int, rounds: int) -> None:
        if not self.pending:
            self.idle_check = False
            return
        loop = asyncio.get_running_loop()
        rounds = rounds + 1 if self.arrivals == seen else 0
        if rounds >= self.idle_rounds or loop.time() - self.first >= self.window:
            self.idle_check = False
            self.flush()
        else:
            loop.call_soon(self._check_idle, self.arrivals, rounds)

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

    def buckets(self) -> list[int]:
        """The batch sizes a padded batcher runs (powers of two up to ``max_batch``), to warm up."""
        sizes = {self._bucket(n) for n in range(2, self.max_batch + 1)} if self.pad else set()
        return sorted(sizes)

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
        self.mean = 0.8 * self.mean + 0.2 * len(live)
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
        return {"window_us": round(self.window * 1e6), "idle_rounds": self.idle_rounds,
                "max_batch": self.max_batch, "max_queue": self.max_queue,
                "batches": self.batches, "requests": self.batched_requests + self.bypassed, "largest_batch": self.largest,
                "queued": len(self.pending), "run_at_once": self.bypassed, "mean_batch": round(self.mean, 2)}
