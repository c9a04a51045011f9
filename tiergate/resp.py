"""A minimal asyncio Redis client: one pipelined connection speaking RESP2, enough for the tenants' limit scripts.

The router needs four commands (EVALSHA, EVAL, PING and nothing else in the hot path), so it speaks the protocol
itself rather than carrying a client library into the router image. Commands are written in the order they are
issued and answered in that order (RESP is strictly ordered per connection), so one reader task resolves the
waiting futures first in, first out; a command is on the wire when `send` returns, which keeps two commands issued
one after the other in that order at the server too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

RespValue = int | bytes | str | list["RespValue"] | None


class RedisError(Exception):
    """The server answered with an error (e.g. NOSCRIPT)."""


class RedisUnavailable(Exception):
    """No connection, a lost one, or no answer in time: the caller falls back."""


def encode_command(*args: bytes | str | int) -> bytes:
    """A RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


async def read_reply(reader: asyncio.StreamReader) -> RespValue | RedisError:
    """One RESP2 reply. A server error comes back as a RedisError *value* (raised by the caller of that command,
    not here: the connection itself is fine)."""
    line = await reader.readuntil(b"\r\n")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return RedisError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = await reader.readexactly(n + 2)
        return data[:-2]
    if kind == b"*":
        n = int(rest)
        if n < 0:
            return None
        items: list[RespValue] = []
        for _ in range(n):
            item = await read_reply(reader)
            # An error inside an array (a script's error_reply) is a value like any other here.
            items.append(str(item) if isinstance(item, RedisError) else item)
        return items
    raise RedisUnavailable(f"unexpected reply from Redis: {line[:40]!r}")


class RedisConnection:
    """One connection to `host:port`, opened on first use and again after it is lost (at most once per
    `retry_s`, so a down server costs one failed connect a second, not one per request)."""

    # 500 ms: far above a loopback or in-cluster round trip (well under a millisecond) even on a loaded node, and what
    # at most one request a second pays while a server hangs (a refused connection fails at once).
    def __init__(self, address: str, *, timeout_s: float = 0.5, retry_s: float = 1.0) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port = host, int(port)
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._writer: asyncio.StreamWriter | None = None
        self._pending: deque[asyncio.Future[RespValue]] = deque()
        self._reader_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Lock | None = None
        self._next_try = 0.0
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def _connect(self) -> None:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self.connected:
                return
            if self._closed:
                # A store replaced by a policy reload: a late charge must not open a connection nobody closes.
                raise RedisUnavailable("connection closed")
            loop = asyncio.get_running_loop()
            if loop.time() < self._next_try:
                raise RedisUnavailable(f"Redis at {self.host}:{self.port} is down (retrying within {self.retry_s}s)")
            self._next_try = loop.time() + self.retry_s
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.timeout_s)
            except (OSError, TimeoutError) as e:
                raise RedisUnavailable(f"cannot connect to Redis at {self.host}:{self.port}: {e}") from e
            # Each connection has its own queue of waiting commands: a reader still draining a dropped connection
            # must never answer the commands of the next one.
            self._writer, self._pending = writer, deque()
            self._reader_task = loop.create_task(self._read_loop(reader, writer, self._pending))

    async def _read_loop(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pending: deque[asyncio.Future[RespValue]]
    ) -> None:
        try:
            while True:
                value = await read_reply(reader)
                fut = pending.popleft()
                if fut.done():
                    continue
                if isinstance(value, RedisError):
                    fut.set_exception(value)
                else:
                    fut.set_result(value)
        except (OSError, asyncio.IncompleteReadError, RedisUnavailable, IndexError, ValueError) as e:
            # Only this loop's own connection: after a timeout dropped it, a new one may already be in use.
            if self._writer is writer:
                self._drop(RedisUnavailable(f"lost the connection to Redis: {e!r}"))

    def _drop(self, error: Exception) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = None
        pending, self._pending = self._pending, deque()
        while pending:
            fut = pending.popleft()
            if not fut.done():
                fut.set_exception(error)
                # Nobody may be waiting on a command sent without awaiting its answer: don't let asyncio log it.
                fut.exception()

    def send_now(self, *args: bytes | str | int) -> asyncio.Future[RespValue] | None:
        """Write a command at once when connected (its answer is the future); None when not connected."""
        if not self.connected or self._writer is None:
            return None
        fut: asyncio.Future[RespValue] = asyncio.get_running_loop().create_future()
        self._pending.append(fut)
        self._writer.write(encode_command(*args))
        return fut

    async def execute(self, *args: bytes | str | int) -> RespValue:
        """Run one command; RedisUnavailable when it cannot be sent or answered within the timeout, RedisError when
        the server refused it."""
        fut = self.send_now(*args)
        if fut is None:
            await self._connect()
            fut = self.send_now(*args)
            if fut is None:
                raise RedisUnavailable("connection to Redis closed")
        return await self.wait(fut)

    async def wait(self, fut: asyncio.Future[RespValue]) -> RespValue:
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except TimeoutError as e:
            # An answer that does not come in time may never come: later answers would be matched to the wrong
            # commands, so the connection is dropped and opened afresh (unless it was already replaced).
            if fut in self._pending:
                self._drop(RedisUnavailable("Redis did not answer in time"))
            raise RedisUnavailable(f"Redis at {self.host}:{self.port} did not answer within {self.timeout_s}s") from e

    async def aclose(self) -> None:
        self._closed = True
        self._drop(RedisUnavailable("closed"))
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
