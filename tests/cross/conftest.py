"""The cross-framework report: every check records its measured bound, printed at the end.

Tests call the ``cross_report`` fixture with one row per comparison; the rows
travel in the test reports' ``user_properties`` and ``pytest_terminal_summary``
prints them as a table in the normal test output.
"""

import pytest

from tests.torch.torchref import one_torch_thread

_ROWS = []


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture
def cross_report(record_property):
    """``cross_report(check, a, b, max_ulp=None, max_rel=None, bound="")`` records one row."""

    def add(check, a, b, max_ulp=None, max_rel=None, bound=""):
        row = (check, a, b, max_ulp, max_rel, bound)
        record_property("cross_report", row)
        print(_fmt(row))

    return add


def _fmt(row):
    check, a, b, ulp, rel, bound = row
    u = "-" if ulp is None else str(ulp)
    r = "-" if rel is None else f"{rel:.2e}"
    return f"{check:<46} {a:>13} vs {b:<13} {u:>8} {r:>10}  {bound}"


def pytest_runtest_logreport(report):
    if report.when == "call":
        for key, row in report.user_properties:
            if key == "cross_report":
                _ROWS.append(tuple(row))


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    tr = terminalreporter
    tr.section("sophia cross-framework report (max ulp / max relative difference)")
    tr.write_line(f"{'check':<46} {'':>13}    {'':<13} {'max ulp':>8} {'max rel':>10}  bound")
    for row in _ROWS:
        tr.write_line(_fmt(row))
