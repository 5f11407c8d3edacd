"""The operator library's cache: an artefact is used only while it has the hash recorded when it was made."""

import hashlib

import pytest

from geomoe.client import native_ops


def test_a_cached_library_changed_since_its_build_is_not_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(native_ops.LIBRARY_ENV, raising=False)
    path = native_ops.cache_dir() / f"libgeomoe_ops-{native_ops._build_key(native_ops._flags(True))}.so"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x7fELF as built")
    (path.parent / (path.name + ".sha256")).write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")
    assert native_ops.ops_library(build=False) == path
    path.write_bytes(b"\x7fELF planted later")
    with pytest.raises(FileNotFoundError, match="does not match the hash recorded"):
        native_ops.ops_library(build=False)


def test_cached_headers_changed_since_they_were_fetched_are_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(native_ops.INCLUDE_ENV, raising=False)
    folder = native_ops.cache_dir() / "include-1.21.0"
    folder.mkdir(parents=True)
    for name in native_ops.HEADERS:
        (folder / name).write_text("// as fetched\n")
        (folder / (name + ".sha256")).write_text(hashlib.sha256(b"// as fetched\n").hexdigest() + "\n")
    assert native_ops._headers() == folder
    (folder / native_ops.HEADERS[0]).write_text("#include </etc/shadow>\n")
    fetched = []
    monkeypatch.setattr(native_ops.urllib.request, "urlopen", lambda *a, **k: fetched.append(a) or _refuse())
    with pytest.raises(native_ops.OpsBuildError, match="could not fetch"):
        native_ops._headers()  # fetched again rather than compiled as it is now
    assert fetched


def _refuse():
    raise OSError("offline in this test")
