"""The WhatsApp registry, except that a chat named "crash" kills its worker process."""

from __future__ import annotations

import os
from collections.abc import Sequence

from dlqproc.handlers.whatsapp import HANDLERS as _HANDLERS
from dlqproc.handlers.whatsapp import TENANT_DDL
from dlqproc.model import Event, RowOp


def chats_upsert(event: Event) -> Sequence[RowOp]:
    if b'"push_name": "crash"' in event.payload:
        os._exit(9)
    return _HANDLERS["v1.chats.upsert"](event)


HANDLERS = {**_HANDLERS, "v1.chats.upsert": chats_upsert}
__all__ = ["HANDLERS", "TENANT_DDL"]
