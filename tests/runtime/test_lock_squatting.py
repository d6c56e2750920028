"""The address locks cannot be squatted: ``$TMPDIR/tokensvc-<uid>`` is shared ground, so a
directory another local user created first (or a symlink, or one open to others) is
refused with one line, never used; lock files are never opened through a symlink.

"Another user" is simulated as root: the directory is pre-created with a wrong mode, as a
symlink, or chowned to uid 65534. Real ``tokensvc serve`` processes for the one-line
refusal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tokensvc.proc import ownership
from tokensvc.proc.ownership import StartupError, claim_address, lock_directory
from tokensvc.redis.embedded import free_port


@pytest.fixture
def tmpdir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $TMPDIR for this test (tempfile reads it once: reset its cache too)."""
    base = tmp_path / "t"
    base.mkdir()
    monkeypatch.setenv("TMPDIR", str(base))
    monkeypatch.setattr(tempfile, "tempdir", None)
    return base


def _runtime(base: Path) -> Path:
    return base / f"tokensvc-{os.getuid()}"


def _serve_refused(base: Path, port: int) -> str:
    """A `serve` with TMPDIR=base that must refuse to start: its one stderr line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSVC_")}
    env["TMPDIR"] = str(base)
    # a closed Redis port: should the lock directory be accepted, the start fails at once
    # on Redis instead (and says so), never runs on
    closed = f"redis://127.0.0.1:{free_port()}/0"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "tokensvc", "serve", "--insecure"),
            *("--listen", f"127.0.0.1:{port}", "--data-dir", str(base.parent / "data")),
            *("--redis-url", closed),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    lines = [line for line in done.stderr.splitlines() if not line.startswith('{"ts"')]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_a_lock_directory_of_another_user_stops_nothing_silently(tmpdir_env):
    squatted = _runtime(tmpdir_env)
    squatted.mkdir(mode=0o700)
    os.chown(squatted, 65534, 65534)
    line = _serve_refused(tmpdir_env, free_port())
    assert "runtime directory" in line and "uid 65534" in line, line
    assert list(squatted.iterdir()) == []  # nothing created where the other user rules


@pytest.mark.parametrize("mode", [0o755, 0o777, 0o1777])
def test_a_lock_directory_open_to_others_is_refused(tmpdir_env, mode):
    runtime = _runtime(tmpdir_env)
    runtime.mkdir()
    runtime.chmod(mode)
    with pytest.raises(StartupError, match=f"open to other users \\(mode {mode & 0o777:o}\\)"):
        claim_address(f"127.0.0.1:{free_port()}")
    assert list(runtime.iterdir()) == []


def test_a_symlinked_lock_directory_is_refused(tmpdir_env, tmp_path):
    elsewhere = tmp_path / "theirs"
    elsewhere.mkdir(mode=0o700)
    _runtime(tmpdir_env).symlink_to(elsewhere)
    line = _serve_refused(tmpdir_env, free_port())
    assert "runtime directory" in line and "symlink" in line, line
    assert list(elsewhere.iterdir()) == []  # no lock file created through the link


def test_lock_files_are_not_opened_through_symlinks(tmpdir_env, tmp_path):
    port = free_port()
    runtime = ownership.runtime_directory()
    target = tmp_path / "victim"
    (runtime / f"127.0.0.1_{port}.lock").symlink_to(target)
    with pytest.raises(StartupError, match="symlink"):
        claim_address(f"127.0.0.1:{port}")
    assert not target.exists()
    data = tmp_path / "data"
    data.mkdir()
    (data / "lock").symlink_to(target)
    with pytest.raises(StartupError, match="symlink"):
        lock_directory(data, "the Redis data directory")
    assert not target.exists()


def test_a_private_lock_directory_is_used(tmpdir_env):
    port = free_port()
    handle = claim_address(f"127.0.0.1:{port}")
    try:
        runtime = _runtime(tmpdir_env)
        info = runtime.lstat()
        assert info.st_uid == os.getuid() and info.st_mode & 0o777 == 0o700
        lock = runtime / f"127.0.0.1_{port}.lock"
        assert lock.stat().st_mode & 0o077 == 0
        with pytest.raises(StartupError, match="address in use"):  # still one owner
            claim_address(f"127.0.0.1:{port}")
    finally:
        assert handle is not None
        handle.close()
