"""Report jobs through a real heavy worker: the CSV holds exactly the deliveries the range and filters select."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from consumers.store.models import Delivery
from schemas.deliveries import DeliveryStatus
from schemas.events import CloudEvent
from schemas.ids import new_id
from schemas.jobs import REPORT_COLUMNS
from schemas.keys import Scope
from schemas.settings import Settings
from tests.apiclient import Gateway, insert_delivery, insert_event
from tests.heavystack import gateway, heavy_worker, wait_for_job
from tests.seeding import add_subscription
from tests.smtpserver import SmtpSink
from tests.workers import Hookgate

DAY = datetime(2026, 11, 2, tzinfo=UTC)


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture(scope="module")
def stack_settings(broker_url: str, module_store_url: str, tmp_path_factory: pytest.TempPathFactory,
                   smtp: SmtpSink) -> Settings:
    return Settings(broker_url=broker_url, database_url=module_store_url, files_dir=tmp_path_factory.mktemp("files"),
                    smtp_host="127.0.0.1", smtp_port=smtp.port, report_from="reports@hookgate.example")


@pytest.fixture(scope="module")
def worker(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hookgate]:
    process = heavy_worker(stack_settings, tmp_path_factory.mktemp("logs")).start()
    yield process
    process.stop()


def _seed(gw: Gateway, subscription_id: str, event_type: str, status: DeliveryStatus, created_at: datetime) -> str:
    event = CloudEvent(id=new_id(), source="tests/report", type=event_type, data={})
    delivery_id = insert_delivery(gw.sessions, insert_event(gw.sessions, event), subscription_id, status)
    with gw.sessions.begin() as session:
        session.execute(update(Delivery).where(Delivery.id == delivery_id).values(created_at=created_at))
    return delivery_id


async def _report(gw: Gateway, **request: str) -> list[dict[str, str]]:
    response = await gw.client.post("/v1/files", json={"kind": "report", **request},
                                    headers=gw.auth(Scope.EVENTS_WRITE))
    assert response.status_code == 202, response.text
    done = await wait_for_job(gw, response.json()["id"])
    assert done["status"] == "succeeded", done
    download = await gw.client.get(done["links"]["result"], headers=gw.auth(Scope.EVENTS_READ))
    assert download.status_code == 200 and download.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(download.text)))
    assert done["counts"] == {"rows": len(rows)}
    return rows


async def test_a_report_lists_the_deliveries_of_its_range_and_filters(stack_settings: Settings,
                                                                      worker: Hookgate) -> None:
    """Only deliveries created in [since, until) and matching status, type and subscription are rows, oldest first."""
    async with gateway(stack_settings) as gw:
        first = add_subscription(gw.sessions, "https://example.com/a", "whsec_" + "a" * 32)
        second = add_subscription(gw.sessions, "https://example.com/b", "whsec_" + "b" * 32)
        inside = [
            _seed(gw, first, "order.created", DeliveryStatus.SUCCEEDED, DAY + timedelta(hours=1)),
            _seed(gw, first, "order.paid", DeliveryStatus.DEAD, DAY + timedelta(hours=2)),
            _seed(gw, second, "order.created", DeliveryStatus.DEAD, DAY + timedelta(hours=3)),
        ]
        _seed(gw, first, "order.created", DeliveryStatus.DEAD, DAY - timedelta(seconds=1))  # before since
        _seed(gw, first, "order.created", DeliveryStatus.DEAD, DAY + timedelta(days=1))  # at until: excluded
        window = {"since": DAY.isoformat(), "until": (DAY + timedelta(days=1)).isoformat()}

        rows = await _report(gw, **window)
        assert [row["delivery_id"] for row in rows] == inside
        assert tuple(rows[0]) == REPORT_COLUMNS
        assert rows[0]["status"] == "succeeded" and rows[0]["event_type"] == "order.created"
        assert datetime.fromisoformat(rows[0]["created_at"]) == DAY + timedelta(hours=1)

        assert [r["delivery_id"] for r in await _report(gw, **window, status="dead")] == inside[1:]
        assert [r["delivery_id"] for r in await _report(gw, **window, status="dead", subscription_id=first)] \
            == inside[1:2]
        assert [r["delivery_id"] for r in await _report(gw, **window, event_type="order.created")] \
            == [inside[0], inside[2]]
        assert await _report(gw, since="2020-01-01T00:00:00Z", until="2020-01-02T00:00:00Z") == []


async def test_a_report_with_email_to_arrives_as_an_attachment(stack_settings: Settings, worker: Hookgate,
                                                               smtp: SmtpSink) -> None:
    """A report asked for with ``email_to`` runs as a chain of the report task and the email task: the CSV
    reaches a real SMTP server attached, the same rows as the download; a bad address is refused with a 422."""
    before = len(smtp.received)  # the sink serves the module: both stores' runs
    async with gateway(stack_settings) as gw:
        subscription_id = add_subscription(gw.sessions, "https://example.com/c", "whsec_" + "c" * 32)
        delivery_id = _seed(gw, subscription_id, "invoice.paid", DeliveryStatus.SUCCEEDED, DAY + timedelta(hours=5))
        window = {"kind": "report", "since": DAY.isoformat(), "until": (DAY + timedelta(days=1)).isoformat(),
                  "subscription_id": subscription_id}
        refused = await gw.client.post("/v1/files", json={**window, "email_to": ["not an address"]},
                                       headers=gw.auth(Scope.EVENTS_WRITE))
        assert refused.status_code == 422 and "not an email address" in refused.text, refused.text
        response = await gw.client.post("/v1/files", json={**window, "email_to": ["ops@example.com"]},
                                        headers=gw.auth(Scope.EVENTS_WRITE))
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        done = await wait_for_job(gw, job_id)
        download = await gw.client.get(done["links"]["result"], headers=gw.auth(Scope.EVENTS_READ))
        [mail] = smtp.wait_for(before + 1)[before:]
    assert (mail.mail_from, mail.rcpt_tos) == ("reports@hookgate.example", ["ops@example.com"])
    assert mail.message["Message-ID"] == f"<report-{job_id}@hookgate.example>"
    [attachment] = mail.message.iter_attachments()
    assert attachment.get_filename() == "report.csv"
    assert attachment.get_content().splitlines() == download.text.splitlines()
    assert [row["delivery_id"] for row in csv.DictReader(io.StringIO(attachment.get_content()))] == [delivery_id]
