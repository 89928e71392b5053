"""`dlqproc exhausted replay` on real NATS and PostgreSQL: single replays and
refusals, a bulk job SIGKILLed and resumed, concurrent jobs, and outages."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from dlqproc.embedded import NatsServer, PostgresServer
from support.exhausted import (
    add_stream,
    bulk_rows,
    cli,
    exhausted_row,
    ids_published,
    migrate,
    popen,
    query,
    store_rows,
    stream_messages,
)
from support.service import wait_until

EVENTS = "EVENTS"
SUBJECTS = ["v1.chats.upsert.*", "v1.messages.update.*"]


def _job(dsn: str, job: int) -> dict[str, object]:
    cols = ("state", "published", "refused", "failed", "skipped", "uncertain", "cursor")
    (row,) = query(
        dsn, f"SELECT {', '.join(cols)} FROM exhausted_replay_jobs WHERE id = %s", (job,)
    )
    return dict(zip(cols, row, strict=True))


def _refused(dsn: str) -> dict[int, str]:
    return dict(
        query(
            dsn, "SELECT exhausted_id, detail FROM exhausted_replay_items WHERE state = 'refused'"
        )
    )


def test_replay_by_id_publishes_once_and_refuses_what_cannot_be_replayed(
    dsn: str, own_nats: NatsServer
) -> None:
    migrate(dsn)
    add_stream(own_nats.url, EVENTS, SUBJECTS)
    add_stream(own_nats.url, "DLQ", ["v1.dlq.>"])
    good, not_json, invalid, unknown, resolved = store_rows(
        dsn,
        [
            exhausted_row(1, "acme", "v1.chats.upsert", {"chat_id": "c1", "agent_id": "a"}),
            exhausted_row(
                2, "acme", "v1.chats.upsert", None, raw=b"\xffnot json", reason="not_json"
            ),
            exhausted_row(
                3, "_invalid", "v1.chats.upsert", {"chat_id": "c3"}, reason="invalid_tenant"
            ),
            exhausted_row(4, "acme", "v9.nothing", {"x": 1}, reason="unknown_subject"),
            exhausted_row(5, "acme", "v1.chats.upsert", {"chat_id": "c5"}),
        ],
    )
    query(
        dsn, "UPDATE exhausted_events SET resolved = true WHERE id = %s RETURNING id", (resolved,)
    )
    ids = [str(i) for i in (good, not_json, invalid, unknown, resolved)]
    out = cli(
        "replay", *ids, "--actor", "ann", "--note", "upstream fixed", dsn=dsn, nats_url=own_nats.url
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "published 1, refused 4" in out.stdout
    refused = _refused(dsn)
    assert "not JSON" in refused[not_json]
    assert "invalid tenant" in refused[invalid]
    assert "unknown subject" in refused[unknown]
    assert "already resolved" in refused[resolved]
    (msg,) = stream_messages(own_nats.url, EVENTS)
    subject, body, headers = msg
    assert subject == "v1.chats.upsert.acme"
    assert json.loads(body) == {"chat_id": "c1", "agent_id": "a"}
    assert headers["Dlqproc-Replay-Of"] == str(good)
    assert headers["Nats-Msg-Id"] == f"replay-{headers['Dlqproc-Replay-Job']}-{good}"
    assert query(
        dsn,
        "SELECT replay_count, replayed_at IS NOT NULL, resolved"
        " FROM exhausted_events WHERE id = %s",
        (good,),
    ) == [(1, True, False)]
    assert query(
        dsn, "SELECT exhausted_id, actor, note FROM exhausted_audit WHERE action = 'replay'"
    ) == [(good, "ann", "upstream fixed")]
    # To the DLQ, resolving on acknowledgement; a resolved row only with --include-resolved.
    out = cli(
        "replay",
        str(good),
        str(resolved),
        "--to-dlq",
        "--resolve",
        "--include-resolved",
        dsn=dsn,
        nats_url=own_nats.url,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    dlq = stream_messages(own_nats.url, "DLQ")
    assert sorted(s for s, _, _ in dlq) == ["v1.dlq.acme", "v1.dlq.acme"]
    envelope = json.loads(dlq[0][1])
    assert envelope["source_subject"] == "v1.chats.upsert.acme" and envelope["retry_count"] == 0
    assert query(
        dsn,
        "SELECT count(*) FROM exhausted_events WHERE resolved AND id IN (%s, %s)",
        (good, resolved),
    ) == [(2,)]
    jobs = cli("jobs", "--json", dsn=dsn)
    assert [json.loads(line)["state"] for line in jobs.stdout.splitlines()] == ["done", "done"]


def test_filter_replay_is_a_dry_run_without_yes_and_max_bounds_it(
    dsn: str, own_nats: NatsServer
) -> None:
    migrate(dsn)
    bulk_rows(dsn, 30, "acme")
    out = cli("replay", "--tenant", "acme", dsn=dsn, nats_url=own_nats.url)
    assert out.returncode == 0 and "would apply to 30 rows" in out.stdout
    assert query(dsn, "SELECT count(*) FROM exhausted_replay_jobs") == [(0,)]
    add_stream(own_nats.url, EVENTS, SUBJECTS)
    out = cli("replay", "--tenant", "acme", "--yes", "--max", "12", dsn=dsn, nats_url=own_nats.url)
    assert out.returncode == 0, out.stderr
    (job,) = query(dsn, "SELECT id FROM exhausted_replay_jobs")
    assert _job(dsn, job[0])["published"] == 12 and _job(dsn, job[0])["state"] == "done"
    assert len(ids_published(own_nats.url, EVENTS)) == 12
    listed = cli("list", "--never-replayed", "--json", dsn=dsn)
    assert json.loads(listed.stdout.splitlines()[-1]) == {"total": 18}


@pytest.mark.slow
def test_bulk_replay_sigkilled_and_resumed_publishes_each_row_once(
    dsn: str, own_nats: NatsServer
) -> None:
    migrate(dsn)
    add_stream(own_nats.url, EVENTS, SUBJECTS)
    bulk_rows(dsn, 10_000, "acme")
    proc = popen(
        "replay", "--tenant", "acme", "--rate", "1500", "--yes", dsn=dsn, nats_url=own_nats.url
    )
    try:
        job = wait_until(lambda: query(dsn, "SELECT id FROM exhausted_replay_jobs"), 60)[0][0]
        wait_until(lambda: _job(dsn, job)["published"] >= 3000, 120)  # type: ignore[operator]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = _job(dsn, job)
    assert f"running (no process: --resume {job})" in cli("jobs", dsn=dsn).stdout
    assert killed_at["state"] == "running" and 3000 <= killed_at["published"] < 10_000  # type: ignore[operator]
    out = cli("replay", "--resume", str(job), dsn=dsn, nats_url=own_nats.url, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    final = _job(dsn, job)
    assert final["state"] == "done"
    assert final["published"] == 10_000
    assert final["refused"] == final["failed"] == final["uncertain"] == final["skipped"] == 0
    published = ids_published(own_nats.url, EVENTS)
    assert len(published) == 10_000 and set(published.values()) == {1}
    row_ids = {r[0] for r in query(dsn, "SELECT id FROM exhausted_events")}
    assert set(published) == {f"replay-{job}-{i}" for i in row_ids}
    per_row = Counter(
        r[0] for r in query(dsn, "SELECT exhausted_id FROM exhausted_audit WHERE action = 'replay'")
    )
    assert set(per_row) == row_ids and set(per_row.values()) == {1}
    assert query(dsn, "SELECT min(replay_count), max(replay_count) FROM exhausted_events") == [
        (1, 1)
    ]
    assert query(dsn, "SELECT company_id, result, n FROM exhausted_replay_totals") == [
        ("acme", "published", 10_000)
    ]


def test_two_concurrent_jobs_on_overlapping_filters_publish_no_row_twice(
    dsn: str, own_nats: NatsServer
) -> None:
    migrate(dsn)
    add_stream(own_nats.url, EVENTS, SUBJECTS)
    bulk_rows(dsn, 1500, "acme")
    bulk_rows(dsn, 500, "acme", base="v1.messages.update")
    a = popen("replay", "--tenant", "acme", "--unlimited", "--yes", dsn=dsn, nats_url=own_nats.url)
    b = popen(
        "replay", "--subject", "v1.*.*.acme", "--unlimited", "--yes", dsn=dsn, nats_url=own_nats.url
    )
    for p in (a, b):
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    replays = Counter(h["Dlqproc-Replay-Of"] for _, _, h in stream_messages(own_nats.url, EVENTS))
    assert len(replays) == 2000 and set(replays.values()) == {1}
    jobs = [_job(dsn, j) for (j,) in query(dsn, "SELECT id FROM exhausted_replay_jobs")]
    assert sum(j["published"] for j in jobs) == 2000  # type: ignore[misc]
    assert all(j["published"] + j["skipped"] == 2000 for j in jobs)  # type: ignore[operator]


def test_nats_outage_mid_job_pauses_and_resumes(dsn: str, own_nats: NatsServer) -> None:
    migrate(dsn)
    add_stream(own_nats.url, EVENTS, SUBJECTS)
    bulk_rows(dsn, 1000, "acme")
    proc = popen(
        "replay", "--tenant", "acme", "--rate", "200", "--yes", dsn=dsn, nats_url=own_nats.url
    )
    job = wait_until(lambda: query(dsn, "SELECT id FROM exhausted_replay_jobs"), 60)[0][0]
    wait_until(lambda: _job(dsn, job)["published"] >= 100, 60)  # type: ignore[operator]
    own_nats.stop()
    time.sleep(3)  # the outage itself: the job must wait through it
    during = _job(dsn, job)["published"]
    own_nats.start()
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert "replay paused: NATS unavailable" in err and "replay resumed" in err
    final = _job(dsn, job)
    assert final["published"] == 1000 and final["failed"] == 0 and during < 1000  # type: ignore[operator]
    published = ids_published(own_nats.url, EVENTS)
    assert len(published) == 1000 and set(published.values()) == {1}


def test_postgres_outage_mid_job_pauses_and_resumes(pg_home: Path, own_nats: NatsServer) -> None:
    with PostgresServer(pg_home / "data") as pg:
        dsn = pg.dsn
        migrate(dsn)
        add_stream(own_nats.url, EVENTS, SUBJECTS)
        bulk_rows(dsn, 600, "acme")
        proc = popen(
            "replay", "--tenant", "acme", "--rate", "150", "--yes", dsn=dsn, nats_url=own_nats.url
        )
        job = wait_until(lambda: query(dsn, "SELECT id FROM exhausted_replay_jobs"), 60)[0][0]
        wait_until(lambda: _job(dsn, job)["published"] >= 100, 60)  # type: ignore[operator]
        pg.stop()
        time.sleep(2)
        pg.start()
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert "replay paused: PostgreSQL unavailable" in err
        final = _job(dsn, job)
        assert final["published"] == 600 and final["failed"] == final["uncertain"] == 0
        published = ids_published(own_nats.url, EVENTS)
        assert len(published) == 600 and set(published.values()) == {1}


def test_ctrl_c_stops_cleanly_and_resume_finishes(dsn: str, own_nats: NatsServer) -> None:
    migrate(dsn)
    add_stream(own_nats.url, EVENTS, SUBJECTS)
    bulk_rows(dsn, 600, "acme")
    proc = popen(
        "replay", "--tenant", "acme", "--rate", "200", "--yes", dsn=dsn, nats_url=own_nats.url
    )
    job = wait_until(lambda: query(dsn, "SELECT id FROM exhausted_replay_jobs"), 60)[0][0]
    wait_until(lambda: _job(dsn, job)["published"] >= 50, 60)  # type: ignore[operator]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    stopped = _job(dsn, job)
    assert stopped["state"] == "stopped" and "--resume" in out
    # Nothing claimed is left behind: every published row is recorded, the rest released.
    assert query(dsn, "SELECT count(*) FROM exhausted_replay_items WHERE state = 'claimed'") == [
        (0,)
    ]
    assert len(ids_published(own_nats.url, EVENTS)) == stopped["published"]
    out2 = cli("replay", "--resume", str(job), dsn=dsn, nats_url=own_nats.url, timeout=240)
    assert out2.returncode == 0, out2.stderr
    assert _job(dsn, job)["published"] == 600
    published = ids_published(own_nats.url, EVENTS)
    assert len(published) == 600 and set(published.values()) == {1}


def test_resume_past_the_duplicate_window_marks_in_flight_rows_uncertain(
    dsn: str, own_nats: NatsServer
) -> None:
    migrate(dsn)
    add_stream(own_nats.url, EVENTS, SUBJECTS, duplicate_window=1)
    bulk_rows(dsn, 3000, "acme")
    proc = popen(
        "replay", "--tenant", "acme", "--rate", "400", "--yes", dsn=dsn, nats_url=own_nats.url
    )
    try:
        job = wait_until(lambda: query(dsn, "SELECT id FROM exhausted_replay_jobs"), 60)[0][0]
        wait_until(lambda: _job(dsn, job)["published"] >= 200, 60)  # type: ignore[operator]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    claimed = query(dsn, "SELECT count(*) FROM exhausted_replay_items WHERE state = 'claimed'")[0][
        0
    ]
    out = cli("replay", "--resume", str(job), dsn=dsn, nats_url=own_nats.url, timeout=240)
    assert out.returncode == 1, out.stdout + out.stderr  # uncertain rows need the operator
    final = _job(dsn, job)
    assert final["uncertain"] == claimed and final["published"] + final["uncertain"] == 3000
    published = ids_published(own_nats.url, EVENTS)
    # Never a second copy: the uncertain rows were not published again.
    assert set(published.values()) == {1}
    assert len(published) >= final["published"]  # type: ignore[operator]
