"""A job's own bucket (`r2`): its endpoint is checked before any connection, and every
connection then goes to the address checked (src/plumbing/pinned_s3.py), with the host name kept
for the Host header, the signature, TLS and presigned URLs. The worker's own bucket is
not checked.

Connections are observed, not assumed: a counting TCP relay stands in front of the
loopback S3, and a fake DNS (socket.getaddrinfo, the network's side only) answers a name
differently on its second lookup, as a rebinding attacker's server would.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import select
import socket
import ssl
import sys
import threading
import time
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest
import requests
from botocore.awsrequest import AWSHTTPConnection
from urllib3.connection import HTTPConnection
from urllib3.exceptions import NewConnectionError

from src.plumbing.config import BucketConfig
from src.plumbing.pinned_s3 import _Pinned
from src.plumbing.s3_deadline import TimedOut, within
from src.plumbing.storage import Bucket, StorageError, UploadPolicy
from src.plumbing.url_guard import AddressPolicy, UrlRefused
from src.serving.worker import Worker
from tests.conftest import FAST, fetch, job_r2, png_b64, sample_image
from tests.faulty_s3 import Fault
from tests.tls_certificates import write_certificates

NO_PRIVATE = AddressPolicy()
LOOPBACK_ALLOWED = AddressPolicy(allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),
                                                   ipaddress.ip_network("::1/128")))
ONE_ATTEMPT = UploadPolicy(attempts=1, connect_timeout_s=2.0, read_timeout_s=10.0)
REBOUND_NAME = "rebinding-host"  # a name only the fake DNS below knows; dotless, so moto reads paths
CHECKED_ADDRESS = "127.0.0.2"  # what the fake DNS answers first: the relay to S3
REBOUND_ADDRESS = "127.0.0.3"  # what it answers after: a trap that must see no connection


# --- the network's side: a counting relay and a fake DNS --------------------------

class CountingRelay:
    """A TCP relay listening on `host` that counts the connections it accepts and forwards
    them to `upstream` (host, port); with no upstream it closes them (a trap). With `tls`,
    it terminates TLS and records the SNI names clients sent. It records the Host header
    of each connection's first request."""

    def __init__(self, host: str, upstream: tuple[str, int] | None = None, tls: ssl.SSLContext | None = None,
                 port: int = 0):
        self.upstream = upstream
        self.tls = tls
        self.connections = 0
        self.server_names: list[str | None] = []
        self.host_headers: list[str] = []
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: self.server_names.append(name)
        self._listener = socket.create_server((host, port))
        self.host, self.port = host, self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed by stop()
                return
            self.connections += 1
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            if self.upstream is None:
                return
            if self.tls is not None:
                client = self.tls.wrap_socket(client, server_side=True)
            with socket.create_connection(self.upstream) as upstream:
                first = True
                while True:
                    pending = isinstance(client, ssl.SSLSocket) and client.pending()
                    ready = [client] if pending else select.select([client, upstream], [], [], 30)[0]
                    if not ready:
                        return
                    for sock in ready:
                        data = sock.recv(65536)
                        if not data:
                            return
                        if sock is client and first:
                            first = False
                            host = re.search(rb"\r\nhost: *([^\r]*)\r\n", data, re.IGNORECASE)
                            self.host_headers.append(host.group(1).decode() if host else "")
                        (upstream if sock is client else client).sendall(data)
        except (OSError, ssl.SSLError):
            return
        finally:
            client.close()

    def url(self, host: str | None = None, scheme: str = "http") -> str:
        return f"{scheme}://{host or self.host}:{self.port}"

    def stop(self) -> None:
        self._listener.close()


@pytest.fixture
def relays():
    started: list[CountingRelay] = []

    def start(host: str, upstream: str | None = None, tls: ssl.SSLContext | None = None,
              port: int = 0) -> CountingRelay:
        target = None
        if upstream is not None:
            parts = urlsplit(upstream)
            target = (parts.hostname, parts.port)
        started.append(CountingRelay(host, target, tls, port))
        return started[-1]

    yield start
    for relay in started:
        relay.stop()


class FakeDns:
    """REBOUND_NAME's answers, one per lookup in the order given, the last one repeated;
    every other name and every literal address resolves as usual."""

    def __init__(self, *answers: str):
        self.answers = list(answers)
        self.lookups = 0
        self._real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(self, host, port, *args, **kwargs):
        if (host.decode() if isinstance(host, bytes) else host) != REBOUND_NAME:
            return self._real_getaddrinfo(host, port, *args, **kwargs)
        address = self.answers[min(self.lookups, len(self.answers) - 1)]
        self.lookups += 1
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port or 0)))]


