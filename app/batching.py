"""Micro-batching: the images of requests that arrive together share one forward of the model.

Route handlers hand their uploads to the one `Batcher` of the app and await their own rows. One of
its decoding threads reads, decodes and preprocesses an upload (`Bundle.preprocess`) and queues its
images itself, so the event loop only admits the request and, once, receives its answer. Its worker
is a thread of its own that runs nothing but forwards: it takes the waiting requests (up to
`max_batch` images, waiting at most `max_wait_ms` for more), stacks them, runs one forward
(`Bundle.forward`) and hands each request its rows back on the event loop; it takes the next batch
itself as soon as a forward ends, so it never waits for an event loop busy with other requests'
HTTP. The queue is bounded, and it counts an upload from the moment its request is admitted until
it is taken into a forward: a request that would overfill it is refused at once with `ServiceBusy`
(503 + Retry-After) instead of waiting longer and longer. Throughput and latency under load:
benchmarks/serve_load.md.

Only the worker's thread runs torch with more than one intra-op thread (`threads`); every other
thread of the process runs torch on one (`single_threaded_torch`): PyTorch's OpenMP gives each
thread that runs a parallel op a team of its own, and a second team anywhere in the process, even
idle, made each batch-1 forward of efficientnet_lite0 on 2 cores 2.4x slower
(benchmarks/openmp_teams.md).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from app.errors import NotReady, ServiceBusy
from app.metrics import Metrics
from app.service import single_threaded_torch
from models.bundle import Encoded

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], Encoded]  # one forward of a batch (N, 3, S, S)
Prepare = Callable[[], list[torch.Tensor]]  # reads and preprocesses a request's images
PR_SET_NAME = 15  # prctl option (linux/prctl.h)
FIRST_GUESS_S = 0.1  # seconds per image assumed for Retry-After before the first forward
T = TypeVar("T")
Answer = tuple[asyncio.Future[Any], Any]  # a request's future and its result or exception


@dataclass
class _Job:
    images: list[torch.Tensor]  # each (3, S, S)
    future: asyncio.Future[Encoded]


class Batcher:
    """One inference worker thread fed by a bounded queue of requests."""

    def __init__(
        self,
        forward: Forward,
        max_batch: int,
        max_wait_ms: float,
        queue_size: int,
        metrics: Metrics | None = None,
        threads: int = 1,
        decoding_threads: int = 1,
    ):
        self.max_batch, self.queue_size = max_batch, queue_size
        self.max_wait_s = max_wait_ms / 1000
        self._forward_batch, self._metrics = forward, metrics
        self._queue = threading.Condition()  # guards _jobs, _pending, _preparing and _stopping
        self._jobs: deque[_Job] = deque()
        self._pending = 0  # images queued, not yet taken into a batch
        self._stopping = False
        self._preparing = 0  # images admitted, waiting for a decoding thread or being decoded
        self._seconds_per_image = FIRST_GUESS_S
        self._loop: asyncio.AbstractEventLoop | None = None  # where the requests wait
        # The worker thread starts now, with its own torch threads; then every other thread is
        # left on one.
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._work, args=(threads, ready), name="imgsim-inference", daemon=True
        )
        self._thread.start()
        ready.wait()
        single_threaded_torch()
        # At most `decoding_threads` uploads are decoded at once, so that under load they neither
        # crowd the event loop (and /health) off the GIL nor the model off the cores.
        self._decoding = ThreadPoolExecutor(
            decoding_threads, thread_name_prefix="imgsim-decoding", initializer=name_os_thread
        )

    @property
    def depth(self) -> int:
        """Images waiting for the model: queued, or admitted and being decoded."""
        return self._pending + self._preparing

    @property
    def running(self) -> bool:
        """Whether the worker is taking requests."""
        return self._loop is not None and not self._stopping and self._thread.is_alive()

    def start(self) -> None:
        """Take requests from the running event loop."""
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        """Stop the worker once its forward in progress is answered; requests still queued
        are answered 503."""
        with self._queue:
            self._stopping = True
            queued = list(self._jobs)
            self._jobs.clear()
            self._pending = 0
            self._queue.notify_all()
        for job in queued:
            if not job.future.done():
                job.future.set_exception(NotReady("the service is shutting down"))
        await asyncio.to_thread(self._decoding.shutdown)  # what they decode now is refused
        await asyncio.to_thread(self._thread.join)

    def admit(self, count: int = 1) -> None:
        """Raise ServiceBusy when `count` more images would overfill the queue (a request larger
        than the whole queue is taken when the queue is empty)."""
        if not self.running:
            raise NotReady("the inference worker is not running; the service is not ready")
        waiting = self.depth
        if waiting and waiting + count > self.queue_size:
            if self._metrics is not None:
                self._metrics.rejected.inc()
            wait = math.ceil((waiting + count) * self._seconds_per_image)
            raise ServiceBusy(
                f"the service is busy: {waiting} images are waiting for the model; "
                "retry after the time in the Retry-After header",
                retry_after=max(1, wait),
            )

    async def prepared(self, prepare: Callable[[], T], count: int = 1) -> T:
        """prepare() (reading and decoding `count` uploaded images) in a decoding thread. The
        images are admitted first (or ServiceBusy) and count in the queue until it returns, so
        that requests waiting to be decoded are bounded too."""
        return await self._in_decoding_thread(prepare, count, then_queue=False)

    async def encode_prepared(self, prepare: Prepare, count: int = 1) -> Encoded:
        """Embeddings and logits of the images prepare() makes in a decoding thread, which
        queues them for a forward itself: the event loop admits the request (as `prepared`
        does) and is woken once, by its answer."""
        return await self._in_decoding_thread(prepare, count, then_queue=True)

    async def encode(self, images: list[torch.Tensor]) -> Encoded:
        """Embeddings and logits of these preprocessed images (each 3, S, S), computed in a
        batch with other requests'."""
        self.admit(len(images))
        job = _Job(images, asyncio.get_running_loop().create_future())
        self._put(job)
        return await job.future

    def _in_decoding_thread(
        self, prepare: Callable[[], Any], count: int, then_queue: bool
    ) -> asyncio.Future[Any]:
        """Admit `count` images, counted as being prepared, and run prepare() in a decoding
        thread; its result (or exception) answers the future, or, with then_queue, its images
        are queued from that thread and the forward answers it."""
        self.admit(count)
        with self._queue:
            self._preparing += count
        future = asyncio.get_running_loop().create_future()

        def run() -> None:
            try:
                outcome = prepare()
            except Exception as error:
                outcome = error
            if then_queue and not isinstance(outcome, Exception):
                self._put(_Job(outcome, future), prepared=count)
                return
            with self._queue:
                self._preparing -= count
            self._answer([(future, outcome)])

        self._decoding.submit(run)
        return future

    def _put(self, job: _Job, prepared: int = 0) -> None:
        """Queue a job (from any thread), whose images were counted as being prepared."""
        with self._queue:
            self._preparing -= prepared
            if not self._stopping:
                self._jobs.append(job)
                self._pending += len(job.images)
                self._queue.notify()
                return
        self._answer([(job.future, NotReady("the service is shutting down"))])

    def _work(self, threads: int, ready: threading.Event) -> None:
        """The worker thread: batches and their forwards, one after the other, until stopped."""
        name_os_thread()
        intra_op_threads(threads)
        ready.set()
        while (batch := self._collect()) is not None:
            if batch:
                self._forward(batch)

    def _collect(self) -> list[_Job] | None:
        """The next batch: what is queued, and what arrives within max_wait_ms of the first;
        None once stopping (a batch taken before the stop is still run and answered)."""
        with self._queue:
            while not self._jobs and not self._stopping:
                self._queue.wait()
            if self._stopping:
                return None
            deadline = time.monotonic() + self.max_wait_s
            batch: list[_Job] = []
            size = 0
            while True:
                while self._jobs and (
                    not batch or size + len(self._jobs[0].images) <= self.max_batch
                ):
                    job = self._jobs.popleft()
                    self._pending -= len(job.images)
                    if not job.future.done():  # done: its caller went away
                        batch.append(job)
                        size += len(job.images)
                remaining = deadline - time.monotonic()
                full = self._jobs or size >= self.max_batch
                if full or remaining <= 0 or self._stopping:
                    return batch
                self._queue.wait(remaining)

    def _forward(self, batch: list[_Job]) -> None:
        """Run the batch as one forward and answer each job with its own rows, on the loop."""
        images = [image for job in batch for image in job.images]
        started = time.perf_counter()
        try:
            encoded = self._forward_batch(torch.stack(images))
        except Exception as error:  # the images were preprocessed already: a failure is the model's
            log.exception("a forward of %d images failed", len(images))
            self._answer([(job.future, error) for job in batch])
            return
        seconds = time.perf_counter() - started
        self._seconds_per_image = seconds / len(images)
        if self._metrics is not None:
            self._metrics.observe_forward(len(images), seconds)
        answers: list[Answer] = []
        start = 0
        for job in batch:
            end = start + len(job.images)
            answers.append((job.future, encoded.rows(start, end)))
            start = end
        self._answer(answers)

    def _answer(self, answers: list[Answer]) -> None:
        """Settle the requests' futures on their event loop (futures are not thread-safe)."""
        assert self._loop is not None  # jobs are only queued once started
        try:
            self._loop.call_soon_threadsafe(_settle, answers)
        except RuntimeError:  # the loop is closed: nobody waits for these answers any more
            log.warning("the event loop closed before %d answers were delivered", len(answers))


def _settle(answers: list[Answer]) -> None:
    for future, answer in answers:
        if future.done():  # its caller went away
            continue
        if isinstance(answer, Exception):
            future.set_exception(answer)
        else:
            future.set_result(answer)


def name_os_thread() -> None:
    """Give this thread its Python name in the OS too (its first 15 bytes, Linux only), so that
    `top -H`, `ps -L` and /proc/PID/task/*/comm tell the inference worker and the decoding
    threads from the event loop (Python 3.11 names none of them). Threads this one starts
    later, such as the engine's intra-op threads, inherit the name."""
    if sys.platform != "linux":
        return
    name = threading.current_thread().name.encode()[:15]
    libc = ctypes.CDLL(None)
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


def intra_op_threads(count: int) -> None:
    """This thread's torch intra-op threads. torch.get_num_threads() first: a thread takes the
    process-wide count at its first torch op, which would otherwise undo this later."""
    torch.get_num_threads()
    torch.set_num_threads(count)
