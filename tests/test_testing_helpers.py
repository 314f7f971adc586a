"""vhostni.testing without QEMU: QEMU command lines, the daemon runner, and the pytest plugin's fixtures."""
from __future__ import annotations

import shutil
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from vhostni.testing import (DaemonError, Guest, GuestImages, GuestLogin, ImagesMissing, TapNic, UserNic,
                             VhostniDaemon, VhostUserNic, mac_for)

REPO = Path(__file__).resolve().parent.parent

pytest_plugins = ["pytester"]

FAKE_IMAGES = GuestImages(Path("/images/vmlinuz"), Path("/images/initrd.cpio.gz"))


def opt_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_qemu_command_line_for_vhost_user_under_tcg():
    g = Guest("alpha", FAKE_IMAGES, accel="tcg",
              nics=[VhostUserNic(socket="/tmp/s/a.sock"), TapNic(ifname="tap9"), UserNic(hostfwd=["tcp::2222-:22"])],
              ip=["192.0.2.1/24", "dhcp", "none"], gw="192.0.2.254", mtu=[9000, 1500], dns="192.0.2.53")
    argv = g.argv()
    assert argv[:3] == ["qemu-system-x86_64", "-accel", "tcg"]
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in opt_after(argv, "-object")
    assert "pc,memory-backend=mem" in opt_after(argv, "-machine")
    assert opt_after(argv, "-chardev")[1] == "socket,id=c0,path=/tmp/s/a.sock,reconnect=1"
    netdevs = opt_after(argv, "-netdev")
    assert netdevs == ["vhost-user,id=n0,chardev=c0", "tap,id=n1,ifname=tap9,script=no,downscript=no",
                       "user,id=n2,restrict=on,hostfwd=tcp::2222-:22"]
    devices = opt_after(argv, "-device")
    assert devices[0] == f"virtio-net-pci,netdev=n0,mac={mac_for('alpha', 0)},vectors=0"
    assert devices[1] == f"virtio-net-pci,netdev=n1,mac={mac_for('alpha', 1)}"   # vectors=0 only for vhost-user
    cmdline = opt_after(argv, "-append")[0].split()
    assert {"console=ttyS0", "vhostni.hostname=alpha", "vhostni.ip=192.0.2.1/24,dhcp,none",
            "vhostni.gw=192.0.2.254", "vhostni.mtu=9000,1500", "vhostni.dns=192.0.2.53"} <= set(cmdline)


def test_qemu_command_line_variants():
    g = Guest("beta", FAKE_IMAGES, accel="kvm", netns="ns1",
              nics=[VhostUserNic(socket="/s", server=True, mac="52:54:00:00:00:01")])
    argv = g.argv()
    assert argv[:4] == ["ip", "netns", "exec", "ns1"]
    assert opt_after(argv, "-chardev")[1] == "socket,id=c0,path=/s,server=on,wait=off"
    assert opt_after(argv, "-device") == ["virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01"]   # no TCG, no vectors=0
    assert "vhostni.ip" not in opt_after(argv, "-append")[0]
    assert mac_for("beta", 0) != mac_for("beta", 1) and mac_for("beta", 0) == mac_for("beta", 0)
    with pytest.raises(ValueError, match="guest name"):
        Guest("bad name", FAKE_IMAGES)


def test_images_locate(tmp_path):
    with pytest.raises(ImagesMissing, match=f"vhostni images build --out {tmp_path}"):
        GuestImages.locate(tmp_path)
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd.cpio.gz").write_bytes(b"i")
    assert GuestImages.locate(tmp_path).kernel == tmp_path / "vmlinuz"


def test_qemu_command_line_for_guests_of_your_own(tmp_path):
    for name in ("vmlinuz", "initrd", "a,b.qcow2", "disk.img"):
        (tmp_path / name).write_bytes(b"x")
    own = GuestImages.user(tmp_path / "vmlinuz", tmp_path / "initrd", append="quiet root=/dev/vda")
    assert own.login == GuestLogin()
    g = Guest("own", own, nics=[UserNic()], ip="10.0.2.15/24")
    argv = g.argv()
    assert opt_after(argv, "-kernel") == [str(tmp_path / "vmlinuz")]
    assert opt_after(argv, "-initrd") == [str(tmp_path / "initrd")]
    # no vhostni.* keys: a kernel of your own does not read them; the NICs are set up after login
    assert opt_after(argv, "-append") == ["console=ttyS0 panic=-1 quiet root=/dev/vda"]
    assert "-drive" not in argv
    disk = Guest("disk", GuestImages.user(disk=tmp_path / "a,b.qcow2")).argv()
    assert "-kernel" not in disk and "-append" not in disk
    assert opt_after(disk, "-drive") == [f"file={tmp_path}/a,,b.qcow2,if=virtio,format=qcow2,snapshot=on"]
    raw = Guest("raw", GuestImages.user(tmp_path / "vmlinuz", disk=tmp_path / "disk.img")).argv()
    assert opt_after(raw, "-drive")[0].endswith("format=raw,snapshot=on") and "-kernel" in raw
    with pytest.raises(ImagesMissing, match="nothing-here"):
        GuestImages.user(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="kernel or a disk"):
        GuestImages.user()
    with pytest.raises(ValueError, match="needs a kernel"):
        GuestImages.user(initrd=tmp_path / "initrd", disk=tmp_path / "disk.img")
    with pytest.raises(ValueError, match="qcow2 or raw"):
        GuestImages.user(disk=tmp_path / "disk.img", disk_format="vmdk")


