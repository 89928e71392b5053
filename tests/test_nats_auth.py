"""NATS credentials and TLS from the config keys (nats.user/password, nats.token,
nats.nkeySeedFile, nats.credsFile, nats.tlsCaFile...), against real nats-servers
configured for each, and never printed; and `dlqproc run` waiting for a NATS
that is not up yet."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dlqproc import redact
from dlqproc.broker import Broker, ConnectRefused, StreamSpec
from dlqproc.config import ConfigError, NatsConfig, load, redacted
from dlqproc.embedded import NatsServer, free_port
from support.nats_jwt import Identity, Operator
from support.nats_jwt import creds as creds_text
from support.service import Service, envelope, wait_until

PASSWORD = "pw:with@odd/chars"
TOKEN = "tok-CANARY-42"


def _nats(tmp: Path, config: str) -> NatsServer:
    return NatsServer(tmp, config=config)


def _cfg(**env: str) -> NatsConfig:
    return load(environ=env).nats


async def _roundtrip(url: str, cfg: NatsConfig) -> None:
    broker = await Broker.connect(url, timeout=10, credentials=cfg)
    try:
        assert broker.connected
    finally:
        await broker.close()


def _refused(url: str, cfg: NatsConfig) -> str:
    with pytest.raises(ConnectRefused) as info:
        asyncio.run(Broker.connect(url, timeout=10, credentials=cfg))
    return str(info.value)


@pytest.fixture(scope="module")
def user_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    conf = f'authorization {{ user: "svc"\n password: {json.dumps(PASSWORD)} }}'
    with _nats(tmp_path_factory.mktemp("user-nats"), conf) as server:
        yield server


@pytest.fixture(scope="module")
def token_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with _nats(tmp_path_factory.mktemp("tok-nats"), f'authorization {{ token: "{TOKEN}" }}') as s:
        yield s


def test_user_and_password_keys(user_nats: NatsServer) -> None:
    url = f"nats://{user_nats.host}:{user_nats.port}"
    asyncio.run(_roundtrip(url, _cfg(NATS_USER="svc", NATS_PASSWORD=PASSWORD)))
    text = _refused(url, _cfg(NATS_USER="svc", NATS_PASSWORD="wrong-CANARY"))
    assert "Authorization Violation" in text
    assert _refused(url, _cfg()) != ""  # no credentials: refused too


def test_token_key(token_nats: NatsServer) -> None:
    url = f"nats://{token_nats.host}:{token_nats.port}"
    asyncio.run(_roundtrip(url, _cfg(NATS_TOKEN=TOKEN)))
    assert "Authorization Violation" in _refused(url, _cfg(NATS_TOKEN="nope"))


def test_nkey_seed_file(tmp_path: Path) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(seed).public_key.decode()
    (tmp_path / "user.nk").write_bytes(seed + b"\n")
    conf = f'authorization {{ users: [ {{ nkey: "{public}" }} ] }}'
    with _nats(tmp_path / "nats", conf) as server:
        url = f"nats://{server.host}:{server.port}"
        asyncio.run(_roundtrip(url, _cfg(NATS_NKEYSEEDFILE=str(tmp_path / "user.nk"))))
        assert _refused(url, _cfg(NATS_TOKEN="x"))


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dlqproc-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "server.crt", tmp / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_with_a_self_signed_server_certificate(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    conf = (
        f'tls {{ cert_file: "{cert}"\n key_file: "{key}" }}\nauthorization {{ token: "{TOKEN}" }}'
    )
    with _nats(tmp_path / "nats", conf) as server:
        url = f"tls://{server.host}:{server.port}"
        asyncio.run(_roundtrip(url, _cfg(NATS_TLSCAFILE=str(cert), NATS_TOKEN=TOKEN)))
        # The server's certificate is not one the system trusts: refused without the CA.
        with pytest.raises(Exception, match=r"(?i)certificate"):
            asyncio.run(Broker.connect(url, timeout=5, credentials=_cfg(NATS_TOKEN=TOKEN)))


def test_secrets_are_masked_and_kinds_not_mixed() -> None:
    cfg = load(environ={"NATS_USER": "svc", "NATS_PASSWORD": PASSWORD})
    shown = json.dumps(redacted(cfg))
    assert PASSWORD not in shown and redact.MASK in shown
    assert redact.secrets_of(load(environ={"NATS_TOKEN": TOKEN})).scrub(f"x {TOKEN} y") == (
        f"x {redact.MASK} y"
    )
    with pytest.raises(ConfigError, match=r"nats\.token"):
        load(environ={"NATS_USER": "svc", "NATS_TOKEN": TOKEN})
    with pytest.raises(ConfigError, match=r"nats\.password"):
        load(environ={"NATS_PASSWORD": PASSWORD})
    with pytest.raises(ConfigError, match=r"nats\.tlsKeyFile"):
        load(environ={"NATS_TLSCERTFILE": "/x.crt"})


# -- .creds files against a server in operator (JWT) mode ------------------------------


@pytest.fixture(scope="module")
def operator() -> Operator:
    return Operator()


@pytest.fixture(scope="module")
def operator_nats(
    operator: Operator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NatsServer]:
    with _nats(tmp_path_factory.mktemp("jwt-nats"), operator.server_config()) as server:
        yield server


def _secrets_of(creds: Path) -> list[str]:
    """The user JWT, its signature and the seed in a .creds file: none may be logged."""
    lines = creds.read_text().splitlines()
    jwt = lines[lines.index("-----BEGIN NATS USER JWT-----") + 1]
    seed = lines[lines.index("-----BEGIN USER NKEY SEED-----") + 1]
    return [jwt, jwt.rsplit(".", 1)[1], seed, seed[10:40]]


def _bad_creds(operator: Operator, tmp: Path) -> dict[str, Path]:
    """.creds files the operator-mode server must refuse, by what is wrong with them."""
    expired = operator.creds_file(tmp / "expired.creds", expires=int(time.time()) - 60)
    stranger = Identity.new(nkeys.PREFIX_BYTE_ACCOUNT)  # an account the server does not know
    unknown = operator.creds_file(tmp / "unknown.creds", account=stranger)
    # A valid JWT with another user's seed: the nonce signature does not match.
    good, other = operator.user(), operator.user()
    swapped = tmp / "swapped.creds"
    swapped.write_text(creds_text(good[0], other[1]), encoding="utf-8")
    return {"expired": expired, "unknown account": unknown, "wrong seed": swapped}


async def _jetstream_roundtrip(url: str, cfg: NatsConfig) -> int:
    """Create a stream, publish to it; the messages it holds."""
    broker = await Broker.connect(url, timeout=10, credentials=cfg)
    try:
        await broker.ensure_stream(StreamSpec("creds_probe", ("creds.probe",), 1.0), False)
        await broker.publish("creds.probe", b"{}")
        return await broker.stream_messages("creds_probe")
    finally:
        await broker.close()


def test_creds_file_against_an_operator_mode_server(
    operator: Operator, operator_nats: NatsServer, tmp_path: Path
) -> None:
    url = operator_nats.url
    creds = operator.creds_file(tmp_path / "user.creds")
    asyncio.run(_roundtrip(url, _cfg(NATS_CREDSFILE=str(creds))))
    # The account's JWT enables JetStream for its users.
    assert asyncio.run(_jetstream_roundtrip(url, _cfg(NATS_CREDSFILE=str(creds)))) == 1
    for what, bad in _bad_creds(operator, tmp_path).items():
        assert "Authorization Violation" in _refused(url, _cfg(NATS_CREDSFILE=str(bad))), what
    # No credentials at all: an operator-mode server lets nobody in.
    assert "Authorization Violation" in _refused(url, _cfg())


def test_run_with_a_creds_file_processes_and_logs_no_secret(
    operator: Operator, operator_nats: NatsServer, dsn: str, tmp_path: Path
) -> None:
    creds = operator.creds_file(tmp_path / "svc.creds")
    svc = Service(operator_nats.url, dsn, tmp_path, NATS_CREDSFILE=str(creds)).start()
    try:
        svc.wait_ready(timeout=30)
        bodies = [envelope("t.ok", "acme", {"id": f"c{i}"}) for i in range(5)]
        asyncio.run(_publish(operator_nats.url, creds, f"{svc.subject}.acme", bodies))
        wait_until(lambda: len(svc.rows("acme")) == 5, timeout=30)
    finally:
        assert svc.stop() == 0, svc.log_text()
    assert svc.rows("acme") == {f"c{i}": 1 for i in range(5)}
    _assert_hidden(svc.log_text(), _secrets_of(creds))


def test_run_with_refused_creds_exits_at_once_naming_it(
    operator: Operator, operator_nats: NatsServer, dsn: str, tmp_path: Path
) -> None:
    for what, bad in _bad_creds(operator, tmp_path).items():
        svc = Service(operator_nats.url, dsn, tmp_path, NATS_CREDSFILE=str(bad))
        svc.start(wait=False)
        # The default startupTimeout is 60 s: a refusal must not wait it out.
        assert svc.wait_exit(30) == 1, (what, svc.log_text())
        [line] = svc.find("cannot start: NATS refused the credentials")
        assert "Authorization Violation" in line["error"], (what, line)
        assert svc.find("Starting DLQ worker...") == []
        _assert_hidden(svc.log_text(), _secrets_of(bad))


async def _publish(url: str, creds: Path, subject: str, bodies: list[bytes]) -> None:
    nc = await nats.connect(url, user_credentials=str(creds), connect_timeout=5)
    try:
        js = nc.jetstream()
        for body in bodies:
            await js.publish(subject, body, timeout=10)
    finally:
        await nc.close()


def _assert_hidden(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text, secret


# -- start-up before NATS is up -------------------------------------------------------

RETRYING = "NATS not reachable yet, retrying"


def test_run_waits_for_nats_to_come_up_then_starts(dsn: str, tmp_path: Path) -> None:
    port = free_port()
    svc = Service(
        f"nats://127.0.0.1:{port}", dsn, tmp_path, NATS_TOKEN=TOKEN, NATS_STARTUPTIMEOUT="60s"
    )
    proc = svc.start(wait=False).proc
    assert proc is not None
    try:
        # Each failed attempt is logged; three of them, and it is still waiting.
        wait_until(lambda: len(svc.find(RETRYING)) >= 3 or proc.poll() is not None)
        assert proc.poll() is None, svc.log_text()
        assert svc.find("Starting DLQ worker...") == []
        conf = f'authorization {{ token: "{TOKEN}" }}'
        with NatsServer(tmp_path / "late-nats", port=port, config=conf) as server:
            wait_until(lambda: svc.find("Starting DLQ worker...") or proc.poll() is not None)
            assert proc.poll() is None, svc.log_text()
            svc.wait_ready(timeout=30)
            bodies = [envelope("t.ok", "acme", {"id": "late"})]
            asyncio.run(_publish_token(server.url, f"{svc.subject}.acme", bodies))
            wait_until(lambda: svc.rows("acme") == {"late": 1}, timeout=30)
            assert svc.stop() == 0, svc.log_text()
    finally:
        svc.stop()
    retries = svc.find(RETRYING)
    assert len(retries) >= 3 and all(e["error"] for e in retries), retries
    # Counting down the nats.startupTimeout it was given.
    waits = [e["gives_up_in"] for e in retries]
    assert waits == sorted(waits, reverse=True) and 0 < waits[-1] < waits[0] <= 60, waits
    assert svc.find("cannot start: NATS unavailable") == []
    _assert_hidden(svc.log_text(), [TOKEN])


def test_run_gives_up_when_nats_stays_down(dsn: str, tmp_path: Path) -> None:
    svc = Service(
        f"nats://127.0.0.1:{free_port()}", dsn, tmp_path, NATS_TOKEN=TOKEN,
        NATS_STARTUPTIMEOUT="3s",
    )  # fmt: skip
    svc.start(wait=False)
    assert svc.wait_exit(60) == 1, svc.log_text()
    [line] = svc.find("cannot start: NATS unavailable")
    assert line["error"], line
    assert len(svc.find(RETRYING)) >= 2  # retried within the 3 s, each logged
    _assert_hidden(svc.log_text(), [TOKEN])


async def _publish_token(url: str, subject: str, bodies: list[bytes]) -> None:
    nc = await nats.connect(url, token=TOKEN, connect_timeout=5)
    try:
        js = nc.jetstream()
        for body in bodies:
            await js.publish(subject, body, timeout=10)
    finally:
        await nc.close()
