"""No configured secret in any output: `config`, log lines, driver errors, `migrate`,
`run` and `publish`, on real servers.

Property tests draw passwords of any characters and write them in every form
the clients accept (URI with percent-encoding, key=value quoted or
backslash-escaped, NATS URLs with and without a scheme, tokens); the
end-to-end tests run the real command against real servers with a few fixed
nasty passwords: a PostgreSQL role behind scram-sha-256 (the embedded server
trusts everyone else), and nats-servers that require a user/password or a
token.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import nats
import psycopg
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from nats.js import api
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from dlqproc import cli, redact
from dlqproc.broker import parse_server, server_list
from dlqproc.embedded import NatsServer, PostgresServer, free_port
from dlqproc.logs import JsonFormatter, Scrub
from support.service import Service

CANARY = "CANARYpw1"
# Any character a setting can hold: no NUL (neither libpq nor the environment
# carries one), no lone surrogates (not UTF-8).
PASSWORDS = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1, max_size=40
)
# Characters nats-py cannot carry in a URL password (it splits on them, or
# urllib refuses them) are filtered per example, not excluded here.

# --------------------------------------------------------------------------- helpers


def _kv_quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _kv_escaped(value: str) -> str:
    """libpq's unquoted form: a backslash escapes the next character (a space too)."""
    return "".join("\\" + c if c.isspace() or c in "'\\" else c for c in value) or "''"


def dsn_forms(password: str, host: str = "db.example", port: int = 5432) -> dict[str, str]:
    """The same password in each DSN form libpq reads it from."""
    enc = quote(password, safe="")
    return {
        "uri": f"postgresql://app:{enc}@{host}:{port}/events?sslmode=disable",
        "uri_query": f"postgres://app@{host}:{port}/events?password={enc}&application_name=x",
        "kv_quoted": f"host={host} port={port} user=app password={_kv_quoted(password)} dbname=ev",
        "kv_escaped": f"password={_kv_escaped(password)} host={host} port={port} user=app",
    }


def nats_forms(password: str, port: int = 4222) -> dict[str, str]:
    return {
        "scheme": f"nats://svc:{password}@127.0.0.1:{port}",
        "schemeless": f"svc:{password}@127.0.0.1:{port}",
        "token": f"nats://{password}@127.0.0.1:{port}",
        "list": f"nats://127.0.0.1:{port}, tls://svc:{password}@127.0.0.1:{port + 1}",
    }


def nats_carries(form: str, url: str, password: str) -> bool:
    """Whether nats-py reads `password` (the token, for form "token") back intact,
    from as many servers as the form has."""
    items = server_list(url)
    if len(items) != len(server_list(nats_forms(CANARY)[form])):
        return False
    last = parse_server(items[-1])
    want = (password, None) if form == "token" else ("svc", password)
    return last is not None and (last.username, last.password) == want


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def leaks(password: str, text: str, parsed: Any = None) -> bool:
    """The password in the text, in its JSON-escaped form, or in any parsed string."""
    forms = {password, json.dumps(password)[1:-1], json.dumps(password, ensure_ascii=False)[1:-1]}
    return any(f in text for f in forms) or any(password in s for s in strings(parsed))


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def config_outputs(env: dict[str, str]) -> list[tuple[str, Any]]:
    """`dlqproc config` and `dlqproc config --json`, in process: (text, parsed)."""
    out = []
    for args, parse in ((["config"], yaml.safe_load), (["config", "--json"], json.loads)):
        buf = io.StringIO()
        with environment(env), contextlib.redirect_stdout(buf):
            assert cli.main(args) == 0
        out.append((buf.getvalue(), parse(buf.getvalue())))
    return out


def config_leaks(password: str, env: dict[str, str]) -> bool:
    return any(leaks(password, text, parsed) for text, parsed in config_outputs(env))


# --------------------------------------------------------------------------- config


@settings(max_examples=60, deadline=None)
@given(password=PASSWORDS)
def test_config_never_prints_a_postgres_password(password: str) -> None:
    for form, dsn in dsn_forms(password).items():
        # The DSN really carries this password, as libpq reads it.
        assert conninfo_to_dict(dsn)["password"] == password, form
        baseline = dsn_forms(CANARY)[form]
        # A password that the output holds anyway (a key, a number, the mask) is no leak.
        assume(not config_leaks(password, {"POSTGRES_DSN": baseline}))
        assert not config_leaks(password, {"POSTGRES_DSN": dsn}), form


