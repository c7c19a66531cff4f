"""Safe downloads of untrusted URLs (docs/faults.md 10-12), used by the cache and scoring jobs.

- **URL policy** (``UrlPolicy``): allowed schemes only; ``file://`` only when the config allows
  it and only below one root directory; loopback, private, link-local, CGNAT, multicast,
  reserved and IPv4-mapped/-embedded IPv6 targets refused unless the config allows them.
  Three layers, each on every redirect hop (redirects are followed by hand,
  ``allow_redirects=False``, at most ``max_redirects``, never to another scheme than http(s)):

  1. ``UrlPolicy.check_url`` canonicalises the host (``canonical_host``): every numeric IPv4
     spelling the C library accepts (decimal ``2130706433``, octal ``0177.0.0.1``, hex
     ``0x7f.1``, shortened ``127.1``, mixed, trailing dot) is parsed to its address and
     checked; a host ending in a number that is no valid address (``127.0.0.256``) is refused
     as ``invalid_url`` instead of being handed to DNS. The URL that is then connected to
     carries the canonical dotted quad, so no HTTP client or resolver reinterprets it.
  2. Host names are checked on their *resolved* addresses at connect time by
     ``PolicyResolver`` (so DNS rebinding cannot bypass the check).
  3. ``policy_socket_factory`` checks the exact socket address of every new connection
     before ``connect()``, whether or not aiohttp called the resolver (it skips it for hosts
     it takes for IP literals): what is checked is what is connected to.
- **Limits**: one session, a total connection limit and a per-host limit (aiohttp's per-host
  default is unlimited; a request waits for its host's slot before its clock starts), a
  connect timeout and a total per-attempt deadline that also covers the body (``sock_read`` alone lets a server drip one byte a second forever), a size cap
  counted on decompressed bytes with a declared ``Content-Length`` over the cap refused before
  reading.
- **Retries** with tenacity: 429/503 honour ``Retry-After`` (seconds or an HTTP date; malformed
  falls back to backoff; capped); other 5xx, connection resets, truncated bodies and timeouts
  get exponential backoff with full jitter; 4xx (404/403/410 ...) are permanent at once. The
  sleep and the clock are injectable so tests do not wait.

Bodies are streamed to a temp file in the destination directory while being hashed; the
caller validates and renames it. Failures are ``FetchFailed(reason, attempts)`` with reasons
such as ``http_404``, ``timeout``, ``connection_error``, ``truncated``, ``too_large``,
``blocked_url``, ``too_many_redirects``, ``invalid_url``, ``file_not_found``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import ipaddress
import socket
import string
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)
from tenacity.wait import wait_base
from yarl import URL

if TYPE_CHECKING:
    from jobs.config import Config

USER_AGENT = "ai-ratings-cache/1 (image cache for training)"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRY_AFTER_STATUSES = frozenset({429, 503})
_CHUNK = 1 << 16
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# SIIT's IPv4-translated addresses (RFC 2765) carry the IPv4 address in the low 32 bits.
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
# Refused whatever the Python version's ``is_global`` says (older 3.11 releases call these
# global): NAT64 local-use (RFC 8215, any embedding) and the deprecated site-local fec0::/10.
_NEVER_PUBLIC = (ipaddress.ip_network("64:ff9b:1::/48"), ipaddress.ip_network("fec0::/10"))
_OCTAL_DIGITS = frozenset("01234567")
_HEX_DIGITS = frozenset(string.hexdigits)


# ---- outcomes ------------------------------------------------------------------------------


class FetchFailed(Exception):
    """A URL could not be fetched. ``reason`` is a short code recorded in failures.parquet."""

    def __init__(self, reason: str, detail: str = "", attempts: int = 1) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.attempts = attempts


class _Retryable(FetchFailed):
    """Worth another attempt (5xx, 429, reset, timeout); ``retry_after`` in seconds if sent."""

    def __init__(self, reason: str, detail: str = "", retry_after: float | None = None) -> None:
        super().__init__(reason, detail)
        self.retry_after = retry_after


class BlockedAddress(OSError):
    """Raised by the resolver: every address the name resolved to is refused by the policy."""


@dataclass
class Fetched:
    """A body streamed to ``path`` (a temp file the caller owns), with its hash and size."""

    url: str
    path: Path
    sha256: str
    size: int
    attempts: int
    final_url: str


# ---- URL policy ----------------------------------------------------------------------------


def _parse_host_port(text: str) -> tuple[str, int]:
    """'127.0.0.1:8080' or '[::1]:8080' -> (normalised ip, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r}: expected <ip>:<port>")
    host = host.strip("[]")
    return str(ipaddress.ip_address(host)), int(port)


