"""A hostile test scanner that never locks down (connect(lockdown=False)), tries to
subscribe anyway and reports the answer (alert "report"), then idles."""
import time

from vhostni.scanner import Refused, Scanner

sc = Scanner.connect(lockdown=False)
try:
    sc.subscribe({"direction": "from_guest", "proto": "tcp"}, contain=True)
    result = "granted"
except Refused as exc:
    result = f"refused: {exc}"
sc.alert("report", subscribe=result)
while True:
    time.sleep(1)
