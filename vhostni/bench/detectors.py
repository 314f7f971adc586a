"""The aggregate detectors' figures (``--only detectors``, a few seconds, no guests): the worm, port-scan and
SYN-bomb detectors of scanners/codered/ fed simulated worms, scans, bombs and normal hosts on a fake clock
(scanners/codered/sim.py).  Per scenario: attempts and seconds to detection, the share of the first minute's
and of the minute-after-detection's attempts that got out, and false alarms on normal workloads."""
from __future__ import annotations

import importlib
import sys
import time

from .. import resources


def _sim():
    top = str(resources.path("scanners").parent)      # the checkout's top, or the package's _data
    if top not in sys.path:
        sys.path.insert(0, top)
    return importlib.import_module("scanners.codered.sim")


def run_detectors(progress=print) -> dict:
    sim = _sim()
    t0 = time.monotonic()
    results = sim.run_all()
    progress(f"detectors: {len(results)} scenarios simulated in {time.monotonic() - t0:.1f} s")
    return {"status": "ran", "rows": [r.row() for r in results], "table": sim.table(results)}


def report_lines(d: dict) -> list[str]:
    if d.get("status") != "ran":
        return [f"detectors: {d.get('status')}"]
    return ["detectors (simulated, fake clock): to detect = attempts / seconds; out = share of attempts "
            "that got a packet out"] + ["  " + ln for ln in d["table"].splitlines()]
