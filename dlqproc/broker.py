"""NATS JetStream: the connection, the DLQ topology, fetching and settling messages.

The only module that imports nats. The rest of dlqproc sees Inbound messages
with plain attributes and four settle calls (ack, nak with a delay, term,
in_progress).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import ParseResult

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import NotFoundError

log = logging.getLogger("dlqproc.broker")

DAY = 86400.0
RECONNECT_WAIT = 0.5  # seconds between attempts on one server, at start-up and after


class StreamSpec(msgspec.Struct, frozen=True):
    name: str
    subjects: tuple[str, ...]
    max_age_days: float
    retention: str = "limits"  # or "interest"
    # For a stream dlqproc creates; an existing stream is only ever raised to it.
    replicas: int = 1


class ConsumerSpec(msgspec.Struct, frozen=True):
    """A durable pull consumer with explicit acks."""

    stream: str
    durable: str
    filter_subjects: tuple[str, ...]
    max_deliver: int  # -1: JetStream redelivers without limit
    ack_wait: float
    max_ack_pending: int


def ack_fields(reply: str) -> tuple[str, str, int, int, int] | None:
    """(stream, consumer, delivered count, stream seq, consumer seq) of a JetStream reply subject.

    "$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>", or
    the form with "<domain>.<account hash>" after "$JS.ACK" and a trailing
    token. nats-py's Msg.metadata parses the same, plus a timestamp we do not
    need, at several times the cost per message.
    """
    tokens = reply.split(".")
    if len(tokens) == 9:
        at = 2
    elif len(tokens) >= 11:
        at = 4
    else:
        return None
    if tokens[0] != "$JS" or tokens[1] != "ACK":
        return None
    try:
        return (
            tokens[at],
            tokens[at + 1],
            int(tokens[at + 2]),
            int(tokens[at + 3]),
            int(tokens[at + 4]),
        )
    except ValueError:
        return None


# Characters of a message's Nats-Msg-Id kept (ids are UUID-sized). It is
# copied into every row of the event (last_metadata) and into the DLQ message's
# headers, so an id as long as the message would multiply its size.
MAX_HEADER_CHARS = 256


def header_text(value: str) -> str:
    """A producer's header value as dlqproc may copy it: bounded, no NUL.

    PostgreSQL's jsonb refuses a NUL, which would fail every row of a good
    event for its header; escaped as jsonb would print it.
    """
    return value[:MAX_HEADER_CHARS].replace("\x00", "\\u0000")


class Inbound:
    """One fetched DLQ message and the JetStream metadata dlqproc needs."""

    __slots__ = (
        "_msg",
        "consumer",
        "consumer_seq",
        "data",
        "msg_id",
        "num_delivered",
        "stream",
        "stream_seq",
        "subject",
        "touched",
    )

    def __init__(self, msg: Msg) -> None:
        self._msg = msg
        self.subject: str = msg.subject
        self.data: bytes = msg.data
        fields = ack_fields(msg.reply)
        if fields is None:  # a reply subject of a form we do not know: nats-py's parser
            meta = msg.metadata
            fields = (
                meta.stream,
                meta.consumer,
                meta.num_delivered,
                meta.sequence.stream,
                meta.sequence.consumer,
            )
        self.stream, self.consumer, self.num_delivered, self.stream_seq, self.consumer_seq = fields
        self.msg_id: str = header_text((msg.headers or {}).get("Nats-Msg-Id", ""))
        # When JetStream last heard from us about it (fetch or in-progress),
        # which restarts its ack-wait clock.
        self.touched = time.monotonic()

    async def ack(self) -> None:
        await self._msg.ack()

    async def nak(self, delay: float) -> None:
        await self._msg.nak(delay=delay)

    async def term(self) -> None:
        await self._msg.term()

    async def in_progress(self) -> None:
        await self._msg.in_progress()
        self.touched = time.monotonic()


class FetchFailed(Exception):
    """JetStream answered a pull request with an error (e.g. the consumer is gone)."""


class Puller:
    """Fetches from one durable pull consumer with JetStream pull requests.

    nats-py's fetch() waits for every message with a timer task of its own;
    at thousands of messages a second that was most of the supervisor's fetch
    cost. Here a subscription callback collects what requests deliver, and
    the end of the current one (its batch filled, its first message for a long
    poll, or a status message) wakes the fetch once.

    At most one request is open on the server per puller: a long poll that
    returned with its first message stays open until it is filled, answered
    with a status or expires (`timeout`, short), and the next fetch waits on
    it instead of sending another. Replicas on one durable then each hold one
    request sized to their free room, so JetStream shares the messages out in
    proportion to it; and a request sent to a leader that died is given up
    after `timeout` plus a small margin. What arrives while no fetch waits is
    kept for the next (never more than the open request asked for).
    """

    MARGIN = 0.25  # seconds past a request's expiry before it counts as lost
    # Seconds after NATS elected a leader for the consumer during which a
    # failed fetch is retried after a short pause only.
    AFTER_ELECTION = 1.0
    SHORT_PAUSE = 0.05

    def __init__(self, nc: Client, spec: ConsumerSpec) -> None:
        self._nc = nc
        self.spec = spec
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{spec.stream}.{spec.durable}"
        self._inbox = nc.new_inbox()
        self._requests = 0
        self._current = ""  # reply subject of the request a fetch waits for
        self._want = 0
        self._first_wakes = False  # a long poll returns with its first message
        self._wake: asyncio.Future[None] | None = None
        self._error: FetchFailed | None = None
        self._got: list[Inbound] = []
        # The long poll still open on the server: its reply subject, the
        # messages it may still deliver, and when it is over at the latest.
        self._open = ""
        self._open_left = 0
        self._open_until = 0.0
        # The last request ended at a message larger than its byte limit.
        self.size_limited = False
        # When JetStream last announced a new leader for the consumer or its
        # stream, and the backoff waiting for one.
        self._elected_at = float("-inf")
        self._election: asyncio.Future[None] | None = None

    async def subscribe(self) -> None:
        await self._nc.subscribe(self._inbox + ".*", cb=self._on_message)
        # JetStream's advisories, so that failover waits on no timer of ours.
        # Without permission for them, the timers alone (at most 1 s more).
        advisories = "$JS.EVENT.ADVISORY"
        stream, durable = self.spec.stream, self.spec.durable
        await self._nc.subscribe(
            f"{advisories}.CONSUMER.LEADER_ELECTED.{stream}.{durable}", cb=self._on_consumer_leader
        )
        await self._nc.subscribe(
            f"{advisories}.STREAM.LEADER_ELECTED.{stream}", cb=self._on_stream_leader
        )

    async def _on_consumer_leader(self, msg: Msg) -> None:
        """Requests went unanswered (503) while the consumer had no leader: retry now."""
        self._elected_at = time.monotonic()
        self._wake_backoff()

    async def _on_stream_leader(self, msg: Msg) -> None:
        """A consumer that kept its leader delivers nothing while its stream has
        none, and need not serve the long poll left open then: give that
        request up (what it still delivers is kept) and send a new one now."""
        self._open = ""
        if self._current and self._first_wakes:
            self._end()
        self._wake_backoff()

    def _wake_backoff(self) -> None:
        if self._election is not None and not self._election.done():
            self._election.set_result(None)

    async def backoff(self, seconds: float, stop: asyncio.Event) -> None:
        """The pause after a failed fetch: `seconds`, or less.

        It ends when `stop` is set or when JetStream announces a new leader
        for the consumer or its stream; within AFTER_ELECTION seconds of the
        consumer's it is SHORT_PAUSE at most, since the new leader may take a
        moment to answer and a long pause then would be the failover's delay.
        """
        if time.monotonic() - self._elected_at < self.AFTER_ELECTION:
            seconds = min(seconds, self.SHORT_PAUSE)
        election = self._election = asyncio.get_running_loop().create_future()
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait(
                {election, stopped}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopped.cancel()
            self._election = None

    @property
    def open_request(self) -> bool:
        """A long poll of this puller may still deliver messages."""
        return bool(self._open) and time.monotonic() < self._open_until

    def drain(self) -> list[Inbound]:
        """Messages delivered but not yet fetched (to hand back at shutdown)."""
        got, self._got = self._got, []
        return got

    async def fetch(self, batch: int, timeout: float, max_bytes: int = 0) -> list[Inbound]:
        """Up to `batch` messages of at most `max_bytes` in all (0: no byte limit).

        An empty list when none arrived within `timeout`, or when the next
        message alone exceeds `max_bytes`: JetStream then ends the request and
        `size_limited` is set. Raises FetchFailed when JetStream refuses the
        request.
        """
        self.size_limited = False
        if not self._got:
            if self.open_request:
                # Wait on the request already open rather than add another.
                await self._wait(self._open, self._open_until - time.monotonic(), True)
            else:
                # What is there now, at once; then, if nothing, wait for the first.
                # A request nobody answered (a leader that just died) is not
                # followed by a long poll that would be waited out as well.
                answered = await self._request(batch, timeout, max_bytes, long_poll=False)
                if answered and not self._got and not self.size_limited:
                    await self._request(batch, timeout, max_bytes, long_poll=True)
        got, self._got = self._got[:batch], self._got[batch:]
        return got

    async def _request(self, batch: int, timeout: float, max_bytes: int, long_poll: bool) -> bool:
        """One pull request; returns once it has ended (a long poll: or delivered).

        False when nothing at all answered it in time.
        """
        body: dict[str, object] = {"batch": batch}
        if max_bytes > 0:
            # JetStream stops before the message that would pass the limit.
            body["max_bytes"] = max_bytes
        if long_poll:
            body["expires"] = int(timeout * 1e9)
        else:
            body["no_wait"] = True
        self._requests += 1
        reply = f"{self._inbox}.{self._requests}"
        if long_poll:
            self._open, self._open_left = reply, batch
            self._open_until = time.monotonic() + timeout + self.MARGIN
        self._want = batch
        await self._nc.publish(self._next, msgspec.json.encode(body), reply=reply)
        return await self._wait(reply, timeout + self.MARGIN, long_poll)

    async def _wait(self, reply: str, timeout: float, first_wakes: bool) -> bool:
        self._current = reply
        self._first_wakes = first_wakes
        self._error = None
        wake = self._wake = asyncio.get_running_loop().create_future()
        try:
            # JetStream ends an expiring request itself; the margin covers the trip.
            await asyncio.wait_for(wake, max(timeout, 0.0))
        except TimeoutError:
            return False
        finally:
            self._current = ""
        if self._error is not None:
            self._open = ""
            raise self._error
        return True

    async def _on_message(self, msg: Msg) -> None:
        # A delivered message always has its ack subject as reply; JetStream's
        # status replies (heartbeats, 404, 409...) never have one. Their Status
        # header is no sign: a producer may set a header of that name too.
        if msg.reply:
            # Received now: its ack-wait clock runs from here, fetched or not.
            self._got.append(Inbound(msg))
            if self._open:
                self._open_left -= 1
                if self._open_left <= 0:
                    self._open = ""  # filled: JetStream has closed it
            if self._current and (self._first_wakes or len(self._got) >= self._want):
                self._end()
            return
        status = (msg.headers or {}).get("Status")
        if status is None or status == "100":  # not JetStream's, or a heartbeat
            return
        if msg.subject == self._open:
            self._open = ""  # whatever the status, that request is over
        if msg.subject != self._current:  # stale
            return
        # 404 no messages, 408 expired, 409 too many waiting requests or the
        # next message is over the byte limit: the request is simply over.
        # Anything else is an error: 503 when no consumer answers (it or its
        # stream was deleted, or its leader is gone), other 409s for a deleted
        # consumer or limits the request breaks.
        description = (msg.headers or {}).get("Description", "")
        if status == "409" and description.startswith("Message Size Exceeds MaxBytes"):
            self.size_limited = True
        over = (
            status in ("404", "408")
            or self.size_limited
            or (
                status == "409"
                # The request filled (newer servers say so), or too many wait.
                and description.startswith(("Exceeded MaxWaiting", "Batch Completed"))
            )
        )
        if not over:
            self._error = FetchFailed(f"{status} {description}".strip())
        self._end()

    def _end(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)


def _stream_config(want: StreamSpec) -> api.StreamConfig:
    return api.StreamConfig(
        name=want.name,
        subjects=list(want.subjects),
        retention=(
            api.RetentionPolicy.INTEREST
            if want.retention == "interest"
            else api.RetentionPolicy.LIMITS
        ),
        storage=api.StorageType.FILE,
        max_age=want.max_age_days * DAY,
        num_replicas=want.replicas,
    )


Change = tuple[str, object, object]  # setting, have, want (the server's JSON values)


def plan_stream(
    have: dict[str, Any], want: StreamSpec
) -> tuple[list[Change], list[tuple[str, object, object, str]]]:
    """(settings to raise, differences to leave alone with why) for an existing stream.

    Pure. Values are in the server's JSON form: max_age in nanoseconds, 0 for
    no limit.
    """
    raised: list[Change] = []
    kept: list[tuple[str, object, object, str]] = []
    subjects = list(have.get("subjects") or [])
    missing = [s for s in want.subjects if s not in subjects]
    if missing:
        raised.append(("subjects", subjects, subjects + missing))
    extra = [s for s in subjects if s not in want.subjects]
    if extra:
        kept.append(("subjects", subjects, list(want.subjects), "also binds other subjects"))
    have_age = int(have.get("max_age") or 0)
    want_age = int(want.max_age_days * DAY * 1e9)
    if have_age != 0 and abs(have_age - want_age) > 1e9:
        if want_age > have_age:
            raised.append(("max_age", have_age, want_age))
        else:
            kept.append(("max_age", have_age, want_age, "lowering it would drop messages"))
    elif have_age == 0 and want_age != 0:
        kept.append(("max_age", 0, want_age, "no age limit; a limit would drop messages"))
    have_replicas = int(have.get("num_replicas") or 1)
    if want.replicas > have_replicas:
        raised.append(("num_replicas", have_replicas, want.replicas))
    elif want.replicas < have_replicas:
        kept.append(("num_replicas", have_replicas, want.replicas, "never lowered"))
    for setting, wanted in (("retention", want.retention), ("storage", "file")):
        if have.get(setting, wanted) != wanted:
            kept.append((setting, have.get(setting), wanted, "JetStream cannot change it"))
    return raised, kept


def _show(value: object) -> str:
    """A stream setting for a log line: max ages in seconds."""
    if isinstance(value, int) and value >= 10**9:
        return f"{value / 1e9:g}s"
    return str(value)


class ApiError(Exception):
    """A JetStream API request failed or was refused."""


class PublishFailed(Exception):
    """JetStream did not acknowledge a publish."""


class PublishRejected(PublishFailed):
    """JetStream answered the publish with an error: sending it again cannot help."""


# nats-server's default max_payload, when the server did not say.
_DEFAULT_MAX_PAYLOAD = 1024 * 1024
# The header block's first line and its closing blank line, as nats-py writes them.
_HEADER_FRAME = len(b"NATS/1.0\r\n\r\n")


def header_bytes(headers: Mapping[str, str] | None) -> int:
    """At most the bytes `headers` take on the wire: NATS counts them into max_payload."""
    if not headers:
        return 0
    return _HEADER_FRAME + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def oversized(data: bytes, headers: Mapping[str, str] | None, max_payload: int) -> str | None:
    """Why NATS would refuse this message, or None.

    nats-py checks the body alone against max_payload; a message whose headers
    take it past the limit is sent, and the server closes the connection.
    """
    size = len(data) + header_bytes(headers)
    if size <= max_payload:
        return None
    return f"message of {size} bytes with its headers exceeds NATS max_payload {max_payload}"


class PubResult(msgspec.Struct, frozen=True):
    """A publish JetStream acknowledged; `duplicate` when its Nats-Msg-Id was already stored."""

    stream: str
    seq: int
    duplicate: bool


class AckedPublisher:
    """Publishes that each wait for their PubAck, without a request object each.

    One subscription receives every PubAck on `<inbox>.<n>`; a publish is a
    plain PUB with that reply subject and a future. nats-py's js.publish pays
    for a request (its own future, timer and response parsing into a
    dataclass) per message, which bounded bulk replays at about a thousand a
    second here.
    """

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._inbox = nc.new_inbox()
        self._n = 0
        self._waiting: dict[str, asyncio.Future[PubResult]] = {}
        self._subscribed = False

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str], timeout: float = 5.0
    ) -> PubResult:
        """Publish and wait for the PubAck, saying whether JetStream deduplicated it.

        PublishRejected when JetStream refused the message (its error answer);
        PublishFailed for no answer in time, no responders or no connection,
        which an outage explains and a retry of the same message may cure.
        """
        too_big = oversized(data, headers, self._nc.max_payload or _DEFAULT_MAX_PAYLOAD)
        if too_big is not None:
            raise PublishRejected(too_big)
        if not self._subscribed:
            await self._nc.subscribe(self._inbox + ".*", cb=self._on_reply)
            self._subscribed = True
        self._n += 1
        reply = f"{self._inbox}.{self._n}"
        future: asyncio.Future[PubResult] = asyncio.get_running_loop().create_future()
        self._waiting[reply] = future
        try:
            await self._nc.publish(subject, data, reply=reply, headers=headers)
            return await asyncio.wait_for(future, timeout)
        except (PublishFailed, PublishRejected):
            raise
        except TimeoutError:
            raise PublishFailed(f"no PubAck within {timeout:g} s") from None
        except Exception as exc:
            raise PublishFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._waiting.pop(reply, None)

    async def _on_reply(self, msg: Msg) -> None:
        future = self._waiting.get(msg.subject)
        if future is None or future.done():
            return
        status = msg.headers.get("Status") if msg.headers else None
        if status == "503":
            future.set_exception(PublishFailed("no responders: no stream took the message"))
            return
        try:
            answer = msgspec.json.decode(msg.data)
        except msgspec.DecodeError:
            future.set_exception(PublishFailed(f"unreadable PubAck {msg.data[:200]!r}"))
            return
        error = answer.get("error") if isinstance(answer, dict) else None
        if error or not isinstance(answer, dict):
            future.set_exception(PublishRejected(f"JetStream refused the message: {error}"))
            return
        future.set_result(
            PubResult(
                str(answer.get("stream")),
                int(answer.get("seq") or 0),
                bool(answer.get("duplicate")),
            )
        )


def _utf8(token: bytes) -> bytes:
    """`token` when it is UTF-8, else the same with U+FFFD for each bad byte."""
    if token.isascii():
        return token
    return token.decode("utf-8", "replace").encode()


class _Client(Client):
    """nats-py's client, reading a subject that is not UTF-8 instead of dying on it.

    nats-server takes any bytes but whitespace in a subject (a Go producer may
    send Latin-1); nats-py decodes a delivered one strictly inside its read
    loop, whose task then ends: the connection stays up but deaf until its
    pings time out, and the message comes back after every ack wait. With the
    bad bytes replaced, the subject names no valid tenant, so the message is
    exhausted (or dead-lettered) as invalid_tenant like any other.
    """

    def _build_message(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any
    ) -> Msg:
        msg: Msg = super()._build_message(sid, _utf8(subject), _utf8(reply), data, headers)
        return msg


class ConnectFailed(ConnectionError):
    """No NATS server accepted the connection within the time allowed."""


class ConnectRefused(ConnectFailed):
    """A NATS server refused the credentials (or their absence): retrying cannot help."""


def server_list(url: str) -> list[str]:
    """The servers of a comma-separated nats.url, as Broker.connect hands them to nats-py."""
    return [u.strip() for u in url.split(",")]


def parse_server(server: str) -> ParseResult | None:
    """One server as nats-py itself reads it (scheme and port defaults, userinfo), or
    None when nats-py refuses it. Redaction uses this, so that what it hides is
    exactly what the client would send as user, password or token."""
    try:
        return Client._parse_server_uri(server)
    except Exception:
        return None


def _refusal(exc: Exception) -> bool:
    """Whether a connect error is the server refusing the credentials.

    nats-py raises a plain Error("nats: 'Authorization Violation'") for it on the
    first connection (its AuthorizationError only once connected); the server
    also ends a connection with 'Authentication Timeout' or an expired or
    revoked user. None of them heals by reconnecting.
    """
    text = str(exc).lower()
    return type(exc).__name__ == "AuthorizationError" or any(
        word in text for word in ("authorization violation", "authentication")
    )


class Credentials(Protocol):
    """NATS credentials and TLS files (config's nats section has them)."""

    @property
    def user(self) -> str: ...
    @property
    def password(self) -> str: ...
    @property
    def token(self) -> str: ...
    @property
    def nkey_seed_file(self) -> str: ...
    @property
    def creds_file(self) -> str: ...
    @property
    def tls_ca_file(self) -> str: ...
    @property
    def tls_cert_file(self) -> str: ...
    @property
    def tls_key_file(self) -> str: ...


def connect_options(creds: Credentials | None) -> dict[str, Any]:
    """nats-py's connect arguments for `creds` (the files are read by nats-py itself).

    With a CA or a client certificate the connection uses TLS whenever the
    server asks for it (a tls:// URL asks too); without them a tls:// URL
    verifies the server by the system's CAs.
    """
    if creds is None:
        return {}
    options: dict[str, Any] = {}
    if creds.user:
        options.update(user=creds.user, password=creds.password)
    if creds.token:
        options["token"] = creds.token
    if creds.nkey_seed_file:
        options["nkeys_seed"] = creds.nkey_seed_file
    if creds.creds_file:
        options["user_credentials"] = creds.creds_file
    if creds.tls_ca_file or creds.tls_cert_file:
        context = ssl.create_default_context(cafile=creds.tls_ca_file or None)
        if creds.tls_cert_file:
            context.load_cert_chain(creds.tls_cert_file, creds.tls_key_file)
        options["tls"] = context
    return options


class Broker:
    """Owns the NATS connection, the streams and consumers dlqproc uses."""

    def __init__(self, nc: Client, state: dict[str, bool], api_timeout: float = 5.0) -> None:
        self._nc = nc
        # Short: a request to a JetStream leader that just died is given up
        # soon, and retried, rather than waited out (nats-py's default is 5 s).
        self.api_timeout = api_timeout
        self._js = nc.jetstream(timeout=api_timeout)
        self._state = state  # shared with the connection callbacks

    @classmethod
    async def connect(
        cls,
        url: str,
        name: str = "dlqproc",
        timeout: float = 30.0,
        api_timeout: float = 5.0,
        credentials: Credentials | None = None,
    ) -> Broker:
        """Connect to the first server of `url` that accepts; keep reconnecting once connected.

        Raises ConnectRefused as soon as a server refuses the credentials (nats-py
        alone would retry them forever), and ConnectFailed naming the last error
        when nothing accepted within `timeout` seconds.
        """
        state = {"closing": False}
        options = connect_options(credentials)  # a bad TLS file fails here, at once
        deadline = time.monotonic() + timeout
        nc = _Client()
        refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        last_error = ""

        async def on_disconnect() -> None:
            if not state["closing"]:
                log.warning("NATS disconnected")

        async def on_reconnect() -> None:
            log.info("NATS reconnected")

        async def on_error(exc: Exception) -> None:
            nonlocal last_error
            last_error = str(exc) or type(exc).__name__
            if not refused.done() and _refusal(exc):
                refused.set_result(last_error)
            elif not connecting.done():
                # Not up yet (e.g. started beside it): say that it is waited for, and how long.
                log.warning(
                    "NATS not reachable yet, retrying",
                    extra={
                        "error": last_error,
                        "retry_in": RECONNECT_WAIT,
                        "gives_up_in": round(max(0.0, deadline - time.monotonic()), 1),
                    },
                )
                return
            log.warning("NATS error", extra={"error": last_error})

        connecting = asyncio.ensure_future(
            nc.connect(
                servers=server_list(url),
                name=name,
                max_reconnect_attempts=-1,
                # nats-py annotates it int; it takes seconds as a float.
                reconnect_time_wait=RECONNECT_WAIT,  # type: ignore[arg-type]
                connect_timeout=5,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                error_cb=on_error,
                **options,
            )
        )
        try:
            either: set[asyncio.Future[Any]] = {connecting, refused}
            await asyncio.wait(either, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not connecting.done():
                # Refused, timed out, or this task cancelled: stop nats-py's retry loop.
                connecting.cancel()
                await asyncio.gather(connecting, return_exceptions=True)
                await nc.close()
        if not connecting.cancelled() and connecting.exception() is None:
            return cls(nc, state, api_timeout)
        if refused.done():
            raise ConnectRefused(f"NATS refused the credentials: {refused.result()}")
        if not connecting.cancelled() and (exc := connecting.exception()) is not None:
            raise ConnectFailed(f"NATS connect failed: {exc or type(exc).__name__}") from exc
        raise ConnectFailed(
            f"no NATS server accepted a connection within {timeout:g} s"
            + (f" (last error: {last_error})" if last_error else "")
        )

    @property
    def max_payload(self) -> int:
        """The largest message the server accepts (1 MiB unless configured)."""
        return int(self._nc.max_payload or _DEFAULT_MAX_PAYLOAD)

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected)

    async def ensure_stream(self, want: StreamSpec, reconcile: bool) -> list[str]:
        """Create the stream if missing; with `reconcile`, raise what dlqproc needs of it.

        Only what dlqproc sets is looked at (subjects, max age, replicas) and
        only ever raised: subjects it needs are added, a shorter max age or
        fewer replicas are raised. Nothing is lowered and nothing else is
        touched (limits, duplicate window, description...): the update sends
        the stream's own configuration back with just those changes. Every
        difference left alone is logged as a warning, one line each.
        """
        try:
            have = await self._stream_config(want.name)
        except NotFoundError:
            await self._js.add_stream(_stream_config(want))
            return [f"created stream {want.name}"]
        raised, kept = plan_stream(have, want)
        if not reconcile:
            # Another service owns this stream: report, never change it.
            kept = [(f, old, new, "not dlqproc's stream") for f, old, new in raised] + kept
            raised = []
        for setting, old, new, why in kept:
            log.warning(
                "NATS stream setting left as is",
                extra={
                    "stream": want.name,
                    "setting": setting,
                    "have": old,
                    "want": new,
                    "why": why,
                },
            )
        if not raised:
            return []
        update = dict(have)
        for setting, _, new in raised:
            update[setting] = new
        await self._api(f"STREAM.UPDATE.{want.name}", update)
        return [
            f"updated stream {want.name}: "
            + ", ".join(f"{setting} {_show(old)} -> {_show(new)}" for setting, old, new in raised)
        ]

    async def _stream_config(self, name: str) -> dict[str, Any]:
        """The stream's configuration as the server keeps it, every field included."""
        info = await self._api(f"STREAM.INFO.{name}", None)
        config: dict[str, Any] = info["config"]
        return config

    async def _api(self, subject: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """One JetStream API request with raw JSON, so no field is lost on the way.

        nats-py's typed StreamConfig drops fields it does not know; an update
        built from it would reset them.
        """
        payload = b"" if body is None else msgspec.json.encode(body)
        try:
            reply = await self._nc.request(f"$JS.API.{subject}", payload, timeout=self.api_timeout)
        except Exception as exc:
            raise ApiError(f"{subject}: {type(exc).__name__}: {exc}") from exc
        answer: dict[str, Any] = msgspec.json.decode(reply.data)
        error = answer.get("error")
        if error:
            if error.get("err_code") == 10059:  # stream not found
                raise NotFoundError(code=error.get("code"), err_code=10059)
            raise ApiError(f"{subject}: {error.get('code')} {error.get('description')}")
        return answer

    async def ensure_consumer(self, want: ConsumerSpec) -> list[str]:
        """Create or reconcile a durable pull consumer; return what changed."""
        filters = list(want.filter_subjects)
        config = api.ConsumerConfig(
            name=want.durable,
            durable_name=want.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            filter_subject=filters[0] if len(filters) == 1 else None,
            filter_subjects=filters if len(filters) > 1 else None,
            max_deliver=want.max_deliver,
            ack_wait=want.ack_wait,
            max_ack_pending=want.max_ack_pending,
        )
        try:
            info = await self._js.consumer_info(want.stream, want.durable)
        except NotFoundError:
            await self._js.add_consumer(want.stream, config)
            return [f"created consumer {want.durable}"]
        have = info.config
        have_filters = (
            [have.filter_subject] if have.filter_subject else (have.filter_subjects or [])
        )
        diffs = [
            f"{field} {old} -> {new}"
            for field, old, new in (
                ("filter_subjects", sorted(have_filters), sorted(filters)),
                ("max_deliver", have.max_deliver, want.max_deliver),
                ("ack_wait", have.ack_wait, want.ack_wait),
                ("max_ack_pending", have.max_ack_pending, want.max_ack_pending),
            )
            if old != new
        ]
        if not diffs:
            return []
        await self._js.add_consumer(want.stream, config)
        return [f"updated consumer {want.durable}: " + ", ".join(diffs)]

    async def pending(self, stream: str, durable: str) -> tuple[int, int]:
        """(messages not yet delivered, messages delivered but not settled) of a consumer."""
        info = await self._js.consumer_info(stream, durable)
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)

    async def stream_messages(self, stream: str) -> int:
        """Messages a stream holds now."""
        return int((await self._js.stream_info(stream)).state.messages)

    async def puller(self, spec: ConsumerSpec) -> Puller:
        puller = Puller(self._nc, spec)
        await puller.subscribe()
        return puller

    async def publish(
        self,
        subject: str,
        data: bytes,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> int:
        """Publish to JetStream and wait for its acknowledgement; returns the sequence."""
        too_big = oversized(data, headers, self.max_payload)
        if too_big is not None:
            raise PublishRejected(too_big)
        try:
            ack = await self._js.publish(subject, data, headers=headers, timeout=timeout)
        except Exception as exc:
            raise PublishFailed(f"{type(exc).__name__}: {exc}") from exc
        return int(ack.seq)

    def acked_publisher(self) -> AckedPublisher:
        return AckedPublisher(self._nc)

    async def stream_binding(self, subject: str) -> tuple[str, float] | None:
        """(stream, duplicate window in seconds) of the stream storing `subject`, or None."""
        answer = await self._api("STREAM.NAMES", {"subject": subject})
        names = answer.get("streams") or []
        if not names:
            return None
        config = await self._stream_config(str(names[0]))
        return str(names[0]), int(config.get("duplicate_window") or 0) / 1e9

    async def close(self) -> None:
        """Flush settles already sent, then close. Safe to call twice."""
        if self._nc.is_closed:
            return
        self._state["closing"] = True
        try:
            if self._nc.is_connected:
                await self._nc.flush(timeout=5)
        except Exception as exc:
            log.warning("NATS flush on close failed", extra={"error": str(exc)})
        try:
            await self._nc.close()
        except Exception as exc:  # a transport already torn down: nothing left to flush
            log.warning("NATS close failed", extra={"error": str(exc)})
