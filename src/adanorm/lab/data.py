"""The dataset registry and the data root.

Every dataset file the lab reads is declared here with its sha256 and its upstream URLs.  Files are
looked up under the *data root*, chosen in this order:

1. ``--data-dir`` on the command line (the ``data_dir`` argument);
2. the environment variable ``ADANORM_DATA``;
3. a per-user cache directory: ``$XDG_CACHE_HOME/adanorm`` or ``~/.cache/adanorm``.

A file that is missing raises :class:`DataMissingError`, naming the file and how to get it; a file
whose checksum is wrong raises :class:`ChecksumError` and is never used.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "DataFile",
    "DatasetInfo",
    "DataMissingError",
    "ChecksumError",
    "register_dataset",
    "get_dataset_info",
    "available_datasets",
    "data_root",
    "user_cache_dir",
    "sha256_of",
    "verify_file",
    "require_dataset",
]


class DataMissingError(FileNotFoundError):
    """A dataset file is not under the data root."""


class ChecksumError(ValueError):
    """A dataset file exists but its sha256 is not the registered one."""


@dataclass(frozen=True)
class DataFile:
    """One file of a dataset.

    ``checksum_of="gunzip"`` means ``sha256`` is of the *decompressed* bytes: MNIST's ``.gz``
    files exist with different gzip headers (LeCun's originals, re-compressed mirrors) around the
    same content, and the content is what must match.
    """

    name: str
    sha256: str
    urls: tuple[str, ...] = ()
    checksum_of: Literal["file", "gunzip"] = "file"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    subdir: str  # directory under the data root
    files: tuple[DataFile, ...]
    description: str = ""
    homepage: str = ""


_DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    if info.name in _DATASETS and _DATASETS[info.name] != info:
        raise ValueError(f"a dataset named {info.name!r} is already registered")
    _DATASETS[info.name] = info
    return info


def _load_task_datasets() -> None:
    from .task import available_tasks

    available_tasks()  # importing the built-in tasks registers their datasets


def get_dataset_info(name: str) -> DatasetInfo:
    if name not in _DATASETS:
        _load_task_datasets()
    if name not in _DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; known datasets: {', '.join(sorted(_DATASETS))}"
        )
    return _DATASETS[name]


def available_datasets() -> list[str]:
    _load_task_datasets()
    return sorted(_DATASETS)


# MNIST: sha256 of the decompressed IDX files (equal for LeCun's .gz and any faithful re-gzip).
# The canonical host often refuses scripted downloads, so torchvision's S3 mirror (same bytes as
# LeCun's .gz files) is tried second.
_MNIST_HOSTS = (
    "https://yann.lecun.com/exdb/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)
register_dataset(
    DatasetInfo(
        name="mnist",
        subdir="mnist",
        description="MNIST handwritten digits, original IDX files (LeCun, Cortes, Burges)",
        homepage="http://yann.lecun.com/exdb/mnist/",
        files=tuple(
            DataFile(
                name=f"{stem}.gz",
                sha256=digest,
                urls=tuple(host + f"{stem}.gz" for host in _MNIST_HOSTS),
                checksum_of="gunzip",
            )
            for stem, digest in (
                (
                    "train-images-idx3-ubyte",
                    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                ),
                (
                    "train-labels-idx1-ubyte",
                    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                ),
                (
                    "t10k-images-idx3-ubyte",
                    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                ),
                (
                    "t10k-labels-idx1-ubyte",
                    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
                ),
            )
        ),
    )
)


def data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``data_dir``, else ``$ADANORM_DATA``, else the user cache directory."""
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("ADANORM_DATA")
    if env:
        return Path(env).expanduser()
    return user_cache_dir()


def user_cache_dir() -> Path:
    """The per-user cache directory: ``$XDG_CACHE_HOME/adanorm``, else ``~/.cache/adanorm``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "adanorm"


def sha256_of(path: str | os.PathLike[str], checksum_of: str = "file") -> str:
    """sha256 of a file's bytes, or of its gunzipped bytes for ``checksum_of="gunzip"``."""
    digest = hashlib.sha256()
    opener: Callable[..., object] = gzip.open if checksum_of == "gunzip" else open
    try:
        with opener(path, "rb") as fh:  # type: ignore[operator]
            for chunk in iter(lambda: fh.read(1 << 20), b""):  # type: ignore[attr-defined]
                digest.update(chunk)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ChecksumError(f"{path}: cannot read it as {checksum_of!r} data ({exc})") from exc
    return digest.hexdigest()


# (path, size, mtime_ns) of files already verified in this process: hashing MNIST takes ~0.3 s.
_VERIFIED: set[tuple[str, int, int]] = set()


def verify_file(path: str | os.PathLike[str], spec: DataFile) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has ``spec``'s sha256."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return
    actual = sha256_of(path, spec.checksum_of)
    if actual != spec.sha256:
        what = "decompressed content" if spec.checksum_of == "gunzip" else "file"
        raise ChecksumError(
            f"checksum mismatch for {path}: sha256 of the {what} is {actual}, expected "
            f"{spec.sha256}. The file is corrupt or not the registered one; delete it and get it "
            f"again (adanorm download)."
        )
    _VERIFIED.add(key)


def _how_to_get(info: DatasetInfo, root: Path) -> str:
    source = info.files[0].urls[0].rsplit("/", 1)[0] if info.files[0].urls else info.homepage
    return (
        f"Get it with `adanorm download {info.name} --data-dir {root}` (downloads from {source} "
        f"and checks sha256), or copy the files into {root / info.subdir}. The data root comes "
        f"from --data-dir, else $ADANORM_DATA, else {user_cache_dir()}."
    )


def require_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, download: bool = False
) -> Path:
    """The verified directory of dataset ``name``; with ``download``, fetch missing files first."""
    info = get_dataset_info(name)
    root = data_root(data_dir)
    directory = root / info.subdir
    for spec in info.files:
        path = directory / spec.name
        if not path.exists():
            if not download:
                raise DataMissingError(
                    f"{info.name}: file {spec.name} not found at {path}. {_how_to_get(info, root)}"
                )
            from .download import DownloadError, download_file

            try:
                download_file(spec.urls, path, spec)
            except DownloadError as exc:
                raise DownloadError(
                    f"{exc}. Check the network connection and retry (a partial file resumes), "
                    f"or copy the files of {info.name} into {directory} yourself"
                ) from exc
        verify_file(path, spec)
    return directory
