"""Micro-batching: the images of requests that arrive together share one forward of the model.

Route handlers hand their preprocessed images (decoded and normalised in the request's thread,
`Bundle.preprocess`) to the one `Batcher` of the app and await their own rows. Its worker takes
the waiting requests (up to `max_batch` images, waiting at most `max_wait_ms` for more), stacks
them and runs one forward (`Bundle.forward`) in its own thread, and answers each request with
its rows. That thread runs nothing but forwards, so the model never waits for the requests'
own work. The queue is bounded, and it counts an upload from the moment its request is admitted
(`preparing`: waiting for a decoding thread, being decoded) until it is taken into a forward: a
request that would overfill it is refused at once with `ServiceBusy` (503 + Retry-After)
instead of waiting longer and longer, in the queue or before it.

Only the worker's thread runs torch with more than one intra-op thread (`threads`); every other
thread of the process (the one that loads the model, `load_service`; the event loop's; the
decoding threads) runs torch on one (`single_threaded_torch`). PyTorch's OpenMP gives each
thread that runs a parallel op its own team of threads, kept for the thread's life, and once
libgomp manages more threads than there are cores, every team stops spinning between ops and
sleeps instead: a second team anywhere in the process, even idle, made each batch-1 forward of
efficientnet_lite0 on 2 cores 2.4x slower (14.8 -> 35.5 ms, benchmarks/openmp_teams.md).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from app.errors import NotReady, ServiceBusy
from app.metrics import Metrics
from models.bundle import Encoded

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], Encoded]  # one forward of a batch (N, 3, S, S)
FIRST_GUESS_S = 0.1  # seconds per image assumed for Retry-After before the first forward


@dataclass
class _Job:
    images: list[torch.Tensor]  # each (3, S, S)
    future: asyncio.Future[Encoded]


class Batcher:
    """One inference worker fed by a bounded queue of requests."""

    def __init__(
        self,
        forward: Forward,
        max_batch: int,
        max_wait_ms: float,
        queue_size: int,
        metrics: Metrics | None = None,
        threads: int = 1,
    ):
        self.max_batch, self.queue_size = max_batch, queue_size
        self.max_wait_s = max_wait_ms / 1000
        self._forward_batch, self._metrics = forward, metrics
        self._jobs: deque[_Job] = deque()
        self._pending = 0  # images queued, not yet taken into a batch
        self._preparing = 0  # images admitted, still being read and decoded by their requests
        self._seconds_per_image = FIRST_GUESS_S
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # The model runs in this one thread, so the event loop never waits for a forward. It is
        # started now, with its own torch threads; then every other thread is left on one.
        self._thread = ThreadPoolExecutor(
            1, "imgsim-inference", initializer=intra_op_threads, initargs=(threads,)
        )
        self._thread.submit(torch.get_num_threads).result()
        single_threaded_torch()

    @property
    def depth(self) -> int:
        """Images waiting for the model: queued, or admitted and being decoded."""
        return self._pending + self._preparing

    @property
    def running(self) -> bool:
        """Whether the worker is taking requests."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._work(), name="imgsim-batcher")

    async def stop(self) -> None:
        """Stop the worker; requests still queued are answered 503."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._jobs:
            job = self._jobs.popleft()
            if not job.future.done():
                job.future.set_exception(NotReady("the service is shutting down"))
        self._pending = 0
        self._thread.shutdown(wait=True)

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

    @contextmanager
    def preparing(self, count: int = 1) -> Iterator[None]:
        """Admit `count` images (or raise ServiceBusy) and count them in the queue while their
        request reads and decodes them, so that requests waiting to be decoded are bounded too."""
        self.admit(count)
        self._preparing += count
        try:
            yield
        finally:
            self._preparing -= count

    async def encode(self, images: list[torch.Tensor]) -> Encoded:
        """Embeddings and logits of these preprocessed images (each 3, S, S), computed in a
        batch with other requests'. Admitted again: a request may have come in without
        `preparing`."""
        self.admit(len(images))
        job = _Job(images, asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        self._pending += len(images)
        self._arrived.set()
        return await job.future

    async def _work(self) -> None:
        while True:
            batch = await self._collect()
            if batch:
                await self._forward(batch)

    async def _collect(self) -> list[_Job]:
        """The next batch: what is queued, and what arrives within max_wait_ms of the first."""
        while not self._jobs:
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        batch: list[_Job] = []
        size = 0
        while True:
            while self._jobs and (not batch or size + len(self._jobs[0].images) <= self.max_batch):
                job = self._jobs.popleft()
                self._pending -= len(job.images)
                if not job.future.done():  # done: its caller went away
                    batch.append(job)
                    size += len(job.images)
            remaining = deadline - loop.time()
            if self._jobs or size >= self.max_batch or remaining <= 0:
                return batch
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return batch

    async def _forward(self, batch: list[_Job]) -> None:
        """Run the batch as one forward and answer each job with its own rows."""
        images = [image for job in batch for image in job.images]
        started = time.perf_counter()
        try:
            encoded = await asyncio.get_running_loop().run_in_executor(
                self._thread, self._stacked_forward, images
            )
        except Exception as error:  # the images were preprocessed already: a failure is the model's
            log.exception("a forward of %d images failed", len(images))
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        seconds = time.perf_counter() - started
        self._seconds_per_image = seconds / len(images)
        if self._metrics is not None:
            self._metrics.observe_forward(len(images), seconds)
        start = 0
        for job in batch:
            end = start + len(job.images)
            if not job.future.done():
                job.future.set_result(encoded.rows(start, end))
            start = end

    def _stacked_forward(self, images: list[torch.Tensor]) -> Encoded:
        return self._forward_batch(torch.stack(images))


def intra_op_threads(count: int) -> None:
    """This thread's torch intra-op threads. torch.get_num_threads() first: a thread takes the
    process-wide count at its first torch op, which would otherwise undo this later."""
    torch.get_num_threads()
    torch.set_num_threads(count)


def single_threaded_torch() -> None:
    """torch in this thread, and in every thread that has not run a torch op yet, runs on one
    intra-op thread (see the module docstring)."""
    torch.set_num_threads(1)
