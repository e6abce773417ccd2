"""ONNX Runtime's C/C++ API headers, which the ORT custom-op library (csrc/ort/) compiles against.

No PyPI or npm package ships them (the onnxruntime and onnxruntime-extensions wheels, onnxruntime-node and
onnxruntime-react-native were checked). Debian's `libonnxruntime-dev` does, so they come, in this order, from:
`$FPEWIDEN_ORT_INCLUDE`; the system's (`apt install libonnxruntime-dev` on Debian 13 or newer); a copy fetched
earlier into packed/_build/; or the Debian archive this machine's apt is configured with (`$FPEWIDEN_DEBIAN_MIRROR`
names another; no host is named here), downloaded by `apt-get download` into a private index (apt checks the
suite's signature against the system's Debian archive keyring, the index and the package by their hashes) and
unpacked by `dpkg-deb`. Only the headers are kept (under packed/_build/, never committed); nothing
is installed. A library built against API version N loads in any ONNX Runtime >= 1.N.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
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


def _apt_options(root: Path) -> list[str]:
    """apt-get options for a private index under `root`: the user's own lists, cache and lock are untouched, and
    no root is needed. apt still checks the suite's signature against the system keyring, the index against the
    signed release and the package against the index."""
    opts = [
        f"-oDir::Etc::SourceList={root / 'sources.list'}",
        "-oDir::Etc::SourceParts=/nonexistent",
        f"-oDir::State::Lists={root / 'lists'}",
        f"-oDir::Cache={root / 'cache'}",
        "-oDebug::NoLocking=1",
        "-oAcquire::Languages=none",
    ]
    return [*opts, "-oAPT::Sandbox::User=root"] if os.geteuid() == 0 else opts  # _apt cannot write to a temp dir


def _run(args: list[str], cwd: Path) -> str:
    """stdout of a command; its last line of error output as a RuntimeError when it fails."""
    try:
        res = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{args[0]}: {e}") from None
    if res.returncode:
        lines = [ln for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
        raise RuntimeError(f"{' '.join(args[:1] + args[-2:])}: {lines[-1] if lines else res.returncode}")
    return res.stdout


def _download(archive: str, suite: str, root: Path) -> Path:
    """The package's .deb from `suite`, downloaded and verified by apt into `root`."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"needs {tool} (Debian's package tools)")
    if not KEYRING.is_file():
        raise RuntimeError(f"cannot verify Debian's archive here (needs {KEYRING})")
    for d in ("lists/partial", "cache/archives/partial"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "sources.list").write_text(f"deb [signed-by={KEYRING}] {archive} {suite} main\n")
    opts = _apt_options(root)
    _run(["apt-get", "-q", *opts, "update"], root)
    _run(["apt-get", "-q", *opts, "download", f"{PACKAGE}/{suite}"], root)
    debs = sorted(root.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get downloaded no {PACKAGE}")
    return debs[0]


def _unpack_headers(deb: Path, stage: Path) -> str:
    """The .h files below usr/include/onnxruntime/ of a package, into `stage`; returns the package's version."""
    tree = stage.parent / (stage.name + ".tree")
    try:
        _run(["dpkg-deb", "-x", str(deb), str(tree)], stage.parent)
        for h in (tree / "usr/include/onnxruntime").rglob("*.h"):
            out = stage / h.relative_to(tree / "usr/include/onnxruntime")
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(h, out)
        return _run(["dpkg-deb", "-f", str(deb), "Version"], stage.parent).strip()
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def fetch_debian(dest: Path) -> str:
    """Fetch and unpack the headers into `dest` (replaced whole, or left as it was); returns where they came from."""
    archive = mirror()
    dest.parent.mkdir(parents=True, exist_ok=True)
    reasons = []
    for suite in SUITES:
        stage = Path(tempfile.mkdtemp(dir=dest.parent))
        try:
            with tempfile.TemporaryDirectory() as root:
                deb = _download(archive, suite, Path(root))
                digest = hashlib.sha256(deb.read_bytes()).hexdigest()
                version = _unpack_headers(deb, stage)
            source = f"Debian {suite} {PACKAGE} {version} (sha256 {digest[:16]}…, fetched by apt-get)"
            (stage / "SOURCE").write_text(source + "\n")
            if not _usable(stage):
                raise RuntimeError(f"{PACKAGE} {version} has no usable {HEADER}")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(stage, dest)
            return source
        except (OSError, RuntimeError) as e:
            reasons.append(f"{suite}: {e}")
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # gone once moved into place
    raise RuntimeError("no ONNX Runtime headers: " + "; ".join(reasons))
