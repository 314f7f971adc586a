"""The main job, `make demo`: two real guests whose NICs are vhostni NIs; one gets a worm.

It starts `vhostni run` with two NIs (alice's with the Code-Red scanner policy), boots two
QEMU guests (TCG) behind them, shows them talking (ping, 10 MB over HTTP with checksums,
iperf3), then runs a Code-Red-style worm in alice: her NI queues its connection attempts,
releasing one every 6 s or slower, and alerts, while her normal traffic (resolve, then
connect) flows.  Then alice SYN-bombs bob: her NI alerts, throttles her SYNs to him and
resets the half-open connections she left on him.  It ends with the alert log as an
administrator reads it and the NIs' counters.
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
LAN = "10.77.0"
WORM_NET = "198.18.0.0/16"    # reserved for benchmarking; routed to bob, who drops it
ALICE_MAC = "52:54:00:77:00:01"
BOMB_SRC = f"{LAN}.11"        # alice's in her policy, not configured on her interface (see guests/worm.c)


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
    ("drop_spoofed", "dropped: spoofed source"),
    ("held", "held for scanners"),
    ("held_passed", "held, then passed"),
    ("held_cut", "held, then cut"),
    ("punted_copies", "copies to read-only scanners"),
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


def demo_args(prog: str, doc: str, logs: str, argv: list[str] | None) -> argparse.Namespace:
    """The command line every demo takes: --images and --logs (default ``logs``)."""
    ap = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.splitlines()[0])
    ap.add_argument("--images", help="guest images directory (default: $VHOSTNI_IMAGES, images/out, "
                                     "~/.cache/vhostni/images; `vhostni images build` makes them)")
    ap.add_argument("--logs", default=logs, help="where console and daemon logs go")
    return ap.parse_args(argv)


class DemoSetup:
    """A demo's images, logs directory, scratch directory, a fresh alert log and alice's and bob's sockets;
    ``ni``'s policy (text) is written to the scratch directory."""

    def __init__(self, args: argparse.Namespace, prefix: str, ni: str, policy_text: str):
        self.images = GuestImages.locate(args.images)
        self.logs = Path(args.logs)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix=prefix))
        self.alert_log = self.logs / "alerts.jsonl"
        if self.alert_log.exists():
            self.alert_log.unlink()
        self.sock = {n: str(self.work / f"{n}.sock") for n in ("alice", "bob")}
        self.ni = ni
        self.policy = self.work / f"{ni}.toml"
        self.policy.write_text(policy_text)

    def start_daemon(self, shown_policy: str, pre_args: tuple = ()) -> VhostniDaemon:
        """Starts `vhostni run` with the two NIs, the policy on ``ni`` and the alert log; says so."""
        daemon = VhostniDaemon(self.sock, extra_args=[*pre_args, "--policy", f"{self.ni}={self.policy}",
                                                      "--alert-log", str(self.alert_log)],
                               log_path=self.logs / "vhostni.log")
        daemon.start()
        say(f"vhostni run --ni alice={self.sock['alice']} --ni bob={self.sock['bob']} \\")
        say(f"            --policy {self.ni}={shown_policy}   (pid {daemon.pid})")
        return daemon


def boot_pair(alice: Guest, bob: Guest, lan: str, suffix: str = "") -> None:
    """Boots both guests and says how long it took."""
    t0 = time.monotonic()
    boot_guests([alice, bob])
    say(f"booted alice ({lan}.1) and bob ({lan}.2) under QEMU/TCG in {time.monotonic() - t0:.1f} s{suffix}")


def print_alerts(alert_log: Path, cut: int | None = None, detail=None) -> None:
    """The alert log as an administrator reads it; ``detail(fields)`` may add a line (or None) per alert."""
    for line in alert_log.read_text().splitlines():
        rec = json.loads(line)
        when = time.strftime("%H:%M:%S", time.localtime(rec["time"]))
        say(f"#{rec['seq']} {when} NI {rec['ni']} / {rec['scanner']}: {rec['message'][:cut]}")
        extra = detail(rec.get("fields", {})) if detail else None
        if extra:
            say(extra)


def end_demo(guests: list, daemon: VhostniDaemon) -> None:
    for g in guests:
        g.close()
    daemon.stop()