@pytest.fixture
def rebinding_dns(monkeypatch) -> FakeDns:
    """REBOUND_NAME answers CHECKED_ADDRESS on its first lookup, REBOUND_ADDRESS after."""
    dns = FakeDns(CHECKED_ADDRESS, REBOUND_ADDRESS)
    monkeypatch.setattr(socket, "getaddrinfo", dns.getaddrinfo)
    return dns


_recording: list[tuple] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "socket.connect" and _recording is not None:
        _recording.append(args[1])


@pytest.fixture(scope="session")
def connect_attempts():
    """A context manager that lists the addresses of every socket connect made while it is
    open, by any thread (the interpreter's `socket.connect` audit event)."""
    sys.addaudithook(_audit)  # audit hooks stay for the process; this one is idle unless recording

    @contextmanager
    def recording():
        global _recording
        _recording = []
        try:
            yield _recording
        finally:
            _recording = None

    return recording


def job_bucket(endpoint_url: str, bucket: str, key_id: str = "job-key-id", secret: str = "job-secret") -> BucketConfig:
    r2 = job_r2(endpoint_url, bucket, key_id, secret)
    return BucketConfig(bucket_name=r2["bucket_name"], access_key_id=r2["access_key_id"],
                        secret_access_key=r2["secret_access_key"], endpoint_url=r2["endpoint_url"],
                        region=r2["region"])


# --- (a) refused before any connection ------------------------------------------

@pytest.mark.parametrize("endpoint, host, address, category", [
    ("http://127.0.0.1:{port}", "127.0.0.1", "127.0.0.1", "a loopback"),
    ("http://localhost:{port}", "localhost", "127.0.0.1", "a loopback"),
    ("http://[::ffff:127.0.0.1]:{port}", "::ffff:127.0.0.1", "::ffff:127.0.0.1", "a loopback"),
    ("http://169.254.169.254", "169.254.169.254", "169.254.169.254", "a link-local"),
    ("https://169.254.169.254/latest/meta-data/", "169.254.169.254", "169.254.169.254", "a link-local"),
])
def test_job_bucket_on_a_private_address_is_refused_before_any_connection(
        endpoint, host, address, category, s3, relays, connect_attempts):
    relay = relays("127.0.0.1", s3.endpoint_url)
    url = endpoint.format(port=relay.port)
    with connect_attempts() as attempts, pytest.raises(UrlRefused) as refused:
        Bucket.for_job(job_bucket(url, s3.bucket), 60, ONE_ATTEMPT, NO_PRIVATE)
    assert str(refused.value) == (f"r2.endpoint_url: host {host!r} resolves to {address}, {category} address; "
                                  "set ALLOW_PRIVATE_URLS=true to allow it")
    assert attempts == [] and relay.connections == 0


# --- (b) pinned: the checked address, the host name kept ---------------------------

def test_job_bucket_by_name_uploads_and_presigns_with_the_name(s3):
    port = urlsplit(s3.endpoint_url).port
    bucket = Bucket.for_job(job_bucket(f"http://localhost:{port}", s3.bucket), 60, ONE_ATTEMPT, LOOPBACK_ALLOWED)
    assert bucket.pinned_to == ("127.0.0.1",)
    stored = bucket.put("pinned/by-name.bin", b"pinned bytes", "application/octet-stream")
    assert s3.client().get_object(Bucket=s3.bucket, Key=stored.key)["Body"].read() == b"pinned bytes"
    assert urlsplit(stored.url).netloc == f"localhost:{port}"  # the name, not the address
    assert requests.get(stored.url, timeout=10).content == b"pinned bytes"


