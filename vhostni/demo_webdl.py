"""`make demo-webdl`: a guest's infected downloads stopped by its NI while its normal browsing flows.

It starts `vhostni run` with two NIs (alice's with the web-download scanner's example policy), boots two
QEMU guests (TCG) behind them, and has alice browse bob's web server (busybox httpd) with busybox wget:
a page and 5 MB arrive intact; then the EICAR test file, as a file and gzip-compressed without a length,
is replaced by the policy's "403 blocked" response, and a response hiding it behind a Transfer-Encoding
next to a Content-Length (HTTP Evader's trick) has its connection killed; then browsing goes on.  It ends
with the alert log as an administrator reads it.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from .demo import banner, say, show
from .testing import Guest, GuestImages, VhostniDaemon, VhostUserNic, boot_guests

LAN = "10.79.0"
ALICE_MAC = "52:54:00:79:00:11"
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def alice_policy() -> str:
    from .resources import path
    text = path("examples/webdl.toml").read_text()
    return text.replace('program = "../scanners/webdl"', 'program = "vhostni:webdl"')


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vhostni.demo_webdl", description=__doc__.splitlines()[0])
    ap.add_argument("--images", help="guest images directory (default: $VHOSTNI_IMAGES, images/out, "
                                     "~/.cache/vhostni/images; `vhostni images build` makes them)")
    ap.add_argument("--logs", default="test-logs/demo-webdl", help="where console and daemon logs go")
    args = ap.parse_args(argv)

    images = GuestImages.locate(args.images)
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vhostni-demo-webdl-"))
    alert_log = logs / "alerts.jsonl"
    if alert_log.exists():
        alert_log.unlink()
    sock = {n: str(work / f"{n}.sock") for n in ("alice", "bob")}
    policy = work / "alice.toml"
    policy.write_text(alice_policy())

    banner("vhostni: alice's NI checks her web downloads")
    daemon = VhostniDaemon(sock, extra_args=["--policy", f"alice={policy}", "--alert-log", str(alert_log)],
                           log_path=logs / "vhostni.log")
    daemon.start()
    say(f"vhostni run --ni alice={sock['alice']} --ni bob={sock['bob']} \\")
    say(f"            --policy alice=examples/webdl.toml   (pid {daemon.pid})")
    alice = Guest("alice", images, nics=[VhostUserNic(sock["alice"], mac=ALICE_MAC)], ip=f"{LAN}.1/24",
                  log_dir=logs)
    bob = Guest("bob", images, nics=[VhostUserNic(sock["bob"])], ip=f"{LAN}.2/24", log_dir=logs)
    ok = False
    try:
        t0 = time.monotonic()
        boot_guests([alice, bob])
        say(f"booted alice ({LAN}.1) and bob ({LAN}.2) under QEMU/TCG in {time.monotonic() - t0:.1f} s")
        bob.check("mkdir -p /www/cgi-bin && echo '<h1>hello from bob</h1>' > /www/index.html && "
                  "dd if=/dev/urandom of=/www/blob bs=1M count=5 2>/dev/null")
        bob.put_file("/www/eicar.com", EICAR)
        bob.put_file("/www/cgi-bin/gz", b"#!/bin/sh\nprintf 'Content-Type: application/octet-stream\\r\\n"
                     b"Content-Encoding: gzip\\r\\n\\r\\n'\ngzip -c /www/eicar.com\n", mode=0o755)
        bob.put_file("/www/cgi-bin/evade", b"#!/bin/sh\nprintf 'Content-Type: application/octet-stream\\r\\n"
                     b"Transfer-Encoding: chunked\\r\\nContent-Length: 5\\r\\n\\r\\n44\\r\\n'\n"
                     b"cat /www/eicar.com\nprintf '\\r\\n0\\r\\n\\r\\n'\n", mode=0o755)
        bob.check("(httpd -f -p 80 -h /www > /tmp/httpd.log 2>&1 &); sleep 0.5")

        banner("1. alice browses bob's web server")
        show(alice, f"wget -q -O - http://{LAN}.2/")
        show(alice, f"wget -q -O /tmp/blob http://{LAN}.2/blob && sha256sum /tmp/blob", timeout=120)
        same = alice.check("sha256sum < /tmp/blob").split()[0] == bob.check("sha256sum < /www/blob").split()[0]
        say(f"5 MB download, held whole by the scanner and checked: checksums {'MATCH' if same else 'DIFFER'}")

        banner("2. alice downloads malware (the EICAR test file)")
        say("as a file: the scanner holds the response until its last byte, finds the file, and the NI")
        say("replaces the response with the policy's '403 blocked' one")
        out1 = show(alice, f"wget -O /tmp/e1 http://{LAN}.2/eicar.com 2>&1; ls -l /tmp/e1 2>&1 || true")
        say("gzip-compressed, with no length (the body ends when bob closes): decoded as a browser would")
        out2 = show(alice, f"wget -O /tmp/e2 http://{LAN}.2/cgi-bin/gz 2>&1; true")
        say("hidden behind 'Transfer-Encoding: chunked' and 'Content-Length: 5' (HTTP Evader): clients")
        say("disagree on where it ends, so the scanner cannot be sure what alice gets: connection killed")
        out3 = show(alice, f"wget -O /tmp/e3 http://{LAN}.2/cgi-bin/evade 2>&1; true")
        got = alice.run("cat /tmp/e1 /tmp/e2 /tmp/e3 2>/dev/null")[0]
        say(f"EICAR on alice's disk: {'YES' if 'EICAR' in got else 'no'}")

        banner("3. browsing goes on")
        t1 = time.monotonic()
        show(alice, f"wget -q -O - http://{LAN}.2/")
        say(f"(took {time.monotonic() - t1:.2f} s)")

        banner("4. what the administrator sees: the alert log")
        for line in alert_log.read_text().splitlines():
            rec = json.loads(line)
            f = rec.get("fields", {})
            when = time.strftime("%H:%M:%S", time.localtime(rec["time"]))
            say(f"#{rec['seq']} {when} NI {rec['ni']} / {rec['scanner']}: {rec['message']}")
            if f.get("event") == "virus":
                say(f"      url {f['url']}  sha256 {f['sha256'][:16]}...  engine {f['engine']}  "
                    f"action {f['action']}")
        ok = same and "403" in out1 and "403" in out2 and "403" not in out3 and "EICAR" not in got
    finally:
        for g in (alice, bob):
            g.close()
        daemon.stop()
    say()
    say("demo " + ("passed" if ok else "FAILED") + f"; logs in {logs}/")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
