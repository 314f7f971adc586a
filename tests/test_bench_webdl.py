"""`python3 -m vhostni.bench --only webdl`: the web-download scanner's figures, run tiny (a smoke test).
No timing thresholds: the JSON's shape, no evasion through, no clean download damaged, every latency positive."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_webdl_smoke(tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "vhostni.bench", "--only", "webdl", "--out", str(out),
           "--webdl-rounds", "1", "--webdl-downloads", "2"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    sec = json.loads(out.read_text())["webdl"]
    assert sec["status"] == "ran", sec
    assert sec["evasions"]["cases"] == 502 and sec["evasions"]["reached_guest"] == 0
    assert sum(sec["evasions"]["stopped_as"].values()) == 502
    assert sec["clean"]["downloads"] == 7 and sec["clean"]["damaged"] == []
    for kind, e in sec["latency_us"]["webdl"].items():
        assert e["n"] == 1 and e["median"] > 0, kind
    assert "HTTP Evader deliveries of EICAR reaching the guest: 0/502" in r.stdout
