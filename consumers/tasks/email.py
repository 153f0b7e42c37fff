"""The email channel: ``tasks.send_email(delivery_id)`` renders a delivery's email and sends it over SMTP.

Idempotent the way the Celery guide asks ("check if already sent, send, mark sent"): the claim is
the check (a finished delivery is never claimed) and takes the delivery ``sending`` under a lease
with a conditional UPDATE, so of two workers holding the same delivery exactly one sends; the
attempt is recorded the moment the server answers. What remains is the window between the
server's 250 and that commit: a worker killed inside it sends the message again once the lease
runs out, with the same ``Message-ID``.
"""

from __future__ import annotations

import os
from typing import Any

import orjson
from celery import Task

from consumers.celery_app import celery_app
from consumers.email_message import EmailBuildError, build_email
from consumers.smtp import Mailer, SmtpError, SmtpPermanentError
from consumers.store.deliveries import ChannelJob
from consumers.tasks.runner import Attempted, AttemptFailed, PermanentError, run_delivery
from schemas.settings import Settings
from schemas.subscriptions import Channel
from schemas.topology import EMAIL_QUEUE

__all__ = ["send_email"]

# Made once per worker process: the settings do not change while it runs.
_mailer: tuple[int, Mailer] | None = None


def _process_mailer(settings: Settings) -> Mailer:
    global _mailer
    if _mailer is None or _mailer[0] != os.getpid():
        _mailer = (os.getpid(), Mailer.from_settings(settings))
    return _mailer[1]


def _send(job: ChannelJob, mailer: Mailer) -> Attempted:
    try:
        message = build_email(job.delivery_id, orjson.loads(job.event_body), job.options)
    except EmailBuildError as exc:
        raise PermanentError(str(exc)) from exc
    try:
        reply = mailer.send(message)
    except SmtpError as exc:
        kind = PermanentError if isinstance(exc, SmtpPermanentError) else AttemptFailed
        raise kind(str(exc), exc.code) from exc
    detail = f"{reply.server}: {reply.text}"
    if reply.refused:
        refused = "; ".join(f"{address}: {code} {text}" for address, (code, text) in reply.refused.items())
        detail += f" (refused recipients: {refused})"
    return Attempted(reply.code, detail)


@celery_app.task(name="tasks.send_email", bind=True, acks_late=True, max_retries=None, ignore_result=True,
                 track_started=False)
def send_email(self: Task, delivery_id: str) -> dict[str, Any]:
    """Send one email delivery and record the attempt (SMTP reply code and text); retried on the retry policy.

    A 4xx reply, a timeout or no connection is retried (the fallback server is tried first); a 5xx
    reply, an address that does not parse, a missing recipient or a template error is dead at once.
    """
    settings: Settings = self.app.conf.hookgate_settings
    mailer = _process_mailer(settings)
    return run_delivery(self, Channel.EMAIL, delivery_id, lambda job: _send(job, mailer), queue=EMAIL_QUEUE,
                        time_limit_s=settings.task_time_limit_s)