@settings(max_examples=60, deadline=None)
@given(password=PASSWORDS)
def test_config_never_prints_a_nats_password_or_token(password: str) -> None:
    for form, url in nats_forms(password).items():
        if nats_carries(form, url, password):
            baseline = nats_forms(CANARY)[form]
            assume(not config_leaks(password, {"NATS_URL": baseline}))
            assert not config_leaks(password, {"NATS_URL": url}), form


@settings(max_examples=200, deadline=None)
@given(password=PASSWORDS)
def test_the_displayed_dsn_is_libpqs_reading_with_the_password_masked(password: str) -> None:
    for form, dsn in dsn_forms(password).items():
        shown = redact.display_dsn(dsn)
        if password in redact.display_dsn(dsn_forms(CANARY)[form]):
            # It is in the other parameters too ("2" in port 5432): hidden there as well.
            assert password not in shown.replace(redact.MASK, ""), (form, shown)
            continue
        assert password not in shown, (form, shown)
        want = conninfo_to_dict(dsn) | {"password": redact.MASK}
        assert conninfo_to_dict(shown) == want, (form, shown)


@settings(max_examples=200, deadline=None)
@given(password=PASSWORDS)
def test_the_displayed_nats_url_is_nats_pys_reading_with_credentials_masked(
    password: str,
) -> None:
    for form, url in nats_forms(password).items():
        shown = redact.display_url(url)
        uris = [parse_server(item) for item in server_list(url)]
        # What nats-py would send: each server's password, or its token.
        sent = {u.password if u.password is not None else u.username for u in uris if u} - {
            None,
            "",
        }
        if None in uris:
            sent.add(password)  # a server nats-py refuses is not shown at all
        canary = redact.display_url(nats_forms(CANARY)[form])
        for secret in sent:
            assert isinstance(secret, str)
            if secret not in canary:
                # Per server: the list's own commas are no leak of a password ",".
                assert all(secret not in s for s in shown.split(",")), (form, secret, shown)
        if not nats_carries(form, url, password) or password in canary:
            continue
        for item, shown_item in zip(server_list(url), server_list(shown), strict=True):
            have, read = parse_server(item), parse_server(shown_item)
            assert have is not None and read is not None, shown_item
            assert (read.scheme, read.hostname, read.port) == (
                have.scheme,
                have.hostname,
                have.port,
            )
            if have.password is not None:
                assert (read.username, read.password) == (have.username, redact.MASK)
            elif have.username is not None:
                assert (read.username, read.password) == (redact.MASK, None)
            else:
                assert (read.username, read.password) == (None, None)


def test_known_leaks_of_the_old_redaction_are_closed() -> None:
    """The issue's cases, one by one."""
    cases = {
        "postgresql://app:pa?ss#wo rd@db/x": "pa?ss#wo rd",
        "postgresql://app:pa%3Fss%23wo%20rd@db/x": "pa?ss#wo rd",
        "postgresql://app:plain%zzSecret@db/x": "plain%zzSecret",
        r"host=db password=half\ secret user=app": "half secret",
    }
    for dsn, secret in cases.items():
        for text, parsed in config_outputs({"POSTGRES_DSN": dsn}):
            assert not leaks(secret, text, parsed), (dsn, text)
    for url in ("u:schemelessPW@127.0.0.1:4222", "nats://tokenTOKEN@127.0.0.1:4222"):
        secret = "schemelessPW" if "schemeless" in url else "tokenTOKEN"
        for text, parsed in config_outputs({"NATS_URL": url}):
            assert not leaks(secret, text, parsed), (url, text)


def test_an_unparsable_dsn_is_never_echoed() -> None:
    for dsn in (
        "postgresql://app:plain%zzSecret@db/x",
        "postgresql://app:has spaceSecret@db/x",
        "host=db password=unquoted spaceSecret user=app",
    ):
        shown = redact.display_dsn(dsn)
        assert shown.startswith(redact.MASK) and "Secret" not in shown, shown
        problem = redact.dsn_problem(dsn)
        assert problem is not None and "Secret" not in problem, problem
        assert redact.postgres_target(dsn) == {"dsn": "unparsable"}


def test_log_lines_name_host_port_and_database_only() -> None:
    dsn = "postgresql://app:s3cr3t@db.example:6432/events?sslmode=require"
    assert redact.postgres_target(dsn) == {"host": "db.example", "port": "6432", "dbname": "events"}
    assert redact.nats_targets("svc:pw@n1:4222,nats://tok@n2") == ["n1:4222", "n2:4222"]


