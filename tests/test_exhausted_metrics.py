"""dlq_replays_total: counted in PostgreSQL by whoever replays, reported by the service."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from dlqproc.metrics import Metrics
from dlqproc.store.exhausted_ops import ExhaustedDB
from support.exhausted import migrate, query
from support.service import Service, wait_until


def replays(m: Metrics) -> dict[tuple[str, str], float]:
    text = "\n".join(m.registry.expose()) + "\n"
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "dlq_replays_total":
                out[(s.labels["company_id"], s.labels["result"])] = s.value
    return out


def test_totals_from_postgres_become_the_counter(dsn: str) -> None:
    migrate(dsn)
    query(
        dsn,
        "INSERT INTO exhausted_replay_totals VALUES ('acme', 'published', 7),"
        " ('acme', 'refused', 2), ('globex', 'published', 3), ('initech', 'published', 4)"
        " RETURNING 1",
    )

    async def totals() -> dict[tuple[str, str], int]:
        db = ExhaustedDB(dsn)
        try:
            return await db.replay_totals()
        finally:
            await db.close()

    m = Metrics(max_tenants=2)
    m.set_replays(asyncio.run(totals()))
    assert replays(m) == {
        ("acme", "published"): 7,
        ("acme", "refused"): 2,
        ("globex", "published"): 3,
        ("_other", "published"): 4,
    }
    # Later totals raise it; a total that went down (rows deleted) never lowers it.
    m.set_replays({("acme", "published"): 9, ("acme", "refused"): 1})
    assert replays(m)[("acme", "published")] == 9 and replays(m)[("acme", "refused")] == 2


def test_the_service_reports_the_replay_totals(service: Callable[..., Service]) -> None:
    svc = service()
    svc.execute(
        "INSERT INTO exhausted_replay_totals"
        " VALUES ('acme', 'published', 5), ('acme', 'refused', 1)"
    )

    def scraped() -> dict[tuple[str, str], float]:
        url = f"http://127.0.0.1:{svc.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        return {
            (s.labels["company_id"], s.labels["result"]): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "dlq_replays_total"
        }

    seen = wait_until(lambda: scraped() or None, timeout=30)
    assert seen == {("acme", "published"): 5, ("acme", "refused"): 1}
