"""Storage that misbehaves on purpose, on loopback: a fault-injecting HTTP proxy in front
of the moto S3 server, and a moto server that checks credentials.

    proxy = FaultyProxy(s3.endpoint_url)
    proxy.plan(Fault.status(500), Fault.status(500))   # the next two PUTs answer 500
    proxy.always(Fault.delay(2.0))                      # every PUT answers 2 s late
    proxy.count("PUT")                                  # how many PUTs reached the proxy

Faults apply to requests of one HTTP method (PUT unless told otherwise); every other
request passes through untouched.
"""

from __future__ import annotations

import http.client
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
    kind: str  # "status", "delay", "truncate", "fake_ok"
    http_status: int = 0
    code: str = ""
    seconds: float = 0.0
    keep: float = 1.0

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


class FaultyProxy:
    def __init__(self, upstream_url: str):
        self.upstream = urlsplit(upstream_url)
        self.methods_seen: list[str] = []
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

    def always(self, fault: Fault, method: str = "PUT") -> None:
        with self._lock:
            self._standing[method] = fault

    def count(self, method: str = "PUT") -> int:
        return self.methods_seen.count(method)

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
            self.methods_seen.append(method)
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
            if fault is None or fault.kind == "delay":
                self._forward(headers, body, delay_s=fault.seconds if fault else 0.0)
            elif fault.kind == "status":
                self._answer(fault.http_status, _s3_error(fault.code).encode(), {"Content-Type": "application/xml"})
            elif fault.kind == "fake_ok":
                self._answer(200, b"", {"ETag": '"00000000000000000000000000000000"'})
            elif fault.kind == "truncate":
                kept = {k: v for k, v in headers.items() if k.lower() not in _INTEGRITY_HEADERS
                        and not k.lower().startswith("x-amz-checksum-")}
                self._forward(kept, body[: int(len(body) * fault.keep)], delay_s=0.0)

        def _forward(self, headers: dict, body: bytes, delay_s: float) -> None:
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
            time.sleep(delay_s)
            self._answer(status, data, answer_headers, head_length=head_length)

        def _answer(self, status: int, data: bytes, headers: dict, head_length: str | None = None) -> None:
            try:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if self.command == "HEAD":
                    self.send_header("Content-Length", head_length or "0")
                    self.end_headers()
                else:
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
                self.close_connection = True

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


def start_locked_s3(bucket: str = "locked-results", ready_timeout_s: float = 30) -> LockedS3:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
                               env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_CALLS)},
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
    boto3.client("s3", **setup, config=Config(s3={"addressing_style": "path"})).create_bucket(Bucket=bucket)
    iam = boto3.client("iam", **setup)
    iam.create_user(UserName="worker")
    key = iam.create_access_key(UserName="worker")["AccessKey"]
    iam.put_user_policy(UserName="worker", PolicyName="results", PolicyDocument=(
        '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'))
    return LockedS3(process, url, bucket, key["AccessKeyId"], key["SecretAccessKey"])
