"""The ``hookgate`` command line: one command per process, and ``up`` to run them all supervised."""

from __future__ import annotations

import functools
import sys

import click
import structlog
import uvicorn
from celery import signals as celery_signals
from pydantic import ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from consumers.logs import configure_logging, logging_config, wants_json
from consumers.store.database import make_engine, make_sessionmaker, migrate
from consumers.store.errors import StoreError
from consumers.store.keys import create_api_key
from gateway.httpserver import GuardedHttpToolsProtocol
from gateway.supervisor import ChildSpec, Supervisor
from schemas.keys import Scope
from schemas.settings import Settings
from schemas.topology import BUILTIN_TASK_QUEUES, HEAVY_QUEUE

__all__ = ["main"]

log = structlog.get_logger(__name__)

_LOG_FORMATS: dict[str, bool | None] = {"auto": None, "json": True, "console": False}
_BEAT_SCHEDULE_FILE = "celerybeat-schedule"


def _start(process: str) -> Settings:
    """What every command does first: read the settings once and configure this process's logs."""
    try:
        settings = Settings()
    except ValidationError as exc:
        # Name the variable and the rule only: the rejected value may be a secret.
        problems = "; ".join(
            # A rule across fields (the heavy limits) has no location of its own: its message names them.
            f"HOOKGATE_{str(error['loc'][0]).upper()}: {error['msg']}" if error["loc"] else error["msg"]
            for error in exc.errors()
        )
        raise click.UsageError(f"invalid settings: {problems}") from exc
    configure_logging(process, level=settings.log_level, json=_LOG_FORMATS[settings.log_format])
    return settings


def _json_logs(settings: Settings) -> bool:
    return wants_json(_LOG_FORMATS[settings.log_format])


def _migrate(settings: Settings) -> None:
    database = make_url(settings.database_url).render_as_string(hide_password=True)
    try:
        migrate(settings.database_url)
    except SQLAlchemyError as exc:
        raise click.ClickException(f"could not migrate the store at {database}: {str(exc).splitlines()[0]}") from exc
    log.info("store_migrated", database=database)


def _run_celery(settings: Settings, argv: list[str]) -> None:
    # Imported here: the Celery app reads its settings at import, and only these commands need it.
    from consumers.celery_app import celery_app

    # With a receiver connected, Celery leaves logging (and stdout) to us: lines stay in our format.
    celery_signals.setup_logging.connect(_keep_our_logging, weak=False)
    quiet = ["--quiet"] if _json_logs(settings) else []  # the banner is for people, not for log collectors
    sys.exit(celery_app.start([*quiet, *argv, "--loglevel", settings.log_level]) or 0)


