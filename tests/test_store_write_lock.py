"""SQLite's write lock file: writers queue on it in the kernel, and every way a transaction ends lets go.

The lock file sits beside the database (``<file>.write-lock``); a write transaction holds an
exclusive ``flock`` on it from BEGIN until its COMMIT or ROLLBACK is done. The tests probe it from
a descriptor of their own, as another process would.
"""

from __future__ import annotations

import fcntl
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from consumers.store.database import make_engine, make_sessionmaker

_COUNT = "SELECT i FROM n"


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "store.db"
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE n (i INTEGER NOT NULL)")
        conn.exec_driver_sql("INSERT INTO n VALUES (0)")
    engine.dispose()
    return path


@pytest.fixture
def engine(database: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{database}")
    yield engine
    engine.dispose()


def lock_is_free(database: Path) -> bool:
    fd = os.open(f"{database}.write-lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def test_a_write_transaction_holds_the_lock_until_it_commits(engine: Engine, database: Path) -> None:
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        session.connection().exec_driver_sql("UPDATE n SET i = i + 1")
        assert not lock_is_free(database)
    assert lock_is_free(database)
    with engine.connect() as conn:
        assert conn.exec_driver_sql(_COUNT).scalar() == 1


def test_a_failed_transaction_rolls_back_and_lets_go(engine: Engine, database: Path) -> None:
    with pytest.raises(RuntimeError), engine.begin() as conn:
        conn.exec_driver_sql("UPDATE n SET i = i + 1")
        raise RuntimeError("the caller gave up")
    assert lock_is_free(database)
    with engine.connect() as conn:
        assert conn.exec_driver_sql(_COUNT).scalar() == 0


def test_readers_take_no_lock(engine: Engine, database: Path) -> None:
    readonly = make_sessionmaker(engine, readonly=True)
    with engine.begin() as writer:
        writer.exec_driver_sql("UPDATE n SET i = 5")
        # A reader beside a writer: it neither waits for the writer nor sees its uncommitted row.
        with readonly() as session:
            assert session.connection().exec_driver_sql(_COUNT).scalar() == 0


def test_a_connection_dropped_mid_transaction_lets_go(engine: Engine, database: Path) -> None:
    """The pool rolls back a connection whose Connection was never closed, and the lock goes with it."""
    conn = engine.connect()
    conn.begin()
    conn.exec_driver_sql("UPDATE n SET i = i + 1")
    assert not lock_is_free(database)
    del conn
    gc.collect()
    assert lock_is_free(database)
    with engine.begin() as other:
        assert other.exec_driver_sql(_COUNT).scalar() == 0


_HOLDER = textwrap.dedent("""
    import sys, time
    from consumers.store.database import make_engine
    engine = make_engine(sys.argv[1])
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE n SET i = 1000")
        print("holding", flush=True)
        time.sleep(60)
""")


def test_a_writer_killed_holding_the_lock_does_not_block_the_others(engine: Engine, database: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, f"sqlite:///{database}"], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).parents[1])
    assert holder.stdout is not None
    with holder.stdout:
        try:
            assert holder.stdout.readline().strip() == "holding"
            assert not lock_is_free(database)
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=10)
        finally:
            holder.kill()
            holder.wait()
    assert lock_is_free(database)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE n SET i = i + 1")
    with engine.connect() as conn:
        # The killed writer's update was never committed.
        assert conn.exec_driver_sql(_COUNT).scalar() == 1


_INCREMENTER = textwrap.dedent("""
    import sys, threading
    from consumers.store.database import make_engine
    engine = make_engine(sys.argv[1])

    def work():
        for _ in range(int(sys.argv[2])):
            with engine.begin() as conn:  # read, then write what was read: lost updates would show
                value = conn.exec_driver_sql("SELECT i FROM n").scalar()
                conn.exec_driver_sql("UPDATE n SET i = ?", (value + 1,))

    threads = [threading.Thread(target=work) for _ in range(int(sys.argv[3]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
""")


def test_writers_in_many_processes_and_threads_lose_no_update(engine: Engine, database: Path) -> None:
    processes, threads, rounds = 3, 4, 40
    workers = [subprocess.Popen([sys.executable, "-c", _INCREMENTER, f"sqlite:///{database}", str(rounds),
                                 str(threads)], cwd=Path(__file__).parents[1], stderr=subprocess.PIPE, text=True)
               for _ in range(processes)]
    # And a thread of this process, on its own pool, beside them.
    local = threading.Thread(target=_increment, args=(engine, rounds))
    local.start()
    errors = [worker.communicate(timeout=90)[1] for worker in workers]
    local.join(timeout=90)
    assert all(worker.returncode == 0 for worker in workers), errors
    with engine.connect() as conn:
        assert conn.exec_driver_sql(_COUNT).scalar() == processes * threads * rounds + rounds
    assert lock_is_free(database)


def _increment(engine: Engine, rounds: int) -> None:
    for _ in range(rounds):
        with engine.begin() as conn:
            value = conn.exec_driver_sql(_COUNT).scalar()
            conn.exec_driver_sql("UPDATE n SET i = ?", (value + 1,))