def _ipv4_number(part: str) -> int | None:
    """One part of a numeric IPv4 host as ``inet_aton`` reads it: ``0x`` hex, ``0`` octal,
    else decimal; None if it is not one (``08``, ``0x``, ``0x1g``, ``""``)."""
    if part.startswith("0x"):
        digits, base, allowed = part[2:], 16, _HEX_DIGITS
    elif len(part) > 1 and part.startswith("0"):
        digits, base, allowed = part[1:], 8, _OCTAL_DIGITS
    else:
        digits, base, allowed = part, 10, frozenset(string.digits)
    if not digits or not set(digits) <= allowed:
        return None
    try:
        return int(digits, base)
    except ValueError:  # over int()'s 4,300-digit limit for decimal strings
        return None


def _ends_in_a_number(host: str) -> bool:
    """WHATWG URL's "ends in a number": the last label is decimal digits or ``0x``-hex. Such a
    host is an IPv4 address or invalid, never a name (no top-level domain is numeric)."""
    last = host.rsplit(".", 1)[-1]
    if last.startswith("0x"):
        return set(last[2:]) <= _HEX_DIGITS
    return last != "" and set(last) <= set(string.digits)


def canonical_host(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    """The address a URL host denotes, or the host name (lower-case) if it is a name.

    IPv4 hosts are parsed the way ``inet_aton`` (and so ``getaddrinfo``) reads them: 1 to 4
    dot-separated parts, each decimal, ``0``-octal or ``0x``-hex, the last one filling the
    remaining bytes (``127.1`` is 127.0.0.1, ``2130706433`` too); trailing dots are ignored.
    This is a strict parser of our own because ``socket.inet_aton`` on glibc also accepts
    trailing garbage after a space (``"127.0.0.1 x"``). IPv6 literals (bracketed or not, an
    optional ``%zone`` dropped) are parsed by ``ipaddress``. Raises ``ValueError`` for a host
    that ends in a number but is no valid address (``127.0.0.256``, ``0x1g.0.0.1``, ``1.2.3.4.5``,
    ``example.123``), so such a host is refused rather than given to DNS.
    """
    h = host.lower()
    if not h or any(c.isspace() for c in h):
        raise ValueError(f"{host!r}: empty host or whitespace in it")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if ":" in h:
        return ipaddress.IPv6Address(h.split("%", 1)[0])
    h = h.rstrip(".")
    if not h:
        raise ValueError(f"{host!r}: empty host")
    if not _ends_in_a_number(h):
        return host.lower()
    parts = h.split(".")
    if len(parts) > 4:
        raise ValueError(f"{host!r}: more than 4 parts")
    value = 0
    for i, part in enumerate(parts):
        n = _ipv4_number(part)
        if n is None:
            raise ValueError(f"{host!r}: {part!r} is not a number")
        if i < len(parts) - 1:  # a leading part is one byte
            if n > 255:
                raise ValueError(f"{host!r}: {part!r} is over 255")
            value += n << (8 * (3 - i))
        else:  # the last part fills the bytes that are left
            if n >= 256 ** (4 - i):
                raise ValueError(f"{host!r}: {part!r} is out of range")
            value += n
    return ipaddress.IPv4Address(value)


def embedded_ipv4(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | None:
    """The IPv4 address carried inside an IPv6 one (mapped, IPv4-compatible, IPv4-translated,
    6to4, NAT64, Teredo), if any."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or ip in _IPV4_TRANSLATED or int(ip) >> 32 == 0:
        # NAT64, SIIT's ``::ffff:0:a.b.c.d``, or the deprecated IPv4-compatible form
        # ``::a.b.c.d`` (``::/96``), which some stacks still route to the IPv4 address:
        # ``[::127.0.0.1]`` is loopback.
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable unicast: not loopback, private, link-local, CGNAT, reserved, multicast."""
    inner = embedded_ipv4(ip)
    if inner is not None and not is_public_address(inner):
        return False
    if ip.version == 6 and any(ip in net for net in _NEVER_PUBLIC):
        return False
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class UrlPolicy:
    schemes: frozenset[str] = frozenset({"https", "http"})
    allow_private: bool = False
    # Exact (ip, port) pairs allowed although not public: a local mirror, or a test server.
    allowed_private: frozenset[tuple[str, int]] = frozenset()
    file_root: Path | None = None  # file:// allowed only below this directory (None: refused)
    max_bytes: int = 25_000_000
    max_redirects: int = 3

    @classmethod
    def from_config(cls, cfg: Config) -> UrlPolicy:
        c = cfg.cache
        schemes = {"https", "http"}
        file_root = None
        if c.allow_file_urls:
            schemes.add("file")
            file_root = Path(c.file_root or cfg.data_dir).resolve()
        return cls(
            schemes=frozenset(schemes),
            allow_private=c.allow_private_networks,
            allowed_private=frozenset(_parse_host_port(h) for h in c.allowed_private_hosts),
            file_root=file_root,
            max_bytes=c.max_bytes,
            max_redirects=c.max_redirects,
        )

    def address_allowed(self, ip_text: str, port: int) -> bool:
        ip = ipaddress.ip_address(ip_text.split("%", 1)[0])
        if self.allow_private or is_public_address(ip):
            return True
        return (str(ip), port) in self.allowed_private

    def check_url(self, url: URL, *, hop: bool = False) -> None:
        """Scheme, host and (for hosts that are addresses, in any spelling) address checks
        before any connection. Raises ``FetchFailed`` (``blocked_url`` / ``invalid_url``)."""
        self.checked_url(url, hop=hop)

    def checked_url(self, url: URL, *, hop: bool = False) -> URL:
        """``check_url``, returning the URL to connect to: ``url`` itself, or with a numeric
        IPv4 host in another spelling (``0x7f.1``) rewritten to its dotted quad, so what is
        connected to is exactly the address that was checked."""
        scheme = (url.scheme or "").lower()
        if scheme not in self.schemes or (hop and scheme not in ("http", "https")):
            raise FetchFailed("blocked_url", f"scheme {scheme or '<none>'!r} is not allowed")
        if scheme == "file":
            return url
        host = url.raw_host
        if not host:
            raise FetchFailed("invalid_url", "no host")
        if url.user is not None or url.password is not None:
            raise FetchFailed("blocked_url", "credentials in URL")
        try:
            target = canonical_host(host)
        except ValueError:
            raise FetchFailed("invalid_url", f"host {host!r} is not a valid address") from None
        if isinstance(target, str):
            return url  # a name: checked on its resolved addresses at connect time
        port = url.port or (443 if scheme == "https" else 80)
        if not self.address_allowed(str(target), port):
            raise FetchFailed("blocked_url", f"address {target} is not public")
        if target.version == 4 and host != str(target):
            return url.with_host(str(target))
        return url

    def file_path(self, url: URL) -> Path:
        """The local file a file:// URL names, if it lies under ``file_root``."""
        if self.file_root is None:
            raise FetchFailed("blocked_url", "file:// URLs are not allowed")
        if url.host not in (None, "", "localhost"):
            raise FetchFailed("blocked_url", "file:// URL with a remote host")
        path = Path(unquote(url.path))
        if not path.is_absolute():
            raise FetchFailed("invalid_url", "file:// path is not absolute")
        resolved = path.resolve()
        if not resolved.is_relative_to(self.file_root):
            raise FetchFailed("blocked_url", "file:// path outside the allowed directory")
        return resolved


class PolicyResolver(AbstractResolver):
    """Resolves with the system resolver, then drops every address the policy refuses.

    Runs at connect time for every connection (and every redirect hop), so what is checked is
    what is connected to. No address left: ``BlockedAddress``.
    """

    def __init__(self, policy: UrlPolicy) -> None:
        self._policy = policy
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if self._policy.address_allowed(r["host"], port)]
        if not allowed:
            raise BlockedAddress(f"{host} resolves only to refused addresses")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def policy_socket_factory(policy: UrlPolicy) -> aiohttp.SocketFactoryType:
    """A ``TCPConnector(socket_factory=...)`` that refuses, before ``connect()``, a socket
    address the policy does not allow. aiohttp calls it for every new connection with the
    exact address it will connect to, including for hosts it took for IP literals and never
    gave to the resolver. Only canonical literals pass: a host the kernel would still have to
    parse or resolve (``2130706433``, a name) is refused here."""

    def make_socket(addr_info: aiohttp.AddrInfoType) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        host, port = str(sockaddr[0]), int(sockaddr[1])
        try:
            allowed = policy.address_allowed(host, port)
        except ValueError:
            allowed = False
        if not allowed:
            raise BlockedAddress(f"connection to {host} refused by the URL policy")
        return socket.socket(family=family, type=type_, proto=proto)

    return make_socket


def redact_url(url: str | None) -> str:
    """The URL without credentials, query string or fragment (tokens live there)."""
    if not url:
        return ""
    try:
        u = URL(url)
    except (ValueError, TypeError):
        return "<unparseable>"
    redacted = u.with_user(None).with_fragment(None) if u.is_absolute() else u.with_fragment(None)
    text = str(redacted.with_query(None))
    return text + "?<redacted>" if u.raw_query_string else text


# ---- Retry-After ---------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP date); None if malformed."""
    if value is None:
        return None
    v = value.strip()
    if v.isascii() and v.isdigit():
        # float(), not int(): "²".isdigit() is True (hence isascii) and int() refuses strings
        # over 4,300 digits; a huge value becomes inf, which the wait caps.
        return float(v)
    try:
        dt = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError, IndexError):
        return None
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return max(0.0, dt.timestamp() - now)


