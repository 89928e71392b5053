"""The `dlqproc` command as an operator uses it: version, config, migrate, demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg

import dlqproc
from dlqproc.config import RENAMED
from dlqproc.embedded import PostgresServer

RENAMED_LEAVES = {old.split(".")[-1] for old in RENAMED}


def dlqproc_cmd(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "dlqproc", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_version() -> None:
    out = dlqproc_cmd("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"dlqproc {dlqproc.__version__}"


def test_config_prints_effective_values_with_secrets_redacted() -> None:
    out = dlqproc_cmd(
        "config",
        env={
            "POSTGRES_DSN": "postgresql://app:s3cr3t@db:5432/events",
            "NATS_DLQWORKERS": "3",
            "NATS_URL": "nats://u:natspw@nats:4222",
        },
    )
    assert out.returncode == 0, out.stderr
    assert "s3cr3t" not in out.stdout and "natspw" not in out.stdout
    assert "dlqWorkers: 3" in out.stdout
    assert "postgresql://app:***@db:5432/events" in out.stdout


def test_config_prints_the_new_names_of_settings_set_by_their_old_ones() -> None:
    out = dlqproc_cmd(
        "config", "--json", env={"NATS_DLQWORKERBATCH": "7", "NATS_DLQTASKTIMEOUT": "3s"}
    )
    assert out.returncode == 0, out.stderr
    nats = json.loads(out.stdout)["nats"]
    assert (nats["workerBatch"], nats["workerTaskTimeout"]) == (7, 3.0)
    assert not [key for key in nats if key in RENAMED_LEAVES]
    # The operator guide's keys keep their names.
    assert nats["dlqWorkers"] == 8 and nats["dlqMaxDeliver"] == 10


def test_bad_value_exits_2_with_one_line_naming_key_and_value(tmp_path: Path) -> None:
    out = dlqproc_cmd("config", env={"NATS_DLQWORKERS": "many"})
    assert out.returncode == 2
    [line] = out.stderr.strip().splitlines()
    assert "nats.dlqWorkers" in line and "'many'" in line

    conf = tmp_path / "c.yaml"
    conf.write_text("nats:\n  dlqWorkerz: 4\n")
    out = dlqproc_cmd("--config", str(conf), "run")
    assert out.returncode == 2
    [line] = out.stderr.strip().splitlines()
    assert "nats.dlqWorkerz" in line and "unknown key" in line

    out = dlqproc_cmd("run", env={"NATS_DLQMAXRETRIES": "10", "NATS_DLQMAXDELIVER": "10"})
    assert out.returncode == 2
    assert "nats.dlqMaxRetries" in out.stderr

    # A rule on the type, said plainly, under the name the operator used.
    out = dlqproc_cmd("run", env={"NATS_DLQMAXINFLIGHT": "0"})
    assert out.returncode == 2
    [line] = out.stderr.strip().splitlines()
    assert line == "dlqproc: invalid config nats.dlqMaxInFlight=0: must be positive"


def test_migrate_is_idempotent(dsn: str) -> None:
    first = dlqproc_cmd("migrate", env={"POSTGRES_DSN": dsn})
    assert first.returncode == 0, first.stderr
    assert "001_exhausted_events.sql" in first.stdout
    second = dlqproc_cmd("migrate", env={"POSTGRES_DSN": dsn})
    assert second.returncode == 0 and "up to date" in second.stdout
    with psycopg.connect(dsn) as conn:
        cols = {
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = 'public' AND table_name = 'exhausted_events'"
            )
        }
    assert {
        "id",
        "created_at",
        "company_id",
        "source_subject",
        "last_error",
        "retry_count",
        "event_timestamp",
        "dlq_payload",
        "original_payload",
        "resolved",
        "resolved_at",
        "notes",
    } <= cols


def test_migrate_reports_unreachable_database(tmp_path: Path) -> None:
    pg = PostgresServer(tmp_path / "pg")  # never started: nothing listens on its port
    out = dlqproc_cmd("migrate", env={"POSTGRES_DSN": pg.dsn})
    assert out.returncode == 1
    assert "cannot connect" in out.stderr


def _processes_using(path: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(path).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_demo_runs_the_pipeline_and_leaves_no_process(pg_home: Path) -> None:
    state = pg_home / "demo"
    out = dlqproc_cmd(
        "demo", "--state", str(state), "--messages", "200", "--exit-when-done", timeout=240
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "published 200, acknowledged 200, failed 0" in out.stdout
    # Some events failed into the DLQ; the invalid ones were exhausted there.
    dead = int(out.stdout.split("dead-lettered by the main consumers in this run: ")[1].split()[0])
    assert dead > 0
    assert "validation" in out.stdout and "rows per tenant" in out.stdout
    assert "/metrics" in out.stdout
    assert _processes_using(state) == []
