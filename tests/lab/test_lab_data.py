"""Data root, dataset registry, checksums and downloads (against a local server, never the net)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab_helpers import mnist_dir, needs_mnist

from adanorm.lab.data import (
    ChecksumError,
    DataFile,
    DataMissingError,
    data_root,
    get_dataset_info,
    require_dataset,
    verify_file,
)
from adanorm.lab.download import DownloadError, download_file

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files[path]`` with HTTP Range support, and records the Range headers."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.server.files.get(self.path)  # type: ignore[attr-defined]
        self.server.ranges.append(self.headers.get("Range"))  # type: ignore[attr-defined]
        if body is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[http.server.ThreadingHTTPServer]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    httpd.files = {}  # type: ignore[attr-defined]
    httpd.ranges = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _url(httpd: http.server.ThreadingHTTPServer, path: str) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}{path}"


def _spec(data: bytes, name: str = "blob.bin") -> DataFile:
    return DataFile(name=name, sha256=hashlib.sha256(data).hexdigest())


def test_data_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ADANORM_DATA", str(tmp_path / "env"))
    assert data_root(str(tmp_path / "cli")) == tmp_path / "cli"
    assert data_root(None) == tmp_path / "env"
    monkeypatch.delenv("ADANORM_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data_root(None) == tmp_path / "cache" / "adanorm"


def test_missing_file_error_names_the_file_and_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataMissingError) as info:
        require_dataset("mnist", tmp_path)
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert f"adanorm download mnist --data-dir {tmp_path}" in message


def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    spec = get_dataset_info("mnist").files[1]  # train labels
    directory = tmp_path / "mnist"
    directory.mkdir()
    with gzip.open(directory / spec.name, "wb") as fh:
        fh.write(b"\x00\x00\x08\x01" + b"\x00" * 100)
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        verify_file(directory / spec.name, spec)
    (directory / spec.name).write_bytes(b"not gzip at all")
    with pytest.raises(ChecksumError):
        verify_file(directory / spec.name, spec)


def test_download_verifies_and_writes_atomically(server, tmp_path: Path) -> None:
    server.files["/blob.bin"] = PAYLOAD
    dest = tmp_path / "d" / "blob.bin"
    download_file([_url(server, "/blob.bin")], dest, _spec(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_name("blob.bin.part").exists()


def test_download_resumes_a_partial_file_with_range(server, tmp_path: Path) -> None:
    server.files["/blob.bin"] = PAYLOAD
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(PAYLOAD[:300_000])
    download_file([_url(server, "/blob.bin")], dest, _spec(PAYLOAD), progress=False)
    assert server.ranges == ["bytes=300000-"]
    assert dest.read_bytes() == PAYLOAD


def test_download_falls_back_to_the_next_url(server, tmp_path: Path) -> None:
    server.files["/mirror/blob.bin"] = PAYLOAD
    dest = tmp_path / "blob.bin"
    urls = [_url(server, "/missing/blob.bin"), _url(server, "/mirror/blob.bin")]
    download_file(urls, dest, _spec(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_corrupt_download_is_refused_and_never_used(server, tmp_path: Path) -> None:
    server.files["/blob.bin"] = PAYLOAD[:-1] + b"\x00"
    dest = tmp_path / "blob.bin"
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        download_file([_url(server, "/blob.bin")], dest, _spec(PAYLOAD), progress=False)
    assert not dest.exists()
    assert not dest.with_name("blob.bin.part").exists()


def test_unreachable_server_raises_download_error(server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="404"):
        download_file([_url(server, "/nothing")], tmp_path / "x", _spec(PAYLOAD), progress=False)


def test_gunzip_checksum_accepts_any_gzip_of_the_same_content(server, tmp_path: Path) -> None:
    content = b"IDX" * 1000
    spec = DataFile("f.gz", hashlib.sha256(content).hexdigest(), checksum_of="gunzip")
    server.files["/f.gz"] = gzip.compress(content, compresslevel=1, mtime=123)
    dest = download_file([_url(server, "/f.gz")], tmp_path / "f.gz", spec, progress=False)
    verify_file(dest, spec)
    (tmp_path / "g.gz").write_bytes(gzip.compress(content, compresslevel=9, mtime=0))
    verify_file(tmp_path / "g.gz", spec)


@needs_mnist
def test_real_mnist_verifies_and_has_the_papers_splits() -> None:
    from lab_helpers import smoke_cfg

    from adanorm.lab.tasks.vision.mnist import MnistTask

    require_dataset("mnist", mnist_dir())
    cfg = smoke_cfg("data.max_examples=0", task="mnist")
    task = MnistTask(cfg, str(mnist_dir()))
    sizes = {split: len(task.dataset(split)) for split in ("train", "valid", "test")}
    assert sizes == {"train": 55_000, "valid": 5_000, "test": 10_000}
    x, y = task.dataset("valid").__getitems__([0, 1])
    assert x.shape == (2, 1, 28, 28) and y.tolist() == [5, 0]  # the first two MNIST labels


def test_adanorm_download_command_fetches_a_registered_dataset(server, tmp_path: Path) -> None:
    from adanorm.lab.cli import main
    from adanorm.lab.data import DatasetInfo, register_dataset

    url = _url(server, "/blob.bin")
    spec = DataFile("blob.bin", hashlib.sha256(PAYLOAD).hexdigest(), urls=(url,))
    register_dataset(DatasetInfo(name="lab-test-blob", subdir="blob", files=(spec,)))
    server.files["/blob.bin"] = PAYLOAD
    assert main(["download", "lab-test-blob", "--data-dir", str(tmp_path)]) == 0
    assert (tmp_path / "blob" / "blob.bin").read_bytes() == PAYLOAD
    assert require_dataset("lab-test-blob", tmp_path) == tmp_path / "blob"
    # A corrupted copy on disk is refused by the next user, with exit code 2 from the CLI.
    (tmp_path / "blob" / "blob.bin").write_bytes(b"corrupt")
    assert main(["download", "lab-test-blob", "--data-dir", str(tmp_path)]) == 2
