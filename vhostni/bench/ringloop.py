"""The frame loop with every frame held for a scanner (issue 11): the ring data plane's cost.

The frame loop of frameloop.py (testpmd looping frames through two NIs), run three ways in the
same invocation, alternated so drift hits all alike:

* ``vhostni``: no policy, plain forwarding (the reference);
* ``vhostni+null-c``: every frame each guest sends is held for a null scanner written in C
  against the ring ABI (tests/c/null_ring_scanner.c), which passes it;
* ``vhostni+null-py``: the same with the Python SDK's null scanner (scanners/null.py), which
  reads its frames as views on the ring and decides them in batches.

The scanner shares the backend's CPU (taskset is inherited): its cost is the NI's cost.  The
policy's default is ``pass`` so frames a full ring could not take keep the loop going (a cut
frame would leave the loop for good); the share the scanner actually decided is reported
from the NI's counters (``scanned``), and the rate of scanned frames is ``pps * scanned``.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

from .backends import VhostniBackend
from .frameloop import FrameLoopConfig, run_frame_loop

ROOT = Path(__file__).resolve().parents[2]
C_SCANNER = ROOT / "tests" / "c" / "null_ring_scanner.c"


def build_c_scanner(out_dir: Path) -> Optional[Path]:
    """Compiles the C null scanner; None if there is no compiler or source."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not C_SCANNER.exists():
        return None
    out = out_dir / "null_ring_scanner"
    subprocess.run([cc, "-O2", "-Wall", "-o", str(out), str(C_SCANNER), f"-I{ROOT / 'csrc'}"],
                   check=True, capture_output=True)
    return out


def hold_all_policy(program: list[str], path: Path) -> Path:
    """A policy holding every frame its guest sends for ``program`` (argv), default pass."""
    doc = {"ni": {"anti_spoof": False, "hold_timeout_ms": 1000, "default_decision": "pass",
                  "held_frames_max": 65536, "held_bytes_max": 256 << 20},
           "scanner": [{"name": "null", "program": program[0], "args": program[1:],
                        "config": {"match": {"direction": "from_guest"}, "contain": True},
                        "allow": [{"direction": "from_guest", "contain": True}],
                        "messages_per_second": 10**7}]}
    path.write_text(json.dumps(doc))
    return path


class ScannedBackend(VhostniBackend):
    """vhostni with a hold-everything policy on both NIs."""

    def __init__(self, name: str, policy: Path, **kw):
        super().__init__(**kw)
        self.name = name
        self.label = f"vhostni run, every frame held for {name.split('+', 1)[1]}"
        self.extra_args = self.extra_args + ["--policy", f"a={policy}", "--policy", f"b={policy}"]


def scanned_share(run: dict) -> Optional[float]:
    """Of the frames the policy matched, the share the scanner got to decide (its ring was
    not full), from the counters the daemon left at the end of the run."""
    c = (run.get("backend_info") or {}).get("counters") or {}
    held = full = 0
    for ni in (c.get("nis") or {}).values():
        held += ni.get("held", 0)
        for sc in ((ni.get("kernel") or {}).get("scanners") or {}).values():
            full += sc.get("ring_full", 0)
    return held / (held + full) if held + full else None


def run_ring_loop(cfg: FrameLoopConfig, vhostni_args: list[str], vhostni_cmd: Optional[list[str]],
                  cpus: str, progress: Callable[[str], None] = print,
                  on_result: Callable[[dict], None] | None = None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="vni-ringloop-"))
    try:
        backends = [VhostniBackend(cpus=cpus, extra_args=vhostni_args, command=vhostni_cmd)]
        c_prog = build_c_scanner(tmp)
        if c_prog is not None:
            backends.append(ScannedBackend("vhostni+null-c", hold_all_policy([str(c_prog)], tmp / "c.json"),
                                           cpus=cpus, extra_args=vhostni_args, command=vhostni_cmd))
        else:
            progress("  no C compiler or tests/c/null_ring_scanner.c: C scanner skipped")
        backends.append(ScannedBackend("vhostni+null-py",
                                       hold_all_policy([str(ROOT / "scanners" / "null.py")], tmp / "py.json"),
                                       cpus=cpus, extra_args=vhostni_args, command=vhostni_cmd))
        section = run_frame_loop(backends, cfg, progress=progress, on_result=on_result)
        section["method"] = __doc__.strip().split("\n\n", 1)[1].strip()
        for size, entry in section["sizes"].items():
            plain = entry.get("vhostni", {}).get("pps", {}).get("median")
            for b in backends[1:]:
                e = entry.get(b.name, {})
                shares = [s for s in (scanned_share(r) for r in e.get("runs", []) if r.get("ok")) if s is not None]
                if shares:
                    e["scanned"] = min(shares)
                if plain and "pps" in e:
                    entry[f"ratio_{b.name}_to_vhostni"] = e["pps"]["median"] / plain
                    if shares:
                        entry[f"ratio_scanned_{b.name}_to_vhostni"] = e["pps"]["median"] * min(shares) / plain
        return section
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
