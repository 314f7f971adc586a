"""cffi build of the C fast path in csrc/ into the extension module vhostni._fastpath.

The cdef is read from csrc/vhostni.h and csrc/sig.h between their VN_CDEF markers, so the C
headers are the single source of the Python-visible API.  sig.c (the signature matcher) links
Debian's Hyperscan (-lhs) and PCRE2 (-lpcre2-8).
"""
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")
SOURCES = ["mem.c", "vring.c", "offload.c", "policy.c", "tcp.c", "switch.c", "sig.c"]
HEADERS = ["vhostni.h", "sig.h"]


def _cdef() -> str:
    parts = []
    for header in HEADERS:
        with open(os.path.join(CSRC, header)) as f:
            text = f.read()
        body = re.search(r"/\* VN_CDEF_BEGIN \*/(.*)/\* VN_CDEF_END \*/", text, re.S).group(1)
        # cffi wants '#define NAME VALUE' with plain integer values, which these are
        parts.append(re.sub(r"/\*.*?\*/", "", body, flags=re.S))
    return "\n".join(parts)


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "vhostni._fastpath",
    '#include "vhostni.h"\n#include "sig.h"',
    sources=[os.path.relpath(os.path.join(CSRC, s)) for s in SOURCES],
    include_dirs=[os.path.relpath(CSRC)],
    libraries=["hs", "pcre2-8"],
    extra_compile_args=["-O2", "-g", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
    depends=[os.path.relpath(os.path.join(CSRC, h)) for h in (*HEADERS, "vn_internal.h")],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
