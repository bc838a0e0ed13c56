"""The `scoopy` command: worker, migrate, launch, tree, trace, cancel, rollback, demo."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import structlog

from .cooperation import Cooperation
from .demo import run_demo
from .engine import migrate as migrations
from .errors import ScoopyError
from .results import RunInfo

EXIT_USAGE = 2


class UsageError(ScoopyError):
    """Bad command-line input."""


def configure_logging(fmt: str, level: str) -> None:
    """Route structlog to stderr as JSON lines or colourless console text."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard module: render their records the same way, one
    # line each. asyncpg's pool logs every failed reconnect with a traceback while the
    # database is away; the worker already says so once, so those go to debug.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
        )
    )
    handler.addFilter(_quiet_reconnects)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.getLevelNamesMapping()[level.upper()])


def _quiet_reconnects(record: logging.LogRecord) -> bool:
    if record.name.startswith("asyncpg") and record.exc_info:
        record.msg = f"{record.getMessage()}: {record.exc_info[1]!r}"
        record.args = ()
        record.exc_info = None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)
    return True


def load_app(spec: str) -> Any:
    """Import `module:attribute`; raise `UsageError` saying what was wrong."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(f"APP must look like 'module:attribute', got {spec!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the user's modules are importable
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(
            f"cannot import module {module_name!r} (from APP {spec!r}): {exc}"
        ) from exc
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UsageError(f"module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target


def _cooperation(args: argparse.Namespace, **options: Any) -> Cooperation:
    return Cooperation(args.dsn, schema=args.schema, **options)


def app_cooperation(args: argparse.Namespace) -> Cooperation:
    app = load_app(args.app)
    if isinstance(app, Cooperation):
        return app
    if callable(app):
        coop = _cooperation(
            args,
            listen=not args.poll_only,
            poll_interval=args.poll_interval,
            pool_size=args.pool_size,
            heartbeat=args.heartbeat,
            liveness_timeout=args.liveness_timeout,
            subscription_ttl=None if args.subscription_ttl == 0 else args.subscription_ttl,
        )
        app(coop)
        if not coop.bindings:
            raise UsageError(f"APP {args.app!r} subscribed no sagas")
        return coop
    raise UsageError(
        f"APP {args.app!r} must name a Cooperation, "
        "or a function that takes one and subscribes sagas"
    )


async def _worker(args: argparse.Namespace) -> int:
    coop = app_cooperation(args)
    log = structlog.get_logger("scoopy")
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with coop:
            log.info(
                "worker started",
                worker=coop.worker_id,
                sagas=sorted(coop.bindings),
                schema=coop.schema,
            )
            async for signum in signals:
                log.info("stopping", signal=signal.Signals(signum).name)
                break
    return 0


async def _migrate(args: argparse.Namespace) -> int:
    async with (
        _cooperation(args, migrate=True, worker=False) as coop,
        coop.pool.acquire() as conn,
    ):
        versions = await coop.store.applied_versions(conn) or []
    known = migrations.latest_version()
    print(f"schema {coop.schema!r} is at version {max(versions)} ({known} known)")
    return 0


async def _launch(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
        context = json.loads(args.context) if args.context else None
    except json.JSONDecodeError as exc:
        raise UsageError(f"payload and context must be JSON: {exc}") from exc
    async with _cooperation(args, worker=False) as coop:
        handle = await coop.launch(
            args.topic, payload, context=context, key=args.key, after=args.after
        )
        print(handle.id)
        if args.wait:
            outcome = await handle.wait(timeout=args.timeout)
            print(outcome.status)
            if outcome.failure is not None:
                print(outcome.failure.render())
                return 1
    return 0


async def _tree(args: argparse.Namespace) -> int:
    async with _cooperation(args, worker=False) as coop:
        runs = await coop.runs(uuid.UUID(args.root))
        waiting = {each.run_id: each for each in await coop.waiting_for(args.root)}
    children: dict[uuid.UUID | None, list[RunInfo]] = {}
    for run in runs:
        children.setdefault(run.parent_id, []).append(run)

    def show(parent: uuid.UUID | None, depth: int) -> None:
        for run in children.get(parent, []):
            why = waiting.get(run.id)
            state = run.status if why is None else f"{run.status}: {why.detail}"
            print(f"{'  ' * depth}{run.saga} [{run.id}] {state}")
            show(run.id, depth + 1)

    show(None, 0)
    return 0


async def _trace(args: argparse.Namespace) -> int:
    async with _cooperation(args, worker=False) as coop:
        events = await coop.events(uuid.UUID(args.root))
    for event in events:
        depth = max(0, len(event.lineage) - 2)
        failure = f"  {event.failure.type}: {event.failure.message}" if event.failure else ""
        print(
            f"{event.seq:>8} {event.time.isoformat(timespec='milliseconds')} "
            f"{'  ' * depth}{event.type:<22} {event.saga or '-'}  {event.step or ''}{failure}"
        )
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    async with _cooperation(args, worker=False) as coop:
        fresh = await coop.cancel(args.run, args.reason)
    print("cancellation requested" if fresh else "cancellation was already requested")
    return 0


async def _rollback(args: argparse.Namespace) -> int:
    async with _cooperation(args, worker=False) as coop:
        handle = await coop.rollback(args.run, args.reason)
    print(f"rollback requested for {handle.id}")
    return 0


async def _subscriptions(args: argparse.Namespace) -> int:
    async with _cooperation(args, worker=False) as coop:
        entries = await coop.topology()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "topic": e.topic,
                        "saga": e.saga,
                        "live_workers": list(e.workers),
                        "last_served": None if e.last_served is None else e.last_served.isoformat(),
                    }
                    for e in entries
                ],
                indent=2,
            )
        )
        return 0
    rows = [("TOPIC", "SAGA", "LIVE WORKERS", "LAST SERVED")]
    for e in entries:
        seen = "never" if e.last_served is None else e.last_served.isoformat(timespec="seconds")
        rows.append((e.topic, e.saga, ", ".join(e.workers) or "none", seen))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[3]
        )
    return 0


async def _unsubscribe(args: argparse.Namespace) -> int:
    async with _cooperation(args, worker=False) as coop:
        if (args.topic, args.saga) not in await coop.subscriptions():
            raise UsageError(f"saga {args.saga!r} does not subscribe to topic {args.topic!r}")
        coop.unsubscribe(args.topic, args.saga)
        await coop.sync()
    print(f"unsubscribed {args.saga} from {args.topic}")
    return 0


async def _move(args: argparse.Namespace) -> int:
    async with _cooperation(args, worker=False) as coop:
        await coop.move(args.run, args.to)
    print(f"run {args.run} released" + (f" to go on with {args.to!r}" if args.to else ""))
    return 0


async def _demo(args: argparse.Namespace) -> int:
    await run_demo(args.dsn, args.schema)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scoopy", description=__doc__)
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: $SCOOPY_DSN, else embedded)")
    parser.add_argument(
        "--schema",
        default=None,
        help="schema of scoopy's tables (default: $SCOOPY_SCHEMA or scoopy)",
    )
    parser.add_argument("--log-format", choices=("console", "json"), default="console")
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="run the sagas an app subscribes")
    worker.add_argument("app", help="module:attribute naming a Cooperation or a setup function")
    worker.add_argument("--poll-only", action="store_true", help="no LISTEN/NOTIFY (PgBouncer)")
    worker.add_argument("--poll-interval", type=float, default=None)
    worker.add_argument("--pool-size", type=int, default=20)
    worker.add_argument(
        "--heartbeat", type=float, default=5.0, help="seconds between heartbeats (default 5)"
    )
    worker.add_argument(
        "--liveness-timeout",
        type=float,
        default=30.0,
        help="a worker silent this long is presumed dead (default 30 s)",
    )
    worker.add_argument(
        "--subscription-ttl",
        type=float,
        default=600.0,
        help="drop subscriptions no live worker served for this long; 0: never (default 600 s)",
    )
    worker.set_defaults(handler=_worker)

    sub.add_parser("migrate", help="create or upgrade the schema").set_defaults(handler=_migrate)

    launch = sub.add_parser("launch", help="launch a root message")
    launch.add_argument("topic")
    launch.add_argument("payload", help="JSON payload")
    launch.add_argument("--context", help="JSON object of context keys")
    launch.add_argument("--key", help="idempotency key: at most one hierarchy per key")
    launch.add_argument("--after", type=float, help="start the runs this many seconds later")
    launch.add_argument("--wait", action="store_true", help="wait for the outcome")
    launch.add_argument("--timeout", type=float, default=None)
    launch.set_defaults(handler=_launch)

    for name, helptext, handler in (
        ("tree", "show the runs of a hierarchy", _tree),
        ("trace", "show the event log of a hierarchy", _trace),
    ):
        command = sub.add_parser(name, help=helptext)
        command.add_argument("root", help="root id (as printed by launch)")
        command.set_defaults(handler=handler)

    for name, helptext, handler in (
        ("cancel", "cancel a hierarchy or a run's sub-tree", _cancel),
        ("rollback", "undo a finished, committed hierarchy", _rollback),
    ):
        command = sub.add_parser(name, help=helptext)
        command.add_argument("run", help="root id or run id")
        command.add_argument("--reason", default="requested from the command line")
        command.set_defaults(handler=handler)

    subscriptions = sub.add_parser(
        "subscriptions", help="list the registry: topic, saga, live workers, last served"
    )
    subscriptions.add_argument("--json", action="store_true", help="print JSON")
    subscriptions.set_defaults(handler=_subscriptions)
    unsubscribe = sub.add_parser("unsubscribe", help="remove a subscription from the registry")
    unsubscribe.add_argument("topic")
    unsubscribe.add_argument("saga")
    unsubscribe.set_defaults(handler=_unsubscribe)
    move = sub.add_parser("move", help="let a held run go on under the saga's current steps")
    move.add_argument("run", help="the held run's id")
    move.add_argument("--to", help="go on with this step (by name) instead")
    move.set_defaults(handler=_move)

    sub.add_parser("demo", help="run the demo hierarchy").set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    handler: Callable[[argparse.Namespace], Any] = args.handler
    try:
        return int(anyio.run(handler, args))
    except ScoopyError as exc:
        print(f"scoopy: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LookupError as exc:
        print(f"scoopy: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