def test_connections_go_to_the_checked_address_not_to_a_second_lookup(locked_s3, relays, rebinding_dns):
    relay = relays(CHECKED_ADDRESS, locked_s3.endpoint_url)
    trap = relays(REBOUND_ADDRESS)
    config = job_bucket(relay.url(REBOUND_NAME), locked_s3.bucket, locked_s3.access_key_id,
                        locked_s3.secret_access_key)
    bucket = Bucket.for_job(config, 60, ONE_ATTEMPT, LOOPBACK_ALLOWED)
    assert bucket.pinned_to == (CHECKED_ADDRESS,)
    # Uploads (PUT and HEAD on the upload client), and reads on `client`, as an s3://
    # LoRA source is streamed.
    stored = bucket.put("pinned/rebinding.bin", b"x" * 300_000, "application/octet-stream")
    body = bucket.client.get_object(Bucket=locked_s3.bucket, Key=stored.key)["Body"]
    assert b"".join(body.iter_chunks(65536)) == b"x" * 300_000
    assert rebinding_dns.lookups == 1  # by the check, and never again
    assert trap.connections == 0 and relay.connections >= 2  # one pool per client
    # The name went on the wire as the Host header, and the signature over it held.
    assert set(relay.host_headers) == {f"{REBOUND_NAME}:{relay.port}"}
    assert urlsplit(stored.url).hostname == REBOUND_NAME


@pytest.mark.parametrize("cert_name, verified", [(REBOUND_NAME, True), ("some-other-host.test", False)])
def test_tls_to_the_checked_address_sends_and_verifies_the_host_name(
        cert_name, verified, s3, relays, rebinding_dns, tmp_path, monkeypatch):
    files = write_certificates(tmp_path, [cert_name])
    monkeypatch.setenv("AWS_CA_BUNDLE", str(files.ca))  # botocore trusts the test CA
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(files.servers[cert_name])
    relay = relays(CHECKED_ADDRESS, s3.endpoint_url, tls=server_context)
    trap = relays(REBOUND_ADDRESS)
    bucket = Bucket.for_job(job_bucket(relay.url(REBOUND_NAME, "https"), s3.bucket), 60, ONE_ATTEMPT,
                            LOOPBACK_ALLOWED)
    if verified:
        stored = bucket.put("pinned/tls.bin", b"over tls", "application/octet-stream")
        assert s3.client().get_object(Bucket=s3.bucket, Key=stored.key)["Body"].read() == b"over tls"
        assert stored.url.startswith(f"https://{REBOUND_NAME}:{relay.port}/")
    else:  # a certificate for another name is refused: verification is on, and by name
        with pytest.raises(StorageError, match="SSLError"):
            bucket.put("pinned/tls-refused.bin", b"never stored", "application/octet-stream")
    assert relay.server_names and set(relay.server_names) == {REBOUND_NAME}
    assert rebinding_dns.lookups == 1 and trap.connections == 0


def test_a_trickling_store_over_tls_ends_at_the_deadline(s3, fault_proxy, relays, rebinding_dns, tmp_path,
                                                         monkeypatch):
    """The total deadline (src/plumbing/s3_deadline.py) shuts a TLS connection down as it
    does a plain one: an upload's PUT, and a streamed read's body, a byte every 50 ms."""
    files = write_certificates(tmp_path, [REBOUND_NAME])
    monkeypatch.setenv("AWS_CA_BUNDLE", str(files.ca))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(files.servers[REBOUND_NAME])
    relay = relays(CHECKED_ADDRESS, fault_proxy.url, tls=server_context)
    policy = UploadPolicy(attempts=1, connect_timeout_s=1.0, read_timeout_s=1.0)
    bucket = Bucket.for_job(job_bucket(relay.url(REBOUND_NAME, "https"), s3.bucket, key_id="tls-trickle"), 60,
                            policy, LOOPBACK_ALLOWED)
    s3.client().put_object(Bucket=s3.bucket, Key="pinned/tls-slow.bin", Body=b"s" * 5000)
    fault_proxy.always(Fault.trickle(0.05))
    fault_proxy.always(Fault.trickle(0.05, headers_first=True), method="GET")
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"failed: no whole answer within 2 s \(UPLOAD_TIMEOUT_S"):
        bucket.put("pinned/tls-trickle.bin", b"t" * 5000, "application/octet-stream")
    assert 2.0 <= time.monotonic() - started < 2.5
    started = time.monotonic()
    with pytest.raises(TimedOut), within(1.5):
        bucket.client.get_object(Bucket=s3.bucket, Key="pinned/tls-slow.bin")["Body"].read()
    assert 1.5 <= time.monotonic() - started < 2.0
    assert set(relay.server_names) == {REBOUND_NAME}


