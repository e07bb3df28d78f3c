"""The download path against a local HTTP server on 127.0.0.1: success, resume/retry after a dropped connection,
a corrupted file rejected, offline misses, and loading through ``create_model(..., pretrained=True)``."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from moezoo.models import PretrainedCfg, create_model, hub, register_pretrained
from moezoo.models.registry import unregister_pretrained

PAYLOAD = bytes(range(256)) * 1500  # 384,000 bytes: several 1 MiB-or-less reads, more than one TCP segment


@dataclass
class ServerState:
    """What the handler serves and how it misbehaves; every request is recorded."""

    body: bytes = PAYLOAD
    drop_first: int = 0  # this many requests send half their body, then close the connection
    fail_first: int = 0  # this many requests answer 503
    corrupt: bool = False  # serve the body with one byte flipped
    ranges: bool = True  # honour Range requests (206), else always 200
    requests: list[dict[str, str]] = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    state: ServerState
    timeout = 5  # a stuck client cannot hold a handler thread for long

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        state = self.server.state  # type: ignore[attr-defined]
        state.requests.append({"path": self.path, "range": self.headers.get("Range", "")})
        number = len(state.requests)
        if self.path != "/w.safetensors":
            self.send_error(404)
            return
        if number <= state.fail_first:
            self.send_error(503)
            return
        body = bytearray(state.body)
        if state.corrupt:
            body[len(body) // 3] ^= 0xFF
        start = 0
        header = self.headers.get("Range", "")
        if state.ranges and header.startswith("bytes="):
            start = int(header[len("bytes=") :].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        part = bytes(body[start:])
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        if number <= state.fail_first + state.drop_first:
            self.wfile.write(part[: len(part) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(part)


@pytest.fixture
def server() -> Iterator[tuple[str, ServerState]]:
    """A threaded HTTP server on 127.0.0.1 (free port); shut down after the test, or by a 60 s watchdog."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state = ServerState()
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    watchdog = threading.Timer(60.0, httpd.shutdown)
    watchdog.daemon = True
    thread.start()
    watchdog.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        watchdog.cancel()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEZOO_HOME", str(tmp_path / "home"))
    for var in ("MOEZOO_OFFLINE", "HF_HUB_OFFLINE", "MOEZOO_MIRRORS"):
        monkeypatch.delenv(var, raising=False)


def _cfg(urls: list[str], body: bytes = PAYLOAD, file: str = "w.safetensors") -> PretrainedCfg:
    return PretrainedCfg(file=file, sha256=hashlib.sha256(body).hexdigest(), urls=urls, num_bytes=len(body))


def _cache_listing() -> list[str]:
    folder = hub.checkpoint_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _fetch(cfg: PretrainedCfg, **kwargs: object) -> Path:
    return hub.fetch(cfg, retries=kwargs.pop("retries", 3), backoff=0.01, timeout=5, progress=False, **kwargs)  # type: ignore[arg-type]


