"""Listening sockets bound the way every port of the server is bound."""

from __future__ import annotations

import socket


def bind_tcp(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening; raises OSError.

    `reuse_port`: join (or start) a SO_REUSEPORT group, as the supervisor's reserved ports and
    every worker's sockets do. A wildcard IPv6 host also takes IPv4, as gRPC binds it.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host in ("::", "[::]"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock
