"""vhostni as a system service: the daemon config file, systemd readiness (sd_notify), the unit
files (checked by systemd-analyze), the socket group for libvirt's QEMU user, and `make install`."""
from __future__ import annotations

import grp
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vhostni.cli import build_parser
from vhostni.service import ConfigError, config_argv, expand_config

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "examples" / "systemd"


def _argv(tmp_path, text: str) -> list[str]:
    f = tmp_path / "vhostni.toml"
    f.write_text(text)
    p = build_parser()
    return config_argv(str(f), p.run_parser)


def test_config_file_is_the_command_line(tmp_path):
    argv = _argv(tmp_path, """
[daemon]
alert_log = "/var/log/vhostni/a.jsonl"
alert_log_max_bytes = 1000
admin = ["unix:/run/a.sock", "tcp:127.0.0.1:4444"]
admin_allow_uid = [0, "root"]
poll = true
verbose = false
syslog = true
[[ni]]
name = "vm1"
socket = "/run/vm1.sock"
policy = "pol/vm1.toml"
qemu_qmp = "/run/vm1.qmp"
qemu_nic = "net0"
[[ni]]
name = "vm2"
client = "vm2.sock"
""")
    assert argv == [
        "--alert-log", "/var/log/vhostni/a.jsonl", "--alert-log-max-bytes", "1000",
        "--admin", "unix:/run/a.sock", "--admin", "tcp:127.0.0.1:4444",
        "--admin-allow-uid", "0", "--admin-allow-uid", "root", "--poll", "--syslog",
        "--ni", "vm1=/run/vm1.sock", "--policy", f"vm1={tmp_path}/pol/vm1.toml",
        "--qemu-qmp", "vm1=/run/vm1.qmp,nic=net0",
        "--ni", f"vm2=client:{tmp_path}/vm2.sock"]
    # and argparse takes it as it takes the command line
    args = build_parser().parse_args(["run"] + argv)
    assert args.ni == [("vm1", "/run/vm1.sock"), ("vm2", f"client:{tmp_path}/vm2.sock")]
    assert args.poll and args.syslog == "/dev/log" and args.admin_allow_uid == [0, 0]


@pytest.mark.parametrize("text, error", [
    ("[daemon]\nno_such = 1\n", "daemon.no_such: not a `vhostni run` option"),
    ("[daemon]\nni = 'x'\n", "NIs go in [[ni]] tables"),
    ("[daemon]\npoll = 'yes'\n", "daemon.poll: expected true or false"),
    ("[daemon]\nalert_log = 1.5\n", "daemon.alert_log: expected a string or an integer"),
    ("[daemon]\nalert_log = true\n", "daemon.alert_log: expected a string or an integer"),
    ("[other]\n", "unknown section 'other'"),
    ("[[ni]]\nname = 'a'\n", "exactly one of socket"),
    ("[[ni]]\nname = 'a'\nsocket = 's'\nclient = 'c'\n", "exactly one of socket"),
    ("[[ni]]\nsocket = 's'\n", "ni[0].name: required"),
    ("[[ni]]\nname = 'a'\nsocket = 's'\nmac = 'x'\n", "ni[0].mac: unknown key"),
    ("[[ni]]\nname = 'a'\nsocket = 's'\nqemu_nic = 'n'\n", "qemu_nic: only with qemu_qmp"),
    ("ni = 3\n", "ni must be an array of tables"),
    ("[daemon\n", "vhostni.toml"),
])
def test_config_errors_name_the_key(tmp_path, text, error):
    with pytest.raises(ConfigError) as e:
        _argv(tmp_path, text)
    assert error in str(e.value)


