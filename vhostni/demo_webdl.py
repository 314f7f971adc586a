"""`make demo-webdl`: a guest's infected downloads stopped by its NI while its normal browsing flows.

It starts `vhostni run` with two NIs (alice's with the web-download scanner's example policy), boots two
QEMU guests (TCG) behind them, and has alice browse bob's web server (busybox httpd) with busybox wget:
a page and 5 MB arrive intact; then the EICAR test file, as a file and gzip-compressed without a length,
is replaced by the policy's "403 blocked" response, and a response hiding it behind a Transfer-Encoding
next to a Content-Length (HTTP Evader's trick) has its connection killed; then browsing goes on.  It ends
with the alert log as an administrator reads it.
"""
from __future__ import annotations

import sys
import time

from .demo import DemoSetup, banner, boot_pair, demo_args, end_demo, print_alerts, say, show, verdict
from .testing import Guest, VhostUserNic

LAN = "10.79.0"
ALICE_MAC = "52:54:00:79:00:11"
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def alice_policy() -> str:
    from .resources import path
    text = path("examples/webdl.toml").read_text()
    return text.replace('program = "../scanners/webdl"', 'program = "vhostni:webdl"')


def main(argv: list[str] | None = None) -> int:
    args = demo_args("vhostni.demo_webdl", __doc__, "test-logs/demo-webdl", argv)
    setup = DemoSetup(args, "vhostni-demo-webdl-", "alice", alice_policy())
    images, logs, alert_log, sock = setup.images, setup.logs, setup.alert_log, setup.sock

    banner("vhostni: alice's NI checks her web downloads")
    daemon = setup.start_daemon("examples/webdl.toml")
    alice = Guest("alice", images, nics=[VhostUserNic(sock["alice"], mac=ALICE_MAC)], ip=f"{LAN}.1/24",
                  log_dir=logs)
    bob = Guest("bob", images, nics=[VhostUserNic(sock["bob"])], ip=f"{LAN}.2/24", log_dir=logs)
    ok = False
    try:
        boot_pair(alice, bob, LAN)
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
        print_alerts(alert_log, None, lambda f: (
            f"      url {f['url']}  sha256 {f['sha256'][:16]}...  engine {f['engine']}  "
            f"action {f['action']}") if f.get("event") == "virus" else None)
        ok = same and "403" in out1 and "403" in out2 and "403" not in out3 and "EICAR" not in got
    finally:
        end_demo([alice, bob], daemon)
    return verdict(ok, logs)


if __name__ == "__main__":
    sys.exit(main())
