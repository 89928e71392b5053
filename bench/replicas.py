"""Replicas sharing the durable consumer: does the work split between them?

    python -m bench replicas [--replicas 2] [--workers 1] [--workload light] [--messages 2000]

On one pair of embedded servers, for the same preloaded DLQ backlog: one
`dlqproc run`, then --replicas of them started together on the same durable
consumer (no COMPANY_ID), each with --workers worker processes. For each it
reports the backlog's msg/s (from the first ready line to the last final
ACK/TERM) and, per replica, the DLQ messages it ACKed (`dlq_acks_success` on
its /metrics). On a 2-core machine shared by the servers, replicas share the
cores too: the run shows that the replicas share the messages, not a gain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import nats

from bench import procs
from bench.harness import AckTracker, Options, Run, Spec, publish, servers
from bench.workloads import WORKLOADS
from dlqproc.embedded import free_port


def _acked(port: int) -> float:
    """dlq_acks_success summed over tenants, from a replica's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("dlq_acks_success") and not line.startswith("dlq_acks_success_created")
    )


async def one(
    opts: Options, nats_url: str, dsn: str, logs: Path, replicas: int, workers: int, wl: str
) -> dict[str, Any]:
    run = Run(Spec(wl, "dlq", "service", workers, 256, 0), opts, nats_url, dsn, logs)
    n = WORKLOADS[wl].count(opts.messages)
    items = WORKLOADS[wl].items("dlq", n, opts.seed, run.dlq_subject)
    run.create_db()
    nc = await nats.connect(nats_url, name="bench-replicas")
    tracker = AckTracker()
    children: list[tuple[procs.Child, int]] = []
    try:
        await run.create_topology()
        await tracker.subscribe(nc, [run.dlq_stream])
        pub = await publish(nc, items)
        keys = set(pub.sent)
        for i in range(replicas):
            port = free_port()
            env = {**run.env, "SERVER_PORT": str(port)}
            child = procs.Child(
                procs.python_argv("-m", "dlqproc", "run"),
                env,
                logs / f"{run.db}-replica{i}.log",
                procs.READY_LINE,
            ).start()
            children.append((child, port))
        ready = [await asyncio.to_thread(c.wait_ready, 120.0) for c, _ in children]
        run.child = children[0][0]
        if not await run.wait_settled(nc, tracker, keys, opts.settle_timeout):
            raise RuntimeError("backlog not settled")
        seconds = max(tracker.final.values()) - min(ready)
        acked = [_acked(port) for _, port in children]
        return {
            "replicas": replicas,
            "workers_each": workers,
            "workload": wl,
            "messages": len(keys),
            "seconds": round(seconds, 2),
            "msgs_per_s": round(len(keys) / seconds, 1),
            "acked_per_replica": acked,
        }
    finally:
        for child, _ in children:
            await asyncio.to_thread(child.stop, 30.0)
        await tracker.close()
        await run.delete_topology(nc)
        with contextlib.suppress(Exception):
            await nc.close()
        with contextlib.suppress(Exception):
            run.drop_db()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench replicas", description=__doc__)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--workload", default="light", choices=tuple(WORKLOADS))
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("bench/results/replicas"))
    args = p.parse_args(argv)
    opts = Options(messages=args.messages)
    logs = Path(tempfile.mkdtemp(prefix="dlqproc-bench-replicas-"))
    results = []
    with servers(opts) as (nats_url, dsn, _pids):
        for _ in range(args.repeats):
            for count in (1, args.replicas):
                res = asyncio.run(
                    one(opts, nats_url, dsn, logs, count, args.workers, args.workload)
                )
                results.append(res)
                print(json.dumps(res), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replicas.json").write_text(
        json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": results}, indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
