"""pytest plugin (entry point ``pytest11: vhostni``): fixtures for tests with real guests and vhostni.

Fixtures
    vhostni_images          session  GuestImages: from ``--vhostni-images``, $VHOSTNI_IMAGES, ``<rootdir>/images/out``
                                     (a vhostni checkout) or ``~/.cache/vhostni/images``, in that order; built
                                     there (``vhostni images build``, a few minutes the first time) when missing,
                                     unless ``--vhostni-no-build``.  When there are none and they cannot be built,
                                     the test is skipped with the reason and the exact command (fails instead
                                     when CI=true, so CI cannot skip guest tests by accident)
    vhostni_logdir          session  where console and daemon logs go (``--vhostni-logs``, $VHOSTNI_TEST_LOGS,
                                     default ``<rootdir>/test-logs``)
    vhostni_sockdir         module   a short private directory for unix sockets (paths must stay < 108 bytes)
    vhostni_guest_factory   module   ``make(name, **Guest kwargs) -> Guest`` (booted), ``make.many([...])``
                                     boots several in parallel; all closed at the end of the module.
                                     ``images=`` boots other images (your own kernel, initrd or disk)
    vhostni_daemon_factory  module   ``start({name: socket}, uplink=None, netns=None, ...) -> VhostniDaemon``;
                                     stopped (SIGTERM) at the end of the module
    vhostni_netns           module   ``new() -> NetNamespace``; deleted at the end of the module

Logs are named ``<test module>.<guest>.console.log`` and ``<test module>.<daemon>.vhostni.log``.  When a test
fails, the report gets a "vhostni logs" section with those paths and the last lines of each.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytest

from .daemon import VhostniDaemon
from ..resources import default_images_dir
from .guest import QEMU, QEMU_PACKAGE, Guest, GuestImages, ImagesMissing, boot_guests
from .netns import NetNamespace

# Guests and daemons alive now, for the failure report.
_live_guests: "weakref.WeakSet[Guest]" = weakref.WeakSet()
_live_daemons: "weakref.WeakSet[VhostniDaemon]" = weakref.WeakSet()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("vhostni", "vhostni guests and daemons")
    g.addoption("--vhostni-images", default=None,
                help="directory with vmlinuz and initrd.cpio.gz (default $VHOSTNI_IMAGES, images/out in a "
                     "vhostni checkout, else ~/.cache/vhostni/images); built there if missing")
    g.addoption("--vhostni-no-build", action="store_true", default=False,
                help="do not build missing guest images (skip, or fail when CI=true, instead)")
    g.addoption("--vhostni-logs", default=None,
                help="directory for guest console and daemon logs (default $VHOSTNI_TEST_LOGS or test-logs)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "guest: boots real QEMU guests (slow; needs `make images`)")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


@pytest.fixture(scope="session")
def vhostni_logdir(pytestconfig: pytest.Config) -> Path:
    d = (pytestconfig.getoption("--vhostni-logs") or os.environ.get("VHOSTNI_TEST_LOGS")
         or pytestconfig.rootpath / "test-logs")
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    return d


def _images_dir(config: pytest.Config) -> tuple[Path, Path | None]:
    """Where the images are or go, and the package cache to build them with (None: the default)."""
    given = config.getoption("--vhostni-images") or os.environ.get("VHOSTNI_IMAGES")
    if given:
        return Path(given), None
    images = config.rootpath / "images"
    if (images / "out" / "vmlinuz").is_file() or (images / "build.py").is_file():
        return images / "out", images / "cache"         # a vhostni checkout: where `make images` puts them
    return default_images_dir(), None


def _say(config: pytest.Config, text: str) -> None:
    """A line on the terminal now, even while pytest captures output."""
    capman = config.pluginmanager.getplugin("capturemanager")
    tr = config.pluginmanager.getplugin("terminalreporter")
    if capman is None or tr is None:
        return
    with capman.global_and_fixture_disabled():
        tr.write_line(text)


def build_images(config: pytest.Config, d: Path, logdir: Path, cache: Path | None = None) -> str | None:
    """Run ``vhostni images build --out d``; None when it worked, else why not (one line and the log)."""
    log = logdir / "vhostni-images-build.log"
    _say(config, f"vhostni: building guest images into {d} (Debian packages; a few minutes the first time), "
                 f"log: {log}")
    cmd = [sys.executable, "-m", "vhostni", "images", "build", "--out", str(d)]
    if cache is not None and not os.environ.get("VHOSTNI_IMAGES_CACHE"):
        cmd += ["--cache", str(cache)]
    with open(log, "wb") as f:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode == 0:
        return None
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    errors = [x for x in lines if "error:" in x] or lines[-1:]
    return f"{errors[-1] if errors else f'exit status {r.returncode}'} (log: {log})"


@pytest.fixture(scope="session")
def vhostni_images(pytestconfig: pytest.Config, vhostni_logdir: Path) -> GuestImages:
    d, cache = _images_dir(pytestconfig)
    command = f"vhostni images build --out {d}"
    try:
        return GuestImages.locate(d)
    except ImagesMissing as e:
        if pytestconfig.getoption("--vhostni-no-build") or os.environ.get("VHOSTNI_IMAGES_BUILD") == "0":
            why = f"{e}"
        else:
            failure = build_images(pytestconfig, d, vhostni_logdir, cache)
            if failure is None:
                return GuestImages.locate(d)
            why = f"guest images not found in {d} and building them failed: {failure}"
        why += f"; build them with: {command}"
        if _in_ci():
            pytest.fail(f"CI=true but {why}", pytrace=False)
        pytest.skip(why)


@pytest.fixture(scope="module")
def vhostni_sockdir() -> Any:
    d = tempfile.mkdtemp(prefix="vni-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def _module_tag(request: pytest.FixtureRequest) -> str:
    return _safe(request.module.__name__.rsplit(".", 1)[-1]) if request.module else "session"


class GuestFactory:
    """Boots guests with the module's images and log directory; closes them all at teardown."""

    def __init__(self, images: GuestImages, logdir: Path, tag: str):
        self.images, self.logdir, self.tag = images, logdir, tag
        self.guests: list[Guest] = []

    def create(self, name: str, **kw) -> Guest:
        """A Guest configured like make() but not started (for boot_guests or custom control)."""
        kw.setdefault("log_path", self.logdir / f"{self.tag}.{name}.console.log")
        images = kw.pop("images", None) or self.images
        g = Guest(name, images, **kw)
        self.guests.append(g)
        _live_guests.add(g)
        return g

    def __call__(self, name: str, *, boot_timeout: float | None = None, **kw) -> Guest:
        g = self.create(name, **kw)
        return g.boot(boot_timeout)

    def many(self, specs: Sequence[tuple[str, Mapping[str, Any]]], boot_timeout: float | None = None) -> list[Guest]:
        """Boot several guests in parallel: ``many([("a", {...}), ("b", {...})])``."""
        guests = [self.create(name, **dict(kw)) for name, kw in specs]
        return boot_guests(guests, boot_timeout)

    def close(self) -> None:
        for g in self.guests:
            g.close()
            _live_guests.discard(g)


