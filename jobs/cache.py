"""`airatings cache`: a local, content-addressed image cache for a run's manifests.

Reads the run's export manifests (each verified against the sha256 the run's record holds),
downloads each distinct URL once (``jobs.fetch``: URL policy, limits, retries; a fixed set of
workers fed by a bounded queue, so memory does not grow with the URLs), validates every body
with ``jobs.images.load_image`` (one decode, JPEG in draft mode, which also yields the
training-size copy), and stores:

- originals at ``<artifacts>/images/original/<aa>/<sha256>.<ext>`` (streamed to a temp file
  while hashed, validated, then renamed; names never derive from database strings),
- training copies at ``<artifacts>/images/train<short_side>/<aa>/<sha256>.jpg``,
- the URL -> sha256 index in the ``image_cache`` table (migration 0010), so a re-run, another
  shard or the next run makes zero requests for what is cached. A hit is re-checked against
  the current config (``HitPolicy``) before its file is used: the index is not a bypass,

then per run ``<artifacts>/runs/<model_version>/failures.parquet`` and the active manifests
``active/manifest_{train,val,test}.parquet`` (export columns + ``image_sha256``,
``image_path``, ``train_image_path``; their sha256s recorded in ``params_json['cache']
['active_files']`` for training to verify), and moves the run to ``cached``. A run already
``cached`` is done only if those files still match: otherwise the merge is redone, with no
downloads. A failure rate over
``cache.failure_rate_limit`` fails the job naming the dominant reasons: exit 75 (retried) when
most failures are transient (timeouts, connection errors, HTTP 429/5xx), else exit 2.

Sharding (a Kubernetes Indexed Job): ``--shard I/N`` or ``JOB_COMPLETION_INDEX`` +
``JOB_COMPLETIONS`` take a stable hash partition of the distinct URLs and write
``cache_shards/<I>-of-<N>.parquet``; ``airatings cache --merge`` combines them. Unsharded is
shard 0/1 followed by the merge.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from jobs import db, paths, provenance, runs
from jobs.artifacts import (
    FOREIGN_TEMP_AGE_S,
    atomic_path,
    atomic_write_parquet,
    sha256_file,
    sweep_temp,
    temp_path_for,
)
from jobs.errors import InputError, TransientError
from jobs.logs import bind, get_logger
from jobs.paths import DatasetPaths, ImagePaths

if TYPE_CHECKING:
    import pyarrow as pa

    from jobs.config import Config
    from jobs.fetch import Fetcher

SPLITS = ("train", "val", "test")
# jobs.fetch reasons for failures that may pass by themselves (besides HTTP 429 and 5xx)
_TRANSIENT_REASONS = frozenset({"timeout", "connection_error"})
_LOGGED_FAILURES = 50  # individual failure events logged per shard; the rest only counted


# ---- paths (the tree itself is jobs/paths.py) -----------------------------------------------

original_rel = ImagePaths.original_rel
train_rel = ImagePaths.train_rel


def url_key(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


# ---- shards ------------------------------------------------------------------------------------


def parse_shard(
    shard: str | None, env: dict[str, str] | os._Environ[str], *, job: str = "cache"
) -> tuple[int, int]:
    """``I/N`` (or JOB_COMPLETION_INDEX + JOB_COMPLETIONS) -> (index, count); none -> (0, 1)."""
    if shard is None:
        idx, total = env.get("JOB_COMPLETION_INDEX"), env.get("JOB_COMPLETIONS")
        if idx is None and total is None:
            return 0, 1
        if idx is None or total is None:
            raise InputError(
                f"sharded {job} needs both JOB_COMPLETION_INDEX and JOB_COMPLETIONS "
                f"(got index={idx!r}, completions={total!r}); or pass --shard I/N"
            )
        shard, origin = f"{idx}/{total}", "JOB_COMPLETION_INDEX/JOB_COMPLETIONS"
    else:
        origin = "--shard"
    i_text, sep, n_text = shard.strip().partition("/")
    if not sep or not i_text.strip().isdigit() or not n_text.strip().isdigit():
        raise InputError(f"{origin}: expected I/N with 0 <= I < N, got {shard!r}")
    i, n = int(i_text), int(n_text)
    if n < 1 or not 0 <= i < n:
        raise InputError(f"{origin}: shard index {i} is out of range for {n} shards (0..{n - 1})")
    return i, n


def shard_of(url: str, count: int) -> int:
    """Stable partition: the same URL lands in the same shard on every machine and run."""
    return int(url_key(url)[:16], 16) % count


# ---- manifests ---------------------------------------------------------------------------------


def _dataset(cfg: Config, run: runs.Run) -> DatasetPaths:
    export = run.params.get("export") or {}
    if export.get("dataset_dir"):
        return DatasetPaths(Path(export["dataset_dir"]))
    if run.dataset_hash:
        return paths.of(cfg).dataset(run.dataset_hash)
    raise InputError(
        f"run {run.model_version} records no dataset directory; re-run 'airatings export'"
    )


def _conform_schema(schema: pa.Schema, path: Path) -> None:
    """An InputError naming the first column of the manifest contract (jobs/manifests.py)
    that ``schema`` lacks or types differently."""
    from jobs.manifests import MANIFEST_SCHEMA

    for field in MANIFEST_SCHEMA:
        if field.name not in schema.names:
            raise InputError(f"{path} has no column {field.name!r} (manifest contract)")
        if not schema.field(field.name).type.equals(field.type):
            raise InputError(
                f"{path}: column {field.name!r} is {schema.field(field.name).type}, "
                f"the manifest contract says {field.type}"
            )


def conform_manifest(table: pa.Table, path: Path) -> pa.Table:
    """The manifest in the contract's column order and types (jobs/manifests.py), or an
    InputError naming the first missing or mistyped column."""
    from jobs.manifests import MANIFEST_SCHEMA

    _conform_schema(table.schema, path)
    return table.select(MANIFEST_SCHEMA.names)


def verified_manifests(cfg: Config, run: runs.Run) -> dict[str, Path]:
    """The run's export manifests (split -> path), each verified against the sha256 the export
    recorded in the run's ``params_json['export']['files']`` (the database record is the
    authority, not the dataset.json beside the files: docs/faults.md 31), readable as Parquet
    and in the manifest contract. Nothing is read into memory but the footers: the job reads
    the columns it needs when it needs them (docs/faults.md 33)."""
    import pyarrow.parquet as pq

    dataset = _dataset(cfg, run)
    recorded = (run.params.get("export") or {}).get("files") or {}
    fix = (
        "re-run 'airatings export' (it rewrites a dataset's manifests from the database when "
        "their sha256 does not match), then this command"
    )
    out = {}
    for split in SPLITS:
        path = dataset.manifest(split)
        if not path.is_file():
            raise InputError(
                f"{path} is missing; the export of run {run.model_version} is incomplete"
            )
        expected = (recorded.get(path.name) or {}).get("sha256")
        if not expected:
            raise InputError(
                f"{path}: run {run.model_version} records no sha256 for it "
                "(params_json['export']['files']); refusing to read an unverified manifest"
            )
        actual = sha256_file(path)
        if actual != expected:
            raise InputError(
                f"{path} changed after the export wrote it (sha256 {actual[:16]}..., the run "
                f"records {expected[:16]}...); refusing to cache from it. {fix}"
            )
        try:
            schema = pq.read_schema(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise InputError(f"{path} is not a readable Parquet file: {exc}") from None
        _conform_schema(schema, path)
        out[split] = path
    return out


def _read_columns(path: Path, columns: list[str]) -> pa.Table:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise InputError(f"{path} is not a readable Parquet file: {exc}") from None


def read_manifests(cfg: Config, run: runs.Run) -> dict[str, pa.Table]:
    """The run's verified export manifests (``verified_manifests``), whole, in the contract."""
    from jobs.manifests import MANIFEST_SCHEMA

    return {
        split: conform_manifest(_read_columns(path, MANIFEST_SCHEMA.names), path)
        for split, path in verified_manifests(cfg, run).items()
    }


