"""Demo handlers: a tiny deterministic domain for `dlqproc demo` and the tests.

demo.ok      {"id": str, "text": str?}     upsert demo_events
demo.flaky   {"id": str, "fail_times": int} transient failure on the first
                                            fail_times deliveries, then upsert
demo.update  {"id": str, "text": str}      update an existing demo_events row
Anything that does not fit its shape is a permanent validation failure.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from dlqproc.model import Event, PermanentError, RowOp, TransientError


class DemoEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    id: str
    text: str = ""
    fail_times: int = 0


_decoder = msgspec.json.Decoder(DemoEvent)


def _decode(event: Event) -> DemoEvent:
    try:
        return _decoder.decode(event.payload)
    except msgspec.DecodeError as exc:
        raise PermanentError(f"invalid {event.base} payload: {exc}") from None


def _upsert(event: Event, demo: DemoEvent) -> RowOp:
    return RowOp(
        op="upsert",
        table="demo_events",
        key=("id",),
        values={"id": demo.id, "company_id": event.tenant, "text": demo.text},
    )


def handle_ok(event: Event) -> Sequence[RowOp]:
    return (_upsert(event, _decode(event)),)


def handle_flaky(event: Event) -> Sequence[RowOp]:
    demo = _decode(event)
    if event.attempt <= demo.fail_times:
        raise TransientError(f"flaky {demo.id}: failing delivery {event.attempt}")
    return (_upsert(event, demo),)


def handle_update(event: Event) -> Sequence[RowOp]:
    demo = _decode(event)
    return (
        RowOp(
            op="update", table="demo_events", key=("id",), values={"id": demo.id, "text": demo.text}
        ),
    )


HANDLERS = {
    "demo.ok": handle_ok,
    "demo.flaky": handle_flaky,
    "demo.update": handle_update,
}

TENANT_DDL = (
    """CREATE TABLE IF NOT EXISTS {schema}.demo_events (
        id text PRIMARY KEY,
        company_id text NOT NULL,
        text text NOT NULL DEFAULT '',
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )""",
)
