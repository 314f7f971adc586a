"""Benchmarks of vhostni against a baseline, on this machine, in one invocation.

``python3 -m vhostni.bench --out bench/out/results.json`` runs

* the **frame loop** (:mod:`vhostni.bench.frameloop`): one ``dpdk-testpmd`` with two virtio-user ports loops
  64- and 1518-byte frames through the backend under test -- DPDK's own vhost PMD (baseline) or ``vhostni
  run`` -- alternating the two, several runs each, and reports frames/s (medians, spread, ratio);
* **guest TCP throughput** (:mod:`vhostni.bench.guest_tcp`): iperf3 between two QEMU (TCG) guests joined by
  vhostni, against the same guests on taps on a Linux bridge.
* **scanner overheads** (:mod:`vhostni.bench.scanners`): plain forwarding against the null and Code-Red scanners;
* **streams** (:mod:`vhostni.bench.streams`): host-side replay of a synthetic capture: TCP stream reassembly
  throughput under the null stream scanner against plain forwarding, and the e-mail scanner's per-message latency;
* **webdl** (:mod:`vhostni.bench.webdl`): host-side replay under ``examples/webdl.toml``: the share of the 502
  HTTP Evader deliveries of EICAR that reach the guest, the share of clean downloads damaged, the latency added;
* **httpguard** (:mod:`vhostni.bench.httpguard`): host-side replay under ``examples/httpguard.toml``: historic
  overflow requests (Code-Red and others, delivered evasively too) that reach the guest's server, normal requests
  damaged, the latency the held request adds;
* **signatures** (:mod:`vhostni.bench.signatures`): the payload stage's matcher (csrc/sig.c) against Hyperscan's
  own stream-mode scan of the same bytes in the same process, and the compile time of 10,000 rules;
* **detectors** (:mod:`vhostni.bench.detectors`): the worm, port-scan and SYN-bomb detectors against simulated
  worms (TCP, UDP, ICMP, PTR-laundered, slow), scans, bombs and normal hosts on a fake clock: detection, share
  of probes out, false alarms (a few seconds, no guests).

A part that cannot run here (no testpmd, no vhostni, no guest images) is reported with the reason instead of a
number.  Results go to JSON (``--out``) and a table on stdout; per-process logs to ``--logdir``.

Examples::

    python3 -m vhostni.bench                                   # everything, defaults (5 x 10 s per backend)
    python3 -m vhostni.bench --only frameloop --runs 3 --duration 5
    python3 -m vhostni.bench --only frameloop --vhostni-args=--poll     # '=' because the value starts with --
    python3 -m vhostni.bench --only frameloop --no-vhostni              # the baseline alone
    python3 -m vhostni.bench --only guest-tcp --iperf-runs 1

The machines this runs on are shared 2-CPU boxes: whatever else runs takes CPU from the busy-polling
processes and halves their rates.  Each frame-loop run therefore records ``foreign_cpus`` (CPUs used by other
processes during its interval), waits up to ``--wait-quiet`` s for an idle machine first, and the table shows
the best run beside the median.  Compare vhostni with the baseline of the same invocation, not with figures
from another day.
"""
