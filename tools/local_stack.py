"""The worker's local stack: a loopback S3 (moto's server mode) and the runpod SDK's
local API server running handler.py. Used by `make demo` and by the tests."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@dataclass
class LocalS3:
    """A moto S3 server on loopback with one bucket. The credentials are arbitrary:
    moto accepts any, which is why the tests can use made-up secrets."""

    server: object
    endpoint_url: str
    bucket: str
    access_key_id: str = "local-access-key"
    secret_access_key: str = "local-secret-key"
    region: str = "us-east-1"

    def env(self, prefix: str = "qwen-edit") -> dict[str, str]:
        return {
            "BUCKET_ENDPOINT_URL": self.endpoint_url,
            "BUCKET_ACCESS_KEY_ID": self.access_key_id,
            "BUCKET_SECRET_ACCESS_KEY": self.secret_access_key,
            "BUCKET_NAME": self.bucket,
            "BUCKET_REGION": self.region,
            "BUCKET_PREFIX": prefix,
        }

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key)

    def stop(self) -> None:
        self.server.stop()


def start_s3(bucket: str = "qwen-results") -> LocalS3:
    from moto.server import ThreadedMotoServer  # heavy import, only where a server is wanted

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=port, verbose=False)
    server.start()
    s3 = LocalS3(server=server, endpoint_url=f"http://{LOOPBACK}:{port}", bucket=bucket)
    s3.client().create_bucket(Bucket=bucket)
    return s3


@dataclass
class LocalApi:
    process: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_api(env: dict[str, str], log_path: Path, ready_timeout_s: float = 300) -> LocalApi:
    """`python handler.py --rp_serve_api` with `env` added to this environment; returns
    once the server answers (the worker loads and warms up before it listens)."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-u", "handler.py", "--rp_serve_api", "--rp_api_host", LOOPBACK,
             "--rp_api_port", str(port)],
            cwd=REPO_ROOT, env={**os.environ, **env}, stdout=log_file, stderr=subprocess.STDOUT,
        )
    api = LocalApi(process=process, url=f"http://{LOOPBACK}:{port}", log_path=log_path)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode} before serving:\n{api.log()[-3000:]}")
        try:
            if requests.get(f"{api.url}/docs", timeout=2).status_code == 200:
                return api
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    api.stop()
    raise RuntimeError(f"worker not serving after {ready_timeout_s} s:\n{api.log()[-3000:]}")
