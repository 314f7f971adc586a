"""DPDK's virtio-user PMD (dpdk-testpmd) as an independent frontend of vhostni.

Two testpmd "VMs" (:class:`dpdk.Endpoint`, one virtio-user port each) sit on NI a and NI b.  Each sends an
exact number of frames and the other must receive exactly that many, in both directions.  The same test
first runs against DPDK's own vhost PMD as the backend, which proves the machinery right without vhostni.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from dpdk import BURST, Endpoint, dpdk_vhost_backend, exchange, mac, skip_reason  # tests/ is on sys.path

# Tests that run testpmd carry this; the parsing tests at the end need no DPDK.
needs_dpdk = [pytest.mark.dpdk, pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))]


def dpdk_test(f):
    for m in reversed(needs_dpdk):
        f = m(f)
    return f


BURSTS = 4          # 4 x 32 = 128 frames per direction: fits the 256-entry rings without any polling race


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="vni-dpdk-", dir="/tmp")       # short: sun_path holds 108 bytes
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def logdir() -> Path:
    d = Path(os.environ.get("VHOSTNI_TEST_LOGS", "test-logs")) / "dpdk"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _vhostni_daemon(sockdir: Path, logdir: Path, name: str, extra_args=()):
    from vhostni.testing import daemon as testing
    stats = sockdir / "stats.json"
    d = testing.VhostniDaemon({"a": sockdir / "a.sock", "b": sockdir / "b.sock"},
                              extra_args=["--stats-file", str(stats), *extra_args],
                              log_path=logdir / f"{name}.vhostni.log")
    return d, stats


def _read_stats(path: Path, want: int, timeout: float = 10.0) -> dict:
    """The daemon's stats file once NI a and b both show ``want`` frames in (it is rewritten periodically)."""
    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        try:
            last = json.loads(path.read_text())
            nis = last.get("nis", {})
            if all(nis.get(n, {}).get("in_frames", 0) >= want for n in ("a", "b")):
                return last
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    return last


def _check_both_ways(sockdir: Path, logdir: Path, tag: str, size: int) -> dict:
    with Endpoint(sockdir / "a.sock", name=f"{tag}-a", mac=mac(1), peer=mac(2), logdir=logdir) as a, \
         Endpoint(sockdir / "b.sock", name=f"{tag}-b", mac=mac(2), peer=mac(1), logdir=logdir) as b:
        counts = exchange(a, b, bursts=BURSTS, size=size)
        # Second round: by now a switch has learnt both MACs, so this is unicast, not flooding.
        again = exchange(a, b, bursts=BURSTS, size=size)
    n = BURSTS * BURST
    for c in (counts, again):
        assert c["a_sent"] == n, c
        assert c["b_rx"] == n, f"a -> b: sent {n}, received {c['b_rx']}: {c}"
        assert c["a_rx_during_a_to_b"] == 0, f"frames came back to the sender: {c}"
        assert c["b_sent"] == n, c
        assert c["a_rx"] == n, f"b -> a: sent {n}, received {c['a_rx']}: {c}"
    return {"first": counts, "second": again}


# --- the machinery, proven against DPDK's own backend ------------------------------------------------------

@dpdk_test
@pytest.mark.parametrize("size", [64, 1518])
def test_endpoints_exchange_frames_through_dpdk_vhost(sockdir, logdir, size):
    with dpdk_vhost_backend([sockdir / "a.sock", sockdir / "b.sock"], logdir=logdir,
                            name=f"dpdkvhost-{size}") as backend:
        _check_both_ways(sockdir, logdir, f"ref{size}", size)
        fwd = backend.stop_fwd()
    n = 2 * BURSTS * BURST
    assert fwd[0]["rx_packets"] == n and fwd[1]["tx_packets"] == n, fwd
    assert fwd[1]["rx_packets"] == n and fwd[0]["tx_packets"] == n, fwd


