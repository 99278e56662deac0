"""lmforge.paths: the one cache root and the one file checksum, torch-free."""
from __future__ import annotations

import hashlib
import subprocess
import sys


def test_home_follows_the_environment(monkeypatch, tmp_path):
    from lmforge.paths import lmforge_home

    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "h"))
    assert lmforge_home() == tmp_path / "h"
    monkeypatch.delenv("LMFORGE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert lmforge_home() == tmp_path / ".cache" / "lmforge"


def test_sha256_file_matches_hashlib(tmp_path):
    from lmforge.paths import sha256_file

    p = tmp_path / "blob"
    data = bytes(range(256)) * 9000  # > 1 MiB: more than one read
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(p)) == sha256_file(p)


def test_every_user_shares_the_one_definition():
    import lmforge.data.fetch as fetch
    import lmforge.eval.sources as sources
    import lmforge.loading.resolve as resolve
    import lmforge.paths as paths
    import lmforge.pull as pull

    assert fetch.lmforge_home is paths.lmforge_home and sources.lmforge_home is paths.lmforge_home
    assert resolve.lmforge_home is paths.lmforge_home
    assert fetch.sha256_file is paths.sha256_file and pull.sha256_file is paths.sha256_file


def test_paths_and_fetch_import_without_torch():
    code = "import sys, lmforge.paths, lmforge.data.fetch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
