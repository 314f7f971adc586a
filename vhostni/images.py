"""Build the vhostni test guest: Debian's kernel and a busybox initramfs.

    vhostni images build [--out DIR] [--cache DIR] [--add SRC[:DEST]]... [--hook SCRIPT]... [--force]
    python3 images/build.py --out images/out    # the same, in a checkout (`make images`)

Nothing is installed on the host.  Debian packages are fetched with `apt-get download` into the cache
directory and unpacked there with `dpkg -x`:

* the kernel: the package the metapackage ``linux-image-<flavour>`` depends on (default flavour
  ``cloud-amd64``: the smallest Debian 6.1 kernel, virtio_net as a module);
* busybox-static, whose applets become symlinks to /bin/busybox;
* iperf3 and ethtool and the shared libraries they need, found by reading DT_NEEDED / PT_INTERP with pyelftools and
  searching the unpacked packages (and, on demand, the packages they depend on) -- never the host's /usr/lib.

The initramfs holds the virtio transport and virtio_net modules with everything they depend on.  Their load
order is derived from each module's ``.modinfo`` ``depends=`` (and ``softdep=pre:``) entries, not hard-coded,
and written to /etc/vhostni/modules, which /init reads.  Every ``guests/*.c`` is compiled with
``gcc -static -O2`` into /bin.  ``--add SRC[:DEST]`` puts a user's own files, directories or programs
(a ``.c`` file is compiled the same way) into the image, ``--hook SCRIPT`` a shell script /init runs at boot
(see :func:`parse_add` and images/init.sh).  Where the guest sources and init.sh come from:
:mod:`vhostni.resources` (the package's data in an install, the checkout's top otherwise).

Outputs: ``<out>/vmlinuz``, ``<out>/initrd.cpio.gz`` (newc cpio, written here in Python, so /dev/console can
be a real device node without root and the archive is byte-for-byte reproducible from the same inputs) and
``<out>/manifest.json`` (package versions, module order, a digest of all inputs).  The build is incremental:
if the manifest's input digest matches, nothing is rebuilt.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from . import resources

#: Modules the guest must have: the PCI virtio transport and the NIC driver.  Their dependencies are found in
#: .modinfo; builtin ones (listed in modules.builtin) are skipped.
ROOT_MODULES = ("virtio_pci", "virtio_net")
#: Programs taken from Debian packages with their shared libraries: (package, path inside the package).
#: ethtool sets a multi-queue NIC's channels (``ethtool -L eth0 combined N``), which busybox cannot.
DYNAMIC_PROGRAMS = (("iperf3", "usr/bin/iperf3"), ("ethtool", "sbin/ethtool"))
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")
MANIFEST_VERSION = 1
#: busybox udhcpc calls this with the lease in its environment ($ip, $mask = prefix length, $router, $dns).
UDHCPC_SCRIPT = b"""#!/bin/sh
case "$1" in
    deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
        if [ -n "$dns" ]; then for d in $dns; do echo "nameserver $d"; done > /etc/resolv.conf; fi ;;
