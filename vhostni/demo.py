"""The main job, `make demo`: two real guests whose NICs are vhostni NIs, talking through it.

It starts `vhostni run` with two NIs, boots two QEMU guests (TCG) behind them, has them ping
each other, move a file over TCP with its checksum verified and run iperf3, and then
prints what the NIs did: their counters, read from the daemon's stats file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .testing import Guest, GuestImages, VhostniDaemon, VhostUserNic, boot_guests

WIDTH = 78


def say(text: str = "") -> None:
    print(text, flush=True)


def banner(text: str) -> None:
    say()
    say(f"== {text} " + "=" * max(0, WIDTH - len(text) - 4))


def show(guest: Guest, cmd: str, timeout: float = 60) -> str:
    say(f"[{guest.name}]# {cmd}")
    out = guest.check(cmd, timeout=timeout)
    for line in out.rstrip().splitlines():
        say(f"    {line}")
    return out


COUNTERS = [
    ("in_frames", "frames from the guest"),
    ("in_bytes", "bytes from the guest"),
    ("out_frames", "frames to the guest"),
    ("out_bytes", "bytes to the guest"),
    ("kicks", "guest notifications"),
    ("calls", "interrupts sent"),
    ("calls_suppressed", "interrupts suppressed"),
    ("tso_segmented", "TSO frames segmented"),
    ("csum_completed", "checksums completed"),
    ("drop_no_rx_buffer", "dropped: no guest buffers"),
    ("drop_link_down", "dropped: guest NIC not up"),
    ("drop_bad_desc", "dropped: bad descriptors"),
    ("drop_oversize", "dropped: oversize"),
    ("drop_runt", "dropped: runt"),
    ("drop_bad_offload", "dropped: bad offload header"),
]


def print_counters(stats: dict) -> None:
    nis = stats["nis"]
    names = list(nis)
    say(f"{'':32}" + "".join(f"{n:>16}" for n in names))
    for key, label in COUNTERS:
        say(f"{label:32}" + "".join(f"{nis[n].get(key, 0):>16,}" for n in names))
    for n in names:
        state = "BROKEN: " + nis[n]["broken"] if nis[n]["broken"] else "healthy"
        say(f"NI {n}: {state}; negotiated features {nis[n]['features']}, "
            f"{nis[n]['messages']} vhost-user messages, {nis[n]['protocol_errors']} refused")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vhostni.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--images", help="guest images directory (default: images/out)")
    ap.add_argument("--logs", default="test-logs/demo", help="where console and daemon logs go")
    args = ap.parse_args(argv)

    images = GuestImages.locate(args.images)
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vhostni-demo-"))
    stats_file = work / "stats.json"
    sock = {n: str(work / f"{n}.sock") for n in ("alice", "bob")}

    banner("vhostni: two VMs whose NICs are served by vhostni")
    daemon = VhostniDaemon(sock, extra_args=["--stats-file", str(stats_file)],
                           log_path=logs / "vhostni.log")
    daemon.start()
    say(f"vhostni run --ni alice={sock['alice']} --ni bob={sock['bob']}   (pid {daemon.pid})")
    alice = Guest("alice", images, nics=[VhostUserNic(sock["alice"])], ip="10.77.0.1/24",
                  log_dir=logs)
    bob = Guest("bob", images, nics=[VhostUserNic(sock["bob"])], ip="10.77.0.2/24", log_dir=logs)
    try:
        t0 = time.monotonic()
        boot_guests([alice, bob])
        say(f"booted alice (10.77.0.1) and bob (10.77.0.2) under QEMU/TCG in "
            f"{time.monotonic() - t0:.1f} s; console logs in {logs}/")

        banner("alice pings bob")
        show(alice, "ping -c 3 10.77.0.2")

        banner("bob serves 10 MB over HTTP; alice fetches it and checks it")
        show(bob, "mkdir -p /srv && dd if=/dev/urandom of=/srv/blob bs=1M count=10 2>/dev/null && "
                  "md5sum /srv/blob && httpd -p 80 -h /srv")
        show(alice, "wget -q -O /tmp/got http://10.77.0.2/blob && ls -l /tmp/got && md5sum /tmp/got",
             timeout=120)
        a = alice.check("md5sum < /tmp/got").split()[0]
        b = bob.check("md5sum < /srv/blob").split()[0]
        say(f"checksums {'MATCH' if a == b else 'DIFFER'}: {a}")

        banner("iperf3, alice -> bob, 5 s")
        bob.check("iperf3 -s -D; sleep 0.5")
        out = alice.check("iperf3 -c 10.77.0.2 -t 5 -f g", timeout=60)
        for line in out.splitlines():
            if "sender" in line or "receiver" in line:
                say("    " + line.strip())

        time.sleep(0.6)   # one more stats-file update
        banner("what the NIs did (vhostni's counters)")
        print_counters(json.loads(stats_file.read_text()))
        ok = a == b
    finally:
        for g in (alice, bob):
            g.close()
        daemon.stop()
    say()
    say("demo " + ("passed" if ok else "FAILED") + f"; logs in {logs}/")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
