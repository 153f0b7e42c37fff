"""Logging for every hookgate process: structlog lines, with the standard library's loggers routed through it."""

from __future__ import annotations

import logging.config
import os
import sys
from typing import Any

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["ProcessInfo", "configure_logging", "logging_config", "structlog_formatter", "wants_json"]

# Libraries that attach handlers of their own would print every line twice, once unformatted.
_SELF_HANDLING_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
# httpx logs every request's full URL at INFO, and webhook URLs often carry credentials (tokens in
# the path or query), so only its warnings pass.
_URL_LOGGING_LOGGERS = ("httpx", "httpcore")


class ProcessInfo:
    """Add the process name and pid to every line, so interleaved output of `hookgate up` stays attributable."""

    def __init__(self, process: str) -> None:
        self.process = process

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        event_dict["process"] = self.process
        # Read per line, not once: Celery's prefork children inherit this configuration through fork.
        event_dict["pid"] = os.getpid()
        return event_dict


def _drop_color_message(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    # uvicorn passes a copy of each message with terminal colour codes as an extra; the message itself is enough.
    event_dict.pop("color_message", None)
    return event_dict


def wants_json(json: bool | None = None) -> bool:
    """JSON lines unless told otherwise or stderr is a terminal a person reads."""
    if json is not None:
        return json
    return not sys.stderr.isatty()


def _dumps(obj: Any, **_kwargs: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def _shared_processors(process: str) -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.stdlib.ExtraAdder(),
        _drop_color_message,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        ProcessInfo(process),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.UnicodeDecoder(),
    ]


def structlog_formatter(process: str, json: bool) -> structlog.stdlib.ProcessorFormatter:
    """Configure structlog and return the formatter that renders every stdlib record the same way.

    A ``logging.config.dictConfig`` factory, so that a process configured only through a dictConfig
    (uvicorn's spawned workers are) gets structlog configured too.
    """
    shared = _shared_processors(process)
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    renderer: list[Processor] = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(serializer=_dumps)]
        if json
        else [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )


def logging_config(process: str, *, level: str = "INFO", json: bool | None = None) -> dict[str, Any]:
    """The ``dictConfig`` that `configure_logging` applies; uvicorn takes it as ``log_config``."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "hookgate": {"()": f"{__name__}.structlog_formatter", "process": process, "json": wants_json(json)},
        },
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "hookgate", "stream": "ext://sys.stderr"},
        },
        "loggers": {
            **{name: {"handlers": [], "propagate": True} for name in _SELF_HANDLING_LOGGERS},
            **{name: {"level": "WARNING"} for name in _URL_LOGGING_LOGGERS},
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
    }


def configure_logging(process: str, *, level: str = "INFO", json: bool | None = None) -> None:
    """Send every log line of this process, structlog's and the stdlib's, to stderr in one format.

    ``json=None`` chooses JSON lines unless stderr is a terminal. ``process`` and the pid are on every
    line, and values bound with ``structlog.contextvars.bind_contextvars`` are merged in.
    """
    logging.config.dictConfig(logging_config(process, level=level, json=json))
    # Library warnings (Celery's, for one) become log lines too, instead of bare text on stderr.
    logging.captureWarnings(True)
