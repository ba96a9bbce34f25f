"""`python -m benchmarks.bare`: the do-nothing KServe v2 server, the transport's own cost.

A grpc.aio server that answers every ModelInfer with one fixed response: it parses the
request (as any server must) and does nothing else: no model, no batcher, no metrics, no
ids. What it answers per second, and the CPU it spends per answer, is what Python's gRPC
costs by itself; the served figures are measured against it. With --workers N it runs N
such processes on one port (SO_REUSEPORT, as the real server's workers share theirs).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import signal
import socket
import sys
from typing import Any

import grpc
import numpy as np

from wire import grpc_service_pb2 as pb

SERVICE = "inference.GRPCInferenceService"
READY_LINE = "bare server listening on port "
CLASSES = 10


def fixed_response() -> bytes:
    """What every call gets: a model's answer to one image (uniform probabilities)."""
    response = pb.ModelInferResponse(model_name="bare", model_version="1")
    response.outputs.add(name="probabilities", datatype="FP32", shape=[1, CLASSES])
    response.raw_output_contents.append(np.full(CLASSES, 1 / CLASSES, np.float32).tobytes())
    return response.SerializeToString()


async def _serve(port: int, ready: Any) -> None:
    answer = fixed_response()

    async def infer(request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> bytes:
        return answer

    handler = grpc.unary_unary_rpc_method_handler(
        infer, request_deserializer=pb.ModelInferRequest.FromString
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": handler})]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    ready.put(True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(0)


def _worker(port: int, ready: Any) -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})  # the parent's
    asyncio.run(_serve(port, ready))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare", description=__doc__)
    parser.add_argument("--workers", type=int, default=1, help="Processes on the port.")
    parser.add_argument("--port", type=int, default=0, help="0 picks one (printed).")
    args = parser.parse_args(argv)
    # Reserve the port (bound, never listening) so that port 0 is one port for every process.
    reserve = socket.socket()
    reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserve.bind(("127.0.0.1", args.port))
    port = reserve.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    processes = [context.Process(target=_worker, args=(port, ready)) for _ in range(args.workers)]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=60)
    print(f"{READY_LINE}{port}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(10)
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    sys.exit(main())
