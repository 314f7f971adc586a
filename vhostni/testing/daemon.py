"""Run ``vhostni run`` as a subprocess for tests: start it, wait for its sockets, stop it, keep its log."""
from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence


class DaemonError(RuntimeError):
    pass


def vhostni_command() -> list[str]:
    """How to invoke the vhostni CLI: ``$VHOSTNI_CMD`` if set, else this interpreter with the package."""
    env = os.environ.get("VHOSTNI_CMD")
    if env:
        return shlex.split(env)
    if importlib.util.find_spec("vhostni.__main__") is not None:
        return [sys.executable, "-m", "vhostni"]
    if importlib.util.find_spec("vhostni.cli") is not None:
        return [sys.executable, "-c", "import sys; from vhostni.cli import main; sys.exit(main())"]
    exe = shutil.which("vhostni")
    if exe:
        return [exe]
    raise DaemonError("cannot find the vhostni CLI (no vhostni.cli module, no `vhostni` on PATH)")


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


class VhostniDaemon:
    """``vhostni run --ni NAME=SOCKET ... [--uplink SPEC]`` in the foreground, stderr+stdout to ``log_path``.

    ``nis`` maps NI names to vhost-user socket paths (the daemon listens on them).  ``netns`` runs the daemon
    inside that network namespace (its TAP uplink is then created there; the unix sockets are still reachable
    from everywhere).
    """

    def __init__(self, nis: Mapping[str, str | os.PathLike], *, uplink: str | None = None,
                 extra_args: Sequence[str] = (), netns: str | None = None,
                 log_path: str | os.PathLike = "test-logs/vhostni.log", env: Mapping[str, str] | None = None,
                 command: Sequence[str] | None = None):
        if not nis:
            raise ValueError("a vhostni daemon needs at least one --ni NAME=SOCKET")
        self.nis = {name: os.fspath(sock) for name, sock in nis.items()}
        self.uplink = uplink
        self.extra_args = list(extra_args)
        self.netns = netns
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.command = list(command) if command else None
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def argv(self) -> list[str]:
        argv = list(self.command or vhostni_command()) + ["run"]
        for name, sock in self.nis.items():
            argv += ["--ni", f"{name}={sock}"]
        if self.uplink:
            argv += ["--uplink", self.uplink]
        argv += self.extra_args
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns] + argv
        return argv

    def start(self, timeout: float = 30.0) -> "VhostniDaemon":
        """Start the daemon and wait until every socket exists; DaemonError (with its log) otherwise."""
        for sock in self.nis.values():
            if os.path.lexists(sock):
                os.unlink(sock)     # a stale socket from an earlier run would fool the wait below
            Path(sock).parent.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = self.argv()
        with open(self.log_path, "wb") as log:
            log.write(f"# {shlex.join(argv)}\n".encode())
            log.flush()
            env = None
            if self.env is not None:
                env = {**os.environ, **self.env}
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            missing = [s for s in self.nis.values() if not _is_socket(s)]
            if not missing:
                return self
            if self.proc.poll() is not None:
                self.returncode = self.proc.returncode
                raise DaemonError(f"vhostni exited with status {self.returncode} before listening on "
                                  f"{', '.join(missing)}\nlog: {self.log_path}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise DaemonError(f"vhostni did not create {', '.join(missing)} within {timeout:g} s\n"
                                  f"log: {self.log_path}\n{self.log_tail()}")
            time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL.  Returns the exit status (negative: signal)."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                with open(self.log_path, "ab") as log:
                    log.write(f"\n# vhostni did not stop within {timeout:g} s of SIGTERM: killed\n".encode())
        self.returncode = p.returncode
        return self.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> "VhostniDaemon":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
