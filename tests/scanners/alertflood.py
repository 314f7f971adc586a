"""A hostile test scanner that sends ``config.count`` alerts as fast as it can, then idles."""
from vhostni.scanner import Scanner

sc = Scanner.connect()
for i in range(sc.config.get("count", 500)):
    sc.alert("flood", i=i)
while True:
    sc.recv()
