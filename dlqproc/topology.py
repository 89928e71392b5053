"""The JetStream streams and consumers dlqproc uses, derived from the config.

See the README (Main consumers and the DLQ; On a NATS cluster).

Pure: it only describes them; dlqproc.broker creates and reconciles them.
"""

from __future__ import annotations

from dlqproc.broker import ConsumerSpec, StreamSpec
from dlqproc.config import Config, MainConsumerConfig

REALTIME_BASES = (
    "v1.connection.update",
    "v1.chats.upsert",
    "v1.chats.update",
    "v1.messages.upsert",
    "v1.messages.update",
    "v1.contacts.upsert",
    "v1.contacts.update",
)
HISTORY_BASES = ("v1.history.chats", "v1.history.messages", "v1.history.contacts")
EVENTS_MAX_AGE_DAYS = 30.0


def dlq_stream(cfg: Config) -> StreamSpec:
    n = cfg.nats
    return StreamSpec(
        n.dlq_stream, (f"{n.dlq_subject}.>",), n.dlq_max_age_days, "limits", n.stream_replicas
    )


def dlq_consumer(cfg: Config) -> ConsumerSpec:
    n = cfg.nats
    return ConsumerSpec(
        stream=n.dlq_stream,
        durable=cfg.dlq_durable,
        filter_subjects=(cfg.dlq_filter_subject,),
        # JetStream never gives up on a DLQ message: dlqproc spends its own
        # budget (nats.dlqMaxRetries) and stores it in exhausted_events, so a
        # message whose write keeps failing while PostgreSQL is down is
        # redelivered until it can be stored, across any number of restarts.
        # nats.dlqMaxDeliver is still accepted (the old service's operators set
        # it) but no longer handed to JetStream.
        max_deliver=-1,
        ack_wait=n.dlq_ack_wait,
        max_ack_pending=n.dlq_max_ack_pending,
    )


def events_stream(main: MainConsumerConfig, historical: bool, replicas: int = 1) -> StreamSpec:
    bases = HISTORY_BASES if historical else REALTIME_BASES
    return StreamSpec(
        name=main.stream,
        subjects=tuple(f"{b}.*" for b in bases),
        max_age_days=EVENTS_MAX_AGE_DAYS,
        retention="interest" if historical else "limits",
        replicas=replicas,
    )


def events_consumer(cfg: Config, main: MainConsumerConfig, historical: bool) -> ConsumerSpec:
    bases = HISTORY_BASES if historical else REALTIME_BASES
    # One tenant's subjects, or (no filter) every subject of the stream.
    filters = tuple(f"{b}.{cfg.company.id}" for b in bases) if cfg.company.id else ()
    return ConsumerSpec(
        stream=main.stream,
        durable=cfg.durable(main),
        filter_subjects=filters,
        # JetStream never gives up on an event: dlqproc dead-letters it after
        # main.max_deliver deliveries, and keeps it if that publish fails.
        max_deliver=-1,
        ack_wait=main.ack_wait,
        max_ack_pending=main.max_ack_pending,
    )