esac
exit 0
"""


class BuildError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)
    except FileNotFoundError as e:
        raise BuildError(f"{cmd[0]} not found: {e}") from None
    except subprocess.CalledProcessError as e:
        raise BuildError(f"command failed ({e.returncode}): {' '.join(cmd)}\n{e.stderr.strip()}") from None


# --------------------------------------------------------------------------------------------------------------
# Debian packages


@dataclass(frozen=True)
class Deb:
    package: str
    filename: str
    size: int | None = None
    sha256: str | None = None


_URI_RE = re.compile(r"^'(?P<uri>[^']+)' (?P<file>\S+) (?P<size>\d+) (?:SHA256:(?P<sha>[0-9a-f]{64}))?")


def parse_depends(field_value: str) -> list[str]:
    """Package names from a Depends/Pre-Depends field, first alternative of each, without versions/arch."""
    names = []
    for clause in field_value.split(","):
        clause = clause.strip()
        if not clause:
            continue
        first = clause.split("|")[0].strip()
        name = re.split(r"[\s(:]", first, maxsplit=1)[0]
        if name:
            names.append(name)
    return names


class Packages:
    """Resolves, downloads (apt-get download) and unpacks (dpkg -x) Debian packages in a cache directory."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.debs = cache / "debs"
        self.root = cache / "x"
        self.debs.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.resolved: dict[str, Deb] = {}

    def resolve(self, names: Iterable[str]) -> list[Deb]:
        names = [n for n in names if n not in self.resolved]
        if names:
            try:
                out = run(["apt-get", "download", "--print-uris", *names]).stdout
            except BuildError as e:
                out = None
                err = e
            if out is not None:
                for line in out.splitlines():
                    m = _URI_RE.match(line)
                    if m:
                        pkg = m["file"].split("_", 1)[0]
                        self.resolved[pkg] = Deb(pkg, m["file"], int(m["size"]), m["sha"])
            for n in names:
                if n not in self.resolved:
                    # Offline fallback: the newest matching .deb already in the cache.
                    cached = sorted(self.debs.glob(f"{n}_*.deb"), key=lambda p: p.stat().st_mtime)
                    if not cached:
                        why = f": {err}" if out is None else ""
                        raise BuildError(
                            f"cannot resolve Debian package {n!r}{why}\n"
                            "Run `apt-get update` (or `make deps`) so apt knows the package lists.")
                    log(f"apt cannot resolve {n}; using cached {cached[-1].name}")
                    self.resolved[n] = Deb(n, cached[-1].name)
        return [self.resolved[n] for n in names] if names else []

    def get(self, *names: str) -> list[Deb]:
        self.resolve(names)
        debs = [self.resolved[n] for n in names]
        missing = [d for d in debs if not self._valid(d)]
        if missing:
            log("downloading " + ", ".join(d.filename for d in missing))
            run(["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download",
                 *[d.package for d in missing]], cwd=self.debs)
            for d in missing:
                if not self._valid(d):
                    raise BuildError(f"download of {d.filename} failed or does not match the package index")
        return debs

    def _valid(self, d: Deb) -> bool:
        p = self.debs / d.filename
        if not p.is_file():
            return False
        if d.size is not None and p.stat().st_size != d.size:
            return False
        if d.sha256 is not None:
            stamp = p.with_suffix(".sha256-ok")
            if stamp.is_file() and stamp.read_text() == d.sha256:
                return True
            if hashlib.sha256(p.read_bytes()).hexdigest() != d.sha256:
                return False
            stamp.write_text(d.sha256)
        return True

    def unpack(self, d: Deb) -> Path:
        dest = self.root / d.filename[:-4]
        done = dest / ".unpacked"
        if not done.exists():
            if dest.exists():
                shutil.rmtree(dest)
            dest.mkdir(parents=True)
            run(["dpkg-deb", "-x", str(self.debs / d.filename), str(dest)])
            done.touch()
        return dest

    def depends(self, d: Deb) -> list[str]:
        fields = run(["dpkg-deb", "-f", str(self.debs / d.filename), "Pre-Depends", "Depends"]).stdout
        names: list[str] = []
        for line in fields.splitlines():
            if ":" in line:
                names += parse_depends(line.split(":", 1)[1])
        return names


# --------------------------------------------------------------------------------------------------------------
# Kernel modules


def decompress_module(path: Path) -> bytes:
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko"):
        return data
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        try:
            import zstandard  # type: ignore
            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        except ImportError:
            if shutil.which("zstd") is None:
                raise BuildError(f"{path.name} is zstd-compressed: install zstd (apt) or zstandard (pip)") from None
            return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
    raise BuildError(f"unknown module compression: {path}")


def read_modinfo(ko: bytes) -> dict[str, list[str]]:
    """The key=value strings of a module's .modinfo section (a key may repeat, e.g. alias)."""
    from elftools.elf.elffile import ELFFile

    elf = ELFFile(io.BytesIO(ko))
    sec = elf.get_section_by_name(".modinfo")
    if sec is None:
        raise BuildError("module has no .modinfo section")
    info: dict[str, list[str]] = {}
    for entry in sec.data().split(b"\0"):
        if b"=" in entry:
            k, v = entry.decode("utf-8", "replace").split("=", 1)
            info.setdefault(k, []).append(v)
    return info


def module_deps(info: Mapping[str, list[str]]) -> list[str]:
    """Modules that must be loaded before this one: depends= plus softdep pre: entries."""
    deps = [d for v in info.get("depends", []) for d in v.split(",") if d]
    for soft in info.get("softdep", []):
        # "pre: a b post: c"
        mode = None
        for tok in soft.split():
            if tok.endswith(":"):
                mode = tok[:-1]
            elif mode == "pre":
                deps.append(tok)
    return [normalize_module(d) for d in deps]


def normalize_module(name: str) -> str:
    return name.replace("-", "_")


