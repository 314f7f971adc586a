"""A hostile test scanner that volunteers its own seccomp filter, one that allows every
system call, as its very first act (the old kernel took any "Seccomp: 2" as locked down),
never calls the SDK's lockdown, and then tries what a loose scanner could: read secrets,
reach the network, look at the daemon and the other scanners' programs, leave SysV shared
memory behind, fork.  It reports (alert "report") what happened, then idles.

config: daemon_pid, other_stage (another scanner's stage directory), shm_key.
"""
import ctypes
import struct

libc = ctypes.CDLL(None, use_errno=True)


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_allow = ctypes.create_string_buffer(struct.pack("=HBBI", 0x06, 0, 0, 0x7FFF0000), 8)
_prog = _Fprog(1, ctypes.cast(_allow, ctypes.c_void_p))
installed = (libc.prctl(38, 1, 0, 0, 0) == 0                        # PR_SET_NO_NEW_PRIVS
             and libc.prctl(22, 2, ctypes.byref(_prog), 0, 0) == 0)   # PR_SET_SECCOMP filter

import errno  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402

from vhostni.scanner import Refused, Scanner  # noqa: E402

out = {"installed": installed}


def attempt(name, fn):
    try:
        out[name] = f"ok {fn()!r}"[:300]
    except OSError as exc:
        out[name] = f"{type(exc).__name__} {errno.errorcode.get(exc.errno, exc.errno)}"
    except Exception as exc:
        out[name] = f"{type(exc).__name__} {exc}"[:300]


def read(path):
    with open(path, "rb") as f:
        return f.read(200)


def shmget(key):
    r = libc.shmget(key, 4096, 0o1000 | 0o600)                 # IPC_CREAT
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return pid


sc = Scanner.connect(lockdown=False)
cfg = sc.config
attempt("shadow", lambda: read("/etc/shadow"))
attempt("passwd", lambda: read("/etc/passwd"))
attempt("root", lambda: sorted(os.listdir("/")))
attempt("inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
attempt("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close())
attempt("cmdline", lambda: read(f"/proc/{cfg['daemon_pid']}/cmdline"))
attempt("own_proc", lambda: read("/proc/self/status"))
attempt("other_stage", lambda: os.listdir(cfg["other_stage"]))
attempt("run", lambda: os.listdir("/run/vhostni"))
attempt("shm", lambda: shmget(cfg["shm_key"]))
attempt("fork", fork)
try:
    sc.subscribe({"direction": "from_guest", "proto": "tcp"}, contain=True)
    out["subscribe"] = "granted"
except Refused as exc:
    out["subscribe"] = f"refused: {exc}"
sc.alert("report", **out)
while True:
    sc.recv()
