"""The soak tool (``make soak``, vhostni/bench/soak.py), briefly: it runs a daemon with scanners under
checked traffic and writes samples of the daemon's and the scanners' RSS and fds (no timing asserted)."""
import csv
import json
import subprocess
import sys

from vhostni.bench.soak import slope_per_min, summarize


def test_soak_tool_produces_samples(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, "-m", "vhostni.bench.soak", "--seconds", "10", "--interval", "1",
                        "--kill-every", "4", "--admin-every", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    assert report["error"] is None
    samples = report["samples"]
    assert len(samples) >= 3
    assert all(s["daemon_rss_kb"] > 0 and s["daemon_fds"] > 0 for s in samples)
    assert {"codered", "stream"} <= set(samples[-1]["scanners"])
    t = report["summary"]["traffic"]
    assert t["rounds"] > 0 and t["syns_sent"] > t["lost_syns"] and t["stream_bytes_sent"] > t["lost_bytes"]
    assert t["admin_sessions"] >= 1 and t["scanner_kills"] >= 1
    assert report["summary"]["daemon_rss_kb"]["last"] > 0
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert len(rows) == len(samples) and int(rows[-1]["daemon_rss_kb"]) > 0


def test_summary_slope():
    assert slope_per_min([(0, 100), (60, 160), (120, 220)]) == 60.0
    assert slope_per_min([(0, 5)]) == 0.0
    samples = [{"t": t, "daemon_rss_kb": 1000 + (t if t < 50 else 50), "daemon_fds": 20, "scanners": {}}
               for t in range(0, 101, 10)]
    s = summarize(samples)
    assert s["daemon_rss_kb"]["slope_last_half_per_min"] == 0.0 and s["daemon_rss_kb"]["first"] == 1000
