"""The test side of t.barrier (support.handlers): who started, and letting them go."""

from __future__ import annotations

from pathlib import Path


class Barrier:
    """A folder t.barrier handlers report to and wait on; its env goes to the service."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        return {"TEST_BARRIER_DIR": str(self.folder)}

    def started(self) -> set[str]:
        """Ids whose handler has started (and, until release, still runs)."""
        return {p.name.removesuffix(".started") for p in self.folder.glob("*.started")}

    def attempts(self, id: str) -> list[int]:
        """The deliveries of `id` whose handler started, in order."""
        path = self.folder / f"{id}.started"
        return [int(n) for n in path.read_text().split()] if path.exists() else []

    def release(self) -> None:
        (self.folder / "release").touch()
