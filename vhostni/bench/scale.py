"""Scale on one host: one daemon serving many NIs whose guests are idle.

For each NI count in the run (by default 1 and 256, the switch's limit), a fresh ``vhostni run``
is started with that many NIs (server sockets), an admin socket and no policy, and then:

* **start-up**: seconds from spawning the daemon until its admin socket answers ``query-nis``
  listing every NI (imports, port set-up, sockets listening);
* **frontends**: one idle vhost-user frontend per NI connects and sets up its rings (a
  VirtioNetDriver from ``tests/vdriver.py``: the same handshake QEMU does, 2 MiB of guest memory,
  receive buffers posted, nothing sent) — the state of a host whose VMs are idle;
* **idle CPU**: the daemon's CPU time (utime+stime from /proc) over ``idle_seconds`` while nothing
  moves, as a share of one core (goal: 0);
* **memory**: the daemon's RSS and PSS (``/proc/PID/smaps_rollup``); per NI = the difference
  between the largest and the smallest count, divided by the difference in NIs (so the
  interpreter's own ~40 MB does not count);
* **query-nis latency**: median and max over ``queries`` calls on one admin session.

No figure here is a ratio against a baseline: none of them is a speed that a shared machine's
noise scales (CPU time is the daemon's own, not wall time).
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


@dataclass
class ScaleConfig:
    counts: list = field(default_factory=lambda: [1, 256])
    idle_seconds: float = 30.0
    queries: int = 50
    vhostni_command: Optional[list] = None
    logdir: Optional[Path] = None


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _memory_kib(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Rss", "Pss"):
                out[k.lower()] = int(v.split()[0])
    return out


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def measure(count: int, cfg: ScaleConfig, workdir: Path, log) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from qemu.qmp.legacy import QEMUMonitorProtocol
    from vdriver import VirtioNetDriver

    from vhostni.testing.daemon import vhostni_command

    admin = workdir / "admin.sock"
    cmd = [*(cfg.vhostni_command or vhostni_command()), "run", "--admin", f"unix:{admin}",
           "--alert-log", str(workdir / "alerts.jsonl")]
    for i in range(count):
        cmd += ["--ni", f"n{i}={workdir}/n{i}.sock"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd=str(REPO))
    drivers = []
    q = None
    try:
        end = t0 + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited ({proc.returncode}) with {count} NIs; see its log")
            if admin.exists():
                try:
                    q = QEMUMonitorProtocol(str(admin))
                    q.connect()
                    if len(q.cmd("query-nis")) == count:
                        break
                except (OSError, Exception):  # noqa: BLE001 - not up yet; retried until `end`
                    if q is not None:
                        q.close()
                    q = None
            if time.monotonic() > end:
                raise RuntimeError(f"the daemon did not list {count} NIs within 120 s")
            time.sleep(0.02)
        startup = time.monotonic() - t0
        mem_before = _memory_kib(proc.pid)
        t1 = time.monotonic()
        for i in range(count):
            drv = VirtioNetDriver.connect(str(workdir / f"n{i}.sock"), regions=((0, 2 * MiB),), queue_size=256)
            drv.post_rx_buffers(64, 2048)
            drivers.append(drv)
        connect_s = time.monotonic() - t1
        # every NI up as seen by the daemon before the idle measurement starts
        end = time.monotonic() + 60
        while sum(1 for n in q.cmd("query-nis") if n.get("state") == "up") < count:
            if time.monotonic() > end:
                raise RuntimeError("not every NI came up within 60 s of its frontend connecting")
            time.sleep(0.05)
        time.sleep(1.0)                     # let set-up work (logging, first stats) settle
        c0, w0 = _cpu_seconds(proc.pid), time.monotonic()
        time.sleep(cfg.idle_seconds)
        c1, w1 = _cpu_seconds(proc.pid), time.monotonic()
        mem = _memory_kib(proc.pid)
        lat = []
        for _ in range(cfg.queries):
            s = time.perf_counter()
            q.cmd("query-nis")
            lat.append((time.perf_counter() - s) * 1e3)
        return {"nis": count, "startup_s": round(startup, 3), "frontends_connect_s": round(connect_s, 3),
                "idle_cpu_share": round((c1 - c0) / (w1 - w0), 5),
                "rss_kib": mem.get("rss"), "pss_kib": mem.get("pss"),
                "rss_kib_before_frontends": mem_before.get("rss"), "threads": _threads(proc.pid),
                "query_nis_ms": {"median": round(statistics.median(lat), 3), "max": round(max(lat), 3),
                                 "n": len(lat)}}
    finally:
        for drv in drivers:
            try:
                drv.close(graceful=False)
            except Exception:     # noqa: BLE001 - best effort at teardown
                pass
        if q is not None:
            q.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_scale(cfg: ScaleConfig, progress: Callable[[str], None] = lambda m: None) -> dict:
    runs = []
    for n in sorted(set(cfg.counts)):
        with tempfile.TemporaryDirectory(prefix="vni-bsc-") as d:
            logpath = (cfg.logdir / f"scale-{n}.log") if cfg.logdir else Path(d) / "daemon.log"
            with open(logpath, "wb") as log:
                progress(f"scale: {n} NI(s) with idle frontends")
                runs.append(measure(n, cfg, Path(d), log))
    res = {"status": "ran", "config": {"counts": sorted(set(cfg.counts)), "idle_seconds": cfg.idle_seconds,
                                       "queries": cfg.queries}, "runs": runs}
    if len(runs) >= 2:
        lo, hi = runs[0], runs[-1]
        dn = hi["nis"] - lo["nis"]
        res["per_ni_kib"] = {"rss": round((hi["rss_kib"] - lo["rss_kib"]) / dn, 1),
                             "pss": round((hi["pss_kib"] - lo["pss_kib"]) / dn, 1)}
    return res


def report_lines(res: dict) -> list:
    if res.get("status") != "ran":
        return [f"scale: {res.get('status')}"]
    lines = ["scale: one daemon, N NIs with idle frontends (vhost-user set up, rx buffers posted)",
             f"  {'NIs':>5s}  {'start-up':>9s}  {'idle CPU':>9s}  {'RSS':>9s}  {'PSS':>9s}  "
             f"{'query-nis median/max':>21s}"]
    for r in res["runs"]:
        lines.append(f"  {r['nis']:5d}  {r['startup_s']:8.2f}s  {100 * r['idle_cpu_share']:8.2f}%  "
                     f"{r['rss_kib'] / 1024:7.1f}MB  {r['pss_kib'] / 1024:7.1f}MB  "
                     f"{r['query_nis_ms']['median']:9.2f}/{r['query_nis_ms']['max']:.2f} ms")
    if "per_ni_kib" in res:
        lines.append(f"  per NI: {res['per_ni_kib']['rss']:.0f} KiB RSS, {res['per_ni_kib']['pss']:.0f} KiB PSS")
    return lines


if __name__ == "__main__":
    r = run_scale(ScaleConfig(counts=[int(x) for x in sys.argv[1:]] or [1, 256]), progress=print)
    print(json.dumps(r, indent=1))
    print("\n".join(report_lines(r)))