def test_download_success_then_cache_hit(server: tuple[str, ServerState]) -> None:
    url, state = server
    cfg = _cfg([f"{url}/w.safetensors"])
    path = _fetch(cfg)
    assert path == hub.checkpoint_dir() / "w.safetensors"
    assert path.read_bytes() == PAYLOAD
    assert _cache_listing() == ["w.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert _fetch(cfg) == path
    assert len(state.requests) == 1, "a verified cache entry must not be downloaded again"
    assert _fetch(cfg, offline=True) == path


def test_resume_after_dropped_connection(server: tuple[str, ServerState]) -> None:
    url, state = server
    state.drop_first = 1
    path = _fetch(_cfg([f"{url}/w.safetensors"]))
    assert path.read_bytes() == PAYLOAD
    assert [r["range"] for r in state.requests] == ["", f"bytes={len(PAYLOAD) // 2}-"]
    assert _cache_listing() == ["w.safetensors"]


def test_restart_when_server_ignores_range(server: tuple[str, ServerState]) -> None:
    url, state = server
    state.drop_first, state.ranges = 2, False
    path = _fetch(_cfg([f"{url}/w.safetensors"]))
    assert path.read_bytes() == PAYLOAD
    assert len(state.requests) == 3


def test_retry_after_server_error(server: tuple[str, ServerState]) -> None:
    url, state = server
    state.fail_first = 2
    assert _fetch(_cfg([f"{url}/w.safetensors"])).read_bytes() == PAYLOAD
    assert len(state.requests) == 3


def test_retries_exhausted_leave_nothing(server: tuple[str, ServerState]) -> None:
    url, state = server
    state.drop_first = 10
    with pytest.raises(hub.DownloadError, match="attempt 3"):
        _fetch(_cfg([f"{url}/w.safetensors"]), retries=2)
    assert len(state.requests) == 3
    assert _cache_listing() == [], "a failed download must not leave a partial file"


def test_not_found_is_not_retried(server: tuple[str, ServerState]) -> None:
    url, state = server
    with pytest.raises(hub.DownloadError, match="404"):
        _fetch(_cfg([f"{url}/missing.safetensors"]))
    assert len(state.requests) == 1


def test_corrupted_download_rejected_and_deleted(server: tuple[str, ServerState]) -> None:
    url, state = server
    state.corrupt = True
    with pytest.raises(hub.ChecksumError, match="sha256"):
        _fetch(_cfg([f"{url}/w.safetensors"]))
    assert _cache_listing() == []


def test_corrupted_cache_entry_replaced(server: tuple[str, ServerState]) -> None:
    url, state = server
    cfg = _cfg([f"{url}/w.safetensors"])
    hub.checkpoint_dir().mkdir(parents=True)
    (hub.checkpoint_dir() / "w.safetensors").write_bytes(PAYLOAD[:-1] + b"\0")
    assert _fetch(cfg).read_bytes() == PAYLOAD
    assert len(state.requests) == 1


def test_offline_miss_is_a_clear_error(server: tuple[str, ServerState], monkeypatch: pytest.MonkeyPatch) -> None:
    url, state = server
    monkeypatch.setenv("MOEZOO_OFFLINE", "1")
    with pytest.raises(hub.OfflineError, match=r"w\.safetensors is not available offline.*MOEZOO_OFFLINE"):
        _fetch(_cfg([f"{url}/w.safetensors"]))
    assert state.requests == [], "offline mode must not touch the network"


def test_falls_back_to_next_url_and_mirrors(server: tuple[str, ServerState], monkeypatch: pytest.MonkeyPatch) -> None:
    url, state = server
    monkeypatch.setenv("MOEZOO_MIRRORS", f"{url}/")
    path = _fetch(_cfg([f"{url}/missing.safetensors"]))
    assert path.read_bytes() == PAYLOAD
    assert [r["path"] for r in state.requests] == ["/missing.safetensors", "/w.safetensors"]


def test_local_file_url_is_used_in_place(tmp_path: Path) -> None:
    local = tmp_path / "w.safetensors"
    local.write_bytes(PAYLOAD)
    assert _fetch(_cfg([local.as_uri()]), offline=True) == local
    local.write_bytes(PAYLOAD[::-1])
    with pytest.raises(hub.ChecksumError, match="sha256"):
        _fetch(_cfg([local.as_uri()]), offline=True)
    assert local.exists(), "a file the hub did not write is never deleted"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="scheme 'ftp'"):
        _fetch(_cfg(["ftp://example.org/w.safetensors"]))
    with pytest.raises(ValueError, match="sha256"):
        _fetch(PretrainedCfg(file="w.safetensors", sha256="abc"))
    with pytest.raises(ValueError, match="retries"):
        hub.download_http("http://127.0.0.1:9/w", Path("w"), "0" * 64, retries=-1)


def test_create_model_pretrained_over_http(server: tuple[str, ServerState], tmp_path: Path) -> None:
    url, state = server
    source = create_model("moe_vit_debug", img_size=8, patch_size=2, num_classes=10)
    hub.save_state_dict(source.state_dict(), tmp_path / "debug.safetensors")
    state.body = (tmp_path / "debug.safetensors").read_bytes()
    cfg = _cfg([f"{url}/w.safetensors"], body=state.body)
    cfg.model_kwargs = {"img_size": 8, "patch_size": 2, "num_classes": 10}
    register_pretrained("moe_vit_debug", "httptest", cfg)
    try:
        model = create_model("moe_vit_debug.httptest", pretrained=True).eval()
    finally:
        unregister_pretrained("moe_vit_debug.httptest")
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(model(x), source.eval()(x), rtol=0, atol=0)
    assert len(state.requests) == 1


def test_hf_hub_source_is_verified(monkeypatch: pytest.MonkeyPatch) -> None:
    """``hf://owner/repo@rev/file`` goes through huggingface_hub (faked here: no network) and is verified."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []
    body = {"data": PAYLOAD}

    def fake_download(repo_id: str, filename: str, revision: str | None = None, local_dir: str = ".") -> str:
        calls.append((repo_id, filename, revision))
        path = Path(local_dir) / filename
        path.write_bytes(body["data"])
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    cfg = _cfg(["hf://owner/repo@v1/w.safetensors"])
    assert _fetch(cfg).read_bytes() == PAYLOAD
    assert calls == [("owner/repo", "w.safetensors", "v1")]
    (hub.checkpoint_dir() / "w.safetensors").unlink()
    body["data"] = PAYLOAD[::-1]
    with pytest.raises(hub.ChecksumError, match="hf://owner/repo@v1/w.safetensors"):
        _fetch(cfg)
    assert _cache_listing() == []


@pytest.mark.parametrize("name", ["../escape.safetensors", "sub/w.safetensors", "/abs/w.safetensors", "..", "", "a\0b"])
def test_a_record_file_name_is_confined_to_the_cache_folder(tmp_path: Path, name: str) -> None:
    """Issue 18 item 9: a record's file name could point outside the cache (read, written or deleted there)."""
    local = tmp_path / "w.safetensors"
    local.write_bytes(PAYLOAD)
    cfg = PretrainedCfg(file=name, sha256=hashlib.sha256(PAYLOAD).hexdigest(), urls=[local.as_uri()])
    with pytest.raises(ValueError, match="a release's file must be a plain file name"):
        _fetch(cfg, offline=True)
    with pytest.raises(ValueError, match="a release's file must be a plain file name"):
        hub.cache_path(name)
    assert hub.cache_path("w.safetensors").parent == hub.checkpoint_dir()
