"""`python3 -m vhostni.bench --only streams`: stream reassembly throughput and the e-mail scanner's latency,
run tiny (a smoke test).  No timing thresholds: the JSON's shape, every figure positive, all payload through."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from vhostni.bench import streams

REPO = Path(__file__).resolve().parent.parent


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def test_synthetic_capture_carries_the_payload():
    frames, payload = streams.bulk_capture(3, 5000, 1460)
    assert payload == 15000 and sum(streams._payload_len(f) for f in frames) == payload
    assert len({f[:6] for f in frames}) == 2          # guest <-> peer only
    fr = streams.Frames()
    sess, first, last = streams.smtp_session(fr, 40000, streams.email_message(3000, random.Random(1)), 1460)
    assert sess[last].endswith(b"\r\n.\r\n") and first < last


def test_bench_streams_smoke(tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "vhostni.bench", "--only", "streams", "--out", str(out),
           "--stream-rounds", "1", "--stream-connections", "2", "--stream-bytes", "30000",
           "--email-rounds", "1", "--email-messages", "2", "--email-attachment", "3000"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    sec = json.loads(out.read_text())["streams"]
    assert sec["status"] == "ran", sec["status"]
    assert "null stream scanner" in r.stdout and "e-mail scanner" in r.stdout, r.stdout[-2000:]
    for c in ("plain", "null_stream"):
        assert sec["throughput_gbit_s"][c]["n"] == 1 and _positive(sec["throughput_gbit_s"][c]["median"])
    assert _positive(sec["ratio_null_stream_to_plain"])
    for c in ("plain", "email"):
        for kind in ("text", "attachment", "infected"):
            assert _positive(sec["email_latency_us"][c][kind]["median"]), (c, kind)
    for b in sec["blocks"]:
        m = b["metrics"]
        if b["phase"] == "throughput":
            assert m["complete"] and m["delivered_payload"] == 60000, m
            assert list(m["scanners"]) == ([] if b["config"] == "plain" else ["null_stream"])
        else:
            assert m["n"] == 2 and m["lost"] == 0, m
            # under the e-mail scanner the message is held whole until its last byte is in
            assert m["held_whole"] == (2 if b["config"] == "email" or b["kind"] == "text" else 0), b
            if b["config"] == "email" and b["kind"] == "infected":
                assert any("attachment replaced" in a for a in m["alerts"]), m["alerts"]
                # the message's end left at once, not with the NI's resend of the injection
                assert m["inject_resends"] == 0, m
    assert sec["paper"]["email_ms"] == {"no_scanner": 22, "md5_scanner": 107}
