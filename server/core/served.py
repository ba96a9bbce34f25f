"""One loaded version of one model: its runtimes behind one batcher.

server.core.manager decides which versions exist and in which state; this is what one version
does once it serves: it checks what reaches it and queues it on its batcher.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from modelrepo.config import ModelConfig
from server.config import Settings
from server.core.batcher import Batcher
from server.core.loading import LoadedVersion, is_synthetic
from server.core.modelstats import ModelStats, Timing
from server.core.repository import ModelSpec
from server.errors import InvalidInputError
from server.observability.metrics import Metrics


class ServedModel:
    """One loaded version of one model: its runtimes behind one batcher."""

    def __init__(
        self,
        spec: ModelSpec,
        version: int,
        loaded: LoadedVersion,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        runtimes = loaded.runtimes
        self.name = spec.name
        self.version = version
        self.platform = spec.platform
        self.config = ModelConfig()
        self.config.CopyFrom(spec.config)
        self.labels = list(spec.labels)
        self.input_shape = spec.input_shape
        self.num_classes = spec.num_classes
        self.max_batch_size = spec.max_batch_size
        self.training_dataset = spec.training_dataset  # "" when export recorded none
        self.precision = spec.precision  # fp32, fp16 or int8
        self.synthetic = is_synthetic(spec)
        self.runtimes = tuple(runtimes)
        self.device = runtimes[0].device
        self.stats = ModelStats()
        self._batcher = Batcher(
            runtimes,
            model=spec.name,
            version=version,
            max_batch_size=spec.max_batch_size,
            max_queue_delay_s=spec.max_queue_delay_us / 1e6,
            max_queue_size=settings.max_queue_size,
            metrics=metrics,
            stats=self.stats,
            adaptive_delay=settings.adaptive_batch_delay,
            load_window_s=settings.batch_window_us / 1e6,
            inline_rows=loaded.inline_rows,
            schedule=spec.schedule,
        )
        self.inline_rows = loaded.inline_rows

    def __repr__(self) -> str:
        return f"<ServedModel {self.name} v{self.version} {self.platform} on {self.device}>"

    @property
    def queue_depth(self) -> int:
        return self._batcher.queue_depth

    def start(self) -> None:
        self._batcher.start()

    def describe_wait(self) -> str:
        return self._batcher.describe_wait()

    async def infer(
        self,
        images: np.ndarray,
        deadline: float | None = None,
        *,
        priority: int = 0,
        timeout_us: int = 0,
        timing: Timing | None = None,
    ) -> np.ndarray:
        """images: float32 (N, C, H, W) in [0, 1]; deadline: time.monotonic() seconds or None;
        priority and timeout_us: the schedule-policy parameters (0: the model's defaults).

        Returns float32 (N, num_classes), row i answering image i. Raises QueueFullError,
        DeadlineExceededError, ModelUnavailableError, or the runtime's exception for the batch.

        With `timing` the caller encodes the answer and records the request itself
        (`stats.succeeded` or `stats.failed`, see server.api.common.record); without, the
        request is recorded here, as answered once its rows are back.
        """
        own = timing is None
        clock = Timing() if timing is None else timing
        if own:
            clock.decoded()
        try:
            result = await self._batcher.submit(
                self._checked(images), deadline, priority=priority, timeout_us=timeout_us,
                timing=clock,
            )  # fmt: skip
        except asyncio.CancelledError:
            raise
        except Exception:
            if own:
                self.stats.failed(clock)
            raise
        clock.answered = time.perf_counter_ns()
        if own:
            self.stats.succeeded(clock)
        return result

    def _checked(self, images: np.ndarray) -> np.ndarray:
        """The codecs validate; this guards the batcher against a caller that did not."""
        if images.ndim != 4 or images.shape[0] < 1 or tuple(images.shape[1:]) != self.input_shape:
            raise InvalidInputError(
                f"model {self.name!r} expects float32 [N, {', '.join(map(str, self.input_shape))}]"
                f" with N >= 1, got shape {list(images.shape)}"
            )
        return images if images.dtype == np.float32 else images.astype(np.float32)

    async def close(self) -> None:
        """Finish accepted requests, then free the runtimes."""
        await self._batcher.close()
        for runtime in self.runtimes:
            runtime.close()