def module_load_order(roots: Iterable[str], deps_of: Callable[[str], Iterable[str] | None],
                      builtin: Iterable[str] = ()) -> list[str]:
    """Modules to load (dependencies first) so that every root is loaded.

    ``deps_of(name)`` returns a module's dependencies, or None when no such loadable module exists.
    Names in ``builtin`` are part of the kernel and need no loading.  The result is deterministic (ties broken
    by the order dependencies are listed, then by name) and raises BuildError on a dependency cycle or a
    module that is neither loadable nor builtin.
    """
    builtin = {normalize_module(b) for b in builtin}
    order: list[str] = []
    state: dict[str, str] = {}  # name -> "visiting" | "done"

    def visit(name: str, path: tuple[str, ...]) -> None:
        name = normalize_module(name)
        if state.get(name) == "done" or name in builtin:
            return
        if state.get(name) == "visiting":
            raise BuildError("module dependency cycle: " + " -> ".join(path + (name,)))
        deps = deps_of(name)
        if deps is None:
            chain = " <- ".join(reversed(path + (name,)))
            raise BuildError(f"module {name} is neither a .ko in the kernel package nor builtin ({chain})")
        state[name] = "visiting"
        for d in deps:
            visit(d, path + (name,))
        state[name] = "done"
        order.append(name)

    for r in roots:
        visit(r, ())
    return order


@dataclass
class KernelTree:
    root: Path  # unpacked kernel package
    version: str
    vmlinuz: Path
    moddir: Path
    modules: dict[str, Path] = field(default_factory=dict)   # name -> file
    builtin: set[str] = field(default_factory=set)
    _info: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    @classmethod
    def open(cls, root: Path) -> "KernelTree":
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if len(kernels) != 1:
            raise BuildError(f"expected one boot/vmlinuz-* in {root}, found {kernels}")
        version = kernels[0].name[len("vmlinuz-"):]
        moddir = next((p for p in (root / "lib/modules" / version, root / "usr/lib/modules" / version)
                       if p.is_dir()), None)
        if moddir is None:
            raise BuildError(f"no modules directory for {version} in {root}")
        kt = cls(root, version, kernels[0], moddir)
        for p in sorted(moddir.rglob("*.ko*")):
            if re.search(r"\.ko(\.(xz|zst|gz))?$", p.name):
                kt.modules[normalize_module(re.sub(r"\.ko(\..*)?$", "", p.name))] = p
        bi = moddir / "modules.builtin"
        if bi.is_file():
            for line in bi.read_text().split():
                kt.builtin.add(normalize_module(Path(line).name.split(".ko")[0]))
        return kt

    def info(self, name: str) -> dict[str, list[str]] | None:
        if name not in self._info:
            p = self.modules.get(name)
            if p is None:
                return None
            self._info[name] = read_modinfo(decompress_module(p))
        return self._info[name]

    def deps_of(self, name: str) -> list[str] | None:
        info = self.info(name)
        return None if info is None else module_deps(info)

    def load_order(self, roots: Iterable[str]) -> list[str]:
        return module_load_order(roots, self.deps_of, self.builtin)


# --------------------------------------------------------------------------------------------------------------
# ELF shared-library closure


