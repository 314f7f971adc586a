"""A hostile test scanner that, before it locks down, tries to fork a child that leaves its
process group and session (so a kill of the scanner's group would miss it), then reports
the child's pid, or the error that stopped the fork (alert "report").  The child only
sleeps."""
import os
import time

try:
    pid = os.fork()
    error = None
except OSError as exc:
    pid, error = None, exc.strerror
if pid == 0:
    os.setsid()
    while True:
        time.sleep(1)

from vhostni.scanner import Scanner  # noqa: E402

sc = Scanner.connect()
sc.alert("report", child=pid, error=error)
while True:
    sc.recv()
