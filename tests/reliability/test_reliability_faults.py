"""Faults mid-load through real processes: every event the gateway accepted reaches every matching receiver.

Each case ends with ``check_drained``: no accepted event lost, no delivery recorded as succeeding
twice, nothing left open, and a printed summary (run with ``-s`` to see it).
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from tests.reliability.harness import Load, Stack, check_drained, reliability_settings, running_stack
from tests.workers import wait_until

# Several processes on a busy 2-core machine: more room than the suite default of 120 s.
pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]


def _requests(stack: Stack, name: str) -> int:
    return len(stack.receivers[name].ledger)


def test_a_webhook_worker_killed_mid_load_loses_nothing(broker_url: str, sqlite_url: str, tmp_path: Path) -> None:
    """A webhook worker SIGKILLed (pool and all) while it sends, then restarted: every accepted event arrives."""
    # The deliveries the killed worker held stay leased for the hard time limit plus the lease margin: keep
    # the limit short, but not so short that the restarted worker's first (cold) task runs out of time.
    settings = reliability_settings(broker_url, sqlite_url, task_soft_time_limit_s=6, task_time_limit_s=8,
                                    lease_margin_s=5)
    with running_stack(settings, tmp_path) as stack:
        load = Load(stack, 1000, rate_per_s=300).start()
        wait_until(lambda: _requests(stack, "all") >= 200, "deliveries under way")
        stack.workers[0].kill()
        load.wait_accepted(700)  # the gateway and the router carry on without a worker
        stack.workers[0].start()
        load.join()
        check_drained(stack, load, "webhook worker SIGKILLed mid-load, then restarted")


def test_the_router_killed_mid_load_loses_nothing(broker_url: str, sqlite_url: str, tmp_path: Path) -> None:
    """The router SIGKILLed between batches or inside one, then restarted: every accepted event arrives once."""
    with running_stack(reliability_settings(broker_url, sqlite_url), tmp_path) as stack:
        load = Load(stack, 1500, rate_per_s=300).start()
        wait_until(lambda: _requests(stack, "all") >= 200, "deliveries under way")
        stack.router.kill()
        load.wait_accepted(900)  # events wait in hookgate.ingest meanwhile
        stack.router.start()
        load.join()
        check_drained(stack, load, "router SIGKILLed mid-load, then restarted")


def test_a_receiver_down_for_a_while_gets_everything_once_back(broker_url: str, sqlite_url: str,
                                                                tmp_path: Path) -> None:
    """A receiver that refuses connections for seconds gets every event once it listens again (retries)."""
    with running_stack(reliability_settings(broker_url, sqlite_url), tmp_path) as stack:
        load = Load(stack, 1200, rate_per_s=200).start()
        wait_until(lambda: _requests(stack, "orders") >= 100, "deliveries under way")
        port = stack.take_down("orders")
        load.wait_accepted(1000)  # about four seconds of refused connections
        stack.bring_back("orders", port)
        load.join()
        check_drained(stack, load, "receiver down for seconds mid-load, then back")


def _terminate_hookgate_connections(database_url: str) -> int:
    """``pg_terminate_backend`` every other connection to the test database: hookgate's, all of them."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        return len(conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall())


def test_the_store_under_contention_from_every_process(broker_url: str, store_url: str, tmp_path: Path) -> None:
    """Gateway, router and two workers of four processes write at once (SQLite's one writer lock); on
    PostgreSQL every hookgate connection is also terminated three times mid-load (a worker's recorder
    holds the attempts it could not write and tries again)."""
    settings = reliability_settings(broker_url, store_url)
    with running_stack(settings, tmp_path, workers=2, concurrency=4) as stack:
        load = Load(stack, 1200, rate_per_s=600, clients=12).start()
        terminated: list[int] = []
        if store_url.startswith("postgresql"):
            for accepted in (200, 600, 1000):
                load.wait_accepted(accepted)
                terminated.append(_terminate_hookgate_connections(store_url))
        load.join()
        case = "store contention" + (f", PostgreSQL connections terminated {terminated}" if terminated else
                                     ", SQLite")
        # Drains slowly on 2 busy cores (2,000 events: 60 s on SQLite, 85 s on PostgreSQL): room to spare.
        check_drained(stack, load, case, timeout_s=180)
        assert all(terminated), f"some terminations found no hookgate connection: {terminated}"
