"""vhostni as a product: the sdist and the wheel built from it carry what the harness and the shipped scanners
need, and a fresh venv with only that wheel and pytest (from the system's python3, no site packages) builds
guest images, resolves the shipped scanners by name and runs examples/ci from a directory outside the checkout.

The wheel is built the way a user's build frontend would (PEP 517 hooks: sdist from a copy of the checkout's
files, wheel from the unpacked sdist), without network; the venv gets its dependencies and pytest from the
package index.  The venv lives in pytest's private (0700) temporary directory, as a venv in a home directory
would: the sandboxed scanners must still be able to start.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def clean_env(**extra: str) -> dict:
    """The environment of a user's shell: nothing pointing into this checkout or its venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "VHOSTNI_CMD", "PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                                  if not p.startswith(str(REPO)))
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    """(sdist, wheel) of the checkout as it is now (tracked and untracked-but-not-ignored files)."""
    t = tmp_path_factory.mktemp("dist")
    files = run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO).stdout.split("\0")
    src = t / "src"
    for f in filter(None, files):
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_bytes((REPO / f).read_bytes())
    hook = "import sys; from setuptools import build_meta as b; print(b.build_{}(sys.argv[1]))"
    sdist = t / "out" / run([sys.executable, "-c", hook.format("sdist"), t / "out"], cwd=src).stdout.split()[-1]
    (t / "unpacked").mkdir()
    run(["tar", "-xzf", sdist, "-C", t / "unpacked"])     # (Debian 12's python 3.11.2 has no extraction filter)
    (top,) = (t / "unpacked").iterdir()
    wheel = t / "out" / run([sys.executable, "-c", hook.format("wheel"), t / "out"], cwd=top).stdout.split()[-1]
    return sdist, wheel


def test_sdist_and_wheel_carry_the_harness_and_the_scanners(dists):
    sdist, wheel = dists
    with tarfile.open(sdist) as tf:
        in_sdist = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert {"guests/worm.c", "scanners/codered/__main__.py", "images/init.sh", "images/build.py", "csrc/vring.c",
            "examples/ci/test_worm_contained.py", "MANIFEST.in"} <= in_sdist
    names = set(zipfile.ZipFile(wheel).namelist())
    data = "vhostni/_data/"
    for rel in ("guests/worm.c", "guests/dnsd.c", "guests/minimail.c", "images/init.sh",
                "scanners/codered/__main__.py", "scanners/email/__main__.py", "scanners/null.py",
                "scanners/null_stream.py", "examples/codered.toml", "examples/ci/test_worm_contained.py",
                "examples/ci/policy.toml", "examples/ci/requirements.txt"):
        assert data + rel in names, f"{rel} is not in the wheel"
    assert "vhostni/images.py" in names and "vhostni/testing/plugin.py" in names
    assert any(n.startswith("vhostni/_fastpath") and n.endswith(".so") for n in names)
    assert not [n for n in names if "__pycache__" in n or "test-logs" in n]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "vhostni = vhostni.testing.plugin" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.fixture(scope="module")
def venv(dists, tmp_path_factory) -> Path:
    """A fresh venv from the system's python3 with the wheel and pytest installed (dependencies from PyPI)."""
    sdist, wheel = dists
    v = tmp_path_factory.mktemp("venv") / "venv"
    # Debian's python3 (this checkout's venv may come from another python, e.g. pyenv's)
    python3 = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys._base_executable
    run([python3, "-m", "venv", v], env=clean_env())
    run([v / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel, "pytest"],
        env=clean_env())
    return v


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("elsewhere")


def installed(venv: Path, code: str, cwd: Path) -> str:
    return run([venv / "bin" / "python", "-c", code], cwd=cwd, env=clean_env()).stdout


