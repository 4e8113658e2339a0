"""Job URL downloads (src/plumbing/url_fetch.py) against real loopback HTTP(S) servers that count
the connections they accept, and the address guard (src/plumbing/url_guard.py) as pure checks."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from src.plumbing.url_fetch import FetchError, FetchLimits, fetch_bytes, iter_chunks
from src.plumbing.url_guard import AddressPolicy, UrlRefused, non_global_category, resolve_checked, shown
from tests.tls_certificates import write_certificates

OPEN = AddressPolicy(allow_private=True)  # the test servers are on loopback
LIMITS = FetchLimits(max_bytes=1000, max_bytes_setting="MAX_IMAGE_BYTES", connect_timeout_s=1.0,
                     total_timeout_s=5.0, idle_timeout_s=2.0)
KEY = "image_url"
BODY = os.urandom(1000)


class CountingServer(ThreadingHTTPServer):
    """An HTTP/1.1 server on a loopback address whose `respond(handler)` answers every GET;
    counts the connections it accepts and keeps each request's path and headers."""

    daemon_threads = True

    def __init__(self, host: str, port: int, respond):
        self.respond = respond
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.release = threading.Event()  # ends handlers that hold a connection open
        super().__init__((host, port), _Handler)

    def process_request(self, request, client_address):
        self.connections += 1
        super().process_request(request, client_address)

    def handle_error(self, request, client_address):
        pass  # clients cut connections on purpose here (refusals, timeouts, TLS failures)

    def url(self, path: str = "/", scheme: str = "http", host: str | None = None) -> str:
        return f"{scheme}://{host or self.server_address[0]}:{self.server_address[1]}{path}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.server.requests.append((self.path, dict(self.headers)))
        self.server.respond(self)

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """Starts CountingServers: serve(respond, host="127.0.0.1", port=0)."""
    started: list[CountingServer] = []

    def start(respond, host: str = "127.0.0.1", port: int = 0) -> CountingServer:
        server = CountingServer(host, port, respond)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.release.set()
        server.shutdown()
        server.server_close()


def send(handler, status: int = 200, body: bytes = b"", headers: dict | None = None) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def serves(body: bytes):
    return lambda handler: send(handler, 200, body)


def limits(**changes) -> FetchLimits:
    return FetchLimits(**{**LIMITS.__dict__, **changes})


def fetch_error(url: str, policy: AddressPolicy = OPEN, fetch_limits: FetchLimits = LIMITS) -> str:
    with pytest.raises((FetchError, UrlRefused)) as raised:
        fetch_bytes(url, KEY, policy, fetch_limits)
    return str(raised.value)


# The download: bytes, redirects, size caps, statuses.


def test_the_bytes_are_what_the_server_served_asked_for_without_encoding(serve):
    server = serve(serves(BODY))
    assert fetch_bytes(server.url("/image.png"), KEY, OPEN, LIMITS) == BODY
    assert server.connections == 1
    path, headers = server.requests[0]
    assert path == "/image.png" and headers["Accept-Encoding"] == "identity"


def test_chunks_are_at_most_chunk_bytes_and_join_to_the_body(serve):
    server = serve(serves(BODY))
    chunks = list(iter_chunks(server.url("/lora.safetensors"), KEY, OPEN, LIMITS, chunk_bytes=64))
    assert b"".join(chunks) == BODY and max(len(chunk) for chunk in chunks) <= 64


def test_the_query_string_reaches_the_server(serve):
    server = serve(serves(BODY))
    fetch_bytes(server.url("/a.png?X-Amz-Signature=abc&x=1"), KEY, OPEN, LIMITS)
    assert server.requests[0][0] == "/a.png?X-Amz-Signature=abc&x=1"


def test_spaces_and_non_ascii_in_the_path_are_percent_encoded(serve):
    server = serve(serves(BODY))
    fetch_bytes(server.url("/my photo é.png?name=a b&x=%2F"), KEY, OPEN, LIMITS)
    assert server.requests[0][0] == "/my%20photo%20%C3%A9.png?name=a%20b&x=%2F"


