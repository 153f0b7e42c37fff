"""The gateway's own routes, one module per resource; ingest lives in ``gateway.ingest``."""

from gateway.routes import events, health, subscriptions

__all__ = ["events", "health", "subscriptions"]
