"""Tenancy end to end, on both lanes: dlqproc run on a real NATS and PostgreSQL.

Case-distinct tenants write into schemas of their own; tenants.allow refuses a
tenant before any schema exists and the refusal ends as an exhausted row;
tenants.maxNewPerHour holds a new tenant back until it is exhausted while
known tenants keep writing; invalid tenants appear as "_invalid".
Each test has a nats-server of its own, since the events streams' subjects are fixed.
"""

from __future__ import annotations

import functools
import json
import urllib.request
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql
from test_pipeline import CHAT

from support.service import Service, envelope, wait_until

Make = Callable[..., Service]


def chats(svc: Service, tenant: str) -> list[dict[str, Any]]:
    """The tenant's chats, read from its schema by its exact (quoted) name."""
    target = sql.Identifier(f"daisi_{tenant}", "chats")
    with psycopg.connect(svc.dsn, autocommit=True) as conn:
        try:
            cur = conn.execute(sql.SQL("SELECT * FROM {} ORDER BY chat_id").format(target))
        except psycopg.errors.UndefinedTable:
            return []
        cols = [d.name for d in cur.description or ()]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def tenant_schemas(svc: Service) -> set[str]:
    found = svc.query("SELECT nspname FROM pg_namespace WHERE left(nspname, 6) = 'daisi_'")
    return {r[0] for r in found}


def known(svc: Service) -> set[str]:
    return {r[0] for r in svc.query("SELECT tenant FROM public.dlqproc_tenants")}


def send(svc: Service, tenant: str, payload: dict[str, Any]) -> int:
    return svc.publish_to(f"v1.chats.upsert.{tenant}", [json.dumps(payload).encode()])[0]


def metric(svc: Service, name: str, **labels: str) -> float | None:
    """One sample of /metrics: the sum over series with `labels`, None if there is none."""
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = None
    for line in text.splitlines():
        series, _, number = line.rpartition(" ")
        if series.split("{")[0] == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
            found = (found or 0.0) + float(number)
    return found


def test_case_distinct_tenants_never_share_a_schema_on_either_lane(pipeline: Make) -> None:
    svc = pipeline()
    send(svc, "acme", {**CHAT, "push_name": "lower"})
    wait_until(lambda: chats(svc, "acme"), timeout=30)
    # Same chat_id, a tenant differing only in case: the main lane...
    send(svc, "ACME", {**CHAT, "push_name": "upper"})
    # ...and the DLQ lane, with an envelope of a third spelling.
    body = envelope("v1.chats.upsert", "Acme", {**CHAT, "push_name": "mixed"})
    svc.publish_to("v1.dlq.Acme", [body])
    wait_until(lambda: chats(svc, "ACME") and chats(svc, "Acme"), timeout=30)
    svc.wait_drained()
    for tenant, name in (("acme", "lower"), ("ACME", "upper"), ("Acme", "mixed")):
        [row] = chats(svc, tenant)
        assert (row["chat_id"], row["company_id"], row["push_name"]) == ("c1", tenant, name)
    assert tenant_schemas(svc) == {"daisi_acme", "daisi_ACME", "daisi_Acme"}
    assert known(svc) == {"acme", "ACME", "Acme"}
    assert svc.exhausted() == [] and svc.dead_letters() == {}
    # Probes count the tenants every few seconds.
    wait_until(lambda: metric(svc, "dlq_tenants_known") == 3, timeout=20, interval=0.5)


def test_a_tenant_not_allowed_is_exhausted_as_refused_on_both_lanes(pipeline: Make) -> None:
    svc = pipeline(TENANTS_ALLOW="acme")
    refused_seq = send(svc, "globex", CHAT)
    send(svc, "ACME", CHAT)  # the allow-list is case-sensitive too
    svc.publish_to("v1.dlq.initech", [envelope("v1.chats.upsert", "initech", CHAT)])
    send(svc, "acme", CHAT)
    wait_until(lambda: len(svc.exhausted()) == 3 and chats(svc, "acme"), timeout=60)
    svc.wait_drained()
    rows = {r["company_id"]: r for r in svc.exhausted()}
    assert set(rows) == {"globex", "ACME", "initech"}
    for tenant, row in rows.items():
        # The DLQ lane refused it too, and stored it on its first delivery.
        assert (row["reason"], row["retry_count"]) == ("tenant_refused", 1)
        assert row["last_error"] == f"tenant {tenant!r} is not in tenants.allow"
        assert row["source_subject"] == f"v1.chats.upsert.{tenant}"
    dead = svc.dead_letters()[f"dlq-wa_events_stream-{refused_seq}"]
    assert (dead["_subject"], dead["error_type"]) == ("v1.dlq.globex", "fatal")
    assert dead["error"] == "tenant 'globex' is not in tenants.allow"
    # No schema, no record: a refused tenant costs nothing in the catalog.
    assert tenant_schemas(svc) == {"daisi_acme"} and known(svc) == {"acme"}
    labels = {"company_id": "globex", "action": "dlq_published_ack_success"}
    actions = "message_event_service_event_processing_actions_total"
    wait_until(lambda: metric(svc, actions, **labels, error_type="validation") == 1, timeout=10)


def test_past_max_new_per_hour_a_new_tenant_is_retried_then_exhausted(pipeline: Make) -> None:
    svc = pipeline(
        TENANTS_MAXNEWPERHOUR="2",
        NATS_REALTIME_MAXDELIVER="2",
        NATS_DLQMAXRETRIES="2",
        NATS_DLQMAXDELIVER="4",
    )
    for tenant in ("t1", "t2"):  # one at a time: these two are the hour's first
        send(svc, tenant, CHAT)
        wait_until(functools.partial(chats, svc, tenant), timeout=30)
    held_seq = send(svc, "t3", CHAT)
    wait_until(svc.exhausted, timeout=60)
    # A known tenant is never held back.
    send(svc, "t1", {**CHAT, "chat_id": "c2"})
    wait_until(lambda: len(chats(svc, "t1")) == 2, timeout=30)
    svc.wait_drained()
    [row] = svc.exhausted()
    assert (row["company_id"], row["reason"], row["retry_count"]) == ("t3", "retries_exhausted", 2)
    assert row["last_error"] == (
        "new tenant 't3' not admitted yet: 2 tenants were created in the last hour,"
        " tenants.maxNewPerHour is 2"
    )
    dead = svc.dead_letters()[f"dlq-wa_events_stream-{held_seq}"]
    assert (dead["error_type"], dead["retry_count"]) == ("retryable", 2)
    # Retried with backoff on both lanes, each time for the same reason.
    assert svc.find("Event processing failed, retrying with backoff", error_type="database")
    assert svc.find("Failed to process event from DLQ", reason="tenant_limit")
    assert tenant_schemas(svc) == {"daisi_t1", "daisi_t2"} and known(svc) == {"t1", "t2"}


def test_invalid_tenants_are_labelled_and_stored_as_invalid(pipeline: Make) -> None:
    svc = pipeline()
    svc.publish_to("v1.chats.upsert.a$b", [json.dumps(CHAT).encode()])
    wait_until(svc.exhausted, timeout=30)
    svc.wait_drained()
    [row] = svc.exhausted()
    assert (row["company_id"], row["reason"]) == ("_invalid", "invalid_tenant")
    received = "message_event_service_events_received_total"
    dropped = "dlq_tasks_dropped_total"
    wait_until(lambda: metric(svc, dropped, company_id="_invalid") == 1, timeout=10)
    assert metric(svc, received, company_id="_invalid") == 1
    assert metric(svc, received, company_id="invalid") is None
    assert tenant_schemas(svc) == set()
