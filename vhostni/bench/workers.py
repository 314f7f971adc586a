"""More than one core: the frame loop with one daemon and with N daemons side by side.

vhostni's worker model is one daemon per core group (``vhostni@.service`` instances, each pinned
with ``CPUAffinity=``): a daemon's data plane is one thread, and daemons share nothing.  This
measures what that gives on this machine: for each worker count K, K independent frame loops
run at once (see frameloop.py: a testpmd frontend with two virtio-user ports looped through a
backend), each with its own ``vhostni run`` pinned to CPU ``i mod ncpu`` and its frontend to
CPU ``(i + 1) mod ncpu``; the figure is the frames per second all K backends delivered together,
summed over the same interval.  Counts alternate (1, 2, 1, 2, ...) so drift hits both alike.

A frame loop needs a frontend core per backend core: on a 2-core machine two workers share both
cores with two frontends, so the aggregate cannot double here; on a host with cores to spare
(and real guests instead of busy-polling frontends) each daemon has its own.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

from .backends import VhostniBackend
from .frameloop import FrameLoopConfig, measure_once, summarize


@dataclass
class WorkersConfig:
    counts: Sequence[int] = (1, 2)
    sizes: Sequence[int] = (64, 1518)
    runs: int = 3
    duration: float = 10.0
    warmup: float = 3.0
    tx_first_bursts: int = 32
    vhostni_args: Sequence[str] = ()
    vhostni_command: Optional[list] = None
    logdir: Path = field(default_factory=lambda: Path("bench/out/logs"))


def measure_workers(k: int, size: int, cfg: WorkersConfig, tag: str) -> dict:
    ncpu = os.cpu_count() or 1
    results: list = [None] * k

    def one(i: int) -> None:
        lcfg = FrameLoopConfig(sizes=[size], runs=1, duration=cfg.duration, warmup=cfg.warmup,
                               tx_first_bursts=cfg.tx_first_bursts, frontend_cpus=str((i + 1) % ncpu),
                               logdir=cfg.logdir)
        be = VhostniBackend(cpus=str(i % ncpu), extra_args=cfg.vhostni_args, command=cfg.vhostni_command)
        try:
            results[i] = measure_once(be, size, lcfg, f"{tag}-w{i}")
        except Exception as exc:      # noqa: BLE001 - reported as a failed run
            results[i] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = all(r and r.get("ok") for r in results)
    out = {"workers": k, "size": size, "ok": ok, "per_worker": results}
    if ok:
        out["pps"] = sum(r["pps"] for r in results)
    else:
        out["error"] = next((r.get("error", "?") for r in results if not (r and r.get("ok"))), "?")
    return out


def run_workers(cfg: WorkersConfig, progress: Callable[[str], None] = print) -> dict:
    section: dict = {"method": __doc__.strip().split("\n\n", 1)[1].strip(),
                     "config": {"counts": list(cfg.counts), "sizes": list(cfg.sizes), "runs": cfg.runs,
                                "duration": cfg.duration, "cpus": os.cpu_count()},
                     "sizes": {}}
    for size in cfg.sizes:
        per: dict = {k: [] for k in cfg.counts}
        for i in range(cfg.runs):
            order = list(cfg.counts) if i % 2 == 0 else list(reversed(cfg.counts))
            for k in order:
                r = measure_workers(k, size, cfg, f"workers-{size}-{k}-{i}")
                per[k].append(r)
                if r["ok"]:
                    progress(f"  {size:5d} B  {k} worker(s) run {i + 1}/{cfg.runs}: {r['pps'] / 1e6:7.3f} Mpps")
                else:
                    progress(f"  {size:5d} B  {k} worker(s) run {i + 1}/{cfg.runs}: FAILED: "
                             f"{str(r['error']).splitlines()[0]}")
        entry: dict = {}
        for k, runs in per.items():
            ok = [r["pps"] for r in runs if r["ok"]]
            entry[str(k)] = {"pps": summarize(ok), "runs": runs}
        base = entry.get(str(min(cfg.counts)), {}).get("pps", {})
        for k in cfg.counts:
            e = entry[str(k)]
            e["ratio_to_fewest"] = (e["pps"]["median"] / base["median"]
                                    if e["pps"].get("n") and base.get("n") else None)
        section["sizes"][str(size)] = entry
    section["status"] = "ran"
    return section


def report_lines(sec: dict) -> list:
    if sec.get("status") != "ran":
        return [f"workers: {sec.get('status')}"]
    lines = ["workers: frame loops side by side, one vhostni daemon each (aggregate frames/s, median)"]
    for size, entry in sec["sizes"].items():
        parts = []
        for k, e in entry.items():
            p = e["pps"]
            if p.get("n"):
                ratio = e.get("ratio_to_fewest")
                parts.append(f"{k} worker(s) {p['median'] / 1e6:.3f} Mpps"
                             + (f" ({ratio:.2f}x)" if ratio is not None else ""))
            else:
                parts.append(f"{k} worker(s) failed")
        lines.append(f"  {size:>5s} B  " + ", ".join(parts))
    return lines


def tiny(cfg: WorkersConfig) -> WorkersConfig:
    """A smoke-test sized configuration."""
    return replace(cfg, sizes=[64], runs=1, duration=1.0, warmup=0.5, tx_first_bursts=4)
