"""`python3 -m vhostni.bench --only httpguard`: the HTTP overflow stage's figures, run tiny (a smoke test).
No timing thresholds: the JSON's shape, no overflow through, no normal request damaged, every latency positive."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_httpguard_smoke(tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "vhostni.bench", "--only", "httpguard", "--out", str(out),
           "--httpguard-rounds", "1", "--httpguard-requests", "2"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    sec = json.loads(out.read_text())["httpguard"]
    assert sec["status"] == "ran", sec
    ov = sec["overflows"]
    assert ov["requests"] == 16 and ov["reached_server"] == 0 and ov["through"] == []
    assert sum(ov["stopped_by"].values()) == 16 and "iis-ida-codered" in ov["stopped_by"]
    assert sec["normal"]["requests"] == 7 and sec["normal"]["damaged"] == []
    for kind, e in sec["latency_us"]["httpguard"].items():
        assert e["n"] == 1 and e["median"] > 0, kind
    assert "overflow requests reaching the server: 0/16" in r.stdout
