"""A TCP relay from a fake pod's IP to a process outside the pod network namespace.

A router started on the host must reach the API server (on the host's loopback) and be reached at its pod's IP
(where the operator reads its /metrics and clients send requests). One network namespace cannot hold both, so
the router listens on the host end of the pod network's veth pair, and this relay, started inside the namespace
(`ip netns exec NS python -m tiergate.devcluster.relay --listen POD_IP:PORT --to HOST_ADDR:PORT`), forwards the
pod's address to it, byte for byte.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError):
            writer.close()


async def relay(listen: tuple[str, int], to: tuple[str, int]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*to)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(handle, *listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {listen[0]}:{listen[1]} -> {to[0]}:{to[1]}", flush=True)
    async with server:
        await stop.wait()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="forward a fake pod's address to a process on the host")
    p.add_argument("--listen", required=True, metavar="POD_IP:PORT")
    p.add_argument("--to", required=True, metavar="HOST:PORT")
    args = p.parse_args(argv)
    asyncio.run(relay(_addr(args.listen), _addr(args.to)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
