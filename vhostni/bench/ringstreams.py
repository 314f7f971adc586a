"""Stream bytes held for a scanner on a ring, fed from C (issue 11): ``--only ringstreams``.

The C switch with two sink ports that count and keep nothing (the guest's NI and the
network), fed by ``vn_port_inject_batch`` with a synthetic capture built in memory:
``connections`` TCP connections of ``bytes_per_connection`` payload bytes each, in ``mss``
segments, even ones uploading and odd ones downloading.  The capture goes in rounds: each
round every connection sends ``per_round`` segments and acknowledges the previous round,
so Python runs once per round (a few calls), not per frame.  Two configurations, alternated
in the same invocation:

* ``plain``: no policy, the switch forwards;
* ``ring-c``: the guest's NI holds every connection's bytes both ways on a scanner ring,
  served by a null scanner in C (vhostni/bench/ringnull.c) that passes each chunk as it
  reads it; after each round the feeder waits (in the switch's own loop, asleep until the
  scanner kicks) until everything the round held was passed and sent on, so ACKs never
  overtake held bytes.  Everything, the scanner included, is pinned to one CPU: it is a
  per-core figure.

The figure is payload bytes per second of wall time, in Gbit/s; each run checks that every
data segment was sent on (``tcp_released_segments``) and that the ring neither dropped a
connection nor ran full.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .streams import ACK, PSH, Conn, Frames

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@dataclass
class RingStreamsConfig:
    connections: int = 16
    bytes_per_connection: int = 4 << 20
    mss: int = 1448
    per_round: int = 4
    runs: int = 3
    cpu: Optional[int] = 0


def build(cfg: RingStreamsConfig):
    """(handshake batches, rounds, closing batches, payload bytes, data segments); a batch is
    (port, frames bytes, lengths) with port 0 the guest's NI and 1 the network."""
    fr = Frames()
    chunk = bytes((i * 7 + 3) & 0xFF for i in range(cfg.mss))
    conns = [Conn(fr, 30000 + i, 5001) for i in range(cfg.connections)]

    def batches(frames_by_port):
        return [(p, b"".join(fs), [len(f) for f in fs]) for p, fs in enumerate(frames_by_port) if fs]

    opening = []
    for c in conns:
        syn, synack, ack = c.open()
        opening += batches([[syn], []]) + batches([[], [synack]]) + batches([[ack], []])
    left = [cfg.bytes_per_connection] * cfg.connections
    rounds, segs = [], 0
    owed_ack = [False] * cfg.connections
    while any(left) or any(owed_ack):
        by_port: list[list[bytes]] = [[], []]
        for i, c in enumerate(conns):
            up = i % 2 == 0
            if owed_ack[i]:                    # the receiver acknowledges the last round
                by_port[1 if up else 0].append(c.seg(not up, ACK))
                owed_ack[i] = False
            for _ in range(cfg.per_round):
                if not left[i]:
                    break
                n = min(cfg.mss, left[i])
                by_port[0 if up else 1].append(c.seg(up, ACK | PSH, chunk[:n]))
                left[i] -= n
                segs += 1
                owed_ack[i] = True
        rounds.append(batches(by_port))
    closing = []
    for c in conns:
        fin1, fin2, last = c.close()
        closing += batches([[fin1], []]) + batches([[], [fin2]]) + batches([[last], []])
    return opening, rounds, closing, cfg.connections * cfg.bytes_per_connection, segs