class wait_retry_after(wait_base):  # noqa: N801 - tenacity's naming
    """The server's Retry-After (capped) when it sent one, else the fallback wait."""

    def __init__(self, fallback: wait_base, cap: float) -> None:
        self.fallback = fallback
        self.cap = cap

    def __call__(self, retry_state: Any) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        after = getattr(exc, "retry_after", None)
        if after is not None:
            return min(float(after), self.cap)
        return self.fallback(retry_state)


# ---- the fetcher ---------------------------------------------------------------------------


@dataclass
class FetchStats:
    requests: int = 0  # HTTP responses received (each attempt and each redirect hop)
    files_read: int = 0  # file:// reads
    bytes: int = 0
    retries: int = 0
    connect_attempts: int = 0  # new connections begun (before name resolution)
    connections: int = 0  # new connections established
    status_counts: dict[int, int] = field(default_factory=dict)


class Fetcher:
    """One aiohttp session with the policy, limits and retries. Use as an async context manager."""

    def __init__(
        self,
        policy: UrlPolicy,
        *,
        concurrency: int = 64,
        per_host: int = 16,
        connect_timeout_s: float = 10.0,
        total_timeout_s: float = 60.0,
        max_attempts: int = 4,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        retry_after_cap_s: float = 120.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.concurrency = concurrency
        self.per_host = per_host
        self.connect_timeout_s = connect_timeout_s
        self.total_timeout_s = total_timeout_s
        self.max_attempts = max_attempts
        self.sleep = sleep
        self.now = now
        self.wait = wait_retry_after(
            wait_random_exponential(multiplier=backoff_base_s, max=backoff_max_s), retry_after_cap_s
        )
        self.stats = FetchStats()
        # Every temp body this fetcher created. The consumer renames or removes each one; a job
        # stopped mid-way calls remove_temp_bodies() to delete the ones nobody took over.
        self.temp_bodies: set[Path] = set()
        self._session: aiohttp.ClientSession | None = None
        self._host_slots: dict[tuple[str, int | None], asyncio.Semaphore] = {}

    @contextlib.contextmanager
    def _temp_body(self, dest_dir: Path) -> Iterator[Path]:
        """A new temp path for a body in ``dest_dir``, registered for remove_temp_bodies();
        removed again if writing it fails."""
        from jobs.artifacts import temp_path_for

        dest_dir.mkdir(parents=True, exist_ok=True)
        # An owned name (host, pid): another shard's sweep leaves it alone while we live.
        tmp = temp_path_for(dest_dir / "body.part")
        self.temp_bodies.add(tmp)
        try:
            yield tmp
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def remove_temp_bodies(self) -> int:
        """Delete the temp bodies still on disk (not renamed or removed by a consumer: the job
        was stopped between the download and the store). Only this fetcher's own files, so a
        concurrent shard's in-flight downloads are untouched. Returns how many were removed."""
        removed = 0
        for path in list(self.temp_bodies):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
            self.temp_bodies.discard(path)
        return removed

    def _host_slot(self, url: URL) -> asyncio.Semaphore:
        """A per-host slot taken *before* the attempt's deadline starts: with many URLs on one
        host (Firebase Storage serves them all) the waiting happens here, not in aiohttp's
        pool queue, where it would count against the connect and total timeouts and turn a
        busy host into spurious ``timeout`` failures."""
        key = ((url.host or "").lower(), url.port)
        slot = self._host_slots.get(key)
        if slot is None:
            slot = self._host_slots[key] = asyncio.Semaphore(self.per_host)
        return slot

    @classmethod
    def from_config(cls, cfg: Config, **kw: Any) -> Fetcher:
        c = cfg.cache
        return cls(
            UrlPolicy.from_config(cfg),
            concurrency=c.concurrency,
            per_host=c.per_host,
            connect_timeout_s=c.connect_timeout_s,
            total_timeout_s=c.total_timeout_s,
            max_attempts=c.max_attempts,
            backoff_base_s=c.backoff_base_s,
            backoff_max_s=c.backoff_max_s,
            retry_after_cap_s=c.retry_after_cap_s,
            **kw,
        )

    async def __aenter__(self) -> Fetcher:
        connector = aiohttp.TCPConnector(
            limit=self.concurrency,
            limit_per_host=self.per_host,
            resolver=PolicyResolver(self.policy),
            socket_factory=policy_socket_factory(self.policy),
            ttl_dns_cache=10,
        )
        trace = aiohttp.TraceConfig()

        async def on_connect_start(*_: Any) -> None:
            self.stats.connect_attempts += 1

        async def on_connect_end(*_: Any) -> None:
            self.stats.connections += 1

        trace.on_connection_create_start.append(on_connect_start)
        trace.on_connection_create_end.append(on_connect_end)
        self._session = aiohttp.ClientSession(
            connector=connector,
            trace_configs=[trace],
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self.connect_timeout_s, sock_connect=self.connect_timeout_s
            ),
            headers={"User-Agent": USER_AGENT, "Accept": "image/*"},
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,  # no proxy from the environment: the policy sees the real target
            auto_decompress=True,  # the size cap counts decompressed bytes
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(
        self,
        url: str,
        dest_dir: Path,
        *,
        head_check: Callable[[bytes], str | None] | None = None,
    ) -> Fetched:
        """Download ``url`` into a temp file in ``dest_dir``; raises ``FetchFailed``.

        ``head_check(first_bytes)`` may return a failure reason (e.g. ``not_an_image``) to stop
        reading a body that is clearly not what we want.
        """
        try:
            parsed = URL(url)
        except (ValueError, TypeError) as exc:
            raise FetchFailed("invalid_url", str(exc)) from None
        target = self.policy.checked_url(parsed)  # the URL to connect to (canonical host)
        if target.scheme == "file":
            self.stats.files_read += 1
            return await asyncio.to_thread(self._read_file, url, target, dest_dir, head_check)

        attempts = 0
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=self.wait,
            retry=retry_if_exception_type(_Retryable),
            sleep=self.sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    if attempts > 1:
                        self.stats.retries += 1
                    async with self._host_slot(target):  # not held while backing off
                        result = await self._attempt(target, dest_dir, head_check)
                    result.attempts = attempts
                    result.url = str(parsed)  # the URL as asked for, whatever was connected to
                    return result
        except FetchFailed as exc:
            exc.attempts = attempts
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(
        self, url: URL, dest_dir: Path, head_check: Callable[[bytes], str | None] | None
    ) -> Fetched:
        assert self._session is not None, "use 'async with Fetcher(...)'"
        try:
            async with asyncio.timeout(self.total_timeout_s):
                current = url
                for _hop in range(self.policy.max_redirects + 1):
                    async with self._session.get(current, allow_redirects=False) as resp:
                        self.stats.requests += 1  # counted once a server answered
                        status = resp.status
                        self.stats.status_counts[status] = (
                            self.stats.status_counts.get(status, 0) + 1
                        )
                        if status in REDIRECT_STATUSES:
                            location = resp.headers.get("Location")
                            if not location:
                                raise FetchFailed(f"http_{status}", "redirect without Location")
                            try:
                                nxt = current.join(URL(location))
                            except (ValueError, TypeError) as exc:
                                raise FetchFailed("invalid_url", f"bad redirect: {exc}") from None
                            current = self.policy.checked_url(nxt, hop=True)
                            continue
                        if status in RETRY_AFTER_STATUSES:
                            after = parse_retry_after(resp.headers.get("Retry-After"), self.now())
                            raise _Retryable(f"http_{status}", retry_after=after)
                        if status >= 500:
                            raise _Retryable(f"http_{status}")
                        if status != 200:
                            raise FetchFailed(f"http_{status}")
                        return await self._read_body(resp, url, current, dest_dir, head_check)
                raise FetchFailed("too_many_redirects", f"more than {self.policy.max_redirects}")
        except FetchFailed:
            raise
        except TimeoutError:
            raise _Retryable("timeout", f"over {self.total_timeout_s:g}s") from None
        except aiohttp.ClientConnectorError as exc:
            if _caused_by(exc, BlockedAddress):
                raise FetchFailed("blocked_url", "resolved to a refused address") from None
            raise _Retryable("connection_error", str(exc)) from None
        except aiohttp.ClientPayloadError as exc:
            raise _Retryable("truncated", str(exc)) from None
        except aiohttp.InvalidURL as exc:
            raise FetchFailed("invalid_url", str(exc)) from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise _Retryable("connection_error", f"{type(exc).__name__}: {exc}") from None

    async def _read_body(
        self,
        resp: aiohttp.ClientResponse,
        url: URL,
        final: URL,
        dest_dir: Path,
        head_check: Callable[[bytes], str | None] | None,
    ) -> Fetched:
        cap = self.policy.max_bytes
        declared = resp.content_length
        if declared is not None and declared > cap:
            raise FetchFailed("too_large", f"Content-Length {declared} > {cap}")
        h = hashlib.sha256()
        size = 0
        head = b""
        with self._temp_body(dest_dir) as tmp:
            with open(tmp, "wb") as f:
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    size += len(chunk)
                    if size > cap:
                        raise FetchFailed("too_large", f"body over {cap} bytes (decompressed)")
                    if head_check is not None and len(head) < 16:
                        head += chunk[: 16 - len(head)]
                        if len(head) >= 16 and (reason := head_check(head)):
                            raise FetchFailed(reason, "rejected by its first bytes")
                    h.update(chunk)
                    f.write(chunk)
            if head_check is not None and len(head) < 16 and (reason := head_check(head)):
                raise FetchFailed(reason, "rejected by its first bytes")
        self.stats.bytes += size
        return Fetched(str(url), tmp, h.hexdigest(), size, 1, str(final))

    def _read_file(
        self,
        url: str,
        parsed: URL,
        dest_dir: Path,
        head_check: Callable[[bytes], str | None] | None,
    ) -> Fetched:
        path = self.policy.file_path(parsed)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise FetchFailed("file_not_found") from None
        except OSError as exc:
            raise FetchFailed("file_not_found", str(exc)) from None
        if not path.is_file():
            raise FetchFailed("blocked_url", "not a regular file")
        if st.st_size > self.policy.max_bytes:
            raise FetchFailed("too_large", f"{st.st_size} > {self.policy.max_bytes}")
        h = hashlib.sha256()
        size = 0
        with self._temp_body(dest_dir) as tmp:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                first = True
                while chunk := src.read(1 << 20):
                    size += len(chunk)
                    if size > self.policy.max_bytes:
                        raise FetchFailed("too_large", f"over {self.policy.max_bytes} bytes")
                    if first and head_check is not None and (reason := head_check(chunk[:16])):
                        raise FetchFailed(reason, "rejected by its first bytes")
                    first = False
                    h.update(chunk)
                    dst.write(chunk)
            if first and head_check is not None and (reason := head_check(b"")):
                raise FetchFailed(reason, "empty file")
        self.stats.bytes += size
        return Fetched(url, tmp, h.hexdigest(), size, 1, url)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, kind) or isinstance(getattr(cur, "os_error", None), kind):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False
