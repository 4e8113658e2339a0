"""Storage that misbehaves on purpose, on loopback: a fault-injecting HTTP proxy in front
of the moto S3 server, and a moto server that checks credentials.

    proxy = FaultyProxy(s3.endpoint_url)
    proxy.plan(Fault.status(500), Fault.status(500))   # the next two PUTs answer 500
    proxy.always(Fault.delay(2.0))                      # every PUT answers 2 s late
    proxy.always(Fault.trickle(0.05), method="GET")     # every GET answered a byte at a time
    proxy.always(Fault.no_length(), method="HEAD")      # HEAD answers without Content-Length
    proxy.count("PUT")                                  # how many PUTs reached the proxy
    proxy.count("GET", "/bucket/key")                   # how many GETs of that object

Faults apply to requests of one HTTP method (PUT unless told otherwise); every other
request passes through untouched.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import boto3
import requests
from botocore.config import Config

from tools.local_stack import LOOPBACK, free_port

# Headers by which a server could notice a cut body; a truncating fault removes them to
# play a storage that keeps whatever arrived.
_INTEGRITY_HEADERS = ("content-md5", "x-amz-content-sha256", "x-amz-sdk-checksum-algorithm", "x-amz-trailer",
                      "x-amz-decoded-content-length")
_HOP_BY_HOP = ("connection", "keep-alive", "transfer-encoding", "content-length", "expect")


@dataclass(frozen=True)
class Fault:
    kind: str  # "status", "delay", "truncate", "fake_ok", "trickle", "no_length"
    http_status: int = 0
    code: str = ""
    seconds: float = 0.0
    keep: float = 1.0
    headers_first: bool = False

    @classmethod
    def status(cls, status: int = 500, code: str = "InternalError") -> "Fault":
        """Answer with an S3 error document, without forwarding."""
        return cls("status", http_status=status, code=code)

    @classmethod
    def delay(cls, seconds: float) -> "Fault":
        """Forward, then hold the answer back."""
        return cls("delay", seconds=seconds)

    @classmethod
    def truncate(cls, keep: float = 0.5) -> "Fault":
        """Forward only the first `keep` of the body and pass on the server's 200."""
        return cls("truncate", keep=keep)

    @classmethod
    def fake_ok(cls) -> "Fault":
        """Answer 200 without forwarding: the object is never written."""
        return cls("fake_ok")

    @classmethod
    def trickle(cls, every_s: float, headers_first: bool = False) -> "Fault":
        """Forward, then send the server's answer one byte every `every_s` (each wait far
        inside any read timeout); with `headers_first`, the status line and headers at
        once and only the body a byte at a time."""
        return cls("trickle", seconds=every_s, headers_first=headers_first)

    @classmethod
    def no_length(cls) -> "Fault":
        """Forward, and pass the answer on without its Content-Length header (for HEAD:
        a store that does not say how long the object is)."""
        return cls("no_length")


