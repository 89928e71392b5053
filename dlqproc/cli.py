"""The `dlqproc` command: run, migrate, config, demo, --version."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import msgspec
import yaml

from dlqproc import __version__, logs
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
    d.add_argument("--messages", type=int, default=60, help="messages in the sample workload")
    d.add_argument(
        "--exit-when-done",
        action="store_true",
        help="stop once the workload is settled instead of serving on",
    )
    return p


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
    logs.setup(cfg.log.level)
    if args.command == "migrate":
        from dlqproc.store import Store, StoreUnavailable

        async def migrate() -> list[str]:
            store = Store(cfg.postgres.dsn, cfg.postgres.statement_timeout, ())
            try:
                return await store.migrate()
            finally:
                await store.close()

        try:
            applied = asyncio.run(migrate())
        except StoreUnavailable as exc:
            print(f"dlqproc: {exc}", file=sys.stderr)
            return 1
        print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
        return 0
    from dlqproc import app

    return app.run(cfg)


if __name__ == "__main__":
    sys.exit(main())
