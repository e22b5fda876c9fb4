"""Resumable, verified, atomic downloads.

A file is fetched into ``<name>.part`` next to its destination; an interrupted download resumes
from the bytes already there with an HTTP ``Range`` request.  Only after the sha256 matches is
the file moved into place with :func:`os.replace`, so the destination either does not exist or is
complete and correct.  A part file whose checksum is wrong is deleted and never used.
"""

from __future__ import annotations

import contextlib
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from .data import ChecksumError, DataFile, sha256_of

__all__ = ["download_file", "DownloadError"]


class DownloadError(OSError):
    """No URL produced a file with the right checksum."""


def _fetch(url: str, part: Path, timeout: float, chunk_size: int, progress: bool) -> None:
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "adanorm-lab"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the part file is already complete
            return
        raise
    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored Range: start over
        mode = "ab" if offset else "wb"
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=part.name.removesuffix(".part"),
                file=sys.stderr,
            )
        try:
            with open(part, mode) as fh:
                while True:
                    block = response.read(chunk_size)
                    if not block:
                        break
                    fh.write(block)
                    if bar is not None:
                        bar.update(len(block))
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            if bar is not None:
                bar.close()
        if total is not None and part.stat().st_size < total:
            raise DownloadError(
                f"{url}: connection closed after {part.stat().st_size} of {total} bytes"
            )


def download_file(
    urls: Sequence[str],
    dest: str | os.PathLike[str],
    spec: DataFile,
    *,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
    progress: bool = True,
) -> Path:
    """Download ``spec`` to ``dest`` from the first URL that works; verify; move into place."""
    dest = Path(dest)
    if not urls:
        raise DownloadError(f"no URL is registered for {dest.name}")
    created = _missing_ancestors(dest.parent)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _download(urls, dest, spec, timeout, chunk_size, progress)
    except BaseException:
        # Leave no empty directory behind (it would look like a dataset that is there); a
        # partial download stays, and its directory with it, for the next attempt to resume.
        for directory in created:
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


def _missing_ancestors(directory: Path) -> list[Path]:
    """``directory`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    return missing


def _download(
    urls: Sequence[str], dest: Path, spec: DataFile, timeout: float, chunk_size: int,
    progress: bool,
) -> Path:
    part = dest.with_name(dest.name + ".part")
    errors: list[str] = []
    for url in urls:
        try:
            _fetch(url, part, timeout, chunk_size, progress)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            # Keep the part file: the next URL (a mirror of the same bytes) can resume it.
            errors.append(f"{url}: {exc}")
            continue
        try:
            actual = sha256_of(part, spec.checksum_of)
        except ChecksumError as exc:
            actual = f"unreadable ({exc})"
        if actual != spec.sha256:
            part.unlink(missing_ok=True)
            errors.append(f"{url}: checksum mismatch (sha256 {actual}, expected {spec.sha256})")
            continue
        os.replace(part, dest)
        return dest
    if any("checksum mismatch" in e for e in errors):
        raise ChecksumError(f"downloading {dest.name} failed: " + "; ".join(errors))
    raise DownloadError(f"downloading {dest.name} failed: " + "; ".join(errors))
