"""The run-wide log scan (tests/logscan.py) can fail: a planted key or secret in any kind of log is caught."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.logscan import SecretLedger, log_files
from tests.receiver import make_secret
from tests.workers import REPO_ROOT

_LEAKY_TESTS = '''
import logging
import subprocess
import sys

from tests.receiver import make_secret


def test_prints_a_secret():
    print("subscribing with", make_secret())


def test_logs_the_key_part_of_a_secret(caplog):
    caplog.set_level(logging.INFO)
    logging.getLogger("leaky").info("key material %s", make_secret().removeprefix("whsec_"))


def test_a_child_process_logs_a_key(tmp_path):
    with (tmp_path / "child.log").open("w") as log:
        subprocess.run([sys.executable, "-c", "print('Authorization: Bearer hg_' + 'k' * 43)"], stdout=log, check=True)
'''

_CLEAN_TESTS = '''
from tests.receiver import make_secret


def test_makes_a_secret_and_keeps_it_quiet(tmp_path):
    secret = make_secret()
    (tmp_path / "quiet.log").write_text("subscribed with a secret of %d characters" % len(secret))
'''


def _remove_planted(directory: Path) -> None:
    """The planted logs lie under this run's directory: remove them, or this run's own scan fails."""
    for path in log_files(directory):
        path.unlink()


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.Pytester]:
    """An inner pytest run that loads the log scan plugin and can import this repository."""
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    pytester.makeconftest('pytest_plugins = ["tests.logscan"]\n')
    yield pytester
    _remove_planted(pytester.path)


def test_a_run_whose_logs_hold_a_key_or_secret_fails(inner: pytest.Pytester) -> None:
    """Secrets printed, logged without their prefix, or written by a child process fail an all-green run."""
    inner.makepyfile(test_leaky=_LEAKY_TESTS)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*log scan: 2 API keys and secrets created by this run*LEAKED*",
                                 "*captured-output.log: 2 key(s) or secret(s)*", "*child.log: 1 key(s)*"])


def test_a_run_that_keeps_its_secrets_passes(inner: pytest.Pytester) -> None:
    """The same scan says so and lets a run pass when no log holds a secret."""
    inner.makepyfile(test_clean=_CLEAN_TESTS)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*log scan: 1 API keys and secrets created by this run*none appears*"])


def test_the_ledger_finds_whole_values_bare_key_parts_and_unrecorded_credentials(tmp_path: Path) -> None:
    """Recorded values, their base64 part alone, and credential-shaped strings it never saw are all leaks."""
    ledger = SecretLedger()
    secret = make_secret()
    ledger.record(secret)
    (tmp_path / "a.log").write_text(f"secret={secret}\n")
    (tmp_path / "b.out").write_text(f'{{"key": "{secret.removeprefix("whsec_")}"}}\n')
    (tmp_path / "c.log").write_text("Bearer hg_" + "A" * 43 + "\n")
    (tmp_path / "d.log").write_text("subscription created; signing secret not shown\n")
    (tmp_path / "hookgate.db").write_text(secret)  # a store holds secrets; it is not a log
    try:
        leaks = ledger.scan(log_files(tmp_path))
    finally:
        _remove_planted(tmp_path)
    assert {path.name: count for path, count in leaks.items()} == {"a.log": 1, "b.out": 1, "c.log": 1}
