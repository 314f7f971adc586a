"""Starting a scanner confined from its first instruction, with bubblewrap (``bwrap``).

The daemon never relies on a scanner to confine itself: assume its author is the attacker.
``command()`` builds a bwrap command line that, before the scanner's program runs:

* puts it in new user, PID, IPC, UTS, mount, network (and cgroup) namespaces: no network
  (only a loopback nobody listens on), no other process visible (it is PID 2 of its own PID
  namespace under bwrap's init, with no /proc), SysV IPC objects that die with it;
* gives it a read-only file-system view of only what it needs: its staged program, the
  SDK and the libraries the SDK uses (``/scanner``, see ``stage()``), the interpreter and ``/usr/lib`` (stdlib, shared libraries),
  ``/dev/null``, ``/dev/urandom``, and the unix sockets the administrator granted it
  (policy ``sockets``): no /etc, no host /proc, no /run/vhostni, no other scanner's stage;
* loads the launcher's seccomp allow-list (``launch_filter()``, passed as ``--seccomp FD``)
  right before exec: enough for CPython to start, import from its view and talk over its
  socket; no fork or clone (exec only of what is in its view), no sockets but unix ones,
  no kill, SysV IPC, ptrace, mount, namespaces, keys or BPF.  The SDK may stack its stricter
  run-time filter on top after start-up (``Scanner.connect()`` does);
* keeps it in its per-scanner uid (UidPool), with no new privileges, no capabilities, and
  bounded memory, CPU time, open files and processes (``preexec()``, which runs bwrap as
  that uid: bwrap is not setuid here, and a user namespace made by root would map the
  scanner to host uid 0), dying with the daemon (parent-death signal on bwrap,
  ``--die-with-parent`` on the scanner).

Why bubblewrap: it is the namespace launcher Flatpak runs every application under, packaged
by Debian, a few thousand lines of C that many eyes have been on, and it does in one exec
what would otherwise be hundreds of lines of hand-written clone/mount/pivot_root code here,
loading the caller's seccomp program last, after its own set-up.  This module keeps only the
policy: what to bind, which system calls.  ``check_confined()`` then verifies from outside
what was imposed (namespaces, the launcher's program as the oldest seccomp filter, uid,
parentage) before the kernel grants any traffic.

``stage()`` copies the program and the SDK into a directory per scanner under
/run/vhostni, which the scanner sees read-only as ``/scanner``; each such directory carries
a lock held by the daemon that made it, so a daemon starting after a crash removes only
stages whose owner is dead (``remove_stale_stage_roots()``).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import pwd
import resource
import select
import shutil
import signal
import stat
import sys
import tempfile
import time
from typing import Callable, Optional

from .scanner import seccomp

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

SDK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scanner")
INSIDE = "/scanner"                 # where a scanner sees its stage
LOCK_NAME = ".owner"                # in a stage root: the owning daemon's pid, flock'ed by it
NAMESPACES = ("user", "pid", "ipc", "uts", "mnt", "net")
LAUNCH_FILTERS = 1                  # seccomp filters bwrap loads (the launcher's allow-list)
NPROC = 3                           # bwrap, its init (PID 1 inside), the scanner

# What CPython needs to start, import from its read-only view and talk over its socket (and
# unix sockets the administrator bound into the view), x86-64 numbers.  Not in it, so EPERM:
# fork/vfork/clone/clone3, kill, ptrace, mount/umount/pivot_root, unshare/setns, SysV IPC
# (shm*/sem*/msg*), bind/listen/accept, socketpair, mkdir/unlink/rename/chmod/chown,
# bpf, perf_event_open, keyctl/add_key, io_uring, userfaultfd, memfd_create, personality.
LAUNCH_ALLOWED_X86_64 = dict(seccomp.ALLOWED_X86_64, **{
    "open": 2, "stat": 4, "lstat": 6, "ioctl": 16, "access": 21, "dup": 32, "dup2": 33,
    "socket": 41, "connect": 42, "shutdown": 48, "getsockname": 51, "getpeername": 52,
    "setsockopt": 54, "execve": 59, "wait4": 61, "uname": 63, "getcwd": 79, "readlink": 89,
    "getrusage": 98, "sysinfo": 99, "times": 100, "getppid": 110, "getpgrp": 111,
    "getgroups": 115, "statfs": 137, "fstatfs": 138, "prctl": 157, "arch_prctl": 158,
    "time": 201, "getdents64": 217, "set_tid_address": 218, "openat": 257, "readlinkat": 267,
    "set_robust_list": 273, "dup3": 292, "seccomp": 317, "statx": 332, "close_range": 436,
    "faccessat2": 439,
})
AF_UNIX = 1
LAUNCH_ARG_RULES = {
    41: (0, frozenset({AF_UNIX})),                      # socket(AF_UNIX, ...) only
    16: (1, frozenset({0x5401, 0x5421, 0x5450, 0x5451})),   # ioctl TCGETS FIONBIO FIONCLEX FIOCLEX
    157: (0, frozenset({3, 15, 16, 21, 22, 38, 39})),   # prctl: get dumpable, names, seccomp, NNP
}


def launch_filter() -> bytes:
    """The allow-list bwrap loads right before exec.  tgkill and prlimit64 need no pid check
    here: in its own PID namespace a scanner is the only process it can name."""
    return seccomp.build_filter(LAUNCH_ALLOWED_X86_64, self_only={}, pid=1,
                                arg_rules=LAUNCH_ARG_RULES)


class SandboxError(RuntimeError):
    pass


def _reachable_by_others(path: str) -> bool:
    """Can a user who is neither owner nor group execute/read ``path`` (every directory on
    the way searchable)?"""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts)):
        d = os.sep.join(parts[:i]) or os.sep
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & (stat.S_IXOTH | stat.S_IROTH))


def interpreter() -> str:
    """A Python the unprivileged scanner user can execute: the real file, not a venv's link
    to it, so the scanner's view holds the interpreter and its stdlib and no path of the
    daemon's install (a scanner imports only the staged SDK and its own program)."""
    for cand in (sys.executable, "/usr/bin/python3"):
        if cand and os.path.exists(cand) and _reachable_by_others(cand):
            return os.path.realpath(cand)
    raise SandboxError("no Python interpreter the scanner user can execute "
                       f"({sys.executable} is not reachable by others; install python3)")


