"""Configuration: the typed settings, and the one place that reads the environment.

Layers, lowest first: the defaults declared on the Structs below (documented in
conf/default.yaml, which a test keeps in step), an optional YAML file given with
--config, then environment variables. An env name is the dotted key path
upper-cased with dots turned into "_" (nats.dlqWorkers -> NATS_DLQWORKERS), which
also yields the four short names of the old service (NATS_URL, POSTGRES_DSN,
LOG_LEVEL, COMPANY_ID). Keys renamed since (RENAMED) keep their old key and env
name as aliases. Each field's own rule (positive, a range, a pattern) is on its
type and checked by msgspec; validate() holds the rules that span fields.
Anything wrong raises ConfigError naming the key and the value, which the CLI
turns into exit code 2.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import msgspec
import yaml

from dlqproc import redact
from dlqproc.envelope import TENANT_PATTERN, valid_tenant


class ConfigError(Exception):
    """A setting is unknown or has a value dlqproc cannot use."""

    def __init__(self, key: str, value: object, reason: str) -> None:
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"invalid config {key}={value!r}: {reason}")


class Duration(float):
    """Seconds; parsed from "500ms", "30s", "5m", "1h", "7d" or a bare number."""


class PositiveDuration(Duration):
    """A Duration that must be above zero (a timeout, a wait, a horizon)."""


# JetStream carries durations (ack waits, NAK delays, a stream's max age) as
# int64 nanoseconds: a NAK delay past that was redelivered at once, a longer
# ack wait or max age made consumer or stream creation fail. About 292 years.
MAX_DURATION = float((2**63 - 1) // 10**9)
# PostgreSQL's statement_timeout is an int4 of milliseconds (about 24.8 days).
_PG_MAX_TIMEOUT_MS = 2**31 - 1

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> Duration:
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError("expected a duration such as 500ms, 30s, 5m")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("a duration must be a finite, non-negative number")
    if seconds > MAX_DURATION:
        raise ValueError(f"a duration must be at most {MAX_DURATION:.0f}s (what NATS carries)")
    return Duration(seconds)


# Per-field rules live on the types; msgspec checks them while converting, and
# _reason turns its message into the sentence an operator reads.
_NAME = r"\A[A-Za-z0-9_-]+\Z"  # a JetStream stream or durable name
_OPTIONAL_NAME = r"\A[A-Za-z0-9_-]*\Z"
_SUBJECT = r"\A[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\Z"  # literal: no wildcards
_TENANT_OR_NONE = rf"\A(?:{TENANT_PATTERN.pattern})?\Z"
_LOG_LEVEL = r"(?i)\A(?:DEBUG|INFO|WARNING|ERROR)\Z"
_PATTERN_MEANING = {
    _NAME: "not a valid name (letters, digits, '_' and '-')",
    _OPTIONAL_NAME: "not a valid durable name (letters, digits, '_' and '-')",
    _SUBJECT: "not a literal NATS subject (dot-separated tokens of letters, digits, '_', '-')",
    _TENANT_OR_NONE: "not a valid tenant id",
    _LOG_LEVEL: "expected DEBUG, INFO, WARNING or ERROR",
}
_NATS_MAX_PAYLOAD = 64 * 1024 * 1024  # nats-server's hard limit on max_payload
_MAX_BYTE_BUDGET = 1 << 30
# Worker processes are started at once, each an interpreter of its own
# (~30 MB): a larger pool is a typo that would fork until the OOM killer came.
_MAX_WORKERS = 1024
# nats-server's limit on stream and consumer names (JSMaxNameLen): a longer
# name is refused by JetStream at start-up, which looked like "NATS unavailable".
_MAX_JS_NAME = 255
_FLOAT_MAX = sys.float_info.max  # an upper bound that refuses infinity

Positive = Annotated[int, msgspec.Meta(gt=0)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
PositiveNumber = Annotated[float, msgspec.Meta(gt=0, le=_FLOAT_MAX)]
NonNegativeNumber = Annotated[float, msgspec.Meta(ge=0, le=_FLOAT_MAX)]
_NATS_CARRIES = "what NATS carries"
DelayMinutes = Annotated[float, msgspec.Meta(ge=0, le=MAX_DURATION / 60, description=_NATS_CARRIES)]
AgeDays = Annotated[float, msgspec.Meta(gt=0, le=MAX_DURATION / 86400, description=_NATS_CARRIES)]
ByteBudget = Annotated[
    int,
    msgspec.Meta(gt=0, le=_MAX_BYTE_BUDGET, description="a larger memory budget is a typo"),
]
Name = Annotated[str, msgspec.Meta(pattern=_NAME)]
Subject = Annotated[str, msgspec.Meta(pattern=_SUBJECT)]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel"):
    pass


class MainConsumerConfig(_Section, frozen=True, forbid_unknown_fields=True, rename="camel"):
    """A main consumer of an events stream (realtime or historical, README "Main consumers")."""

    enabled: bool = True
    stream: Name = "wa_events_stream"
    # Durable name; "_<company.id>" is appended when a tenant is set.
    durable: Name = "wa_events_realtime_consumer"
    # Deliveries after which a failing event is dead-lettered. JetStream itself
    # is told to redeliver without limit, so an event whose DLQ publish fails
    # on its last delivery is never abandoned.
    max_deliver: Positive = 5
    ack_wait: PositiveDuration = PositiveDuration(30)
    nak_base_delay: Duration = Duration(1)
    nak_max_delay: Duration = Duration(30)
    max_ack_pending: Positive = 1000
    fetch_batch: Positive = 256


class NatsConfig(_Section, frozen=True, forbid_unknown_fields=True, rename="camel"):
    url: str = "nats://127.0.0.1:4222"
    # Replicas of the streams dlqproc creates (its consumers follow their
    # stream); an existing stream of dlqproc's is raised to it, never lowered.
    stream_replicas: Annotated[
        int, msgspec.Meta(ge=1, le=5, description="JetStream's bound on a stream's replicas")
    ] = 1
    # How long start-up keeps retrying NATS (connect and topology) before exit 1.
    startup_timeout: PositiveDuration = PositiveDuration(60)
    # Per-request timeout of JetStream API calls, short so that a request to a
    # leader that died is retried on the new one rather than waited out.
    api_timeout: PositiveDuration = PositiveDuration(1)
    # Credentials besides those nats.url may carry (user:password@, token@),
    # at most one kind; password and token are secrets like the URL's. The
    # files (an NKey seed, or a .creds file: user JWT and seed) are mounted
    # from a Secret and read by nats-py alone.
    user: str = ""
    password: str = ""
    token: str = ""
    nkey_seed_file: str = ""
    creds_file: str = ""
    # TLS: a CA bundle to verify the server by, a client certificate and key.
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    realtime: MainConsumerConfig = MainConsumerConfig()
    historical: MainConsumerConfig = MainConsumerConfig(
        stream="wa_history_events_stream",
        durable="wa_history_events_historical_consumer",
        max_deliver=3,
        ack_wait=PositiveDuration(60),
        nak_base_delay=Duration(2),
        nak_max_delay=Duration(60),
    )
    # The DLQ worker's settings, keyed as the old service's operators know them
    # (nats.dlqWorkers ... nats.dlqMaxAckPending; README "Running it").
    dlq_workers: Annotated[
        int, msgspec.Meta(ge=0, description="0 runs the handlers in the supervisor")
    ] = 8
    dlq_base_delay_minutes: DelayMinutes = 5.0
    dlq_max_delay_minutes: DelayMinutes = 5.0
    dlq_stream: Name = "dlq_stream"
    dlq_subject: Subject = "v1.dlq"
    dlq_max_age_days: AgeDays = 7.0
    dlq_max_deliver: Positive = 10
    dlq_max_retries: Positive = 5
    dlq_ack_wait: PositiveDuration = PositiveDuration(30)
    dlq_max_ack_pending: Positive = 1000
    dlq_consumer: Annotated[str, msgspec.Meta(pattern=_OPTIONAL_NAME)] = ""
    dlq_fetch_batch: Positive = 256
    # Settings of every lane (their old nats.dlq... keys are aliases, see _RENAMED).
    # Fraction of each retry delay, DLQ and main consumers alike, drawn at random.
    retry_jitter: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.2
    worker_batch: Positive = 32
    worker_batch_bytes: ByteBudget = 1024 * 1024
    max_in_flight: Positive = 1024
    max_in_flight_bytes: ByteBudget = 8 * 1024 * 1024
    worker_task_timeout: PositiveDuration = PositiveDuration(20)
    max_payload_bytes: Annotated[
        int,
        msgspec.Meta(gt=0, le=_NATS_MAX_PAYLOAD, description="NATS never carries a larger message"),
    ] = 4 * 1024 * 1024
    shutdown_nak_delay: Duration = Duration(1)
    shutdown_grace: Duration = Duration(20)


class PostgresConfig(_Section, frozen=True, forbid_unknown_fields=True, rename="camel"):
    dsn: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    auto_migrate: bool = True
    statement_timeout: Duration = Duration(30)
    # How long start-up retries connecting (and migrating) before exit 1.
    startup_timeout: PositiveDuration = PositiveDuration(60)
    # Month partitions one commit group may create; more wait for later writes.
    max_new_partitions: Positive = 12


class HandlersConfig(_Section, frozen=True, forbid_unknown_fields=True, rename="camel"):
    module: str = "dlqproc.handlers.whatsapp"
    # How far ahead of now an event's timestamps may lie; also the last month
    # that gets a partition.
    timestamp_horizon: PositiveDuration = PositiveDuration(7 * 86400)


class ServerConfig(_Section, frozen=True, forbid_unknown_fields=True, rename="camel"):
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    host: str = "0.0.0.0"
    # prometheus-client's multiprocess directory; also PROMETHEUS_MULTIPROC_DIR.
    metrics_dir: str = ""
    # /ready turns 503 when a lane has not fetched for this long while its
    # consumer has pending messages.
    ready_stall_after: PositiveDuration = PositiveDuration(30)
    # Tenants with a company_id label value of their own on /metrics (the
    # first ones seen); the others are counted under "_other".
    metrics_max_tenants: Positive = 500


class LogConfig(_Section, frozen=True, forbid_unknown_fields=True, rename="camel"):
    level: Annotated[str, msgspec.Meta(pattern=_LOG_LEVEL)] = "INFO"


class CompanyConfig(_Section, frozen=True, forbid_unknown_fields=True, rename="camel"):
    id: Annotated[str, msgspec.Meta(pattern=_TENANT_OR_NONE)] = ""


class TenantsConfig(_Section, frozen=True, forbid_unknown_fields=True, rename="camel"):
    """Which tenants may get a schema, and how fast new ones may appear."""

    # Comma-separated tenant ids; empty: any valid tenant. Others are exhausted
    # as tenant_refused and get no schema.
    allow: str = ""
    # New tenants admitted per hour across replicas (0: no limit); past it an
    # event fails as tenant_limit (retried, exhausted in the end).
    max_new_per_hour: NonNegative = 100

    @property
    def allowed(self) -> frozenset[str]:
        """tenants.allow as a set (validate() has checked every entry)."""
        return frozenset(allow_entries(self.allow))


def allow_entries(text: str) -> list[str]:
    """The entries of a comma-separated tenants.allow, stripped; [] when it is blank."""
    return [entry.strip() for entry in text.split(",")] if text.strip() else []


class ConsoleConfig(_Section, frozen=True, forbid_unknown_fields=True, rename="camel"):
    """`dlqproc console`: where it listens, and the token that admits operators."""

    host: str = "127.0.0.1"
    port: int = 8090
    token: str = ""  # secret: masked by `config`, scrubbed from logs


class Config(_Section, frozen=True, forbid_unknown_fields=True, rename="camel"):
    nats: NatsConfig = NatsConfig()
    postgres: PostgresConfig = PostgresConfig()
    handlers: HandlersConfig = HandlersConfig()
    server: ServerConfig = ServerConfig()
    log: LogConfig = LogConfig()
    company: CompanyConfig = CompanyConfig()
    tenants: TenantsConfig = TenantsConfig()
    console: ConsoleConfig = ConsoleConfig()

    @property
    def dlq_durable(self) -> str:
        """The DLQ consumer's durable name (the old derivation unless configured)."""
        if self.nats.dlq_consumer:
            return self.nats.dlq_consumer
        name = self.nats.dlq_subject.replace(".", "_") + "_worker_consumer"
        return f"{name}_{self.company.id}" if self.company.id else name

    def durable(self, main: MainConsumerConfig) -> str:
        """A main consumer's durable name, per tenant when a tenant is set."""
        return f"{main.durable}_{self.company.id}" if self.company.id else main.durable

    @property
    def dlq_filter_subject(self) -> str:
        """Subjects the DLQ consumer reads: one tenant's, or every tenant's."""
        tail = self.company.id or ">"
        return f"{self.nats.dlq_subject}.{tail}"


