"""Released weights: where they are cached, how they are fetched and verified, and how they are loaded.

A :class:`~moezoo.models.pretrained_cfg.PretrainedCfg` names a weight file, its sha256 and size, and the places it
can come from, tried in this order:

1. local sources: files shipped inside the package (``moezoo://weights/<file>``) and ``file://`` URLs;
2. the cache, ``$MOEZOO_HOME/checkpoints/<file>`` (default ``$XDG_CACHE_HOME/moezoo`` or ``~/.cache/moezoo``);
3. network sources, unless offline (``offline=True``, ``MOEZOO_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``):
   ``https://`` / ``http://`` URLs, then ``hf://<repo_id>[@<revision>]/<filename>`` when ``huggingface_hub`` is
   installed, then each base URL of ``MOEZOO_MIRRORS`` (comma-separated) joined with the file name.

Downloads go to a private temporary file beside the cache entry (:func:`moezoo.io.temporary_beside`), resume with
an HTTP ``Range`` request after a dropped connection, retry with exponential backoff, and are renamed into place
only after the size and sha256 match; on any failure the temporary file is deleted, so the cache never holds a
half-written or unverified file. Saved weights go through :func:`moezoo.io.write_bytes_atomic`.
Weights are safetensors.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from importlib import resources
from pathlib import Path

from torch import Tensor, nn

from moezoo.io import temporary_beside, write_bytes_atomic
from moezoo.models.pretrained_cfg import PretrainedCfg

ENV_HOME = "MOEZOO_HOME"
ENV_OFFLINE = "MOEZOO_OFFLINE"
ENV_MIRRORS = "MOEZOO_MIRRORS"
PACKAGE_SCHEME = "moezoo"
NETWORK_SCHEMES = ("http", "https", "hf")
CHUNK_BYTES = 1 << 20
_TRUE = ("1", "true", "yes", "on")


class HubError(RuntimeError):
    """A released checkpoint could not be resolved."""


class DownloadError(HubError):
    """Every source failed (network errors, HTTP errors, missing files)."""


class ChecksumError(HubError):
    """A file's size or sha256 differs from the registered one."""


class OfflineError(HubError):
    """Offline mode is on and no local source or cache entry holds the file."""


def moezoo_home() -> Path:
    """The cache root: ``$MOEZOO_HOME``, else ``$XDG_CACHE_HOME/moezoo``, else ``~/.cache/moezoo``."""
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "moezoo"


def checkpoint_dir() -> Path:
    return moezoo_home() / "checkpoints"


def is_offline(offline: bool | None = None) -> bool:
    """Explicit ``offline`` wins; otherwise ``MOEZOO_OFFLINE`` or ``HF_HUB_OFFLINE`` set to 1/true/yes/on."""
    if offline is not None:
        return offline
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in (ENV_OFFLINE, "HF_HUB_OFFLINE"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, sha256: str, num_bytes: int | None = None) -> None:
    """Raise :class:`ChecksumError` when ``path``'s size or sha256 differs from the expected ones."""
    size = path.stat().st_size
    if num_bytes is not None and size != num_bytes:
        raise ChecksumError(f"{path}: size {size} bytes, expected {num_bytes}")
    actual = sha256_file(path)
    if actual != sha256.lower():
        raise ChecksumError(f"{path}: sha256 {actual}, expected {sha256.lower()}")


def package_weights_dir() -> Path:
    """The folder of weights shipped inside the package (``moezoo/weights``)."""
    return Path(str(resources.files("moezoo") / "weights"))


def cache_path(file: str) -> Path:
    """Where release file ``file`` lives in the cache: ``file`` must be a plain file name, so that a record can
    never make the hub read, write or delete outside :func:`checkpoint_dir`."""
    check_file_name(file)
    folder = checkpoint_dir()
    dest = folder / file
    if dest.resolve().parent != folder.resolve():
        raise ValueError(f"release file {file!r} resolves outside the cache folder {str(folder)!r}")
    return dest


def check_file_name(file: object) -> None:
    """A release's ``file`` is a plain file name: no folder part, not ``.``/``..``, no NUL."""
    if not isinstance(file, str) or not file or file in (".", "..") or any(c in file for c in "/\\\0"):
        raise ValueError(
            f"a release's file must be a plain file name (no '/', '\\', '..' or NUL) inside the cache folder, "
            f"got {file!r}"
        )


