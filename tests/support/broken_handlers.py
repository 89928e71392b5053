"""A handlers module that imports in the supervisor but not in a worker process."""

import multiprocessing

if multiprocessing.parent_process() is not None:
    raise RuntimeError("this module refuses to load in a worker")

HANDLERS: dict[str, object] = {}
