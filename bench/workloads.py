"""The benchmark's workloads: deterministic event sets from dlqproc.generate.

A workload yields the items to publish for one path:

- path "dlq": DLQ envelopes on ``<dlq_subject>.<tenant>`` (what the DLQ worker reads);
- path "main": the events themselves on ``<base>.<tenant>`` (what the main
  consumers read), with a ``Nats-Msg-Id`` header as the gateway would set.

The same seed gives the same bytes on every run, so repeats and the baselines
see exactly the same input.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from dlqproc.demo import TENANTS
from dlqproc.generate import GeneratedEvent, Generator, dlq_envelopes
from dlqproc.publish import Item
from dlqproc.topology import HISTORY_BASES, REALTIME_BASES

__all__ = ["TENANTS", "WORKLOADS", "Item", "iter_sizes"]


# Upserts only: every event succeeds at its first delivery (no update that may
# overtake the upsert it refers to), so "light" measures the happy path.
LIGHT_BASES = (
    "v1.messages.upsert",
    "v1.chats.upsert",
    "v1.contacts.upsert",
    "v1.connection.update",
)
# History batches of 200..500 items: the CPU-heavy case (decode + validate + rows).
HEAVY_BATCHES = (200, 275, 350, 425, 500)


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    # Fraction of --messages this workload publishes (heavy events carry
    # hundreds of rows each, so fewer of them make a run of similar length).
    scale: float = 1.0
    minimum: int = 1

    def count(self, messages: int) -> int:
        return max(self.minimum, round(messages * self.scale))

    def events(self, n: int, seed: int) -> list[GeneratedEvent]:
        if self.name == "light":
            return list(Generator(seed, TENANTS, LIGHT_BASES).events(n))
        if self.name == "heavy":
            gens = [
                Generator(seed * 100 + i, TENANTS, HISTORY_BASES, history_batch=b).events()
                for i, b in enumerate(HEAVY_BATCHES)
            ]
            return [next(g) for g in itertools.islice(itertools.cycle(gens), n)]
        if self.name == "mixed":
            gen = Generator(
                seed,
                TENANTS,
                REALTIME_BASES + HISTORY_BASES,
                history_batch=50,
                invalid_rate=0.05,
                update_first_rate=0.1,
            )
            return list(gen.events(n))
        raise ValueError(f"unknown workload {self.name!r}")

    def items(self, path: str, n: int, seed: int, dlq_subject: str) -> list[Item]:
        events = self.events(n, seed)
        if path == "dlq":
            return [
                (
                    subject,
                    body,
                    {"Nats-Msg-Id": f"dlq-{ev.msg_id}", "Original-Nats-Msg-Id": ev.msg_id},
                )
                for ev, (subject, body) in zip(
                    events, dlq_envelopes(events, dlq_subject), strict=True
                )
            ]
        if path == "main":
            return [(ev.subject, ev.body, {"Nats-Msg-Id": ev.msg_id}) for ev in events]
        raise ValueError(f"unknown path {path!r}")


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "light",
            "realtime upserts (messages, chats, contacts, agents); message bodies 1-5 KB,"
            " no failures",
        ),
        Workload(
            "heavy",
            "history chats/messages/contacts batches of 200-500 items (CPU-heavy);"
            " 1/20 of --messages",
            scale=0.05,
        ),
        Workload(
            "mixed",
            "every subject at the generator's realistic weights, history batches of 50,"
            " 5% invalid, 10% update-before-upsert (retries and exhausted events)",
        ),
    )
}
PATHS = ("dlq", "main")


def iter_sizes(items: list[Item]) -> Iterator[int]:
    return (len(body) for _, body, _ in items)
