"""Guest TCP throughput: iperf3 between two QEMU (TCG) guests.

* ``vhostni``: both guests' virtio-net NICs are NIs of one ``vhostni run --ni a=... --ni b=...`` (its switch
  joins them);
* ``baseline``: the same guests on QEMU's tap backend (``-netdev tap,...,vhost=off``: userspace virtio, as
  there is no /dev/vhost-net here), both taps on a Linux bridge in a private network namespace.

Guest b runs ``iperf3 -s``; guest a runs ``iperf3 -c`` for ``seconds`` s, ``runs`` times in the same boot.
The figure is the receiver's rate.  Guests come from ``make images`` (vhostni.testing.Guest).
"""
from __future__ import annotations

import os
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .backends import pdeathsig_prefix

ADDR_A, ADDR_B = "10.77.0.1", "10.77.0.2"
_RATE = re.compile(r"([\d.]+)\s+([KMG]?)bits/sec.*?\b(sender|receiver)\s*$", re.M)
_UNIT = {"": 1e-9, "K": 1e-6, "M": 1e-3, "G": 1.0}


@dataclass
class GuestTcpConfig:
    seconds: int = 10
    runs: int = 3
    parallel: int = 1                  # iperf3 -P
    vhostni_args: Sequence[str] = ()
    vhostni_command: Sequence[str] | None = None
    vhostni_cpus: str | None = None    # taskset for the daemon (None: float, the guests need both CPUs)
    images: str | None = None          # directory; None: $VHOSTNI_IMAGES or images/out
    boot_timeout: float = 240.0
    logdir: Path = field(default_factory=lambda: Path("bench/out/logs"))


class Skip(Exception):
    """This part cannot run here; the message says why."""


def parse_iperf3(text: str) -> dict:
    """iperf3 client text output -> {"sender_gbit_s", "receiver_gbit_s"} (the summary lines)."""
    out: dict = {}
    for value, unit, role in _RATE.findall(text):
        out[f"{role}_gbit_s"] = float(value) * _UNIT[unit]
    return out


def _images(cfg: GuestTcpConfig):
    from vhostni.testing import GuestImages, ImagesMissing
    try:
        return GuestImages.locate(cfg.images)
    except ImagesMissing as exc:
        raise Skip(str(exc)) from None


def _iperf_runs(a, b, cfg: GuestTcpConfig, progress: Callable[[str], None], label: str) -> list[dict]:
    from vhostni.testing import GuestError
    b.check("iperf3 -s -D >/dev/null 2>&1; sleep 1")
    # ARP and a first exchange before measuring; TCG guests are slow to answer the first ping.
    out, status = a.run(f"ping -c 3 -W 5 {ADDR_B}", timeout=60)
    if status != 0:
        raise RuntimeError(f"guest a cannot ping guest b:\n{out[-1500:]}")
    results = []
    for i in range(cfg.runs):
        cmd = f"iperf3 -c {ADDR_B} -t {cfg.seconds} -f m" + (f" -P {cfg.parallel}" if cfg.parallel > 1 else "")
        t0 = time.monotonic()
        try:
            out, status = a.run(cmd, timeout=cfg.seconds + 90)
        except GuestError as exc:
            results.append({"ok": False, "error": str(exc)[-2000:]})
            progress(f"  {label:9s} iperf3 run {i + 1}/{cfg.runs}: FAILED: {str(exc).splitlines()[0]}")
            continue
        rates = parse_iperf3(out)
        if status != 0 or "receiver_gbit_s" not in rates:
            results.append({"ok": False, "error": f"iperf3 exited {status}:\n{out[-1500:]}"})
            progress(f"  {label:9s} iperf3 run {i + 1}/{cfg.runs}: FAILED (status {status})")
            continue
        r = {"ok": True, "gbit_s": rates["receiver_gbit_s"], **rates, "wall_s": round(time.monotonic() - t0, 2)}
        results.append(r)
        progress(f"  {label:9s} iperf3 run {i + 1}/{cfg.runs}: {r['gbit_s']:.3f} Gbit/s")
    return results