def package_url(file: str) -> str:
    return f"{PACKAGE_SCHEME}://weights/{file}"


def local_path(url: str) -> Path | None:
    """The file a local URL (``moezoo://...``, ``file://...``) points to; ``None`` for network URLs."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == PACKAGE_SCHEME:
        return Path(str(resources.files("moezoo"))) / parsed.netloc / parsed.path.lstrip("/")
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    return None


def candidate_urls(cfg: PretrainedCfg) -> list[str]:
    """The registered URLs followed by ``MOEZOO_MIRRORS`` bases joined with the file name (duplicates removed)."""
    urls = list(cfg.urls)
    for base in os.environ.get(ENV_MIRRORS, "").split(","):
        if base.strip():
            urls.append(base.strip().rstrip("/") + "/" + urllib.parse.quote(cfg.file))
    for url in urls:
        scheme = urllib.parse.urlparse(url).scheme
        if scheme not in (PACKAGE_SCHEME, "file", *NETWORK_SCHEMES):
            raise ValueError(
                f"url {url!r} of {cfg.file!r} has scheme {scheme!r}; allowed: moezoo://, file://, http(s)://, hf://"
            )
    return list(dict.fromkeys(urls))


def _progress(total: int | None, initial: int, desc: str, enabled: bool):  # type: ignore[no-untyped-def]
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
        file=sys.stderr, leave=False,
    )  # fmt: skip


def _retryable(err: BaseException) -> bool:
    if isinstance(err, urllib.error.HTTPError):
        return err.code in (408, 425, 429) or err.code >= 500
    return isinstance(err, (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError))


def _fetch_http_once(url: str, tmp: Path, timeout: float, progress: bool) -> None:
    """One request: append to ``tmp`` after a ``Range`` resume (206), or rewrite it (200). Raises on a short body."""
    have = tmp.stat().st_size
    headers = {"User-Agent": "moezoo-hub", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the partial file cannot be resumed: start over on the next attempt
            tmp.write_bytes(b"")
        raise
    with response:
        resumed = have > 0 and response.status == 206
        if not resumed:
            have = 0
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None and length.isdigit() else None
        received = 0
        with (
            open(tmp, "ab" if resumed else "wb") as f,
            _progress(
                None if expected is None else have + expected,
                have,
                Path(urllib.parse.urlparse(url).path).name,
                progress,
            ) as bar,
        ):
            while chunk := response.read(CHUNK_BYTES):
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        if expected is not None and received != expected:
            raise http.client.IncompleteRead(b"", expected - received)


def download_http(
    url: str,
    dest: Path,
    sha256: str,
    num_bytes: int | None = None,
    retries: int = 3,
    timeout: float = 30.0,
    backoff: float = 0.5,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` atomically; resume/retry up to ``retries`` times; verify before the rename."""
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    with temporary_beside(dest) as tmp:
        for attempt in range(retries + 1):
            try:
                _fetch_http_once(url, tmp, timeout, progress)
                break
            except Exception as err:  # noqa: BLE001 - classified just below
                if not _retryable(err) or attempt == retries:
                    raise DownloadError(f"{url}: {type(err).__name__}: {err} (attempt {attempt + 1})") from err
                time.sleep(backoff * 2**attempt)
        try:
            verify_file(tmp, sha256, num_bytes)
        except ChecksumError as err:
            raise ChecksumError(f"downloaded from {url}, deleted: {err}") from None
        os.replace(tmp, dest)
    return dest