# --------------------------------------------------------------------------- scrub


@pytest.fixture(scope="module")
def closed_port() -> int:
    return free_port()  # nothing listens there


def _connect_error(dsn: str) -> str:
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
    except psycopg.Error as exc:
        return str(exc)
    raise AssertionError(f"connected with {dsn!r}")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(password=PASSWORDS)
def test_driver_errors_are_scrubbed_of_the_password(password: str, closed_port: int) -> None:
    """psycopg's own errors for that DSN: a closed port, and libpq's parse errors,
    which echo the password as written."""
    enc = quote(password, safe="")
    at = f"127.0.0.1:{closed_port}"
    echoed = {  # DSNs libpq refuses, and the text it echoes from each
        "bad_percent": (f"postgresql://app:{enc}%zz@{at}/db", f"{enc}%zz"),
        "raw_space": (f"postgresql://app:{enc}%20x y@{at}/db", f"{enc}%20x y"),
        "query_bad_percent": (f"postgresql://app@{at}/db?password={enc}%zz", f"{enc}%zz"),
    }
    cases = {form: (dsn, "") for form, dsn in dsn_forms(password, "127.0.0.1", closed_port).items()}
    for form, (dsn, written) in {**cases, **echoed}.items():
        error = _connect_error(dsn)
        scrubbed = redact.Secrets(redact.postgres_secrets(dsn)).scrub(error)
        if written:
            # libpq does echo the password as written: the scrub has work to do.
            assert written in error, (form, error)
            assert written not in scrubbed, (form, scrubbed)
        canary_dsn = dsn.replace(enc, CANARY)
        canary = redact.Secrets(redact.postgres_secrets(canary_dsn)).scrub(
            _connect_error(canary_dsn)
        )
        for secret in {password, enc}:
            if secret not in canary:
                assert secret not in scrubbed, (form, scrubbed)


def _log_through_scrub(secrets: redact.Secrets, password: str) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(Scrub(secrets))
    logger = logging.getLogger(f"test_secrets.{id(out)}")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.error(
            "driver said %s",
            f"FATAL: bad token {password}!",
            extra={"error": f"x{password}y", "items": [password, 1], "obj": ValueError(password)},
        )
        try:
            raise RuntimeError(f"connection to {password} failed")
        except RuntimeError:
            logger.exception("failed %r", password)
    finally:
        logger.removeHandler(handler)
    return out.getvalue()


@settings(max_examples=100, deadline=None)
@given(password=PASSWORDS)
def test_the_log_filter_scrubs_message_args_fields_and_exceptions(password: str) -> None:
    secrets = redact.Secrets([password])
    text = _log_through_scrub(secrets, password)
    parsed = [json.loads(line) for line in text.splitlines()]
    assert len(parsed) == 2 and parsed[1]["exc"]  # the traceback is logged, scrubbed
    if password not in "Traceback (most recent call last):":
        assert parsed[1]["exc"].startswith("Traceback")
    baseline = _log_through_scrub(redact.Secrets([CANARY]), CANARY)
    base_parsed = [json.loads(line) for line in baseline.splitlines()]
    if not leaks(password, baseline.replace(CANARY, ""), base_parsed):
        assert not leaks(password, text, parsed), text


# --------------------------------------------------------------------------- end to end

# Fixed nasty passwords: everything libpq and nats-py must carry.
PG_PASSWORDS = ["?#@:/ %'\"\\ pässwörd ✓", "a'b\\c d=e&f%zz;--"]
NATS_PASSWORD = "p@ss:w0rd'\"\\ %zz$&*ü€"
NATS_WRONG = "wr@ng:p4ss'\"\\ %41ü"
NATS_TOKEN = "t0k3n'\"\\ %zz$&*ü€"


def dlqproc(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, str, float]:
    """Run `python -m dlqproc`; (exit code, stdout + stderr, seconds)."""
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "dlqproc", *args],
        capture_output=True,
        timeout=timeout,
        env={**os.environ, "LOG_LEVEL": "DEBUG", **(env or {})},
    )
    text = (out.stdout + out.stderr).decode("utf-8", "replace")
    return out.returncode, text, time.monotonic() - started


def assert_hidden(text: str, *secrets: str) -> None:
    for secret in secrets:
        for form in {secret, quote(secret, safe=""), json.dumps(secret)[1:-1]}:
            assert form not in text, (form, text)


