"""The `dlqproc` command: run, migrate, config, demo, publish, exhausted, console, --version.

Every line it prints on stderr, and every log line, is scrubbed of the
config's secrets (redact.Secrets); `config` prints them masked.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import msgspec
import yaml

from dlqproc import __version__, logs, redact
from dlqproc.config import Config, ConfigError, load, redacted


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlqproc", description=__doc__)
    p.add_argument("--version", action="version", version=f"dlqproc {__version__}")
    p.add_argument("--config", type=Path, help="YAML file layered over the defaults")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the DLQ reprocessor")
    sub.add_parser("migrate", help="apply the SQL migrations in schema/ and exit")
    c = sub.add_parser("config", help="print the effective config, secrets redacted")
    c.add_argument("--json", action="store_true", help="JSON instead of YAML")
    d = sub.add_parser("demo", help="run on an embedded NATS and Postgres with a sample workload")
    d.add_argument(
        "--state",
        type=Path,
        default=Path(".dlqproc-demo"),
        help="folder for the embedded servers' data (default .dlqproc-demo)",
    )
    d.add_argument("--messages", type=int, default=300, help="events in the sample workload")
    d.add_argument(
        "--exit-when-done",
        action="store_true",
        help="stop once the workload is settled instead of serving on",
    )
    _publish_parser(sub)
    from dlqproc.exhausted import command as exhausted

    exhausted.add_parser(sub)
    sub.add_parser(
        "console",
        help="serve the web console for exhausted events (console.host:console.port)",
        description="A web console to find, inspect, replay and resolve exhausted events."
        " Operators sign in with console.token; without one it listens on loopback only.",
    )
    return p


def _publish_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "publish",
        help="publish generated WhatsApp events (or DLQ envelopes, or one body) to NATS",
        description="Publish seeded, realistic WhatsApp events to JetStream (the old"
        " service's tester). Exits 0 when every publish was acknowledged, 1 otherwise.",
    )
    # Also accepted after the command; SUPPRESS keeps an earlier --config.
    p.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="YAML file layered over the defaults: nats.url, its credentials"
        " (nats.user/password, token, nkeySeedFile, credsFile) and TLS files, as the"
        " service reads them; NATS_* env names work too",
    )
    p.add_argument(
        "--url",
        help="NATS URL (default: the config's nats.url); the config's credentials still apply",
    )
    p.add_argument("--bases", help="comma-separated subject bases (default: all ten)")
    p.add_argument(
        "--tenants",
        default="acme,globex,initech",
        help="comma-separated tenant ids (default acme,globex,initech)",
    )
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--count", type=_non_negative_int, help="events to publish (default 100)")
    amount.add_argument(
        "--duration", type=_positive_float, metavar="SECONDS", help="publish for this long"
    )
    p.add_argument(
        "--rate", type=_positive_float, metavar="EVENTS_PER_S", help="rate limit (default none)"
    )
    p.add_argument(
        "--history-batch", type=int, default=50, help="items per v1.history.* event (default 50)"
    )
    p.add_argument("--seed", type=int, default=1, help="generator seed (default 1)")
    p.add_argument(
        "--now", type=int, help="unix time the events are dated around (default: the clock)"
    )
    p.add_argument(
        "--invalid-rate",
        type=_fraction,
        default=0.0,
        help="fraction of events missing a required field",
    )
    p.add_argument(
        "--update-first-rate",
        type=_fraction,
        default=0.0,
        help="fraction of messages.upsert preceded by an update of the same message",
    )
    p.add_argument("--subject", help="publish one --body to this subject instead")
    p.add_argument("--body", help="JSON body for --subject; @FILE reads it from FILE")
    p.add_argument(
        "--dlq",
        action="store_true",
        help="publish DLQ envelopes to <nats.dlqSubject>.<tenant> instead of the events",
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be within 0..1")
    return value


def _publish(args: argparse.Namespace, cfg: Config, secrets: redact.Secrets) -> int:
    import time

    from dlqproc import generate, publish
    from dlqproc.topology import HISTORY_BASES, REALTIME_BASES

    def fail(message: str) -> int:
        print(f"dlqproc publish: {secrets.scrub(message)}", file=sys.stderr)
        return 2

    url = args.url or cfg.nats.url
    now = args.now if args.now is not None else int(time.time())
    items: list[publish.Item] | Iterator[publish.Item]
    total: int | None
    if args.subject is not None or args.body is not None:
        if args.subject is None or args.body is None:
            return fail("--subject and --body go together")
        if args.body.startswith("@"):
            try:
                body = Path(args.body[1:]).read_bytes()
            except OSError as exc:
                return fail(f"cannot read {args.body[1:]}: {exc}")
        else:
            body = args.body.encode()
        base, _, tenant = args.subject.rpartition(".")
        event = generate.GeneratedEvent(
            subject=args.subject,
            body=body,
            base=base,
            tenant=tenant,
            valid=True,
            msg_id=f"one-{now}-{time.time_ns()}",
        )
        events: Iterator[generate.GeneratedEvent] = iter([event])
        total = 1
    else:
        bases = _split(args.bases) if args.bases else [*REALTIME_BASES, *HISTORY_BASES]
        try:
            gen = generate.Generator(
                seed=args.seed,
                tenants=_split(args.tenants),
                bases=bases,
                history_batch=args.history_batch,
                invalid_rate=args.invalid_rate,
                update_first_rate=args.update_first_rate,
                now=now,
            )
        except ValueError as exc:
            return fail(str(exc))
        total = None if args.duration is not None else (100 if args.count is None else args.count)
        events = gen.events(total)
    if args.dlq:
        dlq_subject = cfg.nats.dlq_subject
        items = (
            (subject, body, {"Nats-Msg-Id": f"dlq-{ev.msg_id}", "Original-Nats-Msg-Id": ev.msg_id})
            for ev in events
            for subject, body in generate.dlq_envelopes([ev], dlq_subject, now)
        )
    else:
        items = ((ev.subject, ev.body, {"Nats-Msg-Id": ev.msg_id}) for ev in events)
    import uvloop

    try:
        report = uvloop.run(
            publish.publish(
                url,
                items,
                rate=args.rate,
                duration=args.duration,
                progress=None if args.quiet else sys.stderr,
                total=total,
                credentials=cfg.nats,
            )
        )
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        where = redact.display_url(url)
        print(
            f"dlqproc publish: cannot publish to {where}: {secrets.scrub(str(exc))}",
            file=sys.stderr,
        )
        return 1
    print(report.summary())
    if report.first_error:
        print(
            f"dlqproc publish: first failure: {secrets.scrub(report.first_error)}", file=sys.stderr
        )
    return 0 if report.ok else 1


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _load(args: argparse.Namespace) -> Config:
    try:
        return load(args.config)
    except ConfigError as exc:
        print(f"dlqproc: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from dlqproc import demo  # imports the embedded servers' helpers

        return demo.main(args.state, args.messages, args.config, args.exit_when_done)
    cfg = _load(args)
    if args.command == "config":
        data = redacted(cfg)
        if args.json:
            print(msgspec.json.format(msgspec.json.encode(data).decode()))
        else:
            print(yaml.safe_dump(data, sort_keys=False), end="")
        return 0
    secrets = redact.secrets_of(cfg)
    if args.command == "publish" and args.url:
        secrets |= redact.Secrets(redact.nats_secrets(args.url))
    logs.setup(cfg.log.level, secrets)
    try:
        return _command(args, cfg, secrets)
    except Exception:
        # Whatever escaped (a driver's error included) is printed scrubbed.
        print(f"dlqproc: {secrets.scrub(traceback.format_exc())}", file=sys.stderr)
        return 1


def _command(args: argparse.Namespace, cfg: Config, secrets: redact.Secrets) -> int:
    if args.command == "publish":
        return _publish(args, cfg, secrets)
    if args.command == "exhausted":
        from dlqproc.exhausted import command as exhausted

        return exhausted.run(args, cfg, secrets)
    if args.command == "console":
        from dlqproc.console import serve

        return serve.run(cfg, secrets)
    if args.command == "migrate":
        from dlqproc.store import Store, StoreUnavailable

        problem = redact.dsn_problem(cfg.postgres.dsn)
        if problem is not None:
            print(f"dlqproc: invalid config postgres.dsn: {problem}", file=sys.stderr)
            return 2

        async def migrate() -> list[str]:
            store = Store(cfg.postgres.dsn, cfg.postgres.statement_timeout, ())
            try:
                return await store.migrate()
            finally:
                await store.close()

        try:
            applied = asyncio.run(migrate())
        except StoreUnavailable as exc:
            print(f"dlqproc: {secrets.scrub(str(exc))}", file=sys.stderr)
            return 1
        print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
        return 0
    from dlqproc import app

    return app.run(cfg)


if __name__ == "__main__":
    sys.exit(main())
