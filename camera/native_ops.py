"""geomoe's own ONNX Runtime operator library (`ops/folded_moe.cc`: the MoE layer as one operator), built here.

A fused export (`export_onnx(..., fused=True)`) has one `ai.geomoe.FoldedMoE` node per MoE layer in place of 23
standard operations; ONNX Runtime runs it once this library is registered with the session. The library is
compiled on the machine that uses it, from the source shipped in the package, against ONNX Runtime's C API
headers:

- the headers are the `libonnxruntime-dev` package of Debian trixie, fetched once (pinned by SHA-256) from the Debian
  mirror this machine's apt configuration names (`GEOMOE_DEBIAN_MIRROR` names another) unless `ORT_INCLUDE` names a
  folder holding them; the C API is stable, so 1.21's headers serve any runtime from 1.21 on (MIN_ORT);
- the result is cached under `$XDG_CACHE_HOME/geomoe/ops` (default `~/.cache/...`), one file per source, flags and
  CPU, so rebuilding happens only when one of those changes;
- `GEOMOE_OPS_LIBRARY` names a library built elsewhere (the camera image ships one), used as it is.

Building is an explicit step (`geomoe device build-ops`, `build_library`, the image build): loading a model never
compiles or fetches anything, and a fused export without the library is an error naming that command.

`native=True` (the default) compiles for this CPU (`-march=native`); `native=False` for any CPU of the
architecture (SSE2 on x86-64, NEON on arm64), as an image built under emulation for every Pi must be.
"""

from __future__ import annotations

import functools
import hashlib
import io
import lzma
import os
import platform
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path

SOURCE = Path(__file__).parent / "ops" / "folded_moe.cc"
DOMAIN = "ai.geomoe"  # the ONNX domain of the operators in the library
LIBRARY_ENV = "GEOMOE_OPS_LIBRARY"
INCLUDE_ENV = "ORT_INCLUDE"
MIRROR_ENV = "GEOMOE_DEBIAN_MIRROR"
HEADERS_DEB = (  # path in a Debian mirror, SHA-256 of the package
    "pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
    "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08",
)
MIN_ORT = (1, 21)  # the operator uses ONNX Runtime's lite custom-op API of 1.21's headers
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
HEADERS = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_cxx_inline.h", "onnxruntime_float16.h",
           "onnxruntime_lite_custom_op.h")  # fmt: skip
# -ffast-math lets the compiler vectorise the sums and exp; linking is done without it, or GCC's crtfastmath would
# switch denormals off for the whole process that loads the library.
COMPILE_FLAGS = ("-std=c++17", "-O3", "-ffast-math", "-fPIC", "-fvisibility=hidden")


class OpsBuildError(RuntimeError):
    """The operator library could not be built here: no compiler, no headers, or the compiler failed."""


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "geomoe" / "ops"


def ops_library(native: bool = True) -> Path:
    """The library to register: `GEOMOE_OPS_LIBRARY` if set (it must exist), else the cached build for this source,
    flags and CPU, if it still has the hash recorded when it was built. Never builds: FileNotFoundError names the
    command that does."""
    named = os.environ.get(LIBRARY_ENV)
    if named:
        if not Path(named).is_file():
            raise FileNotFoundError(f"{LIBRARY_ENV}={named}: no such file")
        return Path(named)
    path = library_path(native)
    if not path.is_file():
        raise FileNotFoundError(f"geomoe's operator library is not built ({path}): run `geomoe device build-ops`")
    if not _intact(path):
        raise FileNotFoundError(f"{path} does not match the hash recorded when it was built: run "
                                "`geomoe device build-ops` to build it again")  # fmt: skip
    return path


def library_path(native: bool = True) -> Path:
    """Where the cached build for this source, flags and CPU lives."""
    return cache_dir() / f"libgeomoe_ops-{_build_key(_flags(native))}.so"


def build_ops(native: bool = True) -> Path:
    """The explicit build step: the cached library for this source, flags and CPU, compiled now unless it is there
    and intact. OpsBuildError says why it cannot be built here."""
    path = library_path(native)
    if path.is_file() and _intact(path):
        return path
    return build_library(path, _flags(native))


def check_runtime_version(version: str) -> None:
    """Raise RuntimeError unless ONNX Runtime `version` can run the operator (MIN_ORT and later)."""
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if numbers < MIN_ORT:
        wanted = ".".join(map(str, MIN_ORT))
        raise RuntimeError(f"geomoe's operator library needs ONNX Runtime {wanted} or later; this is {version}: "
                           f"pip install 'onnxruntime>={wanted}'")  # fmt: skip


