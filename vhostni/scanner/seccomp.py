"""The scanner's lockdown: a seccomp allow-list installed once start-up is over.

After it, a scanner can only compute, allocate memory, talk over the sockets it already
has and exit: opening files, creating sockets, spawning processes or threads, and every
other system call fail with EPERM.  No new privileges is set first (required for an
unprivileged filter, and so that nothing exec'd later could gain any).

x86-64 only; elsewhere ``lockdown()`` raises NotImplementedError rather than pretend.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_RET_K = 0x06

# What CPython needs to run an already-imported program over its existing sockets.
ALLOWED_X86_64 = {
    "read": 0, "write": 1, "close": 3, "fstat": 5, "poll": 7, "lseek": 8, "mmap": 9,
    "mprotect": 10, "munmap": 11, "brk": 12, "rt_sigaction": 13, "rt_sigprocmask": 14,
    "rt_sigreturn": 15, "pread64": 17, "readv": 19, "writev": 20, "select": 23,
    "sched_yield": 24, "mremap": 25, "madvise": 28, "nanosleep": 35, "getpid": 39,
    "sendto": 44, "recvfrom": 45, "sendmsg": 46, "recvmsg": 47, "getsockopt": 55, "exit": 60,
    "fcntl": 72, "gettimeofday": 96, "getrlimit": 97, "getuid": 102, "getgid": 104,
    "geteuid": 107, "getegid": 108, "sigaltstack": 131, "gettid": 186, "futex": 202,
    "sched_getaffinity": 204, "restart_syscall": 219, "clock_gettime": 228,
    "clock_getres": 229, "clock_nanosleep": 230, "exit_group": 231, "epoll_wait": 232,
    "epoll_ctl": 233, "tgkill": 234, "newfstatat": 262, "pselect6": 270, "ppoll": 271,
    "epoll_pwait": 281, "epoll_create1": 291, "prlimit64": 302, "getrandom": 318, "rseq": 334,
}


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def build_filter(allowed: dict[str, int] = ALLOWED_X86_64, deny_errno: int = errno.EPERM) -> bytes:
    """The BPF program: wrong arch -> kill; x32 -> deny; listed syscall -> allow; else deny."""
    nrs = sorted(set(allowed.values()))
    prog = [
        _insn(BPF_LD_W_ABS, 0, 0, 4),                        # A = arch
        _insn(BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        _insn(BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        _insn(BPF_LD_W_ABS, 0, 0, 0),                        # A = nr
        _insn(BPF_JGE_K, len(nrs), 0, X32_SYSCALL_BIT),      # x32 -> deny
    ]
    for i, nr in enumerate(nrs):
        prog.append(_insn(BPF_JEQ_K, len(nrs) - i, 0, nr))   # -> allow, past the deny
    prog.append(_insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | deny_errno))
    prog.append(_insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def lockdown() -> None:
    """Installs the allow-list on the calling process (irreversible)."""
    if platform.machine() != "x86_64":
        raise NotImplementedError(f"no seccomp allow-list for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    prog = build_filter()
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def status(pid: int | str = "self") -> int:
    """The Seccomp: mode of a process from /proc (0 none, 1 strict, 2 filter)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    return 0
