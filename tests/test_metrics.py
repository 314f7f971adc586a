"""The Prometheus endpoint (`vhostni run --metrics tcp:HOST:PORT`), scraped while traffic flows
through a running daemon with simulated guests and a scanner holding frames."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nikit import (A_MAC, B_MAC, IPS, TCP_SYN, policy, scanner_spec, tcp_frame, wait_until,
                   write_policy)
from vhostni.metrics import DaemonCollector, parse_listen


def test_parse_listen():
    assert parse_listen("tcp:127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_listen("tcp:[::1]:9100") == ("::1", 9100)
    for bad in ("127.0.0.1:9100", "tcp:127.0.0.1", "tcp::9100", "tcp:h:x", "tcp:h:70000", "udp:h:1"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_collector_labels_are_bounded():
    """Labels come from NI and scanner names and the C counter names; figures of a guest's
    choosing (addresses, ports) never become labels."""
    snap = {"alerts": 3, "internal_errors": 1,
            "alert_log": {"pending": 2, "lost": 1, "write_errors": 4, "error": "ENOSPC", "path": "/x"},
            "checkpoints": {"scanners": 2, "bytes": 100, "dir": "/var/lib"}, "nis": {"vm1": {
        "connected": True, "link": "up", "in_frames": 5, "out_bytes": 7, "drop_spoofed": 2,
        "tcp_killed": 1, "backlog_max": 4, "socket": "/run/x", "features": "0x1",
        "kernel": {"held": 2, "tcp_bytes": 10, "decided_by_timeout": 1, "scanners": {
            "cr": {"state": "running", "locked_down": True, "pid": 1234, "uid": 62000,
                   "pending_decisions": 1, "frames": 9, "restarts": 1,
                   "rights": [{"match": "10.0.0.1"}], "last_error": "x"}}}}}}
    fams = {f.name: f for f in DaemonCollector(lambda: (snap, False)).collect()}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in fams.values() for s in f.samples}
    assert samples[("vhostni_ni_frames_total", (("direction", "in"), ("ni", "vm1")))] == 5
    assert samples[("vhostni_ni_drops_total", (("ni", "vm1"), ("reason", "spoofed")))] == 2
    assert samples[("vhostni_ni_tcp_total", (("event", "killed"), ("ni", "vm1")))] == 1
    assert samples[("vhostni_ni_held_frames", (("ni", "vm1"),))] == 2
    assert samples[("vhostni_scanner_frames_total", (("ni", "vm1"), ("scanner", "cr")))] == 9
    assert samples[("vhostni_scanner_state", (("ni", "vm1"), ("scanner", "cr"),
                                              ("state", "running")))] == 1
    assert samples[("vhostni_alerts_total", ())] == 3
    assert samples[("vhostni_scrape_stale", ())] == 0
    assert samples[("vhostni_alert_log_pending", ())] == 2
    assert samples[("vhostni_alert_log_lost_total", ())] == 1
    assert samples[("vhostni_alert_log_failing", ())] == 1
    assert samples[("vhostni_internal_errors_total", ())] == 1
    assert samples[("vhostni_checkpoints_bytes", ())] == 100
    labels = {k for (_, ls) in samples for k, _ in ls}
    assert labels <= {"ni", "scanner", "state", "reason", "event", "direction"}
    assert not any("pid" in n or "uid" in n for n, _ in samples)


def _scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="vnm-", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_scrape_while_traffic_flows(workdir):
    from vdriver import VirtioNetDriver
    pol = write_policy(os.path.join(workdir, "a.json"), policy(
        A_MAC, [IPS["a"]], hold_timeout_ms=2000,
        scanners=[scanner_spec("syns", "decider.py",
                               allow=[{"proto": "tcp", "tcp_flags": "syn,!ack", "contain": True}],
                               config={"subscribe": [{"match": {"proto": "tcp",
                                                                "tcp_flags": "syn,!ack"},
                                                      "contain": True}]})]))
    log_path = os.path.join(workdir, "log")
    argv = [sys.executable, "-m", "vhostni", "run", "--alert-log",
            os.path.join(workdir, "alerts.jsonl"), "--metrics", "tcp:127.0.0.1:0",
            "--ni", f"a={workdir}/a.sock", "--ni", f"b={workdir}/b.sock", "--policy", f"a={pol}"]
    log = open(log_path, "w")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    drivers = []
    try:
        def port():
            m = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", open(log_path).read())
            assert proc.poll() is None, open(log_path).read()
            return m and int(m.group(1))
        url = f"http://127.0.0.1:{wait_until(port, 20, 'the metrics endpoint')}/metrics"
        wait_until(lambda: "ready" in open(os.path.join(workdir, "alerts.jsonl")).read()
                   if os.path.exists(os.path.join(workdir, "alerts.jsonl")) else False,
                   20, "the scanner to subscribe")
        before = _scrape(url)
        assert before[("vhostni_scrape_stale", ())] == 0
        assert before[("vhostni_scanner_state", (("ni", "a"), ("scanner", "syns"),
                                                 ("state", "running")))] == 1
        assert before[("vhostni_scanner_locked_down", (("ni", "a"), ("scanner", "syns")))] == 1
        for name in ("a", "b"):
            drv = VirtioNetDriver.connect(os.path.join(workdir, f"{name}.sock"), ack_all=True)
            drv.post_rx_buffers(128, 2048)
            drivers.append(drv)
        a, b = drivers
        n = 20
        for i in range(n):
            a.reclaim_tx()
            a.send_frame(tcp_frame(payload=b"x" * 10, sport=41000 + i))
        a.reclaim_tx()
        a.send_frame(tcp_frame(flags=TCP_SYN, sport=42000))            # held, passed
        a.reclaim_tx()
        a.send_frame(tcp_frame(src_ip="10.9.9.9", sport=43000))        # spoofed: dropped
        got = b.recv_frames(timeout=5, count=n + 1)
        assert len(got) == n + 1

        def grown():
            s = _scrape(url)
            return s if s[("vhostni_ni_frames_total", (("direction", "in"), ("ni", "a")))] >= n + 2 \
                else None
        after = wait_until(grown, 10, "the counters to show the traffic")
        assert after[("vhostni_ni_frames_total", (("direction", "out"), ("ni", "b")))] >= n + 1
        assert after[("vhostni_ni_bytes_total", (("direction", "in"), ("ni", "a")))] > \
            before.get(("vhostni_ni_bytes_total", (("direction", "in"), ("ni", "a"))), 0)
        assert after[("vhostni_ni_drops_total", (("ni", "a"), ("reason", "spoofed")))] == 1
        assert after[("vhostni_ni_held_total", (("ni", "a"),))] == 1
        assert after[("vhostni_ni_held_passed_total", (("ni", "a"),))] == 1
        assert after[("vhostni_scanner_decisions_total", (("ni", "a"), ("scanner", "syns")))] == 1
        assert after[("vhostni_ni_connected", (("ni", "b"),))] == 1
        assert after[("vhostni_alerts_total", ())] >= 1
    finally:
        for drv in drivers:
            drv.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == 0, open(log_path).read()


def test_bad_metrics_address_is_a_clear_error(workdir):
    r = subprocess.run([sys.executable, "-m", "vhostni", "run", "--ni", f"a={workdir}/a.sock",
                        "--alert-log", f"{workdir}/al", "--metrics", "127.0.0.1:9100"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "expected tcp:HOST:PORT" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_stranger_cannot_exhaust_the_endpoint():
    """Connections that send nothing are bounded in number (more are closed at once) and in
    time; a scrape still gets through afterwards, and tight scraping shares snapshots."""
    import socket as sk
    from vhostni import metrics

    class FakeDaemon:
        calls = 0

        def call_soon(self, fn):
            fn()

        def stats(self):
            FakeDaemon.calls += 1
            return {"alerts": 0, "nis": {}}

    srv = metrics.MetricsServer(FakeDaemon(), "tcp:127.0.0.1:0")
    try:
        host, port = srv.address
        idle = [sk.create_connection((host, port)) for _ in range(metrics.MAX_CLIENTS + 20)]
        wait_until(lambda: srv.server.refused >= 20, 5, "connections past the cap refused")
        import threading as th
        assert sum(t.name.startswith("Thread") for t in th.enumerate()) <= metrics.MAX_CLIENTS + 2
        # the idle ones still open: their deadline frees the slots (slowloris)
        text = wait_until(lambda: _try_scrape(f"http://{host}:{port}/metrics"),
                          metrics.CLIENT_TIMEOUT_S + 10, "a scrape once the idle ones timed out")
        for c in idle:
            c.close()
        assert "vhostni_alerts_total" in text
        for _ in range(20):
            _try_scrape(f"http://{host}:{port}/metrics")
        assert FakeDaemon.calls <= 3
    finally:
        srv.close()


def test_clients_that_trickle_bytes_free_their_slot_by_a_deadline(monkeypatch):
    """A byte every second renews the per-read timeout forever: MAX_CLIENTS such peers held
    every slot and no scrape got through. Each connection now has a deadline in all."""
    import socket as sk
    import time
    from vhostni import metrics
    monkeypatch.setattr(metrics, "CLIENT_DEADLINE_S", 3.0)

    class FakeDaemon:
        def call_soon(self, fn):
            fn()

        def stats(self):
            return {"alerts": 0, "nis": {}}

    srv = metrics.MetricsServer(FakeDaemon(), "tcp:127.0.0.1:0")
    try:
        host, port = srv.address
        slow = [sk.create_connection((host, port)) for _ in range(metrics.MAX_CLIENTS)]
        for c in slow:
            c.sendall(b"GET /metrics HTTP/1.1\r\n")
        t0, closed = time.monotonic(), set()
        while time.monotonic() - t0 < 8 and len(closed) < len(slow):
            for i, c in enumerate(slow):
                if i in closed:
                    continue
                try:
                    c.sendall(b"X-A: b\r\n")                  # a header line a second
                except OSError:
                    closed.add(i)
            time.sleep(1.0)
        assert len(closed) == len(slow), f"{len(slow) - len(closed)} trickling clients still held a slot after 8 s"
        assert "vhostni_alerts_total" in wait_until(lambda: _try_scrape(f"http://{host}:{port}/metrics"),
                                                    5, "a scrape after the deadline")
        for c in slow:
            c.close()
    finally:
        srv.close()


def _try_scrape(url):
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.read().decode()
    except OSError:
        return None
