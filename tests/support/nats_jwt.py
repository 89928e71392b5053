"""NATS decentralized auth for tests: operator, account and user JWTs (v2 claims)
signed with NKeys, a `.creds` file, and the nats-server configuration that
trusts them, without nsc.

A JWT is `base64url(header).base64url(claims).base64url(ed25519 signature)`,
signed by the issuer's seed; `jti` is the unpadded base32 SHA-512/256 of the
claims without it, as nats-io/jwt computes it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import msgspec
import nkeys

_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}

# Every limit off, JetStream storage unlimited: dlqproc creates streams and consumers.
ACCOUNT_LIMITS: dict[str, Any] = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
    "mem_storage": -1,
    "disk_storage": -1,
    "streams": -1,
    "consumer": -1,
}
# nats-server refuses JetStream in the system account.
SYSTEM_LIMITS = {**ACCOUNT_LIMITS, "mem_storage": 0, "disk_storage": 0, "streams": 0, "consumer": 0}
USER_LIMITS: dict[str, Any] = {"subs": -1, "data": -1, "payload": -1}


class Identity(msgspec.Struct, frozen=True):
    seed: bytes
    public: str

    @classmethod
    def new(cls, prefix: int) -> Identity:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        return cls(seed, nkeys.from_seed(seed).public_key.decode())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def encode(issuer: Identity, subject: str, nats: dict[str, Any], **claims: Any) -> str:
    """A JWT for `subject`, issued and signed by `issuer`. `claims`: e.g. name, exp."""
    body: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public,
        "sub": subject,
        **claims,
        "nats": nats,
    }
    digest = hashlib.new("sha512_256", _json(body)).digest()
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    signing = f"{_b64(_json(_HEADER))}.{_b64(_json(body))}"
    signature = nkeys.from_seed(bytearray(issuer.seed)).sign(signing.encode())
    return f"{signing}.{_b64(signature)}"


def creds(jwt: str, seed: bytes) -> str:
    """The text of a `.creds` file, in the layout nsc writes and nats clients parse."""
    return (
        f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
    )


class Operator:
    """An operator with one application account and a system account."""

    def __init__(self) -> None:
        self.key = Identity.new(nkeys.PREFIX_BYTE_OPERATOR)
        self.account = Identity.new(nkeys.PREFIX_BYTE_ACCOUNT)
        self.system = Identity.new(nkeys.PREFIX_BYTE_ACCOUNT)
        self.jwt = encode(
            self.key,
            self.key.public,
            {"type": "operator", "version": 2, "system_account": self.system.public},
            name="dlqproc-test",
        )
        self.account_jwt = encode(
            self.key,
            self.account.public,
            {"type": "account", "version": 2, "limits": ACCOUNT_LIMITS},
            name="APP",
        )
        self.system_jwt = encode(
            self.key,
            self.system.public,
            {"type": "account", "version": 2, "limits": SYSTEM_LIMITS},
            name="SYS",
        )

    def server_config(self) -> str:
        """nats-server configuration text: trust this operator, accounts preloaded in memory."""
        return (
            f"operator: {self.jwt}\n"
            f"system_account: {self.system.public}\n"
            "resolver: MEMORY\n"
            "resolver_preload: {\n"
            f"  {self.account.public}: {self.account_jwt}\n"
            f"  {self.system.public}: {self.system_jwt}\n"
            "}\n"
        )

    def user(
        self, *, account: Identity | None = None, expires: int | None = None
    ) -> tuple[str, bytes]:
        """(user JWT, its seed) in the application account, or issued by another `account`."""
        user = Identity.new(nkeys.PREFIX_BYTE_USER)
        claims: dict[str, Any] = {"name": "dlqproc"}
        if expires is not None:
            claims["exp"] = expires
        nats = {"type": "user", "version": 2, "pub": {}, "sub": {}, **USER_LIMITS}
        return encode(account or self.account, user.public, nats, **claims), user.seed

    def creds_file(self, path: Path, **user: Any) -> Path:
        jwt, seed = self.user(**user)
        path.write_text(creds(jwt, seed), encoding="utf-8")
        path.chmod(0o600)
        return path
