"""The Celery app: every queue, built in or asked for by a worker, is a quorum queue on hookgate.tasks."""

from __future__ import annotations

import os
import subprocess
import sys

from consumers.celery_app import make_celery
from schemas import topology
from schemas.settings import Settings
from tests.workers import REPO_ROOT


def test_builtin_and_missing_queues_share_the_tasks_exchange() -> None:
    """`webhooks` and a queue only a worker names (billing) are both quorum queues bound on hookgate.tasks."""
    app = make_celery(Settings())
    try:
        for name in (topology.WEBHOOKS_QUEUE, "billing"):
            queue = app.amqp.queues[name]
            assert queue.exchange.name == topology.TASKS_EXCHANGE and queue.exchange.type == "topic", name
            assert queue.routing_key == name
            assert queue.queue_arguments == {"x-queue-type": "quorum"}, name
    finally:
        app.close()


def test_delivery_tasks_route_to_the_webhooks_queue() -> None:
    """Both webhook tasks are routed to the webhooks queue by name."""
    app = make_celery(Settings())
    try:
        for task in ("tasks.deliver_webhook", "tasks.deliver_webhooks"):
            assert app.amqp.router.route({}, task)["queue"].name == topology.WEBHOOKS_QUEUE
    finally:
        app.close()


def test_a_named_queue_wins_over_the_task_route() -> None:
    """Sending a webhook task to another queue publishes with that queue's routing key, so it lands there."""
    app = make_celery(Settings())
    try:
        route = app.amqp.router.route({"queue": "webhooks-strict"}, "tasks.deliver_webhook")
        assert route["queue"].name == "webhooks-strict"
        assert route.get("routing_key", route["queue"].routing_key) == "webhooks-strict"
    finally:
        app.close()



def test_task_modules_from_the_environment_are_comma_separated_and_loaded() -> None:
    """HOOKGATE_TASK_MODULES="a, b" names two modules, and a worker's app imports both and registers their tasks."""
    # A fresh interpreter: in this one another test may have imported the module already.
    script = ("from consumers.celery_app import make_celery; from schemas.settings import Settings; "
              "s = Settings(); app = make_celery(s); app.loader.import_default_modules(); "
              "print(list(s.task_modules), 'usertasks.billing.handle_invoice' in app.tasks)")
    env = {**os.environ, "HOOKGATE_TASK_MODULES": "tests.usertasks.billing, tests.usertasks"}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout.split("\n")[-2] == "['tests.usertasks.billing', 'tests.usertasks'] True"