def test_command_line_adds_to_the_config(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[[ni]]\nname = 'vm1'\nsocket = '/run/vm1.sock'\n")
    p = build_parser()
    argv = expand_config(["run", "--config", str(f), "--ni", "vm2=/run/vm2.sock", "-v"], p,
                         p.run_parser)
    args = p.parse_args(argv)
    assert args.ni == [("vm1", "/run/vm1.sock"), ("vm2", "/run/vm2.sock")] and args.verbose


def test_bad_config_is_a_clear_error(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[daemon]\nbogus = 1\n")
    r = subprocess.run([sys.executable, "-m", "vhostni", "run", "--config", str(f)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "daemon.bogus: not a `vhostni run` option" in r.stderr
    assert "Traceback" not in r.stderr


def _recv(sock: socket.socket, want: str) -> list[str]:
    """Datagrams from the daemon until one holds ``want``."""
    seen = []
    while True:
        try:
            msg = sock.recv(4096).decode()
        except socket.timeout:
            raise AssertionError(f"no {want!r} from the daemon; got {seen}") from None
        seen.append(msg)
        if want in msg.split("\n"):
            return seen


def test_daemon_from_config_notifies_systemd(tmp_path):
    """Type=notify: READY=1 once every socket listens; RELOADING=1 then READY=1 on SIGHUP
    (systemctl reload); STOPPING=1 on SIGTERM. The NI socket belongs to --socket-group."""
    group = grp.getgrnam("kvm").gr_gid if _has_group("kvm") else os.getgid()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    sock = tmp_path / "vm1.sock"
    conf = tmp_path / "vhostni.toml"
    conf.write_text(f"""
[daemon]
alert_log = "{tmp_path}/alerts.jsonl"
admin = ["unix:{tmp_path}/admin.sock"]
socket_group = {group}
[[ni]]
name = "vm1"
socket = "vm1.sock"
""")
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    log = open(tmp_path / "daemon.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "vhostni", "run", "--config", str(conf)],
                            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        _recv(notify, "READY=1")
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode) and st.st_gid == group
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert stat.S_ISSOCK(os.stat(tmp_path / "admin.sock").st_mode)
        proc.send_signal(signal.SIGHUP)
        seen = _recv(notify, "READY=1")
        assert any("RELOADING=1" in m for m in seen), seen
        proc.send_signal(signal.SIGTERM)
        _recv(notify, "STOPPING=1")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        log.seek(0)
        print(log.read())


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (Debian package systemd)")
@pytest.mark.parametrize("unit, name", [("vhostni.service", "vhostni.service"),
                                        ("vhostni@.service", "vhostni@tenant1.service")])
def test_units_verify(tmp_path, unit, name):
    """systemd's own checker finds nothing wrong with the units (pointed at this checkout's
    vhostni command instead of the installed /usr/local/bin/vhostni)."""
    exe = shutil.which("vhostni", path=os.path.dirname(sys.executable))
    assert exe, "vhostni command not installed next to this python (make build)"
    text = (UNITS / unit).read_text().replace("/usr/local/bin/vhostni", exe)
    (tmp_path / name).write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / name)],
                       capture_output=True, text=True, timeout=60)
    # systemd-analyze also complains about the host's own units it loads as dependencies
    # (libvirtd.service etc. on a host without systemd running); only lines about ours count
    ours = [l for l in (r.stdout + r.stderr).splitlines() if name.split("@")[0] in l
            and "libvirtd" not in l]
    assert not ours, "\n".join(ours)


def test_units_match_the_config_and_install():
    """The units start what `make install` installs, with the config file it installs."""
    mk = (ROOT / "Makefile").read_text()
    for unit in ("vhostni.service", "vhostni@.service"):
        text = (UNITS / unit).read_text()
        m = re.search(r"^ExecStart=(\S+) run --config (\S+)$", text, re.M)
        assert m and m.group(1) == "/usr/local/bin/vhostni"
        assert m.group(2).startswith("/etc/vhostni/")
        assert "ExecReload=/bin/kill -HUP $MAINPID" in text and "Type=notify" in text
    assert "examples/systemd" in mk


def test_make_install_into_prefix(tmp_path):
    """`make install` puts a venv with the vhostni command under PREFIX and the units, and
    the installed command runs without the checkout on sys.path."""
    dest = tmp_path / "root"
    r = subprocess.run(["make", "-C", str(ROOT), "install", f"DESTDIR={dest}",
                        "PREFIX=/opt/vhostni", "BINDIR=/usr/local/bin",
                        "UNITDIR=/etc/systemd/system", f"SYSTEM_PYTHON={sys.executable}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    exe = dest / "opt/vhostni/bin/vhostni"
    assert exe.exists()
    assert os.readlink(dest / "usr/local/bin/vhostni") == "/opt/vhostni/bin/vhostni"
    assert (dest / "etc/systemd/system/vhostni.service").exists()
    assert (dest / "etc/systemd/system/vhostni@.service").exists()
    assert (dest / "etc/vhostni/vhostni.toml.example").exists()
    out = subprocess.run([str(exe), "run", "--help"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and "--config" in out.stdout
    loc = subprocess.run([str(dest / "opt/vhostni/bin/python"), "-c",
                          "import vhostni, vhostni._fastpath; print(vhostni.__file__)"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert loc.returncode == 0, loc.stderr
    assert str(dest / "opt/vhostni") in loc.stdout


def test_too_many_nis_is_a_clear_error(tmp_path):
    """One NI more than the switch has ports: a one-line error naming the limit, exit 1, no
    traceback (it was `FastPathError: add vhost port: value out of range`)."""
    from vhostni.fastpath import MAX_PORTS
    argv = [sys.executable, "-m", "vhostni", "run", "--alert-log", str(tmp_path / "al")]
    for i in range(MAX_PORTS + 1):
        argv += ["--ni", f"n{i}={tmp_path}/n{i}.sock"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert f"at most {MAX_PORTS} ports" in r.stderr


def test_a_socket_that_fails_does_not_cost_a_port(tmp_path):
    """An NI whose socket cannot be made gives its switch port back."""
    from vhostni.daemon import Daemon
    from vhostni.fastpath import MAX_PORTS
    d = Daemon([], alert_log=str(tmp_path / "al"))
    try:
        for _ in range(MAX_PORTS + 5):
            with pytest.raises(OSError):
                d.add_ni("x", str(tmp_path / "no" / "such" / "dir.sock"))
        d.add_ni("ok", str(tmp_path / "ok.sock"))
    finally:
        d.close()


def test_an_ni_socket_another_process_listens_on_is_not_taken_over(tmp_path):
    """`--ni NAME=PATH` replaces a stale socket of an earlier run, never a live one: unlinking
    a second daemon's NI socket (or any service's) took its clients away."""
    from vhostni.daemon import Daemon
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(tmp_path / "live.sock"))
    live.listen()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()                         # the file stays, nobody listens
    ino = os.stat(tmp_path / "live.sock").st_ino
    d = Daemon([], alert_log=str(tmp_path / "al"))
    try:
        with pytest.raises(OSError, match="listening on this socket already"):
            d.add_ni("x", str(tmp_path / "live.sock"))
        assert os.stat(tmp_path / "live.sock").st_ino == ino
        d.add_ni("y", str(tmp_path / "stale.sock"))
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(tmp_path / "stale.sock"))          # now the daemon's
        c.close()
    finally:
        d.close()
        live.close()


def test_a_sighup_during_a_reload_starts_one_more_not_a_storm(tmp_path):
    """Reloads load on a worker thread; a SIGHUP that comes while one runs waits for it and
    then starts exactly one more: two RELOADING=1 in all (the loop used to re-announce the
    pending reload on every pass while the first one compiled)."""
    rules = tmp_path / "many.rules"
    rules.write_text("".join(f'alert tcp any any -> $HOME_NET any (msg:"r{i}"; content:"never-{i:05d}-xyz"; '
                             f'sid:{1000 + i};)\n' for i in range(4000)))
    pol = tmp_path / "vm1.toml"
    pol.write_text(f'[ni]\naddresses = ["10.1.2.3/32"]\n[signatures]\nrules = ["{rules}"]\n')
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    log = open(tmp_path / "daemon.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "vhostni", "run", "--ni", f"vm1={tmp_path}/vm1.sock",
                             "--policy", f"vm1={pol}", "--alert-log", str(tmp_path / "alerts.jsonl")],
                            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        _recv(notify, "READY=1")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.05)
        proc.send_signal(signal.SIGHUP)           # while the first reload compiles
        seen = _recv(notify, "READY=1")            # the first reload applied
        seen += _recv(notify, "READY=1")           # and the one more
        notify.settimeout(2)
        try:
            while True:
                seen.append(notify.recv(4096).decode())
        except socket.timeout:
            pass
        reloading = [m for m in seen if "RELOADING=1" in m]
        assert len(reloading) == 2, seen
    finally:
        proc.kill()
        proc.wait()
        notify.close()
        log.seek(0)
        print(log.read()[-3000:])
