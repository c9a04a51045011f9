"""A minimal /healthz endpoint that answers from process start, leader or standby.

kopf has a liveness endpoint, but it only exists while kopf runs, i.e. on the leader: a standby replica
waiting for the Lease would fail its liveness probe and be restarted forever.
"""

from __future__ import annotations

import asyncio
import contextlib

_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        line = await asyncio.wait_for(reader.readline(), timeout=5)
        parts = line.split()
        ok = len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] in (b"/healthz", b"/readyz")
        writer.write(_OK if ok else _NOT_FOUND)
        await writer.drain()
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def start_health_server(port: int, host: str = "0.0.0.0") -> asyncio.Server:
    return await asyncio.start_server(_handle, host, port)
