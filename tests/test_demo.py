"""`make demo` (vhostni/demo.py), the README's first command: two guests behind vhostni, a worm
and a SYN bomb from one of them contained, what the NI did shown; it must say it passed."""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.guest


def test_the_demo_passes(tmp_path, vhostni_images, capsys):
    from vhostni import demo
    images = str(Path(vhostni_images.kernel).parent)
    assert demo.main(["--images", images, "--logs", str(tmp_path / "logs")]) == 0
    out = capsys.readouterr().out
    assert "demo passed" in out, out[-3000:]
