"""images/build.py: module order from .modinfo, shared-library closure, cpio, and the built initramfs."""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import lzma
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("images_build", REPO / "images" / "build.py")
build = importlib.util.module_from_spec(_spec)
sys.modules["images_build"] = build
_spec.loader.exec_module(build)


# ---- module order, on fabricated dependency data -------------------------------------------------------------

def order_of(deps: dict[str, list[str]], roots, builtin=()):
    return build.module_load_order(roots, lambda n: deps.get(n), builtin)


def assert_respects(order: list[str], deps: dict[str, list[str]], builtin=()) -> None:
    pos = {m: i for i, m in enumerate(order)}
    assert len(pos) == len(order), f"duplicates in {order}"
    for m in order:
        for d in deps[m]:
            if d in builtin:
                continue
            assert pos[d] < pos[m], f"{d} must load before {m}: {order}"


def test_module_order_debian_virtio_chain():
    # The real shape of Debian 6.1's virtio modules.
    deps = {
        "virtio_ring": [], "virtio": [], "virtio_pci_legacy_dev": [], "virtio_pci_modern_dev": [],
        "virtio_pci": ["virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio"],
        "failover": [], "net_failover": ["failover"],
        "virtio_net": ["virtio_ring", "virtio", "net_failover"],
        "unrelated": ["virtio"],
    }
    order = order_of(deps, ["virtio_pci", "virtio_net"])
    assert_respects(order, deps)
    assert set(order) == set(deps) - {"unrelated"}
    assert order[-1] == "virtio_net"


def test_module_order_diamond_and_determinism():
    deps = {"top": ["left", "right"], "left": ["base"], "right": ["base"], "base": []}
    order = order_of(deps, ["top"])
    assert order == ["base", "left", "right", "top"]
    assert order_of(deps, ["top"]) == order


def test_module_order_skips_builtin_and_normalizes_dashes():
    deps = {"virtio_net": ["virtio", "net_failover"], "net_failover": ["failover"], "failover": []}
    order = order_of(deps, ["virtio-net"], builtin=["virtio"])
    assert order == ["failover", "net_failover", "virtio_net"]
    # A root that is builtin needs nothing at all.
    assert order_of({}, ["virtio_net"], builtin=["virtio_net"]) == []


def test_module_order_cycle_and_missing_are_errors():
    with pytest.raises(build.BuildError, match="cycle: a -> b -> a"):
        order_of({"a": ["b"], "b": ["a"]}, ["a"])
    with pytest.raises(build.BuildError, match="ghost is neither a .ko"):
        order_of({"a": ["ghost"]}, ["a"])


def test_module_deps_reads_depends_and_softdep_pre():
    info = {"depends": ["virtio_ring,virtio,net-failover"], "softdep": ["pre: crc32c post: foo"]}
    assert build.module_deps(info) == ["virtio_ring", "virtio", "net_failover", "crc32c"]
    assert build.module_deps({"depends": [""]}) == []


def test_parse_depends():
    assert build.parse_depends("libc6 (>= 2.34), libssl3 (>= 3.0.0) | libssl1.1, perl:any, debconf") == \
        ["libc6", "libssl3", "perl", "debconf"]


