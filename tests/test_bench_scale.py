"""`python3 -m vhostni.bench --only scale`: one daemon with many NIs whose frontends are idle, run
tiny (a smoke test).  No thresholds on CPU or time: the JSON's shape, every NI up, figures sane."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vhostni.fastpath import MAX_PORTS

REPO = Path(__file__).resolve().parent.parent


def test_the_switch_takes_256_ports():
    assert MAX_PORTS == 256


def test_bench_scale_smoke(tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "vhostni.bench", "--only", "scale", "--out", str(out),
           "--scale-counts", "1,4", "--scale-idle-seconds", "0.5", "--scale-queries", "3"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    sec = json.loads(out.read_text())["scale"]
    assert sec["status"] == "ran"
    assert [x["nis"] for x in sec["runs"]] == [1, 4]
    for x in sec["runs"]:
        assert x["startup_s"] > 0 and x["rss_kib"] > x["rss_kib_before_frontends"] * 0.5
        assert 0 <= x["idle_cpu_share"] < 1 and x["query_nis_ms"]["n"] == 3
    assert "per_ni_kib" in sec and "per NI:" in r.stdout


def test_the_last_of_256_ports_sends_and_receives():
    """Every port of a full switch is reachable: a broadcast from port 255 (its kick decoded
    from the epoll event's 8-bit port field) reaches ports 0 and 128, and port 0's answer is
    delivered to port 255 by the address it learned there."""
    from nikit import Kit, eth, ipv4, udp
    names = [f"n{i}" for i in range(MAX_PORTS)]
    k = Kit(None, names=names, connect=False)
    try:
        for n in (names[0], names[128], names[-1]):
            k.connect(n)
        last, first = bytes.fromhex("02000000ff01"), bytes.fromhex("020000000001")
        k.send(names[-1], eth(b"\xff" * 6, last, 0x0800, ipv4("10.0.0.9", "10.0.0.1", 17, udp(1, 2, b"hi"))))
        assert len(k.recv(names[0], wait=0.5)) == 1 and len(k.recv(names[128], wait=0.2)) == 1
        k.send(names[0], eth(last, first, 0x0800, ipv4("10.0.0.1", "10.0.0.9", 17, udp(2, 1, b"back"))))
        got = k.recv(names[-1], wait=0.5)
        assert len(got) == 1 and got[0].endswith(b"back") and k.recv(names[128], wait=0.2) == []
    finally:
        k.close()
