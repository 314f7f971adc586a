"""vhostni's signature stage against OISF suricata-verify: real captures, and the alerts each
test expects from Suricata (``make sv-verify SV=/path/to/suricata-verify``).

    python3 -m vhostni.bench.svverify SV_DIR [--only NAME,...] [--filter REGEX] [--work DIR]

For every test of ``SV_DIR/tests`` with a capture and an alert check on a rule this stage
accepts: the test's rules (drop and reject as alert unless Suricata ran as an IPS), a policy
naming them, and ``vhostni replay --clock capture`` once with the TCP server's MAC as the guest
and once with the client's; each run's alert sids against the test's checks.  A sid expected
but never raised is a *miss*, one raised where the test expects none a *false* alert.  Every
divergence is classed by CLASSES below (checked by hand on the replays): ``b`` by design (the
NI delivers less than Suricata would let through), ``c`` a Suricata feature or setting with no
counterpart here, ``?`` not explained: a regression or a new finding.  Prints the table and the
counts; exits 1 if any test is ``?``.  Needs PyYAML and scapy (``pip install .[test]``) and a
checkout of https://github.com/OISF/suricata-verify (MIT).  The README has the last figures.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys

from ..signatures.rules import Vars, parse_rules

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SURICATA_VARS = {
    "HOME_NET": "[192.168.0.0/16,10.0.0.0/8,172.16.0.0/12]",
    "EXTERNAL_NET": "!$HOME_NET",
}


def rule_files(d: str, y: dict) -> list[str]:
    """As suricata-verify's run.py finds them: test.yaml's `rules`, else the one *.rules of the
    directory (firewall.rules + td.rules: td.rules only, firewall rules are not content rules)."""
    if "rules" in y:
        return [os.path.join(d, y["rules"])] if y["rules"] else []
    rules = sorted(glob.glob(os.path.join(d, "*.rules")))
    if len(rules) == 2 and rules[0].endswith("firewall.rules"):
        return [rules[1]]
    return rules if len(rules) == 1 else []


def find_pcap(d: str, y: dict):
    pc = y.get("pcap")
    if pc is False:
        return None
    if isinstance(pc, str):
        p = os.path.normpath(os.path.join(d, pc))
        return p if os.path.exists(p) else None
    c = sorted(glob.glob(os.path.join(d, "*.pcap")) + glob.glob(os.path.join(d, "*.pcapng")))
    return c[0] if len(c) == 1 else None


def alert_checks(y: dict) -> list[dict]:
    out = []
    for c in y.get("checks") or []:
        f = c.get("filter") if isinstance(c, dict) else None
        if not isinstance(f, dict):
            continue
        m = f.get("match") or {}
        if m.get("event_type") != "alert" and "alert.signature_id" not in m:
            continue
        out.append({"sid": m.get("alert.signature_id"), "count": f.get("count"), "lt": f.get("lt"),
                    "gt": f.get("gt"), "extra": {k: v for k, v in m.items()
                                                 if k not in ("event_type", "alert.signature_id")}})
    return out


def expected(checks: list[dict]) -> dict:
    """sid -> ('eq', n) | ('ge', n): alerts Suricata raised for that sid."""
    exp: dict = {}
    for c in checks:
        sid = c["sid"]
        if sid is None or c["count"] is None:
            if sid is not None and c.get("gt") is not None:
                exp.setdefault(sid, ("ge", c["gt"] + 1))
            continue
        if not c["extra"]:
            exp[sid] = ("eq", c["count"])
        elif sid not in exp or exp[sid][0] == "ge":
            prev = exp.get(sid, ("ge", 0))[1]
            exp[sid] = ("ge", prev + c["count"])
    return exp


def survey(root: str) -> list[dict]:
    import yaml                     # PyYAML: suricata-verify's test.yaml files
    out = []
    for ty in sorted(glob.glob(os.path.join(root, "**", "test.yaml"), recursive=True)):
        d = os.path.dirname(ty)
        name = os.path.relpath(d, root)
        try:
            y = yaml.safe_load(open(ty, encoding="utf-8", errors="replace")) or {}
        except Exception as exc:
            out.append({"name": name, "skip": f"yaml: {exc}"})
            continue
        rec = {"name": name, "args": y.get("args"), "requires": y.get("requires")}
        rec["pcap"] = find_pcap(d, y)
        rec["rules"] = rule_files(d, y)
        checks = alert_checks(y)
        rec["expected"] = {str(k): v for k, v in expected(checks).items()}
        rec["total_checks"] = [c for c in checks if c["sid"] is None]
        text = ""
        for f in rec["rules"]:
            text += open(f, encoding="utf-8", errors="replace").read() + "\n"
        rs = parse_rules(text, Vars(SURICATA_VARS))
        # `alert http ... (content:...)` with payload contents: Suricata inspects the raw stream
        # of the HTTP flow; as a tcp rule vhostni accepts it (the port restriction is the same)
        bad = {p.sid for p in rs.problems if p.reason.startswith("payload contents (no HTTP buffer)")}
        if bad:
            lines = []
            for line in text.splitlines():
                m = re.search(r"\bsid\s*:\s*(\d+)\s*;", line)
                if m and int(m.group(1)) in bad and not line.lstrip().startswith("#"):
                    line = re.sub(r"^(\s*\w+\s+)http1?(\s)", r"\1tcp\2", line)
                lines.append(line)
            text = "\n".join(lines) + "\n"
            rs = parse_rules(text, Vars(SURICATA_VARS))
            rec["rewritten_http_to_tcp"] = sorted(bad - {p.sid for p in rs.problems})
        rec["rules_text"] = text
        rec["accepted"] = [r.sid for r in rs.rules]
        rec["problems"] = {str(p.sid): p.reason for p in rs.problems}
        rec["nrules"] = len(rs.rules) + len(rs.problems)
        out.append(rec)
    return out


# ------------------------------------------------------------------ running one test

def pcap_info(path: str):
    """linktype, and per TCP connection (SYN seen) client/server MACs; MAC -> source IPs."""
    from scapy.all import PcapReader, Ether, IP, IPv6, TCP  # noqa
    from scapy.utils import PcapNgReader, RawPcapReader  # noqa
    ips = collections.defaultdict(set)
    counts = collections.Counter()
    servers, clients = collections.Counter(), collections.Counter()
    lt = None
    try:
        r = PcapReader(path)
        lt = getattr(r, "linktype", None)
    except Exception:
        return None, {}, [], []
    try:
        for i, p in enumerate(r):
            if i > 200000:
                break
            if lt is None:
                lt = 1 if p.__class__.__name__ == "Ether" else -1
            if not isinstance(p, Ether):
                continue
            counts[p.src] += 1
            counts[p.dst] += 1
            if IP in p:
                ips[p.src].add(p[IP].src)
                ips[p.dst].add(p[IP].dst)
            elif IPv6 in p:
                ips[p.src].add(p[IPv6].src)
                ips[p.dst].add(p[IPv6].dst)
            if TCP in p and (p[TCP].flags & 0x12) == 0x02:
                clients[p.src] += 1
                servers[p.dst] += 1
    except Exception:
        pass
    r.close()
    return lt, {k: sorted(v) for k, v in ips.items()}, [m for m, _ in servers.most_common()] + \
        [m for m, _ in clients.most_common()], [m for m, _ in counts.most_common()
                                                 if not int(m.split(":")[0], 16) & 1]


def alertize(text: str) -> str:
    out = []
    for line in text.splitlines():
        s = line.lstrip()
        out.append(re.sub(r"^(\s*)(drop|reject|rejectsrc|rejectdst|rejectboth)\b", r"\1alert", line)
                   if s and not s.startswith("#") else line)
    return "\n".join(out) + "\n"


def _synth_mac(ip: str) -> str:
    import hashlib
    h = hashlib.sha1(ip.encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in h[:5])


def normalize(src: str, dst: str, fix_csum: bool) -> dict:
    """A copy of the capture vhostni replay can take: non-Ethernet link types (null/loopback,
    raw IP, Linux cooked) get an Ethernet header with a MAC per IP address; MACs with the group
    bit set that are used as a host's source get it cleared; with fix_csum (the test ran
    Suricata with `-k none`: checksums ignored) unfragmented packets get their IPv4/TCP/UDP/ICMP
    checksums recomputed.  Returns what was changed."""
    from scapy.all import (PcapReader, PcapWriter, Ether, IP, IPv6, TCP, UDP, ICMP, Raw,
                           IPv6ExtHdrFragment)
    from scapy.layers.inet6 import _ICMPv6
    info = {"converted": 0, "csum_fixed": 0, "mac_fixed": 0, "dropped_non_ip": 0}
    r = PcapReader(src)
    lt = getattr(r, "linktype", 1)
    pkts = list(r)
    r.close()
    srcs = set()
    if lt == 1:
        for p in pkts:
            if isinstance(p, Ether):
                srcs.add(p.src)
    # both ends of a conversation sending from one MAC (a synthetic capture, or a capture taken
    # on a host that routes): directions cannot be told by MAC, so MACs per IP address
    seen = {}
    per_ip = False
    if lt == 1:
        for p in pkts:
            ip = p[IP] if IP in p else (p[IPv6] if IPv6 in p else None)
            if ip is None or not isinstance(p, Ether):
                continue
            seen[(ip.src, ip.dst)] = p.src
            back = seen.get((ip.dst, ip.src))
            if back is not None and back == p.src and ip.src != ip.dst:
                per_ip = True
                break
        # or one address sending from several MACs (a capture with randomised MACs)
        macs_of = collections.defaultdict(set)
        for p in pkts:
            ip = p[IP] if IP in p else (p[IPv6] if IPv6 in p else None)
            if ip is not None and isinstance(p, Ether):
                macs_of[ip.src].add(p.src)
        if any(len(v) > 2 for v in macs_of.values()):
            per_ip = True
    info["per_ip_macs"] = per_ip
    out = []
    for p in pkts:
        t = p.time
        if lt == 1 and per_ip and isinstance(p, Ether) and (IP in p or IPv6 in p):
            ip = p[IP] if IP in p else p[IPv6]
            p = p.copy()
            p.src, p.dst = _synth_mac(ip.src), _synth_mac(ip.dst)
        if lt != 1:
            ip = p[IP] if IP in p else (p[IPv6] if IPv6 in p else None)
            if ip is None:
                info["dropped_non_ip"] += 1
                continue
            ip = ip.copy()
            a, b = ip.src, ip.dst
            if a == b and (TCP in ip or UDP in ip):
                # a host talking to itself over loopback: give each port side an address of
                # its own (the lower port is the server), so one of them can be the guest
                l4 = ip[TCP] if TCP in ip else ip[UDP]
                lo_first = l4.sport < l4.dport
                v6 = IPv6 in ip and ip.__class__ is IPv6
                srv, cli = ("fd00::1", "fd00::2") if v6 else ("10.0.0.1", "10.0.0.2")
                ip.src, ip.dst = (srv, cli) if lo_first else (cli, srv)
                a, b = ip.src, ip.dst
                if not v6:
                    del ip.chksum
                del l4.chksum
                ip = ip.__class__(bytes(ip))
                info["readdressed"] = info.get("readdressed", 0) + 1
            q = Ether(src=_synth_mac(a), dst=_synth_mac(b)) / ip
            info["converted"] += 1
        else:
            q = p
            if isinstance(q, Ether):
                fix = {}
                for m in (q.src, q.dst):
                    f = int(m[:2], 16)
                    if f & 1 and m in srcs and m != "ff:ff:ff:ff:ff:ff":
                        fix[m] = f"{f & 0xfe:02x}" + m[2:]
                if fix:
                    q = q.copy()
                    q.src = fix.get(q.src, q.src)
                    q.dst = fix.get(q.dst, q.dst)
                    info["mac_fixed"] += 1
        if fix_csum and (IP in q or IPv6 in q):
            frag = (IP in q and (q[IP].flags.MF or q[IP].frag)) or IPv6ExtHdrFragment in q
            if not frag:
                c = q.copy()
                for layer in (IP, TCP, UDP, ICMP):
                    if layer in c:
                        del c[layer].chksum
                if _ICMPv6 is not None:
                    for l in c.layers():
                        if issubclass(l, _ICMPv6) and hasattr(c[l], "cksum"):
                            del c[l].cksum
                try:
                    nb = bytes(c)
                    if nb != bytes(q) and len(nb) == len(bytes(q)):
                        q = Ether(nb)
                        info["csum_fixed"] += 1
                except Exception:
                    pass
        q.time = t
        out.append(q)
    w = PcapWriter(dst, linktype=1, sync=False)
    for q in out:
        w.write(q)
    w.close()
    return info


def run_one(rec: dict, work: str, ni_extra: dict) -> dict:
    res = {"name": rec["name"]}
    os.makedirs(work, exist_ok=True)
    args = " ".join(str(a) for a in (rec.get("args") or []))
    fix_csum = "-k none" in args
    norm = os.path.join(work, "input-eth.pcap")
    try:
        res["normalized"] = normalize(rec["pcap"], norm, fix_csum)
    except Exception as exc:
        res["error"] = f"normalize: {exc!r}"
        return res
    pcap = norm
    lt, ips, tcp_macs, busy = pcap_info(pcap)
    res["linktype"] = lt
    if lt != 1:
        res["error"] = f"linktype {lt}, not Ethernet"
        return res
    cands = []
    for m in tcp_macs[:1] + [x for x in tcp_macs if x != (tcp_macs[:1] or [None])[0]][:1] + busy[:2]:
        if m not in cands and not int(m.split(":")[0], 16) & 1:
            cands.append(m)
    cands = cands[:2]
    os.makedirs(work, exist_ok=True)
    text = rec.get("rules_text") or ""
    rules = os.path.join(work, "test.rules")
    # Suricata ran as an IPS (--simulate-ips, or "ips" in the test's name as run.py does):
    # keep drop/reject, vhostni is in-line too; else Suricata was an IDS: drop and reject only
    # alerted, so they become alert (a vhostni drop would change what follows)
    ips_mode = "--simulate-ips" in args or "ips" in rec["name"].split("/")[-1]
    res["ips"] = ips_mode
    with open(rules, "w") as f:
        f.write(text if ips_mode else alertize(text))
    res["runs"] = {}
    if rec.get("override_rules"):
        with open(rules, "w") as f:
            f.write(rec["override_rules"])
    for mac in cands:
        addrs = [a + ("/32" if ":" not in a else "/128") for a in ips.get(mac, [])][:16]
        pol = {"ni": {"addresses": addrs, "anti_spoof": False, **ni_extra},
               "signatures": {"rules": [rules], "on_unsupported": "skip", "vars": SURICATA_VARS}}
        pf = os.path.join(work, f"pol-{mac.replace(':', '')}.json")
        json.dump(pol, open(pf, "w"))
        al = os.path.join(work, f"alerts-{mac.replace(':', '')}.jsonl")
        out = os.path.join(work, f"out-{mac.replace(':', '')}.pcap")
        try:
            p = subprocess.run([sys.executable, "-m", "vhostni", "replay", "--guest-mac", mac, pcap,
                                "--policy", pf, "--out", out, "--alerts", al, "--clock", "capture"],
                               capture_output=True, text=True, timeout=300, cwd=HERE)
        except subprocess.TimeoutExpired:
            res["runs"][mac] = {"error": "timeout"}
            continue
        sids = collections.Counter()
        other = collections.Counter()
        if os.path.exists(al):
            for line in open(al):
                a = json.loads(line)
                fa = (a.get("fields") or {}).get("alert")
                if fa:
                    sids[fa["signature_id"]] += 1
                else:
                    other[a.get("message", "")[:80]] += 1
        res["runs"][mac] = {"rc": p.returncode, "sids": dict(sids), "other_alerts": dict(other),
                            "stderr": p.stderr[-3000:], "addresses": addrs}
    return res


def verdict(rec: dict, res: dict) -> dict:
    acc = set(rec["accepted"])
    exp = {int(k): tuple(v) for k, v in rec["expected"].items() if int(k) in acc}
    per = {}
    for mac, r in (res.get("runs") or {}).items():
        if "sids" not in r:
            per[mac] = "error"
            continue
        got = {int(k): v for k, v in r["sids"].items()}
        miss = [s for s, (op, n) in exp.items() if n > 0 and got.get(s, 0) == 0]
        false = [s for s, (op, n) in exp.items() if n == 0 and got.get(s, 0) > 0]
        extra = [s for s in got if s not in exp]
        per[mac] = {"miss": miss, "false": false, "unchecked_alerts": extra}
    return {"expected_supported": {s: list(v) for s, v in exp.items()}, "per_mac": per}


# Tests whose own rules vhostni refuses (application-layer keywords) but whose capture is an
# evasion test of the stream: the same payload condition as a plain content rule.
OVERRIDES = [
    {"name": f"{t}+tcp-content", "base": t, "expected": {"1": ["eq", 1]},
     "override_rules": 'alert tcp any any -> any any (msg:"body"; content:"THIS_IS_A_TEST"; nocase; sid:1;)\n'}
    for t in ("bug-3286-01-no-evasion", "bug-3286-02-linux-evasion", "bug-3286-03-windows-evasion")
]


def override_records(recs: list[dict]) -> list[dict]:
    by = {r["name"]: r for r in recs}
    out = []
    for o in OVERRIDES:
        b = by.get(o["base"])
        if not b:
            continue
        r = dict(b)
        r.update(o)
        rs = parse_rules(o["override_rules"], Vars(SURICATA_VARS))
        r["accepted"] = [x.sid for x in rs.rules]
        out.append(r)
    return out


# Why a test diverges (test name regex -> class, reason).  a: a real miss/false alert in
# vhostni; b: a by-design difference; c: the harness or a Suricata setting vhostni has no
# equivalent of.  Checked by hand on the replays (delivered pcap, alerts, counters).
CLASSES = [
    (r"eve-(overlap-)?payload-0?2", "b", "Suricata set to old-Linux overlap policy (last copy wins); "
     "vhostni keeps the first copy and drops the differing one: the receiver gets GOOD"),
    (r"eve-(overlap-)?payload-0?3", "b", "tcp-pkt rule alerts on the raw EVIL copy before the TCP "
     "engine drops it; Suricata IPS normalises the packet first (extra alert, nothing delivered)"),
    (r"eve-(overlap-)?payload-0?[56]|tcp-rst-unacked-stream-0[3478]", "b", "bytes after a gap are "
     "never delivered (gaps are not bridged); Suricata inspects past the gap"),
    (r"^tcp-urgp-", "b", "URG flag/pointer cleared: the urgent byte stays in band for the receiver, "
     "so neither the receiver nor the stage sees the Linux-OOB-stripped string"),
    (r"^tcp-split-handshake-", "b", "split/simultaneous-open handshake unsupported: 2nd SYN and "
     "SYN-ACK dropped, data dropped (fail closed); the tcp-pkt rule still alerts"),
    (r"^tcp-fastopen-", "b", "data on SYN dropped (TFO unsupported), later data gets the midstream "
     "reset: nothing reaches the receiver"),
    (r"^bug-3286-0[23]", "b", "injected RST/FIN with a bad timestamp before the SYN-ACK: vhostni "
     "accepts the RST (Linux/Windows discard it), forgets the flow, resets both ends at the data "
     "(fail closed, availability only)"),
    (r"^defrag/", "b", "IP fragments of protocols packet rules cover are dropped "
     "(sig_frag_dropped) / GRE-PPP encapsulation not parsed / ::1 addresses: nothing delivered"),
    (r"^threshold/threshold-config", "c", "threshold.config suppress entries: no equivalent"),
    (r"^util-action-tests/util-action-(0[2467]|1[2-6])$|^bug-4663-02$|^bug-5464-verdict-0[14]$", "c",
     "custom action-order in suricata.yaml (here: pass, reject, drop, alert)"),
    (r"^alert-max/|^bug-8021", "c", "packet-alert-max / alert queue semantics"),
    (r"^bug-7725|^bug-6402", "b", "IP tunnels are unparsed and dropped (tunnels = pass lets them "
     "through, not inspected inside); GENEVE is not decapsulated"),
    (r"^bug-2491|stream-async", "b", "one-sided capture (async-oneside): vhostni sees no handshake "
     "from both ends"),
    (r"^http-not09-file$", "b", "first request line is not HTTP: HTTP rules leave the connection"),
    (r"^detect-http-uri/UriTestSig(1[7-9]|2[0-4]|3[3-8])$", "b", "the request head never ends (no empty "
     "line, no FIN): the HTTP reader holds it, nothing reaches the server; Suricata inspects the URI "
     "once the request line is complete"),
    (r"^(bug-4623|bug-6875-01|pcap-file-stdin)$", "b", "capture starts mid-connection (no SYN): "
     "tcp_midstream reset, nothing delivered; Suricata inspects the packet"),
    (r"^security-4710-01$", "b", "injected in-window RST before the request: vhostni delivers the RST "
     "and forgets the flow, the request then gets the midstream reset (fail closed)"),
    (r"^http-chunked$", "b", "request with Content-Length and an obfuscated Transfer-Encoding "
     "(smuggling): the HTTP reader fails closed, the request is not delivered; raw-stream rules match"),
    (r"^bug-5464-verdict-02$", "c", "the harness rewrote `pass http (content:GET)` to a tcp rule: "
     "a stream pass ends inspection before the content-less http rule alerts"),
    (r"^(http2-|transform-|bug-5929-02)", "b", "HTTP/2 (h2c/prior knowledge): HTTP rules do not read HTTP/2"),
    (r"^eve-payload-07-http-gap$", "b", "bytes after a gap are never delivered"),
    (r"^util-action-tests/util-action-(0[89]|1[01])$", "b", "synthetic SYN-with-data packets: the "
     "pass rule (content, a stream rule) never sees data (dropped on SYN) while the content-less "
     "packet rules alert on every frame"),
    (r"^(issue-5466|firewall/)", "c", "the pass/accept rules that make Suricata silent are firewall "
     "or app-layer rules vhostni refuses; the remaining drop/alert rule fires"),
]


def classify(name: str, res: dict, rec: dict) -> tuple[str, str]:
    for pat, cls, why in CLASSES:
        if re.search(pat, name):
            return cls, why
    args = " ".join(str(a) for a in (rec.get("args") or []))
    if "stream.midstream=true" in args:
        return "b", "Suricata picks up mid-stream sessions; vhostni resets connections it never saw " \
                    "open (tcp_midstream; offline replay cannot adopt)"
    return "?", ""


def table(recs: dict, results: list, work_root: str) -> collections.Counter:
    from ..signatures.config import check_rules
    rows = []
    for res in results:
        rec = recs[res["name"]]
        v = res["verdict"]
        runs = v.get("per_mac") or {}
        if res.get("error") or not runs:
            rows.append((res["name"], "c", "", res.get("error", "no run"), ""))
            continue
        # rules the stage refuses when compiled (packet rules with flow state, ...) are not
        # enforced: a miss of one of them is the rule's, said by `vhostni rules check`
        refused = set()
        rf = os.path.join(work_root, res["name"].replace("/", "__"), "test.rules")
        if os.path.exists(rf):
            refused = {p.sid for p in check_rules([rf], Vars(SURICATA_VARS)).problems}
        bad = {m: x for m, x in runs.items() if x == "error" or x["miss"] or x["false"]}
        if not bad:
            rows.append((res["name"], "ok", json.dumps(v["expected_supported"]), "", ""))
            continue
        cls, why = classify(res["name"], res, rec)
        missed = {s for x in bad.values() if x != "error" for s in x["miss"] + x["false"]}
        if cls == "?" and missed and missed <= refused:
            cls, why = "c", "the missed rules are refused when compiled (e.g. flow state on a packet " \
                            "rule): not enforced, reported by `vhostni rules check`"
        detail = "; ".join(f"{m}: miss={x['miss']} false={x['false']}" if x != "error" else f"{m}: error"
                           for m, x in bad.items())
        rows.append((res["name"], cls, json.dumps(v["expected_supported"]), detail, why))
    print("| test | class | Suricata (supported sids: eq/ge count) | vhostni divergence | diagnosis |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(x.replace("|", "/") for x in r) + " |")
    return collections.Counter(r[1] for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m vhostni.bench.svverify", description=__doc__.split("\n\n")[0])
    ap.add_argument("sv_dir", help="a suricata-verify checkout (its tests/ directory is read)")
    ap.add_argument("--only", default="", help="test names, comma separated")
    ap.add_argument("--filter", default="", help="a regular expression on test names")
    ap.add_argument("--work", default="sv-work", help="where captures, policies and replays go")
    a = ap.parse_args(argv)
    root = os.path.join(a.sv_dir, "tests")
    if not os.path.isdir(root):
        ap.error(f"{root}: not a directory (give a suricata-verify checkout)")
    recs = survey(root)
    recs = recs + override_records(recs)
    only = set(x for x in a.only.split(",") if x)
    results = []
    for rec in recs:
        if only and rec["name"] not in only:
            continue
        if a.filter and not re.search(a.filter, rec["name"]):
            continue
        if not rec.get("pcap") or not rec.get("accepted"):
            continue
        if not only and not any(int(k) in set(rec["accepted"]) for k in rec["expected"]):
            continue
        res = run_one(rec, os.path.join(a.work, rec["name"].replace("/", "__")), {})
        res["verdict"] = verdict(rec, res)
        results.append(res)
        print(f"  {rec['name']}", file=sys.stderr, flush=True)
    with open(os.path.join(a.work, "results.jsonl"), "w") as f:
        for res in results:
            f.write(json.dumps(res) + "\n")
    counts = table({r["name"]: r for r in recs}, results, a.work)
    print(f"\n{len(results)} runs: " + ", ".join(f"{k} {counts[k]}" for k in ("ok", "b", "c", "?") if counts[k]))
    return 1 if counts["?"] else 0


if __name__ == "__main__":
    sys.exit(main())