class ArrowStrings(Sequence[str]):
    """A read-only sequence of str over an Arrow string array: 4 bytes of offset plus the
    UTF-8 bytes an item, where a list of Python strings costs ~100 bytes a URL. Items become
    ``str`` only when read; a slice is another ``ArrowStrings`` (no copy)."""

    def __init__(self, array: pa.Array) -> None:
        self.arrow = array

    def __len__(self) -> int:
        return len(self.arrow)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            if i.step not in (None, 1):
                raise ValueError("ArrowStrings slices have step 1")
            start, stop, _ = i.indices(len(self.arrow))
            return ArrowStrings(self.arrow.slice(start, max(0, stop - start)))
        return self.arrow[i].as_py()

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self.arrow), 4096):
            yield from self.arrow.slice(start, 4096).to_pylist()


# ---- the URL index (migration 0010) -----------------------------------------------------------


class IndexRow(NamedTuple):
    """What the index knows of a cached URL: its content and the size its header declared."""

    sha256: str
    ext: str
    bytes: int
    width: int
    height: int


class ImageIndex:
    """URL -> (sha256, ext, bytes, width, height) in ``image_cache``; one connection, batched
    upserts."""

    def __init__(self, cfg: Config, conn: Any) -> None:
        self.cfg = cfg
        self.conn = conn
        self.table = runs.table(cfg, "image_cache")

    def lookup(self, urls: list[str]) -> dict[str, IndexRow]:
        from psycopg import sql

        keys = {url_key(u): u for u in urls}
        out: dict[str, IndexRow] = {}
        q = sql.SQL(
            "select url_key, url, sha256, ext, bytes, width, height from {} where url_key = any(%s)"
        ).format(self.table)
        key_list = list(keys)
        for start in range(0, len(key_list), 20_000):
            for k, url, *row in self.conn.execute(q, (key_list[start : start + 20_000],)):
                if keys.get(k) == url:
                    out[url] = IndexRow(*row)
        return out

    def upsert(self, rows: list[tuple[str, str, str, int, int, int]]) -> None:
        """rows: (url, sha256, ext, bytes, width, height); width x height as the image's header
        declares it (what the pixel cap counts), not the draft-decoded size."""
        if not rows:
            return
        from psycopg import sql

        q = sql.SQL(
            "insert into {} (url_key, url, sha256, ext, bytes, width, height) values (%s, %s, %s, %s, %s, %s, %s)"
            " on conflict (url_key) do update set url = excluded.url, sha256 = excluded.sha256,"
            " ext = excluded.ext, bytes = excluded.bytes, width = excluded.width,"
            " height = excluded.height, cached_at = now()"
        ).format(self.table)
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.executemany(q, [(url_key(r[0]), *r) for r in rows])


# ---- caching one URL --------------------------------------------------------------------------


_EXTS = ("jpg", "png", "webp", "gif")  # the stored extensions (migration 0010's check)


