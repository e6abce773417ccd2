"""ONNX Runtime's C/C++ API headers, which the ORT custom-op library (csrc/ort/) compiles against.

No PyPI or npm package ships them (the onnxruntime and onnxruntime-extensions wheels, onnxruntime-node and
onnxruntime-react-native were checked). Debian's `libonnxruntime-dev` does, so they come, in this order, from:
`$FPEWIDEN_ORT_INCLUDE`; the system's (`apt install libonnxruntime-dev` on Debian 13 or newer); a copy fetched
earlier into packed/_build/; or the Debian archive this machine's apt is configured with (`$FPEWIDEN_DEBIAN_MIRROR`
names another; no host is named here), fetched the way apt trusts it: the suite's InRelease checked by
`gpgv` against the system's Debian archive keyring, the package index by the SHA256 that InRelease lists, the
package by the SHA256 the index lists. Only the headers are kept (under packed/_build/, never committed); nothing
is installed. A library built against API version N loads in any ONNX Runtime >= 1.N.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path

MIRROR_ENV = "FPEWIDEN_DEBIAN_MIRROR"
# Debian 13's suite only: a stable release keeps one ONNX Runtime (1.21, API 21) for its life, so the op's API
# version does not move with the day's testing or unstable suite. Past trixie's life: FPEWIDEN_ORT_INCLUDE.
SUITES = ("trixie",)
PACKAGE = "libonnxruntime-dev"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
SYSTEM = (Path("/usr/include/onnxruntime"), Path("/usr/local/include/onnxruntime"))
HEADER = "onnxruntime_cxx_api.h"
MIN_API = 17  # KernelContext_ParallelFor, the threads the op runs on


def api_version(include: Path) -> int:
    """ORT_API_VERSION of the headers in `include` (0: none found)."""
    m = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", _read(include / "onnxruntime_c_api.h"))
    return int(m.group(1)) if m else 0


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except OSError:
        return ""


def _usable(include: Path) -> bool:
    return (include / HEADER).is_file() and api_version(include) >= MIN_API


def find(cache: Path, fetch: bool = True) -> tuple[Path, str]:
    """(include folder, where it came from); raises RuntimeError saying why there is none."""
    env = os.environ.get("FPEWIDEN_ORT_INCLUDE")
    if env:
        if not _usable(Path(env)):
            raise RuntimeError(f"FPEWIDEN_ORT_INCLUDE={env} holds no {HEADER} of API version >= {MIN_API}")
        return Path(env), "FPEWIDEN_ORT_INCLUDE"
    for p in SYSTEM:
        if _usable(p):
            return p, "system"
    if _usable(cache):
        return cache, _read(cache / "SOURCE").strip() or "cache"
    if not fetch:
        raise RuntimeError("no ONNX Runtime headers")
    return cache, fetch_debian(cache)


def mirror() -> str:
    """The Debian archive to fetch from: $FPEWIDEN_DEBIAN_MIRROR, else the one apt's configuration names (the
    site of its `Label: Debian` index targets, or a configured URI whose path ends in /debian)."""
    env = os.environ.get(MIRROR_ENV)
    if env:
        return env.rstrip("/")
    try:
        cmd = ["apt-get", "indextargets", "--format", "$(SITE)", "Label: Debian"]
        sites = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        sites = []
    uris = sites + [u for f in _apt_sources() for u in _uris(_read(f))]
    for uri in uris:
        if uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    raise RuntimeError(f"apt's configuration names no Debian archive (set {MIRROR_ENV})")


def _apt_sources() -> list[Path]:
    etc = Path("/etc/apt")
    return [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list")),
            *sorted((etc / "sources.list.d").glob("*.sources"))]  # fmt: skip


def _uris(text: str) -> list[str]:
    """Archive URIs of a one-line-style or deb822 sources file."""
    out = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words[:1] == ["deb"]:
            out += [w for w in words[1:] if "://" in w][:1]
        elif words[:1] == ["URIs:"]:
            out += words[1:]
    return out


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verified_release(archive: str, suite: str, tmp: Path) -> str:
    """The suite's InRelease text once gpgv has accepted its signature."""
    if not KEYRING.is_file() or shutil.which("gpgv") is None:
        raise RuntimeError(f"cannot verify Debian's archive here (needs gpgv and {KEYRING})")
    signed = tmp / f"{suite}.InRelease"
    signed.write_bytes(_get(f"{archive}/dists/{suite}/InRelease"))
    res = subprocess.run(["gpgv", "--keyring", str(KEYRING), str(signed)], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"Debian's {suite} InRelease failed its signature check")
    return signed.read_text(errors="replace")


