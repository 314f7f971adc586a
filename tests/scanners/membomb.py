"""A hostile test scanner that tries to take all the memory it can, reports how far it got
(alert "report"), then dies of it."""
from vhostni.scanner import Scanner

sc = Scanner.connect()
hoard = []
got = 0
try:
    while got < (8 << 30):
        hoard.append(bytearray(64 << 20))
        got += 64 << 20
    outcome = "no limit"
except MemoryError:
    outcome = "MemoryError"
del hoard
sc.alert("report", outcome=outcome, megabytes=got >> 20)
raise SystemExit(9)
