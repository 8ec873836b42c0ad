"""Tar shards by URL: which shards a brace pattern names, opening one (local disk, or an object store through
fsspec with every read under a timeout), its samples in order, and how many samples each holds.

A shard is a WebDataset tar: a sample is the consecutive members sharing a key, the member's path up to the
first dot of its file name (`000123.jpg`, `000123.cls`, `000123.json` -> key `000123`). The first image member
(.jpg, .jpeg, .png, .webp, or another `images.IMAGE_EXTENSIONS` suffix) and the `.cls` member (the class index
in ASCII) are kept; anything else (`.json`) is passed over. Shards are read with `tarfile` in stream mode
(`r|*`), not webdataset's iterators: a member's bytes are only taken for the two members kept, the reader can
tell a shard cut at a member boundary from a whole one (tarfile ends such a stream silently; a whole tar ends
in two zero blocks), and every failure becomes one `DatasetError` naming the shard instead of an exception
whose arguments webdataset has extended with the stream object.

Counts: `shard_counts` takes each shard's samples from the `index.json` that `simclr shards` writes beside its
shards (`shardindex`; a local shard whose size differs from the index's record is counted instead), and counts
the rest once, from the tar headers, into a JSON file under a cache folder (one per list of URLs; a local
shard's entry is reused while its size and mtime are unchanged, a remote one's until the file is removed).

Local paths (or file://) are opened with `images.open_regular`, so a FIFO named x.tar is refused instead of
blocking a worker; other URLs (s3://, gs://, https://) need fsspec and its protocol package (s3fs, gcsfs,
aiohttp), and braceexpand (webdataset's dependency): the `shards` extra.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple, Sequence

from simclr_cli.data.images import IMAGE_EXTENSIONS, SpecialFileError, open_regular
from simclr_cli.data.shardindex import INDEX_FORMAT, INDEX_NAME
from simclr_cli.errors import DatasetError, MissingExtraError, OutputError
from simclr_cli.files import atomic_write_text

IMAGE_SUFFIXES = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
COUNTS_FORMAT = "simclr-cli/shard-counts"
DEFAULT_TIMEOUT = 60.0  # seconds a remote connect or read may wait before the shard counts as unreadable


class RawSample(NamedTuple):
    """One sample as the tar holds it, not decoded."""

    url: str  # its shard
    key: str
    image: bytes | None  # the first image member's bytes; None: the sample has no image
    suffix: str  # that member's suffix ("jpg"), "" without one
    cls: bytes | None  # the .cls member's bytes, None without one


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise MissingExtraError(f"reading shards needs the {module} package: pip install 'simclr-cli[shards]'") \
            from None


def local_path(url: str) -> str | None:
    """The file a URL names on this machine (a plain path or file://), None for a remote one."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else os.path.expanduser(url)


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """The shard URLs `spec` names, in order: brace ranges expanded (`train-{000000..000099}.tar`), lists
    joined. A local folder holding a shard index stands for its train series. Nothing named, or a local shard
    that is not there: one DatasetError naming the fix."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    braceexpand = _need("braceexpand").braceexpand
    urls = [url for s in specs if s.strip() for url in braceexpand(s.strip())]
    if len(urls) == 1 and local_path(urls[0]) and os.path.isdir(local_path(urls[0])):
        urls = _index_series(urls[0])
    if not urls:
        raise DatasetError("no shard URLs given: name the shards, e.g. /data/train-{000000..000099}.tar")
    missing = [u for u in urls if local_path(u) is not None and not os.path.exists(local_path(u))]
    if missing:
        more = f" ({len(missing)} of {len(urls)} shards are missing)" if len(missing) > 1 else ""
        raise DatasetError(f"shard {missing[0]} does not exist{more}: check the path and the brace range")
    return urls


def _index_series(folder: str) -> list[str]:
    """The shards of the train series the index in `folder` records."""
    try:
        shards = read_index(folder)["series"]["train"]["shards"]
    except (TypeError, KeyError):
        shards = None
    if not shards:
        raise DatasetError(f"{folder} is a folder without a shard index of a train series: name its shards, "
                           "e.g. DIR/train-{000000..000009}.tar, or write them with `simclr shards`")
    return [f"{folder.rstrip('/')}/{sh['name']}" for sh in shards]


def storage_options(url: str, timeout: float) -> dict:
    """fsspec options that bound each connect and read of `url` by `timeout` seconds (s3fs: botocore's
    timeouts; http(s) and gcsfs: aiohttp's socket timeouts). Local files need none: they are regular files.
    s3: one botocore attempt per call, since s3fs retries a timed-out call itself (5 tries, ~2 s of backoff), so
    a stalled store is reported after some 5-10 x `timeout` (opening may try two calls), not botocore's
    attempts times s3fs's, and a refusing one at once instead of after botocore's backoff (~7 s); the endpoint is
    AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL when set (MinIO, a test server; botocore < 1.31 reads neither)."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a"):
        config = {"connect_timeout": timeout, "read_timeout": timeout,
                  "retries": {"mode": "standard", "max_attempts": 1}}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return {"config_kwargs": config, **({"endpoint_url": endpoint} if endpoint else {})}
    if protocol in ("http", "https", "gs", "gcs"):
        aiohttp = _need("aiohttp")
        limit = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        return {"client_kwargs" if protocol.startswith("http") else "session_kwargs": {"timeout": limit}}
    return {}


def _options(url: str, timeout: float, options: dict | None) -> dict:
    """The timeouts of `storage_options` under the caller's `options`: a nested dict of both (config_kwargs with
    a signature_version, say) is merged, so the caller's keys win without dropping the timeouts."""
    base, extra = storage_options(url, timeout), dict(options or {})
    for key, value in base.items():
        if isinstance(value, dict) and isinstance(extra.get(key), dict):
            extra[key] = {**value, **extra[key]}
    return {**base, **extra}


def open_shard(url: str, timeout: float = DEFAULT_TIMEOUT, options: dict | None = None) -> BinaryIO:
    """The shard at `url` opened for reading in binary; one DatasetError naming it when it cannot be."""
    path = local_path(url)
    try:
        if path is not None:
            return open_regular(path)
        fsspec = _need("fsspec")
        return fsspec.open(url, "rb", **_options(url, timeout, options)).open()
    except MissingExtraError:
        raise
    except SpecialFileError as e:
        raise DatasetError(f"cannot open shard {url}: it is {e}: name a tar file") from None
    except Exception as e:  # OSError, botocore/aiohttp errors, timeouts: whatever the store raises
        reason = f"{type(e).__name__}: {e}".strip().splitlines()[0]
        raise DatasetError(f"cannot open shard {url} ({reason}): check the URL, its credentials and the network") \
            from None


def split_name(name: str) -> tuple[str | None, str]:
    """(key, lower-case suffix) of a member's path: the split is at the first dot of the file name, as in
    WebDataset; (None, "") for a name without a dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem, suffix.lower()) if dot and stem else (None, "")


def _members(f: BinaryIO, headers_only: bool) -> Iterator[tuple[str, str, bytes | None]]:
    """(key, suffix, bytes or None) of each regular member; bytes only for the members a sample keeps."""
    tar = tarfile.open(fileobj=f, mode="r|*")
    for info in tar:
        tar.members = []  # stream mode keeps every header it has read otherwise
        key, suffix = split_name(info.name) if info.isreg() else (None, "")
        if key is None:
            continue
        keep = not headers_only and (suffix in IMAGE_SUFFIXES or suffix == "cls")
        yield key, suffix, tar.extractfile(info).read() if keep else None
    if len(tar.fileobj.read(tarfile.BLOCKSIZE)) < tarfile.BLOCKSIZE:  # a whole tar ends in two zero blocks
        raise tarfile.ReadError("it ends without the end-of-archive blocks")


def read_samples(url: str, expected: int = 0, timeout: float = DEFAULT_TIMEOUT, options: dict | None = None,
                 headers_only: bool = False) -> Iterator[RawSample]:
    """The samples of one shard, in order. A shard that is cut short, damaged, stalls past `timeout`, has
    fewer samples than `expected` or no image at all: one DatasetError naming it. headers_only: the images
    are not read (None), for counting."""
    n = images = 0
    with open_shard(url, timeout, options) as f:
        try:
            key, kept = None, {}
            for k, suffix, data in _members(f, headers_only):
                if k != key and key is not None:
                    yield _sample(url, key, kept)
                    n, images, kept = n + 1, images + ("image" in kept), {}
                key = k
                if suffix in IMAGE_SUFFIXES and "image" not in kept:
                    kept.update(image=data, suffix=suffix)
                elif suffix == "cls":
                    kept["cls"] = data
            if key is not None:
                yield _sample(url, key, kept)
                n, images = n + 1, images + ("image" in kept)
        except Exception as e:  # tarfile.ReadError, OSError, the store's timeouts
            reason = f"{type(e).__name__}: {e}".strip().splitlines()[0]
            raise DatasetError(f"shard {url} is cut short or damaged ({reason}): write or download it again") \
                from None
    if n < expected:
        raise DatasetError(f"shard {url} holds {n} samples where {expected} were counted: it was cut short or "
                           "changed since; write it again (or remove its count cache)")
    if n and not images:
        raise DatasetError(f"shard {url} holds {n} samples but no image ({', '.join(IMAGE_SUFFIXES)}): "
                           "check how it was written")


def _sample(url: str, key: str, kept: dict) -> RawSample:
    return RawSample(url, key, kept.get("image"), kept.get("suffix", ""), kept.get("cls"))


def read_index(folder: str, options: dict | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict | None:
    """The shard index in `folder` (a path or URL prefix), None when there is none or it is not one."""
    url = f"{folder.rstrip('/')}/{INDEX_NAME}"
    try:
        if local_path(url) is not None:
            text = Path(local_path(url)).read_text(encoding="utf-8")
        else:
            with open_shard(url, timeout, options) as f:
                text = f.read().decode("utf-8")
        index = json.loads(text)
    except (OSError, ValueError, DatasetError):
        return None
    return index if isinstance(index, dict) and index.get("format") == INDEX_FORMAT else None


def index_counts(urls: Sequence[str], timeout: float = DEFAULT_TIMEOUT, options: dict | None = None) -> dict[str, int]:
    """{url: samples} for the shards that an index beside them records (a local one only with its recorded
    size: a rewritten shard is counted again)."""
    found = {}
    for folder in dict.fromkeys(u.rpartition("/")[0] for u in urls):
        index = read_index(folder or ".", options, timeout) or {}
        for series in (index.get("series") or {}).values():
            for sh in series.get("shards") or []:
                url = f"{folder}/{sh['name']}" if folder else sh["name"]
                path = local_path(url)
                if path is None or (os.path.isfile(path) and os.path.getsize(path) == sh.get("bytes")):
                    found[url] = int(sh["samples"])
    return {u: found[u] for u in urls if u in found}


def default_count_dir() -> Path:
    """Where shard counts are cached: beside the folder caches ($SIMCLR_CACHE_DIR/shard-counts) when that is set,
    else ~/.cache/simclr-cli/shards."""
    env = os.environ.get("SIMCLR_CACHE_DIR")
    return Path(env).expanduser() / "shard-counts" if env else Path.home() / ".cache" / "simclr-cli" / "shards"


def _stamp(url: str) -> list[int] | None:
    """[size, mtime in ns] of a local shard (a changed one is counted again); None for a remote one."""
    path = local_path(url)
    try:
        st = os.stat(path) if path is not None else None
    except OSError:  # gone: reading it says so, naming it
        return None
    return None if st is None else [st.st_size, st.st_mtime_ns]


def shard_counts(urls: Sequence[str], cache_dir: str | Path | None = None, timeout: float = DEFAULT_TIMEOUT,
                 options: dict | None = None) -> list[int]:
    """Samples in each shard of `urls`: from the index beside them, else from the count cache, else counted
    from the tar headers (8 shards at a time) and cached. The cache file is best effort: unwritable, the
    counts are still returned."""
    known = index_counts(urls, timeout, options)
    cache = Path(cache_dir or default_count_dir()).expanduser()
    cache_file = cache / f"counts-{hashlib.sha256(chr(10).join(urls).encode()).hexdigest()[:20]}.json"
    try:
        cached = json.loads(cache_file.read_text(encoding="utf-8"))
        cached = cached["shards"] if cached.get("format") == COUNTS_FORMAT else {}
    except (OSError, ValueError, KeyError, AttributeError):
        cached = {}
    stamps = {u: _stamp(u) for u in urls if u not in known}
    fresh = {u: c["samples"] for u, c in cached.items() if u in stamps and isinstance(c, dict)
             and c.get("stamp") == stamps[u] and isinstance(c.get("samples"), int)}
    todo = [u for u in stamps if u not in fresh]
    with ThreadPoolExecutor(max(1, min(8, len(todo)))) as pool:
        fresh.update(zip(todo, pool.map(lambda u: sum(1 for _ in read_samples(u, 0, timeout, options, True)), todo)))
    if todo:
        entries = {u: {"samples": fresh[u], "stamp": stamps[u]} for u in stamps}
        try:
            cache.mkdir(parents=True, exist_ok=True)
            atomic_write_text(json.dumps({"format": COUNTS_FORMAT, "shards": entries}, indent=1) + "\n", cache_file)
        except (OSError, OutputError):
            pass
    return [known[u] if u in known else fresh[u] for u in urls]
