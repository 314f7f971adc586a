"""cffi build of the C fast path in csrc/ into the extension module vhostni._fastpath.

The cdef is read from csrc/vhostni.h between its VN_CDEF markers, so the C header is the
single source of the Python-visible API.
"""
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")
SOURCES = ["mem.c", "vring.c", "offload.c", "parse.c", "antispoof.c", "policy.c", "tcp.c", "switch.c"]


def _cdef() -> str:
    with open(os.path.join(CSRC, "vhostni.h")) as f:
        text = f.read()
    body = re.search(r"/\* VN_CDEF_BEGIN \*/(.*)/\* VN_CDEF_END \*/", text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    # cffi wants '#define NAME VALUE' with plain integer values, which these are
    return body


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "vhostni._fastpath",
    '#include "vhostni.h"',
    sources=[os.path.relpath(os.path.join(CSRC, s)) for s in SOURCES],
    include_dirs=[os.path.relpath(CSRC)],
    extra_compile_args=["-O2", "-g", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
    depends=[os.path.relpath(os.path.join(CSRC, h)) for h in ("vhostni.h", "vn_internal.h")],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
