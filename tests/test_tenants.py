"""Tenancy's pure parts: the tenant -> schema rule, the invalid-tenant stand-in,
tenants.allow in the workers and in the config."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dlqproc.config import Config, ConfigError, env_name, load
from dlqproc.envelope import (
    INVALID_TENANT_ID,
    SCHEMA_PREFIX,
    TENANT_PATTERN,
    refusal,
    tenant_or_invalid,
    tenant_schema,
    valid_tenant,
)
from dlqproc.handlers import Registry
from dlqproc.model import Delivery, Event, FailureKind, Lane, Outcome, Reason, RowOp
from dlqproc.reprocess import Limits, handle
from dlqproc.settle import ERROR_TYPE

TENANTS = st.from_regex(TENANT_PATTERN, fullmatch=True)
# PostgreSQL silently truncates longer identifiers (NAMEDATALEN - 1), which
# would map two long tenant ids to one schema.
MAX_IDENTIFIER_BYTES = 63
_SUBJECT_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def _case_variant(tenant: str, flips: list[bool]) -> str:
    return "".join(c.swapcase() if flip else c for c, flip in zip(tenant, flips, strict=False))


# --- tenant -> schema --------------------------------------------------------------


@given(tenant=TENANTS)
@example(tenant="Z" * 57)
@example(tenant="9-_")
def test_schema_is_the_prefix_and_the_tenant_verbatim_within_63_bytes(tenant: str) -> None:
    schema = tenant_schema(tenant)
    assert schema == SCHEMA_PREFIX + tenant
    # Invertible, hence injective: the tenant is read back from its schema.
    assert schema.removeprefix(SCHEMA_PREFIX) == tenant
    assert len(schema.encode()) <= MAX_IDENTIFIER_BYTES


@given(a=TENANTS, b=TENANTS)
def test_schema_mapping_is_injective(a: str, b: str) -> None:
    assert (tenant_schema(a) == tenant_schema(b)) == (a == b)


@given(tenant=TENANTS, flips=st.lists(st.booleans(), min_size=57, max_size=57))
def test_tenants_differing_in_case_get_different_schemas(tenant: str, flips: list[bool]) -> None:
    # The case the old lower-casing got wrong: "acme" and "ACME" shared daisi_acme.
    other = _case_variant(tenant, flips)
    assert valid_tenant(other)
    assert (tenant_schema(tenant) == tenant_schema(other)) == (tenant == other)


def test_mixed_case_examples() -> None:
    schemas = {tenant_schema(t) for t in ("acme", "ACME", "Acme", "aCME")}
    assert schemas == {"daisi_acme", "daisi_ACME", "daisi_Acme", "daisi_aCME"}


# --- the invalid-tenant stand-in ----------------------------------------------------


def test_invalid_tenant_id_is_no_tenant_but_a_subject_token() -> None:
    assert INVALID_TENANT_ID == "_invalid"
    assert not valid_tenant(INVALID_TENANT_ID)
    # Dead-lettered on <dlqSubject>._invalid: it must be one NATS token.
    assert _SUBJECT_TOKEN.fullmatch(INVALID_TENANT_ID)
    # "unknown" and "invalid" were the old stand-ins: both are valid tenants.
    assert valid_tenant("unknown") and valid_tenant("invalid")


@given(token=st.text(max_size=80) | TENANTS)
def test_tenant_or_invalid_never_confuses_a_tenant_with_the_stand_in(token: str) -> None:
    got = tenant_or_invalid(token)
    if valid_tenant(token):
        assert got == token != INVALID_TENANT_ID
    else:
        assert got == INVALID_TENANT_ID


# --- tenants.allow in the workers --------------------------------------------------


def _spy(company: object = None) -> tuple[Registry, list[Event]]:
    """A registry whose one handler records its events and upserts one row.

    company: the row's company_id ("" leaves the column out; None: the event's tenant).
    """
    seen: list[Event] = []

    def handler(event: Event) -> list[RowOp]:
        seen.append(event)
        values: dict[str, object] = {"k": 1}
        if company != "":
            values["company_id"] = event.tenant if company is None else company
        return [RowOp("upsert", "t", ("k",), values)]

    return Registry("spy", {"x.do": handler}, ()), seen


def _main(tenant: str, registry: Registry, limits: Limits) -> Outcome:
    delivery = Delivery(1, f"x.do.{tenant}", b'{"a": 1}', 1, lane=Lane.REALTIME)
    return handle(delivery, registry, limits)


def _dlq(tenant: str, registry: Registry, limits: Limits) -> Outcome:
    body = json.dumps(
        {"source_subject": f"x.do.{tenant}", "company": tenant, "original_payload": {"a": 1}}
    ).encode()
    return handle(Delivery(1, f"v1.dlq.{tenant}", body, 1, lane=Lane.DLQ), registry, limits)


ALLOW = Limits("v1.dlq", 1 << 20, allow=frozenset({"acme", "globex"}))
Run = Callable[[str, Registry, Limits], Outcome]


@pytest.mark.parametrize("lane", [_main, _dlq], ids=["main", "dlq"])
@pytest.mark.parametrize("tenant", ["initech", "ACME", "Acme", "acme-2"])
def test_a_tenant_not_allowed_is_refused_before_its_handler(lane: Run, tenant: str) -> None:
    registry, seen = _spy()
    out = lane(tenant, registry, ALLOW)
    assert (out.ok, out.kind, out.reason) == (False, FailureKind.PERMANENT, Reason.TENANT_REFUSED)
    assert out.error == f"tenant {tenant!r} is not in tenants.allow"
    assert out.rows == () and seen == []
    # Exhausted under its own id: operators see who was refused.
    assert out.stored.company_id == tenant
    assert out.base == "x.do"


@pytest.mark.parametrize("lane", [_main, _dlq], ids=["main", "dlq"])
def test_an_allowed_tenant_reaches_its_handler(lane: Run) -> None:
    registry, seen = _spy()
    out = lane("globex", registry, ALLOW)
    assert out.ok and [e.tenant for e in seen] == ["globex"]


@given(tenant=TENANTS, allow=st.frozensets(TENANTS, max_size=4))
def test_refused_exactly_when_a_set_allow_list_lacks_the_tenant(
    tenant: str, allow: frozenset[str]
) -> None:
    registry, _ = _spy()
    out = _main(tenant, registry, Limits("v1.dlq", 1 << 20, allow=allow))
    refused = bool(allow) and tenant not in allow
    assert (out.reason is Reason.TENANT_REFUSED) == refused
    assert (refusal(tenant, allow) is not None) == refused
    assert out.ok == (not refused)


def test_invalid_tenant_is_stored_as_the_stand_in() -> None:
    registry, seen = _spy()
    out = _main("a$b", registry, ALLOW)
    assert (out.reason, out.stored.company_id) == (Reason.INVALID_TENANT, "_invalid")
    assert seen == []


# --- rows carry their schema's tenant ------------------------------------------------


@pytest.mark.parametrize("lane", [_main, _dlq], ids=["main", "dlq"])
@pytest.mark.parametrize("company", ["globex", "ACME", 7])
def test_a_row_for_another_company_fails_its_event(lane: Run, company: object) -> None:
    registry, seen = _spy(company=company)
    out = lane("acme", registry, Limits("v1.dlq", 1 << 20))
    assert (out.ok, out.kind, out.reason) == (False, FailureKind.PERMANENT, Reason.INVALID_TENANT)
    assert "not its schema's tenant 'acme'" in out.error and out.rows == ()
    assert len(seen) == 1


@pytest.mark.parametrize("company", [None, ""], ids=["own-tenant", "no-column"])
def test_a_row_with_its_own_or_no_company_is_written(company: str | None) -> None:
    registry, _ = _spy(company=company)
    assert _main("ACME", registry, Limits("v1.dlq", 1 << 20)).ok


def test_error_types_of_the_tenant_reasons() -> None:
    assert ERROR_TYPE[Reason.TENANT_REFUSED] == "validation"
    assert ERROR_TYPE[Reason.TENANT_LIMIT] == "database"


# --- the tenants section of the config --------------------------------------------------


def test_tenant_defaults() -> None:
    t = Config().tenants
    assert (t.allow, t.allowed, t.max_new_per_hour) == ("", frozenset(), 100)
    assert env_name("tenants.allow") == "TENANTS_ALLOW"
    assert env_name("tenants.maxNewPerHour") == "TENANTS_MAXNEWPERHOUR"


@pytest.mark.parametrize(
    ("text", "allowed"),
    [
        ("acme", {"acme"}),
        ("acme,globex", {"acme", "globex"}),
        (" acme , ACME,Acme ", {"acme", "ACME", "Acme"}),
        ("   ", set()),
    ],
)
def test_allow_list_from_env(text: str, allowed: set[str]) -> None:
    assert load(None, environ={"TENANTS_ALLOW": text}).tenants.allowed == allowed


@given(tenants=st.lists(TENANTS, min_size=1, max_size=5))
def test_any_list_of_tenant_ids_round_trips(tenants: list[str]) -> None:
    cfg = load(None, environ={"TENANTS_ALLOW": ",".join(tenants)})
    assert cfg.tenants.allowed == set(tenants)


@pytest.mark.parametrize(
    ("text", "entry"),
    [
        ("acme,,globex", ""),
        (",", ""),
        ("acme,", ""),
        ("a b", "a b"),
        ("acme,ação", "ação"),
        ('acme,a";DROP SCHEMA x;--', 'a";DROP SCHEMA x;--'),
        ("_invalid", "_invalid"),
        ("x" * 58, "x" * 58),
    ],
)
def test_bad_allow_entries_are_config_errors(text: str, entry: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(None, environ={"TENANTS_ALLOW": text})
    assert (info.value.key, info.value.value) == ("tenants.allow", entry)


def test_company_id_must_be_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        load(None, environ={"TENANTS_ALLOW": "acme", "COMPANY_ID": "ACME"})
    assert info.value.key == "company.id"
    load(None, environ={"TENANTS_ALLOW": "acme", "COMPANY_ID": "acme"})


@pytest.mark.parametrize(("text", "cap"), [("0", 0), ("1", 1), ("5000", 5000)])
def test_max_new_per_hour_from_env(text: str, cap: int) -> None:
    assert load(None, environ={"TENANTS_MAXNEWPERHOUR": text}).tenants.max_new_per_hour == cap


@pytest.mark.parametrize("text", ["-1", "many", "1.5"])
def test_bad_max_new_per_hour_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(None, environ={"TENANTS_MAXNEWPERHOUR": text})
    assert info.value.key == "tenants.maxNewPerHour"