def build_library(path: Path, flags: tuple[str, ...]) -> Path:
    """Compiles SOURCE into the shared library `path` (written whole or not at all)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise OpsBuildError("no C++ compiler (c++ or g++; CXX names another): install one, e.g. apt-get install g++")
    include = _headers()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        objects, partial = Path(work) / "folded_moe.o", Path(work) / path.name
        for command in (
            [compiler, *flags, f"-I{include}", "-c", str(SOURCE), "-o", str(objects)],
            [compiler, "-shared", str(objects), "-o", str(partial)],
        ):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise OpsBuildError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
        _digest_file(path).write_text(_sha256(partial) + "\n")
        partial.replace(path)
    return path


def _digest_file(path: Path) -> Path:
    """Where the SHA-256 of a cached artefact is kept (written when it was made, checked before every use)."""
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(path: Path) -> bool:
    """Whether a cached artefact still has the SHA-256 recorded when it was made (a cache folder is shared and
    writable: a library or header changed there since would otherwise be loaded or compiled as it is)."""
    recorded = _digest_file(path)
    return recorded.is_file() and recorded.read_text().strip() == _sha256(path)


def _flags(native: bool) -> tuple[str, ...]:
    if not native:
        return COMPILE_FLAGS
    return (*COMPILE_FLAGS, "-mcpu=native" if platform.machine() in ("aarch64", "arm64") else "-march=native")


@functools.cache  # asked at every ONNX session: the source and the CPU do not change while the process runs
def _build_key(flags: tuple[str, ...]) -> str:
    """Source, flags and (for a native build) the CPU's feature flags: a cache shared by two machines must not
    hand one the other's instructions."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(platform.machine().encode())
    if any("native" in flag for flag in flags):
        digest.update(_cpu_features().encode())
    return digest.hexdigest()[:16]


def _cpu_features() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def _headers() -> Path:
    """A folder with ONNX Runtime's C and C++ API headers: ORT_INCLUDE, or the pinned Debian package's, fetched
    into the cache once."""
    named = os.environ.get(INCLUDE_ENV)
    if named:
        missing = [name for name in HEADERS if not (Path(named) / name).is_file()]
        if missing:
            raise OpsBuildError(f"{INCLUDE_ENV}={named} lacks {', '.join(missing)}")
        return Path(named)
    folder = cache_dir() / "include-1.21.0"
    if all((folder / name).is_file() and _intact(folder / name) for name in HEADERS):
        return folder
    pool_path, sha256 = HEADERS_DEB
    url = f"{debian_mirror()}/{pool_path}"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            package = response.read()
    except OSError as error:
        message = f"could not fetch ONNX Runtime's headers from {url} ({error}); set {INCLUDE_ENV} or {MIRROR_ENV}"
        raise OpsBuildError(message) from error
    if hashlib.sha256(package).hexdigest() != sha256:
        raise OpsBuildError(f"{url} does not have the pinned SHA-256 {sha256}")
    _extract_headers(package, folder)
    return folder


def debian_mirror() -> str:
    """The Debian mirror to fetch from: `GEOMOE_DEBIAN_MIRROR`, else the first Debian archive this machine's apt
    configuration names (one-line `deb URI suite ...` lists and deb822 `URIs:` sources), without a trailing '/'."""
    named = os.environ.get(MIRROR_ENV)
    if named:
        return named.rstrip("/")
    for uri in apt_uris(APT_SOURCES):
        if uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    raise OpsBuildError(f"no Debian mirror in this machine's apt configuration: set {MIRROR_ENV} to one (a URL ending "
                        f"in /debian), or {INCLUDE_ENV} to a folder holding ONNX Runtime's C API headers")  # fmt: skip


def apt_uris(sources: tuple[Path, ...]) -> list[str]:
    """Archive URIs in apt source files and folders, in order."""
    files = []
    for source in sources:
        files += sorted(source.glob("*.list")) + sorted(source.glob("*.sources")) if source.is_dir() else [source]
    uris = []
    for path in files:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            words = line.split("#", 1)[0].split()
            if words[:1] == ["deb"]:
                uris += [w for w in words[1:] if "://" in w][:1]
            elif words[:1] == ["URIs:"]:
                uris += words[1:]
    return uris


def _extract_headers(package: bytes, folder: Path) -> None:
    """HEADERS out of a .deb (an ar archive whose data.tar.xz holds usr/include/onnxruntime/), into `folder`."""
    data = _ar_member(package, "data.tar.xz")
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(data))) as archive:
        for name in HEADERS:
            member = archive.extractfile(f"./usr/include/onnxruntime/{name}")
            if member is None:
                raise OpsBuildError(f"the headers package has no {name}")
            partial = folder / f".{name}.partial"
            partial.write_bytes(member.read())
            _digest_file(folder / name).write_text(_sha256(partial) + "\n")
            partial.replace(folder / name)


def _ar_member(archive: bytes, name: str) -> bytes:
    if not archive.startswith(b"!<arch>\n"):
        raise OpsBuildError("the headers package is not a Debian package (an ar archive)")
    offset = 8
    while offset + 60 <= len(archive):
        header = archive[offset : offset + 60]
        member, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        if member == name:
            return archive[offset + 60 : offset + 60 + size]
        offset += 60 + size + size % 2
    raise OpsBuildError(f"the headers package has no {name}")
