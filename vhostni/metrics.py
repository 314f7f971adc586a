"""A Prometheus endpoint for the daemon (``vhostni run --metrics tcp:HOST:PORT``).

prometheus_client serves HTTP on a thread of its own; the daemon's state belongs to the
data-plane thread. So a scrape asks that thread for one snapshot (``Daemon.stats()``, through
``call_soon``) and waits for it a bounded time; a daemon too busy to answer is served its last
snapshot with ``vhostni_scrape_stale 1``, never blocked on. Nothing is computed between scrapes.

Label sets are bounded by what the administrator configured: NI names, scanner names, the
fixed counter names of the C fast path (``reason`` of a drop, ``event`` of the TCP engine), and
queue pair numbers (``queue``, 0..7: VN_MAX_QUEUE_PAIRS).
No address, port or other value a guest chooses ever becomes a label.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable, Optional

import socket
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("vhostni")

SCRAPE_WAIT_S = 2.0
SNAPSHOT_MIN_AGE_S = 1.0     # scrapes closer together than this share one snapshot
MAX_CLIENTS = 8              # HTTP connections served at once; more are closed at once
CLIENT_TIMEOUT_S = 5.0       # a client that sends nothing (slowloris) is dropped after this
CLIENT_DEADLINE_S = 10.0     # ... and one that trickles bytes, after this in all


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:     # one line per scrape on stderr helps nobody
        pass


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, but at most MAX_CLIENTS of them, each with a deadline: a
    stranger who can reach the port cannot grow the daemon's threads or memory without bound
    (the endpoint has no authentication: bind it to loopback or a management network)."""
    daemon_threads = True
    refused = 0

    def server_activate(self) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        super().server_activate()

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        request.settimeout(CLIENT_TIMEOUT_S)
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def handle_error(self, request, client_address) -> None:
        pass      # a client that timed out or went away: nothing for the daemon's log

    def process_request_thread(self, request, client_address) -> None:
        # the timeout bounds each wait; a byte every few seconds would renew it forever and
        # MAX_CLIENTS such peers would starve every scrape: the connection's whole life is
        # bounded too (shutting the socket down ends a read or write in progress)
        deadline = threading.Timer(CLIENT_DEADLINE_S, _shut, (request,))
        deadline.daemon = True
        deadline.name = "vhostni-metrics-deadline"
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self._slots.release()


