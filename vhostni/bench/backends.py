"""Backends under test in the frame loop: each serves two vhost-user sockets (server side) and moves frames
between them.

* :class:`DpdkVhostBackend` -- the baseline: a second testpmd with two ``net_vhost`` ports in io forwarding.
* :class:`VhostniBackend` -- ``vhostni run --ni a=S0 --ni b=S1`` (its learning switch joins the two NIs).

Both are pinned to one CPU with ``taskset``; ``stop()`` always leaves no process and no socket behind.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from .testpmd import TestPmd, TestPmdError, is_socket


def pdeathsig_prefix() -> list[str]:
    """``setpriv --pdeathsig KILL --``: the child dies with the benchmark even if that is SIGKILLed."""
    return ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


class BackendError(RuntimeError):
    pass


class BackendUnavailable(BackendError):
    """The backend cannot run at all here (not a failure of one run)."""


class Backend:
    name = "backend"
    label = "backend"

    def start(self, socks: Sequence[str], logdir: Path, tag: str) -> None:
        raise NotImplementedError

    def pid(self) -> int | None:
        """The backend's process (for CPU accounting), if it has one."""
        return None

    def check(self) -> None:
        """Raise BackendError if the backend died."""

    def stop(self) -> dict:
        """Stop it; return whatever it can tell about the run (counters, exit status)."""
        return {}

    def describe(self) -> dict:
        return {"name": self.name, "label": self.label}


class DpdkVhostBackend(Backend):
    """DPDK's vhost PMD: ``testpmd --vdev net_vhost0,iface=S0 --vdev net_vhost1,iface=S1``, io forwarding."""

    name = "baseline"
    label = "DPDK net_vhost (testpmd io)"

    def __init__(self, cpus: str | None = "0", vdev_args: str = ""):
        self.cpus = cpus
        self.vdev_args = vdev_args
        self.pmd: TestPmd | None = None

    def vdevs(self, socks: Sequence[str]) -> list[str]:
        return [f"net_vhost{i},iface={s}{self.vdev_args}" for i, s in enumerate(socks)]

    def start(self, socks: Sequence[str], logdir: Path, tag: str) -> None:
        self.pmd = TestPmd(self.vdevs(socks), cpus=self.cpus, name="vhost", log_path=logdir / f"{tag}.backend.log")
        try:
            self.pmd.start()
            self.pmd.start_fwd("io")
        except TestPmdError as exc:
            self.stop()
            raise BackendError(str(exc)) from None
        missing = [s for s in socks if not is_socket(s)]
        if missing:
            self.stop()
            raise BackendError(f"net_vhost did not create {missing}")

    def pid(self) -> int | None:
        return self.pmd.pid if self.pmd else None

    def check(self) -> None:
        if self.pmd is None or not self.pmd.alive:
            raise BackendError("the DPDK vhost testpmd died")

    def stop(self) -> dict:
        info: dict = {}
        if self.pmd is not None:
            try:
                if self.pmd.alive:
                    info["ports"] = {str(p): s for p, s in self.pmd.stop_fwd().items()}
            except TestPmdError:
                pass
            info["exit_status"] = self.pmd.close()
            self.pmd = None
        return info

    def describe(self) -> dict:
        return {**super().describe(), "cpus": self.cpus, "vdev_args": self.vdev_args}


def vhostni_unavailable_reason(command: Sequence[str] | None = None) -> str | None:
    """None if ``vhostni run`` can be started here, else why not (checked in a subprocess)."""
    try:
        from vhostni.testing.daemon import vhostni_command  # noqa: F401
    except Exception as exc:  # the test harness module is someone else's and may be mid-change
        return f"cannot import vhostni.testing.daemon: {exc!r}"
    if command:
        return None
    probe = subprocess.run([sys.executable, "-c", "import vhostni.cli, vhostni.daemon"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        lines = (probe.stderr or probe.stdout).strip().splitlines()
        return "import vhostni.cli failed: " + (lines[-1] if lines else f"status {probe.returncode}")
    return None


class VhostniBackend(Backend):
    """``vhostni run --ni a=S0 --ni b=S1 [extra args]`` pinned with taskset; counters via ``--stats-file``."""

    name = "vhostni"
    label = "vhostni run"

    def __init__(self, cpus: str | None = "0", extra_args: Sequence[str] = (),
                 command: Sequence[str] | None = None, stats_file: bool = True):
        self.cpus = cpus
        self.extra_args = list(extra_args)
        self.command = list(command) if command else None
        self.stats_file = stats_file
        self.daemon = None
        self._stats_path: Path | None = None

    def start(self, socks: Sequence[str], logdir: Path, tag: str) -> None:
        try:
            from vhostni.testing.daemon import DaemonError, VhostniDaemon, vhostni_command
        except Exception as exc:
            raise BackendUnavailable(f"cannot import vhostni.testing.daemon: {exc!r}") from None
        try:
            base = self.command or vhostni_command()
        except DaemonError as exc:
            raise BackendUnavailable(str(exc)) from None
        if self.cpus is not None:
            base = ["taskset", "-c", self.cpus, *base]
        base = pdeathsig_prefix() + base
        extra = list(self.extra_args)
        if self.stats_file:
            self._stats_path = Path(socks[0]).parent / "vhostni-stats.json"
            extra += ["--stats-file", str(self._stats_path)]
        nis = {"a": socks[0], "b": socks[1]}
        self.daemon = VhostniDaemon(nis, extra_args=extra, log_path=logdir / f"{tag}.vhostni.log", command=base)
        try:
            self.daemon.start(timeout=60)
        except DaemonError as exc:
            self.daemon.stop()
            self.daemon = None
            # It exited before listening: that is not one bad run, it cannot run at all.
            raise BackendUnavailable(_short(str(exc))) from None

    def pid(self) -> int | None:
        return self.daemon.pid if self.daemon else None

    def check(self) -> None:
        if self.daemon is None or not self.daemon.alive:
            status = self.daemon.proc.returncode if self.daemon and self.daemon.proc else None
            tail = self.daemon.log_tail(15) if self.daemon else ""
            raise BackendError(f"vhostni exited (status {status}) during the run:\n{tail}")

    def counters(self) -> dict | None:
        if self._stats_path is None:
            return None
        try:
            return json.loads(self._stats_path.read_text())
        except (OSError, ValueError):
            return None

    def stop(self) -> dict:
        info: dict = {}
        if self.daemon is not None:
            info["counters"] = self.counters()
            info["exit_status"] = self.daemon.stop()
            if info["exit_status"] not in (0, None):
                info["log_tail"] = self.daemon.log_tail(20)
            self.daemon = None
        return info

    def describe(self) -> dict:
        return {**super().describe(), "cpus": self.cpus, "extra_args": self.extra_args,
                "command": shlex.join(self.command) if self.command else None}


def _short(text: str, lines: int = 12) -> str:
    ls = text.strip().splitlines()
    return "\n".join(ls[:2] + (["..."] if len(ls) > lines else []) + ls[-(lines - 2):]) if len(ls) > lines else text
