"""Config for tests that run the supervisor's parts in-process on real servers.

The DLQ lane only, on a stream and subject of the test's own (a random
suffix: JetStream would deduplicate a repeated name's messages), with the
test handlers of `support.handlers`.
"""

from __future__ import annotations

import secrets

from dlqproc.config import Config, load


def dlq_only_config(nats_url: str, dsn: str, name: str, **settings: str) -> Config:
    """A config for `name`'s own DLQ stream; `settings` are more env-style keys."""
    n = secrets.token_hex(4)
    return load(
        None,
        environ={},
        forced={
            "NATS_URL": nats_url,
            "POSTGRES_DSN": dsn,
            "HANDLERS_MODULE": "support.handlers",
            "NATS_REALTIME_ENABLED": "false",
            "NATS_HISTORICAL_ENABLED": "false",
            "NATS_DLQSTREAM": f"dlq_{name}_{n}",
            "NATS_DLQSUBJECT": f"{name}{n}.dlq",
            **settings,
        },
    )
