"""The signature bench (vhostni/bench/signatures.py) runs, and its rules never match its data."""
from vhostni.bench import signatures as sb
from vhostni.bench.__main__ import report
from vhostni.signatures.engine import SignatureDB
from vhostni.signatures.rules import Vars, parse_rules


def test_signature_bench_small_run():
    r = sb.run_signatures(sb.SigBenchConfig(rules=300, mbytes=1, rounds=1, compile_rules=400, inline_mbytes=1),
                          progress=lambda m: None)
    assert r["status"] == "ran", r
    assert r["engine_gbit_median"] > 0 and r["hyperscan_gbit_median"] > 0
    assert r["anchor_hits"] > 0                        # the near rules' fast patterns are in the data
    assert r["compile_rules"] == 400
    text = report({"signatures": r})
    assert "engine/Hyperscan" in text and "compile 400 rules" in text
    # in-line: every payload byte went through the stage and came out, in one run with the others
    assert r["inline_status"] == "ran", r
    assert r["inline_stage_gbit"] > 0 and r["inline_forward_gbit"] > 0 and r["inline_hyperscan_gbit"] > 0
    assert "with the signature stage" in text
    # the same rules as HTTP rules: every request read, none matched, every byte delivered
    assert r["http_status"] == "ran", r
    assert r["http_requests"] > 1000 and r["http_stage_gbit"] > 0 and "with the HTTP rules" in text


def test_bench_http_rules_are_http_rules_in_each_buffer():
    rs = parse_rules(sb.http_rules(sb.make_rules(40, 0.1, 0.05)), Vars(home=["10.0.0.2"]), "b")
    assert not rs.problems and {r.mode for r in rs.rules} == {"http"}
    assert {b for r in rs.rules for g in r.http_groups.values() for b in g} == set(sb.HTTP_BUFFERS_ROTATION)


def test_bench_rules_never_match_in_block_mode_either():
    rs = parse_rules(sb.make_rules(300, 0.1, 0.05), Vars(home=["10.0.0.2"]), "b")
    assert not rs.problems and rs.accepted == 300
    with SignatureDB(rs.rules, "packet") as db:
        assert db.scan(sb.make_data(1 << 20)) == []
