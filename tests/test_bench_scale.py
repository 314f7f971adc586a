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