def test_the_host_header_names_the_urls_host(serve):
    server = serve(lambda handler: send(handler, 200, handler.headers["Host"].encode()))
    port = server.server_address[1]
    assert fetch_bytes(f"http://localhost:{port}/", KEY, OPEN, LIMITS) == f"localhost:{port}".encode()


def test_the_connection_goes_to_the_checked_address_not_a_second_dns_answer(serve, monkeypatch):
    """DNS rebinding: the name first answers an allowed address, then loopback. The
    download connects to the first answer, looks the name up once, and sends its Host."""
    allowed = serve(lambda handler: send(handler, 200, b"allowed " + handler.headers["Host"].encode()),
                    host="127.0.0.2")
    port = allowed.server_address[1]
    internal = serve(serves(b"internal"), host="127.0.0.1", port=port)
    answers = iter(["127.0.0.2"] + ["127.0.0.1"] * 10)
    lookups = []
    real_getaddrinfo = socket.getaddrinfo

    def rebinding_dns(host, *args, **kwargs):
        if host == "images.example":
            lookups.append(host)
            host = next(answers)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_dns)
    policy = AddressPolicy(allowed_networks=(ipaddress.ip_network("127.0.0.2/32"),))
    body = fetch_bytes(f"http://images.example:{port}/x.png", KEY, policy, LIMITS)
    assert body == f"allowed images.example:{port}".encode()
    assert len(lookups) == 1 and internal.connections == 0


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_each_redirect_status_is_followed(serve, status):
    server = serve(lambda handler: send(handler, status, headers={"Location": "/final"})
                   if handler.path == "/start" else send(handler, 200, BODY))
    assert fetch_bytes(server.url("/start"), KEY, OPEN, LIMITS) == BODY
    assert [path for path, _ in server.requests] == ["/start", "/final"]


def test_a_chain_of_three_redirects_absolute_and_relative_is_followed(serve):
    other = serve(lambda handler: send(handler, 302, headers={"Location": "c"}) if handler.path == "/dir/b"
                  else send(handler, 307, headers={"Location": "/final?part=2"}) if handler.path == "/dir/c"
                  else send(handler, 200, BODY))
    first = serve(lambda handler: send(handler, 301, headers={"Location": other.url("/dir/b")}))
    assert fetch_bytes(first.url("/a"), KEY, OPEN, LIMITS) == BODY
    assert [path for path, _ in other.requests] == ["/dir/b", "/dir/c", "/final?part=2"]
    assert first.connections == 1 and other.connections == 3  # one connection per hop


def test_a_redirect_loop_stops_at_the_limit(serve):
    server = serve(lambda handler: send(handler, 302, headers={"Location": "/loop"}))
    assert fetch_error(server.url("/loop")) == \
        f"{KEY}: downloading {server.url('/loop')!r} failed: more than 3 redirects"
    assert server.connections == 4  # the URL and three redirects


def test_four_redirects_are_one_too_many(serve):
    server = serve(lambda handler: send(handler, 302, headers={"Location": f"/{int(handler.path[1:]) + 1}"})
                   if handler.path != "/4" else send(handler, 200, BODY))
    assert fetch_error(server.url("/0")).endswith("failed: more than 3 redirects")
    assert fetch_bytes(server.url("/1"), KEY, OPEN, LIMITS) == BODY


def test_a_redirect_without_location_is_an_error(serve):
    server = serve(lambda handler: send(handler, 302))
    assert fetch_error(server.url("/x")) == \
        f"{KEY}: downloading {server.url('/x')!r} failed: HTTP 302 redirect without a Location header"


@pytest.mark.parametrize("status", [404, 500, 204])
def test_a_status_other_than_200_names_it(serve, status):
    server = serve(lambda handler: send(handler, status))
    assert fetch_error(server.url("/missing.png")) == \
        f"{KEY}: downloading {server.url('/missing.png')!r} failed: HTTP {status}"


