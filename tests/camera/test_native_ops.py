"""The operator library's cache: an artefact is used only while it has the hash recorded when it was made."""

import hashlib

import pytest

from geomoe.camera import native_ops


def test_a_cached_library_changed_since_its_build_is_not_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(native_ops.LIBRARY_ENV, raising=False)
    path = native_ops.cache_dir() / f"libgeomoe_ops-{native_ops._build_key(native_ops._flags(True))}.so"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x7fELF as built")
    (path.parent / (path.name + ".sha256")).write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")
    assert native_ops.ops_library() == path
    path.write_bytes(b"\x7fELF planted later")
    with pytest.raises(FileNotFoundError, match="does not match the hash recorded"):
        native_ops.ops_library()


def test_cached_headers_changed_since_they_were_fetched_are_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(native_ops.INCLUDE_ENV, raising=False)
    monkeypatch.setenv(native_ops.MIRROR_ENV, "http://mirror.invalid/debian")  # never dialled: urlopen refuses below
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


def test_the_mirror_comes_from_the_variable_or_this_machines_apt_configuration(tmp_path, monkeypatch):
    (tmp_path / "sources.list").write_text("# a comment\ndeb [arch=amd64] http://mirror.example/debian bookworm main\n")
    folder = tmp_path / "sources.list.d"
    folder.mkdir()
    (folder / "debian.sources").write_text("Types: deb\nURIs: http://other.example/debian\nSuites: trixie\n")
    (folder / "extra.list").write_text("deb http://packages.example/repo stable main\n")
    sources = (tmp_path / "sources.list", folder)
    assert native_ops.apt_uris(sources) == [
        "http://mirror.example/debian",
        "http://packages.example/repo",
        "http://other.example/debian",
    ]
    monkeypatch.setattr(native_ops, "APT_SOURCES", sources)
    monkeypatch.delenv(native_ops.MIRROR_ENV, raising=False)
    assert native_ops.debian_mirror() == "http://mirror.example/debian"
    monkeypatch.setenv(native_ops.MIRROR_ENV, "http://near.example/debian/")
    assert native_ops.debian_mirror() == "http://near.example/debian"
    monkeypatch.delenv(native_ops.MIRROR_ENV)
    monkeypatch.setattr(native_ops, "APT_SOURCES", (tmp_path / "none",))
    with pytest.raises(native_ops.OpsBuildError, match="GEOMOE_DEBIAN_MIRROR"):
        native_ops.debian_mirror()


def test_an_onnx_runtime_older_than_the_operators_api_is_refused_by_name():
    native_ops.check_runtime_version("1.21.0")
    native_ops.check_runtime_version("1.32.1")
    with pytest.raises(RuntimeError, match="needs ONNX Runtime 1.21 or later; this is 1.17.3"):
        native_ops.check_runtime_version("1.17.3")