def build_scanner(out: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (apt-get install gcc)")
    exe = out / "ringnull"
    subprocess.run([cc, "-O2", "-Wall", "-o", str(exe), str(HERE / "ringnull.c"), f"-I{ROOT / 'csrc'}"],
                   check=True, capture_output=True)
    return exe


def measure(config: str, capture, scanner: Optional[Path]) -> dict:
    from ..fastpath import Switch
    from ..policy import StreamMatch, parse_policy
    opening, rounds, closing, payload, segs = capture
    sw = Switch()
    ports = [sw.add_sink_port(), sw.add_sink_port()]
    for p in ports:
        p.sink_discard()
    proc = None
    slot = None
    try:
        if config == "ring-c":
            slot = sw.ring_open(ports[0].index, 4096, 4096, 16 << 20)
            info = sw.ring_info(ports[0].index, slot)
            fds = [info["ni_fd"], info["sc_fd"], info["kick_scanner_fd"], info["kick_ni_fd"]]
            proc = subprocess.Popen([str(scanner)], stdin=subprocess.PIPE, pass_fds=fds,
                                    env={"VHOSTNI_RING_FDS": ",".join(map(str, fds))})
            pol = parse_policy({"ni": {"anti_spoof": False, "hold_timeout_ms": 10000,
                                       "default_decision": "cut", "tcp_bytes_max": 1 << 30}})
            ports[0].set_policy(pol.compile([], [(StreamMatch((0, 65535), 0), True)],
                                            stream_sub_rings=[slot + 1]))
        g = ports[0]

        def feed(batch_list, wait: bool):
            for port, buf, lens in batch_list:
                ports[port].inject_batch(buf, lens)
            if wait:                    # one counter at a time: the whole stats dict per
                while g.stat("tcp_released_segments") < g.stat("tcp_held_segments"):
                    sw.step(100)        # look costs as much as a round's NI work

        ring = config != "plain"
        feed(opening, ring)
        t0 = time.perf_counter()
        for r in rounds:
            feed(r, ring)
        dt = time.perf_counter() - t0
        feed(closing, ring)
        st = g.stats()
        out = {"config": config, "seconds": dt, "gbit_s": payload * 8 / dt / 1e9,
               "payload_bytes": payload, "segments": segs,
               "delivered_frames": ports[0].stats()["out_frames"] + ports[1].stats()["out_frames"]}
        if ring:
            ri = sw.ring_info(g.index, slot)
            out.update(held_segments=st["tcp_held_segments"], released_segments=st["tcp_released_segments"],
                       ring_stream_bytes=st["ring_stream_bytes"], ring_full=ri["ring_full"],
                       streams_lost=st["ring_streams_lost"], stale=ri["stale"], broken=ri["broken"])
            out["ok"] = (st["tcp_released_segments"] == st["tcp_held_segments"] >= segs
                         and st["ring_streams_lost"] == 0 and ri["broken"] == 0
                         and st["ring_stream_bytes"] >= payload)
        else:
            out["ok"] = out["delivered_frames"] >= segs
        return out
    finally:
        if proc is not None:
            proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        sw.close()


def run_ring_streams(cfg: RingStreamsConfig, progress: Callable[[str], None] = print) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="vni-ringstreams-"))
    old = os.sched_getaffinity(0)
    try:
        scanner = build_scanner(tmp)
        capture = build(cfg)
        if cfg.cpu is not None:
            os.sched_setaffinity(0, {cfg.cpu})
        runs: dict[str, list[dict]] = {"plain": [], "ring-c": []}
        for i in range(cfg.runs):
            for config in (("plain", "ring-c") if i % 2 == 0 else ("ring-c", "plain")):
                r = measure(config, capture, scanner)
                runs[config].append(r)
                progress(f"  {config:7s} run {i + 1}/{cfg.runs}: {r['gbit_s']:.2f} Gbit/s of payload"
                         f"{'' if r['ok'] else '  NOT OK: ' + repr(r)}")
        med = {k: statistics.median(r["gbit_s"] for r in v) for k, v in runs.items() if v}
        return {"method": __doc__.strip().split("\n\n", 1)[1].strip(), "config": cfg.__dict__,
                "runs": runs, "gbit_s_median": med,
                "ratio_ring_to_plain": med["ring-c"] / med["plain"] if med.get("plain") else None,
                "ok": all(r["ok"] for v in runs.values() for r in v)}
    finally:
        os.sched_setaffinity(0, old)
        shutil.rmtree(tmp, ignore_errors=True)