def verdict(ok: bool, logs: Path) -> int:
    say()
    say("demo " + ("passed" if ok else "FAILED") + f"; logs in {logs}/")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = demo_args("vhostni.demo", __doc__, "test-logs/demo", argv)
    setup = DemoSetup(args, "vhostni-demo-", "alice", alice_policy())
    images, logs, work, alert_log, sock = setup.images, setup.logs, setup.work, setup.alert_log, setup.sock
    stats_file = work / "stats.json"

    banner("vhostni: two VMs whose NICs are served by vhostni")
    daemon = setup.start_daemon("<examples/codered.toml + alice's MAC and address>",
                                ("--stats-file", str(stats_file)))
    alice = Guest("alice", images, nics=[VhostUserNic(sock["alice"], mac=ALICE_MAC)],
                  ip=f"{LAN}.1/24", dns=f"{LAN}.2", log_dir=logs)
    bob = Guest("bob", images, nics=[VhostUserNic(sock["bob"])], ip=f"{LAN}.2/24", log_dir=logs)
    ok = False
    try:
        boot_pair(alice, bob, LAN, f"; console logs in {logs}/")

        banner("1. alice and bob talk through vhostni")
        show(alice, f"ping -c 2 {LAN}.2")
        show(bob, "mkdir -p /srv && dd if=/dev/urandom of=/srv/blob bs=1M count=10 2>/dev/null && "
                  "echo hello-from-bob > /srv/index.html && md5sum /srv/blob && httpd -p 80 -h /srv")
        show(alice, f"wget -q -O /tmp/got http://{LAN}.2/blob && md5sum /tmp/got", timeout=120)
        a = alice.check("md5sum < /tmp/got").split()[0]
        b = bob.check("md5sum < /srv/blob").split()[0]
        say(f"10 MB over HTTP: checksums {'MATCH' if a == b else 'DIFFER'}")
        bob.check("iperf3 -s -D; sleep 0.5")
        out = alice.check(f"iperf3 -c {LAN}.2 -t 3 -f g", timeout=60)
        for line in out.splitlines():
            if "receiver" in line:
                say("iperf3 alice -> bob:  " + " ".join(line.split()[4:7]))

        banner("2. alice is infected: a Code-Red-style worm scans random addresses")
        say("alice's NI runs the Code-Red scanner (Siphon paper, 5.3): it shadows alice's DNS")
        say("answers and holds every connection attempt until it has checked the destination.")
        bob.check(f"(dnsd www.test={LAN}.2 > /tmp/dnsd.log 2>&1 &); "
                  "for i in $(seq 50); do grep -q serving /tmp/dnsd.log && break; sleep 0.1; done")
        alice.check(f"route add -net {WORM_NET} gw {LAN}.2")
        before = json.loads(stats_file.read_text())["nis"]["alice"]
        show(alice, f"(worm -n 100 -r 10 -p 80 -w 3 -s 1 {WORM_NET} > /tmp/worm.log 2>&1 &); "
                    "sleep 3; head -4 /tmp/worm.log")
        say("... meanwhile alice's normal traffic: resolve a name, then connect to it")
        t1 = time.monotonic()
        show(alice, "ip=$(nslookup www.test | awk '/^Address: /{a=$2} END{print a}') && "
                    "echo \"www.test is $ip\" && timeout 10 wget -q -O - http://$ip/", timeout=30)
        normal = time.monotonic() - t1
        say(f"(took {normal:.2f} s: not delayed)")
        alice.run("for i in $(seq 30); do grep -q '^done:' /tmp/worm.log && break; sleep 1; done",
                  timeout=60)
        show(alice, "grep -E '^(sent|done)' /tmp/worm.log")
        time.sleep(0.6)
        after = json.loads(stats_file.read_text())["nis"]["alice"]
        passed = after["held_passed"] - before["held_passed"]
        cut = after["held_cut"] - before["held_cut"]
        say(f"alice's NI: {passed} connection attempts (SYNs, with retransmissions) passed, "
            f"{cut} cut")

        bombed = synbomb_step(alice, bob, alert_log)

        banner("4. what the administrator sees: the alert log")
        print_alerts(alert_log)

        banner("5. what the NIs did (vhostni's counters)")
        print_counters(json.loads(stats_file.read_text()))
        ok = a == b and cut > passed and normal < 5 and bombed
    finally:
        end_demo([alice, bob], daemon)
    return verdict(ok, logs)


def synbomb_step(alice: Guest, bob: Guest, alert_log: Path) -> bool:
    """alice SYN-bombs bob's web server; True if her NI alerted and bob's half-open connections went."""
    banner("3. alice SYN-bombs bob: her NI throttles her and repairs him")
    say("alice's NI also runs the SYN-bomb detector: a handshake is half-open when bob repeats his")
    say("SYN-ACK.  A burst of them: alert, alice's SYNs to bob throttled, and a RST to bob, from")
    say("alice's address with the sequence numbers he accepts, for each half-open connection.")
    # bob answers the bomb's source (an address of alice's she has not configured, so her kernel
    # drops his SYN-ACKs instead of resetting them); httpd listens on [::]:80, hence tcp6 too
    bob.check(f"arp -s {BOMB_SRC} {ALICE_MAC}")
    count = "echo $(cat /proc/net/tcp /proc/net/tcp6 | awk '$4 == \"03\" && $2 ~ /:0050$/' | wc -l)"
    t0 = time.time()
    show(alice, f"(worm -m synbomb -S {BOMB_SRC} -n 30 -r 10 -p 80 {LAN}.2/32 > /tmp/bomb.log 2>&1 &); "
                "sleep 1; head -3 /tmp/bomb.log")
    during = int(bob.check(count).split()[-1])
    say(f"bob's half-open connections to port 80 during the bomb: {during}")
    alerted = False
    for _ in range(40):
        recs = [json.loads(line) for line in alert_log.read_text().splitlines()] if alert_log.exists() else []
        if any(r["scanner"] == "synbomb" and r["time"] >= t0 for r in recs):
            alerted = True
            break
        time.sleep(0.5)
    alice.run("for i in $(seq 30); do grep -q '^done' /tmp/bomb.log && break; sleep 0.5; done", timeout=60)
    time.sleep(3)
    after = int(bob.check(count).split()[-1])
    say(f"... and 3 s after it: {after} (without the repair they would stay about a minute)")
    return alerted and during > 0 and after == 0


def alice_policy() -> str:
    from .resources import path
    text = path("examples/codered.toml").read_text()
    text = text.replace('program = "../scanners/codered"', 'program = "vhostni:codered"')
    text = text.replace('# mac = "52:54:00:12:34:56"', f'mac = "{ALICE_MAC}"')
    text = text.replace('# addresses = ["10.77.0.1/32"]', f'addresses = ["{LAN}.1/32", "{BOMB_SRC}/32", "fe80::/64"]')
    bomb = path("examples/synbomb.toml").read_text()
    bomb = bomb[bomb.index("[[scanner]]"):].replace('program = "../scanners/codered"', 'program = "vhostni:codered"')
    # bob's httpd has a small listen backlog: a handful of half-open connections is all a bomb leaves
    return text + "\n" + bomb.replace("max_half_open = 8", "max_half_open = 3")


if __name__ == "__main__":
    sys.exit(main())