def test_an_error_after_a_redirect_names_both_urls(serve):
    server = serve(lambda handler: send(handler, 302, headers={"Location": "/gone"}) if handler.path == "/a"
                   else send(handler, 404))
    assert fetch_error(server.url("/a")) == (f"{KEY}: downloading {server.url('/gone')!r} (redirected from "
                                             f"{server.url('/a')!r}) failed: HTTP 404")


def test_an_oversize_content_length_is_refused_before_the_body(serve):
    """The server declares a huge body and sends none: waiting for it would take the idle timeout."""

    def declares_a_gigabyte(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(10**9))
        handler.end_headers()
        handler.wfile.flush()
        handler.server.release.wait(10)

    server = serve(declares_a_gigabyte)
    start = time.monotonic()
    error = fetch_error(server.url("/big.png"), fetch_limits=limits(idle_timeout_s=5.0))
    assert time.monotonic() - start < 1.0
    assert error == (f"{KEY}: {server.url('/big.png')!r} is 1000000000 bytes (Content-Length), "
                     "larger than 1000 bytes (MAX_IMAGE_BYTES)")


def endless_body(chunked: bool):
    """A body without Content-Length that never ends: chunked, or until the connection closes."""

    def respond(handler):
        handler.send_response(200)
        handler.send_header("Transfer-Encoding" if chunked else "Connection", "chunked" if chunked else "close")
        handler.end_headers()
        try:
            while not handler.server.release.is_set():
                block = b"x" * 300
                handler.wfile.write(b"12c\r\n" + block + b"\r\n" if chunked else block)
        except OSError:
            pass  # the client cut the download

    return respond


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "until-close"])
def test_a_body_without_content_length_is_cut_as_it_passes_the_cap(serve, chunked):
    server = serve(endless_body(chunked))
    received = []
    with pytest.raises(FetchError) as raised:
        for chunk in iter_chunks(server.url("/stream"), KEY, OPEN, LIMITS, chunk_bytes=4096):
            received.append(chunk)
    assert str(raised.value) == (f"{KEY}: {server.url('/stream')!r} is larger than 1000 bytes "
                                 "(MAX_IMAGE_BYTES); cut after 1001 bytes")
    assert sum(map(len, received)) <= 1000


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "until-close"])
def test_a_body_of_exactly_max_bytes_passes(serve, declared):
    def respond(handler):
        handler.send_response(200)
        handler.send_header(*(("Content-Length", str(len(BODY))) if declared else ("Connection", "close")))
        handler.end_headers()
        handler.wfile.write(BODY)
        handler.close_connection = True

    server = serve(respond)
    assert fetch_bytes(server.url("/exact"), KEY, OPEN, LIMITS) == BODY


def test_a_body_shorter_than_its_content_length_is_an_error(serve):
    def short(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "100")
        handler.end_headers()
        handler.wfile.write(b"x" * 50)
        handler.close_connection = True

    server = serve(short)
    assert fetch_error(server.url("/short")).endswith("failed: the connection closed after 50 of 100 bytes")


# Time bounds.


def trickle(handler, first: bytes, then: bytes, every_s: float) -> None:
    """Writes `first`, then `then` a byte at a time, until released or cut."""
    try:
        handler.wfile.write(first)
        for byte in then:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            if handler.server.release.wait(every_s):
                return
    except OSError:
        pass


def test_a_trickling_body_fails_at_the_total_timeout(serve):
    """A byte every 50 ms never trips the idle timeout; the total bound still holds."""
    server = serve(lambda handler: trickle(handler, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
                                           b"x" * 1000, every_s=0.05))
    start = time.monotonic()
    error = fetch_error(server.url("/slow"), fetch_limits=limits(total_timeout_s=0.6, idle_timeout_s=0.4))
    assert 0.6 <= time.monotonic() - start < 1.2
    assert error == f"{KEY}: downloading {server.url('/slow')!r} failed: timed out after 0.6 s (FETCH_TIMEOUT_S)"