class UrlResults:
    """Each URL's outcome in a few flat arrays indexed like ``urls``: 42 bytes a URL and no
    Python object per URL, so 200k URLs cost 8 MB, not a dict of dataclasses (docs/faults.md
    33). ``batches()`` builds the shard output from them."""

    def __init__(self, urls: Sequence[str]) -> None:
        from array import array

        n = len(urls)
        self.urls = urls
        self.sha = bytearray(32 * n)  # sha256 digests
        self.has_sha = bytearray(n)
        self.ext = bytearray(n)  # 0: none, else 1 + index into _EXTS
        self.reason = array("H", bytes(2 * n))  # 0: none, else 1 + index into self.reasons
        self.reasons: list[str] = []
        self._reason_ids: dict[str, int] = {}
        self.attempts = bytearray(n)
        self.nbytes = array("I", bytes(4 * n))  # capped at 4 GiB (bodies are far smaller)
        self.from_index = bytearray(n)

    def __len__(self) -> int:
        return len(self.urls)

    def ok(
        self, i: int, sha: str, ext: str, *, attempts: int = 0, nbytes: int = 0, from_index: bool
    ) -> None:
        self.sha[32 * i : 32 * i + 32] = bytes.fromhex(sha)
        self.has_sha[i] = 1
        self.ext[i] = 1 + _EXTS.index(ext)
        self.reason[i] = 0
        self.attempts[i] = min(attempts, 255)
        self.nbytes[i] = min(nbytes, 0xFFFFFFFF)
        self.from_index[i] = from_index

    def fail(self, i: int, reason: str, *, attempts: int = 0, nbytes: int = 0) -> None:
        code = self._reason_ids.get(reason)
        if code is None:
            self.reasons.append(reason)
            code = self._reason_ids[reason] = len(self.reasons)
        self.has_sha[i] = self.ext[i] = self.from_index[i] = 0
        self.reason[i] = code
        self.attempts[i] = min(attempts, 255)
        self.nbytes[i] = min(nbytes, 0xFFFFFFFF)

    def failure_counts(self) -> Counter[str]:
        counts = Counter(self.reason)
        return Counter({self.reasons[code - 1]: k for code, k in counts.items() if code})

    def order(self) -> Any:
        """Row positions in URL order (the shard file is sorted by URL); the job's URL lists
        are sorted already, then this costs one pass and no copy."""
        import itertools

        import numpy as np

        if all(a <= b for a, b in itertools.pairwise(self.urls)):
            return None
        return np.argsort(np.array(self.urls, dtype=object), kind="stable")

    def batches(self, rows: int = 16_384) -> Iterator[pa.RecordBatch]:
        """The shard output in URL order (columns url, image_sha256, ext, reason, attempts,
        bytes, from_index), ``rows`` at a time, built from the arrays without a per-URL Python
        object: writing it never holds more than one batch besides the arrays."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        n = len(self.urls)
        order = self.order()
        sha = np.frombuffer(self.sha, dtype=np.uint8).reshape(n, 32)
        hex_digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
        columns = {
            "has_sha": np.frombuffer(self.has_sha, dtype=np.uint8),
            "ext": np.frombuffer(self.ext, dtype=np.uint8),
            "reason": np.frombuffer(self.reason, dtype=np.uint16),
            "attempts": np.frombuffer(self.attempts, dtype=np.uint8),
            "bytes": np.frombuffer(self.nbytes, dtype=np.uint32),
            "from_index": np.frombuffer(self.from_index, dtype=np.uint8),
        }
        ext_names = pa.array([None, *_EXTS], pa.string())
        reason_names = pa.array([None, *self.reasons], pa.string())
        for start in range(0, n, rows):
            if order is None:
                idx = slice(start, min(n, start + rows))
                urls = self.urls[idx]
            else:
                idx = order[start : start + rows]
                urls = [self.urls[i] for i in idx]
            col = {k: v[idx] for k, v in columns.items()}
            m = len(urls)
            valid = col["has_sha"].astype(bool)
            raw = sha[idx]
            hexed = np.empty((m, 64), dtype=np.uint8)
            hexed[:, 0::2] = hex_digits[raw >> 4]
            hexed[:, 1::2] = hex_digits[raw & 15]
            digest = pa.Array.from_buffers(
                pa.string(),
                m,
                [
                    pa.py_buffer(np.packbits(valid, bitorder="little")),
                    pa.py_buffer(np.arange(0, 64 * m + 1, 64, dtype=np.int32)),
                    pa.py_buffer(hexed),
                ],
            )
            yield pa.record_batch(
                {
                    "url": (
                        urls.arrow.cast(pa.string())
                        if isinstance(urls, ArrowStrings)
                        else pa.array(urls, pa.string())
                    ),
                    "image_sha256": digest,
                    "ext": pc.take(ext_names, pa.array(col["ext"])),
                    "reason": pc.take(reason_names, pa.array(col["reason"])),
                    "attempts": pa.array(col["attempts"].astype(np.int32)),
                    "bytes": pa.array(col["bytes"].astype(np.int64)),
                    "from_index": pa.array(col["from_index"].astype(bool)),
                }
            )

    def table(self) -> pa.Table:
        import pyarrow as pa

        return pa.Table.from_batches(list(self.batches()), schema=results_schema())

    def write_parquet(self, final: Path) -> None:
        """The shard file, atomically, one row group per batch."""
        import pyarrow.parquet as pq

        def check(p: Path) -> None:
            meta = pq.read_metadata(p)  # a footerless file raises here
            if meta.num_rows != len(self):
                raise InputError(f"{final}: wrote {meta.num_rows} rows, expected {len(self)}")

        # Dictionary pages only for the few-valued columns: URLs and hashes are all distinct,
        # and a dictionary being built for them would cost more memory than the batch itself.
        with (
            atomic_path(final, check=check) as tmp,
            pq.ParquetWriter(tmp, results_schema(), use_dictionary=["ext", "reason"]) as w,
        ):
            for batch in self.batches():
                w.write_batch(batch)


def results_schema() -> pa.Schema:
    """The shard output's columns (one row per distinct URL of the shard)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("url", pa.string()),
            ("image_sha256", pa.string()),
            ("ext", pa.string()),
            ("reason", pa.string()),
            ("attempts", pa.int32()),
            ("bytes", pa.int64()),
            ("from_index", pa.bool_()),
        ]
    )


@dataclass
class StoreParams:
    root: Path  # the artifacts dir
    max_pixels: int
    formats: tuple[str, ...]
    short_side: int
    quality: int


def _head_check(formats: tuple[str, ...]) -> Any:
    from jobs.images import sniff_format

    def check(head: bytes) -> str | None:
        fmt = sniff_format(head)
        if fmt is None:
            return "not_an_image"
        if fmt not in formats:
            return "unsupported_format"
        return None

    return check


def _write_image_file(final: Path, data: bytes) -> None:
    """Temp file in the same directory, then rename: a killed process never leaves a partial
    file at ``final``. No fsync per image (tens of thousands of them): after a power loss the
    index check on resume (original size must match) re-fetches what did not survive."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def store_image(tmp: Path, sha: str, p: StoreParams) -> tuple[str, int, int]:
    """Validate the body in ``tmp`` (one decode), write the training copy, move the original to
    its content address. Returns (ext, width, height) of the stored picture (the header's
    size, what the pixel cap counts, not the draft-decoded one); raises
    ``ImageRejected``. Runs in a worker thread (Pillow releases the GIL while decoding)."""
    from jobs.images import EXTENSIONS, decode_image, encode_jpeg, resize_short_side, sniff_format

    try:
        with open(tmp, "rb") as f:
            fmt = sniff_format(f.read(16))
        img, width, height = decode_image(
            tmp, max_pixels=p.max_pixels, formats=p.formats, draft_short_side=p.short_side
        )
        ext = EXTENSIONS[fmt]  # type: ignore[index]  # load_image refused unknown formats
        train_final = p.root / train_rel(sha, p.short_side)
        if not train_final.exists():
            _write_image_file(
                train_final, encode_jpeg(resize_short_side(img, p.short_side), p.quality)
            )
        orig_final = p.root / original_rel(sha, ext)
        orig_final.parent.mkdir(parents=True, exist_ok=True)
        # Same filesystem (tmp lies in images/original/): the rename is atomic; the file at
        # the final name is always complete and already validated.
        os.replace(tmp, orig_final)
        return ext, width, height
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def regenerate_train_copy(sha: str, ext: str, p: StoreParams) -> None:
    """The original is cached but this training size is not (short_side changed)."""
    from jobs.images import encode_jpeg, load_image, resize_short_side

    img = load_image(
        p.root / original_rel(sha, ext),
        max_pixels=p.max_pixels,
        formats=p.formats,
        draft_short_side=p.short_side,
    )
    _write_image_file(
        p.root / train_rel(sha, p.short_side),
        encode_jpeg(resize_short_side(img, p.short_side), p.quality),
    )


def _origin(url: str) -> str | None:
    """``scheme://authority`` of a URL string: up to the first ``/``, ``?`` or ``#`` after the
    ``//``, where RFC 3986 (and ``urlsplit``, which yarl uses) ends the authority, so two URLs
    with the same origin text have the same scheme, credentials, host and port. None when it
    has no ``//``."""
    start = url.find("://")
    if start < 0:
        return None
    ends = [j for j in (url.find(c, start + 3) for c in "/?#") if j >= 0]
    return url[: min(ends)] if ends else url


