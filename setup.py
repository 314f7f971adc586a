# cffi's setuptools hook compiles csrc/ into vhostni._fastpath; everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["vhostni/_build_fastpath.py:ffibuilder"])
