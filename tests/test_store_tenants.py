"""Tenant schemas and admission in dlqproc.store against a real PostgreSQL.

One schema per tenant id, case included; tenants.allow and tenants.maxNewPerHour
decided in PostgreSQL (public.dlqproc_tenants), so replicas share one limit.
"""

from __future__ import annotations

import asyncio

from test_store import assert_failed, exhausted, query, rows, run, schemas, upsert

from dlqproc.model import FailureKind, Reason
from dlqproc.rows import encode
from dlqproc.store import Store, Write, WriteResult, Written
from support.handlers import TENANT_DDL


def write(tenant: str, id_: str = "c1") -> Write:
    return Write(tenant=tenant, rows=encode((upsert(id_, tenant=tenant),)))


def recorded(dsn: str) -> dict[str, bool]:
    """dlqproc_tenants: tenant -> whether it counts as new (created_at is finite)."""
    found = query(dsn, "SELECT tenant, isfinite(created_at) FROM public.dlqproc_tenants")
    return {r[0]: r[1] for r in found}


def tenant_schemas(dsn: str) -> set[str]:
    return {s for s in schemas(dsn) if s.startswith("daisi_")}


# --- one schema per tenant ---------------------------------------------------------


def test_tenants_differing_in_case_write_into_schemas_of_their_own(dsn: str) -> None:
    tenants = ["acme", "ACME", "Acme", "aCmE"]
    results = run(dsn, lambda s: s.write([write(t) for t in tenants]))
    assert results == [Written()] * 4
    assert tenant_schemas(dsn) == {f"daisi_{t}" for t in tenants}
    # The same key in each: four rows, each carrying its own schema's tenant.
    for t in tenants:
        assert rows(dsn, f"daisi_{t}") == {"c1": (t, 1)}
    assert recorded(dsn) == dict.fromkeys(tenants, True)


def test_a_second_store_finds_each_case_in_its_own_schema(dsn: str) -> None:
    run(dsn, lambda s: s.write([write("acme")]))

    async def later(store: Store) -> list[Written]:
        # A replica that never saw "acme": "ACME" must not take its schema.
        return await store.write([write("ACME", "c2")])

    assert run(dsn, later) == [Written()]
    assert rows(dsn, "daisi_acme") == {"c1": ("acme", 1)}
    assert rows(dsn, "daisi_ACME") == {"c2": ("ACME", 1)}


# --- tenants.allow ---------------------------------------------------------------


def test_a_tenant_not_allowed_gets_no_schema_and_others_commit(dsn: str) -> None:
    before = schemas(dsn)
    batch = [write("acme"), write("globex"), write("ACME"), write("acme", "c2")]
    results = run(dsn, lambda s: s.write(batch), allow=frozenset({"acme"}))
    assert results[0] == results[3] == Written()
    for refused, tenant in ((results[1], "globex"), (results[2], "ACME")):
        assert_failed(refused, FailureKind.PERMANENT, Reason.TENANT_REFUSED)
        assert str(refused.failure) == f"tenant {tenant!r} is not in tenants.allow"
    assert schemas(dsn) - before == {"daisi_acme"}
    assert rows(dsn) == {"c1": ("acme", 1), "c2": ("acme", 1)}
    assert recorded(dsn) == {"acme": True}


def test_the_exhausted_row_of_a_refused_tenant_is_written(dsn: str) -> None:
    row = exhausted(company_id="globex", reason="tenant_refused")
    results = run(dsn, lambda s: s.write([Write(exhausted=row)]), allow=frozenset({"acme"}))
    assert results == [Written(inserted=True)]
    assert query(dsn, "SELECT company_id, reason FROM public.exhausted_events") == [
        ("globex", "tenant_refused")
    ]
    assert tenant_schemas(dsn) == set()


def test_an_invalid_tenant_fails_as_invalid_whatever_the_allow_list(dsn: str) -> None:
    results = run(dsn, lambda s: s.write([write("a$b")]), allow=frozenset({"acme"}))
    assert_failed(results[0], FailureKind.PERMANENT, Reason.INVALID_TENANT)