def _encode_hook(obj: object) -> object:
    if isinstance(obj, Duration):
        return float(obj)
    raise TypeError(type(obj).__name__)


def _decode_hook(kind: type, value: object) -> object:
    if kind is Duration:
        return parse_duration(value)
    if kind is PositiveDuration:
        seconds = parse_duration(value)
        if seconds <= 0:
            raise ValueError("must be positive")
        return PositiveDuration(seconds)
    raise NotImplementedError


def as_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain data, keyed like the YAML file."""
    data: dict[str, Any] = msgspec.to_builtins(cfg, enc_hook=_encode_hook)
    return data


def leaf_keys(tree: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from leaf_keys(value, path + ".")
        else:
            yield path


# Settings that govern every lane but were named for the DLQ alone. Their old
# keys (in a --config file) and env names stay accepted as aliases; setting a
# key and its alias to different values is an error.
RENAMED = {
    "nats.dlqJitter": "nats.retryJitter",
    "nats.dlqWorkerBatch": "nats.workerBatch",
    "nats.dlqWorkerBatchBytes": "nats.workerBatchBytes",
    "nats.dlqMaxInFlight": "nats.maxInFlight",
    "nats.dlqMaxInFlightBytes": "nats.maxInFlightBytes",
    "nats.dlqTaskTimeout": "nats.workerTaskTimeout",
    "nats.dlqMaxPayloadBytes": "nats.maxPayloadBytes",
    "nats.dlqShutdownNakDelay": "nats.shutdownNakDelay",
}

# Env names that prometheus-client users already know, read before the rule's.
_ENV_ALIASES = {"server.metricsDir": "PROMETHEUS_MULTIPROC_DIR"}


def env_name(key: str) -> str:
    return key.upper().replace(".", "_")


def _set_path(tree: dict[str, Any], key: str, value: object) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _get_path(tree: Mapping[str, Any], parts: list[str]) -> object:
    node: object = tree
    for part in parts:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _merge(base: dict[str, Any], override: Mapping[str, Any], prefix: str = "") -> None:
    for key, value in override.items():
        path = f"{prefix}{key}"
        current = base.get(key)
        if isinstance(current, dict) and isinstance(value, Mapping):
            _merge(current, value, path + ".")
        elif isinstance(current, dict) or key not in base:
            raise ConfigError(
                path, value, "unknown key" if key not in base else "expected a section"
            )
        else:
            base[key] = value


def _unalias_file(loaded: dict[str, Any], origin: dict[str, str]) -> None:
    """Move each old key of a --config file to its new name, remembering which was used."""
    for old, new in RENAMED.items():
        *parents, leaf = old.split(".")
        section = _get_path(loaded, parents)
        if not isinstance(section, dict) or leaf not in section:
            continue
        value = section.pop(leaf)
        new_leaf = new.rsplit(".", 1)[1]
        if new_leaf in section and section[new_leaf] != value:
            raise ConfigError(old, value, f"an alias of {new}, which is set too")
        section[new_leaf] = value
        origin[new] = old


_RENAMED_ENV = {env_name(old): old for old in RENAMED}


@functools.cache
def _env_names(key: str) -> tuple[str, ...]:
    """The env names that set `key`, in the order they are read: the first one set wins."""
    aliases = [env_name(old) for old, new in RENAMED.items() if new == key]
    return tuple(n for n in (_ENV_ALIASES.get(key), env_name(key), *aliases) if n)


def _from_env(
    key: str, environ: Mapping[str, str], origin: dict[str, str]
) -> tuple[str, str] | None:
    """(name, value) of the env variable that sets `key`, if one does."""
    found = [(name, environ[name]) for name in _env_names(key) if name in environ]
    if not found:
        return None
    name, value = found[0]
    if len({v for _, v in found}) > 1 and any(n in _RENAMED_ENV for n, _ in found):
        shown = ", ".join(n for n, _ in found)
        raise ConfigError(key, value, f"set differently by {shown} (aliases of one setting)")
    if name in _RENAMED_ENV:
        origin[key] = _RENAMED_ENV[name]
    else:
        origin.pop(key, None)
    return name, value


def load(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    preset: Mapping[str, str] | None = None,
    forced: Mapping[str, str] | None = None,
) -> Config:
    """Build the effective config: defaults < preset < YAML file < environment < forced.

    preset and forced are env-style (NAME=value) layers for embedded runs: the
    demo presets fast retry delays the operator may still override, and forces
    the URLs of the servers it started.
    """
    environ = {
        **(preset or {}),
        **(os.environ if environ is None else environ),
        **(forced or {}),
    }
    merged = as_dict(Config())
    keys = list(leaf_keys(merged))
    # New key -> the alias it was set by, so that an error names what the operator wrote.
    origin: dict[str, str] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError("--config", str(path), str(exc).splitlines()[0]) from exc
        if not isinstance(loaded, dict):
            raise ConfigError("--config", str(path), "expected a mapping at the top level")
        _unalias_file(loaded, origin)
        _merge(merged, loaded)
    for key in keys:
        found = _from_env(key, environ, origin)
        if found is not None:
            name, value = found
            try:
                value.encode()
            except UnicodeEncodeError:
                raise ConfigError(key, value, f"{name} is not valid UTF-8") from None
            _set_path(merged, key, value)
    return _convert(merged, origin)


def _convert(merged: dict[str, Any], origin: Mapping[str, str]) -> Config:
    try:
        cfg = msgspec.convert(merged, Config, strict=False, dec_hook=_decode_hook)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).rpartition(" - at `$.")
        if not message:
            raise ConfigError("config", None, str(exc)) from exc
        key = where.rstrip("`")
        kind = _field_type(key)
        value = _typed(kind, _get_path(merged, key.split(".")))
        raise ConfigError(origin.get(key, key), value, _reason(kind, value, message)) from exc
    validate(cfg)
    return cfg


def _field_type(key: str) -> object:
    """The declared type of a dotted key (Annotated included), or None."""
    node: object = Config
    for part in key.split("."):
        if not (isinstance(node, type) and issubclass(node, msgspec.Struct)):
            return None
        node = _field_types(node).get(part)
    return node


@functools.cache
def _field_types(section: type[msgspec.Struct]) -> dict[str, object]:
    # Cached: msgspec evaluates the annotations anew on every call.
    return {f.encode_name: f.type for f in msgspec.structs.fields(section)}


def _unannotated(kind: object) -> tuple[object, list[msgspec.Meta]]:
    if get_origin(kind) is Annotated:
        base, *extra = get_args(kind)
        return base, [m for m in extra if isinstance(m, msgspec.Meta)]
    return kind, []


def _typed(kind: object, raw: object) -> object:
    """The value as the operator meant it (an int for "-1"), for the error; else as given."""
    base, _ = _unannotated(kind)
    if base is PositiveDuration:
        base = Duration
    if base is None:
        return raw
    try:
        return msgspec.convert(raw, base, strict=False, dec_hook=_decode_hook)
    except (msgspec.ValidationError, TypeError):
        return raw


_BOUND = re.compile(r"Expected `\w+` (>=|>|<=|<) (\S+)")
_BOUND_WORDS = {">=": "must be at least", ">": "must be above", "<=": "must be at most"}


def _reason(kind: object, value: object, message: str) -> str:
    """msgspec's complaint about a constrained field, said as the rule it breaks."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    _, metas = _unannotated(kind)
    bound = _BOUND.fullmatch(message)
    if bound is not None:
        op, limit = bound.groups()
        if (op, limit) in ((">=", "1"), (">", "0"), (">", "0.0")):
            text = "must be positive"
        elif (op, limit) in ((">=", "0"), (">=", "0.0")):
            text = "cannot be negative"
        else:
            text = f"{_BOUND_WORDS.get(op, 'must be below')} {limit}"
        notes = [m.description for m in metas if m.description]
        return f"{text} ({notes[0]})" if notes else text
    if message.startswith("Expected `str` matching regex"):
        for meta in metas:
            if meta.pattern in _PATTERN_MEANING:
                return _PATTERN_MEANING[meta.pattern]
    return message


