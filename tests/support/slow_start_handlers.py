"""The test handlers, but a worker process takes a while to load them.

Gives a test time to see (and kill) a worker that has been spawned but has not
said hello yet. TEST_WORKER_START_SECONDS sets the delay (default 1.5 s); with
TEST_WORKER_LOADING_DIR set, a worker first leaves a file named by its pid
there, so a test knows it is past its spawn hand-over and loading handlers.
"""

from __future__ import annotations

import multiprocessing
import os
import time

from support.handlers import HANDLERS, TENANT_DDL

if multiprocessing.parent_process() is not None:
    loading = os.environ.get("TEST_WORKER_LOADING_DIR")
    if loading:
        open(os.path.join(loading, str(os.getpid())), "w").close()
    time.sleep(float(os.environ.get("TEST_WORKER_START_SECONDS", "1.5")))

__all__ = ["HANDLERS", "TENANT_DDL"]
