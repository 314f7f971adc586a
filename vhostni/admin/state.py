"""What the admin plane changed, kept across daemon restarts (``vhostni run --state-dir DIR``).

    DIR/nis.json                 {"version": 1, "nis": [{"name": ..., "socket": ...}]}
                                 the NIs added at run time (ni-add), in order
    DIR/policies/NAME.json       the policy set over QMP for NI NAME: an ordinary policy
                                 file (JSON), scanner programs made absolute

Every write is atomic: a temporary file in the same directory, written, fsynced, renamed
over the old one, then the directory fsynced; a crash leaves the old file or the new one.

At start the command line is the base configuration and the state directory is laid over
it: NIs from ``nis.json`` are added (a name the command line also defines keeps the command
line's socket), and a stored policy replaces the ``--policy`` file of its NI (logged), since
it was set later.  A stored policy is the file SIGHUP re-reads for that NI.
"""
from __future__ import annotations

import json
import logging
import os
import re
import errno
import stat
import tempfile
from typing import Iterable

from ..unixsock import socket_in_use  # noqa: F401  (the admin plane's users import it from here)

log = logging.getLogger("vhostni.admin")

NAME_RE = re.compile(r"\A[A-Za-z0-9_.-]{1,32}\Z")   # \Z: "$" would let a final newline through


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    d = os.path.dirname(os.path.abspath(path))
    # a new file of a random name (O_EXCL, O_NOFOLLOW): nothing planted in the directory is followed
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(d)


def _check_private(d: str) -> None:
    """The state directory says which NIs exist and what their policies are: whoever else can write
    it decides both (and could plant files the daemon writes through).  OSError unless ``d`` is a real
    directory of this process's user that no group or other user may write."""
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, "the state directory is not a directory (or is a symbolic link)", d)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise OSError(errno.EPERM, f"the state directory must be this user's ({os.geteuid()}) and writable by "
                      f"no one else (owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}): fix it with chown "
                      f"and chmod go-w", d)


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def absolute_programs(doc: dict, base: str) -> dict:
    """A copy of a policy document whose relative scanner programs are made absolute
    against ``base`` (so the stored file means the same wherever it is read from)."""
    out = json.loads(json.dumps(doc, default=str))
    scanners = out.get("scanner") if isinstance(out, dict) else None
    if isinstance(scanners, list):
        for s in scanners:
            if isinstance(s, dict) and isinstance(s.get("program"), str) and not os.path.isabs(s["program"]):
                s["program"] = os.path.normpath(os.path.join(base, s["program"]))
    return out


class StateDir:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        os.makedirs(os.path.join(self.path, "policies"), mode=0o700, exist_ok=True)
        for d in (self.path, os.path.join(self.path, "policies")):
            _check_private(d)
        self.nis_file = os.path.join(self.path, "nis.json")

    # ---- NIs added at run time
    def load_nis(self) -> list[tuple[str, str]]:
        try:
            with open(self.nis_file, "rb") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return []
        except ValueError as exc:
            raise ValueError(f"{self.nis_file}: cannot parse: {exc}") from None
        out = []
        for i, e in enumerate(doc.get("nis", []) if isinstance(doc, dict) else []):
            if (not isinstance(e, dict) or not isinstance(e.get("name"), str) or not NAME_RE.match(e["name"])
                    or not isinstance(e.get("socket"), str)):
                raise ValueError(f"{self.nis_file}: nis[{i}] is not {{name, socket}}")
            out.append((e["name"], e["socket"]))
        return out

    def save_nis(self, nis: Iterable[tuple[str, str]]) -> None:
        doc = {"version": 1, "nis": [{"name": n, "socket": s} for n, s in nis]}
        atomic_write(self.nis_file, json.dumps(doc, indent=1).encode() + b"\n")

    # ---- policies set over QMP
    def policy_path(self, name: str) -> str:
        if not NAME_RE.match(name):
            raise ValueError(f"bad NI name {name!r}")
        return os.path.join(self.path, "policies", f"{name}.json")

    def save_policy(self, name: str, doc: dict) -> str:
        path = self.policy_path(name)
        atomic_write(path, json.dumps(doc, indent=1, default=str).encode() + b"\n")
        return path

    def remove_policy(self, name: str) -> None:
        try:
            os.unlink(self.policy_path(name))
        except FileNotFoundError:
            return
        _fsync_dir(os.path.join(self.path, "policies"))

    def stored_policies(self) -> dict[str, str]:
        d = os.path.join(self.path, "policies")
        out = {}
        for fn in sorted(os.listdir(d)):
            name, ext = os.path.splitext(fn)
            if ext == ".json" and NAME_RE.match(name):
                out[name] = os.path.join(d, fn)
        return out

    def merge(self, nis: list[tuple[str, str]], policies: dict[str, str]
              ) -> tuple[list[tuple[str, str]], dict[str, str], list[tuple[str, str]]]:
        """The command line's NIs and policy files with the stored ones laid over them.
        Returns (nis, policies, runtime_nis): runtime_nis are the stored run-time NIs."""
        nis = list(nis)
        names = {n for n, _ in nis}
        runtime = []
        for name, sock in self.load_nis():
            if name in names:
                log.warning("NI %s: defined on the command line and in %s; the command line's "
                            "socket wins", name, self.nis_file)
                continue
            nis.append((name, sock))
            names.add(name)
            runtime.append((name, sock))
        policies = dict(policies)
        for name, path in self.stored_policies().items():
            if name not in names:
                log.warning("stored policy %s is for no NI; ignored", path)
                continue
            if name in policies and policies[name] != path:
                log.warning("NI %s: using the policy set over QMP (%s), not --policy %s", name, path,
                            policies[name])
            policies[name] = path
        return nis, policies, runtime