def download_hf(url: str, dest: Path, sha256: str, num_bytes: int | None = None) -> Path:
    """``hf://<repo_id>[@<revision>]/<filename>`` through ``huggingface_hub``, verified, then renamed into place."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:
        raise DownloadError(f"{url}: huggingface_hub is not installed (pip install huggingface_hub)") from err
    parts = url[len("hf://") :].split("/")
    if len(parts) < 3:
        raise ValueError(f"url {url!r} must look like hf://<owner>/<repo>[@<revision>]/<filename>")
    repo, _, revision = "/".join(parts[:2]).partition("@")
    filename = "/".join(parts[2:])
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as folder, temporary_beside(dest) as tmp:
        try:
            got = hf_hub_download(repo, filename, revision=revision or None, local_dir=folder)
        except Exception as err:  # noqa: BLE001 - huggingface_hub raises many types
            raise DownloadError(f"{url}: {type(err).__name__}: {err}") from err
        shutil.move(got, tmp)
        try:
            verify_file(tmp, sha256, num_bytes)
        except ChecksumError as err:
            raise ChecksumError(f"downloaded from {url}, deleted: {err}") from None
        os.replace(tmp, dest)
    return dest


def fetch(
    cfg: PretrainedCfg,
    offline: bool | None = None,
    retries: int = 3,
    timeout: float = 30.0,
    backoff: float = 0.5,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """The verified local path of ``cfg.file``: a shipped/local copy, the cache, or a fresh download into the cache.

    ``force`` skips local copies and the cache and downloads again. Raises :class:`ChecksumError` when every copy
    found was corrupt (offline or not), :class:`OfflineError` on an offline miss, :class:`DownloadError` otherwise.
    """
    check_file_name(cfg.file)
    if not cfg.sha256 or len(cfg.sha256) != 64:
        raise ValueError(f"sha256 of {cfg.file!r} must be 64 hex digits, got {cfg.sha256!r}")
    urls = candidate_urls(cfg)
    failures: list[str] = []
    corrupt = False
    if not force:
        for url in urls:
            path = local_path(url)
            if path is None:
                continue
            if not path.is_file():
                failures.append(f"{url}: no such file {path}")
                continue
            try:
                verify_file(path, cfg.sha256, cfg.num_bytes)
                return path
            except ChecksumError as err:  # never delete a file we did not write; try the other sources
                corrupt = True
                failures.append(f"{url}: {err}")
    dest = cache_path(cfg.file)
    if dest.is_file() and not force:
        try:
            verify_file(dest, cfg.sha256, cfg.num_bytes)
            return dest
        except ChecksumError as err:
            dest.unlink(missing_ok=True)
            corrupt = True
            failures.append(f"cache: {err}; deleted")
    network = [u for u in urls if urllib.parse.urlparse(u).scheme in NETWORK_SCHEMES]
    if is_offline(offline):
        tried = "\n  ".join(failures + [f"{dest}: not cached"])
        raise (ChecksumError if corrupt else OfflineError)(
            f"{cfg.file} is not available offline ({ENV_OFFLINE}=1 or offline=True). Tried:\n  {tried}\n"
            f"Skipped network sources: {network or 'none registered'}. Unset {ENV_OFFLINE}/HF_HUB_OFFLINE to "
            f"download, or copy the file to {dest}"
        )
    for url in network:
        try:
            if url.startswith("hf://"):
                return download_hf(url, dest, cfg.sha256, cfg.num_bytes)
            return download_http(url, dest, cfg.sha256, cfg.num_bytes, retries, timeout, backoff, progress)
        except ChecksumError as err:
            corrupt = True
            failures.append(str(err))
        except DownloadError as err:
            failures.append(str(err))
    if not network:
        failures.append(f"no network source is registered for it (add one with {ENV_MIRRORS}=https://host/folder)")
    detail = "\n  ".join(failures)
    error = ChecksumError if corrupt else DownloadError
    raise error(f"could not obtain a verified copy of {cfg.file} (sha256 {cfg.sha256}):\n  {detail}")


def load_state_dict(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def save_state_dict(state: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save as safetensors atomically; shared and non-contiguous tensors are stored as separate contiguous copies."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    write_bytes_atomic(path, save(tensors, metadata=metadata))


def load_pretrained(model: nn.Module, cfg: PretrainedCfg, strict: bool = True, **fetch_kwargs: object) -> nn.Module:
    """Fetch ``cfg``'s weights (see :func:`fetch`) and load them into ``model`` (all keys must match when strict)."""
    path = fetch(cfg, **fetch_kwargs)  # type: ignore[arg-type]
    model.load_state_dict(load_state_dict(path), strict=strict)
    return model
