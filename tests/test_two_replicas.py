"""Two `dlqproc run` processes started at once on one database and one DLQ stream."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable

from support.service import Service, envelope, wait_until

Make = Callable[..., Service]


def counter(svc: Service, name: str) -> float:
    """The sum of a counter's series on one replica's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_two_replicas_store_every_event_once_and_exhaust_nothing_twice(service: Make) -> None:
    a = service(start=False)
    # The same stream, subject (so durable) and database: two replicas of one service.
    b = service(start=False, NATS_DLQSTREAM=a.stream, NATS_DLQSUBJECT=a.subject)
    # Started together: both migrate the empty database and create the stream
    # and consumer at the same time.
    a.start(wait=False)
    b.start(wait=False)
    for svc in (a, b):
        wait_until(lambda s=svc: s.find("Starting DLQ worker...") or s._exited(), 60)
        assert svc.proc is not None and svc.proc.poll() is None, svc.log_text()
    ok, bad = 300, 30
    bodies = [envelope("t.ok", "acme", {"id": f"e{i}"}) for i in range(ok)]
    bodies += [envelope("t.perm", "globex", {"id": f"p{i}"}) for i in range(bad)]
    seqs = a.publish("acme", bodies[:ok]) + a.publish("globex", bodies[ok:])
    wait_until(lambda: len(a.rows("acme")) == ok and len(a.exhausted()) == bad, timeout=120)
    wait_until(a.settled, timeout=60)
    # Each event's row written by its first and only successful delivery.
    assert a.rows("acme") == {f"e{i}": 1 for i in range(ok)}
    assert sorted(r["dlq_sequence"] for r in a.exhausted()) == sorted(seqs[ok:])
    # Both replicas took a share, and between them settled each message once:
    # no ACK and no exhaustion happened twice.
    success = [counter(s, "dlq_acks_success_total") for s in (a, b)]
    dropped = [counter(s, "dlq_tasks_dropped_total") for s in (a, b)]
    assert sum(success) == ok and sum(dropped) == bad, (success, dropped)
    assert all(s > 0 for s in success), success
    assert a.consumer()["redelivered"] == 0
    assert a.stop() == 0 and b.stop() == 0
