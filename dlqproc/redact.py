"""Secrets in the connection settings, and the one path that keeps them out of every output.

This module owns three things:

* which strings are secret. postgres.dsn is parsed with libpq's own parser
  (psycopg.conninfo.conninfo_to_dict: URI and key=value forms, quoting,
  escaping, percent-encoding, query parameters); its `password` and
  `sslpassword` are secret, decoded and as written (libpq echoes the written
  text in its parse errors). nats.url is split as Broker.connect splits it and
  each server read by nats-py's own parser: the password of `user:password@`,
  or the token of `token@`. A DSN libpq cannot parse has its whole
  password-ish part taken as secret instead. nats.password, nats.token and
  console.token (the web console's operator token) are secret too; NKey seeds
  and .creds files stay in their files.
* the printable forms of the two settings, rebuilt from the parsed parameters
  with every password and token replaced by MASK (never the string as given),
  and the host / port / database summary log lines carry instead.
* Secrets.scrub, which every log record (logs.Scrub), CLI error line and driver
  message goes through: each secret, in each form it may be printed in, becomes
  MASK wherever it appears.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlencode

from psycopg.conninfo import conninfo_to_dict

if TYPE_CHECKING:
    from urllib.parse import ParseResult

    from dlqproc.config import Config

MASK = "***"

# libpq's parameters that hold a secret (PGPASSWORD is "password" in a DSN).
_SECRET_KEYS = ("password", "sslpassword")
_URI_PREFIXES = ("postgresql://", "postgres://")  # libpq's, compared as libpq does
# The password-ish rest of a key=value DSN libpq refused (fallback only).
_KV_PASSWORD = re.compile(r"(?<!\S)(?:ssl)?password\s*=\s*(.*)", re.DOTALL)


def _forms(value: str) -> set[str]:
    """The ways a secret may be printed: as is, percent-decoded, and escaped as
    JSON and Python repr do (an exception or a log field may carry either)."""
    forms = {value, unquote(value)}
    forms.add(json.dumps(value)[1:-1])
    forms.add(json.dumps(value, ensure_ascii=False)[1:-1])
    forms.add(repr(value)[1:-1])
    return {f for f in forms if f}


class Secrets:
    """A set of secret strings, and the scrub that replaces each with MASK."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        found: set[str] = set()
        for value in values:
            if value:
                found |= _forms(value)
        self.values = frozenset(found)
        # One pass, longest first: a secret inside a longer one never splits it.
        ordered = sorted(self.values, key=lambda v: (-len(v), v))
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def __or__(self, other: Secrets) -> Secrets:
        return Secrets(self.values | other.values)

    def scrub(self, text: str) -> str:
        """`text` with every secret replaced by MASK."""
        if self._pattern is None:
            return text
        return self._pattern.sub(MASK, text)

    def scrub_tree(self, value: Any) -> Any:
        """Strings in nested dicts, lists and tuples scrubbed; other values kept."""
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, Mapping):
            return {self.scrub_tree(k): self.scrub_tree(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.scrub_tree(v) for v in value)
        return value


def secrets_of(cfg: Config) -> Secrets:
    """Every secret in the loaded config."""
    return Secrets(
        [
            *postgres_secrets(cfg.postgres.dsn),
            *nats_secrets(cfg.nats.url),
            cfg.nats.password,
            cfg.nats.token,
            cfg.console.token,
        ]
    )


# --------------------------------------------------------------------------- PostgreSQL


def parse_dsn(dsn: str) -> dict[str, str]:
    """libpq's reading of the DSN; raises ValueError with libpq's (unscrubbed) reason."""
    try:
        return {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except Exception as exc:  # psycopg.ProgrammingError; NUL bytes raise others
        raise ValueError(str(exc).strip() or type(exc).__name__) from None


def _is_uri(dsn: str) -> bool:
    return dsn.startswith(_URI_PREFIXES)


def _uri_credentials(dsn: str) -> tuple[str, str | None] | None:
    """(user, password) as written in a URI, split as libpq splits them: the
    credentials end at the first '@' before any '/', the user at the first ':'."""
    rest = dsn.split("://", 1)[1]
    end = min((i for i in (rest.find("@"), rest.find("/")) if i >= 0), default=-1)
    if end < 0 or rest[end] != "@":
        return None
    user, colon, password = rest[:end].partition(":")
    return user, (password if colon else None)


def _uri_query_secrets(dsn: str) -> set[str]:
    """Secret query parameters (`?password=`) as written in a URI."""
    found: set[str] = set()
    _, _, query = dsn.partition("?")
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        if unquote(key) in _SECRET_KEYS and value:
            found.add(value)
    return found


def postgres_secrets(dsn: str) -> set[str]:
    """The DSN's secrets: parsed (decoded) and as written."""
    found: set[str] = set()
    try:
        params: dict[str, str] | None = parse_dsn(dsn)
    except ValueError:
        params = None
    if params is not None:
        found |= {params[k] for k in _SECRET_KEYS if params.get(k)}
    if _is_uri(dsn):
        creds = _uri_credentials(dsn)
        if creds is not None and creds[1]:
            found.add(creds[1])
        found |= _uri_query_secrets(dsn)
        if params is None:
            # Unparsable: whatever stands before the last '@' may be credentials,
            # the user name included (libpq echoes whole URIs in some errors).
            userinfo = dsn.split("://", 1)[1].rpartition("@")[0]
            if userinfo:
                found |= {userinfo, userinfo.partition(":")[2]}
            if creds is not None:
                found.add(":".join(c for c in creds if c is not None))
    elif params is None:
        # Unparsable key=value: from `password=` on, all of it and each word
        # (libpq names a stray word of an unquoted password in its error).
        for match in _KV_PASSWORD.finditer(dsn):
            rest = match.group(1).strip()
            found |= {rest, rest.strip("'"), *rest.split()}
    return {s for s in found if s}


def dsn_problem(dsn: str) -> str | None:
    """None when libpq parses the DSN; else libpq's reason, scrubbed of the DSN's secrets."""
    try:
        parse_dsn(dsn)
    except ValueError as exc:
        return Secrets(postgres_secrets(dsn)).scrub(str(exc))
    return None


def _kv_value(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _display_kv(params: dict[str, str]) -> str:
    return " ".join(
        f"{k}={MASK if k in _SECRET_KEYS and v else _kv_value(v)}" for k, v in params.items()
    )


def _display_uri(scheme: str, params: dict[str, str]) -> str:
    rest = dict(params)
    user = rest.pop("user", "")
    password = rest.pop("password", "")
    dbname = rest.pop("dbname", None)
    hosts = rest.pop("host", "").split(",")
    ports = rest.pop("port", "").split(",")
    if len(hosts) == len(ports):
        netloc = ",".join(
            (f"[{quote(h, safe=':')}]" if ":" in h else quote(h, safe=""))
            + (f":{quote(p, safe='')}" if p else "")
            for h, p in zip(hosts, ports, strict=True)
        )
    else:  # e.g. ?host=a,b&port=5432: not expressible as netlocs, so kept in the query
        netloc = ""
        rest = {"host": ",".join(hosts), "port": ",".join(ports), **rest}
    userinfo = quote(user, safe="") + (f":{MASK}" if password else "")
    if userinfo:
        netloc = f"{userinfo}@{netloc}"
    path = "" if dbname is None else "/" + quote(dbname, safe="")
    query = urlencode(
        {k: MASK if k in _SECRET_KEYS and v else v for k, v in rest.items()},
        quote_via=lambda s, *_: quote(s, safe="*"),
    )
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")


def display_dsn(dsn: str) -> str:
    """The DSN as `dlqproc config` prints it: libpq's parameters, passwords masked,
    in the form it was written in. A DSN libpq cannot parse is not printed."""
    secrets = Secrets(postgres_secrets(dsn))
    try:
        params = parse_dsn(dsn)
    except ValueError as exc:
        return f"{MASK} (libpq cannot parse it: {secrets.scrub(str(exc))})"
    shown = _display_uri(dsn.split("://", 1)[0], params) if _is_uri(dsn) else _display_kv(params)
    # A password that equals another parameter (say the user name) is hidden there too.
    return secrets.scrub(shown)


def postgres_target(dsn: str) -> dict[str, str]:
    """Host, port and database name, for log lines (never the connection string)."""
    try:
        params = parse_dsn(dsn)
    except ValueError:
        return {"dsn": "unparsable"}
    secrets = Secrets(postgres_secrets(dsn))
    return {k: secrets.scrub(params[k]) for k in ("host", "port", "dbname") if k in params}


# --------------------------------------------------------------------------- NATS


def _servers(url: str) -> list[tuple[str, ParseResult | None]]:
    from dlqproc.broker import parse_server, server_list  # nats is imported only there

    return [(item, parse_server(item)) for item in server_list(url)]


def _after_scheme(item: str) -> str:
    return item.partition("://")[2] if "://" in item else item


def _userinfo_in_authority(item: str) -> bool:
    """Whether every '@' of a server lies in its authority (before any '/', '?' or
    '#'). If not, a password holding one of those was cut short by the URL parser,
    and nats-py's reading of the server is not to be shown."""
    after = _after_scheme(item)
    end = min((i for i in map(after.find, "/?#") if i >= 0), default=len(after))
    return after.rfind("@") < end


def nats_secrets(url: str) -> set[str]:
    """Per server: the password of `user:password@`, or the token of `token@`, as
    nats-py sends them (it does not percent-decode); plus the raw userinfo before
    the last '@', should nats-py have split it elsewhere."""
    found: set[str] = set()
    for item, uri in _servers(url):
        if uri is not None:
            if uri.password is not None:
                found.add(uri.password)
            elif uri.username is not None:
                found.add(uri.username)
        userinfo = _after_scheme(item).rpartition("@")[0]
        if userinfo:
            user, colon, password = userinfo.partition(":")
            found.add(password if colon else user)
            if uri is None or not _userinfo_in_authority(item):
                found.add(userinfo)  # not read as nats-py would send it: all of it
    return {s for s in found if s}


def _display_server(item: str, uri: ParseResult | None) -> str:
    if uri is not None and _userinfo_in_authority(item):
        host = uri.netloc.rpartition("@")[2]
        if uri.password is not None:
            cred = f"{uri.username}:{MASK}@"
        elif uri.username is not None:
            cred = f"{MASK}@"
        else:
            cred = ""
        return f"{uri.scheme}://{cred}{host}"
    if uri is None:
        # Not printed: a password with ',' may have split the list anywhere.
        return f"{MASK} (nats-py cannot parse it)"
    # A '@' past the authority: whatever stands before the last one is hidden.
    return f"{uri.scheme}://{MASK}@{_after_scheme(item).rpartition('@')[2]}"


def display_url(url: str) -> str:
    """nats.url as `dlqproc config` prints it: each server as nats-py reads it,
    its password or token masked."""
    secrets = Secrets(nats_secrets(url))
    return ",".join(secrets.scrub(_display_server(item, uri)) for item, uri in _servers(url))


def nats_targets(url: str) -> list[str]:
    """host:port of each server, for log lines."""
    secrets = Secrets(nats_secrets(url))
    return [
        secrets.scrub(uri.netloc.rpartition("@")[2])
        if uri is not None and _userinfo_in_authority(item)
        else "unparsable"
        for item, uri in _servers(url)
    ]