def test_the_total_timeout_error_names_the_callers_setting(serve):
    """LoRA downloads have their own total bound (LORA_DOWNLOAD_TIMEOUT_S)."""
    server = serve(lambda handler: trickle(handler, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
                                           b"x" * 1000, every_s=0.05))
    error = fetch_error(server.url("/slow"), fetch_limits=limits(total_timeout_s=0.3, idle_timeout_s=0.2,
                                                                 total_timeout_setting="LORA_DOWNLOAD_TIMEOUT_S"))
    assert error.endswith("failed: timed out after 0.3 s (LORA_DOWNLOAD_TIMEOUT_S)")


def test_trickling_headers_fail_at_the_total_timeout(serve):
    """http.client reads a header line in many reads: each is bounded, not just each line."""
    server = serve(lambda handler: trickle(handler, b"HTTP/1.1 200 OK\r\n", b"X-Padding: " + b"y" * 1000,
                                           every_s=0.05))
    start = time.monotonic()
    error = fetch_error(server.url("/slow-headers"), fetch_limits=limits(total_timeout_s=0.6, idle_timeout_s=0.4))
    assert 0.6 <= time.monotonic() - start < 1.2
    assert error.endswith("failed: timed out after 0.6 s (FETCH_TIMEOUT_S)")


@pytest.mark.parametrize("total_s, idle_s, reason", [
    (None, 0.3, "timed out: no data for 0.3 s"),
    (0.4, 5.0, "timed out after 0.4 s (FETCH_TIMEOUT_S)"),
], ids=["idle", "total"])
def test_a_server_that_never_answers_times_out(serve, total_s, idle_s, reason):
    server = serve(lambda handler: handler.server.release.wait(10))
    start = time.monotonic()
    error = fetch_error(server.url("/silent"), fetch_limits=limits(total_timeout_s=total_s, idle_timeout_s=idle_s))
    assert time.monotonic() - start < (total_s or idle_s) + 0.5
    assert error == f"{KEY}: downloading {server.url('/silent')!r} failed: {reason}"


