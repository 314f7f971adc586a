"""The data path's block cache (csrc/blkcache.c), which kept segments and held frames come
from: a record never takes more than twice the bytes it is counted as in the memcaps
(tcp_bytes_max, held_bytes_max count frame bytes, so a fixed 2 KiB block per record would
let a guest's tiny segments take thirty times their count), the cache keeps at most its
byte cap, and a block given back is poisoned: a write after it faults under ASan."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")
pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


def build(tmp_path, *flags) -> str:
    exe = str(tmp_path / ("blk_test" + ("_asan" if flags else "")))
    subprocess.run(["cc", "-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", *flags, f"-I{CSRC}",
                    os.path.join(HERE, "c", "blk_test.c"), os.path.join(CSRC, "blkcache.c"), "-o", exe],
                   check=True)
    return exe


def test_blocks_are_at_most_twice_their_size_and_the_cache_keeps_its_cap(tmp_path):
    out = subprocess.run([build(tmp_path), "bounds"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


def test_a_write_into_a_block_given_back_faults_under_asan(tmp_path):
    exe = build(tmp_path, "-fsanitize=address")
    out = subprocess.run([exe, "uaf"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0"))
    assert out.returncode != 0 and "not caught" not in out.stdout
    assert "use-after-poison" in out.stderr, out.stderr[-2000:]
