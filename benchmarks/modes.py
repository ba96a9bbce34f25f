"""The API modes the load generator measures, and the calls its workers share for each."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from benchmarks.calls import Call, ModelInfo, kserve_call, native_call
from benchmarks.common import Config
from benchmarks.streams import Stream, kserve_stream_api, native_stream_api

UNARY_APIS = {"native": native_call, "kserve": kserve_call}
STREAM_APIS = {"native-stream": native_stream_api, "kserve-stream": kserve_stream_api}
APIS = (*UNARY_APIS, *STREAM_APIS)


@asynccontextmanager
async def open_calls(
    channel: grpc.aio.Channel,
    config: Config,
    model: ModelInfo,
    timeout_s: float,
    lifetime_s: float,
) -> AsyncIterator[list[Call]]:
    """One call for a unary API; one per stream for a stream API, whose streams close after.

    Workers are spread over the calls, so a stream carries its share of the concurrency.
    """
    if config.api in UNARY_APIS:
        yield [UNARY_APIS[config.api](channel, config, model, timeout_s)]
        return
    api = STREAM_APIS[config.api](config, model)
    streams = [Stream(channel, api, timeout_s, lifetime_s) for _ in range(config.streams)]
    try:
        yield [stream.call for stream in streams]
    finally:
        await asyncio.gather(*(stream.close() for stream in streams))
