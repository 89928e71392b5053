"""The test side of t.barrier (support.lifecycle_handlers): who started, and letting them go."""

from __future__ import annotations

from pathlib import Path


class Barrier:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        return {
            "HANDLERS_MODULE": "support.lifecycle_handlers",
            "TEST_BARRIER_DIR": str(self.folder),
        }

    def started(self) -> set[str]:
        """Ids whose handler has started (and, until release, still runs)."""
        return {p.name.removeprefix("started-") for p in self.folder.glob("started-*")}

    def release(self) -> None:
        (self.folder / "release").touch()
