"""Shared pieces of the replay-harness benchmarks (:mod:`.httpguard`, :mod:`.webdl`).

Both feed synthetic TCP captures to :mod:`vhostni.replay` (the C switch with sink ports, the NI kernel and the
scanner as a sandboxed process), time the last byte of each capture's request or response to its delivery, run
``plain`` and the policy in alternating order per round, and report the median over rounds.  One copy here keeps
the two benchmarks measuring the same way.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

from .frameloop import summarize
from .scanners import _reraise_interrupt
from .streams import MAC_G, _mac, _Pinned, _payload


def replay(pol, ni: str, captures: list, cpu: Optional[int], timed: bool, collect: Callable[[bytes], None],
           ends: Optional[Callable[[bytes, bytes], bool]] = None) -> tuple[list, list]:
    """Feeds the captures (frames, index of the last request/response segment, base) one after another to a
    :class:`vhostni.replay.Replay` with the parsed policy ``pol``; ``collect(frame)`` sees every delivered frame.
    If ``timed``, waits (up to 10 s) after each capture's last segment for a delivered frame ``x`` with
    ``ends(x, payload of that segment)`` (default: the same payload).  Returns the latencies (s) and the alerts."""
    from vhostni.replay import Replay
    if ends is None:
        def ends(x: bytes, tail: bytes) -> bool:
            return _payload(x) == tail
    seen: list = []
    alerts: list = []

    def on_frame(_ts, f, _d):
        seen.append((time.perf_counter(), f))
        collect(f)

    lat: list = []
    with _Pinned(cpu):
        with Replay(_mac(MAC_G), pol, ni=ni, on_frame=on_frame, on_alert=alerts.append) as r:
            r.start()
            k = 0
            for frames, last, _base in captures:
                for j, f in enumerate(frames):
                    mark = len(seen)
                    t0 = time.perf_counter()
                    r.feed(k, f)
                    k += 1
                    if j != last or not timed:
                        continue
                    tail = _payload(f)
                    deadline = t0 + 10.0
                    while not any(ends(x, tail) for _, x in seen[mark:]) and time.perf_counter() < deadline:
                        r._pump(0.002)
                    hit = [t for t, x in seen[mark:] if ends(x, tail)]
                    if hit:
                        lat.append(hit[0] - t0)
            r.finish()
    return lat, alerts


def stream(pieces: dict, base: int) -> bytes:
    """The contiguous bytes from sequence ``base`` in ``pieces`` ({seq: payload})."""
    out, at = bytearray(), base
    while at in pieces and pieces[at]:
        out += pieces[at]
        at += len(pieces[at])
    return bytes(out)


def latency_rounds(name: str, width: int, rounds: int, kinds: dict, n: int, make_caps: Callable[[object], list],
                   run: Callable[[str, list], list], progress: Callable[[str], None],
                   skip: Callable[[str, str], bool] = lambda c, kind: False) -> tuple[list, int]:
    """``rounds`` rounds of ``plain`` and ``name`` in alternating order, per kind ``n`` captures from
    ``make_caps(kinds[kind])`` timed by ``run(config, captures)`` (the latencies, s).  Returns the blocks and
    the number of failures (a run that raised, a round with a capture that was not released)."""
    blocks: list = []
    failures = 0
    for r in range(rounds):
        for c in (("plain", name) if r % 2 == 0 else (name, "plain")):
            for kind, item in kinds.items():
                if skip(c, kind):
                    continue
                caps = make_caps(item)
                try:
                    lat = run(c, caps)
                except Exception as exc:  # noqa: BLE001 - a failed run is a result
                    _reraise_interrupt(exc)
                    blocks.append({"round": r, "config": c, "kind": kind, "error": str(exc)[-500:]})
                    failures += 1
                    continue
                us = sorted(x * 1e6 for x in lat)
                m = {"n": len(us), "lost": n - len(us)}
                if us:
                    m["median_us"] = statistics.median(us)
                failures += m["lost"] > 0
                blocks.append({"round": r, "config": c, "kind": kind, "metrics": m})
                progress(f"  {name} round {r + 1}/{rounds} {c:{width}s} {kind:18s} "
                         + (f"median {m['median_us']:.0f} us (n={m['n']})" if us else "nothing released"))
    return blocks, failures


def summarize_latency(section: dict, name: str, kinds, blocks: list) -> None:
    """Sets ``section``'s blocks, latency_us (per config and kind, over the rounds' medians) and added_us."""
    section["blocks"] = blocks
    lat: dict = {}
    for c in ("plain", name):
        for kind in kinds:
            lat.setdefault(c, {})[kind] = summarize([b["metrics"]["median_us"] for b in blocks
                                                     if b.get("metrics", {}).get("median_us") is not None
                                                     and b["config"] == c and b["kind"] == kind])
    section["latency_us"] = lat
    section["added_us"] = {k: lat[name][k]["median"] - lat["plain"][k]["median"]
                           if lat[name][k].get("n") and lat["plain"][k].get("n") else None for k in kinds}


def latency_lines(sec: dict, name: str) -> list[str]:
    """The report's per-kind lines: plain, ``name``, and the latency ``name`` adds."""
    lat, lines = sec["latency_us"], []

    def u(e):
        return f"{e['median']:9.0f} us" if e.get("n") else "-"
    for kind in lat.get(name, {}):
        add = sec["added_us"].get(kind)
        lines.append(f"  {kind:18s} plain {u(lat['plain'].get(kind, {})):>12s}  {name} {u(lat[name][kind]):>12s}  "
                     + (f"{add / 1e3:+.2f} ms" if add is not None else ""))
    return lines