def test_allow_list_applies_to_schemas_that_exist_already(dsn: str) -> None:
    run(dsn, lambda s: s.write([write("globex")]))
    results = run(dsn, lambda s: s.write([write("globex", "c2")]), allow=frozenset({"acme"}))
    assert_failed(results[0], FailureKind.PERMANENT, Reason.TENANT_REFUSED)
    assert rows(dsn, "daisi_globex") == {"c1": ("globex", 1)}


# --- tenants.maxNewPerHour --------------------------------------------------------


def test_past_the_cap_a_new_tenant_waits_and_known_ones_do_not(dsn: str) -> None:
    async def body(store: Store) -> list[list[Written]]:
        first = await store.write([write("t1"), write("t2"), write("t3")])
        # Known tenants keep writing while the cap holds the new one back.
        again = await store.write([write("t3", "c2"), write("t1", "c2")])
        return [first, again]

    first, again = run(dsn, body, max_new_tenants_per_hour=2)
    assert first[:2] == [Written(), Written()]
    for held in (first[2], again[0]):
        assert_failed(held, FailureKind.TRANSIENT, Reason.TENANT_LIMIT)
        assert str(held.failure) == (
            "new tenant 't3' not admitted yet: 2 tenants were created in the last hour,"
            " tenants.maxNewPerHour is 2"
        )
    assert again[1] == Written()
    assert tenant_schemas(dsn) == {"daisi_t1", "daisi_t2"}
    assert set(recorded(dsn)) == {"t1", "t2"}

    # An hour later there is room again.
    query(dsn, "UPDATE public.dlqproc_tenants SET created_at = now() - interval '61 minutes'")
    later = run(dsn, lambda s: s.write([write("t3")]), max_new_tenants_per_hour=2)
    assert later == [Written()]
    assert rows(dsn, "daisi_t3") == {"c1": ("t3", 1)}


def test_zero_means_no_cap(dsn: str) -> None:
    batch = [write(f"t{i}") for i in range(5)]
    assert run(dsn, lambda s: s.write(batch), max_new_tenants_per_hour=0) == [Written()] * 5


def test_replicas_share_one_cap(dsn: str) -> None:
    """Two stores (two connections) admitting new tenants at once admit exactly the cap."""
    run(dsn, lambda s: asyncio.sleep(0))  # migrate once, before the race

    async def replica(names: list[str]) -> list[Written]:
        store = Store(dsn, 10.0, TENANT_DDL, max_new_tenants_per_hour=3)
        try:
            results = []
            for name in names:  # one write each: every one races the other replica
                results += await store.write([write(name)])
            return results
        finally:
            await store.close()

    async def both() -> list[Written]:
        a, b = await asyncio.gather(
            replica([f"a{i}" for i in range(4)]), replica([f"b{i}" for i in range(4)])
        )
        return a + b

    results = asyncio.run(both())
    admitted = [r for r in results if r == Written()]
    assert len(admitted) == 3
    for r in results:
        if r != Written():
            assert_failed(r, FailureKind.TRANSIENT, Reason.TENANT_LIMIT)
    assert len(tenant_schemas(dsn)) == 3 and len(recorded(dsn)) == 3


def test_a_schema_that_exists_already_is_recorded_but_never_counted(dsn: str) -> None:
    query(dsn, 'CREATE SCHEMA "daisi_Old"')

    async def body(store: Store) -> list[Written]:
        return await store.write([write("Old"), write("new1"), write("new2")])

    results = run(dsn, body, max_new_tenants_per_hour=1)
    assert results[:2] == [Written(), Written()]
    assert_failed(results[2], FailureKind.TRANSIENT, Reason.TENANT_LIMIT)
    assert recorded(dsn) == {"Old": False, "new1": True}


# --- the migration and the count ----------------------------------------------------