def test_a_connection_that_is_never_accepted_times_out(serve):
    """A listener whose backlog is full drops new connection attempts."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = []
    try:
        for _ in range(8):  # fill the backlog (its size depends on the kernel)
            probe = socket.socket()
            probe.settimeout(0.2)
            queued.append(probe)
            try:
                probe.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        start = time.monotonic()
        error = fetch_error(f"http://127.0.0.1:{port}/", fetch_limits=limits(connect_timeout_s=0.3))
        assert time.monotonic() - start < 1.0
        assert error == (f"{KEY}: downloading 'http://127.0.0.1:{port}/' failed: "
                         "no connection within 0.3 s (FETCH_CONNECT_TIMEOUT_S)")
    finally:
        for probe in queued:
            probe.close()
        listener.close()


def test_a_refused_connection_says_so():
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    assert fetch_error(f"http://127.0.0.1:{port}/x") == \
        f"{KEY}: downloading 'http://127.0.0.1:{port}/x' failed: connection refused"


# The address guard on every hop.


@pytest.mark.parametrize("url, category", [
    ("http://127.0.0.1:{port}/", "127.0.0.1, a loopback"),
    ("http://localhost:{port}/", "127.0.0.1, a loopback"),
    ("http://[::ffff:127.0.0.1]:{port}/", "::ffff:127.0.0.1, a loopback"),
    ("http://10.0.0.1/", "10.0.0.1, a private"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254, a link-local"),
])
def test_non_global_urls_are_refused_before_any_connection(serve, url, category):
    server = serve(serves(BODY))
    start = time.monotonic()
    error = fetch_error(url.format(port=server.server_address[1]), policy=AddressPolicy())
    assert time.monotonic() - start < 0.5
    assert error.startswith(f"{KEY}: host ") and f"resolves to {category} address" in error
    assert error.endswith("set ALLOW_PRIVATE_URLS=true to allow it")
    assert server.connections == 0


def test_a_redirect_from_an_allowed_host_to_loopback_is_refused_before_connecting(serve):
    """127.0.0.2 stands in for a public host: the policy allows it, and only it."""
    internal = serve(serves(b"internal"), host="127.0.0.1")
    public = serve(lambda handler: send(handler, 302, headers={"Location": internal.url("/secret?token=t0p")}),
                   host="127.0.0.2")
    policy = AddressPolicy(allowed_networks=(ipaddress.ip_network("127.0.0.2/32"),))
    error = fetch_error(public.url("/start"), policy=policy)
    assert error == (f"{KEY}: {public.url('/start')!r} redirects to {internal.url('/secret')!r}: host '127.0.0.1' "
                     "resolves to 127.0.0.1, a loopback address; set ALLOW_PRIVATE_URLS=true to allow it")
    assert public.connections == 1 and internal.connections == 0


def test_a_redirect_to_another_scheme_is_refused(serve):
    server = serve(lambda handler: send(handler, 302, headers={"Location": "file:///etc/passwd"}))
    error = fetch_error(server.url("/a"))
    assert error == f"{KEY}: {server.url('/a')!r} redirects to 'file:///etc/passwd': " \
                    "'file:///etc/passwd': only http and https URLs are allowed"


def test_errors_never_show_the_query_string_or_user_info(serve):
    server = serve(lambda handler: send(handler, 302, headers={"Location": "/b?X-Amz-Signature=secret2"})
                   if handler.path.startswith("/a") else send(handler, 403))
    port = server.server_address[1]
    error = fetch_error(f"http://user:password@127.0.0.1:{port}/a?X-Amz-Signature=secret1")
    assert error == (f"{KEY}: downloading 'http://127.0.0.1:{port}/b' (redirected from "
                     f"'http://127.0.0.1:{port}/a') failed: HTTP 403")
    refused = fetch_error(f"http://127.0.0.1:{port}/a?X-Amz-Signature=secret3", policy=AddressPolicy())
    for text in (error, refused):
        assert "secret" not in text and "password" not in text


# TLS: certificates verified against the URL's host while connecting to the checked address.


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A CA and a server certificate for the name `localhost` only (no IP address)."""
    return write_certificates(tmp_path_factory.mktemp("tls"), ["localhost"])


