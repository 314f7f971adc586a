"""``python3 -m vhostni.bench [--out bench/out/results.json] [options]``: see vhostni/bench/__init__.py."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import (detectors, frameloop, guest_tcp, httpguard, ringlatency, ringloop, ringstreams, scale, scanners,
               signatures, streams, webdl, workers)
from .backends import DpdkVhostBackend, VhostniBackend, vhostni_unavailable_reason
from .testpmd import dpdk_version, reap_stale, testpmd_binary


class Interrupted(Exception):
    pass


def _on_signal(signum, _frame):
    # Once: the teardown that follows must not be interrupted by a second signal.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(f"signal {signum}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m vhostni.bench", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="bench/out/results.json", help="JSON results file")
    p.add_argument("--logdir", default=None, help="process logs (default: <out dir>/logs)")
    p.add_argument("--only", choices=("frameloop", "ringloop", "ringstreams", "ringlatency", "guest-tcp", "scanners", "streams", "signatures", "webdl",
                                      "httpguard", "scale", "workers", "detectors"), help="run one part only")
    p.add_argument("--no-vhostni", action="store_true", help="baseline only")
    g = p.add_argument_group("frame loop")
    g.add_argument("--sizes", default="64,1518", help="frame sizes, comma separated")
    g.add_argument("--runs", type=int, default=5, help="runs per backend and size")
    g.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    g.add_argument("--warmup", type=float, default=3.0, help="seconds of looping before measuring")
    g.add_argument("--bursts", type=int, default=32, help="`start tx_first N`: bursts put in the loop per port")
    g.add_argument("--backend-cpu", default="0", help="CPU(s) for the backend under test (taskset)")
    g.add_argument("--frontend-cpu", default="1", help="CPU(s) for the frontend testpmd")
    g.add_argument("--frontend-vdev-args", default="", help="appended to each net_virtio_user vdev, e.g. "
                                                             "',queue_size=1024'")
    g.add_argument("--wait-quiet", type=float, default=20.0, metavar="SECONDS",
                   help="before each run wait up to SECONDS for other processes to leave the CPUs idle")
    g.add_argument("--quiet-cpus", type=float, default=0.3, help="idle means busy CPUs below this")
    g.add_argument("--baseline-vdev-args", default="", help="appended to each net_vhost vdev")
    v = p.add_argument_group("vhostni")
    v.add_argument("--vhostni-args", default="", help="extra args for `vhostni run` (shell words), e.g. '--poll'")
    v.add_argument("--vhostni-cmd", default=None, help="command that runs the vhostni CLI (shell words; "
                                                       "default: $VHOSTNI_CMD or python3 -m vhostni)")
    t = p.add_argument_group("guest TCP")
    t.add_argument("--iperf-seconds", type=int, default=10)
    t.add_argument("--iperf-runs", type=int, default=3, help="iperf3 runs per setup (same boot)")
    t.add_argument("--iperf-parallel", type=int, default=1, help="iperf3 -P")
    t.add_argument("--images", default=None, help="guest images directory (default images/out)")
    t.add_argument("--tcp-vhostni-cpu", default=None, help="taskset for vhostni in the guest test "
                                                           "(default: none; the guests need both CPUs)")
    s = p.add_argument_group("scanner overheads (guests; plain vs null scanner vs Code-Red)")
    s.add_argument("--scanner-configs", default=",".join(scanners.CONFIGS), help="configurations, comma separated")
    s.add_argument("--scanner-rounds", type=int, default=10,
                   help="latency rounds; each measures every configuration")
    s.add_argument("--scanner-count", type=int, default=20,
                   help="handshakes, connects, lookups, pings per configuration and round")
    s.add_argument("--scanner-iperf-rounds", type=int, default=3, help="throughput rounds")
    s.add_argument("--scanner-iperf-seconds", type=int, default=5)
    s.add_argument("--scanner-hold-rounds", type=int, default=3,
                   help="host-side rounds (replay harness, no guests): SYN in to SYN out of the NI")
    s.add_argument("--scanner-hold-count", type=int, default=1000, help="SYNs per configuration and hold round")
    s.add_argument("--scanner-wait-quiet", type=float, default=3.0, metavar="SECONDS",
                   help="before each round wait up to SECONDS for other processes to idle")
    r = p.add_argument_group("streams (host-side replay: reassembly throughput, e-mail scanner latency)")
    r.add_argument("--stream-rounds", type=int, default=3, help="throughput rounds (plain and null stream each)")
    r.add_argument("--stream-connections", type=int, default=16, help="TCP connections in the synthetic capture")
    r.add_argument("--stream-bytes", type=int, default=4 << 20, help="payload bytes per connection")
    r.add_argument("--stream-window", type=int, default=1, help="replay --window (1: lockstep)")
    r.add_argument("--stream-cpu", default="0", help="CPU to pin replay and its scanner to ('' for none)")
    r.add_argument("--email-rounds", type=int, default=3, help="e-mail latency rounds")
    r.add_argument("--email-messages", type=int, default=50, help="messages per kind, configuration and round")
    r.add_argument("--email-attachment", type=int, default=16384, help="attachment size, bytes (before base64)")
    w = p.add_argument_group("webdl (host-side replay: the web-download scanner)")
    w.add_argument("--webdl-rounds", type=int, default=3, help="latency rounds")
    w.add_argument("--webdl-downloads", type=int, default=30, help="downloads per kind, configuration and round")
    hg = p.add_argument_group("httpguard (host-side replay: the HTTP overflow stage)")
    hg.add_argument("--httpguard-rounds", type=int, default=3, help="latency rounds")
    hg.add_argument("--httpguard-requests", type=int, default=30, help="requests per kind, configuration and round")
    sg = p.add_argument_group("signatures (the payload stage's matcher, host-side, one process)")
    sg.add_argument("--sig-rules", type=int, default=1500, help="never-matching rules")
    sg.add_argument("--sig-pcre-share", type=float, default=0.1, help="share of rules with a pcre")
    sg.add_argument("--sig-near-share", type=float, default=0.02,
                    help="share of rules whose fast pattern the data carries (confirmations run)")
    sg.add_argument("--sig-mbytes", type=int, default=64, help="MiB scanned per round")
    sg.add_argument("--sig-streams", type=int, default=16)
    sg.add_argument("--sig-rounds", type=int, default=5)
    sg.add_argument("--sig-compile-rules", type=int, default=10000, help="rules for the compile-time figure")
    sl = p.add_argument_group("scale (one daemon, many NIs with idle frontends)")
    sl.add_argument("--scale-counts", default="1,256", help="NI counts, comma separated (256: the switch's limit)")
    sl.add_argument("--scale-idle-seconds", type=float, default=30.0, help="idle CPU measured over this long")
    sl.add_argument("--scale-queries", type=int, default=50, help="query-nis calls timed")
    wk = p.add_argument_group("workers (frame loops side by side, one daemon each)")
    wk.add_argument("--workers-counts", default="1,2", help="daemon counts, comma separated")
    wk.add_argument("--workers-runs", type=int, default=3, help="runs per count and size")
    wk.add_argument("--workers-duration", type=float, default=10.0, help="measured seconds per run")
    return p.parse_args(argv)


def _git_rev() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                           cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip()
        return (r.stdout.strip() + ("-dirty" if dirty else "")) if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def meta(args: argparse.Namespace) -> dict:
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "dpdk": dpdk_version(),
        "testpmd": testpmd_binary(),
        "vhostni_git": _git_rev(),
    }


# --- the report --------------------------------------------------------------------------------------------

def _mpps(e: dict) -> str:
    if "pps" not in e:
        return e.get("status", "-").splitlines()[0][:38]
    s = e["pps"]
    spread = f"±{s['spread_pct'] / 2:.0f}%" if s.get("spread_pct") is not None else ""
    return f"{s['median'] / 1e6:5.2f} Mpps {spread:>5s} best {s['max'] / 1e6:5.2f} (n={s['n']})"


def _quiet(e: dict) -> str:
    q = e.get("pps_quiet")
    if not q or not q.get("n"):
        return "no quiet run" if "pps" in e else "-"
    return f"{q['median'] / 1e6:5.2f} Mpps (n={q['n']})"


def _foreign(e: dict) -> str:
    f = e.get("foreign_cpus")
    return f"{f['median']:.2f}" if f else "-"


def _gbit(e: dict) -> str:
    if "gbit_s" not in e:
        return e.get("status", "-").splitlines()[0][:60]
    s = e["gbit_s"]
    spread = f"±{s['spread_pct'] / 2:.0f}%" if s.get("spread_pct") is not None else ""
    return f"{s['median']:6.3f} Gbit/s {spread:>5s} (n={s['n']})"


def _ratio(x) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) else "-"


def report(results: dict) -> str:
    lines = []
    fl = results.get("frame_loop")
    if fl:
        if "status" in fl:
            lines.append(f"frame loop: {fl['status']}")
        else:
            lines.append("frame loop: frames/s delivered by the backend (both directions summed), median of runs; "
                         "± = half the min-max spread")
            lines.append("  (others' CPU = CPUs used by other processes during the runs, median: "
                         "0 on a quiet machine; it takes CPU from the benchmark)")
            lines.append(f"  {'size':>6s}  {'baseline (DPDK net_vhost)':38s}  {'vhostni':38s}  vhostni/baseline"
                         f"  others' CPU (base/vhostni)")
            for size, e in fl["sizes"].items():
                b, v = e.get("baseline", {}), e.get("vhostni", {})
                lines.append(f"  {size + ' B':>6s}  {_mpps(b):38s}  {_mpps(v):38s}  "
                             f"{_ratio(e.get('ratio_vhostni_to_baseline')):16s}  {_foreign(b)} / {_foreign(v)}")
            thr = fl.get("config", {}).get("quiet_cpus")
            lines.append(f"  quiet runs only (others used <= {thr} CPU):")
            for size, e in fl["sizes"].items():
                b, v = e.get("baseline", {}), e.get("vhostni", {})
                lines.append(f"  {size + ' B':>6s}  {_quiet(b):38s}  {_quiet(v):38s}  "
                             f"{_ratio(e.get('ratio_quiet_vhostni_to_baseline'))}")
    gt = results.get("guest_tcp")
    if gt:
        if gt.get("status") != "ran":
            lines.append(f"guest TCP (iperf3): {gt.get('status')}")
        else:
            lines.append("guest TCP: iperf3 between two TCG guests, receiver rate, median of runs")
            lines.append(f"  {'baseline (tap+bridge)':32s}  {'vhostni':32s}  vhostni/baseline")
            lines.append(f"  {_gbit(gt.get('baseline', {})):32s}  {_gbit(gt.get('vhostni', {})):32s}  "
                         f"{_ratio(gt.get('ratio_vhostni_to_baseline'))}")
    sc = results.get("scanners")
    if sc:
        lines += scanners.report_lines(sc)
    st = results.get("streams")
    if st:
        lines += streams.report_lines(st)
    if results.get("webdl"):
        lines += webdl.report_lines(results["webdl"])
    if results.get("httpguard"):
        lines += httpguard.report_lines(results["httpguard"])
    for key in ("signatures", "signatures_never_hit"):
        if results.get(key):
            lines += signatures.report_lines(results[key])
    if results.get("scale"):
        lines += scale.report_lines(results["scale"])
    if results.get("workers"):
        lines += workers.report_lines(results["workers"])
    if results.get("detectors"):
        lines += detectors.report_lines(results["detectors"])
    return "\n".join(lines)



def _loop_config(args, logdir: str) -> "frameloop.FrameLoopConfig":
    """The frame loop's settings from the command line (the ring loop uses the same)."""
    from vhostni.bench import frameloop
    return frameloop.FrameLoopConfig(
        sizes=[int(s) for s in args.sizes.split(",") if s.strip()], runs=args.runs,
        duration=args.duration, warmup=args.warmup, tx_first_bursts=args.bursts,
        frontend_cpus=args.frontend_cpu, frontend_vdev_args=args.frontend_vdev_args,
        wait_quiet=args.wait_quiet, quiet_cpus=args.quiet_cpus, logdir=logdir)