def _keep_our_logging(**_kwargs: object) -> None:
    """Celery's ``setup_logging`` receiver: logging is already configured by the command."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hookgate")
def main() -> None:
    """hookgate: events in over HTTP and AMQP, out as signed webhooks.

    Configuration comes from HOOKGATE_* environment variables (see the README).
    """


@main.command()
@click.option("--host", help="Interface to listen on.  [default: HOOKGATE_HOST, 127.0.0.1]")
@click.option("--port", type=click.IntRange(0, 65535), help="Port to listen on.  [default: HOOKGATE_PORT, 8080]")
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes.  [default: HOOKGATE_HTTP_WORKERS, 1]")
def serve(host: str | None, port: int | None, workers: int | None) -> None:
    """Run the HTTP gateway (uvicorn with httptools and uvloop).

    The access log is off: writing a line per request costs ingest throughput. A request whose
    headers or body arrive too slowly is answered 408 (HOOKGATE_HTTP_HEADER_TIMEOUT_S, _BODY_TIMEOUT_S).
    """
    settings = _start("gateway")
    uvicorn.run(
        "gateway.app:create_app",
        factory=True,
        host=settings.host if host is None else host,
        port=settings.port if port is None else port,
        workers=settings.http_workers if workers is None else workers,
        # httptools with a deadline for each request's head; the body's is the app's (BodyLimit).
        http=functools.partial(GuardedHttpToolsProtocol, header_timeout_s=settings.http_header_timeout_s),
        loop="uvloop",
        access_log=False,
        # uvicorn applies this dictConfig in its own worker processes as well.
        log_config=logging_config("gateway", level=settings.log_level, json=_LOG_FORMATS[settings.log_format]),
        log_level=settings.log_level.lower(),
        server_header=False,
        # Half the supervisor's patience, so that under `hookgate up` the gateway finishes on its own.
        timeout_graceful_shutdown=settings.shutdown_timeout_s / 2,
    )


@main.command()
def router() -> None:
    """Run the router: consume hookgate.ingest, store events, create deliveries, enqueue their tasks."""
    settings = _start("router")
    # Imported here: the router brings aio-pika and its event loop, which no other command needs.
    from consumers.router import run

    run(settings)


@main.command()
@click.option("-Q", "--queues", required=True, help="Comma-separated task queues to consume, e.g. webhooks.")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), help="Pool size.  [default: the number of CPUs]")
@click.option("--pool", type=click.Choice(["prefork", "threads"]), default="prefork", show_default=True,
              help="prefork enforces task time limits; threads does not.")
@click.option("-n", "--hostname", help="Celery node name.  [default: QUEUES@%h]")
def worker(queues: str, concurrency: int | None, pool: str, hostname: str | None) -> None:
    """Run a Celery worker for the given queues."""
    settings = _start("worker")
    names = [name.strip() for name in queues.split(",") if name.strip()]
    if not names:
        raise click.BadParameter("name at least one queue", param_hint="-Q")
    if HEAVY_QUEUE in names and pool != "prefork":
        raise click.BadParameter("the heavy queue needs the prefork pool: only it enforces time limits",
                                 param_hint="--pool")
    argv = ["worker", "--queues", ",".join(names), "--pool", pool,
            # One node name per queue set, so several workers on one host do not clash.
            "--hostname", hostname or f"{'-'.join(names)}@%h",
            # Gossip and mingle chatter with every other worker at start and after; hookgate needs neither.
            "--without-gossip", "--without-mingle"]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    if HEAVY_QUEUE in names:
        # A heavy task runs for minutes: a process holds only the one it runs, the others wait in the broker
        # for whichever process is free first.
        argv += ["--prefetch-multiplier", "1"]
    _run_celery(settings, argv)


@main.command()
def beat() -> None:
    """Run Celery beat, the scheduler of periodic tasks (one per deployment)."""
    settings = _start("beat")
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    _run_celery(settings, ["beat", "--schedule", str(settings.state_dir / _BEAT_SCHEDULE_FILE)])


@main.command("migrate")
def migrate_command() -> None:
    """Create the store's schema, or upgrade it to this version's."""
    _migrate(_start("migrate"))


@main.group()
def keys() -> None:
    """Manage API keys."""


@keys.command("create")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, type=click.Choice([scope.value for scope in Scope]),
              default=[Scope.EVENTS_WRITE.value], show_default=True,
              help="A scope the key grants; repeat for several. admin implies all.")
def create_key(name: str, scopes: tuple[str, ...]) -> None:
    """Create an API key named NAME and print it, once: only its hash is stored."""
    settings = _start("keys")
    engine = make_engine(settings.database_url)
    try:
        key_id, plaintext = create_api_key(make_sessionmaker(engine), name, [Scope(scope) for scope in scopes])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from exc
    except StoreError as exc:
        raise click.ClickException(f"{exc} (has the store been created? run: hookgate migrate)") from exc
    finally:
        engine.dispose()
    log.info("api_key_created", key_id=key_id, scopes=sorted(scopes))
    click.echo(f"Created API key {key_id} named {name!r} with scopes: {', '.join(sorted(scopes))}.")
    click.echo("This is the only time the key is shown; store it now. Send it as: Authorization: Bearer KEY")
    click.echo(plaintext)


@main.command()
@click.option("--host", help="Interface the gateway listens on.  [default: HOOKGATE_HOST, 127.0.0.1]")
@click.option("--port", type=click.IntRange(0, 65535), help="Port the gateway listens on.  [default: HOOKGATE_PORT]")
def up(host: str | None, port: int | None) -> None:
    """Run everything: migrate the store, then the gateway, the router, a worker per queue and beat.

    Each runs as a child process with the same command an operator would type (hookgate serve,
    router, worker -Q QUEUE, beat); one that dies is restarted with backoff. Ctrl-C or SIGTERM
    stops them all gracefully (SIGKILL after HOOKGATE_SHUTDOWN_TIMEOUT_S).
    """
    settings = _start("up")
    _migrate(settings)
    command = (sys.executable, "-m", "gateway.cli")
    serve_argv = ("serve", "--host", settings.host if host is None else host,
                  "--port", str(settings.port if port is None else port))
    specs = [
        ChildSpec("gateway", (*command, *serve_argv)),
        ChildSpec("router", (*command, "router")),
        *(ChildSpec(f"worker-{queue}", (*command, "worker", "-Q", queue)) for queue in BUILTIN_TASK_QUEUES),
        ChildSpec("beat", (*command, "beat")),
    ]
    sys.exit(Supervisor(specs, stop_timeout_s=settings.shutdown_timeout_s).run())


if __name__ == "__main__":
    main()
