"""The scanner's lockdown: a seccomp allow-list installed once start-up is over, on top of
the one the launcher (``vhostni.sandbox``) loaded before the scanner's first instruction.
The daemon's launcher builds its filter with ``build_filter`` too.

After it, a scanner can only compute, allocate memory, talk over the sockets it already
has, signal itself and exit: opening files, creating sockets, spawning processes or
threads, signalling or setting limits of other processes, and every other system call
fail with EPERM.  No new privileges is set first (required for an
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


# Allowed only when their first argument (a pid; the kernel reads it as a 32-bit int) names
# the calling process, 0 also meaning itself for prlimit64.  Every scanner runs as the same
# user, so without this one could signal another (tgkill) or set its limits (prlimit64: a
# CPU limit of 0 kills it).
SELF_ONLY_X86_64 = {"tgkill": (234, False), "prlimit64": (302, True)}
SECCOMP_DATA_ARG0 = 16          # offsetof(struct seccomp_data, args[0]), low half on x86-64


def build_filter(allowed: dict[str, int] = ALLOWED_X86_64, deny_errno: int = errno.EPERM,
                 self_only: dict[str, tuple[int, bool]] = SELF_ONLY_X86_64,
                 pid: int | None = None,
                 arg_rules: dict[int, tuple[int, frozenset[int]]] | None = None) -> bytes:
    """The BPF program: wrong arch -> kill; x32 -> deny; listed syscall -> allow;
    ``self_only`` syscall -> allow if its first argument is ``pid`` (or 0 where that means
    the caller); ``arg_rules`` syscall nr -> (argument index, values): allow if that
    argument (its low 32 bits) is one of the values; else deny."""
    pid = os.getpid() if pid is None else pid
    rules = {nr: (0, frozenset({pid & 0xFFFFFFFF} | ({0} if zero_ok else set())))
             for nr, zero_ok in self_only.values()}
    rules.update(arg_rules or {})
    nrs = sorted(set(allowed.values()) - set(rules))
    checks = sorted((nr, idx, sorted(vals)) for nr, (idx, vals) in rules.items())
    # header (5) | a JEQ per rule nr | a JEQ per nr | DENY | ALLOW | a block per rule: load
    # its argument, a JEQ per value, its own DENY and ALLOW (classic BPF jumps only forward)
    deny = 5 + len(checks) + len(nrs)
    allow = deny + 1
    check_at, at = [], allow + 1
    for _, _, vals in checks:
        check_at.append(at)
        at += 3 + len(vals)
    deny_ret = _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | deny_errno)
    allow_ret = _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW)
    prog = [
        _insn(BPF_LD_W_ABS, 0, 0, 4),                        # A = arch
        _insn(BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        _insn(BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        _insn(BPF_LD_W_ABS, 0, 0, 0),                        # A = nr
        _insn(BPF_JGE_K, deny - 5, 0, X32_SYSCALL_BIT),      # x32 -> deny
    ]
    for (nr, _, _), target in zip(checks, check_at):
        prog.append(_insn(BPF_JEQ_K, target - len(prog) - 1, 0, nr))
    for nr in nrs:
        prog.append(_insn(BPF_JEQ_K, allow - len(prog) - 1, 0, nr))   # -> allow, past the deny
    prog += [deny_ret, allow_ret]
    for _, idx, vals in checks:
        prog.append(_insn(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARG0 + 8 * idx))   # low half
        for i, v in enumerate(vals):
            prog.append(_insn(BPF_JEQ_K, len(vals) - i, 0, v))     # -> this block's allow
        prog += [deny_ret, allow_ret]
    assert all(i + 1 + max(jt, jf) < len(prog) for i, (code, jt, jf, _) in
               enumerate(struct.iter_unpack("=HBBI", b"".join(prog))) if code & 7 == 5)
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
