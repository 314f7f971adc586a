"""`make demo-http`: buffer-overflow requests to a guest's web server stopped by its NI, normal ones served.

It starts `vhostni run` with two NIs (bob's with the HTTP overflow stage's example policy,
examples/httpguard.toml), boots two QEMU guests (TCG) behind them and has bob serve a web site with
busybox httpd.  alice browses it with busybox wget; then alice sends Code-Red's request (the 224 N
and %u-encoded jump into the worm's body in /default.ida's query, as the worm sent it), Code-Red
II's, and the .printer overflow (a 420-byte Host header).  bob's NI holds each request until its
head is read, measures the field the server would overflow, and answers the client with the
policy's 400 in the server's place: httpd's own log shows that none of them reached it, while the
normal requests (a long but allowed one among them) did.  It ends with the alert log.
"""
from __future__ import annotations

import json
import sys

from .demo import DemoSetup, banner, boot_pair, demo_args, end_demo, print_alerts, say, show, verdict
from .testing import Guest, VhostUserNic

LAN = "10.81.0"
BOB_MAC = "52:54:00:81:00:02"
# Code-Red's request (CERT CA-2001-19; eEye's analysis): 224 N (Code-Red II: X), then the jump
# into the worm's code, %u-encoded, then the worm itself as the body (here: filler of its length)
CODERED_JUMP = (b"%u9090%u6858%ucbd3%u7801%u9090%u6858%ucbd3%u7801%u9090%u6858%ucbd3%u7801"
                b"%u9090%u9090%u8190%u00c3%u0003%u8b00%u531b%u53ff%u0078%u0000%u00=a")


def codered_request(fill: bytes = b"N") -> bytes:
    body = bytes((i * 13 + 0x55) % 256 for i in range(3379))
    return (b"GET /default.ida?" + fill * 224 + CODERED_JUMP + b" HTTP/1.0\r\nContent-type: text/xml\r\n"
            b"Content-length: 3379\r\n\r\n" + body)


def printer_request() -> bytes:
    """The .printer overflow (MS01-023, jill.c): a Host header of 420 bytes to /NULL.printer."""
    return b"GET /NULL.printer HTTP/1.0\r\nHost: " + b"\x90" * 420 + b"\r\n\r\n"


def bob_policy() -> str:
    from .resources import path
    text = path("examples/httpguard.toml").read_text()
    return text.replace('program = "../scanners/httpguard"', 'program = "vhostni:httpguard"')


def main(argv: list[str] | None = None) -> int:
    args = demo_args("vhostni.demo_http", __doc__, "test-logs/demo-http", argv)
    setup = DemoSetup(args, "vhostni-demo-http-", "bob", bob_policy())
    images, logs, alert_log, sock = setup.images, setup.logs, setup.alert_log, setup.sock

    banner("vhostni: bob's NI guards his web server against overflow requests")
    daemon = setup.start_daemon("examples/httpguard.toml")
    alice = Guest("alice", images, nics=[VhostUserNic(sock["alice"])], ip=f"{LAN}.1/24", log_dir=logs)
    bob = Guest("bob", images, nics=[VhostUserNic(sock["bob"], mac=BOB_MAC)], ip=f"{LAN}.2/24", log_dir=logs)
    ok = False
    try:
        boot_pair(alice, bob, LAN)
        bob.check("mkdir -p /www && echo '<h1>hello from bob</h1>' > /www/index.html && "
                  "(httpd -f -vv -p 80 -h /www 2> /tmp/httpd.log &); sleep 0.5")
        alice.put_file("/tmp/codered.req", codered_request(b"N"))
        alice.put_file("/tmp/codered2.req", codered_request(b"X"))
        alice.put_file("/tmp/printer.req", printer_request())

        banner("1. alice browses bob's web server")
        page = show(alice, f"wget -q -O - http://{LAN}.2/")
        say("a long query, but no signature limits it: it passes")
        long_ok = show(alice, f"wget -q -O - 'http://{LAN}.2/index.html?q={'x' * 600}'")
        say("a short query to /default.ida is within its limit: it reaches httpd (404: no Index Server here)")
        show(alice, f"wget -q -O - 'http://{LAN}.2/default.ida?q=short' 2>&1; true")

        banner("2. alice sends Code-Red's request to bob")
        say("GET /default.ida?NNNN...(224 N)...%u9090%u6858%ucbd3%u7801...%u00=a HTTP/1.0   + 3379 bytes of worm")
        say("bob's NI holds the request until its head is read, decodes the query as IIS would (one unit")
        say("per %u escape): 252 code units, where idq.dll's buffer takes 200. The server gets none of it;")
        say("alice gets the policy's 400 in the server's place:")
        out1 = show(alice, "timeout 5 nc " + f"{LAN}.2 80 < /tmp/codered.req; true")
        say("Code-Red II (224 X), and the .printer overflow (a 420-byte Host header, MS01-023):")
        out2 = show(alice, "timeout 5 nc " + f"{LAN}.2 80 < /tmp/codered2.req; true")
        out3 = show(alice, "timeout 5 nc " + f"{LAN}.2 80 < /tmp/printer.req; true")

        banner("3. browsing goes on; what bob's httpd saw")
        show(alice, f"wget -q -O - http://{LAN}.2/")
        log = show(bob, "grep url: /tmp/httpd.log")
        reached = log.count("default.ida") != 1 or "printer" in log
        say(f"overflow requests that reached bob's web server: {'SOME' if reached else 'none'} "
            "(the one /default.ida there is the short, allowed query)")

        banner("4. what the administrator sees: the alert log")
        print_alerts(alert_log, 150, lambda f: (
            f"      signature {f['signature']} ({f['cve']})  field {f['field']}"
            f"{' ' + f['field_name'] if f.get('field_name') else ''}  length {f['length']}  "
            f"limit {f['limit']}  action {f['action']}") if f.get("event") == "overflow" else None)
        stopped = [json.loads(line)["fields"] for line in alert_log.read_text().splitlines()]
        sigs = sorted(f["signature"] for f in stopped if f.get("event") == "overflow")
        ok = ("hello from bob" in page and "hello from bob" in long_ok and not reached
              and all("400 Bad Request" in o for o in (out1, out2, out3))
              and sigs == ["iis-ida-codered", "iis-ida-codered", "iis-printer-host"])
    finally:
        end_demo([alice, bob], daemon)
    return verdict(ok, logs)


if __name__ == "__main__":
    sys.exit(main())