def validate(cfg: Config) -> None:
    """The rules that span fields; each field's own rule is on its type."""
    n = cfg.nats
    if n.dlq_max_delay_minutes < n.dlq_base_delay_minutes:
        raise ConfigError(
            "nats.dlqMaxDelayMinutes", n.dlq_max_delay_minutes, "is below nats.dlqBaseDelayMinutes"
        )
    if n.dlq_max_retries >= n.dlq_max_deliver:
        raise ConfigError(
            "nats.dlqMaxRetries",
            n.dlq_max_retries,
            f"must be below nats.dlqMaxDeliver ({n.dlq_max_deliver}): dlqproc spends"
            " nats.dlqMaxRetries deliveries, and JetStream itself redelivers without limit",
        )
    for name, main in (("realtime", n.realtime), ("historical", n.historical)):
        if main.nak_max_delay < main.nak_base_delay:
            raise ConfigError(
                f"nats.{name}.nakMaxDelay", main.nak_max_delay, "is below nakBaseDelay"
            )
    if n.worker_task_timeout >= n.dlq_ack_wait:
        raise ConfigError(
            "nats.workerTaskTimeout", n.worker_task_timeout, "must be below nats.dlqAckWait"
        )
    if n.dlq_workers > _MAX_WORKERS:
        raise ConfigError(
            "nats.dlqWorkers",
            n.dlq_workers,
            f"must be at most {_MAX_WORKERS} (each worker is a process, all started at once)",
        )
    if cfg.postgres.statement_timeout * 1000 > _PG_MAX_TIMEOUT_MS:
        raise ConfigError(
            "postgres.statementTimeout",
            cfg.postgres.statement_timeout,
            f"must be at most {_PG_MAX_TIMEOUT_MS}ms (PostgreSQL's limit, about 24.8 days)",
        )
    _validate_js_names(cfg)
    _validate_tenants(cfg)
    _validate_nats_auth(n)


