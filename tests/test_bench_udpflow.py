"""vhostni.bench.udpflow on a short flow: the worm scanner holds one datagram of an established UDP flow
(``flow = "new"``), every one with ``hold_established`` (its behaviour before), and loses none."""
from vhostni.bench import udpflow


def test_one_flow_holds_one_datagram_not_all():
    res = udpflow.run(count=30, rounds=1, progress=lambda _line: None)
    c = res["configs"]
    assert c["plain"]["held"] == [0]
    assert c["codered"]["held"] == [1] and c["codered"]["decisions"] == [1]
    assert c["codered_every"]["held"] == [30] and c["codered_every"]["decisions"] == [30]
    assert all(b["lost"] == 0 and b["n"] == 30 for b in res["blocks"])
