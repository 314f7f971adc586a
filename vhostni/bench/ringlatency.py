"""What holding a SYN for a scanner on a ring adds to its way through the NI: ``--only ringlatency``.

The C switch with two sink ports (the guest's NI and the network); one TCP SYN at a time
goes in from the guest and the clock stops when it comes out on the network's side.  The
feeder then waits in the switch's own loop (``vn_switch_step``: asleep in epoll until a
scanner kicks), as the daemon does.  Three configurations, alternated:

* ``plain``: no policy;
* ``ring-c``: the guest's NI holds every SYN on a ring served by the null scanner in C
  (vhostni/bench/ringnull.c);
* ``ring-py``: the same ring served by the SDK's null scanner (scanners/null.py, which reads
  its frames in batches and decides them on the ring), started with a minimal stand-in for
  the NI kernel's socket (hello, and ok to its requests): the SDK's real code path.

Figures: the median and 90th percentile of the time through the NI per configuration; the
ring's cost is the difference to ``plain``.  Nothing is pinned: the scanner runs wherever the
system puts it, as a sandboxed scanner does.
"""
from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .ringstreams import ROOT, build_scanner
from .streams import SYN, Frames

NULL_PY = ROOT / "scanners" / "null.py"


@dataclass
class RingLatencyConfig:
    n: int = 2000
    rounds: int = 3


class _FakeKernel(threading.Thread):
    """The kernel's side of the scanner's socket: the hello, then ok to every request and
    an answer to nothing else (the ring carries the frames)."""

    def __init__(self):
        super().__init__(daemon=True)
        from ..scanner import wire
        self.wire = wire
        self.sock, self.child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.send(wire.encode_hello("null", "bench", {"match": {"direction": "from_guest", "proto": "tcp",
                                                                    "tcp_flags": "syn,!ack"}}, [], []))
        self.ring_asked = threading.Event()

    def run(self) -> None:
        w = self.wire
        while True:
            try:
                data = self.sock.recv(w.MAX_MESSAGE)
            except OSError:
                return
            if not data:
                return
            msg = w.decode(data)
            if isinstance(msg, w.Control) and "id" in msg.body and msg.body.get("op") != "synced":
                if msg.body.get("op") == "ring":
                    self.ring_asked.set()
                self.sock.send(w.encode_control({"op": "reply", "id": msg.body["id"], "ok": True}))


def measure(config: str, cfg: RingLatencyConfig, c_scanner: Path) -> dict:
    from ..fastpath import Switch
    from ..policy import parse_match, parse_policy
    fr = Frames()
    sw = Switch()
    g, net = sw.add_sink_port(), sw.add_sink_port()
    net.sink_discard()
    proc = kern = None
    try:
        if config != "plain":
            slot = sw.ring_open(g.index)
            info = sw.ring_info(g.index, slot)
            fds = [info["ni_fd"], info["sc_fd"], info["kick_scanner_fd"], info["kick_ni_fd"]]
            env = {"VHOSTNI_RING_FDS": ",".join(map(str, fds)), "PATH": os.environ.get("PATH", "")}
            if config == "ring-c":
                proc = subprocess.Popen([str(c_scanner)], stdin=subprocess.PIPE, pass_fds=fds, env=env)
            else:
                kern = _FakeKernel()
                env.update(VHOSTNI_SCANNER_FD=str(kern.child.fileno()), PYTHONPATH=str(ROOT))
                proc = subprocess.Popen([sys.executable, str(NULL_PY)], stdin=subprocess.PIPE,
                                        pass_fds=fds + [kern.child.fileno()], env=env)
                kern.child.close()
                kern.start()
                if not kern.ring_asked.wait(30):
                    raise RuntimeError("the SDK's null scanner never asked for its ring")
                time.sleep(0.3)            # its subscription request, answered
            pol = parse_policy({"ni": {"anti_spoof": False, "hold_timeout_ms": 5000, "default_decision": "cut"}})
            m = parse_match("bench", {"direction": "from_guest", "proto": "tcp", "tcp_flags": "syn,!ack"})
            g.set_policy(pol.compile([(m, True)], sub_rings=[slot + 1]))
        from ..fastpath import lib
        st = lib.vn_port_stats(sw._sw, net.index)     # the counters themselves: cheap to read
        lat = []
        for i in range(cfg.n):
            syn = fr.tcp(True, 20000 + i % 40000, 80, 1000 + i, 0, SYN)
            before = st.out_frames
            t0 = time.perf_counter()
            g.inject_batch(syn, [len(syn)])
            while st.out_frames == before:
                sw.step(100)
                if time.perf_counter() - t0 > 5:
                    raise RuntimeError(f"{config}: a SYN never came through")
            lat.append(time.perf_counter() - t0)
        lat.sort()
        return {"config": config, "n": len(lat), "median_us": statistics.median(lat) * 1e6,
                "p90_us": lat[int(len(lat) * 0.9)] * 1e6}
    finally:
        if proc is not None:
            proc.stdin.close()
            proc.kill()
            proc.wait()
        if kern is not None:
            kern.sock.close()
        sw.close()


def run_ring_latency(cfg: RingLatencyConfig, progress: Callable[[str], None] = print) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="vni-ringlat-"))
    try:
        c_scanner = build_scanner(tmp)
        runs: dict[str, list[dict]] = {"plain": [], "ring-c": [], "ring-py": []}
        order = list(runs)
        for r in range(cfg.rounds):
            for config in order[r % 3:] + order[:r % 3]:
                res = measure(config, cfg, c_scanner)
                runs[config].append(res)
                progress(f"  {config:8s} round {r + 1}/{cfg.rounds}: median {res['median_us']:.1f} us, "
                         f"p90 {res['p90_us']:.1f} us")
        med = {k: statistics.median(x["median_us"] for x in v) for k, v in runs.items()}
        return {"method": __doc__.strip().split("\n\n", 1)[1].strip(), "config": cfg.__dict__, "runs": runs,
                "median_us": med, "added_us": {k: med[k] - med["plain"] for k in ("ring-c", "ring-py")}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
