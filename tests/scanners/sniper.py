"""A hostile test scanner that looks for other processes it could send signals to (other
scanners, of this NI or another), and reports them (alert "report").  It only probes with
signal 0, which checks the permission and delivers nothing.

Before lockdown it uses kill(2); after lockdown tgkill(2) through ctypes (tgkill is on the
allow-list, so Python can signal its own threads) and prlimit64(2) (on the list for
getrlimit), which could read, and so also set, another process's limits (a CPU limit of 0
kills).  The prlimit probe only reads.
"""
import ctypes
import os

from vhostni.scanner import Scanner

SYS_tgkill = 234
SYS_prlimit64 = 302
RLIMIT_NOFILE = 7
me = os.getpid()


def candidates():
    try:
        names = os.listdir("/proc")
    except OSError:             # no /proc in its view: try the low pids blindly
        names = [str(p) for p in range(1, 1000)]
    return [int(d) for d in names if d.isdigit() and int(d) != me]


def probe_kill(pids):
    ok = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            ok.append(pid)
        except OSError:
            pass
    return ok


pids = candidates()      # /proc cannot be read after lockdown
before = probe_kill(pids)
sc = Scanner.connect()
libc = ctypes.CDLL(None, use_errno=True)
after = [pid for pid in pids if libc.syscall(SYS_tgkill, pid, pid, 0) == 0]
self_ok = libc.syscall(SYS_tgkill, me, me, 0) == 0
old = (ctypes.c_uint64 * 2)()
limits = [pid for pid in pids if libc.syscall(SYS_prlimit64, pid, RLIMIT_NOFILE, None, old) == 0]
own_limits = [libc.syscall(SYS_prlimit64, p, RLIMIT_NOFILE, None, old) == 0 for p in (0, me)]
sc.alert("report", before=before, after=after, limits=limits, self_tgkill=self_ok,
         own_limits=own_limits, pid=me)
while True:
    sc.recv()
