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
from server.errors import InvalidInputError, UnsupportedError
from server.observability.metrics import Metrics
from server.runtimes.base import Tensors


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
        self.signature = spec.signature
        self.image = spec.image  # None: not an image classifier (no native API)
        self.output_labels = spec.labels
        # The image classifier's shape and classes, for the native API and the ready line.
        self.input_shape = spec.image.shape if spec.image else ()
        self.num_classes = spec.image.classes if spec.image else 0
        self.labels = spec.labels.get(spec.image.output, []) if spec.image else []
        self.max_batch_size = spec.max_batch_size
        self.training_dataset = spec.training_dataset  # "" when export recorded none
        self.precision = spec.precision  # fp32, fp16 or int8
        self.synthetic = is_synthetic(spec)
        self.runtimes = tuple(runtimes)
        self.device = runtimes[0].device
        self.stats = ModelStats()
        self._reshaped_inputs = {t.name: t.reshape for t in spec.signature.inputs if t.reshape}
        self._reshaped_outputs = {t.name: t for t in spec.signature.outputs if t.reshape}
        self._batcher = Batcher(
            runtimes,
            model=spec.name,
            version=version,
            max_batch_size=max(spec.max_batch_size, 1),
            max_queue_delay_s=spec.max_queue_delay_us / 1e6,
            max_queue_size=settings.max_queue_size,
            metrics=metrics,
            stats=self.stats,
            adaptive_delay=settings.adaptive_batch_delay,
            load_window_s=settings.batch_window_us / 1e6,
            inline_rows=loaded.inline_rows,
            schedule=spec.schedule,
            batched=spec.max_batch_size > 0,
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
        inputs: Tensors,
        deadline: float | None = None,
        *,
        priority: int = 0,
        timeout_us: int = 0,
        timing: Timing | None = None,
    ) -> dict[str, np.ndarray]:
        """The request's inputs by name, as the config declares them (server.api.codecs has
        checked them against the signature); deadline: time.monotonic() seconds or None;
        priority and timeout_us: the schedule-policy parameters (0: the model's defaults).

        Returns every output by name, in the config's dims. Raises QueueFullError,
        DeadlineExceededError, ModelUnavailableError, or the runtime's exception for the batch.

        With `timing` the caller encodes the answer and records the request itself
        (`stats.succeeded` or `stats.failed`, see server.api.common.record); without, the
        request is recorded here, as answered once its rows are back.
        """
        own = timing is None
        clock = Timing() if timing is None else timing
        if own:
            clock.decoded()
        if self._reshaped_inputs:
            inputs = self._reshape_inputs(inputs)
        try:
            result = await self._batcher.submit(
                inputs, deadline, priority=priority, timeout_us=timeout_us, timing=clock
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            if own:
                self.stats.failed(clock)
            raise
        clock.answered = time.perf_counter_ns()
        if own:
            self.stats.succeeded(clock)
        return self._reshape_outputs(result) if self._reshaped_outputs else result

    async def classify(
        self, images: np.ndarray, deadline: float | None = None, *, timing: Timing | None = None
    ) -> np.ndarray:
        """float32 N x C x H x W images in [0, 1] -> float32 N x classes probabilities, for
        an image classifier (self.image), whatever its own input and output are."""
        image = self.image
        if image is None:
            raise UnsupportedError(
                f"model {self.name!r} is not an image classifier (one image input of [C,H,W] "
                "or [H,W,C] and one output of class scores): use the KServe v2 API"
            )
        if images.ndim != 4 or images.shape[0] < 1 or tuple(images.shape[1:]) != image.shape:
            raise InvalidInputError(
                f"model {self.name!r} expects float32 [N, {', '.join(map(str, image.shape))}]"
                f" with N >= 1, got shape {list(images.shape)}"
            )
        tensor = image.to_model(images.astype(np.float32, copy=False))
        if not self.signature.batched:  # one image at a time, without a batch dimension
            parts = [
                (await self.infer({image.input: row}, deadline, timing=timing))[image.output]
                for row in tensor
            ]
            return image.probabilities(np.stack(parts))
        outputs = await self.infer({image.input: tensor}, deadline, timing=timing)
        return image.probabilities(outputs[image.output])

    def _reshape_inputs(self, inputs: Tensors) -> dict[str, np.ndarray]:
        lead = 1 if self.signature.batched else 0
        return {
            name: array.reshape((*array.shape[:lead], *shape))
            if (shape := self._reshaped_inputs.get(name)) is not None
            else array
            for name, array in inputs.items()
        }

    def _reshape_outputs(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lead = 1 if self.signature.batched else 0
        for name, spec in self._reshaped_outputs.items():
            array = outputs.get(name)
            if array is not None:
                outputs[name] = array.reshape((*array.shape[:lead], *spec.dims))
        return outputs

    async def close(self) -> None:
        """Finish accepted requests, then free the runtimes."""
        await self._batcher.close()
        for runtime in self.runtimes:
            runtime.close()