def test_migration_records_existing_tenant_schemas_as_old(dsn: str) -> None:
    for name in ("daisi_legacy", "daisi_x-1_y", "daisi_", "daisi_a.b", "daisi__invalid", "other"):
        query(dsn, f'CREATE SCHEMA "{name}"')

    async def body(store: Store) -> int:
        return await store.tenants_known()

    assert run(dsn, body) == 2
    assert recorded(dsn) == {"legacy": False, "x-1_y": False}
    # Old tenants do not use up the hour's room.
    results = run(dsn, lambda s: s.write([write("legacy"), write("n")]), max_new_tenants_per_hour=1)
    assert results == [Written(), Written()]


def test_tenants_known_counts_the_recorded_tenants(dsn: str) -> None:
    async def body(store: Store) -> list[int]:
        counts = [await store.tenants_known()]
        await store.write([write("acme"), write("ACME")])
        counts.append(await store.tenants_known())
        await store.write([write("acme", "c2")])
        counts.append(await store.tenants_known())
        return counts

    assert run(dsn, body) == [0, 2, 2]


# --- one tenant's schema failing, among other tenants' items ---------------------


def mixed_group(bad: str) -> list[Write]:
    """Items of tenant `bad` between items of acme and an exhausted row, one commit group."""
    return [
        write(bad, "b1"),
        write("acme", "a1"),
        Write(exhausted=exhausted()),
        write(bad, "b2"),
        write("acme", "a2"),
    ]


def assert_only_bad_failed(
    dsn: str, results: list[WriteResult], kind: FailureKind, reason: Reason
) -> None:
    for failed in (results[0], results[3]):
        assert_failed(failed, kind, reason)
    assert results[1] == results[4] == Written()
    assert results[2] == Written(inserted=True)
    assert rows(dsn, "daisi_acme") == {"a1": ("acme", 1), "a2": ("acme", 1)}
    assert query(dsn, "SELECT count(*) FROM public.exhausted_events") == [(1,)]


def test_a_schema_owned_by_another_role_fails_only_its_tenants_items(dsn: str) -> None:
    # dlqproc connects as a role that owns its database but not daisi_locked,
    # which an operator made for another role: it may not create tables there.
    database = dsn.rsplit("/", 1)[1]
    app, other = f"{database}_app", f"{database}_other"
    query(dsn, f"CREATE ROLE {app} LOGIN; CREATE ROLE {other}")
    query(dsn, f"ALTER DATABASE {database} OWNER TO {app}")
    query(dsn, f"ALTER SCHEMA public OWNER TO {app}")
    query(dsn, f"CREATE SCHEMA daisi_locked AUTHORIZATION {other}")
    as_app = dsn.replace("://postgres@", f"://{app}@")
    assert as_app != dsn

    results = run(as_app, lambda s: s.write(mixed_group("locked")))
    assert_only_bad_failed(dsn, results, FailureKind.TRANSIENT, Reason.DATABASE)
    assert str(results[0].failure).startswith(  # type: ignore[union-attr]
        "preparing daisi_locked: permission denied for schema daisi_locked"
    )
    assert query(dsn, "SELECT count(*) FROM pg_tables WHERE schemaname = 'daisi_locked'") == [(0,)]


def test_a_table_altered_to_refuse_rows_fails_only_its_tenants_items(dsn: str) -> None:
    # Both schemas exist and are known to the store; then an operator makes
    # globex's table refuse every row: the fast path fails, and item by item
    # only globex's items are left out.
    async def body(store: Store) -> list[WriteResult]:
        assert (
            await store.write([write("globex", "seed"), write("acme", "seed")]) == [Written()] * 2
        )
        query(
            dsn,
            "ALTER TABLE daisi_globex.test_rows ADD CONSTRAINT frozen CHECK (false) NOT VALID",
        )
        query(dsn, "DELETE FROM daisi_acme.test_rows")
        return await store.write(mixed_group("globex"))

    results = run(dsn, body)
    assert_only_bad_failed(dsn, results, FailureKind.PERMANENT, Reason.VALIDATION)
    assert 'violates check constraint "frozen"' in str(results[0].failure)  # type: ignore[union-attr]
    assert rows(dsn, "daisi_globex") == {"seed": ("globex", 1)}
