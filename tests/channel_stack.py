"""hookgate's real processes for channel tests: `serve`, `router` and workers per queue, with an API key.

Usage::

    with ChannelStack(settings, tmp_path, workers={"billing": "billing", "other": "webhooks,email"}) as stack:
        stack.api.post("/v1/subscriptions", json=...)          # a key with every scope
        stack.publish_amqp({"type": "invoice.paid", ...})      # as an upstream AMQP publisher would
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import orjson
from kombu import Connection

from consumers.store.database import make_engine, make_sessionmaker
from consumers.store.keys import create_api_key
from consumers.topology import declare_topology
from schemas import topology
from schemas.keys import Scope
from schemas.settings import Settings
from tests.workers import Hookgate, free_port

__all__ = ["ChannelStack"]


class ChannelStack:
    """Gateway, router and one `hookgate worker -Q QUEUES` per named role (its env has TEST_WORKER_ROLE and
    ``worker_env``)."""

    def __init__(self, settings: Settings, log_dir: Path, workers: Mapping[str, str],
                 worker_env: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.settings = settings.model_copy(update={"port": self.port})
        self.log_dir = log_dir
        self.workers = {
            role: Hookgate(self.settings, log_dir / f"worker-{role}.log", "worker", "-Q", queues, "-c", "2",
                           extra_env={"TEST_WORKER_ROLE": role, **(worker_env or {})})
            for role, queues in workers.items()
        }
        self.processes = [Hookgate(self.settings, log_dir / "serve.log", "serve", "--port", str(self.port)),
                          Hookgate(self.settings, log_dir / "router.log", "router"), *self.workers.values()]
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        self.engine = make_engine(self.settings.database_url)
        self.sessions = make_sessionmaker(self.engine)

    def publish_amqp(self, event: dict[str, Any], message_id: str) -> None:
        """Publish an event to hookgate.events with publisher confirms, routing key = its type."""
        with Connection(self.settings.broker_url, transport_options={"confirm_publish": True}) as conn:
            conn.Producer().publish(orjson.dumps(event), exchange=topology.EVENTS_EXCHANGE,
                                    routing_key=event["type"], content_type="application/json",
                                    message_id=message_id, delivery_mode=2)

    def wait_for_subscriptions(self) -> None:
        """Let the router's subscription cache pick up what was just created."""
        time.sleep(self.settings.subscription_cache_ttl_s + 0.3)

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name} ---\n{p.log_text()[-6000:]}" for p in self.processes)

    def __enter__(self) -> ChannelStack:
        with Connection(self.settings.broker_url) as conn:
            declare_topology(conn)
        for process in self.processes:
            process.start()
        key = create_api_key(self.sessions, "channels", [Scope.ADMIN])[1]
        self.api.headers["Authorization"] = f"Bearer {key}"
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for process in self.processes:
            process.stop()
        self.api.close()
        self.engine.dispose()
        if exc_type is not None:
            print(self.logs())