def _shut(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass

# port counters that are not monotonic
_PORT_GAUGES = {"backlog_max": "deepest receive backlog seen",
                "flows_active": "flows in the NI's flow table now (csrc/flow.c)"}
# kernel figures (NIKernel.info) that are levels, not counts
_KERNEL_GAUGES = {
    "held": ("vhostni_ni_held_frames", "frames held for scanner decisions now"),
    "tcp_bytes": ("vhostni_ni_stream_bytes_held", "TCP stream bytes held for stream scanners now"),
    "tcp_flows": ("vhostni_ni_tcp_flows", "connections in the NI's flow table now"),
    "streams": ("vhostni_ni_streams", "reconstructed streams handed to scanners now"),
    "subscriptions": ("vhostni_ni_subscriptions", "frame subscriptions granted"),
    "stream_subscriptions": ("vhostni_ni_stream_subscriptions", "stream subscriptions granted"),
    "flow_subscriptions": ("vhostni_ni_flow_subscriptions", "flows subscriptions granted"),
}
_KERNEL_COUNTERS = {
    "decided_by_timeout": ("vhostni_ni_decided_by_timeout", "held frames decided by the hold timeout"),
    "streams_killed": ("vhostni_ni_streams_killed", "streams ended by kill"),
}
SCANNER_STATES = ("running", "restarting", "stopped")


def parse_listen(spec: str) -> tuple[str, int]:
    """``tcp:HOST:PORT`` (HOST may be ``[v6]``) -> (host, port)."""
    kind, _, rest = spec.partition(":")
    host, _, port = rest.rpartition(":")
    if kind != "tcp" or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--metrics {spec!r}: expected tcp:HOST:PORT")
    return host.strip("[]"), int(port)


class DaemonCollector:
    """Turns one ``Daemon.stats()`` snapshot into metric families."""

    def __init__(self, snapshot: Callable[[], tuple[Optional[dict], bool]]):
        self.snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        return []        # unchecked collector: families depend on the NIs configured

    def collect(self) -> Iterable[Metric]:
        snap, stale = self.snapshot()
        g = GaugeMetricFamily("vhostni_scrape_stale",
                              "1 if the daemon did not answer in time and the figures are old")
        g.add_metric([], 1 if stale else 0)
        yield g
        if snap is None:
            return
        yield from self._daemon(snap)
        yield from self._nis(snap.get("nis", {}))

    @staticmethod
    def _daemon(snap: dict) -> Iterable[Metric]:
        c = CounterMetricFamily("vhostni_alerts", "alerts written to the alert log")
        c.add_metric([], snap.get("alerts", 0))
        yield c
        al = snap.get("alert_log") or {}
        for key, kind, doc in (("pending", GaugeMetricFamily, "alerts held in memory while the "
                                "alert log cannot be written"),
                               ("lost", CounterMetricFamily, "alerts lost: the log could not be "
                                "written and the memory queue was full"),
                               ("write_errors", CounterMetricFamily, "alert log writes that failed")):
            if isinstance(al.get(key), int):
                m = kind(f"vhostni_alert_log_{key}", doc)
                m.add_metric([], al[key])
                yield m
        if "error" in al:
            g = GaugeMetricFamily("vhostni_alert_log_failing", "1 while the alert log cannot be written")
            g.add_metric([], 1 if al.get("error") else 0)
            yield g
        for key, doc in (("internal_errors", "unexpected errors the daemon logged and survived"),
                         ("stats_write_errors", "failed writes of the stats file")):
            if isinstance(snap.get(key), int):
                c = CounterMetricFamily(f"vhostni_{key}", doc)
                c.add_metric([], snap[key])
                yield c
        for key, value in sorted((snap.get("checkpoints") or {}).items()):
            if isinstance(value, int) and not isinstance(value, bool):
                g = GaugeMetricFamily(f"vhostni_checkpoints_{key}", f"scanner checkpoints: {key}")
                g.add_metric([], value)
                yield g

    @staticmethod
    def _nis(nis: dict) -> Iterable[Metric]:
        fam: dict[str, Metric] = {}

        def counter(name, doc, labels):
            if name not in fam:
                fam[name] = CounterMetricFamily(name, doc, labels=labels)
            return fam[name]

        def gauge(name, doc, labels):
            if name not in fam:
                fam[name] = GaugeMetricFamily(name, doc, labels=labels)
            return fam[name]

        for name, ni in sorted(nis.items()):
            gauge("vhostni_ni_connected", "1 while the NI's QEMU is connected", ["ni"]) \
                .add_metric([name], 1 if ni.get("connected") else 0)
            gauge("vhostni_ni_quarantined", "1 while the NI is quarantined", ["ni"]) \
                .add_metric([name], 1 if ni.get("quarantined") else 0)
            gauge("vhostni_ni_link_up", "0 while the NI's link is set down", ["ni"]) \
                .add_metric([name], 0 if ni.get("link") == "down" else 1)
            gauge("vhostni_ni_broken", "1 while the guest's driver broke the virtio rules", ["ni"]) \
                .add_metric([name], 1 if ni.get("broken") else 0)
            counter("vhostni_ni_protocol_errors", "vhost-user messages refused", ["ni"]) \
                .add_metric([name], ni.get("protocol_errors", 0))
            for field, value in ni.items():
                if not isinstance(value, int) or isinstance(value, bool) or field in (
                        "messages", "protocol_errors", "sessions", "mtu"):
                    continue
                if field in _PORT_GAUGES:
                    gauge(f"vhostni_ni_{field}", _PORT_GAUGES[field], ["ni"]).add_metric([name], value)
                elif field in ("in_frames", "out_frames"):
                    counter("vhostni_ni_frames", "frames into the switch from the NI (in) and "
                            "delivered to it (out)", ["ni", "direction"]) \
                        .add_metric([name, field[:-7]], value)
                elif field in ("in_bytes", "out_bytes"):
                    counter("vhostni_ni_bytes", "bytes into the switch from the NI (in) and "
                            "delivered to it (out)", ["ni", "direction"]) \
                        .add_metric([name, field[:-6]], value)
                elif field.startswith("drop_"):
                    counter("vhostni_ni_drops", "frames dropped, by reason", ["ni", "reason"]) \
                        .add_metric([name, field[5:]], value)
                elif field.startswith("tcp_"):
                    counter("vhostni_ni_tcp", "TCP engine events (segments, flows, bytes), by "
                            "event", ["ni", "event"]).add_metric([name, field[4:]], value)
                else:
                    counter(f"vhostni_ni_{field}", f"NI counter {field}", ["ni"]) \
                        .add_metric([name], value)
            for q in ni.get("queues") or ():
                # one series per queue pair the frontend configured (at most 8): bounded
                labels = [name, str(q["pair"])]
                for d in ("in", "out"):
                    counter("vhostni_ni_queue_frames", "frames per queue pair: sent by the guest "
                            "on its transmit queue (in), put on its receive queue (out)",
                            ["ni", "queue", "direction"]).add_metric(labels + [d], q[f"{d}_frames"])
                    counter("vhostni_ni_queue_bytes", "bytes per queue pair: sent by the guest "
                            "on its transmit queue (in), put on its receive queue (out)",
                            ["ni", "queue", "direction"]).add_metric(labels + [d], q[f"{d}_bytes"])
                gauge("vhostni_ni_queue_ready", "1 while the guest has the queue pair enabled",
                      ["ni", "queue"]).add_metric(labels, 1 if q.get("ready") else 0)
            k = ni.get("kernel") or {}
            for key, (metric, doc) in _KERNEL_GAUGES.items():
                if key in k:
                    gauge(metric, doc, ["ni"]).add_metric([name], k[key])
            for key, (metric, doc) in _KERNEL_COUNTERS.items():
                if key in k:
                    counter(metric, doc, ["ni"]).add_metric([name], k[key])
            for sname, sc in sorted((k.get("scanners") or {}).items()):
                labels = [name, sname]
                state = sc.get("state")
                for s in SCANNER_STATES + ((state,) if state not in SCANNER_STATES else ()):
                    gauge("vhostni_scanner_state", "the scanner's state (1 for the current one)",
                          ["ni", "scanner", "state"]).add_metric(labels + [s], 1 if state == s else 0)
                gauge("vhostni_scanner_locked_down", "1 once the scanner is confined and may "
                      "get traffic", ["ni", "scanner"]).add_metric(labels, 1 if sc.get("locked_down") else 0)
                gauge("vhostni_scanner_pending_decisions", "held frames awaiting this scanner",
                      ["ni", "scanner"]).add_metric(labels, sc.get("pending_decisions", 0))
                for field, value in sc.items():
                    if field in ("pid", "uid", "pending_decisions") or \
                            not isinstance(value, int) or isinstance(value, bool):
                        continue
                    counter(f"vhostni_scanner_{field}", f"scanner counter {field}",
                            ["ni", "scanner"]).add_metric(labels, value)
        yield from fam.values()


class MetricsServer:
    """The endpoint: an HTTP server thread and the collector reading the daemon's snapshots."""

    def __init__(self, daemon, spec: str):
        host, port = parse_listen(spec)
        self.daemon = daemon
        self._last: Optional[dict] = None
        self._lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(self._snapshot))
        server_class = type("MetricsServer", (_BoundedServer,), {
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        self.server = make_server(host, port, make_wsgi_app(self.registry), server_class,
                                  handler_class=_QuietHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="vhostni-metrics",
                                       daemon=True)
        self.thread.start()
        self._taken = 0.0
        self.address = self.server.server_address[:2]
        log.info("metrics on http://%s:%d/metrics", host, self.address[1])

    def _snapshot(self) -> tuple[Optional[dict], bool]:
        with self._lock:      # scrapes in a tight loop cost the data plane one snapshot a second
            if self._last is not None and time.monotonic() - self._taken < SNAPSHOT_MIN_AGE_S:
                return self._last, False
        done = threading.Event()
        box: list = []

        def take() -> None:
            try:
                box.append(self.daemon.stats())
            finally:
                done.set()

        self.daemon.call_soon(take)
        if done.wait(SCRAPE_WAIT_S) and box:
            with self._lock:
                self._last, self._taken = box[0], time.monotonic()
            return box[0], False
        with self._lock:
            return self._last, True

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
