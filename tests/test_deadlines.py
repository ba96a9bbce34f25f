"""A request whose deadline passes is answered DEADLINE_EXCEEDED, never CANCELLED, on both
gRPC transports: grpcio's core answers such a call itself, pygrpc-native leaves the answer to
the handler (server.api.status), and a client that retries on DEADLINE_EXCEEDED but not on
CANCELLED must be told the truth."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from server_process import ServerProcess, kserve_method

from wire import grpc_service_pb2 as pb

pytestmark = pytest.mark.both_transports


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    return serve(models=["fashion_mnist"])


def test_expired_requests_are_deadline_exceeded_not_cancelled(server: ServerProcess) -> None:
    request = pb.ModelInferRequest(model_name="fashion_mnist")
    request.inputs.add(name="input", datatype="FP32", shape=[4, 1, 28, 28])
    request.raw_input_contents.append(np.zeros((4, 1, 28, 28), np.float32).tobytes())

    async def main() -> collections.Counter[str]:
        codes: collections.Counter[str] = collections.Counter()
        async with grpc.aio.insecure_channel(server.target) as channel:
            infer = kserve_method(channel, "ModelInfer")

            async def one(timeout: float) -> None:
                try:
                    await infer(request, timeout=timeout)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1

            for _ in range(20):  # deadlines from 1 to 8.5 ms: some pass before, some after
                await asyncio.gather(*(one(0.001 + 0.0005 * i) for i in range(16)))
        return codes

    codes = asyncio.run(main())
    assert set(codes) <= {"OK", "DEADLINE_EXCEEDED"}, codes
    assert codes["DEADLINE_EXCEEDED"] > 0, codes