def test_installed_package_finds_its_data_and_shipped_scanners(venv, elsewhere):
    out = installed(venv, "import vhostni, vhostni.resources as r; print(vhostni.__file__); print(r.data_root())",
                    elsewhere).split()
    site = str(venv / "lib")
    assert out[0].startswith(site) and out[1].startswith(site) and out[1].endswith("vhostni/_data"), out
    out = installed(venv, """
from vhostni import resources
from vhostni.policy import load_policy, parse_policy
for name in ("codered", "email", "null", "null_stream"):
    print(parse_policy({"scanner": [{"name": "s", "program": "vhostni:" + name}]}).scanners[0].argv[1])
print(load_policy(str(resources.path("examples/codered.toml"))).scanners[0].argv[1])
""", elsewhere).split()
    assert all(p.startswith(site) and "/vhostni/_data/scanners/" in p for p in out), out
    assert out[0] == out[-1], "the example policy's ../scanners/codered is the shipped scanner"
    r = run([venv / "bin" / "vhostni", "images", "build", "--help"], cwd=elsewhere, env=clean_env())
    assert "--add SRC[:DEST]" in r.stdout and "--hook SCRIPT" in r.stdout
    r = run([venv / "bin" / "python", "-m", "pytest", "--fixtures", "-p", "no:cacheprovider"], cwd=elsewhere,
            env=clean_env())
    assert "vhostni_guest_factory" in r.stdout and "vhostni_images" in r.stdout


@pytest.fixture(scope="module")
def installed_images(venv, elsewhere) -> Path:
    """Guest images built by the installed package, with the checkout's package cache (no downloads)."""
    out = elsewhere / "images"
    run([venv / "bin" / "vhostni", "images", "build", "--out", out, "--cache", REPO / "images" / "cache"],
        cwd=elsewhere, env=clean_env())
    return out


def test_installed_package_builds_the_same_images_as_the_checkout(installed_images):
    """Same inputs, same digest: the checkout's images/build.py finds the installed build up to date."""
    r = run([sys.executable, REPO / "images" / "build.py", "--out", installed_images,
             "--cache", REPO / "images" / "cache"], env=clean_env())
    assert "up to date" in r.stderr, r.stderr


@pytest.mark.guest
def test_example_ci_project_runs_from_the_installed_wheel(venv, installed_images, elsewhere):
    """examples/ci as a user gets it, in a directory of its own, with CI=true (a skip would be a failure)."""
    site_data = next((venv / "lib").glob("python3*/site-packages/vhostni/_data"))
    project = elsewhere / "project"
    run(["cp", "-r", site_data / "examples" / "ci", project])
    r = subprocess.run([venv / "bin" / "python", "-m", "pytest", "-p", "no:cacheprovider", "-s"], cwd=project,
                       env=clean_env(CI="true", VHOSTNI_IMAGES=str(installed_images)), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "1 passed" in r.stdout, f"{r.stdout[-6000:]}\n{r.stderr[-2000:]}"
    assert "worm:" in r.stdout and " cut" in r.stdout


def test_scanner_interpreter_from_a_venv_in_a_private_directory(tmp_path, monkeypatch):
    """A venv's python is a symlink: the sandbox runs the interpreter by its real path, so a
    venv the scanner user cannot walk to (a 0700 home, pytest's tmp) does not make every
    scanner fail with EACCES, and no path of the daemon's install shows in the scanner's view."""
    from vhostni import sandbox
    real = os.path.realpath("/usr/bin/python3")      # the system's python, which others can run
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "python").symlink_to(real)
    monkeypatch.setattr(sys, "executable", str(private / "python"))
    assert sandbox.interpreter() == real
    import tempfile
    public = Path(tempfile.mkdtemp(prefix="vni-venv-", dir="/tmp"))
    try:
        public.chmod(0o755)
        (public / "python").symlink_to(real)
        monkeypatch.setattr(sys, "executable", str(public / "python"))
        assert sandbox.interpreter() == real                # walkable too: still the real file
    finally:
        (public / "python").unlink()
        public.rmdir()
