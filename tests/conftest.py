"""Suite-wide fixtures.

``leak_guard`` (autouse): after every test, each end-to-end Stack that is still up (a module
fixture's, typically) scans what its clients received, its logs and its /metrics for provider
keys (``tests.harness.LeakGuard``), so a leak fails the test that caused it. A stack a test starts
and stops itself is checked by its own ``stop()``.

``logging_errors`` (autouse): the test process logs as the product does (``protos.logs``' JSON
handler, root logger at INFO), and a log call that cannot be made or emitted, on any thread, fails
the test during which it happened.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from protos import logs
from tests.harness import GUARDS, Stack, guard_summary


@pytest.fixture(autouse=True)
def leak_guard() -> Iterator[None]:
    yield
    for stack in list(Stack.live):
        stack.check_leaks()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if GUARDS:
        terminalreporter.write_line(guard_summary())


# The product's logging in the test process -----------------------------------------------------
# The root level is set once per process (pytest_configure), not per test: when --log-level is
# given, pytest restores the root level at the end of every phase, which would undo a fixture's.
# The handler is added by a session fixture, so it writes to pytest's captured stderr (at
# pytest_configure time capturing is suspended, and lines logged between tests would reach the
# terminal).
# A record that cannot be made (logging raises KeyError in the caller for an `extra` key that is a
# LogRecord attribute) or emitted (Handler.handleError would only print) is recorded wherever it
# happens: a controller worker, say, catches the error and retries, so the test would only be slow.
_LOG_ERRORS: list[str] = []
_MAKE_RECORD = logging.Logger.makeRecord


def _make_record(self: logging.Logger, *args: Any, **kwargs: Any) -> logging.LogRecord:
    try:
        return _MAKE_RECORD(self, *args, **kwargs)
    except Exception as exc:
        where = "".join(traceback.format_stack(limit=6)[:-1])
        _LOG_ERRORS.append(f"logger {self.name!r} could not make a record: {exc!r}\n{where}")
        raise


def _handle_error(self: logging.Handler, record: logging.LogRecord) -> None:
    _LOG_ERRORS.append(
        f"{type(self).__name__} could not emit {record.name} {record.msg!r}:\n{traceback.format_exc()}"
    )


def pytest_configure(config: pytest.Config) -> None:
    root = logging.getLogger()
    root.setLevel(min(root.level, logging.INFO))  # INFO, or lower if asked (--log-level=DEBUG)
    logging.Logger.makeRecord = _make_record  # type: ignore[method-assign]
    logging.Handler.handleError = _handle_error  # type: ignore[method-assign]


@pytest.fixture(autouse=True, scope="session")
def product_logging() -> Iterator[None]:
    handler = logs.handler()
    logging.getLogger().addHandler(handler)  # beside pytest's capture handlers, not instead of them
    yield
    logging.getLogger().removeHandler(handler)


@pytest.fixture(autouse=True)
def logging_errors(product_logging: None) -> Iterator[None]:
    yield
    errors = _LOG_ERRORS[:]
    del _LOG_ERRORS[: len(errors)]
    if errors:
        pytest.fail("logging error(s) while this test ran:\n" + "\n".join(errors), pytrace=False)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _LOG_ERRORS:  # after the last test's own check (a module fixture's teardown, say)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("logging error(s) after the last test:\n" + "\n".join(_LOG_ERRORS))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# Skips under CI ---------------------------------------------------------------------------------
# The README's command and .ci/run run one suite. A test that cannot run here (a tool or a wheel
# missing) may skip on a developer's machine, but under CI (CI set, as every CI service and
# .ci/run set it) the skip is a failure, so a suite that silently shrinks cannot pass.
_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if _CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, which must run every test: {_skip_reason(report)}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield  # a module-level skip (importorskip) is a collection skip
    if _CI and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, which must run every test: {_skip_reason(report)}"
    return report
