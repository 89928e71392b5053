"""A 3-node nats-server cluster with JetStream on loopback, one config file per node."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import nats

from dlqproc.embedded import NatsServer, free_port


class NatsCluster:
    """Three NatsServer nodes (n1..n3) routed to each other; each keeps its ports and store."""

    def __init__(self, state_dir: Path, size: int = 3) -> None:
        routes = [free_port() for _ in range(size)]
        self.names = [f"n{i + 1}" for i in range(size)]
        self.nodes: dict[str, NatsServer] = {}
        for name, port in zip(self.names, routes, strict=True):
            others = ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes if p != port)
            # JetStream and its store_dir (state_dir/<name>/jetstream) come from
            # NatsServer's -js -sd flags; a store_dir here too is refused as a duplicate.
            config = (
                f"server_name: {name}\n"
                f"cluster {{ name: dlqproc, listen: 127.0.0.1:{port}, routes: [{others}] }}\n"
            )
            self.nodes[name] = NatsServer(state_dir / name, config=config)

    @property
    def url(self) -> str:
        """Every node, comma separated, as NATS_URL lists them."""
        return ",".join(node.url for node in self.nodes.values())

    def start(self, *names: str) -> None:
        for name in names or self.names:
            self.nodes[name].start()

    def kill(self, name: str) -> None:
        """SIGKILL one node (no shutdown, no leadership hand-over)."""
        node = self.nodes[name]
        proc = node._proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        node._proc = None

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- JetStream, through whichever node answers

    def run(self, coro_fn):  # type: ignore[no-untyped-def]
        async def go():  # type: ignore[no-untyped-def]
            nc = await nats.connect(
                self.url.split(","), connect_timeout=2, max_reconnect_attempts=5
            )
            try:
                return await coro_fn(nc.jetstream(timeout=5))
            finally:
                await nc.close()

        return asyncio.run(go())

    def stream_leader(self, stream: str) -> str:
        async def go(js):  # type: ignore[no-untyped-def]
            info = await js.stream_info(stream)
            return info.cluster.leader if info.cluster else ""

        return str(self.run(go))

    def await_new_leaders(
        self, killed: str, stream: str, durable: str, timeout: float = 60.0
    ) -> dict[str, float]:
        """When (time.monotonic()) the stream and its consumer report a leader other than `killed`.

        Asked of the surviving nodes only, every 50 ms, each request given
        up after 0.5 s (a group without a leader does not answer): how long
        NATS itself takes to elect, apart from what its clients do.
        """
        survivors = [node.url for name, node in self.nodes.items() if name != killed]
        subjects = {
            "stream": f"$JS.API.STREAM.INFO.{stream}",
            "consumer": f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
        }

        async def go() -> dict[str, float]:
            nc = await nats.connect(survivors, connect_timeout=2, max_reconnect_attempts=-1)
            elected: dict[str, float] = {}
            deadline = time.monotonic() + timeout
            try:
                while len(elected) < len(subjects):
                    if time.monotonic() > deadline:
                        raise AssertionError(f"no new leaders within {timeout}s: {elected}")
                    for what, subject in subjects.items():
                        if what in elected:
                            continue
                        try:
                            reply = await nc.request(subject, b"", timeout=0.5)
                        except Exception:
                            continue
                        leader = (json.loads(reply.data).get("cluster") or {}).get("leader")
                        if leader and leader != killed:
                            elected[what] = time.monotonic()
                    await asyncio.sleep(0.05)
                return elected
            finally:
                await nc.close()

        return asyncio.run(go())
