"""`python3 -m vhostni.bench --only scanners`: the scanner-overhead benchmark, run tiny (a smoke test).

No timing thresholds: this machine is shared and the guests run under TCG.  The guest test checks the JSON's
shape, that every figure is a positive number, and that the configurations really differed (SYNs held and
passed under the scanners, none held under plain forwarding).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vhostni.bench import scanners

REPO = Path(__file__).resolve().parent.parent


def test_parse_timed_loop():
    text = ("1700000000.000000 s\n1700000000.010000 t\nwget: can't connect\n1700000000.015000 FAIL\n"
            "1700000000.020000 t\n1700000000.050000 t\n")
    p = scanners.parse_timed_loop(text)
    assert p["failed"] == 1
    assert [round(x, 6) for x in p["ops_s"]] == [0.01, 0.03]
    assert round(p["total_s"], 6) == 0.05
    st = scanners._loop_stats(p)
    assert st["n"] == 2 and st["failed"] == 1 and round(st["median_ms"], 3) == 20.0
    with pytest.raises(ValueError):
        scanners.parse_timed_loop("no marks here")


def test_parse_handshakes():
    text = ("1700000000.000000 worm: seed 1 target 10.77.1.0/28 port 80 count 3 rate 20\n"
            "1700000000.100000 attempt 1 10.77.1.3:80\n1700000000.101500 connected 1 10.77.1.3:80\n"
            "1700000000.150000 attempt 2 10.77.1.9:80\n"
            "1700000000.200000 attempt 3 10.77.1.1:80\n1700000000.202000 refused 3 10.77.1.1:80\n"
            "1700000000.203000 sent 3 attempts in 0.100 s\n"
            "1700000000.210000 connected 2 10.77.1.9:80\n"
            "1700000000.220000 done: connected 2 refused 1 failed 0 pending 0\n"
            "1700000001.000000 worm: seed 2 target 10.77.1.0/28 port 80 count 2 rate 20\n"
            "1700000001.100000 attempt 1 10.77.1.4:80\n1700000001.101000 failed 1 10.77.1.4:80 No route\n"
            "1700000001.150000 attempt 2 10.77.1.5:80\n"
            "1700000006.300000 done: connected 0 refused 0 failed 1 pending 1\n")
    p = scanners.parse_handshakes(text)
    assert [round(x * 1e3, 3) for x in p["ops_s"]] == [1.5, 2.0, 60.0]
    assert p["failed"] == 2


def test_policies_fill_in_the_guest_and_absolute_programs():
    cfg = scanners.ScannerBenchConfig()
    assert scanners.policy_doc("plain", cfg).get("scanner") is None
    for name, scanner in (("null", "null"), ("codered", "codered"), ("trw", "trw"), ("synbomb", "synbomb")):
        doc = scanners.policy_doc(name, cfg)
        assert doc["ni"]["mac"] == scanners.MAC_A and doc["ni"]["addresses"] == [f"{scanners.ADDR_A}/32"]
        assert [s["name"] for s in doc["scanner"]] == [scanner]
        assert Path(doc["scanner"][0]["program"]).is_absolute() and Path(doc["scanner"][0]["program"]).exists()
    with pytest.raises(ValueError):
        scanners.policy_doc("nonsense", cfg)
    # the signatures configuration: the rules file loads as a policy would load it, every rule
    # accepted and covering a's connections to b
    from vhostni.signatures.config import parse_section
    doc = scanners.policy_doc("signatures", cfg)
    sig = parse_section(doc["signatures"], "/", [f"{scanners.ADDR_A}/32"])
    assert sig.ruleset.accepted == scanners.SIG_RULES and not sig.problems
    r = sig.ruleset.rules[0]
    assert r.matches_header("tcp", scanners.ADDR_A, 40000, scanners.ADDR_B, 5201)
    assert scanners._ready({"signatures": {"rules": scanners.SIG_RULES}}, {}, scanners.SIG_RULES)
    assert not scanners._ready({"signatures": {"rules": scanners.SIG_RULES}}, {}, 0)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


@pytest.mark.guest
def test_bench_scanners_smoke(vhostni_images, vhostni_logdir, tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "vhostni.bench", "--only", "scanners", "--out", str(out),
           "--logdir", str(vhostni_logdir / "bench-scanners"), "--images", str(vhostni_images.kernel.parent),
           "--scanner-rounds", "1", "--scanner-count", "3", "--scanner-iperf-rounds", "1",
           "--scanner-iperf-seconds", "1", "--scanner-wait-quiet", "0", "--scanner-hold-rounds", "1",
           "--scanner-hold-count", "20"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    sec = json.loads(out.read_text())["scanners"]
    assert sec["status"].startswith("ran"), sec["status"]
    assert "TCP handshake" in r.stdout and "codered/plain" in r.stdout, r.stdout[-2000:]

    assert list(sec["configs"]) == list(scanners.CONFIGS)
    for name, e in sec["configs"].items():
        for key in ("hold_us", "handshake_ms", "connect_ms", "dns_ms", "ping_ms", "spawn_ms", "iperf3_gbit_s"):
            assert e[key]["n"] >= 1 and _positive(e[key]["median"]), (name, key, e[key])
    for name in scanners.CONFIGS[1:]:
        for key, v in sec["ratios_to_plain"][name].items():
            assert _positive(v), (name, key, v)
        for key, v in sec["paired_ratios_to_plain"][name].items():
            assert _positive(v), (name, key, v)

    blocks = sec["blocks"]
    assert {(b["phase"], b["config"]) for b in blocks} == {
        (p, c) for p in ("hold", "latency", "throughput") for c in scanners.CONFIGS}
    for b in blocks:
        if b["phase"] == "hold":
            h = b["metrics"]["hold"]
            assert h["n"] == 20 and h["failed"] == 0 and _positive(h["median_us"]), h
            scanners_seen = h["replay"]["scanners"]
            assert list(scanners_seen) == ([] if b["config"] in ("plain", "signatures") else [b["config"]]), \
                scanners_seen
            continue
        assert b["counters"]["held_cut"] == 0, b["counters"]           # no connection was refused
        if b["config"] == "plain":
            assert b["scanners"] == {} and b["counters"]["held"] == 0, b
        elif b["config"] == "signatures":            # the stage scans what a sends, no scanner
            assert b["scanners"] == {} and b["counters"]["sig_dropped"] == 0, b
            if b["phase"] == "throughput":
                assert b["counters"]["sig_stream_bytes"] > 1_000_000, b["counters"]
        else:
            sc = b["scanners"][b["config"]]
            assert sc["state"] == "running" and sc["locked_down"], sc
            if b["config"] == "null_stream":       # holds iperf3's bytes, not SYNs
                if b["phase"] == "throughput":
                    assert b["counters"]["tcp_held_segments"] > 0, b["counters"]
                    assert b["counters"]["tcp_released_segments"] > 0, b["counters"]
            else:
                assert b["counters"]["held"] > 0 and b["counters"]["held_passed"] > 0, b["counters"]
        if b["phase"] == "latency":
            for key in ("handshake", "connect"):
                lat = b["metrics"][key]
                assert lat["n"] == 3 and lat["failed"] == 0 and all(_positive(x) for x in lat["ops_ms"]), lat
    assert sec["policies"]["codered"]["ni"]["mac"] == scanners.MAC_A
    assert sec["paper"]["dns_ms"]["codered"] == 2.9
