"""Suite-wide fixtures.

``leak_guard`` (autouse): after every test, each end-to-end Stack that is still up (a module
fixture's, typically) scans what its clients received, its logs and its /metrics for provider
keys (``tests.harness.LeakGuard``), so a leak fails the test that caused it. A stack a test starts
and stops itself is checked by its own ``stop()``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import GUARDS, Stack, guard_summary


@pytest.fixture(autouse=True)
def leak_guard() -> Iterator[None]:
    yield
    for stack in list(Stack.live):
        stack.check_leaks()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if GUARDS:
        terminalreporter.write_line(guard_summary())
