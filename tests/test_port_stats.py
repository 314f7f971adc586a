"""Port.stat(name): one counter, the same as stats()[name], for a loop that polls one."""
from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from vhostni.fastpath import STAT_FIELDS, Switch
from vhostni.policy import parse_policy


def test_stat_reads_the_same_counter_as_stats():
    with Switch() as sw:
        g, n = sw.add_sink_port(), sw.add_sink_port()
        g.set_policy(parse_policy({"ni": {"anti_spoof": False},
                                   "prevent": [{"proto": "tcp", "dport": 23}]}).compile())
        for dport in (23, 80, 23):
            frame = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") /
                          IP(src="10.0.0.1", dst="10.0.0.2") / TCP(dport=dport, flags="S"))
            g.inject_from(frame)
        sw.sink_frames()
        whole = g.stats()
        assert whole["drop_prevented"] == 2
        assert {name: g.stat(name) for name in STAT_FIELDS} == whole
        with pytest.raises(KeyError):
            g.stat("no_such_counter")
