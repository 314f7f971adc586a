"""The frame loop: one testpmd frontend with two virtio-user ports, looped through a backend.

::

    testpmd (frontend, CPU 1)                 backend (CPU 0)
      port 0  virtio-user --- S0 (NI a) ---\\
                                             >  forwards a <-> b
      port 1  virtio-user --- S1 (NI b) ---/

The frontend runs io forwarding (rx on port 0 -> tx on port 1 and back) after ``start tx_first N`` put N
bursts of ``--txpkts`` frames on each port, so frames circulate: port 0 -> backend -> port 1 -> port 0 ...
The rate is what the frontend *receives* over a fixed interval after a warm-up (counters of ``show port
stats all`` read before and after), summed over both ports = frames per second the backend delivered,
both directions together; per-direction figures are kept too.

Frame sizes are the lengths testpmd puts on the virtio ring (Ethernet header + payload, no FCS).
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .backends import Backend, BackendError, BackendUnavailable
from .testpmd import TestPmd, TestPmdError


@dataclass
class FrameLoopConfig:
    sizes: Sequence[int] = (64, 1518)
    runs: int = 5
    duration: float = 10.0
    warmup: float = 3.0
    tx_first_bursts: int = 32
    frontend_cpus: str | None = "1"
    frontend_vdev_args: str = ""     # appended to each net_virtio_user vdev, e.g. ",queue_size=1024"
    wait_quiet: float = 0.0          # before a run, wait up to this many s for the machine to be idle
    quiet_cpus: float = 0.3          # "idle": other processes use less than this many CPUs
    logdir: Path = field(default_factory=lambda: Path("bench/out/logs"))


_HZ = os.sysconf("SC_CLK_TCK")


def _cpu_busy_ticks() -> int:
    """Busy jiffies of the whole machine (all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v[:8]) - idle          # user nice system idle iowait irq softirq steal


def _proc_ticks(pids) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])        # utime + stime, all threads
        except (OSError, IndexError, ValueError):
            pass
    return total


def wait_quiet(max_wait: float, threshold: float) -> dict:
    """Wait (up to ``max_wait`` s) until the machine's busy CPUs over 1 s fall under ``threshold``."""
    t_start = time.monotonic()
    while True:
        b0, t0 = _cpu_busy_ticks(), time.monotonic()
        time.sleep(1.0)
        busy = (_cpu_busy_ticks() - b0) / _HZ / (time.monotonic() - t0)
        waited = time.monotonic() - t_start
        if busy < threshold or waited >= max_wait:
            return {"busy_cpus_before": round(busy, 3), "waited_s": round(waited, 1),
                    "quiet": busy < threshold}


def _stats_at(pmd: TestPmd):
    """Port counters and the time they were read (midpoint of the command's round trip)."""
    t0 = time.monotonic()
    stats = pmd.port_stats()
    t1 = time.monotonic()
    return stats, (t0 + t1) / 2, t1 - t0


def measure_once(backend: Backend, size: int, cfg: FrameLoopConfig, tag: str) -> dict:
    """One run: start backend and frontend, loop frames, measure, tear everything down.

    Returns ``{"ok": True, "pps": ..., ...}`` or ``{"ok": False, "error": ...}``; raises BackendUnavailable
    if the backend cannot run at all.
    """
    cfg.logdir.mkdir(parents=True, exist_ok=True)
    result: dict = {"size": size, "backend": backend.name, "tag": tag}
    if cfg.wait_quiet > 0:
        result["before"] = wait_quiet(cfg.wait_quiet, cfg.quiet_cpus)
    # short: sun_path holds 108 bytes; the PID lets reap_stale() clean up after a SIGKILLed run
    sockdir = Path(tempfile.mkdtemp(prefix=f"vni-bench-{os.getpid()}-", dir="/tmp"))
    socks = [str(sockdir / "a.sock"), str(sockdir / "b.sock")]
    front: TestPmd | None = None
    try:
        backend.start(socks, cfg.logdir, tag)
        vdevs = [f"net_virtio_user{i},path={s}{cfg.frontend_vdev_args}" for i, s in enumerate(socks)]
        front = TestPmd(vdevs, cpus=cfg.frontend_cpus, name="front", log_path=cfg.logdir / f"{tag}.front.log")
        front.start()
        n = front.nb_ports()
        if n != 2:
            raise TestPmdError(f"the frontend has {n} port(s), not 2 (did virtio-user connect?)")
        front.start_fwd("io", tx_first=cfg.tx_first_bursts, txpkts=size)
        time.sleep(cfg.warmup)
        backend.check()
        pids = [p for p in (front.pid, backend.pid()) if p]
        busy0, ours0 = _cpu_busy_ticks(), _proc_ticks(pids)
        s0, t0, lat0 = _stats_at(front)
        time.sleep(cfg.duration)
        s1, t1, lat1 = _stats_at(front)
        busy1, ours1 = _cpu_busy_ticks(), _proc_ticks(pids)
        backend.check()
        fwd = front.stop_fwd()
        dt = t1 - t0
        d = {p: s1[p] - s0[p] for p in s1 if p in s0}
        rx = sum(x.rx_packets for x in d.values())
        rx_bytes = sum(x.rx_bytes for x in d.values())
        result.update({
            "interval_s": round(dt, 4),
            "stats_read_latency_s": round(max(lat0, lat1), 4),
            "rx_packets": rx,
            "pps": rx / dt,
            "pps_a_to_b": d[1].rx_packets / dt,       # received on frontend port 1 = came out of NI b
            "pps_b_to_a": d[0].rx_packets / dt,
            "gbit_s": rx_bytes * 8 / dt / 1e9,
            "rx_missed": sum(x.rx_missed for x in d.values()),
            "rx_errors": sum(x.rx_errors for x in d.values()),
            "tx_errors": sum(x.tx_errors for x in d.values()),
            "tx_dropped_total": sum(v.get("tx_dropped", 0) for v in fwd.values()),
            "loadavg_1min": os.getloadavg()[0],
            # CPUs' worth of work done by *other* processes during the interval (0 = we had the machine)
            "foreign_cpus": round(max(0, (busy1 - busy0) - (ours1 - ours0)) / _HZ / dt, 3),
            "our_cpus": round((ours1 - ours0) / _HZ / dt, 3),
        })
        if rx == 0:
            result.update(ok=False, error="no frame came back through the backend during the interval")
        elif d[0].rx_packets == 0 or d[1].rx_packets == 0:
            result.update(ok=False, error="frames came back in one direction only")
        else:
            result["ok"] = True
    except BackendUnavailable:
        raise
    except (TestPmdError, BackendError, OSError) as exc:
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}"[-3000:])
    finally:
        if front is not None:
            front.close()
        try:
            info = backend.stop()
        except Exception as exc:  # teardown must go on
            info = {"stop_error": repr(exc)}
        if info:
            result["backend_info"] = info
        shutil.rmtree(sockdir, ignore_errors=True)
    return result


