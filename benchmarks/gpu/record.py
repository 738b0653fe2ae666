"""The run record of ``gpu_check.py``: its budget, its parts and units, ``results.json``.

A part (correctness, step time, training) runs units one by one; each unit's
result, skip or error is written to ``results.json`` as soon as it ends, so a
run cut off still leaves what it finished.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.output import write_json

PARTS = ("correctness", "step_time", "training")
#: Each part's share of the budget left when it starts.
SHARES = {"correctness": 0.25, "step_time": 0.4, "training": 1.0}
DEFAULT_BUDGET_S = 450.0


class Skip(Exception):
    """A unit that cannot run here (a framework or device is missing); the message says why."""


class Run:
    """The results folder, the budget and the record written after every unit.

    Args:
      out: the results folder (created).
      budget_s: seconds the whole run may take.
      argv: the command line, for the record.
    """

    def __init__(self, out: Path, budget_s: float, argv: list[str]) -> None:
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + budget_s
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self._log = open(out / "log.txt", "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.data: dict[str, Any] = {
            "script": "benchmarks/gpu_check.py",
            "argv": argv,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": budget_s,
            "environment": {},
            "parts": {p: {"status": "pending"} for p in PARTS},
            "verdicts": [],
        }

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.t0

    def left(self) -> float:
        """Seconds of the budget left (negative once spent)."""
        return self.deadline - time.perf_counter()

    def log(self, msg: str) -> None:
        """Prints ``msg`` and appends it to ``log.txt``."""
        print(msg, flush=True)
        self._log.write(msg + "\n")
        self._log.flush()

    def save(self) -> None:
        """Writes ``results.json`` atomically (a run killed mid-write leaves the previous one)."""
        self.data["elapsed_s"] = round(self.elapsed(), 2)
        write_json(self.out / "results.json", self.data)

    def verdict(
        self, what: str, value: float | None, target: float, note: str = "", met: bool | None = None
    ) -> None:
        """Records a figure against its ``<=`` target (``met`` overrides the comparison)."""
        if met is None and value is not None and math.isfinite(value):
            met = bool(value <= target)
        self.data["verdicts"].append(
            {"what": what, "value": value, "target": target, "met": met, "note": note}
        )

    def close(self) -> None:
        """Closes the log."""
        self._log.close()


@dataclasses.dataclass
class Part:
    """One part's record and its share of the budget."""

    run: Run
    name: str
    deadline: float

    @property
    def record(self) -> dict[str, Any]:
        """The part's entry in ``results.json``."""
        return self.run.data["parts"][self.name]

    def unit(self, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Runs one unit and records it: done, skipped (budget or missing piece) or error.

        The first unit of a part always runs; a later one is skipped once the
        part's share of the budget is spent.
        """
        units = self.record.setdefault("units", {})
        if units and time.perf_counter() > self.deadline:
            units[key] = {"status": "skipped", "note": "the part's share of --budget-s was spent"}
            self.run.log(f"  {key}: skipped (budget)")
            self.run.save()
            return None
        self.run.log(f"  {key} ...")
        t0 = time.perf_counter()
        try:
            res: dict[str, Any] | None = {"status": "done", **fn()}
        except Skip as e:
            res = {"status": "skipped", "note": str(e)}
        except Exception as e:  # noqa: BLE001 (a failing unit must not end the run)
            res = {
                "status": "error",
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-4000:],
            }
        res["wall_s"] = round(time.perf_counter() - t0, 2)
        units[key] = res
        note = res.get("note") or res.get("error") or ""
        self.run.log(f"  {key}: {res['status']} ({res['wall_s']:.1f} s) {note}".rstrip())
        self.run.save()
        return res if res["status"] == "done" else None


def run_part(run: Run, name: str, body: Callable[[Part], None], first: bool = False) -> None:
    """Runs one part with its share of what is left of the budget, or marks it skipped."""
    rec = run.data["parts"][name]
    left = run.left()
    if left <= 0 and not first:
        rec.update(
            status="skipped",
            note=f"--budget-s {run.data['budget_s']:g} was spent ({run.elapsed():.1f} s "
            "elapsed) before this part started",
        )
        run.log(f"{name}: skipped (budget spent)")
        run.save()
        return
    part = Part(run, name, time.perf_counter() + max(left, 0.0) * SHARES[name])
    rec.update(status="running", started_at_s=round(run.elapsed(), 2))
    run.log(f"{name}: (up to {max(left, 0.0) * SHARES[name]:.0f} s)")
    run.save()
    t0 = time.perf_counter()
    try:
        body(part)
        states = {u["status"] for u in rec.get("units", {}).values()}
        rec["status"] = "done" if states <= {"done"} else "partial"
    except Exception as e:  # noqa: BLE001
        rec.update(status="error", error=f"{type(e).__name__}: {e}")
        rec["traceback"] = traceback.format_exc()[-4000:]
        run.log(f"{name}: error {type(e).__name__}: {e}")
    rec["wall_s"] = round(time.perf_counter() - t0, 2)
    run.save()
