"""vhostni: self-securing network interfaces for virtual machines."""
import os as _os

__version__ = "0.1.0"

if _os.environ.get("VHOSTNI_SANITIZE") == "1":
    # the fast path built with ASan and UBSan (`make build-asan`) stands in for the normal one
    # for every importer of vhostni._fastpath; a missing build is an ImportError, never a
    # silent fall-back to the uninstrumented module
    import sys as _sys

    from . import _fastpath_asan

    _sys.modules[__name__ + "._fastpath"] = _fastpath_asan