@dpdk_test
def test_endpoint_sees_nothing_without_a_peer(sockdir, logdir):
    """A frame sent into DPDK's vhost with nobody on the other port is not received anywhere."""
    with dpdk_vhost_backend([sockdir / "a.sock", sockdir / "b.sock"], logdir=logdir, name="dpdkvhost-lonely"):
        with Endpoint(sockdir / "a.sock", name="lonely-a", mac=mac(1), peer=mac(2), logdir=logdir) as a:
            assert a.send(1) == BURST
            assert a.wait_rx(1, timeout=1.0) == 0


# --- vhostni ---------------------------------------------------------------------------------------------

@dpdk_test
@pytest.mark.parametrize("size", [64, 1518])
def test_vhostni_exchanges_frames_with_virtio_user(sockdir, logdir, size):
    daemon, stats_path = _vhostni_daemon(sockdir, logdir, f"vni{size}")
    with daemon:
        _check_both_ways(sockdir, logdir, f"vni{size}", size)
        n = 2 * BURSTS * BURST
        stats = _read_stats(stats_path, n)
        assert daemon.alive, daemon.log_tail()
    nis = stats.get("nis", {})
    assert set(nis) >= {"a", "b"}, stats
    for name in ("a", "b"):
        assert nis[name]["in_frames"] == n, (name, nis[name])
        assert nis[name]["out_frames"] == n, (name, nis[name])
        assert nis[name]["protocol_errors"] == 0, (name, nis[name])
        assert not nis[name]["broken"], (name, nis[name])
    assert nis["a"]["in_bytes"] == nis["b"]["out_bytes"] == n * size, nis
    assert daemon.returncode == 0, daemon.log_tail()


@dpdk_test
def test_vhostni_survives_frontend_restart(sockdir, logdir):
    """testpmd quits and comes back on the same sockets (a VM reboot, seen from the NI): frames flow again."""
    daemon, _ = _vhostni_daemon(sockdir, logdir, "vni-restart")
    with daemon:
        for round_ in range(2):
            with Endpoint(sockdir / "a.sock", name=f"restart{round_}-a", mac=mac(1), peer=mac(2),
                          logdir=logdir) as a, \
                 Endpoint(sockdir / "b.sock", name=f"restart{round_}-b", mac=mac(2), peer=mac(1),
                          logdir=logdir) as b:
                c = exchange(a, b, bursts=2, size=64)
            assert c["b_rx"] == c["a_sent"] == 2 * BURST, (round_, c)
            assert c["a_rx"] == c["b_sent"] == 2 * BURST, (round_, c)
        assert daemon.alive, daemon.log_tail()


@dpdk_test
def test_vhostni_frame_loop_smoke(logdir):
    """The benchmark's frame loop runs against vhostni for a moment, both directions moving."""
    from vhostni.bench.backends import VhostniBackend
    from vhostni.bench.frameloop import FrameLoopConfig, measure_once
    cfg = FrameLoopConfig(duration=1.0, warmup=0.5, frontend_cpus=None, logdir=logdir)
    r = measure_once(VhostniBackend(cpus=None), 64, cfg, "smoke-loop")
    assert r["ok"], r.get("error")
    assert r["pps_a_to_b"] > 0 and r["pps_b_to_a"] > 0, r


# --- parsing (no DPDK needed) ----------------------------------------------------------------------------

PORT_STATS = """
  ######################## NIC statistics for port 0  ########################
  RX-packets: 25818624   RX-missed: 0          RX-bytes:  1652391936
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 25819648   TX-errors: 0          TX-bytes:  1652457472

  Throughput (since last show)
  Rx-pps:      3550642          Rx-bps:   1817928960
  Tx-pps:      3550629          Tx-bps:   1817922472
  ############################################################################

  ######################## NIC statistics for port 1  ########################
  RX-packets: 25818656   RX-missed: 3          RX-bytes:  1652393984
  RX-errors: 1
  RX-nombuf:  2
  TX-packets: 25819648   TX-errors: 0          TX-bytes:  1652457472

  Throughput (since last show)
  Rx-pps:      3550639          Rx-bps:   1817927336
  Tx-pps:      3550645          Tx-bps:   1817930576
  ############################################################################
"""