class HitPolicy:
    """An index hit re-checked against the *current* config before its file is used
    (docs/faults.md 30): the index says what a URL gave under the config of its day, not that
    today's config still accepts it. A refused hit fails with the reason a fresh fetch would
    give (``blocked_url``, ``invalid_url``, ``unsupported_format``, ``decompression_bomb``),
    without a request.

    - URL policy: ``UrlPolicy.check_url`` (scheme, ``file://`` allowed and under its root,
      literal private addresses) and, for host names, the system resolver: refused when every
      address it returns is refused (one lookup per host and port, memoised; skipped when
      private networks are allowed). A name that does not resolve now keeps its hit: nothing
      was refused, and the content is already here.
    - formats: the stored extension among ``cache.formats``;
    - pixels: the header's width x height against ``cache.max_pixels``. Index rows written
      before the header size was recorded hold a JPEG's draft-decoded size, up to 8x smaller a
      side; where that could hide an image over the cap, the original's header is read.
    """

    def __init__(self, cfg: Config) -> None:
        from jobs.fetch import UrlPolicy
        from jobs.images import EXTENSIONS, pixel_cap

        self.policy = UrlPolicy.from_config(cfg)
        self.exts = frozenset(EXTENSIONS[f] for f in cfg.cache.formats)
        self.cap = pixel_cap(cfg.cache.max_pixels)
        self.root = str(cfg.artifacts_dir)
        self._hosts: dict[tuple[str, int], str | None] = {}
        self._origins: dict[str, str | None] = {}
        self.resolve_failures = 0

    async def refusal(self, url: str, row: IndexRow) -> str | None:
        """None if the hit may be used, else the failure reason."""
        # The URL policy judges a web URL by its scheme and authority (credentials, host,
        # port), never its path: the verdict is memoised on the ``scheme://authority`` text,
        # so a resume over 200k URLs of one host parses and checks one. file:// URLs are
        # judged by their path (the allowed root), each one.
        origin = _origin(url)
        if origin is None or origin.lower().startswith("file:"):
            verdict = await self._url_refusal(url)
        else:
            if origin not in self._origins:
                self._origins[origin] = await self._url_refusal(url)
            verdict = self._origins[origin]
        if verdict is not None:
            return verdict
        if row.ext not in self.exts:
            return "unsupported_format"
        if self._pixels(row) > self.cap:
            return "decompression_bomb"
        return None

    async def _url_refusal(self, url: str) -> str | None:
        from yarl import URL

        from jobs.fetch import FetchFailed

        try:
            parsed = URL(url)
            self.policy.check_url(parsed)
            if parsed.scheme == "file":
                self.policy.file_path(parsed)
                return None
            return await self._host_refusal(parsed)
        except FetchFailed as exc:
            return exc.reason
        except (ValueError, TypeError):
            return "invalid_url"

    async def _host_refusal(self, url: Any) -> str | None:
        import ipaddress

        host = (url.raw_host or "").strip("[]").lower()
        if self.policy.allow_private:
            return None
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(host.split("%", 1)[0])
            return None  # a literal address: check_url has checked it
        port = url.port or (443 if url.scheme == "https" else 80)
        key = (host, port)
        if key not in self._hosts:
            self._hosts[key] = await self._resolve(host, port)
        return self._hosts[key]

    async def _resolve(self, host: str, port: int) -> str | None:
        import socket

        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            self.resolve_failures += 1
            return None
        if infos and not any(self.policy.address_allowed(str(i[4][0]), port) for i in infos):
            return "blocked_url"
        return None

    def _pixels(self, row: IndexRow) -> int:
        pixels = row.width * row.height
        if row.ext != "jpg" or pixels * 64 <= self.cap:
            return pixels
        from jobs.images import jpeg_size

        try:  # the frame header: a few small reads, no decode
            size = jpeg_size(os.path.join(self.root, original_rel(row.sha256, row.ext)))
        except OSError:
            size = None  # gone: the file checks after this decide
        return pixels if size is None else max(pixels, size[0] * size[1])


