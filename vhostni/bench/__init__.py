"""Benchmarks of vhostni against a baseline, on this machine, in one invocation.

``python3 -m vhostni.bench --out bench/out/results.json`` runs

* the **frame loop** (:mod:`vhostni.bench.frameloop`): one ``dpdk-testpmd`` with two virtio-user ports loops
  64- and 1518-byte frames through the backend under test -- DPDK's own vhost PMD (baseline) or ``vhostni
  run`` -- alternating the two, several runs each, and reports frames/s (medians, spread, ratio);
* **guest TCP throughput** (:mod:`vhostni.bench.guest_tcp`): iperf3 between two QEMU (TCG) guests joined by
  vhostni, against the same guests on taps on a Linux bridge.

A part that cannot run here (no testpmd, no vhostni, no guest images) is reported with the reason instead of a
number.  Results go to JSON (``--out``) and a table on stdout; per-process logs to ``--logdir``.
"""
