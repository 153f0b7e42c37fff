"""A pytest plugin: record every API key and signing secret a test run creates, then scan the run's logs for them.

Loaded by tests/conftest.py. At start it wraps the three places keys and secrets are made
(``consumers.store.keys.create_api_key``, ``consumers.store.subscriptions.generate_secret`` and
``tests.receiver.make_secret``) so each value is recorded. Every test's captured stdout, stderr
and log records go to ``captured-output.log`` in the run's temporary directory, where every
child process the tests start (gateway, router, workers, RabbitMQ nodes) writes its log too. At
the end of the session every ``*.log`` and ``*.out`` file there is scanned for each recorded value,
for the base64 part of each secret on its own, and for anything shaped like a hookgate key
(``hg_…``) or secret (``whsec_…``) that the run did not record (a key made in a child process).
A find fails the run and names the file, never the value.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest

__all__ = ["SecretLedger"]

# Anything shaped like a credential hookgate makes: keys are hg_ + 43 URL-safe characters, secrets
# whsec_ + base64 of 18 bytes or more.
_CREDENTIAL = re.compile(rb"hg_[A-Za-z0-9_-]{20,}|whsec_[A-Za-z0-9+/]{20,}={0,2}")
# Long base64 or URL-safe tokens: a secret's key part logged without its prefix would be one of these.
_TOKEN = re.compile(rb"[A-Za-z0-9+/_-]{24,}={0,2}")
_LOG_SUFFIXES = (".log", ".out")
_CAPTURED = "captured-output.log"

F = TypeVar("F", bound=Callable[..., Any])


class SecretLedger:
    """The keys and secrets recorded so far, and the scan for them."""

    def __init__(self) -> None:
        self._whole: set[bytes] = set()
        self._bare: set[bytes] = set()
        self.basetemp: Path | None = None

    def __len__(self) -> int:
        return len(self._whole)

    def record(self, value: str) -> None:
        self._whole.add(value.encode())
        bare = value.split("_", 1)[-1].encode()
        if len(bare) >= 24:
            self._bare.add(bare)

    def leaks(self, text: bytes) -> int:
        """How many places in ``text`` hold a recorded value, or a credential-shaped string."""
        found = {match.start() for match in _CREDENTIAL.finditer(text)}
        for match in _TOKEN.finditer(text):
            token = match.group()
            if token in self._whole or token in self._bare or token.rstrip(b"=") in self._bare:
                found.add(match.start())
        return len(found)

    def scan(self, paths: Iterable[Path]) -> dict[Path, int]:
        """Leaks per file, for the files that have any; files that vanished meanwhile are skipped."""
        leaks: dict[Path, int] = {}
        for path in paths:
            try:
                text = path.read_bytes()
            except FileNotFoundError:
                continue
            if count := self.leaks(text):
                leaks[path] = count
        return leaks

    def recording(self, make: F) -> F:
        """``make`` (which returns a secret, or a tuple ending with one), recording what it returns."""

        @functools.wraps(make)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = make(*args, **kwargs)
            self.record(result[-1] if isinstance(result, tuple) else result)
            return result

        return wrapper  # type: ignore[return-value]


def log_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix in _LOG_SUFFIXES and p.is_file())


_ledger = SecretLedger()


def pytest_configure(config: pytest.Config) -> None:
    import consumers.store.keys
    import consumers.store.subscriptions
    import tests.receiver

    consumers.store.keys.create_api_key = _ledger.recording(consumers.store.keys.create_api_key)
    consumers.store.subscriptions.generate_secret = _ledger.recording(consumers.store.subscriptions.generate_secret)
    tests.receiver.make_secret = _ledger.recording(tests.receiver.make_secret)


@pytest.fixture(scope="session", autouse=True)
def _log_scan_directory(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Where this run's logs go: the session's temporary directory, which every ``tmp_path`` is under."""
    _ledger.basetemp = tmp_path_factory.getbasetemp()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Each phase's report repeats the sections of the phases before it: the teardown's has them all.
    if _ledger.basetemp is None or report.when != "teardown":
        return
    captured = report.capstdout + report.capstderr + report.caplog
    if captured:
        with (_ledger.basetemp / _CAPTURED).open("a", errors="replace") as out:
            out.write(f"--- {report.nodeid} ---\n{captured}\n")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    if _ledger.basetemp is None:
        return
    files = log_files(_ledger.basetemp)
    leaks = _ledger.scan(files)
    size_mb = sum(p.stat().st_size for p in files if p.exists()) / 1e6
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    summary = (f"log scan: {len(_ledger)} API keys and secrets created by this run, "
               f"{len(files)} log files ({size_mb:.1f} MB) scanned: ")
    if not leaks:
        if reporter is not None:
            reporter.write_line(summary + "none appears")
        return
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if reporter is not None:
        reporter.write_line(summary + "LEAKED", red=True, bold=True)
        for path, count in leaks.items():
            reporter.write_line(f"  {path}: {count} key(s) or secret(s)", red=True)