def test_each_job_checks_the_name_again_and_connects_where_its_own_check_said(s3, relays, monkeypatch):
    first = relays(CHECKED_ADDRESS, s3.endpoint_url)
    moved = relays("127.0.0.4", s3.endpoint_url, port=first.port)  # the same URL, another address
    # One bucket, three jobs: the second lookup answers the metadata service, the third
    # another allowed address. Clients are cached, but never across answers.
    dns = FakeDns(first.host, "169.254.169.254", moved.host)
    monkeypatch.setattr(socket, "getaddrinfo", dns.getaddrinfo)
    config = job_bucket(first.url(REBOUND_NAME), s3.bucket, key_id="recheck-test")
    Bucket.for_job(config, 60, ONE_ATTEMPT, LOOPBACK_ALLOWED).put("pinned/first.bin", b"1", "text/plain")
    first_job_connections = first.connections
    with pytest.raises(UrlRefused, match=f"host '{REBOUND_NAME}' resolves to 169.254.169.254, a link-local"):
        Bucket.for_job(config, 60, ONE_ATTEMPT, LOOPBACK_ALLOWED)
    Bucket.for_job(config, 60, ONE_ATTEMPT, LOOPBACK_ALLOWED).put("pinned/moved.bin", b"3", "text/plain")
    assert dns.lookups == 3 and first_job_connections >= 1 and first.connections == first_job_connections
    assert moved.connections >= 1


def test_pinned_bucket_takes_no_proxy_from_the_environment(s3, relays, monkeypatch):
    proxy = relays("127.0.0.1", s3.endpoint_url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, proxy.url())
    endpoint = f"http://localhost:{urlsplit(s3.endpoint_url).port}"
    # Key ids of their own, so that no client cached by an earlier test, built without
    # the proxy in the environment, is reused.
    # Unpinned, botocore sends through the proxy named in the environment...
    Bucket(job_bucket(endpoint, s3.bucket, key_id="unpinned-proxy-test"), 60, ONE_ATTEMPT).put(
        "pinned/unpinned-via-proxy.bin", b"a", "application/octet-stream")
    assert proxy.connections >= 1
    # ...pinned, it connects straight to the checked address: a proxy would resolve the name itself.
    before = proxy.connections
    pinned = Bucket.for_job(job_bucket(endpoint, s3.bucket, key_id="pinned-proxy-test"), 60, ONE_ATTEMPT,
                            LOOPBACK_ALLOWED)
    stored = pinned.put("pinned/direct.bin", b"b", "application/octet-stream")
    assert proxy.connections == before
    assert s3.client().get_object(Bucket=s3.bucket, Key=stored.key)["Body"].read() == b"b"


def test_a_connection_that_escapes_the_pin_is_closed_before_any_request(s3):
    # What a urllib3 that no longer opened sockets in `_new_conn` would do: look the
    # host up itself. The pin's check in `connect()` must then refuse the connection.
    class OpensSocketsElsewhere(_Pinned, AWSHTTPConnection):
        pinned_addresses = ("127.0.0.2",)
        _new_conn = HTTPConnection._new_conn

    connection = OpensSocketsElsewhere("localhost", urlsplit(s3.endpoint_url).port)
    with pytest.raises(NewConnectionError, match="connected to 127.0.0.1, which is not a checked address"):
        connection.connect()
    assert connection.sock is None


# --- (c) and (d): the worker --------------------------------------------------------

def test_worker_refuses_a_job_bucket_on_loopback_and_serves_the_next_job(worker, s3, relays):
    strict = Worker(settings=dataclasses.replace(worker.settings, allow_private_urls=False), host=worker.host,
                    price=worker.price, loras=worker.loras)
    relay = relays("127.0.0.1", s3.endpoint_url)
    r2 = job_r2(relay.url(), s3.bucket, secret="job-secret-never-shown")
    edit = {"operation": "edit", "image_base64": png_b64(sample_image()), "prompt": "x", **FAST}
    refused = strict.handle({"id": "r2-loopback", "input": {**edit, "r2": r2}}, progress=lambda _: None)
    assert refused == {"error": "r2.endpoint_url: host '127.0.0.1' resolves to 127.0.0.1, a loopback address; "
                                "set ALLOW_PRIVATE_URLS=true to allow it"}
    assert relay.connections == 0
    # The worker's own bucket (BUCKET_*, on loopback here) is trusted: not checked.
    served = strict.handle({"id": "after-refusal", "input": edit}, progress=lambda _: None)
    assert served["success"] and urlsplit(served["output_url"]).hostname == "127.0.0.1"
    assert fetch(served["output_url"]).size == (256, 256)
