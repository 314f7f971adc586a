"""A hostile test scanner that dies right after connecting (SIGABRT)."""
import os

from vhostni.scanner import Scanner

sc = Scanner.connect()
os.abort()
