"""A hostile test scanner that tries to get out of its sandbox, and reports (alert
"report") what the sandbox let it do: before the SDK's lockdown the network (the launcher's
filter and namespaces already hold), after it files, sockets, processes and threads."""
import errno
import fcntl
import os
import socket
import struct
import threading

from vhostni.scanner import Scanner

SIOCGIFFLAGS = 0x8913
IFF_UP = 1
out = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups()}


def attempt(name, fn):
    try:
        r = fn()
        out[name] = f"ok {r!r}"[:200]
    except OSError as exc:
        out[name] = f"{type(exc).__name__} {errno.errorcode.get(exc.errno, exc.errno)}"
    except Exception as exc:
        out[name] = f"{type(exc).__name__} {exc}"[:200]


# ---- before lockdown: the network namespace
attempt("interfaces", lambda: [n for _, n in socket.if_nameindex()])


def lo_up():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH", b"lo", 0)))[1]
    return bool(flags & IFF_UP)


attempt("lo_up", lo_up)


def pre_connect():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        s.connect(("127.0.0.1", 22))


attempt("pre_connect_localhost", pre_connect)
attempt("pre_connect_remote", lambda: socket.create_connection(("192.0.2.1", 80), timeout=1))

sc = Scanner.connect()

# ---- after lockdown
attempt("open_read", lambda: open("/etc/passwd").read(10))
attempt("open_write", lambda: open("/tmp/vhostni-escape-test", "w"))
attempt("listdir", lambda: os.listdir("/"))
attempt("socket_inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
attempt("socket_unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
attempt("socketpair", lambda: socket.socketpair())


def post_connect():
    s = socket.socket(fileno=os.dup(sc.sock.fileno()))
    s.connect(("127.0.0.1", 22))


attempt("connect_on_own_socket", post_connect)
attempt("fork", lambda: os.fork() or os._exit(0))
attempt("thread", lambda: threading.Thread(target=lambda: None).start())
attempt("execve", lambda: os.execv("/bin/sh", ["sh", "-c", "true"]))
attempt("kill_init", lambda: os.kill(1, 0))
attempt("setuid_root", lambda: os.setuid(0))
sc.alert("report", **out)
while True:
    sc.recv()
