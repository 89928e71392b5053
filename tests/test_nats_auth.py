"""NATS credentials and TLS from the config keys (nats.user/password, nats.token,
nats.nkeySeedFile, nats.tlsCaFile...), against real nats-servers configured for
each, and never printed."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
from collections.abc import Iterator
from pathlib import Path

import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dlqproc import redact
from dlqproc.broker import Broker, ConnectRefused
from dlqproc.config import ConfigError, NatsConfig, load, redacted
from dlqproc.embedded import NatsServer

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
