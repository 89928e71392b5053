"""PostgreSQL: migrations, tenant schemas, batch writes and exhausted events.

The only package that imports psycopg. The supervisor is its only caller, and
every write it makes is idempotent (upserts keyed on the event's identity, an
exhausted row keyed on the DLQ message), so a redelivery rewrites the same rows.

    results     Write, WriteResult (Written | NotWritten), Failure, the errors
    sql         statements rendered from row shapes; what an error means (pure)
    tenants     admission, then a tenant's schema and tables on first use
    partitions  month partitions, within a window and a budget per commit group
    writer      write_group: the fast path, then item by item on an exception
    exhausted   the exhausted row: normalised, never refused for an item reason
    migrations  schema/ files, applied once under a lock
    core        Store: the connection, start-up retries, and the above on it

`Store.write` raises StoreUnavailable for an outage only: the database cannot
be reached, the connection broke, or the transaction as a whole failed to
commit. Anything else, a bug included, fails the writes involved (each gets a
NotWritten with its Failure) while the others commit.
"""

from dlqproc.store.core import Store
from dlqproc.store.migrations import migrations
from dlqproc.store.partitions import month_bounds
from dlqproc.store.results import (
    CredentialsRefused,
    ExhaustedRow,
    Failure,
    ItemFailed,
    NotWritten,
    StoreUnavailable,
    Write,
    WriteResult,
    Written,
)
from dlqproc.store.sql import ErrorClass, classify, internal_error, schema_name

__all__ = [
    "CredentialsRefused",
    "ErrorClass",
    "ExhaustedRow",
    "Failure",
    "ItemFailed",
    "NotWritten",
    "Store",
    "StoreUnavailable",
    "Write",
    "WriteResult",
    "Written",
    "classify",
    "internal_error",
    "migrations",
    "month_bounds",
    "schema_name",
]
