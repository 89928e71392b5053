"""dlqproc.broker's own parsing of JetStream reply subjects, against nats-py's."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from nats.aio.msg import Msg

from dlqproc.broker import ack_fields

token = st.text(
    st.characters(blacklist_characters=". *>", blacklist_categories=("Cs", "Cc", "Zs")),
    min_size=1,
    max_size=20,
)
count = st.integers(0, 2**63 - 1)


@given(token, token, count, count, count, count, count)
def test_v1_reply_subjects_parse_as_nats_py_parses_them(
    stream: str, consumer: str, delivered: int, sseq: int, cseq: int, ts: int, pending: int
) -> None:
    reply = f"$JS.ACK.{stream}.{consumer}.{delivered}.{sseq}.{cseq}.{ts}.{pending}"
    meta = Msg.Metadata._from_reply(reply)
    assert ack_fields(reply) == (
        meta.stream,
        meta.consumer,
        meta.num_delivered,
        meta.sequence.stream,
        meta.sequence.consumer,
    )


@given(token, token, token, token, count, count, count, count, count, st.booleans())
def test_v2_reply_subjects_parse_as_nats_py_parses_them(
    domain: str,
    account: str,
    stream: str,
    consumer: str,
    delivered: int,
    sseq: int,
    cseq: int,
    ts: int,
    pending: int,
    trailer: bool,
) -> None:
    reply = (
        f"$JS.ACK.{domain}.{account}.{stream}.{consumer}.{delivered}.{sseq}.{cseq}.{ts}.{pending}"
        + (".r4nd0m" if trailer else "")
    )
    meta = Msg.Metadata._from_reply(reply)
    assert ack_fields(reply) == (
        meta.stream,
        meta.consumer,
        meta.num_delivered,
        meta.sequence.stream,
        meta.sequence.consumer,
    )


@given(st.text(max_size=80))
def test_anything_else_is_left_to_nats_py(reply: str) -> None:
    fields = ack_fields(reply)
    if fields is not None:
        assert reply.startswith("$JS.ACK.")
        assert len(reply.split(".")) == 9 or len(reply.split(".")) >= 11


def test_malformed_numbers_are_not_guessed() -> None:
    assert ack_fields("$JS.ACK.s.c.x.1.2.3.4") is None
    assert ack_fields("$JS.ACK.s.c.1.2.3") is None
    assert ack_fields("_INBOX.abc") is None