def run_vhostni(cfg: GuestTcpConfig, progress: Callable[[str], None] = print) -> dict:
    from vhostni.testing import Guest, VhostniDaemon, VhostUserNic, boot_guests, vhostni_command
    images = _images(cfg)
    sockdir = Path(tempfile.mkdtemp(prefix=f"vni-bt-{os.getpid()}-", dir="/tmp"))
    sa, sb = sockdir / "a.sock", sockdir / "b.sock"
    cmd = list(cfg.vhostni_command or vhostni_command())
    if cfg.vhostni_cpus is not None:
        cmd = ["taskset", "-c", cfg.vhostni_cpus, *cmd]
    cmd = pdeathsig_prefix() + cmd
    stats_path = sockdir / "stats.json"
    daemon = VhostniDaemon({"a": sa, "b": sb}, extra_args=[*cfg.vhostni_args, "--stats-file", str(stats_path)],
                           log_path=cfg.logdir / "tcp.vhostni.log", command=cmd)
    guests = []
    info: dict = {"setup": "two TCG guests, virtio-net via vhost-user, joined by one vhostni run"}
    try:
        daemon.start(timeout=60)
        guests = [Guest("vni-a", images, nics=[VhostUserNic(socket=sa)], ip=f"{ADDR_A}/24",
                        log_dir=cfg.logdir, boot_timeout=cfg.boot_timeout),
                  Guest("vni-b", images, nics=[VhostUserNic(socket=sb)], ip=f"{ADDR_B}/24",
                        log_dir=cfg.logdir, boot_timeout=cfg.boot_timeout)]
        boot_guests(guests)
        info["runs"] = _iperf_runs(guests[0], guests[1], cfg, progress, "vhostni")
        if not daemon.alive:
            raise RuntimeError(f"vhostni exited during the run:\n{daemon.log_tail(15)}")
        try:
            import json
            info["counters"] = json.loads(stats_path.read_text())
        except (OSError, ValueError):
            pass
    finally:
        for g in guests:
            g.close()
        info["daemon_exit_status"] = daemon.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
    return info


def run_baseline(cfg: GuestTcpConfig, progress: Callable[[str], None] = print) -> dict:
    from vhostni.testing import Guest, NetNamespace, TapNic, boot_guests
    images = _images(cfg)
    if not Path("/dev/net/tun").exists():
        raise Skip("no /dev/net/tun")
    ns = NetNamespace("vnibench")
    guests = []
    info: dict = {"setup": "two TCG guests, virtio-net on QEMU tap (vhost=off), taps on a Linux bridge "
                           "in a private netns"}
    try:
        ns.add_tap("tapa")
        ns.add_tap("tapb")
        ns.add_bridge("br0", "tapa", "tapb")
        guests = [Guest("tap-a", images, nics=[TapNic(ifname="tapa", vhost=False)], ip=f"{ADDR_A}/24",
                        netns=ns.name, log_dir=cfg.logdir, boot_timeout=cfg.boot_timeout),
                  Guest("tap-b", images, nics=[TapNic(ifname="tapb", vhost=False)], ip=f"{ADDR_B}/24",
                        netns=ns.name, log_dir=cfg.logdir, boot_timeout=cfg.boot_timeout)]
        boot_guests(guests)
        info["runs"] = _iperf_runs(guests[0], guests[1], cfg, progress, "baseline")
    finally:
        for g in guests:
            g.close()
        ns.delete()
    return info


def _summary(runs: list[dict]) -> dict | None:
    vals = [r["gbit_s"] for r in runs if r.get("ok")]
    if not vals:
        return None
    med = statistics.median(vals)
    return {"n": len(vals), "median": med, "min": min(vals), "max": max(vals),
            "spread_pct": (max(vals) - min(vals)) / med * 100 if med else None}


def run_guest_tcp(cfg: GuestTcpConfig, vhostni_unavailable: str | None = None,
                  progress: Callable[[str], None] = print) -> dict:
    """The ``guest_tcp`` JSON section: baseline first, then vhostni (each boots its own pair of guests)."""
    section: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                     "method": __doc__.strip()}
    try:
        import vhostni.testing  # noqa: F401
    except Exception as exc:
        section["status"] = f"skipped: cannot import vhostni.testing: {exc!r}"
        return section
    try:
        _images(cfg)
    except Skip as exc:
        section["status"] = f"skipped: {exc}"
        return section
    if shutil.which("qemu-system-x86_64") is None:
        section["status"] = "skipped: qemu-system-x86_64 not installed"
        return section
    for name, fn in (("baseline", run_baseline), ("vhostni", run_vhostni)):
        if name == "vhostni" and vhostni_unavailable:
            section[name] = {"status": f"unavailable: {vhostni_unavailable}"}
            continue
        try:
            e = fn(cfg, progress)
        except Skip as exc:
            section[name] = {"status": f"skipped: {exc}"}
            continue
        except Exception as exc:  # a failed setup is a result, not a crash of the whole benchmark
            section[name] = {"status": f"failed: {type(exc).__name__}: {exc}"[-3000:]}
            progress(f"  {name}: FAILED: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            continue
        s = _summary(e.get("runs", []))
        e["status"] = "ok" if s else "failed: no successful iperf3 run"
        if s:
            e["gbit_s"] = s
        section[name] = e
    b, v = section.get("baseline", {}), section.get("vhostni", {})
    section["ratio_vhostni_to_baseline"] = (v["gbit_s"]["median"] / b["gbit_s"]["median"]
                                            if "gbit_s" in b and "gbit_s" in v and b["gbit_s"]["median"]
                                            else None)
    section["status"] = "ran"
    return section