def test_default_shell_prompt_matches_busybox_and_bash_prompts():
    import re
    prompt = re.compile(GuestLogin().shell_prompt, re.DOTALL)
    for out in ("vni@a:~# \x1b[6n", "root@debian:~# ", "user@host:~$ ", "\r\n# "):
        assert prompt.search(out), out
    for out in ("[    0.000000] Linux version 6.1.0 (gcc) #1 SMP", "root@debian:~# ls\r\n", "login: "):
        assert not prompt.search(out), out
    assert re.search(GuestLogin().login_prompt, "debian login: ", re.DOTALL)


FAKE_DAEMON = textwrap.dedent("""
    import signal, socket, sys, time
    args = sys.argv[1:]
    assert args[0] == "run", args
    socks = [a.split("=", 1)[1] for p, a in zip(args, args[1:]) if p == "--ni"]
    mode = args[-1]
    print("fake vhostni", args, file=sys.stderr, flush=True)
    if mode == "--die":
        sys.exit(3)
    if mode != "--hang":
        ls = []
        for path in socks:
            s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(); ls.append(s)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    while not stop:
        time.sleep(0.05)
    print("stopping", file=sys.stderr)
""")


def fake(tmp_path, mode, **kw):
    return VhostniDaemon({"a": tmp_path / "a.sock", "b": tmp_path / "b.sock"}, extra_args=[mode],
                         log_path=tmp_path / "d.log", command=[sys.executable, "-c", FAKE_DAEMON], **kw)


def test_daemon_start_wait_and_stop(tmp_path):
    (tmp_path / "a.sock").write_text("stale")      # a stale file must not count as the socket
    d = fake(tmp_path, "--ok").start(timeout=20)
    assert d.alive
    assert d.stop() == 0
    log = d.log_text()
    assert "--ni a=" in log and "stopping" in log


def test_daemon_that_exits_early_is_reported_with_its_log(tmp_path):
    with pytest.raises(DaemonError, match=r"(?s)exited with status 3 .*fake vhostni"):
        fake(tmp_path, "--die").start(timeout=20)


def test_daemon_without_sockets_times_out(tmp_path):
    d = fake(tmp_path, "--hang")
    with pytest.raises(DaemonError, match="did not create .*a.sock.* within 1 s"):
        d.start(timeout=1)
    assert not d.alive


def test_plugin_skips_without_images_but_fails_in_ci(pytester, monkeypatch, tmp_path):
    pytester.makepyfile(test_x="def test_needs_images(vhostni_images):\n    pass\n")
    missing = str(tmp_path / "nothing-here")
    monkeypatch.delenv("CI", raising=False)
    res = pytester.runpytest("--vhostni-images", missing, "--vhostni-no-build", "-rs", "-p", "no:cacheprovider")
    res.assert_outcomes(skipped=1)
    res.stdout.fnmatch_lines([f"*build them with: vhostni images build --out {missing}*"])
    monkeypatch.setenv("CI", "true")
    res = pytester.runpytest("--vhostni-images", missing, "--vhostni-no-build", "-p", "no:cacheprovider")
    res.assert_outcomes(errors=1)
    res.stdout.fnmatch_lines(["*CI=true but guest images not found*"])
    assert not (tmp_path / "nothing-here").exists()          # --vhostni-no-build: nothing was built


def test_plugin_builds_missing_images_by_itself(pytester, monkeypatch, tmp_path):
    """A user's pytest needs no `make images`: the fixture builds them where they belong."""
    if shutil.which("apt-get") is None or shutil.which("gcc") is None:
        pytest.skip("building images needs apt-get and gcc")
    pytester.makepyfile(test_x="""
        def test_needs_images(vhostni_images):
            assert vhostni_images.kernel.is_file() and vhostni_images.initrd.is_file()
            assert "worm" in vhostni_images.manifest["guest_programs"]
    """)
    monkeypatch.delenv("VHOSTNI_IMAGES", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))          # where ~/.cache would be
    monkeypatch.setenv("VHOSTNI_IMAGES_CACHE", str(REPO / "images" / "cache"))   # the packages, not downloaded again
    res = pytester.runpytest("--vhostni-logs", str(tmp_path / "logs"), "-p", "no:cacheprovider")
    res.assert_outcomes(passed=1)
    res.stdout.fnmatch_lines([f"*building guest images into {tmp_path}/xdg/vhostni/images*"])
    assert "wrote" in (tmp_path / "logs" / "vhostni-images-build.log").read_text()