def summarize(values: Sequence[float]) -> dict:
    """Median, extremes and spread of a list of rates."""
    if not values:
        return {"n": 0}
    med = statistics.median(values)
    out = {
        "n": len(values),
        "median": med,
        "min": min(values),
        "max": max(values),
        "mean": statistics.fmean(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "spread_pct": (max(values) - min(values)) / med * 100 if med else None,
    }
    return out


def run_frame_loop(backends: Sequence[Backend], cfg: FrameLoopConfig,
                   unavailable: dict[str, str] | None = None,
                   progress: Callable[[str], None] = print,
                   on_result: Callable[[dict], None] | None = None) -> dict:
    """Alternate the backends (ABBA order, so drift hits both alike), ``cfg.runs`` runs per size each.

    ``unavailable`` maps backend names known not to run to the reason; a backend that turns out not to run
    (BackendUnavailable) is added there and not tried again.  Returns the ``frame_loop`` JSON section.
    """
    unavailable = dict(unavailable or {})
    section: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                     "method": __doc__.strip().split("\n\n", 1)[1].strip(),
                     "sizes": {}}
    for size in cfg.sizes:
        per: dict[str, list[dict]] = {b.name: [] for b in backends}
        for i in range(cfg.runs):
            order = list(backends) if i % 2 == 0 else list(reversed(backends))
            for b in order:
                if b.name in unavailable:
                    continue
                tag = f"loop-{size}-{b.name}-{i}"
                try:
                    r = measure_once(b, size, cfg, tag)
                except BackendUnavailable as exc:
                    unavailable[b.name] = str(exc)
                    progress(f"  {b.name}: unavailable: {str(exc).splitlines()[0]}")
                    continue
                per[b.name].append(r)
                if r["ok"]:
                    progress(f"  {size:5d} B  {b.name:9s} run {i + 1}/{cfg.runs}: {r['pps'] / 1e6:7.3f} Mpps "
                             f"(a->b {r['pps_a_to_b'] / 1e6:.3f}, b->a {r['pps_b_to_a'] / 1e6:.3f}), "
                             f"{r['gbit_s']:.2f} Gbit/s; others used {r['foreign_cpus']:.2f} CPU")
                else:
                    progress(f"  {size:5d} B  {b.name:9s} run {i + 1}/{cfg.runs}: FAILED: "
                             f"{r['error'].splitlines()[0]}")
                if on_result:
                    on_result(r)
        entry: dict = {}
        for b in backends:
            runs = per[b.name]
            ok = [r for r in runs if r["ok"]]
            e: dict = {"backend": b.describe(), "runs": runs}
            if b.name in unavailable and not runs:
                e["status"] = f"unavailable: {unavailable[b.name]}"
            elif not ok:
                e["status"] = "failed: " + (runs[0]["error"].splitlines()[0] if runs else "no run")
            else:
                e["status"] = "ok" if len(ok) == len(runs) else f"ok ({len(runs) - len(ok)} of {len(runs)} runs failed)"
                e["pps"] = summarize([r["pps"] for r in ok])
                e["pps_a_to_b"] = summarize([r["pps_a_to_b"] for r in ok])
                e["pps_b_to_a"] = summarize([r["pps_b_to_a"] for r in ok])
                e["gbit_s"] = summarize([r["gbit_s"] for r in ok])
                e["foreign_cpus"] = summarize([r["foreign_cpus"] for r in ok])
                quiet = [r["pps"] for r in ok if r["foreign_cpus"] <= cfg.quiet_cpus]
                e["pps_quiet"] = summarize(quiet)     # runs nobody else disturbed much
            entry[b.name] = e
        base, vni = entry.get("baseline", {}), entry.get("vhostni", {})
        if "pps" in base and "pps" in vni and base["pps"]["median"]:
            entry["ratio_vhostni_to_baseline"] = vni["pps"]["median"] / base["pps"]["median"]
        else:
            entry["ratio_vhostni_to_baseline"] = None
        if base.get("pps_quiet", {}).get("n") and vni.get("pps_quiet", {}).get("n"):
            entry["ratio_quiet_vhostni_to_baseline"] = vni["pps_quiet"]["median"] / base["pps_quiet"]["median"]
        else:
            entry["ratio_quiet_vhostni_to_baseline"] = None
        section["sizes"][str(size)] = entry
    section["unavailable"] = unavailable
    return section