def elf_dynamic(data: bytes) -> tuple[list[str], str | None]:
    """(DT_NEEDED sonames, PT_INTERP path) of an ELF file."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.dynamic import DynamicSection

    elf = ELFFile(io.BytesIO(data))
    needed: list[str] = []
    interp = None
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_INTERP":
            interp = seg.get_interp_name()
    for sec in elf.iter_sections():
        if isinstance(sec, DynamicSection):
            needed += [t.needed for t in sec.iter_tags() if t.entry.d_tag == "DT_NEEDED"]
    return needed, interp


def resolve_in_tree(root: Path, rel: str, depth: int = 0) -> Path | None:
    """Follow symlinks inside an unpacked package (absolute links are relative to its root)."""
    if depth > 20:
        return None
    parts = Path(rel.lstrip("/")).parts
    cur = root
    for i, part in enumerate(parts):
        nxt = cur / part
        if nxt.is_symlink():
            target = os.readlink(nxt)
            base = "" if target.startswith("/") else str(cur.relative_to(root))
            rest = "/".join(parts[i + 1:])
            joined = os.path.normpath(os.path.join("/", base, target, rest))
            return resolve_in_tree(root, joined, depth + 1)
        if not nxt.exists():
            return None
        cur = nxt
    return cur if cur.is_file() else None


@dataclass
class Program:
    package: str
    path: str               # path in the guest (= path in its package)
    source: Path
    libs: dict[str, tuple[str, Path, str]] = field(default_factory=dict)  # guest path -> (soname, file, pkg)
    interp: str | None = None


def library_closure(packages: Packages, package: str, relpath: str) -> Program:
    """Unpack `package`, then find every shared library its program needs, fetching dependency packages
    (library packages first) breadth-first until each DT_NEEDED soname and the interpreter are found."""
    deb = packages.get(package)[0]
    trees: dict[str, Path] = {package: packages.unpack(deb)}
    prog_file = resolve_in_tree(trees[package], relpath)
    if prog_file is None:
        raise BuildError(f"{relpath} not found in {deb.filename}")
    prog = Program(package, "/" + relpath, prog_file)
    providers = {package}           # packages whose files are in the closure: their Depends get expanded
    expanded: set[str] = set()
    pending: list[tuple[bytes, str]] = [(prog_file.read_bytes(), relpath)]
    unresolved: set[str] = set()

    def find(soname: str) -> tuple[str, Path, str] | None:
        for pkg, root in trees.items():
            for d in LIB_DIRS:
                f = resolve_in_tree(root, f"{d}/{soname}")
                if f is not None:
                    return f"/{d}/{soname}", f, pkg
        return None

    def resolve_pending() -> None:
        while pending:
            resolve_once()

    def resolve_once() -> None:
        while pending:
            data, what = pending.pop()
            needed, interp = elf_dynamic(data)
            if interp and prog.interp is None:
                prog.interp = interp
                unresolved.add("INTERP:" + interp)
            unresolved.update(needed)
        for item in sorted(unresolved):
            if item.startswith("INTERP:"):
                path = item[len("INTERP:"):]
                for pkg, root in trees.items():
                    f = resolve_in_tree(root, path)
                    if f is not None:
                        prog.libs[path] = (Path(path).name, f, pkg)
                        providers.add(pkg)
                        unresolved.discard(item)
                        break
                continue
            if any(v[0] == item for v in prog.libs.values()):
                unresolved.discard(item)
                continue
            hit = find(item)
            if hit is not None:
                guest_path, f, pkg = hit
                prog.libs[guest_path] = (item, f, pkg)
                providers.add(pkg)
                unresolved.discard(item)
                pending.append((f.read_bytes(), guest_path))

    while True:
        resolve_pending()
        resolve_once()      # retry what is still unresolved against packages unpacked since
        resolve_pending()
        if not unresolved:
            break
        candidates: list[str] = []
        for pkg in sorted(providers - expanded):
            expanded.add(pkg)
            candidates += [n for n in packages.depends(packages.resolved[pkg]) if n not in trees]
        candidates = list(dict.fromkeys(candidates))
        # Shared libraries live in lib* packages (Debian policy); other dependencies only as a last resort.
        libs_first = [c for c in candidates if c.startswith("lib")] or candidates
        if not libs_first:
            raise BuildError(f"{package}: cannot find {sorted(unresolved)} in its dependency packages "
                             f"({sorted(trees)})")
        log(f"{package}: looking for {sorted(unresolved)} in {', '.join(libs_first)}")
        try:
            debs = packages.get(*libs_first)
        except BuildError:
            debs = []
            for c in libs_first:     # virtual package names cannot be downloaded; skip them
                try:
                    debs += packages.get(c)
                except BuildError:
                    trees[c] = Path("/nonexistent")  # remember as tried
        for d in debs:
            trees[d.package] = packages.unpack(d)
        trees = {k: v for k, v in trees.items() if v.exists()}
    return prog


# --------------------------------------------------------------------------------------------------------------
# cpio (newc)


class Cpio:
    """A deterministic newc archive: entries sorted by path, parents created, fixed mtime/uid/gid."""

    def __init__(self, mtime: int = 0):
        self.mtime = mtime
        self.entries: dict[str, tuple[int, bytes, int, int]] = {}  # path -> (mode, data, rdevmajor, rdevminor)

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.entries:
                self.entries[d] = (stat.S_IFDIR | 0o755, b"", 0, 0)

    def _norm(self, path: str) -> str:
        path = path.strip("/")
        if not path or ".." in path.split("/"):
            raise BuildError(f"bad archive path {path!r}")
        return path

    def dir(self, path: str, mode: int = 0o755) -> None:
        path = self._norm(path)
        self._parents(path)
        self.entries[path] = (stat.S_IFDIR | mode, b"", 0, 0)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = self._norm(path)
        self._parents(path)
        self.entries[path] = (stat.S_IFREG | mode, data, 0, 0)

    def symlink(self, path: str, target: str) -> None:
        path = self._norm(path)
        self._parents(path)
        self.entries[path] = (stat.S_IFLNK | 0o777, target.encode(), 0, 0)

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        path = self._norm(path)
        self._parents(path)
        self.entries[path] = (stat.S_IFCHR | mode, b"", major, minor)

    def serialize(self) -> bytes:
        out = io.BytesIO()

        def pad() -> None:
            out.write(b"\0" * (-out.tell() % 4))

        def entry(ino: int, name: str, mode: int, data: bytes, rmaj: int, rmin: int) -> None:
            nameb = name.encode() + b"\0"
            nlink = 2 if stat.S_ISDIR(mode) else 1
            fields = (ino, mode, 0, 0, nlink, self.mtime, len(data), 0, 0, rmaj, rmin, len(nameb), 0)
            out.write(b"070701" + b"".join(b"%08X" % f for f in fields))
            out.write(nameb)
            pad()
            out.write(data)
            pad()

        for ino, path in enumerate(sorted(self.entries), start=1):
            mode, data, rmaj, rmin = self.entries[path]
            entry(ino, path, mode, data, rmaj, rmin)
        entry(0, "TRAILER!!!", 0, b"", 0, 0)
        return out.getvalue()


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Parse a newc archive (for tests and inspection): path -> (mode, data or symlink target)."""
    entries: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        if data[pos:pos + 6] != b"070701":
            raise ValueError(f"bad cpio magic at {pos}")
        f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos:pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, body)