FWD_STATS = """
Telling cores to stop...
Waiting for lcores to finish...

  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 25999520       RX-dropped: 0             RX-total: 25999520
  TX-packets: 25998720       TX-dropped: 768           TX-total: 25999488
  ----------------------------------------------------------------------------

  ---------------------- Forward statistics for port 1  ----------------------
  RX-packets: 25999488       RX-dropped: 0             RX-total: 25999488
  TX-packets: 25998752       TX-dropped: 768           TX-total: 25999520
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 51999008       RX-dropped: 0             RX-total: 51999008
  TX-packets: 51997472       TX-dropped: 1536          TX-total: 51999008
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++
"""


def test_parse_port_stats_reads_cumulative_counters_not_rates():
    from vhostni.bench.testpmd import PortStats, parse_port_stats
    st = parse_port_stats(PORT_STATS)
    assert st[0] == PortStats(rx_packets=25818624, rx_bytes=1652391936, tx_packets=25819648,
                              tx_bytes=1652457472)
    assert st[1].rx_missed == 3 and st[1].rx_errors == 1 and st[1].rx_nombuf == 2
    assert (st[1] - st[0]).rx_packets == 32


def test_parse_fwd_stats_per_port_only():
    from vhostni.bench.testpmd import parse_fwd_stats
    fwd = parse_fwd_stats(FWD_STATS)
    assert set(fwd) == {0, 1}
    assert fwd[0]["tx_dropped"] == 768 and fwd[1]["rx_packets"] == 25999488


def test_lcores_pin_both_lcores_to_the_given_cpus():
    from vhostni.bench.testpmd import lcores_arg
    assert lcores_arg("1") == "0@1,1@1"
    assert lcores_arg("0-1") == "0@(0-1),1@(0-1)"


def test_parse_iperf3_summary_lines():
    from vhostni.bench.guest_tcp import parse_iperf3
    out = ("[  5]   9.00-10.00  sec  75.0 MBytes   629 Mbits/sec    0    221 KBytes\n"
           "- - - - - - - - - - - - - - - - - - - - - - - - -\n"
           "[ ID] Interval           Transfer     Bitrate         Retr\n"
           "[  5]   0.00-10.00  sec  1.46 GBytes  1256 Mbits/sec    3             sender\n"
           "[  5]   0.00-10.04  sec  1.46 GBytes  1.25 Gbits/sec                  receiver\n")
    r = parse_iperf3(out)
    assert r == {"sender_gbit_s": pytest.approx(1.256), "receiver_gbit_s": pytest.approx(1.25)}


def test_summarize_reports_median_and_spread():
    from vhostni.bench.frameloop import summarize
    s = summarize([1.0, 3.0, 2.0])
    assert s["median"] == 2.0 and s["min"] == 1.0 and s["max"] == 3.0 and s["spread_pct"] == 100.0
    assert summarize([]) == {"n": 0}


@dpdk_test
def test_two_worker_daemons_loop_side_by_side(logdir):
    """The workers benchmark: two daemons, each with its own frame loop, both moving frames at once."""
    from vhostni.bench.workers import WorkersConfig, measure_workers, tiny
    cfg = tiny(WorkersConfig(logdir=logdir))
    r = measure_workers(2, 64, cfg, "smoke-workers")
    assert r["ok"], r.get("error")
    assert len(r["per_worker"]) == 2 and all(w["pps_a_to_b"] > 0 and w["pps_b_to_a"] > 0
                                             for w in r["per_worker"])
    assert r["pps"] == sum(w["pps"] for w in r["per_worker"])
