"""OpenAI's released ViT CLIP weights: names, sizes, download addresses, and the local cache with SHA-256 check.

Each download address holds the file's SHA-256 (``.../clip/models/<sha256>/<file>``). A cached file is used only
if its checksum matches; a download goes to a temporary file in the cache folder and is renamed into place only
after its checksum has been verified, so an interrupted download never leaves a file that looks complete.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

from tqdm import tqdm

from utils.io import atomic_path

from .errors import CLIPLoadError
from .model import CLIPConfig

logger = logging.getLogger(__name__)

CACHE_ENV = "T2L_CLIP_CACHE"
DEFAULT_CACHE = "~/.cache/clip"
# How long to wait for name resolution, and then for the connection: an offline machine fails in under 10 s.
CONNECT_TIMEOUT_S = 4.0
# How long one read may stall once the transfer has started.
READ_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


@dataclass(frozen=True)
class PretrainedSpec:
    """A released model: where to get it, and its sizes (for building it without the file)."""

    url: str
    config: CLIPConfig

    @property
    def filename(self) -> str:
        """The file name in the cache folder, as in the address (``ViT-B-16.pt``)."""
        return self.url.rsplit("/", 1)[-1]

    @property
    def sha256(self) -> str:
        """The expected SHA-256, the second-to-last part of the address."""
        return self.url.rsplit("/", 2)[-2]


def _vit(embed_dim: int, resolution: int, layers: int, width: int, patch: int, text_width: int) -> CLIPConfig:
    return CLIPConfig(embed_dim=embed_dim, image_resolution=resolution, vision_layers=layers, vision_width=width,
                      vision_patch_size=patch, context_length=77, vocab_size=49408, transformer_width=text_width,
                      transformer_heads=text_width // 64, transformer_layers=12, vision_heads=width // 64)


_BASE = "https://openaipublic.azureedge.net/clip/models"
# name: (SHA-256 of the file, which is also part of its address; file name; _vit's sizes)
_FILES = {
    "ViT-B/32": ("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt",
                 (512, 224, 12, 768, 32, 512)),
    "ViT-B/16": ("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt",
                 (512, 224, 12, 768, 16, 512)),
    "ViT-L/14": ("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt",
                 (768, 224, 24, 1024, 14, 768)),
    "ViT-L/14@336px": ("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px.pt",
                       (768, 336, 24, 1024, 14, 768)),
}
_MODELS = {name: PretrainedSpec(f"{_BASE}/{sha}/{file}", _vit(*sizes)) for name, (sha, file, sizes) in _FILES.items()}


def available_models() -> List[str]:
    """Names accepted by ``clip.load`` besides file paths: ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px."""
    return list(_MODELS)


def get_spec(name: str) -> PretrainedSpec:
    """The download address and sizes of a released model; ``KeyError`` naming the choices if unknown."""
    try:
        return _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown CLIP model {name!r}; known: {', '.join(_MODELS)}") from None


def model_config(name: str) -> CLIPConfig:
    """The sizes of a released model, e.g. to build it on the meta device without downloading anything."""
    return get_spec(name).config


def cache_dir(download_root: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The download folder: ``download_root`` if given, else ``$T2L_CLIP_CACHE``, else ``~/.cache/clip``."""
    root = download_root or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(root).expanduser()


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """The SHA-256 of a file, hex, read in 1 MiB chunks (the identity a checkpoint records for its backbone)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manual_instructions(spec: PretrainedSpec, target: Path) -> str:
    return (f"To use it offline, download {spec.url} on a machine with internet access (a browser, or "
            f"`curl -L -o {spec.filename} {spec.url}`), and copy the file to {target} (the cache folder is "
            f"{target.parent}; choose another with download_root= or the {CACHE_ENV} environment variable), or "
            f"pass the file's path to clip.load instead of the name. Expected SHA-256: {spec.sha256}.")


def _resolve_host(url: str, timeout: float) -> None:
    """Resolve the download host within ``timeout`` seconds.

    ``urlopen``'s timeout does not cover name resolution, which can hang for a long time on a machine without a
    network; resolving first in a daemon thread bounds the wait (and a hung lookup cannot block the exit).
    Skipped when a proxy resolves names for us.
    """
    parts = urllib.parse.urlsplit(url)
    if urllib.request.getproxies().get(parts.scheme) or not parts.hostname:
        return
    outcome: list = []

    def lookup() -> None:
        try:
            outcome.append(socket.getaddrinfo(parts.hostname, parts.port or 443))
        except OSError as err:
            outcome.append(err)

    worker = threading.Thread(target=lookup, daemon=True, name="clip-dns")
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise OSError(f"resolving {parts.hostname} took more than {timeout:.0f} s")
    if isinstance(outcome[0], OSError):
        raise outcome[0]


def _fetch(spec: PretrainedSpec, target: Path) -> None:
    """Download ``spec.url`` into ``target`` atomically, verifying the SHA-256 on the way."""
    _resolve_host(spec.url, CONNECT_TIMEOUT_S)
    # Into a temporary file next to target, renamed over it only once complete and verified (utils.io); a network
    # error propagates as it is, for download() to explain.
    with atomic_path(target, name_errors=False) as tmp, open(tmp, "wb") as out, \
            urllib.request.urlopen(spec.url, timeout=CONNECT_TIMEOUT_S) as src:
        # The connect timeout also bounds every read; once connected, allow longer stalls. The socket sits
        # behind a few private attributes, hence the guarded lookups.
        sock = getattr(getattr(getattr(src, "fp", None), "raw", None), "_sock", None)
        if sock is not None:
            sock.settimeout(READ_TIMEOUT_S)
        total = int(src.headers.get("Content-Length") or 0) or None
        digest = hashlib.sha256()
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {spec.filename}") as bar:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        if digest.hexdigest() != spec.sha256:
            raise CLIPLoadError(
                f"the download of {spec.url} has SHA-256 {digest.hexdigest()}, expected {spec.sha256} (the "
                f"checksum in its address); the file was discarded. Try again. " + _manual_instructions(spec, target))


def download(name: str, download_root: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Path to the verified cached file of a released model, downloading it first if it is not cached.

    A cached file whose SHA-256 differs from the one in the download address is refused (never silently
    replaced: it may be someone's hand-placed file). Without network access this fails within a few seconds
    with a ``CLIPLoadError`` that says where to put the file by hand.
    """
    spec = get_spec(name)
    target = cache_dir(download_root) / spec.filename
    if target.exists():
        if not target.is_file():
            raise CLIPLoadError(f"{target} exists but is not a regular file; expected the weights of {name} "
                                f"({spec.filename}). Remove it or choose another cache folder.")
        actual = file_sha256(target)
        if actual != spec.sha256:
            raise CLIPLoadError(
                f"the cached weights {target} for {name} have SHA-256 {actual}, but the release has "
                f"{spec.sha256}; the file is corrupt, truncated or another model. Delete it to download it "
                f"again, or replace it by hand. " + _manual_instructions(spec, target))
        logger.info("using cached %s (%s)", target, name)
        return target
    logger.info("downloading %s from %s to %s", name, spec.url, target)
    try:
        _fetch(spec, target)
    except CLIPLoadError:
        raise
    except (OSError, urllib.error.URLError, ValueError) as err:
        # URLError and socket timeouts are OSErrors; say what failed in one line, then how to fix it.
        raise CLIPLoadError(
            f"cannot download the CLIP weights {name}: {spec.filename} is not in the cache folder "
            f"{target.parent} and fetching {spec.url} failed ({err}). " + _manual_instructions(spec, target)
        ) from err
    return target
