"""Config: defaults, layering (env > file > default), parsing, validation, redaction."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from dlqproc.config import (
    RENAMED,
    CompanyConfig,
    Config,
    ConfigError,
    Duration,
    NatsConfig,
    as_dict,
    env_name,
    leaf_keys,
    load,
    parse_duration,
    redact_dsn,
    redact_url,
    redacted,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_YAML = REPO / "conf" / "default.yaml"


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _get(cfg: Config, key: str) -> Any:
    node: Any = as_dict(cfg)
    for part in key.split("."):
        node = node[part]
    return node


# --- defaults ---------------------------------------------------------------


def test_defaults_match_operator_guide_section_3() -> None:
    n = Config().nats
    assert n.dlq_workers == 8
    assert n.dlq_base_delay_minutes == 5
    assert n.dlq_max_delay_minutes == 5
    assert n.dlq_stream == "dlq_stream"
    assert n.dlq_subject == "v1.dlq"
    assert n.dlq_max_age_days == 7
    assert n.dlq_max_deliver == 10
    assert n.dlq_ack_wait == 30.0
    assert isinstance(n.dlq_ack_wait, Duration)
    assert n.dlq_max_ack_pending == 1000
    assert n.dlq_max_retries == 5


def test_load_with_nothing_gives_the_defaults() -> None:
    assert load(None, environ={}) == Config()


def test_defaults_keyed_like_the_guide() -> None:
    nats = as_dict(Config())["nats"]
    assert {
        k: nats[k]
        for k in (
            "dlqWorkers",
            "dlqBaseDelayMinutes",
            "dlqMaxDelayMinutes",
            "dlqStream",
            "dlqSubject",
            "dlqMaxAgeDays",
            "dlqMaxDeliver",
            "dlqAckWait",
            "dlqMaxAckPending",
            "dlqMaxRetries",
        )
    } == {
        "dlqWorkers": 8,
        "dlqBaseDelayMinutes": 5,
        "dlqMaxDelayMinutes": 5,
        "dlqStream": "dlq_stream",
        "dlqSubject": "v1.dlq",
        "dlqMaxAgeDays": 7,
        "dlqMaxDeliver": 10,
        "dlqAckWait": 30,
        "dlqMaxAckPending": 1000,
        "dlqMaxRetries": 5,
    }
    assert as_dict(Config())["server"]["port"] == 8080


# --- default.yaml drift ---------------------------------------------------------------


def test_default_yaml_documents_every_key_with_the_same_default() -> None:
    documented = yaml.safe_load(DEFAULT_YAML.read_text())
    actual = as_dict(Config())
    assert sorted(leaf_keys(documented)) == sorted(leaf_keys(actual))
    defaults = Config()
    for key in leaf_keys(actual):
        want = _get(defaults, key)
        node: Any = documented
        for part in key.split("."):
            node = node[part]
        # durations are spelled "30s" in the file and held as seconds in the Struct
        struct_value = _struct_value(defaults, key)
        got = parse_duration(node) if isinstance(struct_value, Duration) else node
        assert got == want, key
        assert isinstance(got, bool) == isinstance(want, bool), key
        assert isinstance(got, str) == isinstance(want, str), key


def _struct_value(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        for field in msgspec.structs.fields(node):
            if field.encode_name == part:
                node = getattr(node, field.name)
                break
        else:
            raise KeyError(key)
    return node


def test_default_yaml_loaded_as_a_config_file_changes_nothing() -> None:
    assert load(DEFAULT_YAML, environ={}) == Config()


def test_default_yaml_equals_as_dict_except_duration_spelling() -> None:
    documented = yaml.safe_load(DEFAULT_YAML.read_text())
    actual = as_dict(Config())
    differing = {
        key for key in leaf_keys(actual) if _get_tree(documented, key) != _get_tree(actual, key)
    }
    # the only literal differences are "30s"-style durations, which parse to the default
    assert all(isinstance(_struct_value(Config(), k), Duration) for k in differing), differing


def _get_tree(tree: Any, key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


# --- env names and precedence -----------------------------------------------------


@pytest.mark.parametrize(
    ("key", "env"),
    [
        ("nats.dlqWorkers", "NATS_DLQWORKERS"),
        ("nats.dlqBaseDelayMinutes", "NATS_DLQBASEDELAYMINUTES"),
        ("nats.dlqMaxAckPending", "NATS_DLQMAXACKPENDING"),
        ("nats.realtime.maxDeliver", "NATS_REALTIME_MAXDELIVER"),
        ("server.port", "SERVER_PORT"),
        ("postgres.dsn", "POSTGRES_DSN"),
        ("nats.url", "NATS_URL"),
        ("log.level", "LOG_LEVEL"),
        ("company.id", "COMPANY_ID"),
    ],
)
def test_env_name(key: str, env: str) -> None:
    assert env_name(key) == env


def test_every_key_has_a_distinct_env_name() -> None:
    keys = list(leaf_keys(as_dict(Config())))
    names = [env_name(k) for k in keys]
    assert len(set(names)) == len(names)
    assert {"NATS_URL", "POSTGRES_DSN", "LOG_LEVEL", "COMPANY_ID"} <= set(names)


@pytest.mark.parametrize(
    ("key", "env", "file_value", "env_value", "from_file", "from_env"),
    [
        ("nats.dlqWorkers", "NATS_DLQWORKERS", 3, "12", 3, 12),
        (
            "nats.dlqStream",
            "NATS_DLQSTREAM",
            "file_stream",
            "env_stream",
            "file_stream",
            "env_stream",
        ),
        ("nats.dlqAckWait", "NATS_DLQACKWAIT", "45s", "2m", 45.0, 120.0),
        ("nats.dlqBaseDelayMinutes", "NATS_DLQBASEDELAYMINUTES", 1, "0.5", 1.0, 0.5),
        ("server.port", "SERVER_PORT", 9000, "9100", 9000, 9100),
        ("postgres.dsn", "POSTGRES_DSN", "host=file", "host=env", "host=file", "host=env"),
        ("postgres.autoMigrate", "POSTGRES_AUTOMIGRATE", False, "true", False, True),
        (
            "nats.url",
            "NATS_URL",
            "nats://f:4222",
            "nats://e:4222",
            "nats://f:4222",
            "nats://e:4222",
        ),
        ("log.level", "LOG_LEVEL", "DEBUG", "ERROR", "DEBUG", "ERROR"),
        ("company.id", "COMPANY_ID", "filecorp", "envcorp", "filecorp", "envcorp"),
        ("handlers.module", "HANDLERS_MODULE", "a.b", "c.d", "a.b", "c.d"),
    ],
)
def test_precedence_env_over_file_over_default(
    tmp_path: Path,
    key: str,
    env: str,
    file_value: Any,
    env_value: str,
    from_file: Any,
    from_env: Any,
) -> None:
    section, leaf = key.split(".")
    path = _write(tmp_path, {section: {leaf: file_value}})
    default = _get(Config(), key)
    assert _get(load(None, environ={}), key) == default
    assert _get(load(path, environ={}), key) == from_file
    assert _get(load(None, environ={env: env_value}), key) == from_env
    assert _get(load(path, environ={env: env_value}), key) == from_env
    assert from_file != default and from_env != from_file


def test_file_sets_only_what_it_names(tmp_path: Path) -> None:
    path = _write(tmp_path, {"nats": {"dlqWorkers": 2}, "server": {"port": 1234}})
    cfg = load(path, environ={"LOG_LEVEL": "DEBUG"})
    assert cfg.nats.dlq_workers == 2
    assert cfg.server.port == 1234
    assert cfg.log.level == "DEBUG"
    assert cfg.nats.dlq_max_deliver == 10
    assert cfg.postgres == Config().postgres


def test_unrelated_env_vars_are_ignored() -> None:
    assert load(None, environ={"NATS_BOGUS": "1", "PATH": "/bin", "nats_dlqworkers": "x"}) == (
        Config()
    )


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load(_write(tmp_path, ""), environ={}) == Config()


# --- durations -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("45", 45.0),
        ("2.5", 2.5),
        (12, 12.0),
        (0.25, 0.25),
        (" 30s ", 30.0),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert isinstance(parse_duration(text), Duration)


@pytest.mark.parametrize("text", ["soon", "", "-5s", "5w", "s", "5 mins", True, -1, -0.5])
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("env", "seconds"),
    [("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("90", 90.0), ("2.5s", 2.5)],
)
def test_duration_from_env(env: str, seconds: float) -> None:
    # the task timeout must stay below the ack wait
    cfg = load(None, environ={"NATS_DLQACKWAIT": env, "NATS_WORKERTASKTIMEOUT": "100ms"})
    assert cfg.nats.dlq_ack_wait == seconds
    assert cfg.nats.worker_task_timeout == 0.1


@pytest.mark.parametrize(("text", "minutes"), [("0.01", 0.01), ("0.5", 0.5), ("2", 2.0)])
def test_minute_keys_accept_fractions(text: str, minutes: float) -> None:
    cfg = load(None, environ={"NATS_DLQBASEDELAYMINUTES": text, "NATS_DLQMAXDELAYMINUTES": text})
    assert cfg.nats.dlq_base_delay_minutes == minutes
    assert cfg.nats.dlq_max_delay_minutes == minutes


def test_minute_fraction_from_file(tmp_path: Path) -> None:
    path = _write(tmp_path, {"nats": {"dlqBaseDelayMinutes": 0.01, "dlqMaxDelayMinutes": 0.02}})
    cfg = load(path, environ={})
    assert cfg.nats.dlq_base_delay_minutes == 0.01
    assert cfg.nats.dlq_max_delay_minutes == 0.02


# --- errors ---------------------------------------------------------------------


def _error(path: Path | None = None, **environ: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(path, environ=environ)
    return info.value


def test_unknown_top_level_key_in_file(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, {"bogus": 1}))
    assert (err.key, err.value) == ("bogus", 1)
    assert "bogus" in str(err)


def test_unknown_nested_key_in_file(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, {"nats": {"dlqWorker": 3}}))
    assert (err.key, err.value) == ("nats.dlqWorker", 3)


def test_scalar_where_a_section_belongs(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, {"nats": 5}))
    assert (err.key, err.value) == ("nats", 5)


def test_mapping_where_a_value_belongs(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, {"server": {"port": {"a": 1}}}))
    assert err.key == "server.port"


def test_bad_int_from_file(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, {"nats": {"dlqWorkers": "many"}}))
    assert (err.key, err.value) == ("nats.dlqWorkers", "many")


def test_file_not_a_mapping(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, "- a\n- b\n"))
    assert err.key == "--config"


def test_file_not_yaml(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, "nats: [unclosed\n"))
    assert err.key == "--config"


def test_file_missing(tmp_path: Path) -> None:
    err = _error(tmp_path / "nope.yaml")
    assert err.key == "--config"
    assert err.value == str(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("env", "value", "key", "bad"),
    [
        ("NATS_DLQWORKERS", "abc", "nats.dlqWorkers", "abc"),
        ("NATS_DLQWORKERS", "", "nats.dlqWorkers", ""),
        ("SERVER_PORT", "80a", "server.port", "80a"),
        ("NATS_RETRYJITTER", "lots", "nats.retryJitter", "lots"),
        ("POSTGRES_AUTOMIGRATE", "maybe", "postgres.autoMigrate", "maybe"),
        ("NATS_DLQACKWAIT", "soon", "nats.dlqAckWait", "soon"),
        ("NATS_DLQACKWAIT", "-5s", "nats.dlqAckWait", "-5s"),
        ("NATS_WORKERTASKTIMEOUT", "5w", "nats.workerTaskTimeout", "5w"),
        ("POSTGRES_STATEMENTTIMEOUT", "x", "postgres.statementTimeout", "x"),
        ("NATS_DLQMAXRETRIES", "10", "nats.dlqMaxRetries", 10),
        ("NATS_DLQMAXRETRIES", "11", "nats.dlqMaxRetries", 11),
        ("NATS_DLQMAXDELIVER", "5", "nats.dlqMaxRetries", 5),
        ("NATS_DLQWORKERS", "-1", "nats.dlqWorkers", -1),
        ("NATS_DLQWORKERS", "-1", "nats.dlqWorkers", -1),
        ("NATS_DLQMAXACKPENDING", "-3", "nats.dlqMaxAckPending", -3),
        ("NATS_DLQMAXAGEDAYS", "-7", "nats.dlqMaxAgeDays", -7.0),
        ("NATS_DLQBASEDELAYMINUTES", "-1", "nats.dlqBaseDelayMinutes", -1.0),
        ("NATS_DLQMAXDELAYMINUTES", "-1", "nats.dlqMaxDelayMinutes", -1.0),
        ("NATS_DLQMAXDELAYMINUTES", "1", "nats.dlqMaxDelayMinutes", 1.0),
        ("NATS_RETRYJITTER", "1", "nats.retryJitter", 1.0),
        ("NATS_RETRYJITTER", "-0.1", "nats.retryJitter", -0.1),
        ("COMPANY_ID", 'a";DROP SCHEMA x;--', "company.id", 'a";DROP SCHEMA x;--'),
        ("COMPANY_ID", "../x", "company.id", "../x"),
        ("COMPANY_ID", "a" * 200, "company.id", "a" * 200),
        ("COMPANY_ID", "ação", "company.id", "ação"),
        ("NATS_WORKERTASKTIMEOUT", "30s", "nats.workerTaskTimeout", 30.0),
        ("NATS_WORKERTASKTIMEOUT", "1m", "nats.workerTaskTimeout", 60.0),
        ("NATS_DLQACKWAIT", "10s", "nats.workerTaskTimeout", 20.0),
        ("NATS_DLQACKWAIT", "0", "nats.dlqAckWait", 0.0),
        ("NATS_STARTUPTIMEOUT", "0s", "nats.startupTimeout", 0.0),
        ("NATS_STREAMREPLICAS", "0", "nats.streamReplicas", 0),
        ("NATS_STREAMREPLICAS", "6", "nats.streamReplicas", 6),
        ("NATS_WORKERBATCH", "0", "nats.workerBatch", 0),
        ("NATS_REALTIME_FETCHBATCH", "0", "nats.realtime.fetchBatch", 0),
        ("NATS_HISTORICAL_STREAM", "a b", "nats.historical.stream", "a b"),
        ("NATS_REALTIME_DURABLE", "x\n", "nats.realtime.durable", "x\n"),
        ("NATS_REALTIME_NAKMAXDELAY", "500ms", "nats.realtime.nakMaxDelay", 0.5),
        ("SERVER_METRICSMAXTENANTS", "0", "server.metricsMaxTenants", 0),
        ("TENANTS_MAXNEWPERHOUR", "-1", "tenants.maxNewPerHour", -1),
        ("NATS_DLQSUBJECT", "v1.dlq.>", "nats.dlqSubject", "v1.dlq.>"),
        ("NATS_DLQSTREAM", "a.b", "nats.dlqStream", "a.b"),
        ("NATS_DLQCONSUMER", "a b", "nats.dlqConsumer", "a b"),
        ("SERVER_PORT", "70000", "server.port", 70000),
        ("LOG_LEVEL", "LOUD", "log.level", "LOUD"),
    ],
)
def test_bad_values_raise_config_error_naming_key_and_value(
    env: str, value: str, key: str, bad: object
) -> None:
    err = _error(**{env: value})
    assert err.key == key
    assert err.value == bad
    assert isinstance(err.value, type(bad))
    assert key in str(err)


@pytest.mark.parametrize(
    ("env", "value", "key"),
    [
        ("NATS_DLQBASEDELAYMINUTES", "nan", "nats.dlqBaseDelayMinutes"),
        ("NATS_DLQMAXDELAYMINUTES", "nan", "nats.dlqMaxDelayMinutes"),
        ("NATS_DLQMAXDELAYMINUTES", "inf", "nats.dlqMaxDelayMinutes"),
        ("NATS_DLQMAXAGEDAYS", "nan", "nats.dlqMaxAgeDays"),
        ("NATS_DLQMAXAGEDAYS", "inf", "nats.dlqMaxAgeDays"),
    ],
)
def test_non_finite_numbers_are_rejected(env: str, value: str, key: str) -> None:
    err = _error(**{env: value})
    assert err.key == key


def test_nan_duration_from_file_is_rejected(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, "nats:\n  dlqAckWait: .nan\n"))
    assert err.key == "nats.dlqAckWait"


def test_undecodable_env_value_is_a_config_error() -> None:
    err = _error(NATS_DLQWORKERS="\udcff")
    assert err.key == "nats.dlqWorkers"


# --- hypothesis: env values ------------------------------------------------------------

INT_KEYS = [
    "nats.dlqMaxAckPending",
    "nats.dlqFetchBatch",
    "nats.workerBatch",
    "nats.maxInFlight",
    "postgres.maxNewPartitions",
]


@given(key=st.sampled_from(INT_KEYS), value=st.integers(min_value=1, max_value=2**63 - 1))
def test_valid_int_from_env_round_trips(key: str, value: int) -> None:
    cfg = load(None, environ={env_name(key): str(value)})
    assert _get(cfg, key) == value
    assert type(_get(cfg, key)) is int


@given(
    key=st.sampled_from(["nats.maxInFlightBytes", "nats.workerBatchBytes"]),
    value=st.integers(min_value=1, max_value=2**40),
)
def test_byte_budgets_are_bounded(key: str, value: int) -> None:
    env = {env_name(key): str(value)}
    if value > 1 << 30:
        assert _error(**env).key == key
    else:
        assert _get(load(None, environ=env), key) == value


@given(value=st.integers(min_value=1, max_value=2**40))
def test_max_payload_is_bounded_by_what_nats_can_carry(value: int) -> None:
    env = {"NATS_MAXPAYLOADBYTES": str(value)}
    if value > 64 * 1024 * 1024:
        err = _error(**env)
        assert err.key == "nats.maxPayloadBytes"
        assert str(64 * 1024 * 1024) in err.reason
    else:
        assert load(None, environ=env).nats.max_payload_bytes == value


@pytest.mark.parametrize(
    ("text", "seconds"), [("7d", 7 * 86400), ("0.5d", 43200), ("12h", 43200), ("90", 90)]
)
def test_timestamp_horizon_takes_days(text: str, seconds: float) -> None:
    cfg = load(None, environ={"HANDLERS_TIMESTAMPHORIZON": text})
    assert cfg.handlers.timestamp_horizon == seconds


@given(port=st.integers(min_value=0, max_value=65535))
def test_valid_port_from_env_round_trips(port: int) -> None:
    assert load(None, environ={"SERVER_PORT": str(port)}).server.port == port


@given(retries=st.integers(min_value=1, max_value=10**6), extra=st.integers(1, 10**6))
def test_retries_below_max_deliver_round_trip(retries: int, extra: int) -> None:
    cfg = load(
        None,
        environ={"NATS_DLQMAXRETRIES": str(retries), "NATS_DLQMAXDELIVER": str(retries + extra)},
    )
    assert (cfg.nats.dlq_max_retries, cfg.nats.dlq_max_deliver) == (retries, retries + extra)


@given(jitter=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_valid_jitter_from_env_round_trips(jitter: float) -> None:
    assert load(None, environ={"NATS_RETRYJITTER": repr(jitter)}).nats.retry_jitter == jitter


@given(days=st.floats(min_value=0.0, max_value=1e5, exclude_min=True))
def test_valid_max_age_from_env_round_trips(days: float) -> None:
    assert load(None, environ={"NATS_DLQMAXAGEDAYS": repr(days)}).nats.dlq_max_age_days == days


@given(
    base=st.floats(min_value=0.0, max_value=1e6),
    extra=st.floats(min_value=0.0, max_value=1e6),
)
def test_valid_minutes_from_env_round_trip(base: float, extra: float) -> None:
    top = base + extra
    cfg = load(
        None,
        environ={"NATS_DLQBASEDELAYMINUTES": repr(base), "NATS_DLQMAXDELAYMINUTES": repr(top)},
    )
    assert cfg.nats.dlq_base_delay_minutes == base
    assert cfg.nats.dlq_max_delay_minutes == top


@given(
    timeout_ms=st.integers(min_value=1, max_value=10**9),
    extra_ms=st.integers(min_value=1, max_value=10**9),
    unit=st.sampled_from(["ms", "s", ""]),
)
def test_valid_durations_from_env_round_trip(timeout_ms: int, extra_ms: int, unit: str) -> None:
    factor = 0.001 if unit == "ms" else 1.0
    timeout, wait = timeout_ms, timeout_ms + extra_ms
    cfg = load(
        None,
        environ={
            "NATS_WORKERTASKTIMEOUT": f"{timeout}{unit}",
            "NATS_DLQACKWAIT": f"{wait}{unit}",
        },
    )
    assert cfg.nats.worker_task_timeout == float(timeout) * factor
    assert cfg.nats.dlq_ack_wait == float(wait) * factor


NUMBERISH = set("0123456789.eE+-")


@given(
    key=st.sampled_from(INT_KEYS),
    garbage=st.text().filter(lambda s: not set(s) <= NUMBERISH) | st.just(""),
)
def test_garbage_for_an_int_key_is_a_config_error(key: str, garbage: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(None, environ={env_name(key): garbage})
    assert info.value.key == key
    assert info.value.value == garbage


@given(key=st.sampled_from(INT_KEYS), text=st.text(alphabet=sorted(NUMBERISH), max_size=30))
def test_numberish_text_for_an_int_key_is_an_int_or_a_config_error(key: str, text: str) -> None:
    try:
        cfg = load(None, environ={env_name(key): text})
    except ConfigError as err:
        assert err.key == key
    else:
        value = _get(cfg, key)
        # Zero workers is allowed: handlers then run in the supervisor.
        assert type(value) is int and value >= (0 if key == "nats.dlqWorkers" else 1)


@given(text=st.text())
def test_any_env_text_for_any_key_is_loaded_or_a_config_error(text: str) -> None:
    for key in leaf_keys(as_dict(Config())):
        try:
            load(None, environ={env_name(key): text})
        except ConfigError as err:
            assert err.key.startswith(key.split(".")[0])


# --- renamed keys and their aliases ------------------------------------------------

# A valid value for each renamed key, as an env string and as the Struct holds it.
RENAMED_VALUES = {
    "nats.retryJitter": ("0.5", 0.5),
    "nats.workerBatch": ("7", 7),
    "nats.workerBatchBytes": ("4096", 4096),
    "nats.maxInFlight": ("9", 9),
    "nats.maxInFlightBytes": ("65536", 65536),
    "nats.workerTaskTimeout": ("3s", 3.0),
    "nats.maxPayloadBytes": ("1000", 1000),
    "nats.shutdownNakDelay": ("250ms", 0.25),
}


def test_renamed_keys_are_the_canonical_ones_and_the_guides_keys_stay() -> None:
    keys = set(leaf_keys(as_dict(Config())))
    assert set(RENAMED.values()) <= keys
    assert not set(RENAMED) & keys
    assert set(RENAMED_VALUES) == set(RENAMED.values())
    # Keys of the old service's operators are not renamed.
    for kept in ("nats.dlqWorkers", "nats.dlqMaxRetries", "nats.dlqMaxDeliver", "nats.dlqAckWait"):
        assert kept in keys and kept not in RENAMED


@pytest.mark.parametrize(("old", "new"), sorted(RENAMED.items()))
def test_an_old_key_sets_its_new_name_from_env_and_from_file(
    old: str, new: str, tmp_path: Path
) -> None:
    text, want = RENAMED_VALUES[new]
    by_new = load(None, environ={env_name(new): text})
    by_old = load(None, environ={env_name(old): text})
    assert _get(by_new, new) == _get(by_old, new) == want
    assert by_old == by_new != Config()
    section, leaf = old.split(".")
    from_file = load(_write(tmp_path, {section: {leaf: text}}), environ={})
    assert from_file == by_new
    # The environment still wins over the file, whichever name either uses.
    other = load(_write(tmp_path, {section: {leaf: text}}), environ={env_name(new): text})
    assert other == by_new


@pytest.mark.parametrize(("old", "new"), sorted(RENAMED.items()))
def test_a_key_and_its_alias_set_differently_is_an_error(
    old: str, new: str, tmp_path: Path
) -> None:
    text, _ = RENAMED_VALUES[new]
    default = str(as_dict(Config())["nats"][new.split(".")[1]])
    err = _error(**{env_name(new): text, env_name(old): default})
    assert err.key == new
    assert env_name(old) in err.reason and env_name(new) in err.reason
    # The same value under both names is no conflict.
    assert _get(load(None, environ={env_name(new): text, env_name(old): text}), new)
    section, leaf = old.split(".")
    path = _write(tmp_path, {section: {leaf: default, new.split(".")[1]: text}})
    err = _error(path)
    assert err.key == old and new in err.reason


def test_an_error_names_the_alias_the_operator_wrote(tmp_path: Path) -> None:
    err = _error(NATS_DLQJITTER="1.5")
    assert (err.key, err.value) == ("nats.dlqJitter", 1.5)
    assert str(err) == "invalid config nats.dlqJitter=1.5: must be below 1.0"
    err = _error(_write(tmp_path, {"nats": {"dlqWorkerBatchBytes": 0}}))
    assert (err.key, err.value) == ("nats.dlqWorkerBatchBytes", 0)
    # A cross-field rule names the canonical key.
    assert _error(NATS_DLQTASKTIMEOUT="40s").key == "nats.workerTaskTimeout"


@given(
    new=st.sampled_from(sorted(RENAMED.values())),
    value=st.integers(min_value=-(2**40), max_value=2**40),
)
def test_an_alias_and_its_key_accept_and_refuse_the_same_values(new: str, value: int) -> None:
    [old] = [o for o, n in RENAMED.items() if n == new]
    results = []
    for name in (env_name(new), env_name(old)):
        try:
            results.append(("ok", _get(load(None, environ={name: str(value)}), new)))
        except ConfigError as err:
            assert err.key in (old, new)
            results.append(("error", err.reason))
    assert results[0] == results[1]


# --- per-field rules said plainly ----------------------------------------------------


@pytest.mark.parametrize(
    ("env", "value", "reason"),
    [
        ("NATS_DLQMAXDELIVER", "0", "must be positive"),
        ("NATS_DLQWORKERS", "-2", "cannot be negative (0 runs the handlers in the supervisor)"),
        ("NATS_DLQACKWAIT", "0s", "must be positive"),
        ("NATS_DLQMAXAGEDAYS", "inf", "must be a finite number"),
        ("NATS_DLQBASEDELAYMINUTES", "nan", "must be a finite number"),
        ("NATS_STREAMREPLICAS", "9", "must be at most 5 (JetStream's bound"),
        ("NATS_MAXINFLIGHTBYTES", str(2**31), "must be at most 1073741824"),
        ("NATS_MAXPAYLOADBYTES", str(2**27), "must be at most 67108864"),
        ("SERVER_PORT", "-1", "cannot be negative"),
        ("NATS_DLQSUBJECT", "v1.*", "not a literal NATS subject"),
        ("NATS_DLQSUBJECT", "v1..dlq", "not a literal NATS subject"),
        ("NATS_DLQSTREAM", "dlq\n", "not a valid name"),
        ("NATS_DLQCONSUMER", "a.b", "not a valid durable name"),
        ("COMPANY_ID", "_invalid", "not a valid tenant id"),
        ("LOG_LEVEL", "chatty", "expected DEBUG, INFO, WARNING or ERROR"),
        ("NATS_DLQWORKERS", "many", "Expected `int`, got `str`"),
    ],
)
def test_a_field_rule_is_reported_as_the_rule_naming_the_key(
    env: str, value: str, reason: str
) -> None:
    err = _error(**{env: value})
    key = next(k for k in leaf_keys(as_dict(Config())) if env_name(k) == env)
    assert err.key == key
    assert err.reason.startswith(reason), err.reason
    assert str(err).startswith(f"invalid config {key}=")
    assert "$." not in str(err)  # msgspec's own path syntax never reaches the operator


def test_log_level_is_case_insensitive() -> None:
    assert load(None, environ={"LOG_LEVEL": "debug"}).log.level == "debug"


# --- redaction ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u:secret@h:5432/db",
        "postgres://u:secret@h/db",
        "postgresql://:secret@h/db",
        "postgresql://u:sec%40secret@h/db",
        "postgresql://u@h/db?password=secret",
        "postgresql://u@h/db?sslmode=disable&password=secret&x=1",
        "host=h password=secret user=u",
        "password=secret",
        "host=h password = secret",
        "host=h password='se cret secret' user=u",
    ],
)
def test_redact_dsn_hides_the_password(dsn: str) -> None:
    out = redact_dsn(dsn)
    assert "secret" not in out
    assert "***" in out


def test_redact_dsn_keeps_the_rest() -> None:
    assert redact_dsn("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    # Rebuilt from libpq's parse, so in libpq's order of parameters.
    assert redact_dsn("host=h password=secret user=u") == "user=u password=*** host=h"
    no_password = "postgresql://postgres@127.0.0.1:5432/postgres"
    assert redact_dsn(no_password) == no_password
    assert redact_dsn("host=h user=u") == "user=u host=h"


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u:secret@h1:5432,h2:5433/db",
        "postgresql://u:secret@h:notaport/db",
    ],
)
def test_redact_dsn_never_raises(dsn: str) -> None:
    assert "secret" not in redact_dsn(dsn)


PASSWORDS = st.text(alphabet=string.ascii_letters + string.digits, min_size=6, max_size=30).map(
    lambda s: "PW" + s
)


@given(password=PASSWORDS)
def test_redact_dsn_property(password: str) -> None:
    for dsn in (
        f"postgresql://user:{password}@db.example:5432/app",
        f"postgresql://user@db.example/app?password={password}",
        f"host=db.example password={password} user=user",
        f"host=db.example password='{password}' user=user",
    ):
        assert password not in redact_dsn(dsn)


@pytest.mark.parametrize(
    "url",
    [
        "nats://user:secret@host:4222",
        "nats://secret@host:4222",
        "nats://a:secret@h1:4222,nats://b:secret@h2:4222",
        "tls://user:secret@host:4222",
    ],
)
def test_redact_url_hides_credentials(url: str) -> None:
    out = redact_url(url)
    assert "secret" not in out
    assert "host" in out or "h1" in out


def test_redact_url_keeps_plain_urls() -> None:
    assert redact_url("nats://user:pw@host:4222") == "nats://user:***@host:4222"
    assert redact_url("nats://token@host:4222") == "nats://***@host:4222"
    assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


def test_redacted_config_hides_secrets() -> None:
    cfg = load(
        None,
        environ={
            "POSTGRES_DSN": "postgresql://u:secret@h:5432/db",
            "NATS_URL": "nats://user:secret@host:4222",
        },
    )
    data = redacted(cfg)
    assert "secret" not in json.dumps(data)
    assert "secret" not in yaml.safe_dump(data)
    assert data["postgres"]["dsn"] == "postgresql://u:***@h:5432/db"
    assert data["nats"]["url"] == "nats://user:***@host:4222"
    # the config itself is untouched
    assert cfg.postgres.dsn == "postgresql://u:secret@h:5432/db"
    assert set(leaf_keys(data)) == set(leaf_keys(as_dict(cfg)))


def test_redacted_key_value_dsn() -> None:
    cfg = load(None, environ={"POSTGRES_DSN": "host=h password=secret user=u"})
    assert "secret" not in json.dumps(redacted(cfg))


# --- durable name and filter subject -----------------------------------------------


def test_durable_default() -> None:
    cfg = Config()
    assert cfg.dlq_durable == "v1_dlq_worker_consumer"
    assert cfg.dlq_filter_subject == "v1.dlq.>"


def test_durable_with_company() -> None:
    cfg = Config(company=CompanyConfig(id="acme"))
    assert cfg.dlq_durable == "v1_dlq_worker_consumer_acme"
    assert cfg.dlq_filter_subject == "v1.dlq.acme"


def test_durable_from_env() -> None:
    cfg = load(None, environ={"COMPANY_ID": "acme", "NATS_DLQSUBJECT": "v2.dead"})
    assert cfg.dlq_durable == "v2_dead_worker_consumer_acme"
    assert cfg.dlq_filter_subject == "v2.dead.acme"


def test_configured_durable_wins() -> None:
    cfg = Config(nats=NatsConfig(dlq_consumer="mine"), company=CompanyConfig(id="acme"))
    assert cfg.dlq_durable == "mine"
    assert cfg.dlq_filter_subject == "v1.dlq.acme"


def test_durable_is_a_valid_nats_name() -> None:
    for cfg in (Config(), Config(company=CompanyConfig(id="Acme-01_x"))):
        assert re.fullmatch(r"[A-Za-z0-9_-]+", cfg.dlq_durable)


# --- durations past what NATS and PostgreSQL carry ---------------------------------

# JetStream takes durations as int64 nanoseconds; PostgreSQL's statement_timeout
# is an int4 of milliseconds.
NATS_MAX_SECONDS = (2**63 - 1) / 1e9
PG_MAX_TIMEOUT_SECONDS = (2**31 - 1) / 1000
NATS_DURATION_KEYS = [
    ("nats.dlqAckWait", 1.0),
    ("nats.realtime.ackWait", 1.0),
    ("nats.historical.nakMaxDelay", 1.0),
    ("nats.realtime.nakMaxDelay", 1.0),
    ("nats.dlqMaxDelayMinutes", 60.0),
    ("nats.dlqMaxAgeDays", 86400.0),
]


@given(
    key_unit=st.sampled_from(NATS_DURATION_KEYS),
    seconds=st.floats(min_value=3600.0, max_value=1e15, allow_nan=False),
)
def test_durations_nats_carries_fit_its_nanoseconds(
    key_unit: tuple[str, float], seconds: float
) -> None:
    """A NAK delay past int64 ns was redelivered at once (every retry without
    delay); a longer ack wait or max age failed consumer or stream creation for
    nats.startupTimeout, then exit 1 as if NATS were down."""
    key, unit = key_unit
    env = {env_name(key): repr(seconds / unit)}
    if key == "nats.dlqAckWait":
        env["NATS_WORKERTASKTIMEOUT"] = "1s"
    try:
        cfg = load(None, environ=env)
    except ConfigError as err:
        assert err.key == key
        assert seconds > NATS_MAX_SECONDS * 0.999
        return
    assert _get(cfg, key) * unit * 1e9 <= 2**63 - 1


@pytest.mark.parametrize(
    ("text", "ok"), [("0", True), ("30s", True), ("24d", True), ("25d", False), ("1000d", False)]
)
def test_statement_timeout_fits_postgres(text: str, ok: bool) -> None:
    """PostgreSQL refuses a statement_timeout over 2^31-1 ms at connect: every
    connection failed and start-up ended with 'Postgres unavailable' (exit 1)."""
    env = {"POSTGRES_STATEMENTTIMEOUT": text}
    if ok:
        assert load(None, environ=env).postgres.statement_timeout <= PG_MAX_TIMEOUT_SECONDS
    else:
        err = _error(**env)
        assert err.key == "postgres.statementTimeout"
        assert "2147483647ms" in err.reason


@given(value=st.integers(min_value=0, max_value=2**63 - 1))
def test_the_worker_pool_is_bounded(value: int) -> None:
    """Every worker is a process started at once: NATS_DLQWORKERS=1000000 forked
    until the OOM killer stepped in, instead of exiting 2."""
    env = {"NATS_DLQWORKERS": str(value)}
    if value > 1024:
        err = _error(**env)
        assert (err.key, err.value) == ("nats.dlqWorkers", value)
        assert "must be at most 1024" in err.reason
    else:
        assert load(None, environ=env).nats.dlq_workers == value


# (env variable, its length on top of the name, the key an error names)
JS_NAMES = [
    ("NATS_DLQSTREAM", 0, "nats.dlqStream"),
    ("NATS_DLQCONSUMER", 0, "nats.dlqConsumer"),
    ("NATS_REALTIME_STREAM", 0, "nats.realtime.stream"),
    # The tenant's "_acme" is appended to a main durable.
    ("NATS_HISTORICAL_DURABLE", len("_acme"), "nats.historical.durable"),
    ("NATS_REALTIME_DURABLE", len("_acme"), "nats.realtime.durable"),
]


@pytest.mark.parametrize(("var", "suffix", "key"), JS_NAMES)
@pytest.mark.parametrize("length", [1, 255, 256, 10_000])
def test_jetstream_names_fit_nats_server(var: str, suffix: str, key: str, length: int) -> None:
    """nats-server refuses a stream or consumer name over 255 characters; start-up
    then failed as if NATS were down (exit 1). The name JetStream would get,
    a tenant's suffix included, is checked at load (exit 2 naming the key)."""
    env = {var: "n" * length, "COMPANY_ID": "acme"}
    if length + suffix <= 255:
        cfg = load(None, environ=env)
        assert max(len(cfg.dlq_durable), len(cfg.durable(cfg.nats.realtime))) <= 255
    else:
        err = _error(**env)
        assert err.key == key and "255" in err.reason
        assert len(str(err)) < 300  # the name itself is not echoed whole


def test_a_derived_dlq_durable_over_the_limit_names_the_subject() -> None:
    err = _error(NATS_DLQSUBJECT="s" * 250)  # + "_worker_consumer"
    assert err.key == "nats.dlqSubject"