@pytest.fixture(scope="module")
def vhostni_guest_factory(request: pytest.FixtureRequest, vhostni_images: GuestImages,
                          vhostni_logdir: Path) -> Any:
    qemu = os.environ.get("VHOSTNI_QEMU", QEMU)
    if shutil.which(qemu) is None:
        why = f"{qemu} not found: install Debian's {QEMU_PACKAGE} (apt-get install {QEMU_PACKAGE})"
        if _in_ci():
            pytest.fail(f"CI=true but {why}", pytrace=False)
        pytest.skip(why)
    f = GuestFactory(vhostni_images, vhostni_logdir, _module_tag(request))
    yield f
    f.close()


class DaemonFactory:
    def __init__(self, logdir: Path, tag: str):
        self.logdir, self.tag = logdir, tag
        self.daemons: list[VhostniDaemon] = []

    def __call__(self, nis: Mapping[str, str | os.PathLike], *, uplink: str | None = None,
                 netns: str | NetNamespace | None = None, extra_args: Sequence[str] = (),
                 name: str | None = None, timeout: float = 30.0, **kw) -> VhostniDaemon:
        name = name or f"vhostni{len(self.daemons) + 1}"
        ns = netns.name if isinstance(netns, NetNamespace) else netns
        d = VhostniDaemon(nis, uplink=uplink, netns=ns, extra_args=extra_args,
                          log_path=self.logdir / f"{self.tag}.{_safe(name)}.vhostni.log", **kw)
        self.daemons.append(d)
        _live_daemons.add(d)
        return d.start(timeout)

    def close(self) -> None:
        for d in reversed(self.daemons):
            d.stop()
            _live_daemons.discard(d)


@pytest.fixture(scope="module")
def vhostni_daemon_factory(request: pytest.FixtureRequest, vhostni_logdir: Path) -> Any:
    f = DaemonFactory(vhostni_logdir, _module_tag(request))
    yield f
    f.close()


@pytest.fixture(scope="module")
def vhostni_netns() -> Any:
    made: list[NetNamespace] = []

    def new(prefix: str = "vni") -> NetNamespace:
        if shutil.which("ip") is None:
            pytest.skip("iproute2 (`ip`) is not installed")
        ns = NetNamespace(prefix)
        made.append(ns)
        return ns

    yield new
    for ns in reversed(made):
        ns.delete()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and (_live_guests or _live_daemons):
        try:
            _add_log_section(rep)
        except Exception as e:  # never let a report helper break the run
            rep.sections.append(("vhostni logs", f"(could not collect logs: {e!r})"))


def _add_log_section(rep: pytest.TestReport) -> None:
    if True:
        parts = []
        for g in list(_live_guests):
            parts.append(f"== guest {g.name}: {g.log_path}\n{g.console_tail(20)}")
        for d in list(_live_daemons):
            parts.append(f"== vhostni daemon ({'running' if d.alive else f'exit {d.returncode}'}): "
                         f"{d.log_path}\n{d.log_tail(20)}")
        rep.sections.append(("vhostni logs", "\n\n".join(parts)))