class _Progress:
    """tqdm on a TTY (files, MB, rate, failures); periodic structured events otherwise."""

    def __init__(self, total: int, every_s: float, log: Any) -> None:
        self.total, self.every_s, self.log = total, every_s, log
        self.done = self.failed = self.bytes = 0
        self.started = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty() and total:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, unit="img", desc="caching", file=sys.stderr, dynamic_ncols=True
            )

    def update(self, nbytes: int = 0, failed: bool = False) -> None:
        self.done += 1
        self.bytes += nbytes
        self.failed += failed
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(MB=f"{self.bytes / 1e6:.1f}", failed=self.failed, refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            elapsed = now - self.started
            self.log.info(
                "images_progress",
                done=self.done,
                total=self.total,
                failed=self.failed,
                mb=round(self.bytes / 1e6, 1),
                files_per_s=round(self.done / max(elapsed, 1e-9), 1),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def cache_urls(
    cfg: Config,
    urls: Sequence[str],
    *,
    index: ImageIndex | None = None,
    fetcher: Fetcher | None = None,
    flush_every: int = 256,
    lookup_batch: int = 2000,
) -> tuple[UrlResults, dict[str, Any]]:
    """Cache each URL once. Returns the per-URL results and counters (requests, bytes,
    from_index...).

    With an ``index``, URLs already cached (an index hit the current config accepts, both
    files present) cost no request; new entries are upserted in batches as they complete, so a
    killed run keeps its progress.

    Memory does not grow with the number of URLs beyond the compact results (docs/faults.md
    33): the index is read ``lookup_batch`` URLs at a time, and a fixed set of
    ``cache.concurrency`` workers takes URLs from a bounded queue (no task per URL).
    """
    from jobs.fetch import Fetcher, FetchFailed, redact_url
    from jobs.images import ImageRejected
    from jobs.resources import available_cpus

    log = get_logger()
    c = cfg.cache
    params = StoreParams(
        cfg.artifacts_dir, c.max_pixels, tuple(c.formats), c.train_short_side, c.jpeg_quality
    )
    incoming = cfg.artifacts_dir / "images" / "original"
    results = UrlResults(urls)
    hit_policy = HitPolicy(cfg)
    counts = Counter({"to_fetch": 0, "refused": 0, "regen": 0, "refetched": 0})
    pool = ThreadPoolExecutor(
        max_workers=c.cpu_workers or available_cpus(), thread_name_prefix="cache-cpu"
    )
    loop = asyncio.get_running_loop()
    pending_rows: list[tuple[str, str, str, int, int, int]] = []
    db_lock = asyncio.Lock()  # one connection: lookups and upserts take turns
    progress = _Progress(len(urls), c.progress_every_s, log)
    logged = 0
    workers = c.concurrency
    # (position, url, index row to regenerate the training copy from, or None: fetch it)
    queue: asyncio.Queue[tuple[int, str, IndexRow | None] | None] = asyncio.Queue(workers)

    async def flush(force: bool = False) -> None:
        if index is None or not pending_rows or (len(pending_rows) < flush_every and not force):
            return
        async with db_lock:
            batch = pending_rows[:]
            del pending_rows[: len(batch)]
            await asyncio.to_thread(index.upsert, batch)

    def record_failure(url: str, reason: str, attempts: int, detail: object) -> None:
        nonlocal logged
        if logged < _LOGGED_FAILURES:
            logged += 1
            log.info(
                "image_failed",
                url=redact_url(url),
                reason=reason,
                attempts=attempts,
                detail=str(detail)[:200],
            )

    own_fetcher = fetcher is None
    fetcher = fetcher or Fetcher.from_config(cfg)
    head_check = _head_check(tuple(c.formats))

    async def produce() -> None:
        """Index hits are settled here, batch by batch; the rest go to the workers."""
        root = str(params.root)
        for start in range(0, len(urls), lookup_batch):
            chunk = urls[start : start + lookup_batch]
            known: dict[str, IndexRow] = {}
            if index is not None:
                async with db_lock:
                    known = await asyncio.to_thread(index.lookup, list(chunk))
            for i, url in enumerate(chunk, start):
                hit = known.get(url)
                if hit is not None:
                    reason = await hit_policy.refusal(url, hit)
                    if reason is not None:
                        counts["refused"] += 1
                        results.fail(i, reason)
                        record_failure(url, reason, 0, "cached, but the current config refuses it")
                        progress.update(failed=True)
                        continue
                    try:  # os.path on strings: a resume checks every hit's two files
                        orig = os.stat(os.path.join(root, original_rel(hit.sha256, hit.ext)))
                        ok = orig.st_size == hit.bytes
                    except FileNotFoundError:
                        ok = False
                    if ok:
                        results.ok(i, hit.sha256, hit.ext, from_index=True)
                        train_copy = os.path.join(root, train_rel(hit.sha256, params.short_side))
                        if os.path.exists(train_copy):
                            progress.update()
                        else:
                            counts["regen"] += 1
                            await queue.put((i, url, hit))
                        continue
                counts["to_fetch"] += 1
                await queue.put((i, url, None))
        for _ in range(workers):
            await queue.put(None)

    async def fetch_one(i: int, url: str) -> None:
        try:
            got = await fetcher.fetch(url, incoming, head_check=head_check)
            try:
                ext, w, h = await loop.run_in_executor(
                    pool, store_image, got.path, got.sha256, params
                )
            finally:
                # store_image renames or removes the temp body; if it never ran (the job was
                # stopped while it waited in the pool's queue), remove it here.
                with contextlib.suppress(FileNotFoundError):
                    got.path.unlink()
                fetcher.temp_bodies.discard(got.path)
        except FetchFailed as exc:
            results.fail(i, exc.reason, attempts=exc.attempts)
            record_failure(url, exc.reason, exc.attempts, exc.detail or exc)
            progress.update(failed=True)
        except ImageRejected as exc:
            results.fail(i, exc.reason, attempts=got.attempts, nbytes=got.size)
            record_failure(url, exc.reason, got.attempts, exc.detail or exc)
            progress.update(got.size, failed=True)
        else:
            results.ok(i, got.sha256, ext, attempts=got.attempts, nbytes=got.size, from_index=False)
            pending_rows.append((url, got.sha256, ext, got.size, w, h))
            progress.update(got.size)
        await flush()

    async def regen_one(i: int, url: str, hit: IndexRow) -> None:
        try:
            await loop.run_in_executor(pool, regenerate_train_copy, hit.sha256, hit.ext, params)
        except (ImageRejected, FileNotFoundError):
            # The stored original no longer validates (damaged on disk) or vanished: drop it
            # and fetch the URL again, instead of failing it on every future run.
            with contextlib.suppress(FileNotFoundError):
                (params.root / original_rel(hit.sha256, hit.ext)).unlink()
            counts["refetched"] += 1
            await fetch_one(i, url)
            return
        progress.update()

    async def work() -> None:
        while (item := await queue.get()) is not None:
            i, url, hit = item
            await (fetch_one(i, url) if hit is None else regen_one(i, url, hit))

    tasks: list[asyncio.Task[None]] = []
    try:
        if own_fetcher:
            await fetcher.__aenter__()
        try:
            tasks = [asyncio.create_task(produce())]
            tasks += [asyncio.create_task(work()) for _ in range(workers)]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if own_fetcher:
                await fetcher.__aexit__(None, None, None)
        await flush(force=True)
    finally:
        progress.close()
        pool.shutdown(wait=True, cancel_futures=True)
        # Stopped mid-way (SIGTERM, an error): no temp body of ours outlives the job.
        fetcher.remove_temp_bodies()
    stats = {
        "urls": len(urls),
        "from_index": len(urls) - counts["to_fetch"] - counts["refetched"] - counts["refused"],
        "index_refused": counts["refused"],
        "fetched": counts["to_fetch"] + counts["refetched"],
        "train_copies_regenerated": counts["regen"] - counts["refetched"],
        "requests": fetcher.stats.requests,
        "files_read": fetcher.stats.files_read,
        "retries": fetcher.stats.retries,
        "bytes": fetcher.stats.bytes,
    }
    return results, stats


# ---- shard results and the merge --------------------------------------------------------------


def _complete_shard_set(cfg: Config, run: runs.Run) -> list[Path]:
    directory = paths.of(cfg).run(run.model_version).shard_dir
    by_count: dict[int, dict[int, Path]] = {}
    for p in directory.glob("*-of-*.parquet") if directory.exists() else []:
        i_text, _, n_text = p.stem.partition("-of-")
        if i_text.isdigit() and n_text.isdigit():
            by_count.setdefault(int(n_text), {})[int(i_text)] = p
    complete = {n: files for n, files in by_count.items() if set(files) == set(range(n))}
    if not complete:
        if not by_count:
            raise InputError(
                f"no cache shard outputs for run {run.model_version}; run 'airatings cache --shard I/N' "
                "for every shard (or 'airatings cache' unsharded) first"
            )
        n, files = max(by_count.items(), key=lambda kv: len(kv[1]))
        missing = sorted(set(range(n)) - set(files))
        raise InputError(
            f"cache shards {missing} of {n} have not finished for run {run.model_version}; run them, then --merge"
        )
    # Several complete sets (re-sharded): the newest one wins.
    n = max(complete, key=lambda k: max(p.stat().st_mtime for p in complete[k].values()))
    return [complete[n][i] for i in range(n)]


ACTIVE_ROW_GROUP = 16_384  # rows per row group of an active manifest
# Manifest rows the merge reads and joins at a time: the export writes a split as one row group
# (up to ~120k rows), so the batch, not the row group, bounds what one step holds; 4,096 rows
# held 9 MiB less than 16,384 at 100k snapshots (BENCHMARKS.md "Scale").
MERGE_BATCH = 4_096
# an active manifest's columns with a value per row (no dictionary page for them)
_DISTINCT_ACTIVE_COLUMNS = ("firebase_url", "image_sha256", "image_path", "train_image_path")


def _active_batch(rows: pa.RecordBatch | pa.Table, sha: Any, ext: Any, short_side: int) -> pa.Table:
    """Manifest rows whose image cached (``sha``, ``ext``: theirs), with where the image is."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from jobs.manifests import ACTIVE_SCHEMA

    prefix = pc.utf8_slice_codeunits(sha, 0, 2)
    active = rows if isinstance(rows, pa.Table) else pa.Table.from_batches([rows])
    active = active.append_column("image_sha256", sha)
    active = active.append_column(  # original_rel()
        "image_path",
        pc.binary_join_element_wise("images/original/", prefix, "/", sha, ".", ext, ""),
    )
    active = active.append_column(  # train_rel()
        "train_image_path",
        pc.binary_join_element_wise(f"images/train{short_side}/", prefix, "/", sha, ".jpg", ""),
    )
    return active.cast(ACTIVE_SCHEMA)  # exactly the contract training reads


def _write_active(
    path: Path, final: Path, results: pa.Table, keep: Any, pos: Any, short_side: int
) -> int:
    """The active manifest of one split: the manifest at ``path`` streamed in batches (one
    batch of rows in memory, not the split), each row kept by ``keep`` given its result row
    ``pos``, written in row groups of ``ACTIVE_ROW_GROUP`` rows, atomically. Rows in
    snapshot_id order, as the export writes them; a manifest that is not is sorted in memory.
    Returns the rows written."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from jobs.manifests import ACTIVE_SCHEMA, MANIFEST_SCHEMA

    keep = keep.combine_chunks() if isinstance(keep, pa.ChunkedArray) else keep
    pos = pos.combine_chunks() if isinstance(pos, pa.ChunkedArray) else pos
    sha_col, ext_col = results.column("image_sha256"), results.column("ext")
    ids = _read_columns(path, ["snapshot_id"]).column("snapshot_id")
    in_order = len(ids) < 2 or pc.all(pc.less_equal(ids[:-1], ids[1:])).as_py()
    del ids
    written = 0

    def pieces() -> Iterator[pa.Table]:
        if not in_order:  # not the export's order: the whole split, sorted (not expected)
            table = _read_columns(path, MANIFEST_SCHEMA.names).select(MANIFEST_SCHEMA.names)
            kept_pos = pos.filter(keep)
            active = _active_batch(
                table.filter(keep), sha_col.take(kept_pos), ext_col.take(kept_pos), short_side
            )
            yield active.take(pc.sort_indices(active, [("snapshot_id", "ascending")]))
            return
        start = 0
        for batch in pq.ParquetFile(path).iter_batches(
            batch_size=MERGE_BATCH, columns=MANIFEST_SCHEMA.names
        ):
            batch = batch.select(MANIFEST_SCHEMA.names)
            k = keep.slice(start, batch.num_rows)
            kept_pos = pos.slice(start, batch.num_rows).filter(k)
            start += batch.num_rows
            yield _active_batch(
                batch.filter(k), sha_col.take(kept_pos), ext_col.take(kept_pos), short_side
            )

    def check(p: Path) -> None:
        meta = pq.read_metadata(p)  # a footerless file raises here
        if meta.num_rows != written:
            raise InputError(f"{final}: wrote {meta.num_rows} rows, expected {written}")

    # Dictionary pages for the columns with few distinct values only: the URL, hash and path
    # columns are (nearly) all distinct, and building a dictionary for each until it overflows
    # (1 MB a column: ~16k hashes) held more memory than the batch itself.
    few_values = [n for n in ACTIVE_SCHEMA.names if n not in _DISTINCT_ACTIVE_COLUMNS]
    with (
        atomic_path(final, check=check) as tmp,
        pq.ParquetWriter(tmp, ACTIVE_SCHEMA, use_dictionary=few_values) as w,
    ):
        # Row groups of ACTIVE_ROW_GROUP output rows whatever the input batches kept, so the
        # file depends on the rows alone (a 3-shard merge writes a 1-shard merge's bytes).
        pending: list[pa.Table] = []
        held = 0
        for piece in pieces():
            pending.append(piece)
            held += piece.num_rows
            while held >= ACTIVE_ROW_GROUP:
                buffered = pa.concat_tables(pending)
                w.write_table(buffered.slice(0, ACTIVE_ROW_GROUP), row_group_size=ACTIVE_ROW_GROUP)
                written += ACTIVE_ROW_GROUP
                rest = buffered.slice(ACTIVE_ROW_GROUP)
                pending, held = [rest], rest.num_rows
        if held or not written:
            w.write_table(pa.concat_tables(pending or [ACTIVE_SCHEMA.empty_table()]))
            written += held
    return written


def _sorted_results(shard_files: list[Path]) -> pa.Table:
    """The shards' result rows, sorted by URL: each shard file is (``UrlResults`` writes it in
    URL order), so one shard costs no sort; several are one sort of their concatenation."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    results = pa.concat_tables(
        pq.read_table(p, columns=["url", "image_sha256", "ext", "reason", "attempts"])
        for p in shard_files
    ).combine_chunks()  # one chunk: a take from a chunked column would concatenate it each time

    def distinct_ascending(url: Any) -> bool:  # a null compares as null: not ascending
        return len(url) < 2 or bool(pc.all(pc.less(url[:-1], url[1:]), skip_nulls=False).as_py())

    if not distinct_ascending(results.column("url")):
        results = results.take(pc.sort_indices(results.column("url")))
        if not distinct_ascending(results.column("url")):
            raise InputError(
                f"the cache shards of {shard_files[0].parent} list a URL twice (or a null URL); "
                "re-run the cache job for the shards (cached images are not fetched again)"
            )
    return results


def _result_rows(sorted_urls: Any, urls: Any, batch: int = 65_536) -> pa.Array:
    """For each of ``urls`` its row in ``sorted_urls`` (distinct, ascending), null where it is
    absent: a binary search per URL (``search_sorted``), ``batch`` URLs at a time, so no hash
    table of all the URLs is built (``index_in``'s held ~300 bytes of RSS a URL at 100k)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(sorted_urls)
    if n == 0:
        return pa.chunked_array([pa.nulls(len(urls), pa.int32())])
    out = []
    for start in range(0, len(urls), batch):
        part = urls.slice(start, batch)
        at = pc.search_sorted(sorted_urls, part)  # null for a null URL
        at = pc.min_element_wise(at, n - 1)  # past the end: compared (and not equal) below
        same = pc.fill_null(pc.equal(sorted_urls.take(at), part), False)
        rows = pc.if_else(same, at.cast(pa.int32()), None)
        out += rows.chunks if isinstance(rows, pa.ChunkedArray) else [rows]
    return pa.chunked_array(out, pa.int32())


def merge_shards(
    cfg: Config,
    run: runs.Run,
    manifests: dict[str, Path] | None = None,
    *,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Shard results + manifests -> failures.parquet, active manifests, status 'cached'.

    Memory: the shard results' few columns (without their URLs once each manifest row found
    its result) and 4 bytes a manifest row for that position; each manifest is read a column
    or a batch of rows at a time (docs/faults.md 33). ``manifests``: split -> path, verified
    (``verified_manifests``); by default verified here."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from jobs.fetch import redact_url

    log = get_logger()
    manifests = manifests or verified_manifests(cfg, run)
    shard_files = _complete_shard_set(cfg, run)
    # All in Arrow, so a merge of 200k URLs holds columns, not a Python object per row.
    results = _sorted_results(shard_files)
    # Each manifest row's result row (null: no shard has it), from the URL columns alone;
    # then the results' URLs are dropped.
    positions = {}
    for split, path in manifests.items():
        urls = _read_columns(path, ["firebase_url"]).column("firebase_url")
        positions[split] = _result_rows(results.column("url"), urls)
    results = results.drop_columns(["url"])

    short = cfg.cache.train_short_side
    fail_parts: list[pa.Table] = []
    found: dict[str, tuple[Any, Any]] = {}  # split -> (keep, position)
    counts: dict[str, dict[str, int]] = {}
    for split, path in manifests.items():
        cols = _read_columns(path, ["snapshot_id", "firebase_url"])
        urls = cols.column("firebase_url")
        pos = positions.pop(split)
        missing = pc.fill_null(pc.equal(urls, ""), True)  # null or empty: nothing to fetch
        got = pc.and_(
            pc.is_valid(results.column("image_sha256").take(pos)),
            pc.is_valid(results.column("ext").take(pos)),
        )
        keep = pc.and_(pc.invert(missing), got)
        found[split] = (keep, pos)

        lost = pc.invert(keep)
        lost_pos = pos.filter(lost)
        fail_reason = pc.if_else(
            missing.filter(lost),
            "missing_url",
            pc.if_else(
                pc.is_null(lost_pos),
                "not_in_shards",
                pc.fill_null(results.column("reason").take(lost_pos), "unknown"),
            ),
        )
        fail_parts.append(
            pa.table(
                {
                    "snapshot_id": cols.column("snapshot_id").filter(lost),
                    "split": pa.array([split] * len(fail_reason), pa.string()),
                    "url": pa.array(
                        [redact_url(u) for u in urls.filter(lost).to_pylist()], pa.string()
                    ),
                    "reason": fail_reason,
                    "attempts": pc.fill_null(results.column("attempts").take(lost_pos), 0).cast(
                        pa.int32()
                    ),
                }
            )
        )
        kept = pc.sum(keep).as_py() or 0
        counts[split] = {"rows": cols.num_rows, "active": kept, "failed": cols.num_rows - kept}
        del cols, urls

    failures = pa.concat_tables(fail_parts).combine_chunks()
    failures = failures.take(pc.sort_indices(failures, [("snapshot_id", "ascending")]))
    run_paths = paths.of(cfg).run(run.model_version)
    failures_path = run_paths.failures
    atomic_write_parquet(failures, failures_path)

    total = sum(c["rows"] for c in counts.values())
    failed = failures.num_rows
    reasons = dict(Counter(failures.column("reason").to_pylist()).most_common())
    rate = failed / total if total else 1.0
    if total == 0:
        raise InputError(f"run {run.model_version}: the manifests have no rows; nothing to cache")
    if rate > cfg.cache.failure_rate_limit:
        top = ", ".join(f"{k} {v}" for k, v in list(reasons.items())[:5])
        transient = sum(v for k, v in reasons.items() if is_transient_reason(k))
        if transient * 2 > failed:
            # Mostly timeouts, resets, 5xx, 429: the source is struggling, not wrong. Exit 75
            # so the Job is retried later (what is cached now is not fetched again).
            raise TransientError(
                f"{failed} of {total} images failed ({rate:.1%} > cache.failure_rate_limit "
                f"{cfg.cache.failure_rate_limit:.0%}), {transient} of them transient "
                f"(timeouts, connection errors, HTTP 429/5xx): {top}. See {failures_path}. "
                "The image host looks unavailable; re-run later, already cached images are not "
                "fetched again."
            )
        raise InputError(
            f"{failed} of {total} images failed ({rate:.1%} > cache.failure_rate_limit "
            f"{cfg.cache.failure_rate_limit:.0%}); dominant reasons: {top}. See {failures_path}. "
            "Fix the source (or raise the limit) and re-run; already cached images are not fetched again."
        )
    active_files = {}
    for split, path in paths.of(cfg).run(run.model_version).active_manifests.items():
        rows = _write_active(manifests[split], path, results, *found.pop(split), short)
        # what training verifies each file against (and a re-run of this step, to trust it)
        active_files[path.name] = {"rows": rows, "sha256": sha256_file(path)}

    summary = {
        "rows": total,
        "active_rows": total - failed,
        "failed_rows": failed,
        "failure_rate": round(rate, 6),
        "failure_reasons": reasons,
        "splits": counts,
        "shards": len(shard_files),
        "active_dir": str(run_paths.active_dir),
        "failures_path": str(failures_path),
        "images_dir": str(paths.of(cfg).images.root),
        "train_short_side": short,
        "active_files": active_files,
        **(extra or {}),
    }
    # One transaction: each label row marked used or excluded (with the reason) and the status
    # move, so the provenance tables never disagree with the active manifests just written.
    with db.connect(cfg) as conn, conn.transaction():
        summary["labels"] = provenance.record_label_use(
            conn, cfg, run.id, failures, used_rows=total - failed
        )
        runs.set_status(conn, cfg, run.id, "cached", step="cache", summary=summary)
    log.info(
        "active_manifests_written",
        rows=total,
        active_rows=total - failed,
        failed_rows=failed,
        failure_rate=round(rate, 4),
        active_dir=summary["active_dir"],
    )
    return summary


# ---- the job -----------------------------------------------------------------------------------


def _active_problem(cfg: Config, run: runs.Run) -> str | None:
    """Why the run's active manifests are not what its cache step recorded (missing, changed,
    never recorded), or None when every one matches its recorded sha256."""
    recorded = (run.params.get("cache") or {}).get("active_files") or {}
    for path in paths.of(cfg).run(run.model_version).active_manifests.values():
        expected = (recorded.get(path.name) or {}).get("sha256")
        if not path.is_file():
            return f"{path} is missing"
        if not expected:
            return f"{path} has no recorded sha256"
        if sha256_file(path) != expected:
            return f"{path} changed since the cache step wrote it"
    return None


def is_transient_reason(reason: str) -> bool:
    """A failure that may pass on a later run (``jobs.fetch`` retried it and gave up): a
    timeout, a connection error, HTTP 429 or 5xx. ``truncated`` is not counted: it is also the
    decoder's reason for a body that arrived whole but cut short, which will not change."""
    if reason in _TRANSIENT_REASONS:
        return True
    code = reason.removeprefix("http_")
    return reason.startswith("http_") and code.isdigit() and (code == "429" or code[0] == "5")


def _has_complete_shards(cfg: Config, run: runs.Run) -> bool:
    try:
        _complete_shard_set(cfg, run)
    except InputError:
        return False
    return True


def _distinct_urls(manifests: dict[str, Path], shard: tuple[int, int] = (0, 1)) -> ArrowStrings:
    """The manifests' distinct non-empty URLs, sorted, in this shard's share, read one column
    at a time into Arrow (no Python string per URL)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = []
    for path in manifests.values():
        urls = _read_columns(path, ["firebase_url"]).column("firebase_url")
        parts.append(pc.unique(urls.filter(pc.fill_null(pc.not_equal(urls, ""), False))))
    urls = pc.unique(pa.chunked_array(parts, pa.string()))
    urls = urls.take(pc.sort_indices(urls))
    i, n = shard
    if n > 1:
        mine = np.fromiter(
            (shard_of(u, n) == i for u in ArrowStrings(urls)), dtype=bool, count=len(urls)
        )
        urls = urls.filter(pa.array(mine))
    return ArrowStrings(urls)


@contextlib.contextmanager
def _arrow_pool() -> Iterator[None]:
    """Arrow's buffers from jemalloc while the job runs, with decay 0 (the arenas created from
    then on return freed pages at once), where pyarrow has it (its Linux wheels do), else
    from the system allocator; a pool named in ARROW_DEFAULT_MEMORY_POOL wins. The default
    (mimalloc) kept the pages of freed buffers: the merge's per-batch work then held ~700
    bytes a manifest row of freed memory. This sets pyarrow's pool; the one Arrow's own C++
    code uses (Parquet reading and writing) is chosen by ARROW_DEFAULT_MEMORY_POOL, which the
    CLI sets (jobs/cli.py). Measured in bench/bench_scale.py, BENCHMARKS.md "Scale"."""
    import pyarrow as pa

    before = pa.default_memory_pool()
    chosen = os.environ.get("ARROW_DEFAULT_MEMORY_POOL", "")
    if chosen not in ("", "jemalloc"):
        pool = before  # the user's choice: Arrow made it its default
    else:
        try:
            pool = pa.jemalloc_memory_pool()
            pa.jemalloc_set_decay_ms(0)
        except NotImplementedError:
            pool = pa.system_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield
    finally:
        pa.set_memory_pool(before)


def _get_run(cfg: Config, run_ref: str | int) -> runs.Run:
    with db.connect(cfg) as conn:
        return runs.get_run(conn, cfg, run_ref)


def run(
    cfg: Config,
    run_ref: str | int = "latest",
    shard: str | None = None,
    merge: bool = False,
    *,
    env: dict[str, str] | None = None,
    fetcher: Fetcher | None = None,
) -> dict[str, Any]:
    """Cache the images of the run ``run_ref`` names (an id, a model version or "latest";
    this shard's share), then (unsharded, or ``merge``) write the failures and active
    manifests and move the run to ``cached``."""
    with _arrow_pool():
        return _run(cfg, run_ref, shard, merge, env=env, fetcher=fetcher)


def _run(
    cfg: Config,
    run_ref: str | int,
    shard: str | None,
    merge: bool,
    *,
    env: dict[str, str] | None,
    fetcher: Fetcher | None,
) -> dict[str, Any]:
    log = get_logger()
    started = time.monotonic()
    if merge and shard is not None:
        raise InputError("--merge combines all shards; do not pass --shard with it")
    i, n = (0, 1) if merge else parse_shard(shard, os.environ if env is None else env)
    run = _get_run(cfg, run_ref)
    runs.require(run, "exported")
    bind(run_id=run.id, model_version=run.model_version)
    base = {"run_id": run.id, "model_version": run.model_version}

    if merge or n == 1:
        lock_parts: tuple[Any, ...] = ("cache", run.id)
    else:
        lock_parts = ("cache", run.id, "shard", i, n)
    with db.job_lock(cfg, *lock_parts) as held:
        if not held:
            msg = "another cache job holds the lock for this run (and shard); nothing to do"
            log.info("cache_skipped", reason=msg)
            return {**base, "status": "skipped", "reason": msg}
        run = _get_run(cfg, run.id)  # re-read under the lock: a finished twin may have moved it
        if run.reached("cached") and (merge or n == 1):
            # "Already done" is checked, not assumed: the files the status vouches for must be
            # the ones recorded. If not, the merge is redone below (the images are still in
            # the content-addressed store and the index: no downloads).
            problem = _active_problem(cfg, run)
            if problem is None:
                log.info(
                    "cache_already_done",
                    active_dir=str(paths.of(cfg).run(run.model_version).active_dir),
                )
                return {
                    **base,
                    "status": "already_done",
                    "active_dir": str(paths.of(cfg).run(run.model_version).active_dir),
                }
            log.warning("cache_redone", status=run.status, problem=problem)
            # unsharded too: the shard outputs hold every URL's result, so the merge alone
            # rebuilds the files (not even the failed URLs are asked again)
            merge = merge or _has_complete_shards(cfg, run)

        manifests = verified_manifests(cfg, run)
        if merge:
            summary = merge_shards(cfg, run, manifests)
            log.info(
                "images_merged", **{k: v for k, v in summary.items() if not isinstance(v, dict)}
            )
            return {
                **base,
                "status": "cached",
                **summary,
                "seconds": round(time.monotonic() - started, 3),
            }

        # Only what this process or a dead one left (or an unknown owner's, once old): other
        # shards share images/ and may be downloading into it right now.
        swept = sweep_temp(
            paths.of(cfg).images.root,
            foreign_age_s=max(FOREIGN_TEMP_AGE_S, 2 * cfg.cache.total_timeout_s),
        )
        swept += sweep_temp(paths.of(cfg).run(run.model_version).root)
        urls = _distinct_urls(manifests, (i, n))
        log.info("cache_started", urls=len(urls), shard=f"{i}/{n}", swept_temp_files=swept)
        with db.connect(cfg, autocommit=True) as conn:
            results, stats = asyncio.run(
                cache_urls(cfg, urls, index=ImageIndex(cfg, conn), fetcher=fetcher)
            )
        out = paths.of(cfg).run(run.model_version).shard(i, n)
        results.write_parquet(out)
        failed = results.failure_counts()
        shard_summary = {
            **stats,
            "shard": f"{i}/{n}",
            "failed_urls": sum(failed.values()),
            "shard_output": str(out),
        }
        log.info(
            "images_cached",
            **{k: v for k, v in shard_summary.items() if not isinstance(v, dict)},
            failure_reasons=dict(failed),
            seconds=round(time.monotonic() - started, 3),
        )
        if n > 1:
            return {
                **base,
                "status": "shard_done",
                **shard_summary,
                "next": f"after all {n} shards: airatings cache --merge --run {run.model_version}",
            }
        # The fetch phase's structures go before the merge (which verifies the manifests
        # again: the fetch took a while), and the pages they held go back to the OS: Arrow's
        # pool purged, and the system pool's release_unused(), glibc's malloc_trim(0), for
        # every block the process freed (Python objects, the decode threads' Pillow buffers).
        del results, urls, failed
        gc.collect()
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
        pa.system_memory_pool().release_unused()
        summary = merge_shards(cfg, run, extra={"fetch": shard_summary})
        return {
            **base,
            "status": "cached",
            **summary,
            "seconds": round(time.monotonic() - started, 3),
        }
