"""Tenant schemas: admission, then the schema and its tables, on first use.

A tenant's schema is "daisi_" + its id verbatim (envelope.tenant_schema),
always quoted, so "acme" and "ACME" never share one. Before a schema is
created the tenant is admitted: tenants.allow, when set, must list it, and a
tenant new to public.dlqproc_tenants is admitted only while fewer than
tenants.maxNewPerHour were recorded in the last hour. The count lives in
PostgreSQL, so every replica applies one limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from dlqproc.envelope import refusal
from dlqproc.model import FailureKind, Reason
from dlqproc.store.results import ItemFailed
from dlqproc.store.sql import schema_name

# Arbitrary constant: serialises admitting new tenants across replicas, so the cap is exact.
_NEW_TENANT_LOCK = 0x646C7174

_RECORD = (
    "INSERT INTO public.dlqproc_tenants (tenant, created_at) VALUES (%s, %s::timestamptz)"
    " ON CONFLICT (tenant) DO NOTHING"
)
_RECENT = "SELECT count(*) FROM public.dlqproc_tenants WHERE created_at > now() - interval '1 hour'"
COUNT = "SELECT count(*) FROM public.dlqproc_tenants"


class Tenants:
    """Which tenants may be written, and the schemas this process knows exist.

    allow: the tenants that may be written (empty: any); max_new_per_hour: new
    tenants admitted per hour across replicas (0: no limit); ddl: the tenant's
    tables, each a statement with a {schema} placeholder.
    """

    def __init__(self, ddl: Sequence[str], allow: frozenset[str], max_new_per_hour: int) -> None:
        self._ddl = tuple(ddl)
        self._allow = allow
        self._cap = max_new_per_hour
        self._known: set[str] = set()

    async def ensure(self, conn: psycopg.AsyncConnection[Any], tenant: str) -> str:
        """Admit the tenant, create its schema and tables on first use; its schema's name.

        ItemFailed PERMANENT invalid_tenant for an id that is not one;
        PERMANENT tenant_refused when tenants.allow does not list it (checked
        on every write: the allow-list is the last word); TRANSIENT
        tenant_limit when it is new and the hour's cap is reached (see
        _record). Nothing is created for a tenant that is not admitted.
        """
        schema = schema_name(tenant)  # an invalid tenant fails as such first
        refused = refusal(tenant, self._allow)
        if refused is not None:
            raise ItemFailed(FailureKind.PERMANENT, Reason.TENANT_REFUSED, refused)
        if schema in self._known:
            return schema
        async with conn.transaction():
            # Concurrent replicas may create the same schema; the lock orders them.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (schema,))
            await self._record(conn, tenant, schema)
            ident = sql.Identifier(schema)
            await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
            for ddl in self._ddl:
                await conn.execute(sql.SQL(ddl).format(schema=ident))
        self._known.add(schema)
        return schema

    async def _record(self, conn: psycopg.AsyncConnection[Any], tenant: str, schema: str) -> None:
        """Record the tenant in public.dlqproc_tenants, or refuse it for now.

        A schema that exists already (made by an older dlqproc or an operator)
        is recorded with created_at -infinity: it costs nothing new, so it is
        never counted against the cap. A new one takes a lock shared by every
        replica, so two replicas cannot both admit the cap's last tenant.
        """
        cur = await conn.execute(
            "SELECT 1 FROM public.dlqproc_tenants WHERE tenant = %s", (tenant,)
        )
        if await cur.fetchone() is not None:
            return
        cur = await conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        if await cur.fetchone() is not None:
            await conn.execute(_RECORD, (tenant, "-infinity"))
            return
        if self._cap > 0:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_NEW_TENANT_LOCK,))
            cur = await conn.execute(_RECENT)
            row = await cur.fetchone()
            recent = int(row[0]) if row else 0
            if recent >= self._cap:
                raise ItemFailed(
                    FailureKind.TRANSIENT,
                    Reason.TENANT_LIMIT,
                    f"new tenant {tenant!r} not admitted yet: {recent} tenants were created"
                    f" in the last hour, tenants.maxNewPerHour is {self._cap}",
                )
        await conn.execute(_RECORD, (tenant, "now"))
