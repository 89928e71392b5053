"""Configuration: the typed settings, and the one place that reads the environment.

Layers, lowest first: the defaults declared on the Structs below (documented in
conf/default.yaml, which a test keeps in step), an optional YAML file given with
--config, then environment variables. An env name is the dotted key path
upper-cased with dots turned into "_" (nats.dlqWorkers -> NATS_DLQWORKERS), which
also yields the four short names of the old service (NATS_URL, POSTGRES_DSN,
LOG_LEVEL, COMPANY_ID). Anything wrong raises ConfigError naming the key and the
value, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
import yaml

from dlqproc import redact
from dlqproc.envelope import valid_tenant


class ConfigError(Exception):
    """A setting is unknown or has a value dlqproc cannot use."""

    def __init__(self, key: str, value: object, reason: str) -> None:
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"invalid config {key}={value!r}: {reason}")


class Duration(float):
    """Seconds; parsed from "500ms", "30s", "5m", "1h", "7d" or a bare number."""


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
    return Duration(seconds)


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel"):
    pass


class MainConsumerConfig(_Section, frozen=True, forbid_unknown_fields=True, rename="camel"):
    """A main consumer of the events streams (contract section 1)."""

    enabled: bool = True
    stream: str = "wa_events_stream"
    # Durable name; "_<company.id>" is appended when a tenant is set.
    durable: str = "wa_events_realtime_consumer"
    # Deliveries after which a failing event is dead-lettered. JetStream itself
    # is told to redeliver without limit, so an event whose DLQ publish fails
    # on its last delivery is never abandoned.
    max_deliver: int = 5
    ack_wait: Duration = Duration(30)
    nak_base_delay: Duration = Duration(1)
    nak_max_delay: Duration = Duration(30)
    max_ack_pending: int = 1000
    fetch_batch: int = 256


class NatsConfig(_Section, frozen=True, forbid_unknown_fields=True, rename="camel"):
    url: str = "nats://127.0.0.1:4222"
    # Replicas of the streams dlqproc creates (its consumers follow their
    # stream); an existing stream of dlqproc's is raised to it, never lowered.
    stream_replicas: int = 1
    # How long start-up keeps retrying NATS (connect and topology) before exit 1.
    startup_timeout: Duration = Duration(60)
    # Per-request timeout of JetStream API calls, short so that a request to a
    # leader that died is retried on the new one rather than waited out.
    api_timeout: Duration = Duration(1)
    realtime: MainConsumerConfig = MainConsumerConfig()
    historical: MainConsumerConfig = MainConsumerConfig(
        stream="wa_history_events_stream",
        durable="wa_history_events_historical_consumer",
        max_deliver=3,
        ack_wait=Duration(60),
        nak_base_delay=Duration(2),
        nak_max_delay=Duration(60),
    )
    dlq_workers: int = 8
    dlq_base_delay_minutes: float = 5.0
    dlq_max_delay_minutes: float = 5.0
    dlq_jitter: float = 0.2
    dlq_stream: str = "dlq_stream"
    dlq_subject: str = "v1.dlq"
    dlq_max_age_days: float = 7.0
    dlq_max_deliver: int = 10
    dlq_max_retries: int = 5
    dlq_ack_wait: Duration = Duration(30)
    dlq_max_ack_pending: int = 1000
    dlq_consumer: str = ""
    dlq_fetch_batch: int = 256
    dlq_worker_batch: int = 32
    dlq_max_in_flight: int = 1024
    dlq_max_in_flight_bytes: int = 8 * 1024 * 1024
    dlq_worker_batch_bytes: int = 1024 * 1024
    dlq_task_timeout: Duration = Duration(20)
    dlq_max_payload_bytes: int = 4 * 1024 * 1024
    dlq_shutdown_nak_delay: Duration = Duration(1)
    shutdown_grace: Duration = Duration(20)


class PostgresConfig(_Section, frozen=True, forbid_unknown_fields=True, rename="camel"):
    dsn: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    auto_migrate: bool = True
    statement_timeout: Duration = Duration(30)
    # Month partitions one commit group may create; more wait for later writes.
    max_new_partitions: int = 12


class HandlersConfig(_Section, frozen=True, forbid_unknown_fields=True, rename="camel"):
    module: str = "dlqproc.handlers.whatsapp"
    # How far ahead of now an event's timestamps may lie; also the last month
    # that gets a partition.
    timestamp_horizon: Duration = Duration(7 * 86400)


class ServerConfig(_Section, frozen=True, forbid_unknown_fields=True, rename="camel"):
    port: int = 8080
    host: str = "0.0.0.0"
    # prometheus-client's multiprocess directory; also PROMETHEUS_MULTIPROC_DIR.
    metrics_dir: str = ""
    # /ready turns 503 when a lane has not fetched for this long while its
    # consumer has pending messages.
    ready_stall_after: Duration = Duration(30)
    # Tenants with a company_id label value of their own on /metrics (the
    # first ones seen); the others are counted under "_other".
    metrics_max_tenants: int = 500


class LogConfig(_Section, frozen=True, forbid_unknown_fields=True, rename="camel"):
    level: str = "INFO"


class CompanyConfig(_Section, frozen=True, forbid_unknown_fields=True, rename="camel"):
    id: str = ""


class TenantsConfig(_Section, frozen=True, forbid_unknown_fields=True, rename="camel"):
    """Which tenants may get a schema, and how fast new ones may appear."""

    # Comma-separated tenant ids; empty: any valid tenant. Others are exhausted
    # as tenant_refused and get no schema.
    allow: str = ""
    # New tenants admitted per hour across replicas (0: no limit); past it an
    # event fails as tenant_limit (retried, exhausted in the end).
    max_new_per_hour: int = 100

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


# Env names that prometheus-client users already know, read as well as the rule's.
_ALIASES = {"server.metricsDir": "PROMETHEUS_MULTIPROC_DIR"}


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
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError("--config", str(path), str(exc).splitlines()[0]) from exc
        if not isinstance(loaded, Mapping):
            raise ConfigError("--config", str(path), "expected a mapping at the top level")
        _merge(merged, loaded)
    for key in keys:
        name = _ALIASES.get(key, env_name(key))
        if name not in environ:
            name = env_name(key)
        if name in environ:
            value = environ[name]
            try:
                value.encode()
            except UnicodeEncodeError:
                raise ConfigError(key, value, f"{name} is not valid UTF-8") from None
            _set_path(merged, key, value)
    return _convert(merged)


def _convert(merged: dict[str, Any]) -> Config:
    try:
        cfg = msgspec.convert(merged, Config, strict=False, dec_hook=_decode_hook)
    except msgspec.ValidationError as exc:
        message = str(exc)
        where = re.search(r"at `\$\.([^`]*)`", message)
        key = where.group(1) if where else "config"
        value = _get_path(merged, key.split(".")) if where else None
        raise ConfigError(key, value, message.split(" - at ")[0]) from exc
    validate(cfg)
    return cfg


_SUBJECT_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def _leaves(cfg: Config) -> Iterator[tuple[str, object]]:
    data = msgspec.to_builtins(cfg, enc_hook=_encode_hook)
    for key in leaf_keys(data):
        yield key, _get_path(data, key.split("."))


_NATS_MAX_PAYLOAD = 64 * 1024 * 1024  # nats-server's hard limit on max_payload
_MAX_BYTE_BUDGET = 1 << 30  # memory budgets above 1 GiB are typos, not plans


def validate(cfg: Config) -> None:
    """Cross-field rules a typed Struct cannot express."""
    n = cfg.nats
    for key, value in _leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, value, "must be a finite number")
    positive = {
        "nats.dlqMaxDeliver": n.dlq_max_deliver,
        "nats.dlqMaxRetries": n.dlq_max_retries,
        "nats.dlqMaxAckPending": n.dlq_max_ack_pending,
        "nats.dlqFetchBatch": n.dlq_fetch_batch,
        "nats.dlqWorkerBatch": n.dlq_worker_batch,
        "nats.dlqMaxInFlight": n.dlq_max_in_flight,
        "nats.dlqMaxInFlightBytes": n.dlq_max_in_flight_bytes,
        "nats.dlqWorkerBatchBytes": n.dlq_worker_batch_bytes,
        "nats.dlqMaxPayloadBytes": n.dlq_max_payload_bytes,
        "nats.dlqAckWait": n.dlq_ack_wait,
        "nats.dlqTaskTimeout": n.dlq_task_timeout,
        "nats.dlqMaxAgeDays": n.dlq_max_age_days,
        "nats.startupTimeout": n.startup_timeout,
        "nats.apiTimeout": n.api_timeout,
        "postgres.maxNewPartitions": cfg.postgres.max_new_partitions,
        "handlers.timestampHorizon": cfg.handlers.timestamp_horizon,
        "server.readyStallAfter": cfg.server.ready_stall_after,
        "server.metricsMaxTenants": cfg.server.metrics_max_tenants,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(key, value, "must be positive")
    for key, value in {
        "nats.dlqBaseDelayMinutes": n.dlq_base_delay_minutes,
        "nats.dlqMaxDelayMinutes": n.dlq_max_delay_minutes,
    }.items():
        if value < 0:
            raise ConfigError(key, value, "cannot be negative")
    if n.dlq_max_delay_minutes < n.dlq_base_delay_minutes:
        raise ConfigError(
            "nats.dlqMaxDelayMinutes", n.dlq_max_delay_minutes, "is below nats.dlqBaseDelayMinutes"
        )
    if not 1 <= n.stream_replicas <= 5:
        # JetStream's own bound on a stream's replicas.
        raise ConfigError("nats.streamReplicas", n.stream_replicas, "must be between 1 and 5")
    if n.dlq_workers < 0:
        raise ConfigError("nats.dlqWorkers", n.dlq_workers, "cannot be negative (0: in-process)")
    if not 0 <= n.dlq_jitter < 1:
        raise ConfigError("nats.dlqJitter", n.dlq_jitter, "must be in [0, 1)")
    if n.dlq_max_retries >= n.dlq_max_deliver:
        raise ConfigError(
            "nats.dlqMaxRetries",
            n.dlq_max_retries,
            f"must be below nats.dlqMaxDeliver ({n.dlq_max_deliver}), as the operator"
            " guide has it (JetStream itself is told to redeliver without limit)",
        )
    for name, main in (("realtime", n.realtime), ("historical", n.historical)):
        for field, value in (
            ("maxDeliver", main.max_deliver),
            ("ackWait", main.ack_wait),
            ("maxAckPending", main.max_ack_pending),
            ("fetchBatch", main.fetch_batch),
        ):
            if value <= 0:
                raise ConfigError(f"nats.{name}.{field}", value, "must be positive")
        if main.nak_max_delay < main.nak_base_delay:
            raise ConfigError(
                f"nats.{name}.nakMaxDelay", main.nak_max_delay, "is below nakBaseDelay"
            )
        if not _SUBJECT_TOKEN.match(main.stream):
            raise ConfigError(f"nats.{name}.stream", main.stream, "not a valid stream name")
        if not _SUBJECT_TOKEN.match(main.durable):
            raise ConfigError(f"nats.{name}.durable", main.durable, "not a valid durable name")
    if n.dlq_max_payload_bytes > _NATS_MAX_PAYLOAD:
        raise ConfigError(
            "nats.dlqMaxPayloadBytes",
            n.dlq_max_payload_bytes,
            f"NATS never carries a message over {_NATS_MAX_PAYLOAD} bytes",
        )
    for key, value in {
        "nats.dlqMaxInFlightBytes": n.dlq_max_in_flight_bytes,
        "nats.dlqWorkerBatchBytes": n.dlq_worker_batch_bytes,
    }.items():
        if value > _MAX_BYTE_BUDGET:
            raise ConfigError(key, value, f"must be at most {_MAX_BYTE_BUDGET} bytes")
    if n.dlq_task_timeout >= n.dlq_ack_wait:
        raise ConfigError(
            "nats.dlqTaskTimeout", n.dlq_task_timeout, "must be below nats.dlqAckWait"
        )
    if not all(_SUBJECT_TOKEN.match(t) for t in n.dlq_subject.split(".")):
        raise ConfigError("nats.dlqSubject", n.dlq_subject, "not a literal NATS subject")
    if not _SUBJECT_TOKEN.match(n.dlq_stream):
        raise ConfigError("nats.dlqStream", n.dlq_stream, "not a valid stream name")
    if n.dlq_consumer and not _SUBJECT_TOKEN.match(n.dlq_consumer):
        raise ConfigError("nats.dlqConsumer", n.dlq_consumer, "not a valid durable name")
    if cfg.company.id and not valid_tenant(cfg.company.id):
        raise ConfigError("company.id", cfg.company.id, "not a valid tenant id")
    _validate_tenants(cfg)
    if not 0 <= cfg.server.port <= 65535:
        raise ConfigError("server.port", cfg.server.port, "not a TCP port")
    if cfg.log.level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError("log.level", cfg.log.level, "expected DEBUG, INFO, WARNING or ERROR")


def _validate_tenants(cfg: Config) -> None:
    """Every tenants.allow entry is a tenant id; the cap is not negative.

    An empty entry ("acme,,globex", ",") is refused rather than skipped: a
    list that parsed to nothing would silently admit every tenant.
    """
    t = cfg.tenants
    for entry in allow_entries(t.allow):
        if not valid_tenant(entry):
            raise ConfigError("tenants.allow", entry, "not a valid tenant id")
    if cfg.company.id and t.allowed and cfg.company.id not in t.allowed:
        raise ConfigError("company.id", cfg.company.id, "is not in tenants.allow")
    if t.max_new_per_hour < 0:
        raise ConfigError("tenants.maxNewPerHour", t.max_new_per_hour, "cannot be negative")


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