def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logdir = Path(args.logdir) if args.logdir else out.parent / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)

    for path in reap_stale(("vni-bench-", "vni-bt-", "vni-bs-")):
        print(f"removed {path} (left by a killed earlier run)", file=sys.stderr)
    results: dict = {"meta": meta(args)}
    vhostni_cmd = shlex.split(args.vhostni_cmd) if args.vhostni_cmd else None
    vhostni_args = shlex.split(args.vhostni_args)
    if args.no_vhostni:
        unavailable = "not requested (--no-vhostni)"
    else:
        unavailable = vhostni_unavailable_reason(vhostni_cmd)
    results["vhostni"] = {"available": unavailable is None, "reason": unavailable,
                          "extra_args": vhostni_args, "command": args.vhostni_cmd}
    if unavailable:
        print(f"vhostni: unavailable: {unavailable}", file=sys.stderr)

    def save() -> None:
        results["meta"]["loadavg_now"] = os.getloadavg()
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
        os.replace(tmp, out)

    status = 0
    try:
        if args.only in (None, "frameloop"):
            if testpmd_binary() is None:
                results["frame_loop"] = {"status": "skipped: dpdk-testpmd not found (apt-get install dpdk-dev)"}
            else:
                cfg = _loop_config(args, logdir)
                backends = [DpdkVhostBackend(cpus=args.backend_cpu, vdev_args=args.baseline_vdev_args),
                            VhostniBackend(cpus=args.backend_cpu, extra_args=vhostni_args, command=vhostni_cmd)]
                print(f"frame loop: {len(cfg.sizes)} sizes x {cfg.runs} runs x {cfg.duration:g} s per backend",
                      flush=True)
                partial: list[dict] = []

                def keep(r: dict) -> None:
                    partial.append(r)
                    results["frame_loop"] = {"status": "in progress", "runs_so_far": partial}
                    save()

                results["frame_loop"] = frameloop.run_frame_loop(
                    backends, cfg, unavailable={"vhostni": unavailable} if unavailable else None,
                    progress=lambda m: print(m, flush=True), on_result=keep)
                save()
        if args.only in (None, "ringloop"):
            if testpmd_binary() is None:
                results["ring_loop"] = {"status": "skipped: dpdk-testpmd not found (apt-get install dpdk-dev)"}
            else:
                cfg = _loop_config(args, logdir)
                print("ring loop: every frame held for a null scanner, against plain forwarding", flush=True)
                results["ring_loop"] = ringloop.run_ring_loop(
                    cfg, vhostni_args, vhostni_cmd, args.backend_cpu, progress=lambda m: print(m, flush=True))
                save()
        if args.only in (None, "ringstreams"):
            print("ring streams: 16 TCP connections held for a null scanner on a ring, fed from C", flush=True)
            results["ring_streams"] = ringstreams.run_ring_streams(
                ringstreams.RingStreamsConfig(runs=args.runs), progress=lambda m: print(m, flush=True))
            save()
        if args.only in (None, "ringlatency"):
            print("ring latency: one SYN at a time held for a null scanner on a ring", flush=True)
            results["ring_latency"] = ringlatency.run_ring_latency(
                ringlatency.RingLatencyConfig(), progress=lambda m: print(m, flush=True))
            save()
        if args.only in (None, "guest-tcp"):
            print("guest TCP: iperf3 between two TCG guests", flush=True)
            tcfg = guest_tcp.GuestTcpConfig(
                seconds=args.iperf_seconds, runs=args.iperf_runs, parallel=args.iperf_parallel,
                vhostni_args=vhostni_args, vhostni_command=vhostni_cmd, vhostni_cpus=args.tcp_vhostni_cpu,
                images=args.images, logdir=logdir)
            results["guest_tcp"] = guest_tcp.run_guest_tcp(tcfg, unavailable,
                                                           progress=lambda m: print(m, flush=True))
            save()
        if args.only in (None, "scanners"):
            print("scanners: overheads of a null and the Code-Red scanner against plain forwarding (two guests)",
                  flush=True)
            scfg = scanners.ScannerBenchConfig(
                configs=tuple(c.strip() for c in args.scanner_configs.split(",") if c.strip()),
                rounds=args.scanner_rounds, count=args.scanner_count, iperf_rounds=args.scanner_iperf_rounds,
                iperf_seconds=args.scanner_iperf_seconds, hold_rounds=args.scanner_hold_rounds,
                hold_count=args.scanner_hold_count,
                wait_quiet=args.scanner_wait_quiet, quiet_cpus=args.quiet_cpus, vhostni_args=vhostni_args,
                vhostni_command=vhostni_cmd, images=args.images, logdir=logdir)
            results["scanners"] = scanners.run_scanners(scfg, unavailable, progress=lambda m: print(m, flush=True))
            save()
        if args.only in (None, "streams"):
            print("streams: reassembly throughput (null stream scanner) and e-mail scanner latency, host-side "
                  "replay", flush=True)
            stcfg = streams.StreamBenchConfig(
                rounds=args.stream_rounds, connections=args.stream_connections,
                bytes_per_connection=args.stream_bytes, window=args.stream_window,
                cpu=int(args.stream_cpu) if args.stream_cpu.strip() else None, email_rounds=args.email_rounds,
                email_messages=args.email_messages, attachment_bytes=args.email_attachment)
            results["streams"] = streams.run_streams(stcfg, progress=lambda m: print(m, flush=True))
            save()
        if args.only in (None, "webdl"):
            print("webdl: the web-download scanner (HTTP Evader, clean downloads, latency), host-side replay",
                  flush=True)
            wcfg = webdl.WebBenchConfig(rounds=args.webdl_rounds, downloads=args.webdl_downloads,
                                        cpu=int(args.stream_cpu) if args.stream_cpu.strip() else None)
            results["webdl"] = webdl.run_webdl(wcfg, progress=lambda m: print(m, flush=True))
            save()
        if args.only in (None, "httpguard"):
            print("httpguard: the HTTP overflow stage (historic overflows, normal requests, latency), host-side replay",
                  flush=True)
            hcfg = httpguard.HttpBenchConfig(rounds=args.httpguard_rounds, requests=args.httpguard_requests,
                                             cpu=int(args.stream_cpu) if args.stream_cpu.strip() else None)
            results["httpguard"] = httpguard.run_httpguard(hcfg, progress=lambda m: print(m, flush=True))
            save()
        if args.only in (None, "signatures"):
            sgcfg = signatures.SigBenchConfig(
                rules=args.sig_rules, pcre_share=args.sig_pcre_share, near_share=args.sig_near_share,
                mbytes=args.sig_mbytes, streams=args.sig_streams, rounds=args.sig_rounds,
                compile_rules=args.sig_compile_rules)
            results["signatures"] = signatures.run_signatures(sgcfg, progress=lambda m: print(m, flush=True))
            save()
            if args.sig_near_share:     # and the case: no fast pattern ever in the data
                sgcfg.near_share, sgcfg.compile_rules = 0.0, 0
                results["signatures_never_hit"] = signatures.run_signatures(
                    sgcfg, progress=lambda m: print(m, flush=True))
                save()
        if args.only in (None, "scale"):
            print("scale: one daemon with many idle NIs (start-up, idle CPU, memory, query-nis)", flush=True)
            results["scale"] = scale.run_scale(
                scale.ScaleConfig(counts=[int(c) for c in args.scale_counts.split(",") if c.strip()],
                                  idle_seconds=args.scale_idle_seconds, queries=args.scale_queries,
                                  vhostni_command=vhostni_cmd, logdir=logdir),
                progress=lambda m: print(m, flush=True))
            save()
        if args.only in (None, "workers"):
            if testpmd_binary() is None:
                results["workers"] = {"status": "skipped: dpdk-testpmd not found (apt-get install dpdk-dev)"}
            else:
                print("workers: frame loops side by side, one vhostni daemon each", flush=True)
                results["workers"] = workers.run_workers(workers.WorkersConfig(
                    counts=[int(c) for c in args.workers_counts.split(",") if c.strip()],
                    sizes=[int(s) for s in args.sizes.split(",") if s.strip()], runs=args.workers_runs,
                    duration=args.workers_duration, warmup=args.warmup, tx_first_bursts=args.bursts,
                    vhostni_args=vhostni_args, vhostni_command=vhostni_cmd, logdir=logdir),
                    progress=lambda m: print(m, flush=True))
                save()
        if args.only in (None, "detectors"):
            results["detectors"] = detectors.run_detectors(progress=lambda m: print(m, flush=True))
            save()
    except (KeyboardInterrupt, Interrupted) as exc:
        results["interrupted"] = str(exc) or "KeyboardInterrupt"
        print(f"interrupted ({results['interrupted']}); partial results saved", file=sys.stderr)
        status = 130
    finally:
        results["meta"]["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        save()
    print()
    print(report(results))
    print(f"\nresults: {out}  logs: {logdir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
