"""Hostile scanners: the sandbox and the NI kernel must hold against each program in
tests/scanners/, while the other scanners and NIs go on undisturbed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from vhostni.sandbox import UID_BASE, UID_COUNT

from nikit import (
    A_MAC, B_MAC, Kit, alive, eth, policy, proc_status, scanner_spec, tcp_frame, time_limit,
    write_policy,
)
from vhostni import scannerproc as scannerproc_mod

NOBODY = 65534


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setattr(scannerproc_mod, "RESTART_MIN", 0.05)
    with time_limit(60, "the test"):
        yield


def contain(direction="from_guest", dport=80, proto="tcp"):
    return {"direction": direction, "proto": proto, "dport": dport}


def decider(name, match, **config):
    return scanner_spec(name, "decider.py", allow=[dict(match, contain=True)],
                        config=dict(config, subscribe=[{"match": match, "contain": True}]))


def hostile(name, program, match=None, **kw):
    match = match or contain()
    config = kw.pop("config", {})
    config.setdefault("subscribe", [{"match": match, "contain": True}])
    return scanner_spec(name, program, allow=[dict(match, contain=True)], config=config, **kw)


def bystanders_work(k: Kit) -> None:
    """The well-behaved scanners (a/good on port 80... see _with_bystanders) still decide."""
    for src, dst, port in (("a", "b", 443), ("b", "a", 443)):
        f = tcp_frame(src, dst, dport=port, payload=b"PASS via the bystander")
        k.send(src, f)
        assert k.recv(dst, 3.0, 1) == [f], f"{src}->{dst} bystander traffic"
    assert k.sp("a", "good").counters.restarts == 0 and k.sp("b", "good").counters.restarts == 0


def _with_bystanders(a_scanners, **ni):
    """Policies where NI a also has a good scanner on port 443 and NI b one of its own."""
    return {"a": policy(scanners=[*a_scanners, decider("good", contain(dport=443))], **ni),
            "b": policy(scanners=[decider("good", contain(dport=443))])}


def _wait_good(k: Kit) -> tuple[int, int]:
    k.wait_subscribed("a", "good")
    k.wait_subscribed("b", "good")
    return k.sp("a", "good").proc.pid, k.sp("b", "good").proc.pid


# ---------------------------------------------------------------------------
# Crashes, hangs, floods
# ---------------------------------------------------------------------------

def test_crash_right_away_is_restarted_with_back_off(kits):
    k = kits(_with_bystanders([hostile("crash", "crash.py")]))
    pids = _wait_good(k)
    k.until(lambda: k.sp("a", "crash").counters.restarts >= 4, 10, "four restarts")
    delays = [float(m) for a in k.alerts_matching("scanner stopped", "a", "crash")
              for m in re.findall(r"restarting in ([\d.]+) s", a["message"])]
    # the delay each alert states is the one applied: RESTART_MIN first, then doubling
    assert delays[:4] == [0.05, 0.1, 0.2, 0.4], delays
    for a in k.alerts_matching("scanner stopped", "a", "crash"):      # the cause, not the socket
        assert a["message"].startswith("scanner stopped: killed by signal 6 (SIGABRT); "), a
    bystanders_work(k)
    assert (k.sp("a", "good").proc.pid, k.sp("b", "good").proc.pid) == pids


def test_restart_alert_says_how_the_scanner_died_and_when_it_restarts(kits, monkeypatch):
    """A scanner killed with -9 while frames wait unread in its socket: the daemon's recv
    sees ECONNRESET first, but the alert names the signal, and the delay it states is the
    one the restart then takes."""
    monkeypatch.setattr(scannerproc_mod, "RESTART_MIN", 0.5)
    spec = hostile("hang", "hang.py", config={"keepalive": False})
    k = kits({"a": policy(scanners=[spec], hold_timeout_ms=5000)})
    k.wait_subscribed("a", "hang")
    sp = k.sp("a", "hang")
    k.send("a", *[tcp_frame(payload=b"%d" % i) for i in range(20)])
    k.until(lambda: sp.given() >= 20, 3, "the frames sent to it")
    os.kill(sp.info()["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    alert = k.wait_alert("scanner stopped", "a", "hang")
    assert alert["message"] == "scanner stopped: killed by signal 9 (SIGKILL); restarting in 0.50 s"
    # the daemon's loop wakes when the restart is due, not at its next 250 ms tick
    assert t0 + 0.5 <= sp.next_start <= time.monotonic() + 0.5
    assert k.daemon.kernel.next_deadline <= sp.next_start
    k.until(lambda: sp.counters.restarts == 1 and sp.running, 5, "the restart")
    took = time.monotonic() - t0
    assert 0.5 <= took < 1.0, took


@pytest.mark.parametrize("default", ["cut", "pass"])
def test_crash_after_frames_settles_its_held_frames(kits, default):
    crasher = decider("crasher", contain(), crash_after=2)
    k = kits(_with_bystanders([crasher], hold_timeout_ms=20000, default_decision=default))
    _wait_good(k)
    k.wait_subscribed("a", "crasher")
    first = k.sp("a", "crasher").proc.pid
    ok = [tcp_frame(payload=b"PASS %d" % i) for i in range(2)]
    k.send("a", *ok)
    assert k.recv("b", 3.0, 2) == ok
    doomed = tcp_frame(payload=b"PASS but it dies first")
    k.send("a", doomed)
    k.until(lambda: k.sp("a", "crasher").counters.restarts == 1, 5, "the restart")
    st = k.stats("a")
    assert (st["held_passed"], st["held_cut"]) == ((3, 0) if default == "pass" else (2, 1))
    assert k.recv("b", 0.2) == ([doomed] if default == "pass" else [])
    assert k.nk("a").decided_by_timeout == 0                  # settled at once, not timed out
    alert = k.alerts_matching("scanner stopped", "a", "crasher")[0]
    assert alert["fields"]["decisions_defaulted"] == 1
    # restarted, resubscribed (numbering starts again at 1) and deciding
    k.wait_subscribed("a", "crasher")
    k.until(lambda: k.sp("a", "crasher").proc.pid != first and k.sp("a", "crasher").running)
    again = tcp_frame(payload=b"PASS again")
    k.send("a", again)
    assert k.recv("b", 3.0, 1) == [again]
    bystanders_work(k)


@pytest.mark.parametrize("keepalive", [False, True], ids=["spins", "decides-frames-it-never-got"])
def test_hung_scanner_is_killed_and_restarted(kits, keepalive):
    spec = hostile("hang", "hang.py", max_timeouts=3, config={"keepalive": keepalive})
    k = kits(_with_bystanders([spec], hold_timeout_ms=100))
    _wait_good(k)
    k.wait_subscribed("a", "hang")
    first = k.sp("a", "hang").proc.pid
    for i in range(3):
        k.send("a", tcp_frame(payload=b"%d" % i))
        k.until(lambda: k.nk("a").decided_by_timeout == i + 1, 3, "the timeout")
    k.wait_alert("scanner hung", "a", "hang")
    assert k.wait_alert("scanner stopped", "a", "hang")["message"].startswith(
        "scanner stopped: hung: 3 decisions missed")
    k.until(lambda: not alive(first), 5, "the hung scanner gone")    # reaped in housekeeping
    k.until(lambda: k.sp("a", "hang").counters.restarts == 1 and k.sp("a", "hang").running, 5,
            "the restart")
    assert k.recv("b", 0.1) == [] and k.stats("a")["held_cut"] == 3
    bystanders_work(k)


@pytest.mark.parametrize("mode, why", [
    ("decisions", "flooding: more than 2000 messages/s"),
    ("garbage", "protocol violation"),
    ("frame", "sent a frame"),
    ("deep_json", "protocol violation"),
])
def test_flooding_and_protocol_violations_kill_the_scanner(kits, mode, why):
    spec = hostile("flood", "flood.py", config={"mode": mode}, messages_per_second=2000)
    k = kits(_with_bystanders([spec]))
    _wait_good(k)
    k.until(lambda: k.sp("a", "flood").counters.restarts >= 1, 10, "the kill and restart")
    assert k.alerts_matching("scanner stopped: " + why, "a", "flood")
    if mode in ("garbage", "deep_json"):
        assert k.alerts_matching("scanner broke the protocol", "a", "flood")
    bystanders_work(k)


def test_stderr_flood_does_not_stall_the_daemon(kits):
    spec = hostile("noisy", "flood.py", config={"mode": "stderr"})
    k = kits(_with_bystanders([spec]))
    _wait_good(k)
    with time_limit(10, "the daemon under a stderr flood"):
        t0 = time.monotonic()
        for _ in range(3):
            bystanders_work(k)
        assert time.monotonic() - t0 < 5
    assert k.sp("a", "noisy").running


# ---------------------------------------------------------------------------
# Rights
# ---------------------------------------------------------------------------

def _check_alert_log(k: Kit) -> list[dict]:
    lines = k.alerts()
    assert [a["seq"] for a in lines] == list(range(1, len(lines) + 1))
    for a in lines:
        assert set(a) >= {"seq", "time", "ni", "scanner", "message"}
        assert isinstance(a["time"], float) and abs(a["time"] - time.time()) < 120
    return lines


@pytest.mark.parametrize("request_, why", [
    ({"match": {"proto": "udp", "dport": 53}, "contain": True}, "contain with read rights"),
    ({"match": {"proto": "udp"}}, "wider match"),
    ({"match": {"proto": "udp", "dport": 53, "direction": "to_guest"}, "contain": False}, "ok"),
    ({"match": {"proto": "tcp", "dport": 53}}, "other protocol"),
])
def test_subscription_outside_rights_is_refused_and_alerted(kits, request_, why):
    spec = scanner_spec("greedy", "hostile_requests.py", allow=[{"proto": "udp", "dport": 53}],
                        config={"subscribe": request_, "inject": 1},
                        inject=[{"name": "only", "frame": eth(A_MAC, B_MAC, 0x88B5, b"x").hex()}])
    k = kits({"a": policy(scanners=[spec])})
    rep = k.report("a", "greedy")
    assert rep["inject"].startswith("refused: no pre-registered injection 1")
    assert k.alerts_matching("scanner asked for an injection it does not have", "a", "greedy")
    if why == "ok":
        assert rep["subscribe"] == "granted" and k.subscribed("a", "greedy")
        assert not k.alerts_matching("outside its rights")
    else:
        assert rep["subscribe"] == "refused: outside this scanner's rights"
        alert = k.alerts_matching("scanner asked for a subscription outside its rights", "a", "greedy")[0]
        assert alert["fields"]["match"] == request_["match"]
        assert not k.subscribed("a", "greedy")
    assert k.sp("a", "greedy").counters.refused == (1 if why == "ok" else 2)
    _check_alert_log(k)
    assert k.stats("a")["injected"] == 0


def test_malformed_requests_are_refused_and_the_daemon_survives(kits):
    spec = scanner_spec("confused", "hostile_requests.py", allow=[{"proto": "udp", "dport": 53}],
                        config={"subscribe": {"match": {"proto": "udp", "dport": 53}}, "inject": 0,
                                "malformed": True})
    k = kits(_with_bystanders([spec]))
    _wait_good(k)
    rep = k.report("a", "confused")
    errors = rep["malformed"]
    assert len(errors) == 11 and "ok" not in errors, errors
    collide = k.alerts_matching("collide", "a", "confused")[0]
    assert collide["ni"] == "a" and collide["scanner"] == "confused"        # not forged
    assert collide["fields"] == {"ni": "forged", "scanner": "forged", "message": "forged", "self": 1}
    assert k.sp("a", "confused").running
    assert k.sp("a", "confused").counters.refused == 1 + 11 + 2      # inject, the 11, 2 alerts
    bystanders_work(k)


# ---------------------------------------------------------------------------
# The sandbox
# ---------------------------------------------------------------------------

def test_sandbox_walls(kits):
    k = kits({"a": policy(scanners=[scanner_spec("esc", "escape.py")])})
    rep = k.report("a", "esc")
    sp = k.sp("a", "esc")
    pid, uid = sp.pid, sp.uid
    assert pid != sp.proc.pid                     # the scanner, not its launcher
    assert UID_BASE <= uid < UID_BASE + UID_COUNT
    assert (rep["uid"], rep["euid"], rep["gid"], rep["groups"]) == (uid, uid, uid, [])
    # before the SDK's lockdown the launcher's filter already allows no socket but AF_UNIX
    for what in ("interfaces", "lo_up", "pre_connect_localhost", "pre_connect_remote"):
        assert rep[what] == "PermissionError EPERM", (what, rep[what])
    # after lockdown: no files, sockets, processes or threads
    for what in ("open_read", "open_write", "listdir", "socket_inet", "socket_unix", "socketpair",
                 "connect_on_own_socket", "fork", "execve", "kill_init", "setuid_root"):
        assert rep[what] == "PermissionError EPERM", (what, rep[what])
    assert rep["thread"].startswith("RuntimeError"), rep["thread"]
    st = proc_status(pid)
    assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(uid)] * 4
    assert st["Groups"].strip() == ""
    assert st["NoNewPrivs"].strip() == "1" and st["Seccomp"].strip() == "2"
    assert int(st["Seccomp_filters"]) == 2                  # the launcher's, then the SDK's
    assert st["CapEff"].strip("0\t ") == "" and st["CapPrm"].strip("0\t ") == ""
    limits = open(f"/proc/{pid}/limits").read()
    assert re.search(r"Max address space\s+536870912\s+536870912", limits)
    assert re.search(r"Max open files\s+64\s+64", limits)
    assert re.search(r"Max file size\s+0\s+0", limits)
    assert re.search(r"Max processes\s+3\s+3", limits)
    for ns in ("net", "ipc", "pid", "mnt", "uts", "user"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    assert os.getsid(pid) == sp.init_pid != os.getsid(0)   # bwrap --new-session
    assert sp._check_confinement() is None                  # what the kernel checks


def test_scanner_not_in_its_confinement_gets_nothing_and_is_killed(kits, monkeypatch):
    """Whatever makes the check fail (here: a launcher that did not impose it), the scanner
    gets no subscription, the administrator an alert, and after the grace it is killed."""
    monkeypatch.setattr(scannerproc_mod, "LOCKDOWN_GRACE", 0.5)
    monkeypatch.setattr(scannerproc_mod.sandbox, "check_confined",
                        lambda *a, **kw: "shares the daemon's net namespace")
    k = kits({"a": policy(scanners=[scanner_spec("lax", "nolockdown.py", allow=[
        {"direction": "from_guest", "proto": "tcp", "contain": True}])])})
    rep = k.report("a", "lax")
    assert rep["subscribe"] == "refused: not confined: shares the daemon's net namespace"
    assert not k.subscribed("a", "lax")
    assert k.alerts_matching("scanner is not in the confinement it was launched in", "a", "lax")
    k.until(lambda: k.sp("a", "lax").counters.restarts >= 1, 5, "the kill")
    assert k.alerts_matching("scanner stopped: not confined 0 s after its start: shares the "
                             "daemon's net namespace", "a", "lax")


def _shm_keys() -> set[int]:
    with open("/proc/sysvipc/shm") as f:
        return {int(line.split()[0]) for line in list(f)[1:]}


def test_confinement_is_imposed_not_volunteered(kits):
    """A scanner whose first act is to install its own allow-all seccomp filter, and which
    never calls the SDK's lockdown, still cannot read, connect, look around, leave SysV
    memory behind or fork: the launcher confined it before that first act."""
    other = kits({"a": policy(scanners=[decider("good", contain(dport=443))])})
    other.wait_subscribed("a", "good")
    other_stage = other.sp("a", "good").stage_root
    key = 0x7EC00000 | (os.getpid() & 0xFFFF)
    spec = scanner_spec("vol", "allowall.py", allow=[{"direction": "from_guest", "proto": "tcp",
                                                     "contain": True}],
                        config={"daemon_pid": os.getpid(), "other_stage": other_stage,
                                "shm_key": key})
    k = kits({"a": policy(scanners=[spec])})
    try:
        rep = k.report("a", "vol")
        assert rep["installed"] is True
        for what in ("shadow", "passwd", "cmdline", "own_proc", "other_stage", "run"):
            assert rep[what] == "FileNotFoundError ENOENT", (what, rep[what])
        root = eval(rep["root"][3:])                         # "ok [...]"
        assert set(root) <= {"usr", "lib", "lib64", "bin", "dev", "scanner"}, root
        for what in ("inet", "netlink", "shm", "fork"):
            assert rep[what] == "PermissionError EPERM", (what, rep[what])
        # its own filter on top of the launcher's changes nothing: it runs confined, so it
        # may subscribe (the SDK's lockdown is an extra wall, not the one that counts)
        assert rep["subscribe"] == "granted"
        sp = k.sp("a", "vol")
        assert proc_status(sp.pid)["Seccomp_filters"].strip() == "2"
        assert key not in _shm_keys()
        sp.stop()
        assert key not in _shm_keys()
    finally:
        if key in _shm_keys():                              # the old sandbox leaked it
            subprocess.run(["ipcrm", "-M", str(key)], check=False)


def test_only_the_unix_sockets_the_policy_grants_are_reachable():
    """``sockets`` binds a unix socket (clamd's) into one scanner's view; any other stays
    out of reach, however readable its path is on the host."""
    d = tempfile.mkdtemp(prefix="vhostni-sockets-test-")
    os.chmod(d, 0o755)
    servers = {}
    try:
        for n in ("granted", "other"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(os.path.join(d, n))
            os.chmod(os.path.join(d, n), 0o666)
            s.listen(1)
            servers[n] = s
        granted, other = (os.path.join(d, n) for n in ("granted", "other"))
        spec = scanner_spec("probe", "unixprobe.py", config={"paths": [granted, other]},
                            sockets=[granted])
        k = Kit({"a": policy(scanners=[spec])})
        try:
            rep = k.report("a", "probe")
            assert rep == {granted: "ok", other: "FileNotFoundError ENOENT"}, rep
            servers["granted"].settimeout(2)
            conn, _ = servers["granted"].accept()
            with conn:
                assert conn.recv(10) == b"hello"
        finally:
            k.close()
    finally:
        for s in servers.values():
            s.close()
        shutil.rmtree(d, ignore_errors=True)


def test_check_confined_refuses_what_the_launcher_did_not_impose():
    """The kernel's check, on processes confined in part: each missing wall is named."""
    from vhostni import sandbox
    assert sandbox.check_confined(os.getpid(), 0) == "shares the daemon's user namespace"
    root = tempfile.mkdtemp(prefix="vhostni-confine-test-")   # reachable by the scanner uid
    os.chmod(root, 0o755)
    pool = sandbox.UidPool()

    def launch(seccomp_filter: bool, cmd=("/usr/bin/python3", "-c", "import time; time.sleep(30)"),
               filt: bytes = sandbox.launch_filter()):
        uid = pool.take()
        info_r, info_w = os.pipe()
        filt_r, filt_w = os.pipe()
        os.write(filt_w, filt)
        os.close(filt_w)
        argv = sandbox.command(list(cmd), root, uid, filt_r, info_w)
        if not seccomp_filter:
            i = argv.index("--seccomp")
            del argv[i:i + 2]
        proc = subprocess.Popen(argv, pass_fds=[info_w, filt_r],
                                preexec_fn=sandbox.preexec(256, 60, 64, uid))
        os.close(info_w)
        os.close(filt_r)
        init = sandbox.read_child_pid(info_r)
        os.close(info_r)
        return proc, init, sandbox.find_scanner_pid(init), uid

    procs = []
    try:
        proc, init, pid, uid = launch(False)
        procs.append(proc)
        time.sleep(0.5)
        assert sandbox.check_confined(pid, uid, parent=init, launcher=proc.pid) == \
            "no seccomp filter (mode '0')"
        proc, init, pid, uid = launch(True)
        procs.append(proc)
        time.sleep(0.5)
        mine = sandbox.launch_filter()
        assert sandbox.check_confined(pid, uid, parent=init, launcher=proc.pid, first=mine) is None
        assert sandbox.first_filter(pid) == mine
        end = time.monotonic() + 2                              # ptrace let it go on
        while proc_status(pid)["State"].split()[0] != "S":      # (back to its sleep)
            assert time.monotonic() < end, proc_status(pid)["State"]
            time.sleep(0.01)
        assert sandbox.check_confined(pid, uid + 1, parent=init).startswith("Uid ")
        assert sandbox.check_confined(pid, uid, parent=proc.pid).startswith("parent ")
        assert sandbox.check_confined(pid, uid, parent=init, launcher=os.getpid()).startswith(
            f"its parent {init} is not a child of its launcher")
        assert sandbox.check_confined(pid, uid, filters=2) == \
            "1 seccomp filters, the launcher loads 2"
        assert sandbox.check_confined(pid, uid, reference=pid) == \
            "shares the daemon's user namespace"
        # a filter as wide as the launcher's but not its program (a scanner's own, had the
        # launcher loaded none): refused, though the count and the rest look alike
        from vhostni.scanner import seccomp
        other = seccomp.build_filter(dict(sandbox.LAUNCH_ALLOWED_X86_64, kill=62), self_only={},
                                     pid=1, arg_rules=sandbox.LAUNCH_ARG_RULES)
        proc, init, pid, uid = launch(True, filt=other)
        procs.append(proc)
        time.sleep(0.5)
        assert sandbox.check_confined(pid, uid, parent=init, launcher=proc.pid) is None
        assert sandbox.check_confined(pid, uid, parent=init, launcher=proc.pid, first=mine) == \
            "its first seccomp filter is not the launcher's"
    finally:
        for p in procs:
            p.kill()
            p.wait()
        os.rmdir(root)


def test_memory_bomb_hits_its_limit(kits):
    spec = scanner_spec("bomb", "membomb.py", memory_mb=128)
    k = kits({"a": policy(scanners=[spec])})
    rep = k.report("a", "bomb")
    assert rep["outcome"] == "MemoryError" and rep["megabytes"] < 128
    k.until(lambda: k.sp("a", "bomb").counters.restarts >= 1, 5, "the restart")
    stopped = k.alerts_matching("scanner stopped", "a", "bomb")[0]["message"]
    assert "exited with status 9" in stopped or "closed its socket" in stopped


def test_alert_flood_is_rate_limited(kits):
    spec = scanner_spec("loud", "alertflood.py", config={"count": 300}, alerts_per_second=5)
    k = kits({"a": policy(scanners=[spec])})
    sp = k.sp("a", "loud")
    k.until(lambda: sp.counters.alerts + sp.counters.alerts_suppressed == 300, 10, "all 300 alerts")
    assert sp.counters.alerts <= 12 and sp.counters.alerts_suppressed >= 288
    assert len(k.alerts_matching("flood", "a", "loud")) == sp.counters.alerts
    assert sp.running
    _check_alert_log(k)


def test_scanners_cannot_signal_each_other(kits):
    """Every scanner runs as nobody: without more, one could stop or kill the others."""
    k = kits({"a": policy(scanners=[scanner_spec("sniper", "sniper.py")]),
              "b": policy(scanners=[decider("good", contain(dport=443))])})
    k.wait_subscribed("b", "good")
    victim = k.sp("b", "good").proc.pid
    k.report("a", "sniper")
    k.sp("a", "sniper").kill("restart after the victim is up")
    k.until(lambda: len(k.alerts_matching("report", "a", "sniper")) == 2, 10, "the second report")
    rep = k.alerts_matching("report", "a", "sniper")[-1]["fields"]
    assert rep["self_tgkill"] is True and rep["own_limits"] == [True, True]
    assert victim not in rep["after"], "after lockdown, tgkill(2) could signal another scanner"
    assert rep["after"] == []
    assert rep["limits"] == [], "after lockdown, prlimit64(2) could reach another process"


def test_scanners_die_with_the_daemon(tmp_path):
    """A scanner that spins (never reads its socket) must not outlive a daemon killed hard."""
    os.chmod(tmp_path, 0o755)
    pol = write_policy(str(tmp_path / "a.json"), policy(scanners=[hostile("hang", "hang.py")]))
    stats = tmp_path / "stats.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhostni", "run", "--ni", f"a={tmp_path}/a.sock", "--policy", f"a={pol}",
         "--alert-log", str(tmp_path / "alerts.jsonl"), "--stats-file", str(stats)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = None
    try:
        end = time.monotonic() + 10
        while pid is None and time.monotonic() < end:
            try:
                pid = json.loads(stats.read_text())["nis"]["a"]["kernel"]["scanners"]["hang"]["pid"]
            except (OSError, ValueError, KeyError, TypeError):
                time.sleep(0.05)
        assert pid and alive(pid)
        proc.kill()
        proc.wait(5)
        end = time.monotonic() + 3
        while alive(pid) and time.monotonic() < end:
            time.sleep(0.05)
        assert not alive(pid), "the scanner outlived its daemon"
    finally:
        if proc.poll() is None:
            proc.kill()
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------
# Before the SDK's lockdown: the launcher's confinement alone
# ---------------------------------------------------------------------------

def test_scanners_cannot_signal_each_other_before_lockdown(kits):
    k = kits({"a": policy(scanners=[scanner_spec("sniper", "sniper.py")]),
              "b": policy(scanners=[decider("good", contain(dport=443))])})
    k.wait_subscribed("b", "good")
    victim = k.sp("b", "good").proc.pid
    k.report("a", "sniper")
    k.sp("a", "sniper").kill("restart after the victim is up")
    k.until(lambda: len(k.alerts_matching("report", "a", "sniper")) == 2, 10, "the second report")
    assert victim not in k.alerts_matching("report", "a", "sniper")[-1]["fields"]["before"]


def test_a_scanner_leaves_no_process_behind(kits):
    k = kits({"a": policy(scanners=[scanner_spec("forker", "forker.py")])})
    rep = k.report("a", "forker")
    child = rep["child"]
    # the launcher's filter refuses the fork (and RLIMIT_NPROC, at bwrap + its init + the
    # scanner under a uid of its own, would too)
    assert child is None and rep["error"] == "Operation not permitted", rep
    # and the scanner itself does not outlive its stop
    sp = k.sp("a", "forker")
    pid = sp.proc.pid
    assert alive(pid)
    sp.stop()
    k.until(lambda: not alive(pid), 5, "the scanner gone after its stop")


def test_refusal_alerts_are_rate_limited_too(kits):
    """Each refused request is alerted, and each alert is fsynced: unlimited, one scanner
    could keep the daemon busy writing its log."""
    spec = scanner_spec("pushy", "refusals.py", config={"count": 400}, alerts_per_second=5)
    k = kits({"a": policy(scanners=[spec])})
    sp = k.sp("a", "pushy")
    k.until(lambda: sp.counters.refused == 800, 10, "800 refusals")
    logged = len(k.alerts_matching("scanner asked", "a", "pushy"))
    assert logged <= 15, f"{logged} alerts logged for one scanner's refusals"
    assert sp.counters.alerts_suppressed >= 785
    assert sp.running


def test_scanner_uids_in_use_by_another_process_are_skipped():
    """Another vhostni process (daemon, replay, test run) may run a scanner as a uid of the
    range: with RLIMIT_NPROC 1 ours could not even start as that uid."""
    from vhostni.sandbox import UidPool
    first = UidPool().take()
    other = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: os.setuid(first))
    try:
        deadline = time.monotonic() + 5
        while os.stat(f"/proc/{other.pid}").st_uid != first and time.monotonic() < deadline:
            time.sleep(0.01)
        pool = UidPool()
        u = pool.take()
        assert u != first and UID_BASE <= u < UID_BASE + UID_COUNT
        assert pool.take() not in (u, first)
    finally:
        other.kill()
        other.wait()
