"""`python -m benchmarks.bare`: the do-nothing KServe v2 server, the transport's own cost.

A grpc.aio server that answers every ModelInfer with one fixed response: it parses the
request (as any server must) and does nothing else: no model, no batcher, no metrics, no
ids. What it answers per second, and the CPU it spends per answer, is what Python's gRPC
costs by itself; the served figures are measured against it. With --workers N it runs N
such processes on one port (SO_REUSEPORT, as the real server's workers share theirs); each
ends when its parent does, even one that was killed. --transport native serves it with
pygrpc-native instead of grpc.aio, as the server's --grpc-transport does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys

import grpc
import numpy as np

from wire import grpc_service_pb2 as pb

SERVICE = "inference.GRPCInferenceService"
READY_LINE = "bare server listening on port "
WORKER_READY = "ready"
# How often a worker checks that the process that started it still runs.
ORPHAN_CHECK_S = 1.0
CLASSES = 10


def fixed_response() -> bytes:
    """What every call gets: a model's answer to one image (uniform probabilities)."""
    response = pb.ModelInferResponse(model_name="bare", model_version="1")
    response.outputs.add(name="probabilities", datatype="FP32", shape=[1, CLASSES])
    response.raw_output_contents.append(np.full(CLASSES, 1 / CLASSES, np.float32).tobytes())
    return response.SerializeToString()


async def _serve(port: int, transport: str) -> None:
    answer = fixed_response()

    async def infer(request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> bytes:
        return answer

    handler = grpc.unary_unary_rpc_method_handler(
        infer, request_deserializer=pb.ModelInferRequest.FromString
    )
    options = [("grpc.so_reuseport", 1)]
    # The method added as the server adds its own on each transport: registered on native
    # (its front serves only those), a generic handler on grpcio (cheaper per call there).
    if transport == "native":
        import pygrpc_native.aio

        server = pygrpc_native.aio.server(options=options)
        server.add_registered_method_handlers(SERVICE, {"ModelInfer": handler})
    else:
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": handler})]
        )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(WORKER_READY, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    parent = os.getppid()
    while not stop.is_set():  # a worker whose parent is gone (killed) ends too
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), ORPHAN_CHECK_S)
        if os.getppid() != parent:
            break
    await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare", description=__doc__)
    parser.add_argument("--workers", type=int, default=1, help="Processes on the port.")
    parser.add_argument("--port", type=int, default=0, help="0 picks one (printed).")
    parser.add_argument(
        "--transport", choices=("grpcio", "native"), default="grpcio", help="(default: grpcio)"
    )
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:  # one worker process
        asyncio.run(_serve(args.serve, args.transport))
        return 0
    # Reserve the port (bound, never listening) so that port 0 is one port for every process.
    reserve = socket.socket()
    reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserve.bind(("127.0.0.1", args.port))
    port = reserve.getsockname()[1]
    command = [
        sys.executable, "-m", "benchmarks.bare", "--serve", str(port),
        "--transport", args.transport,
    ]  # fmt: skip
    workers = [
        subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(args.workers)
    ]

    def stop(signum: int, frame: object) -> None:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(10)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for worker in workers:
        assert worker.stdout is not None
        if worker.stdout.readline().strip() != WORKER_READY:
            stop(signal.SIGTERM, None)
    print(f"{READY_LINE}{port}", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
