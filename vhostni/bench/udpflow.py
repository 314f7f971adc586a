"""What the worm scanner costs one established UDP flow, host-side: ``python3 -m vhostni.bench.udpflow``.

One UDP flow (same 5-tuple) of ``count`` datagrams from guest a to b goes through one NI in the offline-replay
harness (vhostni.replay: the C switch, the NI kernel and the sandboxed scanner process, as in the daemon, with
sink ports instead of virtio rings), one datagram at a time (lockstep), under

* ``plain``: no scanner: the C path alone;
* ``codered``: examples/codered.toml: the worm scanner holds a UDP datagram only if it opens its flow
  (``flow = "new"``): the first;
* ``codered_every``: the same with ``hold_established = true``: every datagram held (the scanner before
  ``flow = "new"``).

A DNS query and answer for b's address come first, so b is a known destination and every decision is a pass.
Per configuration: the NI's ``held`` counter and the scanner's ``decisions`` (datagrams that waited for it),
and the time from handing a datagram to the switch to its delivery on the far port (median, p90, over
``count``); each round measures every configuration once, in a rotating order, and ratios are against
``plain`` of the same round (the median over rounds).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from .scanners import ADDR_A, ADDR_B, MAC_A, MAC_B, REPO, ScannerBenchConfig, _ipv4_frame, _mac, dns_frames, \
    policy_doc

CONFIGS = ("plain", "codered", "codered_every")
NAME = "udp.bench.test"


def udp_datagram(i: int, sport: int = 41000, dport: int = 4433, size: int = 200) -> bytes:
    """Datagram ``i`` of the one flow a:sport -> b:dport, checksum correct."""
    payload = i.to_bytes(4, "big") + b"u" * (size - 4)
    l4 = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + (8 + len(payload)).to_bytes(2, "big") + b"\0\0" \
        + payload
    return _ipv4_frame(MAC_A, MAC_B, ADDR_A, ADDR_B, 17, l4)


def _policy(config: str) -> dict:
    doc = policy_doc("plain" if config == "plain" else "codered", ScannerBenchConfig())
    if config == "codered_every":
        for sc in doc["scanner"]:
            sc.setdefault("config", {})["hold_established"] = True
            # the rights the scanner before flow = "new" had: every UDP datagram and ICMP message
            sc["allow"] = [{k: v for k, v in a.items() if k != "flow"} for a in sc["allow"]]
    return doc


def _decisions(summary: dict) -> int:
    return sum(s.get("decisions", 0) for s in summary.get("scanners", {}).values())


def measure(config: str, count: int) -> dict:
    """``count`` datagrams of one flow through the NI under ``config``: per-datagram seconds and counters."""
    from vhostni.policy import parse_policy
    from vhostni.replay import Replay
    pol = parse_policy(_policy(config), base=str(REPO), source=f"bench:udpflow:{config}")
    delivered: list[float] = []

    def on_frame(_ts: int, frame: bytes, _direction: int) -> None:
        if len(frame) > 37 and frame[23] == 17 and frame[36:38] == (4433).to_bytes(2, "big"):
            delivered.append(time.perf_counter())

    ops, lost = [], 0
    with Replay(_mac(MAC_A), pol, ni="a", on_frame=on_frame, sync_timeout=10.0) as r:
        r.start()
        for frame in dns_frames(NAME, [ADDR_B]):
            r.feed(time.time_ns(), frame)
        held0, decided0 = r.guest.stats()["held"], _decisions(r.summary())
        for i in range(count):
            frame = udp_datagram(i)
            k = len(delivered)
            t0 = time.perf_counter()
            r.feed(time.time_ns(), frame)
            if len(delivered) > k:
                ops.append(delivered[k] - t0)
            else:
                lost += 1
        held = r.guest.stats()["held"] - held0
        r.finish()
        summary = r.summary()
    ops.sort()
    us = [x * 1e6 for x in ops]
    return {"n": len(ops), "lost": lost, "held": held,
            "decisions": _decisions(summary) - decided0,
            "median_us": statistics.median(us) if us else None,
            "p90_us": us[int(0.9 * (len(us) - 1))] if us else None,
            "mean_us": statistics.fmean(us) if us else None}


def run(count: int = 2000, rounds: int = 3, configs=CONFIGS, progress=print) -> dict:
    blocks = []
    for r in range(rounds):
        k = r % len(configs)
        for config in list(configs[k:]) + list(configs[:k]):
            m = measure(config, count)
            blocks.append({"round": r, "config": config, **m})
            progress(f"  round {r + 1}/{rounds} {config:13s} {m['n']} datagrams: held {m['held']}, "
                     f"median {m['median_us']:.0f} us, p90 {m['p90_us']:.0f} us (lost {m['lost']})")
    out: dict = {"count": count, "rounds": rounds, "blocks": blocks, "configs": {}}
    for config in configs:
        mine = [b for b in blocks if b["config"] == config]
        ratios = []
        for b in mine:
            base = next((p for p in blocks if p["config"] == "plain" and p["round"] == b["round"]), None)
            if base and base["median_us"]:
                ratios.append(b["median_us"] / base["median_us"])
        out["configs"][config] = {
            "held": [b["held"] for b in mine], "decisions": [b["decisions"] for b in mine],
            "median_us": statistics.median(b["median_us"] for b in mine),
            "p90_us": statistics.median(b["p90_us"] for b in mine),
            "ratio_to_plain": statistics.median(ratios) if ratios else None}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m vhostni.bench.udpflow", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=2000, help="datagrams in the flow")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    res = run(a.count, a.rounds)
    for config, c in res["configs"].items():
        ratio = f"{c['ratio_to_plain']:.2f}x plain" if c["ratio_to_plain"] else ""
        print(f"{config:13s} held {c['held']} of {a.count}: median {c['median_us']:.0f} us, "
              f"p90 {c['p90_us']:.0f} us per datagram {ratio}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