# --------------------------------------------------------------------------------------------------------------
# The build


def busybox_applets(busybox: Path) -> list[str]:
    out = run([str(busybox), "--list-full"]).stdout
    applets = [line.strip() for line in out.splitlines() if line.strip()]
    if not applets:
        raise BuildError(f"{busybox} --list-full printed nothing")
    return applets


GUEST_CFLAGS = ["-static", "-O2", "-Wall", "-Wextra"]


def compile_static(src: Path, dest: Path) -> Path:
    """Compile one C file into a static executable in ``dest``; a cached one is reused when the source and
    flags are the same (its file name carries their digest)."""
    dest.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(src.read_bytes() + "\0".join(GUEST_CFLAGS).encode()).hexdigest()[:16]
    exe = dest / f"{src.stem}.{key}"
    if not exe.exists():
        if shutil.which("gcc") is None:
            raise BuildError(f"gcc not found (to compile {src.name}): install Debian's gcc and libc6-dev "
                             "(apt-get install gcc libc6-dev)")
        log(f"compiling {src}")
        try:
            run(["gcc", *GUEST_CFLAGS, "-o", str(exe) + ".tmp", str(src)])
        except BuildError as e:
            if "cannot find -lc" in str(e):
                raise BuildError(f"{src.name}: no static C library: install Debian's libc6-dev "
                                 "(apt-get install libc6-dev)") from None
            raise
        os.replace(str(exe) + ".tmp", exe)
    return exe


def compile_guest_programs(src_dir: Path, dest: Path) -> dict[str, Path]:
    """Compile each ``*.c`` in src_dir into a static executable (see compile_static)."""
    return {src.stem: compile_static(src, dest) for src in sorted(src_dir.glob("*.c"))}


# --------------------------------------------------------------------------------------------------------------
# A user's own files and boot hooks


@dataclass(frozen=True)
class Addition:
    """``--add SRC[:DEST]``: ``src`` on the host goes to ``dest`` in the guest (None: the default)."""

    src: Path
    dest: str | None = None


def parse_add(spec: str) -> Addition:
    """``SRC`` or ``SRC:DEST`` (DEST an absolute guest path; a DEST ending in ``/`` is a directory to put
    SRC into).  Without DEST: a ``.c`` file is compiled static (like guests/*.c) into ``/bin/NAME``
    (its stem), an executable file goes to ``/bin/NAME``, any other file or a directory to ``/root/NAME``."""
    src, sep, dest = spec.rpartition(":")
    if not sep or not dest.startswith("/") or not src:
        src, dest = spec, ""
    if not src:
        raise BuildError(f"--add {spec!r}: expected SRC[:DEST]")
    if dest and ".." in dest.split("/"):
        raise BuildError(f"--add {spec!r}: DEST must not contain '..'")
    return Addition(Path(src), dest or None)