@pytest.fixture
def tls_server(serve, certificates, monkeypatch):
    """A CountingServer speaking TLS with the `localhost` certificate, its CA trusted."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certificates.ca))
    server = serve(serves(BODY))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates.servers["localhost"])
    # The handshake in each handler's thread, not in the accepting one.
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    return server


def test_https_verifies_the_certificate_against_the_urls_name(tls_server):
    port = tls_server.server_address[1]
    assert fetch_bytes(f"https://localhost:{port}/x.png", KEY, OPEN, LIMITS) == BODY


def test_https_to_an_address_the_certificate_does_not_name_is_refused(tls_server):
    port = tls_server.server_address[1]
    error = fetch_error(f"https://127.0.0.1:{port}/x.png")
    assert error.startswith(f"{KEY}: downloading 'https://127.0.0.1:{port}/x.png' failed: "
                            "TLS certificate not accepted (IP address mismatch")


def test_https_to_a_server_without_tls_is_a_tls_failure(serve):
    server = serve(serves(BODY))
    error = fetch_error(server.url("/x.png", scheme="https"))
    assert error.startswith(f"{KEY}: downloading {server.url('/x.png', scheme='https')!r} failed: TLS failed (")


# The guard itself: which addresses are refused, and how URLs are checked.


def teredo(client: str) -> str:
    """A Teredo address (2001::/32) carrying `client`, stored inverted as the RFC says."""
    inverted = int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF
    return str(ipaddress.IPv6Address((0x2001_0000_4136_E378_8000_63BF << 32) | inverted))


@pytest.mark.parametrize("address, category", [
    ("127.0.0.1", "a loopback"), ("127.8.9.10", "a loopback"), ("::1", "a loopback"),
    ("10.1.2.3", "a private"), ("172.16.0.1", "a private"), ("192.168.1.1", "a private"), ("fd00::1", "a private"),
    ("169.254.169.254", "a link-local"), ("fe80::1", "a link-local"),
    ("100.64.0.1", "a shared (carrier-grade NAT)"), ("100.127.255.254", "a shared (carrier-grade NAT)"),
    ("224.0.0.1", "a multicast"), ("ff02::1", "a multicast"),
    ("240.0.0.1", "a reserved"),
    ("0.0.0.0", "an unspecified"), ("::", "an unspecified"),
    ("::ffff:127.0.0.1", "a loopback"), ("::ffff:169.254.169.254", "a link-local"),
    ("2002:7f00:1::", "a loopback"), ("2002:a9fe:a9fe::1", "a link-local"),  # 6to4
    ("64:ff9b::a9fe:a9fe", "a link-local"), ("64:ff9b::10.0.0.1", "a private"),  # NAT64
    (teredo("127.0.0.1"), "a loopback"),
])
def test_non_global_addresses_are_named_by_category(address, category):
    assert non_global_category(ipaddress.ip_address(address)) == category
    assert AddressPolicy().refusal(ipaddress.ip_address(address)) == category


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8",
                                     "64:ff9b::8.8.8.8", "2002:808:808::1"])
def test_global_addresses_pass(address):
    assert non_global_category(ipaddress.ip_address(address)) is None


def test_a_global_url_resolves_to_its_checked_target():
    target = resolve_checked("https://8.8.8.8/a.png?sig=1", KEY, AddressPolicy())
    assert (target.host, target.port, target.addresses) == ("8.8.8.8", 443, ("8.8.8.8",))
    assert resolve_checked("http://8.8.8.8:8080/", KEY, AddressPolicy()).port == 8080


@pytest.mark.parametrize("url, message", [
    ("ftp://8.8.8.8/a.png", "'ftp://8.8.8.8/a.png': only http and https URLs are allowed"),
    ("file:///etc/passwd", "'file:///etc/passwd': only http and https URLs are allowed"),
    ("http:///a.png", "'http:///a.png' has no host"),
    ("http://8.8.8.8:99999/a.png", "'http://8.8.8.8/a.png' has an invalid port (1 to 65535)"),
    ("http://nonexistent.invalid/a.png", "host 'nonexistent.invalid' does not resolve"),
])
def test_bad_urls_are_refused_with_the_reason(url, message):
    with pytest.raises(UrlRefused) as raised:
        resolve_checked(url, KEY, AddressPolicy())
    assert str(raised.value) == f"{KEY}: {message}"


def test_allowed_networks_let_through_only_their_addresses():
    policy = AddressPolicy(allowed_networks=(ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00::/8")))
    assert policy.refusal(ipaddress.ip_address("10.1.2.3")) is None
    assert policy.refusal(ipaddress.ip_address("fd00::5")) is None
    assert policy.refusal(ipaddress.ip_address("10.2.0.1")) == "a private"
    assert policy.refusal(ipaddress.ip_address("169.254.169.254")) == "a link-local"
    assert resolve_checked("http://10.1.2.3/x", KEY, policy).addresses == ("10.1.2.3",)


def test_allow_private_lets_through_every_address():
    policy = AddressPolicy(allow_private=True)
    for address in ("127.0.0.1", "169.254.169.254", "::1", "0.0.0.0"):
        assert policy.refusal(ipaddress.ip_address(address)) is None


def test_shown_drops_user_info_and_query_but_keeps_port_and_brackets():
    assert shown("https://user:pw@example.com:8443/a/b.png?X-Amz-Signature=s#frag") == "https://example.com:8443/a/b.png"
    assert shown("http://[::1]:8080/x?y=1") == "http://[::1]:8080/x"
