"""jobs.fetch against a real aiohttp server on loopback with fault endpoints.

Only the test server's exact ip:port is allowed although private; every blocked case below is
really refused by the policy (nothing else on loopback is allowed). Sleep and clock are
injected, so retries do not wait.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
from cache_fixtures import Server, jpeg, start_server
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from jobs.fetch import (
    BlockedAddress,
    Fetcher,
    FetchFailed,
    UrlPolicy,
    canonical_host,
    parse_retry_after,
    policy_socket_factory,
    redact_url,
)
from jobs.images import sniff_format

NOW = 1_800_000_000.0


class Sleeps(list):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


def not_image(head: bytes) -> str | None:
    return None if sniff_format(head) else "not_an_image"


def policy(srv: Server, **kw) -> UrlPolicy:
    base = {
        "allowed_private": frozenset({("127.0.0.1", srv.port)}),
        "max_bytes": 1_000_000,
        "max_redirects": 3,
    }
    return UrlPolicy(**{**base, **kw})


def fetch(srv: Server, url: str, dest: Path, *, pol: UrlPolicy | None = None, **kw):
    """Run one fetch; returns (Fetched or FetchFailed, sleeps, fetcher)."""
    sleeps = Sleeps()
    opts = {
        "max_attempts": 3,
        "backoff_base_s": 0.5,
        "backoff_max_s": 8,
        "retry_after_cap_s": 60,
        "total_timeout_s": 5,
        "connect_timeout_s": 2,
        **kw,
    }

    async def go():
        async with Fetcher(pol or policy(srv), sleep=sleeps, now=lambda: NOW, **opts) as f:
            try:
                return await f.fetch(url, dest, head_check=not_image), f
            except FetchFailed as exc:
                return exc, f

    out, fetcher = asyncio.run(go())
    return out, sleeps, fetcher


def nothing_left(dest: Path) -> bool:
    return not dest.exists() or not any(dest.iterdir())


def failed(out, reason: str, attempts: int | None = None) -> bool:
    assert isinstance(out, FetchFailed), out
    assert out.reason == reason, (out.reason, out.detail)
    if attempts is not None:
        assert out.attempts == attempts
    return True


def test_ok_streams_to_a_temp_file_with_hash(server: Server, tmp_path: Path) -> None:
    import hashlib

    data = jpeg(100, 80)
    out, sleeps, f = fetch(server, server.add("ok.jpg", data), tmp_path)
    assert out.path.read_bytes() == data and out.sha256 == hashlib.sha256(data).hexdigest()
    assert out.attempts == 1 and sleeps == [] and f.stats.requests == 1 and f.stats.connections == 1
    assert out.path.parent == tmp_path and out.path.name.startswith(".tmp-")


@pytest.mark.parametrize("code", [404, 403, 410, 400, 451])
def test_4xx_is_permanent_at_once(server: Server, tmp_path: Path, code: int) -> None:
    out, sleeps, f = fetch(server, server.url(f"/status/{code}"), tmp_path)
    assert failed(out, f"http_{code}", attempts=1)
    assert sleeps == [] and server.hits[f"/status/{code}"] == 1 and nothing_left(tmp_path)


def test_500_then_200_retries_with_full_jitter(server: Server, tmp_path: Path) -> None:
    server.add("f.jpg", jpeg(50, 50))
    out, sleeps, _ = fetch(server, server.url("/flaky/a/2/500/f.jpg"), tmp_path)
    assert out.attempts == 3 and out.size > 0
    assert (
        len(sleeps) == 2 and 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 1.0
    )  # uniform(0, base*2^n)


def test_persistent_5xx_gives_up_after_max_attempts(server: Server, tmp_path: Path) -> None:
    out, sleeps, _ = fetch(server, server.url("/status/502"), tmp_path, max_attempts=4)
    assert failed(out, "http_502", attempts=4)
    assert len(sleeps) == 3 and server.hits["/status/502"] == 4 and nothing_left(tmp_path)


@pytest.mark.parametrize(
    "value,expected",
    [
        ("7", 7.0),
        (email.utils.format_datetime(datetime.fromtimestamp(NOW + 30, UTC), usegmt=True), 30.0),
        (email.utils.format_datetime(datetime.fromtimestamp(NOW - 30, UTC), usegmt=True), 0.0),
        ("99999", 60.0),  # capped
        ("9" * 5000, 60.0),  # over int()'s 4,300-digit limit: capped, not a crash
        ("soon", None),  # malformed -> backoff
        ("-5", None),
    ],
)
def test_429_honours_retry_after(
    server: Server, tmp_path: Path, value: str, expected: float | None
) -> None:
    from urllib.parse import quote

    server.add("r.jpg", jpeg(40, 40))
    key = abs(hash(value))
    out, sleeps, _ = fetch(
        server, server.url(f"/retry-after/{key}/x/r.jpg?v={quote(value)}"), tmp_path
    )
    assert out.attempts == 2 and len(sleeps) == 1
    if expected is None:
        assert 0 <= sleeps[0] <= 0.5
    else:
        assert sleeps[0] == pytest.approx(expected, abs=1e-6)


def test_503_honours_retry_after_too(server: Server, tmp_path: Path) -> None:
    server.add("u.jpg", jpeg(40, 40))
    out, sleeps, _ = fetch(server, server.url("/retry-after/503/x/u.jpg?v=7&code=503"), tmp_path)
    assert (
        out.attempts == 2
        and sleeps == [7.0]
        and server.hits["/retry-after/503/x/u.jpg?v=7&code=503"] == 2
    )


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after("120", NOW) == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", NOW) == 0.0  # in the past
    assert parse_retry_after("", NOW) is None and parse_retry_after(None, NOW) is None
    assert parse_retry_after("1.5", NOW) is None
    # Unicode digits pass str.isdigit() but are not delta-seconds (int("²") raises)
    assert parse_retry_after("²", NOW) is None and parse_retry_after("١٢", NOW) is None


def test_slow_drip_hits_the_total_deadline(server: Server, tmp_path: Path) -> None:
    out, sleeps, _ = fetch(
        server, server.url("/drip"), tmp_path, total_timeout_s=0.6, max_attempts=2
    )
    assert failed(out, "timeout", attempts=2) and nothing_left(tmp_path)


def test_body_shorter_than_declared_is_truncated(server: Server, tmp_path: Path) -> None:
    out, sleeps, _ = fetch(server, server.url("/short-body"), tmp_path, max_attempts=2)
    assert failed(out, "truncated", attempts=2) and nothing_left(tmp_path)


def test_gzip_bomb_is_capped_on_decompressed_bytes(server: Server, tmp_path: Path) -> None:
    out, _, f = fetch(server, server.url("/gzip-bomb"), tmp_path)
    assert failed(out, "too_large", attempts=1) and nothing_left(tmp_path)
    assert f.stats.bytes == 0


def test_declared_length_over_the_cap_is_refused_early(server: Server, tmp_path: Path) -> None:
    out, _, _ = fetch(server, server.url("/huge-declared"), tmp_path)
    assert (
        failed(out, "too_large", attempts=1)
        and "Content-Length" in out.detail
        and nothing_left(tmp_path)
    )


@pytest.mark.parametrize("path", ["/html", "/json-as-jpeg"])
def test_200_but_not_an_image(server: Server, tmp_path: Path, path: str) -> None:
    out, _, _ = fetch(server, server.url(path), tmp_path)
    assert failed(out, "not_an_image", attempts=1) and nothing_left(tmp_path)


def test_redirect_is_followed_by_hand_and_checked(server: Server, tmp_path: Path) -> None:
    target = server.add("t.jpg", jpeg(30, 30))
    out, _, f = fetch(server, server.url(f"/redirect?to={target}"), tmp_path)
    assert out.final_url == target and f.stats.requests == 2


@pytest.mark.parametrize(
    "to",
    [
        "http://127.0.0.1:{other}/img/t.jpg",  # loopback, not the allowed port
        "http://localhost:{other}/img/t.jpg",  # a name: refused on its resolved address
        "http://[::ffff:127.0.0.1]:{port}/img/t.jpg",  # IPv4-mapped
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/x.jpg",
        "http://100.64.0.1/x.jpg",
        "file:///etc/passwd",
        "ftp://example.com/x.jpg",
    ],
)
def test_redirect_to_a_refused_target_is_blocked(server: Server, tmp_path: Path, to: str) -> None:
    from urllib.parse import quote

    server.add("t.jpg", jpeg(30, 30))
    target = to.format(port=server.port, other=server.port + 1 if server.port < 65535 else 1)
    # file:// is refused on a hop even when file URLs are otherwise allowed
    pol = policy(server, schemes=frozenset({"http", "https", "file"}), file_root=Path("/"))
    out, _, f = fetch(
        server, server.url(f"/redirect?to={quote(target, safe='')}"), tmp_path, pol=pol
    )
    assert failed(out, "blocked_url", attempts=1) and nothing_left(tmp_path)
    assert f.stats.requests == 1  # only the redirect itself reached any server
    assert f.stats.connections <= 1  # the one to the test server (a pooled one may be reused)


def test_redirect_loop_stops(server: Server, tmp_path: Path) -> None:
    out, _, f = fetch(server, server.url("/loop/0"), tmp_path)
    assert failed(out, "too_many_redirects", attempts=1) and f.stats.requests == 4


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::1]/",
        "http://127.0.0.1/",
        "http://0.0.0.0/",
        "http://192.168.1.1/",
        "http://[fd00::1]/",
        "http://[64:ff9b::7f00:1]/",  # NAT64 of 127.0.0.1
        "http://[::127.0.0.1]/",  # IPv4-compatible (deprecated) form of 127.0.0.1
        "http://[::a9fe:a9fe]/",  # ... and of 169.254.169.254
        "https://user:pw@example.com/x.jpg",
        "javascript:alert(1)",
        "file:///etc/passwd",  # file URLs not allowed by this policy
    ],
)
def test_refused_before_any_connection(server: Server, tmp_path: Path, url: str) -> None:
    out, _, f = fetch(server, url, tmp_path)
    assert failed(out, "blocked_url") and nothing_left(tmp_path)
    assert f.stats.requests == 0 and f.stats.connect_attempts == 0  # refused before connecting


def test_loopback_name_is_refused_on_its_resolved_address(server: Server, tmp_path: Path) -> None:
    server.add("n.jpg", jpeg(30, 30))
    # The server is up and listening; only the allowance is missing.
    out, _, _ = fetch(
        server,
        f"http://localhost:{server.port}/img/n.jpg",
        tmp_path,
        pol=policy(server, allowed_private=frozenset()),
    )
    assert failed(out, "blocked_url") and server.hits["/img/n.jpg"] == 0
    ok, _, _ = fetch(server, f"http://localhost:{server.port}/img/n.jpg", tmp_path)
    assert not isinstance(ok, FetchFailed) and server.hits["/img/n.jpg"] == 1


def test_file_urls_stay_under_their_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg(30, 30))
    (root / "notes.txt").write_text("hello")
    (root / "big.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 2_000_000)
    (root / "link.jpg").symlink_to("/etc/passwd")
    dest = tmp_path / "dest"
    pol = UrlPolicy(
        schemes=frozenset({"http", "https", "file"}), file_root=root.resolve(), max_bytes=1_000_000
    )
    srv = Server(base="", port=0)
    ok, _, _ = fetch(srv, (root / "a.jpg").as_uri(), dest, pol=pol)
    assert ok.size == len((root / "a.jpg").read_bytes())
    ok.path.unlink()
    cases = {
        "file:///etc/passwd": "blocked_url",
        (root / "link.jpg").as_uri(): "blocked_url",  # symlink out of the root
        (root / "notes.txt").as_uri(): "not_an_image",
        (root / "big.jpg").as_uri(): "too_large",
        (root / "missing.jpg").as_uri(): "file_not_found",
        f"file://{root}/../../etc/passwd": "blocked_url",
    }
    for url, reason in cases.items():
        out, _, _ = fetch(srv, url, dest, pol=pol)
        assert failed(out, reason), url
    # With the whole filesystem as root, /etc/passwd still fails validation.
    out, _, _ = fetch(
        srv, "file:///etc/passwd", dest, pol=UrlPolicy(schemes=pol.schemes, file_root=Path("/"))
    )
    assert failed(out, "not_an_image")
    assert nothing_left(dest)


def test_per_host_limit_holds(server: Server, tmp_path: Path) -> None:
    server.add("s.jpg", jpeg(20, 20))
    urls = [server.url(f"/slow/s.jpg?i={i}") for i in range(12)]

    async def go():
        async with Fetcher(policy(server), concurrency=20, per_host=3) as f:
            return await asyncio.gather(*(f.fetch(u, tmp_path) for u in urls))

    results = asyncio.run(go())
    assert len(results) == 12 and all(r.size for r in results)
    assert server.max_active == 3  # never more than 3 at once, and the limit was reached


def test_waiting_for_a_busy_host_does_not_count_against_the_deadline(
    server: Server, tmp_path: Path
) -> None:
    # 12 URLs on one host, 2 at a time, 0.15 s each: the last waits ~0.9 s for a slot. The
    # connect (0.3 s) and total (0.5 s) deadlines bound each request, not its wait in line.
    server.add("q.jpg", jpeg(20, 20))
    urls = [server.url(f"/slow/q.jpg?i={i}") for i in range(12)]

    async def go():
        async with Fetcher(
            policy(server),
            concurrency=20,
            per_host=2,
            connect_timeout_s=0.3,
            total_timeout_s=0.5,
            max_attempts=1,
        ) as f:
            return await asyncio.gather(
                *(f.fetch(u, tmp_path) for u in urls), return_exceptions=True
            )

    results = asyncio.run(go())
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert server.max_active == 2


def test_redact_url_drops_tokens() -> None:
    assert (
        redact_url("https://u:p@h.example/a/b.jpg?token=secret#x")
        == "https://h.example/a/b.jpg?<redacted>"
    )
    assert redact_url("https://h.example/a.jpg") == "https://h.example/a.jpg"
    assert "secret" not in redact_url("https://h/x?alt=media&token=secret")
    assert URL(redact_url("http://h/x.jpg")).host == "h"


# ---- every spelling of an address (docs/faults.md 26) -----------------------------------------


def refusal(url: str, pol: UrlPolicy | None = None) -> str | None:
    """The reason ``fetch`` would refuse ``url`` before connecting, or None if it would go on."""
    try:
        parsed = URL(url)
    except ValueError:
        return "invalid_url"
    try:
        (pol or UrlPolicy()).check_url(parsed)
    except FetchFailed as exc:
        return exc.reason
    return None


LOOPBACK_SPELLINGS = [
    "2130706433",  # decimal
    "0177.0.0.1",  # octal
    "00000000177.0.0.01",  # octal, many leading zeros
    "0x7f.0.0.1",  # hex part
    "0X7F.0.0.1",  # upper-case hex
    "0x7f000001",  # hex whole
    "0x00000000007f.1",  # hex, leading zeros, shortened
    "127.1",  # shortened (2 parts)
    "127.0.1",  # shortened (3 parts)
    "0x7f.1",  # hex, shortened
    "0177.0x0.1",  # mixed octal, hex, decimal
    "127.0.0.1.",  # trailing dot
    "127.0.0.1..",  # trailing dots (aiohttp keeps one)
    "0x7f.1.",  # hex, shortened, trailing dot
]


@pytest.mark.parametrize(
    "url",
    [f"http://{h}/" for h in LOOPBACK_SPELLINGS]
    + [
        "http://10.1/",  # 10.0.0.1
        "http://0/",  # 0.0.0.0
        "http://0x0/",
        "http://2852039166/",  # 169.254.169.254
        "http://0xa9fea9fe/",
        "http://0251.0376.0251.0376/",
        "http://169.16689662/",  # 169.254.169.254, shortened
        "http://3232235777/",  # 192.168.1.1
        "http://100.64.1/",  # CGNAT 100.64.0.1
        "http://0x7f.1:8080/x.jpg",
        "https://2130706433/x.jpg",
        "http://[::ffff:127.0.0.1]/",  # IPv4-mapped
        "http://[::ffff:7f00:1]/",
        "http://[::FFFF:169.254.169.254]/",
        "http://[::127.0.0.1]/",  # IPv4-compatible
        "http://[::7f00:1]/",
        "http://[::ffff:0:7f00:1]/",  # IPv4-translated (SIIT)
        "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
        "http://[2002:a9fe:a9fe::1]/",  # 6to4 of 169.254.169.254
        "http://[64:ff9b::127.0.0.1]/",  # NAT64 well-known prefix
        "http://[64:ff9b:1::7f00:1]/",  # NAT64 local-use prefix
        "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",  # Teredo, client 127.0.0.1
        "http://[fec0::1]/",  # deprecated site-local
    ],
)
def test_every_spelling_of_a_refused_address_is_blocked(url: str) -> None:
    assert refusal(url) == "blocked_url"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.256/",  # out of range
        "http://0x1g.0.0.1/",  # not hex
        "http://08.0.0.1/",  # not octal
        "http://1.2.3.4.5/",  # too many parts
        "http://4294967296/",  # over 32 bits
        "http://1.16777216/",  # last part over its 3 bytes
        "http://127..1/",
        "http://0x/",
        "http://example.123/",  # ends in a number: an address or nothing, never a name
        "http://%31%32%37.0.0.1/",  # percent-encoded digits
        f"http://{'9' * 5000}/",  # over int()'s digit limit: refused, not a crash
    ],
)
def test_a_host_ending_in_a_number_that_is_no_address_is_invalid(url: str) -> None:
    assert refusal(url) == "invalid_url"


@pytest.mark.parametrize(
    "url,connect_to",
    [
        ("http://8.8.8.8/x.jpg", "8.8.8.8"),
        ("http://134744072/x.jpg", "8.8.8.8"),  # decimal
        ("http://0x08080808/x.jpg", "8.8.8.8"),  # hex
        ("http://010.010.010.010/x.jpg", "8.8.8.8"),  # octal
        ("http://0x8.0x8.0x8.0x8/x.jpg", "8.8.8.8"),
        ("http://8.8.2056/x.jpg", "8.8.8.8"),  # shortened
        ("http://8.526344/x.jpg", "8.8.8.8"),
        ("http://8.8.8.8./x.jpg", "8.8.8.8"),  # trailing dot
        ("http://0x8.8.010.8:8080/x.jpg", "8.8.8.8"),  # mixed, with a port
        ("http://[2001:4860:4860::8888]/x.jpg", "2001:4860:4860::8888"),
        ("http://[::ffff:8.8.8.8]/x.jpg", "::ffff:808:808"),  # mapped, but public
        ("http://[2002:808:808::1]/x.jpg", "2002:808:808::1"),  # 6to4 of a public address
        ("http://example.com/x.jpg", "example.com"),  # names go to the resolver as they are
        ("http://example.com./x.jpg", "example.com."),
        ("http://1.example/x.jpg", "1.example"),
        ("http://0x7f.example/x.jpg", "0x7f.example"),
    ],
)
def test_public_addresses_in_any_spelling_and_names_are_allowed(url: str, connect_to: str) -> None:
    pol = UrlPolicy()
    assert refusal(url, pol) is None
    target = pol.checked_url(URL(url))
    # a numeric host is connected to as its dotted quad: nobody downstream re-parses it
    assert target.host == connect_to
    assert (target.port, target.path) == (URL(url).port, URL(url).path)


# Numeric hosts as the C library reads them (inet_aton: glibc here). Our parser must agree
# exactly: an address that ``connect()``/``getaddrinfo`` would reach, we must have checked.
NUMERIC_FORMS = [
    *LOOPBACK_SPELLINGS[:-3],  # without the trailing-dot forms inet_aton does not take
    *[
        "1.2.3.4",
        "0",
        "00",
        "0x0",
        "0xffffffff",
        "4294967295",
        "4294967296",
        "1.16777215",
        "1.16777216",
        "1.2.65535",
    ],
    *[
        "1.2.65536",
        "256.1",
        "0x100.1",
        "255.255.255.255",
        "255.255.255.256",
        "08",
        "0x",
        "0x.1",
        "1.0x",
        "0x1g",
        "09.1",
    ],
    *[
        "1..2",
        ".1",
        "1.2.3.4.5",
        "0000000000000000000000000000001",
        "0x000000000000000000000000000ff",
    ],
]


def _both_readings(host: str) -> tuple[object, object]:
    """(the C library's inet_aton reading or None, canonical_host's reading or None)."""
    try:
        system = ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        system = None
    try:
        ours = canonical_host(host)
    except ValueError:
        ours = None
    return system, ours


@pytest.mark.parametrize("host", NUMERIC_FORMS)
def test_canonical_host_reads_numbers_as_inet_aton_does(host: str) -> None:
    system, ours = _both_readings(host)
    if system is None and isinstance(ours, str):
        ours = None  # a name ("0x1g"): the resolver's to check, not an address
    assert ours == system


@given(
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4),
    st.lists(st.sampled_from(["{:d}", "0{:o}", "0x{:x}", "0X{:X}", "00{:o}"]), min_size=4),
)
def test_canonical_host_agrees_with_inet_aton_on_generated_spellings(
    numbers: list[int], formats: list[str]
) -> None:
    host = ".".join(f.format(n) for f, n in zip(formats, numbers, strict=False))
    system, ours = _both_readings(host)
    assert ours == system, host


@given(st.text(alphabet="0123456789abcdefxX.", min_size=1, max_size=24))
def test_what_inet_aton_takes_for_an_address_is_never_a_name_to_us(host: str) -> None:
    try:
        system = ipaddress.IPv4Address(socket.inet_aton(host.rstrip(".") or "."))
    except OSError:
        return
    assert canonical_host(host) == system, host


@pytest.fixture(scope="module")
def other_server() -> Iterator[Server]:
    """A second loopback server, never allowed unless a test says so."""
    srv, stop = start_server()
    try:
        yield srv
    finally:
        stop()


@pytest.mark.parametrize("host", ["2130706433", "127.1", "0x7f.1", "0177.0.0.1", "127.0.0.1."])
def test_numeric_loopback_spellings_never_reach_the_server(
    server: Server, tmp_path: Path, host: str
) -> None:
    server.add("numeric.jpg", jpeg(30, 30))
    url = f"http://{host}:{server.port}/img/numeric.jpg"
    out, _, f = fetch(server, url, tmp_path, pol=policy(server, allowed_private=frozenset()))
    assert failed(out, "blocked_url", attempts=1) and nothing_left(tmp_path)
    assert server.hits["/img/numeric.jpg"] == 0 and f.stats.connect_attempts == 0
    # The same server, allowed explicitly (127.0.0.1:port), is reached through the same URL:
    # the refusal above was the policy's, not a server that could not be reached.
    ok, _, f = fetch(server, url, tmp_path)
    assert not isinstance(ok, FetchFailed), ok
    assert server.hits["/img/numeric.jpg"] == 1 and f.stats.connections == 1
    assert ok.url == str(URL(url)) and URL(ok.final_url).host == "127.0.0.1"


@pytest.mark.parametrize("spelling", ["0x7f.1", "2130706433", "0177.0.0.01", "127.1."])
def test_redirect_to_a_numeric_loopback_spelling_is_refused(
    server: Server, other_server: Server, tmp_path: Path, spelling: str
) -> None:
    other_server.reset()
    other_server.add("t.jpg", jpeg(30, 30))
    target = f"http://{spelling}:{other_server.port}/img/t.jpg"
    start = server.url(f"/redirect?to={quote(target, safe='')}")
    out, _, f = fetch(server, start, tmp_path)  # only the redirecting server is allowed
    assert failed(out, "blocked_url", attempts=1) and nothing_left(tmp_path)
    assert other_server.total_requests == 0
    assert f.stats.requests == 1 and f.stats.connections == 1  # the redirect, nothing else
    # Allowed explicitly, the target is reached by the same redirect.
    both = policy(
        server,
        allowed_private=frozenset({("127.0.0.1", server.port), ("127.0.0.1", other_server.port)}),
    )
    ok, _, _ = fetch(server, start, tmp_path, pol=both)
    assert not isinstance(ok, FetchFailed), ok
    assert other_server.hits["/img/t.jpg"] == 1 and ok.final_url == other_server.url("/img/t.jpg")


def test_every_new_connection_is_checked_at_the_socket(server: Server, tmp_path: Path) -> None:
    """The last layer, below the URL check and the resolver: a request that skips both (made on
    the session directly, to an IP literal, for which aiohttp never calls the resolver) is
    refused before connect()."""
    server.add("s.jpg", jpeg(20, 20))

    async def go(pol: UrlPolicy):
        async with Fetcher(pol) as f:
            assert f._session is not None
            try:
                async with f._session.get(server.url("/img/s.jpg")) as resp:
                    return resp.status, f
            except aiohttp.ClientConnectorError as exc:
                return exc, f

    out, f = asyncio.run(go(UrlPolicy()))
    assert isinstance(out, aiohttp.ClientConnectorError) and isinstance(
        out.os_error, BlockedAddress
    )
    assert server.hits["/img/s.jpg"] == 0 and f.stats.connections == 0
    status, _ = asyncio.run(go(policy(server)))  # allowed: the same request gets through
    assert status == 200 and server.hits["/img/s.jpg"] == 1


@pytest.mark.parametrize(
    "sockaddr,allowed",
    [
        (("127.0.0.1", 8080), False),
        (("2130706433", 8080), False),  # not canonical: the kernel would have to parse it
        (("localhost", 8080), False),  # a name would be resolved again by connect()
        (("::ffff:127.0.0.1", 8080, 0, 0), False),
        (("8.8.8.8", 443), True),
        (("2001:4860:4860::8888", 443, 0, 0), True),
    ],
)
def test_socket_factory_allows_only_canonical_allowed_addresses(
    sockaddr: tuple, allowed: bool
) -> None:
    family = socket.AF_INET6 if len(sockaddr) == 4 else socket.AF_INET
    make = policy_socket_factory(UrlPolicy())
    info = (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)
    if allowed:
        make(info).close()  # a socket, not yet connected: nothing is sent anywhere
    else:
        with pytest.raises(BlockedAddress):
            make(info)