def _addition_entries(add: Addition, cache: Path) -> list[tuple[str, str, bytes, int]]:
    """(kind, guest path, data or link target, mode) of everything one --add puts into the image."""
    src = add.src
    if not src.exists() and not src.is_symlink():
        raise BuildError(f"--add {src}: no such file or directory")
    if src.is_dir():
        base = add.dest or f"/root/{src.resolve().name}"
        if base.endswith("/"):
            base += src.resolve().name
        entries: list[tuple[str, str, bytes, int]] = [("dir", base, b"", 0o755)]
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(src)
            for name in dirnames + sorted(filenames):
                p = Path(dirpath) / name
                guest = f"{base}/{(rel_dir / name).as_posix()}"
                if p.is_symlink():
                    entries.append(("symlink", guest, os.readlink(p).encode(), 0o777))
                elif p.is_dir():
                    entries.append(("dir", guest, b"", 0o755))
                elif p.is_file():
                    entries.append(("file", guest, p.read_bytes(), 0o755 if os.access(p, os.X_OK) else 0o644))
        return entries
    if src.suffix == ".c":
        exe = compile_static(src.resolve(), cache / "guest-bin")
        dest = add.dest or f"/bin/{src.stem}"
        if dest.endswith("/"):
            dest += src.stem
        return [("file", dest, exe.read_bytes(), 0o755)]
    executable = os.access(src, os.X_OK)
    dest = add.dest or (f"/bin/{src.name}" if executable else f"/root/{src.name}")
    if dest.endswith("/"):
        dest += src.name
    return [("file", dest, src.read_bytes(), 0o755 if executable else 0o644)]


def _check_runnable(cpio: "Cpio", path: str, data: bytes) -> None:
    """An added dynamic ELF program must find its interpreter and libraries in the image."""
    if not data.startswith(b"\x7fELF"):
        return
    try:
        needed, interp = elf_dynamic(data)
    except Exception:       # not an ELF we can read (a core file, say): not ours to judge
        return
    have = {Path(p).name for p in cpio.entries}
    missing = [n for n in needed if n not in have] + ([interp] if interp and interp.strip("/") not in
                                                      cpio.entries else [])
    if missing:
        raise BuildError(f"--add {path}: a dynamically linked program needing {', '.join(missing)}, which the "
                         "image does not have: link it statically (gcc -static)")


