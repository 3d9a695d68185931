"""uvicorn's h11 protocol with TCP_NODELAY on every connection.

uvicorn writes a response's head and body in two writes. asyncio disables Nagle's algorithm only on sockets whose
`proto` is IPPROTO_TCP, which the listening socket uvicorn binds itself for `--workers N` is not; there each
keep-alive response then waits ~40 ms for the client's delayed ACK. `cycles serve` passes this class as uvicorn's
`http` protocol, so every connection has Nagle off whatever the socket's origin.
"""

from __future__ import annotations

import asyncio
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol


class H11NoDelayProtocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        super().connection_made(transport)