def _validate_js_names(cfg: Config) -> None:
    """Every stream and durable name dlqproc will use, as JetStream will see it."""
    n = cfg.nats
    names = [
        ("nats.dlqStream", n.dlq_stream),
        ("nats.dlqConsumer" if n.dlq_consumer else "nats.dlqSubject", cfg.dlq_durable),
        ("nats.realtime.stream", n.realtime.stream),
        ("nats.realtime.durable", cfg.durable(n.realtime)),
        ("nats.historical.stream", n.historical.stream),
        ("nats.historical.durable", cfg.durable(n.historical)),
    ]
    for key, name in names:
        if len(name) > _MAX_JS_NAME:
            raise ConfigError(
                key,
                f"{name[:40]}... ({len(name)} characters)",
                f"gives a JetStream name over {_MAX_JS_NAME} characters (nats-server's limit)",
            )


def _validate_nats_auth(n: NatsConfig) -> None:
    """One kind of NATS credential at most; no half of a pair."""
    kinds = [
        key
        for key, value in (
            ("nats.user", n.user),
            ("nats.token", n.token),
            ("nats.nkeySeedFile", n.nkey_seed_file),
            ("nats.credsFile", n.creds_file),
        )
        if value
    ]
    if len(kinds) > 1:
        raise ConfigError(kinds[1], "(set)", f"cannot be combined with {kinds[0]}")
    if n.password and not n.user:
        raise ConfigError("nats.password", "(set)", "needs nats.user")
    if bool(n.tls_cert_file) != bool(n.tls_key_file):
        key = "nats.tlsKeyFile" if n.tls_cert_file else "nats.tlsCertFile"
        raise ConfigError(key, "", "nats.tlsCertFile and nats.tlsKeyFile go together")