class FaultyProxy:
    def __init__(self, upstream_url: str):
        self.upstream = urlsplit(upstream_url)
        self.requests_seen: list[tuple[str, str]] = []  # (method, path without the query)
        self._planned: list[tuple[str, Fault]] = []
        self._standing: dict[str, Fault] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((LOOPBACK, free_port()), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://{LOOPBACK}:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def plan(self, *faults: Fault, method: str = "PUT") -> None:
        """The next requests of `method` meet these faults, one each, in order."""
        with self._lock:
            self._planned.extend((method, fault) for fault in faults)

    def always(self, fault: Fault | None, method: str = "PUT") -> None:
        """Every request of `method` meets `fault` from now on (None: none does)."""
        with self._lock:
            self._standing[method] = fault

    def count(self, method: str = "PUT", path: str | None = None) -> int:
        """How many requests of `method` (for `path` alone, when given) reached the proxy."""
        return sum(1 for seen, seen_path in self.requests_seen if seen == method and path in (None, seen_path))

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            fault = self._standing.get(method)
            if fault is None:
                for i, (planned_method, planned) in enumerate(self._planned):
                    if planned_method == method:
                        fault = self._planned.pop(i)[1]
                        break
            self.requests_seen.append((method, path.partition("?")[0]))
        return fault


def _handler_for(proxy: FaultyProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - quiet: one line per request otherwise
            pass

        def do_GET(self):
            self._relay()

        do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

        def _relay(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            fault = proxy._fault_for(self.command, self.path)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if fault is None or fault.kind in ("delay", "trickle", "no_length"):
                self._forward(headers, body, fault)
            elif fault.kind == "status":
                self._answer(fault.http_status, _s3_error(fault.code).encode(), {"Content-Type": "application/xml"})
            elif fault.kind == "fake_ok":
                self._answer(200, b"", {"ETag": '"00000000000000000000000000000000"'})
            elif fault.kind == "truncate":
                kept = {k: v for k, v in headers.items() if k.lower() not in _INTEGRITY_HEADERS
                        and not k.lower().startswith("x-amz-checksum-")}
                self._forward(kept, body[: int(len(body) * fault.keep)], None)

        def _forward(self, headers: dict, body: bytes, fault: Fault | None) -> None:
            upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
            try:
                upstream.request(self.command, self.path, body=body if self.command != "HEAD" else None,
                                 headers=headers)
                response = upstream.getresponse()
                data = response.read()
                answer_headers = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
                # A HEAD answer carries the object's length without a body.
                head_length = response.getheader("Content-Length")
                status = response.status
            finally:
                upstream.close()
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.seconds)
            if fault is not None and fault.kind == "trickle":
                self._trickle(status, data, answer_headers, head_length, fault)
            else:
                self._answer(status, data, answer_headers, head_length=head_length,
                             with_length=fault is None or fault.kind != "no_length")

        def _answer(self, status: int, data: bytes, headers: dict, head_length: str | None = None,
                    with_length: bool = True) -> None:
            try:
                self.wfile.write(self._answer_bytes(status, data, headers, head_length, with_length))
            except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
                self.close_connection = True

        def _trickle(self, status: int, data: bytes, headers: dict, head_length: str | None, fault: Fault) -> None:
            answer = self._answer_bytes(status, data, headers, head_length, with_length=True)
            head_bytes = len(answer) - (0 if self.command == "HEAD" else len(data))
            at_once = head_bytes if fault.headers_first else 0
            self.close_connection = True  # a trickled answer is never followed by another
            try:
                self.wfile.write(answer[:at_once])
                self.wfile.flush()
                for offset in range(at_once, len(answer)):
                    time.sleep(fault.seconds)
                    self.wfile.write(answer[offset:offset + 1])
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
                pass

        def _answer_bytes(self, status: int, data: bytes, headers: dict, head_length: str | None,
                          with_length: bool) -> bytes:
            """The whole answer as it goes on the wire: status line, headers, body."""
            lines = [f"{self.protocol_version} {status} {self.responses.get(status, ('',))[0]}"]
            lines += [f"{name}: {value}" for name, value in headers.items()]
            if with_length:
                length = (head_length or "0") if self.command == "HEAD" else str(len(data))
                lines.append(f"Content-Length: {length}")
            elif self.command != "HEAD":
                self.close_connection = True  # the body ends where the connection does
            head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
            return head if self.command == "HEAD" else head + data

    return Handler


def _s3_error(code: str) -> str:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>injected by the test proxy</Message></Error>")


def unused_endpoint() -> str:
    """An http endpoint where nothing listens: a storage server that is down."""
    return f"http://{LOOPBACK}:{free_port()}"


@dataclass
class LockedS3:
    """A moto server in its own process that checks signatures: requests must be signed
    with the one access key it issued (moto's INITIAL_NO_AUTH_ACTION_COUNT lets the
    set-up calls through unsigned). Its own process, because moto's auth switch is global
    and would lock the shared loopback S3 too."""

    process: subprocess.Popen
    endpoint_url: str
    bucket: str
    access_key_id: str
    secret_access_key: str

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


SETUP_CALLS = 4  # create_bucket, create_user, create_access_key, put_user_policy
SETUP_CALLS_PER_TENANT = 4  # the same, for each tenant


def _start_checking_moto(setup_calls: int, ready_timeout_s: float) -> tuple[subprocess.Popen, str, dict]:
    """A moto server process that checks signatures after `setup_calls` unsigned calls:
    the process, its URL and the keyword arguments of a boto3 client for the set-up."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
                               env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(setup_calls)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://{LOOPBACK}:{port}"
    deadline = time.monotonic() + ready_timeout_s
    while True:
        try:
            requests.get(f"{url}/moto-api/", timeout=1)
            break
        except requests.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("the credential-checking moto server did not start")
            time.sleep(0.1)
    setup = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "setup",
             "aws_secret_access_key": "setup"}
    return process, url, setup


def _user_with_policy(iam, name: str, resources: list[str]) -> dict:
    """An IAM user allowed every S3 action on `resources`, and its access key."""
    iam.create_user(UserName=name)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": resources}]}))
    return key


def start_locked_s3(bucket: str = "locked-results", ready_timeout_s: float = 30) -> LockedS3:
    process, url, setup = _start_checking_moto(SETUP_CALLS, ready_timeout_s)
    boto3.client("s3", **setup, config=Config(s3={"addressing_style": "path"})).create_bucket(Bucket=bucket)
    key = _user_with_policy(boto3.client("iam", **setup), "worker", ["*"])
    return LockedS3(process, url, bucket, key["AccessKeyId"], key["SecretAccessKey"])


@dataclass(frozen=True)
class Tenant:
    """One caller of a shared endpoint: its own bucket, and a key that may touch only it."""

    bucket: str
    access_key_id: str
    secret_access_key: str


@dataclass
class TenantS3:
    """A moto server that checks signatures and IAM policies, holding one bucket per
    tenant; each tenant's key is allowed its own bucket and nothing else (moto answers
    403 to anything else), as a platform that gives each user a bucket would set it up."""

    process: subprocess.Popen
    endpoint_url: str
    tenants: dict[str, Tenant]

    def client(self, tenant: str):
        """A boto3 client with `tenant`'s own credentials."""
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id=self.tenants[tenant].access_key_id,
                            aws_secret_access_key=self.tenants[tenant].secret_access_key,
                            config=Config(s3={"addressing_style": "path"}))

    def r2(self, tenant: str) -> dict:
        """`tenant`'s job bucket (`r2`)."""
        own = self.tenants[tenant]
        return {"endpoint_url": self.endpoint_url, "access_key_id": own.access_key_id,
                "secret_access_key": own.secret_access_key, "bucket_name": own.bucket, "region": "us-east-1"}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def start_tenant_s3(names: tuple[str, ...] = ("a", "b"), ready_timeout_s: float = 30) -> TenantS3:
    process, url, setup = _start_checking_moto(SETUP_CALLS_PER_TENANT * len(names), ready_timeout_s)
    s3 = boto3.client("s3", **setup, config=Config(s3={"addressing_style": "path"}))
    iam = boto3.client("iam", **setup)
    tenants = {}
    for name in names:
        bucket = f"tenant-{name}"
        s3.create_bucket(Bucket=bucket)
        key = _user_with_policy(iam, f"tenant-{name}", [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"])
        tenants[name] = Tenant(bucket, key["AccessKeyId"], key["SecretAccessKey"])
    return TenantS3(process, url, tenants)
