# cffi's setuptools hook compiles csrc/ into vhostni._fastpath; everything else is in pyproject.toml.
#
# build_py also copies what the harness and the shipped scanners need from the top of the checkout into the
# package, as vhostni/_data/ with the same layout (guests/*.c, scanners/, images/init.sh, examples/): a wheel
# then carries them, and vhostni.resources finds them there (or, in a checkout, at the top).  MANIFEST.in
# puts the same files into the sdist, so a wheel built from it has them too.
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIRS = ("guests", "scanners", "examples")      # keep in step with vhostni/resources.py
DATA_FILES = ("images/init.sh",)
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.o", "test-logs", ".pytest_cache")


class build_py_with_data(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return      # an editable install uses the checkout's own files
        dest = os.path.join(self.build_lib, "vhostni", "_data")
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        for d in DATA_DIRS:
            src = os.path.join(HERE, d)
            if not os.path.isdir(src):
                raise SystemExit(f"setup.py: {src} is missing: build from a checkout or an sdist of vhostni")
            shutil.copytree(src, os.path.join(dest, d), ignore=IGNORE)
        for f in DATA_FILES:
            os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
            shutil.copy2(os.path.join(HERE, f), os.path.join(dest, f))


setup(cffi_modules=["vhostni/_build_fastpath.py:ffibuilder"],
      cmdclass={"build_py": build_py_with_data})