def _listed_sha256(release: str, name: str) -> str | None:
    body = release.split("SHA256:", 1)[-1]
    m = re.search(rf"^\s+([0-9a-f]{{64}})\s+\d+\s+{re.escape(name)}$", body, re.M)
    return m.group(1) if m else None


def _package_record(index: str) -> dict[str, str] | None:
    for stanza in index.split("\n\n"):
        if re.search(rf"^Package: {PACKAGE}$", stanza, re.M):
            return dict(re.findall(r"^([A-Za-z0-9-]+): (.*)$", stanza, re.M))
    return None


def _ar_member(deb: bytes, prefix: str) -> tuple[str, bytes]:
    """The first member of a .deb (an `ar` archive) whose name starts with `prefix`."""
    if not deb.startswith(b"!<arch>\n"):
        raise RuntimeError("not a Debian package")
    pos = 8
    while pos + 60 <= len(deb):
        name = deb[pos : pos + 16].decode().strip().rstrip("/")
        size = int(deb[pos + 48 : pos + 58].decode().strip())
        if name.startswith(prefix):
            return name, deb[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    raise RuntimeError(f"the package has no {prefix}*")


def _fetch_suite(archive: str, suite: str, arch: str, tmp: Path) -> tuple[dict[str, str], bytes]:
    """The package's index record and its data archive from one suite, every step verified."""
    release = _verified_release(archive, suite, tmp)
    name = f"main/binary-{arch}/Packages.xz"
    want = _listed_sha256(release, name)
    packed = _get(f"{archive}/dists/{suite}/{name}")
    if want is None or _sha256(packed) != want:
        raise RuntimeError(f"{suite}'s package index does not match its InRelease")
    record = _package_record(lzma.decompress(packed).decode(errors="replace"))
    if record is None:
        raise RuntimeError(f"{suite} has no {PACKAGE}")
    deb = _get(f"{archive}/{record['Filename']}")
    if _sha256(deb) != record.get("SHA256"):
        raise RuntimeError(f"{record['Filename']} does not match {suite}'s index")
    member, data = _ar_member(deb, "data.tar")
    if not member.endswith((".xz", ".gz", ".tar")):
        raise RuntimeError(f"cannot read {member}")
    return record, data


def _unpack_headers(data: bytes, stage: Path) -> None:
    """The .h files below usr/include/onnxruntime/ of a package's data archive, into `stage`."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if m.isfile() and "include" in parts and m.name.endswith(".h"):
                out = stage / Path(*parts[parts.index("include") + 2 :])
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(m).read())  # type: ignore[union-attr]


def fetch_debian(dest: Path) -> str:
    """Fetch, verify and unpack the headers into `dest` (replaced whole, or left as it was); returns where they
    came from. A network failure ends the search at once (the other suites are on the same mirror)."""
    arch = "amd64" if os.uname().machine in ("x86_64", "amd64") else "arm64"
    archive = mirror()
    dest.parent.mkdir(parents=True, exist_ok=True)
    reasons = []
    with tempfile.TemporaryDirectory() as d:
        for suite in SUITES:
            try:
                record, data = _fetch_suite(archive, suite, arch, Path(d))
            except OSError as e:  # the mirror cannot be reached
                reasons.append(f"{suite}: {e}")
                break
            except (RuntimeError, ValueError, KeyError, lzma.LZMAError) as e:
                reasons.append(f"{suite}: {e}")
                continue
            stage = Path(tempfile.mkdtemp(dir=dest.parent))
            try:
                _unpack_headers(data, stage)
                source = f"Debian {suite} {PACKAGE} {record.get('Version')} (sha256 {record['SHA256'][:16]}…)"
                (stage / "SOURCE").write_text(source + "\n")
                (stage / "record.json").write_text(json.dumps(record, indent=1) + "\n")
                if not _usable(stage):
                    raise RuntimeError(f"{PACKAGE} {record.get('Version')} has no usable {HEADER}")
                if dest.exists():
                    shutil.rmtree(dest)
                os.replace(stage, dest)
                return source
            except (OSError, RuntimeError, tarfile.TarError) as e:
                reasons.append(f"{suite}: {e}")
            finally:
                shutil.rmtree(stage, ignore_errors=True)  # gone once moved into place
    raise RuntimeError("no ONNX Runtime headers: " + "; ".join(reasons))