@pytest.mark.parametrize("password", PG_PASSWORDS)
@pytest.mark.parametrize("form", ["uri", "uri_query", "kv_quoted", "kv_escaped"])
def test_migrate_and_run_against_a_closed_port_print_no_password(
    password: str, form: str, closed_port: int, nats_server: NatsServer, tmp_path: Path
) -> None:
    dsn = dsn_forms(password, "127.0.0.1", closed_port)[form]
    code, text, _ = dlqproc("migrate", env={"POSTGRES_DSN": dsn})
    assert code == 1 and "cannot connect to Postgres" in text, text
    assert_hidden(text, password)

    svc = Service(nats_server.url, dsn, tmp_path).start(wait=False)
    assert svc.wait_exit(60) == 1
    log = svc.log_text()
    assert svc.find("cannot start: Postgres unavailable"), log
    [connecting] = svc.find("connecting")
    params = conninfo_to_dict(dsn)
    assert connecting["postgres"] == {
        k: params[k] for k in ("host", "port", "dbname") if k in params
    }
    assert_hidden(log, password)


def test_an_unparsable_dsn_exits_2_and_is_not_echoed(
    closed_port: int, nats_server: NatsServer, tmp_path: Path
) -> None:
    for dsn in (
        f"postgresql://app:plain%zzSecret@127.0.0.1:{closed_port}/db",
        f"host=127.0.0.1 port={closed_port} password=two wordsSecret",
    ):
        code, text, _ = dlqproc("migrate", env={"POSTGRES_DSN": dsn})
        assert code == 2 and "postgres.dsn" in text, text
        assert "Secret" not in text, text

        svc = Service(nats_server.url, dsn, tmp_path).start(wait=False)
        assert svc.wait_exit(60) == 2
        assert svc.find("cannot start: postgres.dsn does not parse"), svc.log_text()
        assert "Secret" not in svc.log_text()


@pytest.fixture
def password_role(pg_server: PostgresServer) -> Iterator[tuple[str, str, str]]:
    """A role that must give its password (scram-sha-256), owning a database of its own.

    The embedded server trusts every connection; one pg_hba line, first, for
    this role alone makes it the exception. Yields (role, its password, database).
    """
    role, db, password = f"secret_role_{os.getpid()}", f"secret_db_{os.getpid()}", PG_PASSWORDS[0]
    hba = pg_server.data_dir / "pg_hba.conf"
    original = hba.read_text()
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(db)))
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(*map(sql.Identifier, (db, role)))
        )
        hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + original)
        conn.execute("SELECT pg_reload_conf()")
    try:
        wrong = f"host={pg_server.host} port={pg_server.port} user={role} dbname={db} password=x"
        deadline = time.monotonic() + 10
        while "password authentication failed" not in _connect_error_or_ok(wrong):
            assert time.monotonic() < deadline, "pg_hba.conf not reloaded within 10 s"
            time.sleep(0.05)
        yield role, password, db
    finally:
        hba.write_text(original)
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(db)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def _connect_error_or_ok(dsn: str) -> str:
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
    except psycopg.Error as exc:
        return str(exc)
    return "ok"


def test_a_wrong_password_on_real_postgres_is_never_printed(
    password_role: tuple[str, str, str],
    pg_server: PostgresServer,
    nats_server: NatsServer,
    tmp_path: Path,
) -> None:
    role, password, db = password_role
    host, port = pg_server.host, pg_server.port
    right = f"postgresql://{role}:{quote(password, safe='')}@{host}:{port}/{db}"
    # The nasty password works: the server checks it, and dlqproc carries it intact.
    code, text, _ = dlqproc("migrate", env={"POSTGRES_DSN": right})
    assert code == 0 and "001_exhausted_events.sql" in text, text
    assert_hidden(text, password)

    wrong_password = PG_PASSWORDS[1]
    for wrong in (
        f"postgresql://{role}:{quote(wrong_password, safe='')}@{host}:{port}/{db}",
        f"host={host} port={port} user={role} dbname={db} password={_kv_quoted(wrong_password)}",
    ):
        code, text, _ = dlqproc("migrate", env={"POSTGRES_DSN": wrong})
        assert code == 1 and "password authentication failed" in text, text
        assert_hidden(text, wrong_password)

        svc = Service(nats_server.url, wrong, tmp_path).start(wait=False)
        assert svc.wait_exit(60) == 1
        [line] = svc.find("cannot start: Postgres unavailable")
        assert "password authentication failed" in line["error"]
        assert_hidden(svc.log_text(), wrong_password)


