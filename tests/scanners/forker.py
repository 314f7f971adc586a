"""A hostile test scanner that, before it locks down, forks a child that leaves its process
group and session (so a kill of the scanner's group misses it), then reports the child's
pid (alert "report").  The child only sleeps."""
import os
import time

pid = os.fork()
if pid == 0:
    os.setsid()
    while True:
        time.sleep(1)

from vhostni.scanner import Scanner  # noqa: E402

sc = Scanner.connect()
sc.alert("report", child=pid)
while True:
    sc.recv()
