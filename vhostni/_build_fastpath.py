"""cffi build of the C fast path in csrc/ into the extension module vhostni._fastpath.

The cdef is read from csrc/vhostni.h and csrc/sig.h between their VN_CDEF markers, so the C
headers are the single source of the Python-visible API.  sig.c (the signature matcher) links
Debian's Hyperscan (-lhs) and PCRE2 (-lpcre2-8).

Every build compiles with -Wall -Wextra -Werror: a warning in csrc/ fails the build.  The flags
apply to cffi's generated wrapper too (one extension, one set of flags); that wrapper compiles
cleanly under them with the cffi versions pyproject.toml allows (checked with 1.15 and 2.1).

``python vhostni/_build_fastpath.py --sanitize`` (``make build-asan``) builds a second module,
vhostni._fastpath_asan, with AddressSanitizer and UndefinedBehaviorSanitizer; any error aborts
the process.  vhostni/__init__.py imports it in place of vhostni._fastpath when the
environment says VHOSTNI_SANITIZE=1 (``make test-sanitize`` sets that, preloads libasan and
runs the tests that feed the fast path hostile input).
"""
import os
import re
import shutil
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CSRC = os.path.join(ROOT, "csrc")
SOURCES = ["mem.c", "vring.c", "offload.c", "parse.c", "antispoof.c", "emit.c", "policy.c", "tcp.c", "tcp_edit.c",
           "tcp_frag.c", "tcp_api.c", "switch.c", "sig.c", "flow.c", "sigstage.c", "ring.c", "tcp_ring.c", "blkcache.c", "http.c"]
HEADERS = ["vhostni.h", "sig.h", "sigstage.h", "vnring.h", "http.h"]
CFLAGS = ["-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Werror"]
# -fno-sanitize-recover: undefined behaviour aborts like a memory error does, so a test run
# cannot pass over it with a line on stderr nobody reads
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def _cdef() -> str:
    parts = []
    for header in HEADERS:
        with open(os.path.join(CSRC, header)) as f:
            text = f.read()
        body = re.search(r"/\* VN_CDEF_BEGIN \*/(.*)/\* VN_CDEF_END \*/", text, re.S).group(1)
        # cffi wants '#define NAME VALUE' with plain integer values, which these are
        parts.append(re.sub(r"/\*.*?\*/", "", body, flags=re.S))
    return "\n".join(parts)


def builder(sanitize: bool = False) -> FFI:
    # setuptools wants paths relative to the project; cffi's own compile() (the sanitizer
    # build) runs in its temporary directory and needs them absolute
    path = os.path.abspath if sanitize else os.path.relpath
    ffi = FFI()
    ffi.cdef(_cdef())
    ffi.set_source(
        "vhostni._fastpath_asan" if sanitize else "vhostni._fastpath",
        '#include "vhostni.h"\n#include "sig.h"\n#include "sigstage.h"\n#include "vnring.h"\n#include "http.h"',
        sources=[path(os.path.join(CSRC, s)) for s in SOURCES],
        include_dirs=[path(CSRC)],
        libraries=["hs", "pcre2-8", "z"],
        extra_compile_args=CFLAGS + (SANITIZE_FLAGS if sanitize else []),
        extra_link_args=SANITIZE_FLAGS if sanitize else [],
        depends=[path(os.path.join(CSRC, h)) for h in (*HEADERS, "vn_internal.h", "tcp_internal.h")],
    )
    return ffi


ffibuilder = builder()

if __name__ == "__main__":
    # run from the repository's root: the extension lands in vhostni/
    sanitize = "--sanitize" in sys.argv[1:]
    os.chdir(ROOT)
    out = builder(sanitize).compile(tmpdir="build/asan" if sanitize else ".", verbose=True)
    if sanitize:       # beside vhostni._fastpath, importable the same way
        shutil.copy(out, os.path.join(HERE, os.path.basename(out)))