def test_plugin_names_what_to_install_when_it_cannot_build(pytester, monkeypatch, tmp_path):
    pytester.makepyfile(test_x="def test_needs_images(vhostni_images):\n    pass\n")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))        # no apt-get, no dpkg-deb
    d = tmp_path / "imgs"
    res = pytester.runpytest("--vhostni-images", str(d), "--vhostni-logs", str(tmp_path / "logs"), "-rs",
                             "-p", "no:cacheprovider")
    res.assert_outcomes(skipped=1)
    res.stdout.fnmatch_lines([f"*guest images not found in {d} and building them failed: *apt-get and dpkg-deb "
                              f"not found*build them with: vhostni images build --out {d}*"])


def test_plugin_names_the_qemu_package_when_qemu_is_missing(pytester, monkeypatch, tmp_path):
    pytester.makepyfile(test_x="def test_guest(vhostni_guest_factory):\n    pass\n")
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd.cpio.gz").write_bytes(b"i")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("VHOSTNI_QEMU", "no-such-qemu-here")
    res = pytester.runpytest("--vhostni-images", str(tmp_path), "-rs", "-p", "no:cacheprovider")
    res.assert_outcomes(skipped=1)
    res.stdout.fnmatch_lines(["*no-such-qemu-here not found: install Debian's qemu-system-x86 "
                              "(apt-get install qemu-system-x86)*"])


def test_plugin_daemon_factory_logs_and_stops(pytester, tmp_path):
    pytester.makepyfile(test_d=f"""
        import sys
        FAKE = {FAKE_DAEMON!r}
        def test_daemon(vhostni_daemon_factory, vhostni_sockdir, vhostni_logdir):
            d = vhostni_daemon_factory({{"a": vhostni_sockdir / "a.sock"}}, name="fake",
                                       command=[sys.executable, "-c", FAKE], extra_args=["--ok"])
            assert d.alive
            assert d.log_path == vhostni_logdir / "test_d.fake.vhostni.log"
            assert len(str(vhostni_sockdir / "a.sock")) < 100
    """)
    res = pytester.runpytest("--vhostni-logs", str(tmp_path / "logs"), "-p", "no:cacheprovider")
    res.assert_outcomes(passed=1)
    assert "stopping" in (tmp_path / "logs" / "test_d.fake.vhostni.log").read_text()   # stopped at teardown


FAKE_CONSOLE = textwrap.dedent("""
    # A stand-in for QEMU running a distribution: a getty-like login on the terminal, then a shell.
    import os, sys, time
    stub_dir, want_user, want_password = sys.argv[1:4]
    w = sys.stdout.write
    w("[    1.234] Linux version 6.1.0 #1 SMP\\r\\nDebian GNU/Linux 12 ttyS0\\r\\n\\r\\ndebian login: ")
    sys.stdout.flush()
    user = sys.stdin.readline().strip()
    w("Password: "); sys.stdout.flush()
    password = sys.stdin.readline().strip()
    if (user, password) != (want_user, want_password):
        w("\\r\\nLogin incorrect\\r\\ndebian login: "); sys.stdout.flush()
        time.sleep(60)
        sys.exit(1)
    os.environ["PATH"] = stub_dir + os.pathsep + os.environ["PATH"]
    os.environ["PS1"] = "user@debian:~$ "
    os.execvp("sh", ["sh", "-i"])
""")


def fake_distribution(tmp_path, password):
    """A Guest whose "QEMU" is FAKE_CONSOLE (it ignores QEMU's arguments); `hostname` is a stub that records
    what the harness sets, so the host's own name is never touched."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    (stubs / "hostname").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/hostname.set\n")
    (stubs / "hostname").chmod(0o755)
    fake = tmp_path / "fake-qemu"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c '{FAKE_CONSOLE}' {stubs} alice {password}\n")
    fake.chmod(0o755)
    (tmp_path / "vmlinuz").write_bytes(b"k")
    own = GuestImages.user(tmp_path / "vmlinuz", login=GuestLogin(user="alice", password="s3cret"))
    return Guest("own", own, qemu=str(fake), log_dir=tmp_path, boot_timeout=20)


def test_login_with_password_on_a_guest_of_your_own(tmp_path):
    g = fake_distribution(tmp_path, "s3cret")
    try:
        g.boot()
        assert g.run("echo $((6 * 7)); false") == ("42\n", 1)
        assert (tmp_path / "hostname.set").read_text() == "own\n"
    finally:
        g.close()


def test_a_failed_login_is_a_boot_error_naming_the_user(tmp_path):
    from vhostni.testing import GuestBootError
    g = fake_distribution(tmp_path, "other")
    with pytest.raises(GuestBootError, match=r"login as 'alice' failed \(Login incorrect\)"):
        g.boot()
    assert not g.alive
