"""Files vhostni ships besides its Python package: the guest programs (``guests/*.c``), the shipped
scanners (``scanners/``), the guest's ``/init`` (``images/init.sh``) and the example policies
(``examples/``).

They live at the top of a checkout.  A wheel or sdist install carries copies of them inside the package,
under ``vhostni/_data/`` with the same layout (setup.py's build_py puts them there), so code asks this
module instead of guessing paths: :func:`data_root` is ``vhostni/_data`` in an install and the checkout's
top directory in an editable install or when running from the source tree.  Relative paths between these
files (an example policy's ``program = "../scanners/codered"``) therefore hold in both.

A policy names a shipped scanner with ``program = "vhostni:NAME"`` (see :func:`shipped_scanner`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
#: what build_py copies into the package, relative to the checkout's top (and to ``vhostni/_data``)
DATA_DIRS = ("guests", "scanners", "examples")
DATA_FILES = ("images/init.sh",)
SCANNER_PREFIX = "vhostni:"
_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")


class ResourceError(FileNotFoundError):
    pass


def data_root() -> Path:
    """``vhostni/_data`` when installed from a wheel, else the checkout this package sits in."""
    packaged = PACKAGE_DIR / "_data"
    if (packaged / "scanners").is_dir():
        return packaged
    checkout = PACKAGE_DIR.parent
    if (checkout / "scanners").is_dir() and (checkout / "guests").is_dir():
        return checkout
    raise ResourceError(f"vhostni's data files (scanners/, guests/) are neither in {packaged} nor in "
                        f"{checkout}: reinstall vhostni from its wheel or sdist")


def path(rel: str) -> Path:
    """A shipped file or directory by its path relative to the checkout, e.g. ``"images/init.sh"``."""
    p = data_root() / rel
    if not p.exists():
        raise ResourceError(f"{rel} is not among vhostni's data files ({data_root()})")
    return p


def guest_sources() -> Path:
    """The directory of the guest programs (``*.c``, compiled static into the test image)."""
    return path("guests")


def shipped_scanners() -> dict[str, Path]:
    """Scanners shipped with vhostni: name -> program (a directory with ``__main__.py`` or a ``.py``)."""
    root = data_root() / "scanners"
    found: dict[str, Path] = {}
    for p in sorted(root.iterdir()) if root.is_dir() else ():
        if p.is_dir() and (p / "__main__.py").is_file() and _NAME_RE.fullmatch(p.name):
            found[p.name] = p
        elif p.suffix == ".py" and p.is_file() and _NAME_RE.fullmatch(p.stem):
            found.setdefault(p.stem, p)
    return found


def shipped_scanner(program: str) -> Path | None:
    """The program ``"vhostni:NAME"`` names (None if ``program`` has no such prefix).

    The prefix cannot be mistaken for a path: a policy's relative ``program`` is resolved against the
    policy's directory, and no scanner of ours is called ``vhostni:...``.  ResourceError for an unknown
    NAME, listing the known ones."""
    if not program.startswith(SCANNER_PREFIX):
        return None
    name = program[len(SCANNER_PREFIX):]
    known = shipped_scanners()
    if not _NAME_RE.fullmatch(name) or name not in known:
        raise ResourceError(f"{program!r}: vhostni ships no scanner {name!r} (it has: "
                            f"{', '.join(SCANNER_PREFIX + n for n in known) or 'none'})")
    return known[name]


def default_images_dir() -> Path:
    """Where guest images go when nobody says: ``$VHOSTNI_IMAGES``, else ``$XDG_CACHE_HOME/vhostni/images``
    (``~/.cache/vhostni/images``)."""
    env = os.environ.get("VHOSTNI_IMAGES")
    if env:
        return Path(env)
    return _cache_home() / "images"


def default_package_cache() -> Path:
    """Where downloaded and unpacked Debian packages are kept between image builds:
    ``$VHOSTNI_IMAGES_CACHE``, else ``~/.cache/vhostni/debs``."""
    env = os.environ.get("VHOSTNI_IMAGES_CACHE")
    return Path(env) if env else _cache_home() / "debs"


def _cache_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vhostni"
