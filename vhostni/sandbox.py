"""Starting a scanner contained: own network namespace, unprivileged user, no new
privileges, bounded memory, CPU time and open files, and only its socket to the NI kernel.
The scanner adds the last wall itself once started (the SDK's seccomp allow-list), and
the kernel checks that it did before granting it any traffic.

Each scanner runs as a uid of its own (UidPool), so scanners cannot touch each other.
A scanner's code runs as an unprivileged user, which cannot read a checkout under /root:
``stage()`` copies the program and the SDK into a world-readable directory per scanner,
so what runs is exactly what the administrator's policy named, and nothing else is
reachable through the file system by permission.
"""
from __future__ import annotations

import ctypes
import os
import pwd
import resource
import shutil
import signal
import stat
import sys
import tempfile
from typing import Callable

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

SDK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scanner")


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


def _dirs_searchable_by_others(path: str) -> bool:
    """Can others walk every directory of ``path`` as written (not resolved)?"""
    parts = os.path.abspath(path).split(os.sep)
    return all(os.stat(os.sep.join(parts[:i])).st_mode & stat.S_IXOTH for i in range(2, len(parts)))


def interpreter() -> str:
    """A Python the unprivileged scanner user can execute: this one by the path it was started as,
    or by its real path when the scanner user cannot walk that one (a venv in a private directory,
    e.g. a home or a test's temporary directory, links to a system python it can run)."""
    for cand in (sys.executable, "/usr/bin/python3"):
        if cand and os.path.exists(cand) and _reachable_by_others(cand):
            return cand if _dirs_searchable_by_others(cand) else os.path.realpath(cand)
    raise SandboxError("no Python interpreter the scanner user can execute "
                       f"({sys.executable} is not reachable by others; install python3)")


def stage(argv: list[str], root: str) -> tuple[list[str], str]:
    """Copies the scanner program (file or directory) and the SDK under ``root``; returns
    the argv to run and the PYTHONPATH that makes ``vhostni.scanner`` importable."""
    os.makedirs(root, exist_ok=True)
    os.chmod(root, 0o755)
    lib = os.path.join(root, "lib")
    pkg = os.path.join(lib, "vhostni")
    if not os.path.exists(pkg):
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
            p = os.path.join(dirpath, f)
            os.chmod(p, 0o755 if os.access(p, os.X_OK) else 0o644)
    return new, lib


def new_stage_root(name: str) -> str:
    base = "/run/vhostni" if os.access("/run", os.W_OK) else tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    os.chmod(base, 0o755)
    return tempfile.mkdtemp(prefix=f"scanner-{name}-", dir=base)


def remove_stage_root(root: str) -> None:
    """Removes what stage() put under ``root`` (a scanner stopped for good)."""
    shutil.rmtree(root, ignore_errors=True)


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
    RLIMIT_NPROC at 1 a scanner cannot fork (so nothing it starts outlives it).

    Other vhostni processes on the host (another daemon, a replay, a test run) draw from the
    same range: a uid one of their scanners runs as is skipped, or this scanner's exec would
    fail with EAGAIN on RLIMIT_NPROC (and the two scanners could signal each other)."""

    def __init__(self, base: int = UID_BASE, count: int = UID_COUNT):
        taken = {p.pw_uid for p in pwd.getpwall()}
        self.free = [u for u in range(base, base + count) if u not in taken]
        self.used: set[int] = set()

    def take(self) -> int:
        busy = uids_running()
        for u in self.free:
            if u not in self.used and u not in busy:
                self.used.add(u)
                return u
        raise SandboxError("no free scanner uid")

    def give(self, uid: int) -> None:
        self.used.discard(uid)


def preexec(memory_mb: int, cpu_seconds: int, open_files: int, uid: int) -> Callable[[], None]:
    """The function run in the child between fork and exec.  Order matters: the network
    namespace and the limits need privilege, so they come before dropping it; the
    parent-death signal is cleared by setuid, so it comes after."""
    libc = ctypes.CDLL(None, use_errno=True)

    def run() -> None:
        os.setsid()
        if libc.unshare(CLONE_NEWNET) != 0:
            os.write(2, b"vhostni sandbox: unshare(CLONE_NEWNET) failed\n")
            os._exit(126)
        mem = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(126)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            os._exit(126)

    return run