def _validate_tenants(cfg: Config) -> None:
    """Every tenants.allow entry is a tenant id; company.id is one of them.

    The entries are checked here rather than by a pattern so that the error
    names the bad entry. An empty entry ("acme,,globex", ",") is refused rather
    than skipped: a list that parsed to nothing would silently admit every tenant.
    """
    t = cfg.tenants
    for entry in allow_entries(t.allow):
        if not valid_tenant(entry):
            raise ConfigError("tenants.allow", entry, "not a valid tenant id")
    if cfg.company.id and t.allowed and cfg.company.id not in t.allowed:
        raise ConfigError("company.id", cfg.company.id, "is not in tenants.allow")


def redact_dsn(dsn: str) -> str:
    """The DSN as it may be printed: libpq's parameters, passwords masked (see redact)."""
    return redact.display_dsn(dsn)


def redact_url(url: str) -> str:
    """nats.url as it may be printed: each server as nats-py reads it, credentials masked."""
    return redact.display_url(url)


def redacted(cfg: Config) -> dict[str, Any]:
    """The config as `dlqproc config` prints it: the DSN and URL rebuilt with their
    secrets masked, and every other string scrubbed of those secrets too."""
    data = as_dict(cfg)
    data["postgres"]["dsn"] = redact_dsn(cfg.postgres.dsn)
    data["nats"]["url"] = redact_url(cfg.nats.url)
    scrubbed: dict[str, Any] = redact.secrets_of(cfg).scrub_tree(data)
    return scrubbed
