"""A seeded generator of realistic WhatsApp events (the old service's `cmd/tester`).

Pure: no I/O, no environment, no clock. The same seed, tenants, bases, options
and `now` give the same sequence of events, byte for byte. `dlqproc publish`
sends them to NATS (dlqproc.publish).

Events look like what the WhatsApp gateway produces: message ids such as
"3EB0" + 16 hex digits, jids "<digits>@s.whatsapp.net" (groups "<digits>@g.us"),
push names, 1-2 KB texts for realtime messages, nested `message_obj` dicts,
`key` {id, fromMe, remoteJid}, timestamps a little before `now`. Updates
(chats, messages, contacts) refer to rows generated earlier when there are
any, so that a consumer finds them.

- `invalid_rate`: that fraction of events lacks a required field of its payload
  type (valid=False); handlers reject them with PermanentError.
- `update_first_rate`: that fraction of valid v1.messages.upsert events is
  preceded by a v1.messages.update of the same message_id, the
  update-before-upsert ordering main consumers must survive. These updates are
  emitted even when v1.messages.update is not among `bases`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from dlqproc import envelope
from dlqproc.handlers.payloads import EVENT_TYPES, HISTORY_MAX

DEFAULT_NOW = 1764400000  # 2025-11-29T07:06:40Z

# Relative frequency of each subject base when several are asked for.
WEIGHTS: dict[str, float] = {
    "v1.messages.upsert": 8.0,
    "v1.messages.update": 4.0,
    "v1.chats.upsert": 2.0,
    "v1.chats.update": 2.0,
    "v1.contacts.upsert": 1.5,
    "v1.contacts.update": 1.0,
    "v1.connection.update": 0.5,
    "v1.history.chats": 0.3,
    "v1.history.messages": 0.3,
    "v1.history.contacts": 0.3,
}

_PUSH_NAMES = (
    "Ana Souza", "Budi Santoso", "Carlos", "Dewi", "Eduardo Lima", "Fatima", "Gabriel",
    "Hana", "Ivan", "Joana Reis", "Kevin", "Larissa", "Maria", "Nadia", "Omar", "Paula",
    "Rafael", "Siti Aminah", "Tiago", "Wulan",
)  # fmt: skip
_WORDS = (
    "hello", "hi", "good", "morning", "thanks", "order", "delivery", "tomorrow", "price",
    "please", "confirm", "payment", "invoice", "address", "today", "schedule", "ok",
    "sure", "product", "available", "stock", "discount", "shipping", "tracking", "number",
    "received", "call", "me", "later", "when", "can", "you", "send", "the", "details",
    "about", "my", "account", "support", "ticket", "question", "answer", "week", "store",
)  # fmt: skip
# Country calling code -> digits of the national number.
_COUNTRY_CODES = {"55": 11, "62": 11, "1": 10, "44": 10, "91": 10, "52": 10}
_CODES = tuple(_COUNTRY_CODES)
_STATUSES = ("PENDING", "SERVER_ACK", "DELIVERY_ACK", "READ", "PLAYED")
_MEDIA = ("image", "audio", "document", "video", "sticker")
_CONNECTION = ("open", "connecting", "close", "qr")
_ORIGINS = ("meta_ads", "website", "organic", "broadcast")
_TAGS = ("vip", "lead", "support", "billing", "follow-up", "new")


class GeneratedEvent(msgspec.Struct, frozen=True):
    subject: str  # "<base>.<tenant>"
    body: bytes  # the JSON payload
    base: str
    tenant: str
    valid: bool  # False: a required field was left out on purpose
    msg_id: str  # deterministic, unique per event: its Nats-Msg-Id


class _Agent(msgspec.Struct):
    agent_id: str
    phone: str
    name: str


class _Tenant(msgspec.Struct):
    """Rows generated so far for one tenant, for updates to refer to."""

    agents: list[_Agent]
    chats: list[tuple[str, str, str]]  # (chat_id, phone, agent_id)
    messages: list[str]
    contacts: list[tuple[str, str]]  # (phone_number, agent_id)


_REQUIRED: dict[str, tuple[str, ...]] = {
    base: tuple(f.encode_name for f in msgspec.structs.fields(t) if f.required)
    for base, t in EVENT_TYPES.items()
}
_encoder = msgspec.json.Encoder()
_POOL = 2000  # ids remembered per tenant and kind


class Generator:
    """Deterministic stream of events for `tenants` over subject `bases`."""

    def __init__(
        self,
        seed: int,
        tenants: Sequence[str],
        bases: Sequence[str],
        history_batch: int = 50,
        invalid_rate: float = 0.0,
        update_first_rate: float = 0.0,
        now: int = DEFAULT_NOW,
    ) -> None:
        if not tenants:
            raise ValueError("at least one tenant is needed")
        for tenant in tenants:
            if not envelope.valid_tenant(tenant):
                raise ValueError(f"invalid tenant {tenant!r}")
        if not bases:
            raise ValueError("at least one subject base is needed")
        for base in bases:
            if base not in EVENT_TYPES:
                raise ValueError(f"unknown subject base {base!r}")
        if not 1 <= history_batch <= HISTORY_MAX:
            raise ValueError(f"history_batch must be within 1..{HISTORY_MAX}")
        for name, rate in (
            ("invalid_rate", invalid_rate),
            ("update_first_rate", update_first_rate),
        ):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be within 0..1")
        self.seed = seed
        self.tenants = tuple(tenants)
        self.bases = tuple(bases)
        self.history_batch = history_batch
        self.invalid_rate = invalid_rate
        self.update_first_rate = update_first_rate
        self.now = now

    # -- public --------------------------------------------------------------

    def events(self, n: int | None = None) -> Iterator[GeneratedEvent]:
        """`n` events (endless when None). Each call starts the sequence afresh."""
        rng = random.Random(f"dlqproc-generate:{self.seed}")
        state = {t: self._tenant_state(rng, t) for t in self.tenants}
        weights = [WEIGHTS[b] for b in self.bases]
        index = 0
        while n is None or index < n:
            tenant = rng.choice(self.tenants)
            base = rng.choices(self.bases, weights)[0]
            valid = rng.random() >= self.invalid_rate
            payload = self._payload(rng, base, tenant, state[tenant], valid)
            room = n is None or index + 2 <= n
            if (
                valid
                and base == "v1.messages.upsert"
                and room
                and rng.random() < self.update_first_rate
            ):
                update = self._message_update(rng, tenant, payload["message_id"])
                yield self._event(index, "v1.messages.update", tenant, update, True)
                index += 1
            if not valid:
                payload = self._break(rng, base, payload)
            yield self._event(index, base, tenant, payload, valid)
            index += 1

    # -- building blocks -----------------------------------------------------

    def _event(
        self, index: int, base: str, tenant: str, payload: dict[str, Any], valid: bool
    ) -> GeneratedEvent:
        return GeneratedEvent(
            subject=f"{base}.{tenant}",
            body=_encoder.encode(payload),
            base=base,
            tenant=tenant,
            valid=valid,
            msg_id=f"gen-{self.seed}-{self.now}-{index}",
        )

    def _tenant_state(self, rng: random.Random, tenant: str) -> _Tenant:
        agents = [
            _Agent(
                agent_id=_uuid(rng),
                phone=_phone(rng),
                name=f"{tenant} {rng.choice(('Sales', 'Support', 'Billing', 'Ops'))} {k + 1}",
            )
            for k in range(rng.randint(1, 3))
        ]
        return _Tenant(agents=agents, chats=[], messages=[], contacts=[])

    def _break(self, rng: random.Random, base: str, payload: dict[str, Any]) -> dict[str, Any]:
        missing = rng.choice(_REQUIRED[base])
        return {k: v for k, v in payload.items() if k != missing}

    def _payload(
        self, rng: random.Random, base: str, tenant: str, st: _Tenant, valid: bool
    ) -> dict[str, Any]:
        # Invalid events are never remembered: updates must find their rows.
        remember = valid
        if base == "v1.chats.upsert":
            return self._chat(rng, tenant, st, remember, self.now - rng.randint(0, 3600))
        if base == "v1.chats.update":
            return self._chat_update(rng, tenant, st)
        if base == "v1.history.chats":
            return {
                "chats": [
                    self._chat(rng, tenant, st, remember, self._past(rng))
                    for _ in range(self.history_batch)
                ]
            }
        if base == "v1.messages.upsert":
            return self._message(rng, tenant, st, remember, realtime=True)
        if base == "v1.messages.update":
            known = st.messages
            message_id = rng.choice(known) if known else _message_id(rng)
            return self._message_update(rng, tenant, message_id)
        if base == "v1.history.messages":
            agent = rng.choice(st.agents)
            messages = [
                self._message(rng, tenant, st, remember, realtime=False, agent=agent)
                for _ in range(self.history_batch)
            ]
            for m in messages:  # the batch carries agent_id; items may leave it out
                if rng.random() < 0.5:
                    del m["agent_id"]
            return {
                "messages": messages,
                "is_last_batch": rng.random() < 0.2,
                "agent_id": agent.agent_id,
            }
        if base == "v1.contacts.upsert":
            return self._contact(rng, tenant, st, remember)
        if base == "v1.contacts.update":
            return self._contact_update(rng, tenant, st)
        if base == "v1.history.contacts":
            return {
                "contacts": [
                    self._contact(rng, tenant, st, remember) for _ in range(self.history_batch)
                ]
            }
        if base == "v1.connection.update":
            return self._connection(rng, tenant, st)
        raise AssertionError(base)  # pragma: no cover - bases are checked in __init__

    def _past(self, rng: random.Random) -> int:
        """A history timestamp: one day to ninety days before now."""
        return max(0, self.now - rng.randint(86400, 90 * 86400))

    def _chat(
        self, rng: random.Random, tenant: str, st: _Tenant, remember: bool, ts: int
    ) -> dict[str, Any]:
        agent = rng.choice(st.agents)
        is_group = rng.random() < 0.1
        phone = _phone(rng)
        jid = _group_jid(rng) if is_group else f"{phone}@s.whatsapp.net"
        chat: dict[str, Any] = {
            "chat_id": jid,
            "jid": jid,
            "company_id": tenant,
            "agent_id": agent.agent_id,
            "phone_number": phone,
            "push_name": rng.choice(_PUSH_NAMES),
            "is_group": is_group,
            "last_message": self._last_message(rng, jid, ts),
            "conversation_timestamp": ts,
            "unread_count": rng.randint(0, 12),
            "not_spam": rng.random() < 0.95,
        }
        if is_group:
            chat["group_name"] = f"{rng.choice(_WORDS).title()} {rng.choice(_WORDS)} group"
        if rng.random() < 0.2:
            chat["custom_name"] = rng.choice(_PUSH_NAMES).split()[0] + " (customer)"
        if remember:
            _keep(st.chats, (jid, phone, agent.agent_id))
        return chat

    def _chat_update(self, rng: random.Random, tenant: str, st: _Tenant) -> dict[str, Any]:
        if st.chats:
            chat_id, _, agent_id = rng.choice(st.chats)
        else:
            chat_id, agent_id = f"{_phone(rng)}@s.whatsapp.net", rng.choice(st.agents).agent_id
        ts = self.now - rng.randint(0, 600)
        return {
            "chat_id": chat_id,
            "company_id": tenant,
            "agent_id": agent_id,
            "unread_count": rng.randint(0, 20),
            "last_message": self._last_message(rng, chat_id, ts),
            "conversation_timestamp": ts,
        }

    def _last_message(self, rng: random.Random, jid: str, ts: int) -> dict[str, Any]:
        return {
            "key": {"id": _message_id(rng), "fromMe": rng.random() < 0.5, "remoteJid": jid},
            "message": {"conversation": _text(rng, 20, 120)},
            "messageTimestamp": ts,
        }

    def _message(
        self,
        rng: random.Random,
        tenant: str,
        st: _Tenant,
        remember: bool,
        realtime: bool,
        agent: _Agent | None = None,
    ) -> dict[str, Any]:
        agent = agent or rng.choice(st.agents)
        if st.chats and rng.random() < 0.7:
            chat_id, phone, _ = rng.choice(st.chats)
        else:
            phone = _phone(rng)
            chat_id = f"{phone}@s.whatsapp.net"
        message_id = _message_id(rng)
        from_me = rng.random() < 0.45
        ts = self.now - rng.randint(0, 900) if realtime else self._past(rng)
        text = _text(rng, 1024, 2048) if realtime else _text(rng, 10, 200)
        message_type = "text" if rng.random() < 0.8 else rng.choice(_MEDIA)
        key = {"id": message_id, "fromMe": from_me, "remoteJid": chat_id}
        msg: dict[str, Any] = {
            "message_id": message_id,
            "chat_id": chat_id,
            "jid": chat_id,
            "flow": "OUT" if from_me else "IN",
            "company_id": tenant,
            "agent_id": agent.agent_id,
            "from_phone": agent.phone if from_me else phone,
            "to_phone": phone if from_me else agent.phone,
            "message_type": message_type,
            "message_text": text,
            "key": key,
            "message_obj": self._message_obj(rng, message_type, text, ts),
            "status": rng.choice(_STATUSES[:3]) if from_me else "DELIVERY_ACK",
            "message_timestamp": ts,
        }
        if message_type != "text":
            msg["message_url"] = _media_url(rng)
        if rng.random() < 0.15:
            msg["campaign"] = {
                "is_campaign": True,
                "tags": rng.sample(_TAGS, rng.randint(1, 3)),
                "assigned_to": rng.choice(_PUSH_NAMES),
                "origin": rng.choice(_ORIGINS),
            }
        if remember:
            _keep(st.messages, message_id)
        return msg

    def _message_obj(
        self, rng: random.Random, message_type: str, text: str, ts: int
    ) -> dict[str, Any]:
        context = {
            "deviceListMetadata": {
                "senderKeyHash": _hex(rng, 20),
                "senderTimestamp": str(ts - rng.randint(0, 86400)),
                "recipientKeyHash": _hex(rng, 20),
            },
            "deviceListMetadataVersion": 2,
        }
        if message_type == "text":
            if rng.random() < 0.5:
                return {"conversation": text, "messageContextInfo": context}
            return {
                "extendedTextMessage": {
                    "text": text,
                    "previewType": "NONE",
                    "contextInfo": {"expiration": 0, "entryPointConversionSource": "direct"},
                },
                "messageContextInfo": context,
            }
        return {
            f"{message_type}Message": {
                "url": _media_url(rng),
                "mimetype": {
                    "image": "image/jpeg",
                    "audio": "audio/ogg; codecs=opus",
                    "document": "application/pdf",
                    "video": "video/mp4",
                    "sticker": "image/webp",
                }[message_type],
                "caption": text[:200],
                "fileSha256": _hex(rng, 32),
                "fileLength": str(rng.randint(2_000, 5_000_000)),
                "mediaKey": _hex(rng, 32),
                "mediaKeyTimestamp": str(ts),
            },
            "messageContextInfo": context,
        }

    def _message_update(self, rng: random.Random, tenant: str, message_id: str) -> dict[str, Any]:
        update: dict[str, Any] = {"message_id": message_id, "company_id": tenant}
        roll = rng.random()
        if roll < 0.75:
            update["status"] = rng.choice(_STATUSES[1:])
        elif roll < 0.9:
            update["edited_message_obj"] = {
                "editedMessage": {"conversation": _text(rng, 20, 300)},
                "timestampMs": str((self.now - rng.randint(0, 600)) * 1000),
            }
        else:
            update["is_deleted"] = True
            update["status"] = "READ"
        return update

    def _contact(
        self, rng: random.Random, tenant: str, st: _Tenant, remember: bool
    ) -> dict[str, Any]:
        agent = rng.choice(st.agents)
        phone = _phone(rng)
        if remember:
            _keep(st.contacts, (phone, agent.agent_id))
        return {
            "chat_id": f"{phone}@s.whatsapp.net",
            "phone_number": phone,
            "company_id": tenant,
            "agent_id": agent.agent_id,
            "push_name": rng.choice(_PUSH_NAMES),
        }

    def _contact_update(self, rng: random.Random, tenant: str, st: _Tenant) -> dict[str, Any]:
        if st.contacts:
            phone, agent_id = rng.choice(st.contacts)
        else:
            phone, agent_id = _phone(rng), rng.choice(st.agents).agent_id
        return {
            "phone_number": phone,
            "company_id": tenant,
            "agent_id": agent_id,
            "push_name": rng.choice(_PUSH_NAMES),
        }

    def _connection(self, rng: random.Random, tenant: str, st: _Tenant) -> dict[str, Any]:
        agent = rng.choice(st.agents)
        status = rng.choice(_CONNECTION)
        conn: dict[str, Any] = {
            "agent_id": agent.agent_id,
            "company_id": tenant,
            "status": status,
            "agent_name": agent.name,
            "host_name": f"wa-gateway-{rng.randint(0, 7)}",
            "version": f"2.3000.{rng.randint(1010000000, 1019999999)}",
            "phone_number": agent.phone,
        }
        if status == "qr":
            conn["qr_code"] = "2@" + _b64ish(rng, 180) + "," + _b64ish(rng, 44)
        return conn


def dlq_envelopes(
    events: Iterable[GeneratedEvent],
    dlq_subject: str = "v1.dlq",
    now: int = DEFAULT_NOW,
) -> Iterator[tuple[str, bytes]]:
    """Each event wrapped as the DLQ envelope a main consumer would have published.

    Invalid events are "fatal" (dead-lettered at once), valid ones "retryable"
    (dead-lettered after the consumer's max deliver). Yields
    ("<dlq_subject>.<tenant>", envelope JSON).
    """
    ts = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for ev in events:
        max_retry = 3 if ev.base.startswith("v1.history.") else 5
        try:
            msgspec.json.decode(ev.body)
            original_json: bytes | None = ev.body
        except msgspec.DecodeError:
            original_json = None
        if ev.valid:
            error = f"{ev.base}: row not found (it may arrive later)"
        else:
            error = f"invalid {ev.base} payload: Object missing required field"
        yield (
            f"{dlq_subject}.{ev.tenant}",
            envelope.build(
                source_subject=ev.subject,
                company=ev.tenant,
                original_json=original_json,
                raw=ev.body,
                error=error,
                fatal=not ev.valid,
                retry_count=1 if not ev.valid else max_retry,
                max_retry=max_retry,
                ts=ts,
            ),
        )


# -- small helpers ------------------------------------------------------------


def _keep(pool: list[Any], item: Any) -> None:
    """Remember an id, keeping the pool bounded (oldest forgotten first)."""
    pool.append(item)
    if len(pool) > _POOL:
        del pool[: len(pool) - _POOL]


def _hex(rng: random.Random, nbytes: int) -> str:
    return rng.getrandbits(nbytes * 8).to_bytes(nbytes, "big").hex().upper()


def _message_id(rng: random.Random) -> str:
    return "3EB0" + _hex(rng, 8)


def _uuid(rng: random.Random) -> str:
    h = _hex(rng, 16).lower()
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}"


def _phone(rng: random.Random) -> str:
    code = rng.choice(_CODES)
    digits = _COUNTRY_CODES[code]
    return code + str(rng.randint(2 * 10 ** (digits - 1), 10**digits - 1))


def _group_jid(rng: random.Random) -> str:
    return f"120363{rng.randint(10**11, 10**12 - 1)}@g.us"


def _build_corpus() -> tuple[str, list[int]]:
    """A fixed text of random words (the same on every run), and where its words start."""
    text = " ".join(random.Random("dlqproc-corpus").choices(_WORDS, k=20_000))
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == " "]
    return text, starts


_CORPUS, _WORD_STARTS = _build_corpus()
_TEXT_MAX = 16384


def _text(rng: random.Random, low: int, high: int) -> str:
    """A sentence of whole words (a slice of the corpus), of a length within [low, high]."""
    target = rng.randint(low, high - 1)
    start = _WORD_STARTS[rng.randrange(len(_WORD_STARTS) - _TEXT_MAX // 4)]
    cut = _CORPUS.rfind(" ", start, start + target)
    text = _CORPUS[start:cut] if cut - start >= low else _CORPUS[start : start + target]
    return text[:1].upper() + text[1:] + "."


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64ish(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(_B64, k=n))


def _media_url(rng: random.Random) -> str:
    return f"https://mmg.whatsapp.net/v/t62.7118-24/{rng.randint(10**7, 10**8)}_{_hex(rng, 8)}.enc"
