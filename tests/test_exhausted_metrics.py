"""dlq_replays_total: counted in PostgreSQL by whoever replays, reported by the service."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from dlqproc.exhausted.db import ExhaustedDB
from dlqproc.metrics import Metrics
from support.exhausted import migrate, query


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