def fake_module(tmp_path: Path, modinfo: list[str]) -> bytes:
    """A real ELF object whose .modinfo section holds the given key=value strings."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    body = "".join(f'__attribute__((section(".modinfo"), used)) static const char m{i}[] = "{s}";\n'
                   for i, s in enumerate(modinfo))
    src = tmp_path / "fake.c"
    src.write_text(body)
    obj = tmp_path / "fake.ko"
    subprocess.run(["gcc", "-c", "-o", str(obj), str(src)], check=True)
    return obj.read_bytes()


def test_read_modinfo_and_compressed_modules(tmp_path):
    ko = fake_module(tmp_path, ["name=fake_net", "depends=virtio,virtio_ring", "alias=a1", "alias=a2"])
    info = build.read_modinfo(ko)
    assert info["name"] == ["fake_net"]
    assert info["alias"] == ["a1", "a2"]
    assert build.module_deps(info) == ["virtio", "virtio_ring"]
    xz = tmp_path / "fake_net.ko.xz"
    xz.write_bytes(lzma.compress(ko, format=lzma.FORMAT_XZ))
    assert build.decompress_module(xz) == ko
    gz = tmp_path / "fake_net.ko.gz"
    gz.write_bytes(gzip.compress(ko))
    assert build.decompress_module(gz) == ko
    if shutil.which("zstd"):
        zst = tmp_path / "fake_net.ko.zst"
        subprocess.run(["zstd", "-q", "-o", str(zst), str(tmp_path / "fake.ko")], check=True)
        assert build.decompress_module(zst) == ko


def test_kernel_tree_order_from_files(tmp_path):
    """KernelTree finds .ko/.ko.xz files, reads their .modinfo and honours modules.builtin."""
    moddir = tmp_path / "k/lib/modules/6.1.0-test/kernel"
    (tmp_path / "k/boot").mkdir(parents=True)
    (tmp_path / "k/boot/vmlinuz-6.1.0-test").write_bytes(b"kernel")
    moddir.mkdir(parents=True)
    mods = {"virtio_net": "depends=virtio,net_failover", "net_failover": "depends=failover",
            "failover": "depends=", "virtio_pci": "depends=virtio"}
    for i, (name, dep) in enumerate(mods.items()):
        d = tmp_path / f"src{i}"
        d.mkdir()
        ko = fake_module(d, [f"name={name}", dep])
        if name == "net_failover":
            (moddir / "net-failover.ko.xz").write_bytes(lzma.compress(ko))
        else:
            (moddir / f"{name}.ko").write_bytes(ko)
    (moddir.parent / "modules.builtin").write_text("kernel/drivers/virtio/virtio.ko\n")
    kt = build.KernelTree.open(tmp_path / "k")
    assert kt.version == "6.1.0-test"
    order = kt.load_order(["virtio_pci", "virtio_net"])
    assert order == ["virtio_pci", "failover", "net_failover", "virtio_net"]


# ---- cpio ----------------------------------------------------------------------------------------------------

def test_cpio_roundtrip_and_gnu_cpio_agrees(tmp_path):
    c = build.Cpio()
    c.file("bin/busybox", b"\x7fELF" + bytes(range(256)) * 3, 0o755)
    c.symlink("bin/sh", "busybox")
    c.chardev("dev/console", 5, 1)
    c.file("etc/odd", b"x" * 5)
    c.dir("tmp", 0o1777)
    data = c.serialize()
    assert data == c.serialize(), "serialization must be deterministic"
    entries = build.read_cpio(data)
    assert entries["bin/busybox"][1].startswith(b"\x7fELF")
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"busybox"
    assert stat.S_ISCHR(entries["dev/console"][0])
    assert stat.S_IMODE(entries["tmp"][0]) == 0o1777
    assert {"bin", "dev", "etc"} <= set(entries)          # parents were added
    if shutil.which("cpio"):
        listing = subprocess.run(["cpio", "-it", "--quiet"], input=data, capture_output=True, check=True)
        assert sorted(listing.stdout.decode().split()) == sorted(entries)
        out = tmp_path / "x"
        out.mkdir()
        subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames"], input=data, cwd=out, check=True,
                       capture_output=True)
        assert (out / "etc/odd").read_bytes() == b"x" * 5
        assert os.readlink(out / "bin/sh") == "busybox"


# ---- the built image -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def initrd(vhostni_images):
    return build.read_cpio(gzip.decompress(vhostni_images.initrd.read_bytes()))


def resolve(entries, path: str, depth=0) -> str:
    """Follow symlinks inside the archive."""
    assert depth < 20, f"symlink loop at {path}"
    parts = path.strip("/").split("/")
    for i in range(len(parts)):
        cur = "/".join(parts[:i + 1])
        assert cur in entries, f"{path}: {cur} missing from the initramfs"
        mode, body = entries[cur]
        if stat.S_ISLNK(mode):
            target = body.decode()
            base = "" if target.startswith("/") else "/".join(parts[:i])
            joined = os.path.normpath(os.path.join("/", base, target, *parts[i + 1:]))
            return resolve(entries, joined, depth + 1)
    return "/".join(parts)


def test_initrd_modules_load_in_dependency_order(initrd):
    order = initrd["etc/vhostni/modules"][1].decode().split()
    names = [Path(p).name[:-3] for p in order]
    assert "virtio_net" in names and "virtio_pci" in names
    version = initrd["etc/vhostni/kernel-version"][1].decode().strip()
    loaded: set[str] = set()
    for path, name in zip(order, names):
        assert path.startswith(f"/lib/modules/{version}/") and path.endswith(".ko")
        info = build.read_modinfo(initrd[path.lstrip("/")][1])       # real, uncompressed ELF modules
        assert info["vermagic"][0].startswith(version + " ")
        for dep in build.module_deps(info):
            assert dep in loaded, f"{name} needs {dep}, which is not loaded before it ({names})"
        loaded.add(build.normalize_module(info.get("name", [name])[0]))


def test_initrd_has_busybox_and_applets(initrd):
    mode, busybox = initrd["bin/busybox"]
    assert mode & 0o111 and busybox.startswith(b"\x7fELF")
    needed, interp = build.elf_dynamic(busybox)
    assert needed == [] and interp is None, "busybox must be static"
    for applet in ("sh", "insmod", "ip", "nc", "md5sum", "udhcpc", "ping", "wget", "httpd", "setsid", "cttyhack",
                   "dd", "stty", "base64", "netstat", "seq", "hostname", "mount"):
        paths = [f"{d}/{applet}" for d in ("bin", "sbin", "usr/bin", "usr/sbin") if f"{d}/{applet}" in initrd]
        assert paths, f"busybox applet {applet} not in PATH dirs of the initramfs"
        assert resolve(initrd, paths[0]) == "bin/busybox", applet


@pytest.mark.parametrize("program, lib", [("usr/bin/iperf3", "libiperf"), ("sbin/ethtool", "libmnl")])
def test_initrd_has_dynamic_program_with_all_its_libraries(initrd, program, lib):
    lib_dirs = [d for d in build.LIB_DIRS]
    todo = [program]
    seen = set()
    interp_found = False
    while todo:
        path = resolve(initrd, todo.pop())
        if path in seen:
            continue
        seen.add(path)
        needed, interp = build.elf_dynamic(initrd[path][1])
        if interp:
            assert stat.S_ISREG(initrd[resolve(initrd, interp)][0])
            interp_found = True
        for soname in needed:
            hits = [f"{d}/{soname}" for d in lib_dirs if f"{d}/{soname}" in initrd]
            assert hits, f"{path} needs {soname}, not in the initramfs"
            todo.append(hits[0])
    assert interp_found
    assert any(lib in p for p in seen)
    if program.endswith("iperf3"):
        assert any("libcrypto" in p for p in seen)


def test_initrd_boot_essentials(initrd):
    mode, init = initrd["init"]
    assert mode & 0o111 and init.startswith(b"#!/bin/sh")
    assert b"VHOSTNI-GUEST-READY" in init
    assert stat.S_ISCHR(initrd["dev/console"][0])
    assert initrd["etc/vhostni/udhcpc.script"][0] & 0o111
    for d in ("proc", "sys", "dev", "tmp", "root"):
        assert stat.S_ISDIR(initrd[d][0])


def test_guest_programs_are_static(initrd, vhostni_images):
    for name in sorted(p.stem for p in (REPO / "guests").glob("*.c")):
        assert f"bin/{name}" in initrd, f"guests/{name}.c is not in {vhostni_images.initrd}: stale, run `make images`"
        mode, exe = initrd[f"bin/{name}"]
        assert mode & 0o111
        assert build.elf_dynamic(exe) == ([], None), f"{name} must be linked statically"


def test_build_is_incremental_and_reproducible(tmp_path, vhostni_images):
    """Two forced builds give identical bytes; a third run with nothing changed rebuilds nothing."""
    cache = REPO / "images" / "cache"
    cmd = [sys.executable, str(REPO / "images" / "build.py"), "--cache", str(cache)]
    for out in ("a", "b"):
        r = subprocess.run(cmd + ["--out", str(tmp_path / out), "--force"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    a, b = (hashlib.sha256((tmp_path / o / "initrd.cpio.gz").read_bytes()).hexdigest() for o in "ab")
    assert a == b
    before = (tmp_path / "a" / "initrd.cpio.gz").stat().st_mtime_ns
    r = subprocess.run(cmd + ["--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert r.returncode == 0 and "up to date" in r.stderr, r.stderr
    assert (tmp_path / "a" / "initrd.cpio.gz").stat().st_mtime_ns == before


def test_guest_programs_compile_statically_and_incrementally(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.c").write_text('#include <stdio.h>\nint main(void) { puts("hello"); return 0; }\n')
    built = build.compile_guest_programs(src, tmp_path / "bin")
    exe = built["hello"]
    assert build.elf_dynamic(exe.read_bytes()) == ([], None)
    assert subprocess.run([str(exe)], capture_output=True, text=True).stdout == "hello\n"
    mtime = exe.stat().st_mtime_ns
    assert build.compile_guest_programs(src, tmp_path / "bin")["hello"].stat().st_mtime_ns == mtime
    (src / "broken.c").write_text("int main(void) { return }\n")
    with pytest.raises(build.BuildError, match="broken.c"):
        build.compile_guest_programs(src, tmp_path / "bin")


# ---- a user's own files and boot hooks (--add, --hook) -------------------------------------------------------

def test_parse_add():
    assert build.parse_add("prog.c") == build.Addition(Path("prog.c"), None)
    assert build.parse_add("dir/x:/opt/x") == build.Addition(Path("dir/x"), "/opt/x")
    assert build.parse_add("a:b") == build.Addition(Path("a:b"), None)        # DEST must be absolute
    assert build.parse_add("/srv/f.txt:/etc/") == build.Addition(Path("/srv/f.txt"), "/etc/")
    with pytest.raises(build.BuildError, match=r"\.\."):
        build.parse_add("f:/etc/../x")


HOOK = """grep -q vhostni.test_hook_fail /proc/cmdline && exit 3
echo "hook-ran on $(hostname) with $(ip -o -4 addr show dev eth0 | awk '{print $4}')" > /tmp/hook.out
"""


@pytest.fixture(scope="module")
def custom_image(tmp_path_factory):
    """An image built through `vhostni images build` with a C program, a directory, a data file, a hook."""
    if shutil.which("gcc") is None or shutil.which("apt-get") is None:
        pytest.skip("needs gcc and apt-get")
    t = tmp_path_factory.mktemp("custom")
    (t / "hello.c").write_text('#include <stdio.h>\nint main(void) { puts("hello-from-user"); return 0; }\n')
    (t / "tree" / "sub").mkdir(parents=True)
    (t / "tree" / "sub" / "data.txt").write_text("payload\n")
    (t / "tree" / "run.sh").write_text("#!/bin/sh\necho tree-ran\n")
    (t / "tree" / "run.sh").chmod(0o755)
    (t / "notes.txt").write_text("notes\n")
    (t / "hook.sh").write_text(HOOK)
    cmd = [sys.executable, "-m", "vhostni", "images", "build", "--out", str(t / "out"),
           "--cache", str(REPO / "images" / "cache"), "--add", str(t / "hello.c"),
           "--add", f"{t / 'tree'}:/opt/tree", "--add", str(t / "notes.txt"), "--hook", str(t / "hook.sh")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return t, cmd


def test_build_adds_user_files_and_hooks(custom_image):
    t, cmd = custom_image
    entries = build.read_cpio(gzip.decompress((t / "out" / "initrd.cpio.gz").read_bytes()))
    mode, hello = entries["bin/hello"]
    assert mode & 0o111 and build.elf_dynamic(hello) == ([], None)          # compiled static
    assert entries["opt/tree/sub/data.txt"][1] == b"payload\n"
    assert entries["opt/tree/run.sh"][0] & 0o111
    assert entries["root/notes.txt"] == (stat.S_IFREG | 0o644, b"notes\n")
    assert entries["etc/vhostni/hooks/00-hook.sh"][0] & 0o111
    assert "bin/worm" in entries and "bin/dnsd" in entries                  # the project's guest programs too
    manifest = json.loads((t / "out" / "manifest.json").read_text())
    assert manifest["hooks"] == ["/etc/vhostni/hooks/00-hook.sh"]
    assert manifest["added"]["/root/notes.txt"] == hashlib.sha256(b"notes\n").hexdigest()
    # nothing changed: up to date; a changed hook: rebuilt
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and "up to date" in r.stderr, r.stderr
    shutil.copytree(t / "out", t / "out2")
    changed = t / "changed"
    changed.mkdir()
    (changed / "hook.sh").write_text("echo changed > /tmp/hook.out\n")
    cmd2 = [str(t / "out2") if a == str(t / "out") else str(changed / "hook.sh") if a == str(t / "hook.sh")
            else a for a in cmd]
    r = subprocess.run(cmd2, capture_output=True, text=True)
    assert r.returncode == 0 and "up to date" not in r.stderr, r.stderr
    entries2 = build.read_cpio(gzip.decompress((t / "out2" / "initrd.cpio.gz").read_bytes()))
    assert entries2["etc/vhostni/hooks/00-hook.sh"][1] == b"echo changed > /tmp/hook.out\n"


def test_build_refuses_bad_additions_before_downloading(tmp_path):
    base = [sys.executable, "-m", "vhostni", "images", "build", "--out", str(tmp_path / "out"),
            "--cache", str(tmp_path / "empty-cache")]
    r = subprocess.run(base + ["--add", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert r.returncode == 1 and "no such file" in r.stderr and not (tmp_path / "empty-cache").exists()
    r = subprocess.run(base + ["--hook", str(tmp_path / "nothing.sh")], capture_output=True, text=True)
    assert r.returncode == 1 and "--hook" in r.stderr and not (tmp_path / "empty-cache").exists()


def test_build_refuses_a_dynamic_program_the_image_cannot_run(tmp_path):
    if shutil.which("apt-get") is None:
        pytest.skip("needs apt-get")
    ls = shutil.which("ls")
    r = subprocess.run([sys.executable, "-m", "vhostni", "images", "build", "--out", str(tmp_path / "out"),
                        "--cache", str(REPO / "images" / "cache"), "--add", ls], capture_output=True, text=True)
    assert r.returncode == 1 and "link it statically" in r.stderr, r.stderr
    assert not (tmp_path / "out" / "initrd.cpio.gz").exists()


@pytest.mark.guest
def test_added_program_and_hook_run_in_the_guest(custom_image, vhostni_guest_factory):
    t, _ = custom_image
    from vhostni.testing import GuestImages, UserNic
    g = vhostni_guest_factory("custom", images=GuestImages.locate(t / "out"), nics=[UserNic()],
                              ip="10.0.2.15/24")
    out = g.check("cat /tmp/hook.out; hello; /opt/tree/run.sh; cat /opt/tree/sub/data.txt")
    want = ["hook-ran on custom with 10.0.2.15/24", "hello-from-user", "tree-ran", "payload"]
    assert out.split("\n")[:4] == want, out


@pytest.mark.guest
def test_a_failing_hook_is_a_boot_error(custom_image, vhostni_guest_factory):
    t, _ = custom_image
    from vhostni.testing import GuestBootError, GuestImages
    with pytest.raises(GuestBootError, match=r"boot hook 00-hook.sh failed \(status 3\)"):
        vhostni_guest_factory("hookfail", images=GuestImages.locate(t / "out"), cmdline="vhostni.test_hook_fail")