def _hook_name(i: int, hook: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", hook.name)[:40] or "hook"
    return f"etc/vhostni/hooks/{i:02d}-{stem}"


def digest_inputs(parts: Iterable[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in parts:
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def _need_tools() -> None:
    missing = [t for t in ("apt-get", "dpkg-deb") if shutil.which(t) is None]
    if missing:
        raise BuildError(f"{' and '.join(missing)} not found: guest images are built from Debian packages "
                         "with apt and dpkg (a Debian 12 host; apt-get install apt dpkg)")


@contextlib.contextmanager
def _locked(*dirs: Path):
    """Exclusive locks on the output and cache directories: builds started at once (pytest-xdist workers,
    two CI jobs on one cache) wait for each other instead of writing the same files."""
    files = []
    try:
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            f = open(d / ".vhostni-build.lock", "w")
            files.append(f)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        for f in reversed(files):
            f.close()


def build(out: Path, cache: Path, flavour: str = "cloud-amd64", force: bool = False,
          adds: Sequence[Addition] = (), hooks: Sequence[Path] = ()) -> dict:
    """Build (or find up to date) the images in ``out``; returns the manifest."""
    _need_tools()
    for a in adds:          # the user's mistakes first, before any download
        if not a.src.exists():
            raise BuildError(f"--add {a.src}: no such file or directory")
    for h in hooks:
        if not Path(h).is_file():
            raise BuildError(f"--hook {h}: no such file")
    out, cache = Path(out), Path(cache)
    dirs = [out] if out.resolve() == cache.resolve() else [out, cache]
    with _locked(*dirs):
        return _build(out, cache, flavour, force, list(adds), [Path(h) for h in hooks])


def _build(out: Path, cache: Path, flavour: str, force: bool, adds: list[Addition], hooks: list[Path]) -> dict:
    pk = Packages(cache)

    # Resolve everything first (no downloads) so an up-to-date build costs a few apt look-ups only.
    meta = pk.get(f"linux-image-{flavour}")[0]
    kernel_pkg = next((n for n in pk.depends(meta) if n.startswith("linux-image-")), None)
    if kernel_pkg is None:
        raise BuildError(f"{meta.filename} depends on no linux-image-* package")
    pk.resolve([kernel_pkg, "busybox-static", *(p for p, _ in DYNAMIC_PROGRAMS)])
    # The guest's /init and the guest programs (in a checkout: images/init.sh and guests/).
    init_script = resources.path("images/init.sh").read_bytes()
    guest_dir = resources.guest_sources()
    guest_srcs = sorted(guest_dir.glob("*.c"))
    inputs = [("build.py", Path(__file__).read_bytes()), ("init.sh", init_script),
              ("debs", json.dumps(sorted(d.filename for d in pk.resolved.values())).encode())]
    inputs += [(f"guests/{s.name}", s.read_bytes()) for s in guest_srcs]
    added = [e for a in adds for e in _addition_entries(a, cache)]
    inputs += [(f"add:{kind}:{path}:{mode:o}", data) for kind, path, data, mode in added]
    hook_files = []
    for i, h in enumerate(hooks):
        if not h.is_file():
            raise BuildError(f"--hook {h}: no such file")
        hook_files.append((_hook_name(i, h), h.read_bytes()))
    inputs += [(f"hook:{name}", data) for name, data in hook_files]
    digest = digest_inputs(inputs)
    manifest_path = out / "manifest.json"
    if not force and manifest_path.is_file() and (out / "vmlinuz").is_file() and (out / "initrd.cpio.gz").is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError:
            old = {}
        if old.get("inputs_digest") == digest:
            log(f"up to date: {out}/vmlinuz, {out}/initrd.cpio.gz (kernel {old.get('kernel_version')})")
            return old

    kdeb, bbdeb = pk.get(kernel_pkg, "busybox-static")
    kt = KernelTree.open(pk.unpack(kdeb))
    order = kt.load_order(ROOT_MODULES)
    log(f"kernel {kt.version}; module load order: {' '.join(order) or '(all builtin)'}")

    cpio = Cpio()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/vhostni", "proc", "sys", "dev", "tmp", "root",
              "run", "var/run", "mnt", "lib64"):
        cpio.dir(d)
    cpio.dir("tmp", 0o1777)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.chardev("dev/ttyS0", 4, 64)

    # Kernel modules, uncompressed (busybox insmod needs no decompressor then).
    mod_paths = []
    for name in order:
        rel = kt.modules[name].relative_to(kt.moddir)
        rel_ko = re.sub(r"\.ko\.(xz|zst|gz)$", ".ko", str(rel))
        guest_path = f"lib/modules/{kt.version}/{rel_ko}"
        cpio.file(guest_path, decompress_module(kt.modules[name]))
        mod_paths.append("/" + guest_path)
    cpio.file("etc/vhostni/modules", "".join(p + "\n" for p in mod_paths).encode())

    # busybox and its applets.
    bbroot = pk.unpack(bbdeb)
    busybox = resolve_in_tree(bbroot, "bin/busybox")
    if busybox is None:
        raise BuildError(f"bin/busybox not in {bbdeb.filename}")
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = busybox_applets(busybox)
    for a in applets:
        a = a.strip("/")
        if a != "bin/busybox":
            cpio.symlink(a, os.path.relpath("/bin/busybox", "/" + os.path.dirname(a)))

    # Dynamic programs and their libraries from Debian packages.
    programs = {}
    for pkg, rel in DYNAMIC_PROGRAMS:
        prog = library_closure(pk, pkg, rel)
        cpio.file(prog.path, prog.source.read_bytes(), 0o755)
        by_soname = {soname: gp for gp, (soname, _f, _p) in prog.libs.items() if gp != prog.interp}
        for guest_path, (soname, f, _pkg) in sorted(prog.libs.items()):
            if guest_path == prog.interp and soname in by_soname:
                # The interpreter is also a DT_NEEDED library (libc needs ld.so): one copy, one symlink.
                cpio.symlink(guest_path, by_soname[soname])
            else:
                cpio.file(guest_path, f.read_bytes(), 0o755)
        programs[prog.path] = {"package": pkg, "interp": prog.interp,
                               "libs": {gp: lp for gp, (_, _, lp) in sorted(prog.libs.items())}}
        log(f"{prog.path}: {len(prog.libs)} libraries from "
            + ", ".join(sorted({v[2] for v in prog.libs.values()})))

    # Our own static helpers.
    guest_bins = compile_guest_programs(guest_dir, cache / "guest-bin") if guest_srcs else {}
    for name, exe in guest_bins.items():
        cpio.file(f"bin/{name}", exe.read_bytes(), 0o755)

    cpio.file("init", init_script, 0o755)
    cpio.file("etc/vhostni/udhcpc.script", UDHCPC_SCRIPT, 0o755)
    cpio.file("etc/hostname", b"vhostni-guest\n")
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    cpio.file("etc/hosts", b"127.0.0.1 localhost\n")
    cpio.file("etc/vhostni/kernel-version", (kt.version + "\n").encode())

    # The user's own files (--add), over anything above (even /init), and boot hooks (--hook), run by /init in order.
    for kind, path, data, mode in added:
        if kind == "dir":
            cpio.dir(path, mode)
        elif kind == "symlink":
            cpio.symlink(path, data.decode())
        else:
            cpio.file(path, data, mode)
    for kind, path, data, mode in added:
        if kind == "file" and mode & 0o111:
            _check_runnable(cpio, path, data)
    for name, data in hook_files:
        cpio.file(name, data, 0o755)


    raw = cpio.serialize()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", compresslevel=6, mtime=0, filename="") as g:
        g.write(raw)

    def atomic_write(path: Path, data: bytes) -> None:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name + ".", delete=False) as t:
            t.write(data)
        os.chmod(t.name, 0o644)
        os.replace(t.name, path)

    atomic_write(out / "vmlinuz", kt.vmlinuz.read_bytes())
    atomic_write(out / "initrd.cpio.gz", gz.getvalue())
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "inputs_digest": digest,
        "kernel_package": kdeb.filename,
        "kernel_version": kt.version,
        "root_modules": list(ROOT_MODULES),
        "module_load_order": order,
        "module_paths": mod_paths,
        "busybox_package": bbdeb.filename,
        "busybox_applets": len(applets),
        "programs": programs,
        "guest_programs": sorted(guest_bins),
        "added": {path: (hashlib.sha256(data).hexdigest() if kind == "file" else kind)
                  for kind, path, data, _ in added},
        "hooks": ["/" + name for name, _ in hook_files],
        "packages": sorted(d.filename for d in pk.resolved.values()),
        "initrd_bytes": len(raw),
        "initrd_gz_bytes": len(gz.getvalue()),
        "initrd_sha256": hashlib.sha256(gz.getvalue()).hexdigest(),
    }
    atomic_write(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    log(f"wrote {out}/vmlinuz and {out}/initrd.cpio.gz ({len(raw) >> 10} KiB, {len(gz.getvalue()) >> 10} KiB gzipped)")
    return manifest


def _add_arg(text: str) -> Addition:
    try:
        return parse_add(text)
    except BuildError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(ap: argparse.ArgumentParser, default_out: Path | None = None,
                  default_cache: Path | None = None) -> None:
    out_help = f"default {default_out}" if default_out else "default $VHOSTNI_IMAGES or ~/.cache/vhostni/images"
    cache_help = (f"default {default_cache}" if default_cache
                  else "default $VHOSTNI_IMAGES_CACHE or ~/.cache/vhostni/debs")
    ap.add_argument("--out", type=Path, default=default_out, help=f"output directory ({out_help})")
    ap.add_argument("--cache", type=Path, default=default_cache,
                    help=f"where Debian packages are downloaded and unpacked ({cache_help})")
    ap.add_argument("--flavour", default="cloud-amd64",
                    help="Debian kernel flavour: linux-image-FLAVOUR is the metapackage (default cloud-amd64)")
    ap.add_argument("--add", action="append", type=_add_arg, default=[], metavar="SRC[:DEST]",
                    help="put SRC (a file, a directory, or a .c file compiled static) into the image at DEST "
                         "(default: /bin/NAME for programs, /root/NAME otherwise); repeatable")
    ap.add_argument("--hook", action="append", type=Path, default=[], metavar="SCRIPT",
                    help="a shell script the guest's /init runs at boot, after the network is configured and "
                         "before the guest reports ready (a failure is a boot error); repeatable, run in order")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")


def run_build(args: argparse.Namespace, prog: str = "vhostni images build") -> int:
    from .resources import default_images_dir, default_package_cache
    out = args.out or default_images_dir()
    cache = args.cache or default_package_cache()
    try:
        build(out.resolve(), cache.resolve(), args.flavour, args.force, args.add, args.hook)
    except BuildError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    if out.resolve() != default_images_dir().resolve():
        log(f"tests find them with VHOSTNI_IMAGES={out.resolve()} (or pytest --vhostni-images {out.resolve()})")
    return 0


def main(argv: list[str] | None = None, default_out: Path | None = None, default_cache: Path | None = None,
         prog: str = "vhostni images build") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(ap, default_out, default_cache)
    return run_build(ap.parse_args(argv), prog)


if __name__ == "__main__":
    sys.exit(main())