# Modules from outside the standard library that the SDK uses where they are installed (its
# Content-Encoding decoders in scanner/http1.py: br, zstd).  They are staged beside the SDK from
# wherever the daemon imports them (its venv, or Debian's dist-packages), so a scanner runs the
# same code the daemon's install has, without seeing the install's path.  One that is missing
# is skipped: the SDK then reports that coding as undecodable.
SDK_LIBRARIES = ("brotli", "_brotli", "backports.zstd")


def _stage_libraries(lib: str) -> list[str]:
    """Copies each of SDK_LIBRARIES that this interpreter can import into ``lib`` (a package
    as its directory, a module as its file); returns the names staged."""
    import importlib.util
    staged = []
    for name in SDK_LIBRARIES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin or not os.path.isfile(spec.origin):
            continue
        dest = os.path.join(lib, *name.split("."))
        if spec.submodule_search_locations:
            shutil.copytree(os.path.dirname(spec.origin), dest, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyi", "tests"))
        else:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy2(spec.origin, os.path.join(os.path.dirname(dest), os.path.basename(spec.origin)))
        staged.append(name)
    return staged


def stage(argv: list[str], root: str) -> tuple[list[str], str]:
    """Copies the scanner program (file or directory), the SDK and the libraries it uses
    (SDK_LIBRARIES) under ``root``; returns the argv to run and the PYTHONPATH that makes
    ``vhostni.scanner`` importable."""
    os.makedirs(root, exist_ok=True)
    os.chmod(root, 0o755)
    lib = os.path.join(root, "lib")
    pkg = os.path.join(lib, "vhostni")
    if not os.path.exists(pkg):
        _stage_libraries(lib)
        shutil.copytree(SDK_DIR, os.path.join(pkg, "scanner"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        with open(os.path.join(pkg, "__init__.py"), "w") as f:
            f.write('"""The scanner SDK, staged for a sandboxed scanner."""\n')
    new = list(argv)
    python_prog = len(argv) >= 2 and argv[0] == sys.executable
    prog = argv[1] if python_prog else argv[0]
    dest = os.path.join(root, "prog", os.path.basename(prog.rstrip("/")))
    if not os.path.exists(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if os.path.isdir(prog):
            shutil.copytree(prog, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(prog, dest)
    if python_prog:
        new[0] = interpreter()
        new[1] = dest
    else:
        new[0] = dest
    for dirpath, dirs, files in os.walk(root):
        os.chmod(dirpath, 0o755)
        for f in files:
            if dirpath == root and f == LOCK_NAME:
                continue
            p = os.path.join(dirpath, f)
            os.chmod(p, 0o755 if os.access(p, os.X_OK) else 0o644)
    return new, lib


def stage_base() -> str:
    return "/run/vhostni" if os.access("/run", os.W_OK) else tempfile.gettempdir()


class StageRoot(str):
    """A stage directory's path, and the open lock file that marks it as this daemon's."""
    lock_fd: Optional[int] = None


def new_stage_root(name: str) -> StageRoot:
    """A fresh stage directory, locked (flock on its ``.owner``, which also names our pid)
    for as long as this process lives: a daemon killed with -9 drops the lock with its
    file descriptors, which is how ``remove_stale_stage_roots`` tells its stages apart."""
    base = stage_base()
    os.makedirs(base, exist_ok=True)
    os.chmod(base, 0o755)
    root = StageRoot(tempfile.mkdtemp(prefix=f"scanner-{name}-", dir=base))
    fd = os.open(os.path.join(root, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)      # new: nobody else has it
    os.write(fd, f"{os.getpid()}\n".encode())
    root.lock_fd = fd
    return root


def remove_stage_root(root: str) -> None:
    """Removes what stage() put under ``root`` (a scanner stopped for good)."""
    shutil.rmtree(root, ignore_errors=True)
    fd = getattr(root, "lock_fd", None)
    if fd is not None:
        os.close(fd)
        root.lock_fd = None


LEGACY_STALE_AFTER = 600.0     # an unlocked stage from before locks: untouched this long


def _cmdlines() -> list[bytes]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    out.append(f.read())
            except OSError:
                pass
    return out


def remove_stale_stage_roots(base: Optional[str] = None) -> list[str]:
    """Removes the stage directories under ``base`` whose owner daemon is dead: their
    ``.owner`` lock can be taken.  Those of a running daemon (or test run) sharing ``base``
    are locked and kept.  A stage without ``.owner`` (made by a vhostni before these locks)
    goes only when untouched for LEGACY_STALE_AFTER seconds and no process runs a program
    from it.  Returns what was removed."""
    base = base or stage_base()
    removed = []
    cmdlines: Optional[list[bytes]] = None
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for n in names:
        path = os.path.join(base, n)
        if not n.startswith("scanner-") or os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            try:
                stale = time.time() - os.stat(path).st_mtime > LEGACY_STALE_AFTER
            except OSError:
                continue
            if stale:
                if cmdlines is None:
                    cmdlines = _cmdlines()
                if any(os.fsencode(path + os.sep) in c for c in cmdlines):
                    continue                        # an old daemon's scanner runs from it
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue                                # its daemon is alive: keep it
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


UID_BASE = 62000
UID_COUNT = 1000


def uids_running() -> set[int]:
    """The uids processes run as now (the owner of /proc/PID is the process's euid)."""
    uids = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                uids.add(os.stat(f"/proc/{pid}").st_uid)
            except OSError:
                pass        # it just ended
    return uids


class UidPool:
    """One uid (and gid of the same number) per running scanner, from a range no account
    uses: scanners cannot signal, trace or share files with each other, and with
    RLIMIT_NPROC at NPROC a scanner cannot fork (so nothing it starts outlives it).

    Other vhostni processes on the host (another daemon, a replay, a test run) draw from the
    same range: a uid one of their scanners runs as is skipped, or this scanner's exec would
    fail with EAGAIN on RLIMIT_NPROC (and the two scanners could signal each other)."""

    def __init__(self, base: int = UID_BASE, count: int = UID_COUNT):
        taken = {p.pw_uid for p in pwd.getpwall()}
        self.free = [u for u in range(base, base + count) if u not in taken]
        self.used: set[int] = set()
        # Handed out round-robin from a random start: the kernel releases a user namespace
        # (and with it the process count RLIMIT_NPROC sees for its uid) up to about a second
        # after its last process ended, so a uid just given back, by this pool or another
        # daemon's, is the worst one to take again.
        self.cursor = int.from_bytes(os.urandom(4), "little") % max(1, len(self.free))

    def take(self) -> int:
        busy = uids_running()
        n = len(self.free)
        for i in range(n):
            u = self.free[(self.cursor + i) % n]
            if u not in self.used and u not in busy:
                self.used.add(u)
                self.cursor = (self.cursor + i + 1) % n
                return u
        raise SandboxError("no free scanner uid")

    def give(self, uid: int) -> None:
        self.used.discard(uid)


def bwrap() -> str:
    path = shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")
    if not path:
        raise SandboxError("bubblewrap is not installed (apt-get install bubblewrap): "
                           "scanners cannot be confined without it")
    return path


def _library_binds(interp: Optional[str]) -> list[str]:
    """What a program needs in the view besides itself: the shared libraries (Debian:
    /usr/lib, /usr/lib64, /lib and /lib64 as links into them), the public suffix list (public
    data) and, for a Python program,
    the interpreter (``interp``) and its stdlib (under /usr/lib, or its own prefix's lib/)."""
    out: list[str] = []
    # /usr/share/publicsuffix: Mozilla's public suffix list (the worm scanner tells domains apart by it)
    dirs = ["/usr/lib", "/usr/lib64", "/usr/share/publicsuffix"]
    if interp:
        real = os.path.realpath(interp)
        out += ["--ro-bind", real, real]
        if real != interp:
            out += ["--symlink", real, interp]
        dirs.append(os.path.join(os.path.dirname(os.path.dirname(real)), "lib"))
    for d in dict.fromkeys(dirs):
        if os.path.isdir(d):
            out += ["--ro-bind", d, d]
    for link in ("/lib", "/lib64"):             # merged /usr: /lib64/ld-linux-x86-64.so.2
        if os.path.islink(link):
            out += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            out += ["--ro-bind", link, link]
    return out


def command(argv: list[str], root: str, uid: int, seccomp_fd: int, info_fd: int,
            sockets: list[str] = ()) -> list[str]:
    """The bwrap command that runs ``argv`` (as returned by stage(): paths under ``root``)
    confined; ``root`` appears read-only as /scanner.  ``sockets``: unix socket paths the
    administrator lets this scanner connect to, bound into its view at the same paths."""
    def inside(a: str) -> str:
        return INSIDE + a[len(root):] if a == root or a.startswith(root + os.sep) else a
    cmd = [bwrap(), "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
           "--unshare-net", "--unshare-cgroup-try", "--uid", str(uid), "--gid", str(uid),
           "--hostname", "scanner", "--die-with-parent", "--new-session",
           "--cap-drop", "ALL", "--info-fd", str(info_fd), "--seccomp", str(seccomp_fd)]
    cmd += _library_binds(None if argv[0].startswith(root + os.sep) else argv[0])
    cmd += ["--ro-bind", root, INSIDE,
            "--dev-bind", "/dev/null", "/dev/null", "--dev-bind", "/dev/urandom", "/dev/urandom"]
    for sock in sockets:
        cmd += ["--ro-bind", sock, sock]
    cmd += ["--remount-ro", "/", "--chdir", "/", "--"] + [inside(a) for a in argv]
    return cmd


def sdk_path_inside() -> str:
    """PYTHONPATH inside the sandbox (stage() puts the SDK under ``lib``)."""
    return os.path.join(INSIDE, "lib")


def read_child_pid(info_r: int, timeout: float = 5.0) -> Optional[int]:
    """The host pid of bwrap's init in the new PID namespace, from bwrap's ``--info-fd``
    JSON; None if bwrap ended (or said nothing) first."""
    data = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r, _, _ = select.select([info_r], [], [], max(0.0, end - time.monotonic()))
        if not r:
            break
        chunk = os.read(info_r, 4096)
        if not chunk:
            break
        data += chunk
        try:
            pid = json.loads(data).get("child-pid")
        except ValueError:
            continue
        return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None
    return None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:      # CONFIG_PROC_CHILDREN
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        pass
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()      # after "pid (comm) "
            if len(fields) > 1 and fields[1] == str(pid):
                out.append(int(d))
    return out


def find_scanner_pid(init: int, timeout: float = 5.0) -> Optional[int]:
    """The host pid of the scanner: the one child of bwrap's init (``init``); None if init
    ended (or had no single child) within ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        if not os.path.exists(f"/proc/{init}"):
            return None
        try:
            kids = _children(init)
        except (OSError, ValueError):
            kids = []
        if len(kids) == 1:
            return kids[0]
        if len(kids) > 1 or time.monotonic() >= end:
            return None
        time.sleep(0.002)


SYS_ptrace = 101
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_SECCOMP_GET_FILTER = 0x420C
WALL = 0x40000000


def first_filter(pid: int, timeout: float = 1.0) -> bytes:
    """The oldest seccomp filter of ``pid`` (the one its launcher loaded), as BPF bytes.
    Needs CAP_SYS_ADMIN (the daemon runs as root): it attaches with PTRACE_SEIZE, stops the
    process for the moment of PTRACE_SECCOMP_GET_FILTER and detaches; the process's system
    calls restart as if nothing happened.  Raises OSError."""
    libc = ctypes.CDLL(None, use_errno=True)
    sc = libc.syscall
    sc.restype = ctypes.c_long

    def call(req: int, addr: int = 0, data=None) -> int:
        r = sc(ctypes.c_long(SYS_ptrace), ctypes.c_long(req), ctypes.c_long(pid),
               ctypes.c_void_p(addr), data)
        if r < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"ptrace({req:#x}): {os.strerror(e)}")
        return r

    call(PTRACE_SEIZE)
    try:
        call(PTRACE_INTERRUPT)
        end = time.monotonic() + timeout
        while True:
            wpid, status = os.waitpid(pid, os.WNOHANG | WALL)
            if wpid == pid:
                if not os.WIFSTOPPED(status):
                    raise OSError(errno.ESRCH, "it ended")
                break
            if time.monotonic() > end:
                raise OSError(errno.ETIMEDOUT, "it did not stop")
            time.sleep(0.001)
        n = call(PTRACE_SECCOMP_GET_FILTER, 0, None)
        if not 0 < n <= 4096:
            raise OSError(errno.EINVAL, f"a filter of {n} instructions")
        buf = ctypes.create_string_buffer(8 * n)
        if call(PTRACE_SECCOMP_GET_FILTER, 0, buf) != n:
            raise OSError(errno.EINVAL, "its filter changed size")
        return buf.raw
    finally:
        try:
            call(PTRACE_DETACH)
        except OSError:
            pass                           # it ended meanwhile


def _status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def check_confined(pid: int, uid: int, parent: Optional[int] = None,
                   reference: int | str = "self", filters: int = LAUNCH_FILTERS,
                   launcher: Optional[int] = None,
                   first: Optional[bytes] = None) -> Optional[str]:
    """None if process ``pid`` runs in the confinement the launcher imposed, else why not.

    What is checked is what the kernel shows and a confined process cannot change: each of
    its namespaces differs from ``reference``'s (the daemon's), seccomp is in filter mode
    with at least the launcher's filters (filters only stack: none can be removed) and, with
    ``first``, the oldest of them is exactly that program (a scanner can add filters, never
    put one beneath the launcher's); no new privileges, no capabilities, every uid and gid
    is its own, and it is the child of ``parent`` (bwrap's init), itself the child of
    ``launcher`` (the bwrap the daemon ran)."""
    try:
        for ns in NAMESPACES:
            if os.readlink(f"/proc/{pid}/ns/{ns}") == os.readlink(f"/proc/{reference}/ns/{ns}"):
                return f"shares the daemon's {ns} namespace"
        st = _status(pid)
    except OSError as exc:
        return f"cannot inspect it: {exc.strerror or exc}"
    if st.get("Seccomp") != "2":
        return f"no seccomp filter (mode {st.get('Seccomp')!r})"
    try:
        n = int(st.get("Seccomp_filters", "0"))
    except ValueError:
        n = 0
    if n < filters:
        return f"{n} seccomp filters, the launcher loads {filters}"
    if st.get("NoNewPrivs") != "1":
        return "new privileges allowed"
    for cap in ("CapEff", "CapPrm", "CapAmb"):
        if int(st.get(cap, "0") or "0", 16) != 0:
            return f"has capabilities ({cap} {st.get(cap)})"
    for key in ("Uid", "Gid"):
        if st.get(key, "").split() != [str(uid)] * 4:
            return f"{key} {st.get(key)!r}, expected {uid}"
    if parent is not None and st.get("PPid") != str(parent):
        return f"parent {st.get('PPid')}, not its launcher's init {parent}"
    if parent is not None and launcher is not None:
        try:
            up = _status(parent).get("PPid")
        except OSError:
            up = None
        if up != str(launcher):
            return f"its parent {parent} is not a child of its launcher {launcher}"
    if first is not None:
        try:
            got = first_filter(pid)
        except OSError as exc:
            return f"cannot read its seccomp filter: {exc.strerror or exc}"
        if got != first:
            return "its first seccomp filter is not the launcher's"
    return None


def preexec(memory_mb: int, cpu_seconds: int, open_files: int, uid: int) -> Callable[[], None]:
    """The function run in the child between fork and exec of bwrap.  Order matters: the
    limits need privilege, so they come before dropping it; the parent-death signal is
    cleared by setuid, so it comes after.  bwrap then runs as the scanner's uid, and its
    user namespace maps that uid to itself.

    RLIMIT_NPROC is 3 (NPROC): bwrap (which stays, waiting), bwrap's init (PID 1 of the
    scanner's PID namespace, so that the scanner, PID 2, keeps ordinary signal semantics:
    a PID 1 ignores its own SIGABRT) and the scanner.  A fork of the scanner fails twice
    over: the launcher's filter denies it (EPERM), and the count is at its limit."""
    libc = ctypes.CDLL(None, use_errno=True)

    def run() -> None:
        os.setsid()
        mem = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (NPROC, NPROC))
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(126)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            os._exit(126)

    return run
