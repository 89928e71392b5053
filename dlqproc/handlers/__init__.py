"""Handler registries: which pure function reprocesses which subject base.

A registry is a Python module (named by the `handlers.module` setting) that
defines:

    HANDLERS: Mapping[str, Callable[[Event], Sequence[RowOp]]]
        subject base (e.g. "v1.messages.upsert") -> pure handler. A handler
        decodes event.payload, validates it and returns the rows to write, or
        raises PermanentError / TransientError (dlqproc.model). Any other
        exception counts as a transient handler_error. Handlers run in worker
        processes and must do no network or database I/O.
    TENANT_DDL: Sequence[str]
        Idempotent SQL statements creating a tenant's tables, with "{schema}"
        where the tenant's schema name goes (it is quoted as an identifier).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence

import msgspec

from dlqproc.model import Event, RowOp

Handler = Callable[[Event], Sequence[RowOp]]


class Registry(msgspec.Struct, frozen=True):
    module: str
    handlers: Mapping[str, Handler]
    tenant_ddl: tuple[str, ...]


class RegistryError(Exception):
    """The configured module does not load or is not a registry."""


def load(module_name: str) -> Registry:
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise RegistryError(f"cannot import handlers module {module_name!r}: {exc}") from exc
    handlers = getattr(module, "HANDLERS", None)
    if not isinstance(handlers, Mapping) or not all(callable(h) for h in handlers.values()):
        raise RegistryError(f"{module_name}.HANDLERS must map subject bases to callables")
    ddl = getattr(module, "TENANT_DDL", ())
    if not all(isinstance(s, str) for s in ddl):
        raise RegistryError(f"{module_name}.TENANT_DDL must be a sequence of SQL strings")
    return Registry(module_name, dict(handlers), tuple(ddl))