def _nats_conf(**auth: str) -> str:
    # nats-server reads JSON-style double-quoted strings with backslash escapes.
    body = "\n".join(f"  {k}: {json.dumps(v, ensure_ascii=False)}" for k, v in auth.items())
    return f"authorization {{\n{body}\n}}"


@pytest.fixture(scope="module")
def auth_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server that admits user svc with NATS_PASSWORD only."""
    with NatsServer(
        tmp_path_factory.mktemp("auth-nats"), config=_nats_conf(user="svc", password=NATS_PASSWORD)
    ) as server:
        yield server


@pytest.fixture(scope="module")
def token_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(
        tmp_path_factory.mktemp("token-nats"), config=_nats_conf(token=NATS_TOKEN)
    ) as server:
        yield server


def _with_creds(server: NatsServer, userinfo: str, scheme: bool = True) -> str:
    return f"{'nats://' if scheme else ''}{userinfo}@{server.host}:{server.port}"


async def _add_stream(url: str, name: str, subject: str) -> None:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        await nc.jetstream().add_stream(api.StreamConfig(name=name, subjects=[subject]))
    finally:
        await nc.close()


def test_publish_never_prints_nats_credentials(
    auth_nats: NatsServer, token_nats: NatsServer
) -> None:
    right = _with_creds(auth_nats, f"svc:{NATS_PASSWORD}")
    subject = f"secrets{os.getpid()}.x"
    asyncio.run(_add_stream(right, f"secrets{os.getpid()}", f"secrets{os.getpid()}.>"))
    publish = ("publish", "--subject", subject, "--body", "{}", "--quiet")
    # The right password, in both URL forms: accepted, and not printed.
    for url in (right, _with_creds(auth_nats, f"svc:{NATS_PASSWORD}", scheme=False)):
        code, text, _ = dlqproc(*publish, "--url", url)
        assert code == 0 and "acknowledged 1" in text, text
        assert_hidden(text, NATS_PASSWORD)

    for url, secret, server in (
        (_with_creds(auth_nats, f"svc:{NATS_WRONG}"), NATS_WRONG, auth_nats),
        (_with_creds(auth_nats, f"svc:{NATS_WRONG}", scheme=False), NATS_WRONG, auth_nats),
        (
            _with_creds(token_nats, NATS_WRONG.replace(":", "")),
            NATS_WRONG.replace(":", ""),
            token_nats,
        ),
    ):
        code, text, seconds = dlqproc(*publish, "--url", url)
        assert code == 1, text
        # Named at once, not after the 10 s connect timeout.
        assert "Authorization Violation" in text and seconds < 8, (seconds, text)
        assert f"{server.host}:{server.port}" in text  # where, without the credentials
        assert_hidden(text, secret)


def test_the_right_token_is_accepted_and_not_printed(token_nats: NatsServer) -> None:
    url = _with_creds(token_nats, NATS_TOKEN)
    subject = f"tok{os.getpid()}.x"
    asyncio.run(_add_stream(url, f"tok{os.getpid()}", f"tok{os.getpid()}.>"))
    code, text, _ = dlqproc("publish", "--url", url, "--subject", subject, "--body", "{}")
    assert code == 0 and "acknowledged 1" in text, text
    assert_hidden(text, NATS_TOKEN)


def test_run_names_the_nats_authorization_failure_at_once(
    auth_nats: NatsServer, dsn: str, tmp_path: Path
) -> None:
    for url in (
        _with_creds(auth_nats, f"svc:{NATS_WRONG}"),
        _with_creds(auth_nats, f"svc:{NATS_WRONG}", scheme=False),
    ):
        started = time.monotonic()
        svc = Service(url, dsn, tmp_path).start(wait=False)
        assert svc.wait_exit(60) == 1, svc.log_text()
        seconds = time.monotonic() - started
        [line] = svc.find("cannot start: NATS refused the credentials")
        assert "Authorization Violation" in line["error"], line
        assert seconds < 15, seconds  # not the 30 s connect timeout
        [connecting] = svc.find("connecting")
        assert connecting["nats"] == [f"{auth_nats.host}:{auth_nats.port}"]
        assert_hidden(svc.log_text(), NATS_WRONG)


def test_run_with_the_right_nats_password_starts_and_prints_no_secret(
    auth_nats: NatsServer, dsn: str, tmp_path: Path
) -> None:
    url = _with_creds(auth_nats, f"svc:{NATS_PASSWORD}", scheme=False)
    svc = Service(url, dsn, tmp_path).start()
    assert svc.stop() == 0
    assert_hidden(svc.log_text(), NATS_PASSWORD)
