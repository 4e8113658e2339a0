"""Result images to an S3-compatible bucket, handed back as presigned GET URLs.

Works with AWS S3, Cloudflare R2, MinIO and moto (path-style addressing, SigV4).

Invariants: an upload counts only once the object reads back whole (a PUT, then a HEAD that
must show the uploaded size), so a URL is never handed out for a missing or partly written
object. Transient faults (connection errors, timeouts, 5xx and throttling, an incomplete
object) are retried with bounded, jittered exponential backoff (`UploadPolicy`); any other
error fails at once. Every request ends within its policy's time however slowly the server
answers (src/plumbing/s3_deadline.py), so an upload ends within `UploadPolicy.worst_case_s()`.
Errors name the bucket and what went wrong, never a credential. The worker's own bucket
(BUCKET_*) is trusted; a job's (`r2`) is not: `Bucket.for_job` checks its endpoint's
addresses first, and its clients connect only to those (src/plumbing/pinned_s3.py).
"""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from src.plumbing.config import BucketConfig, Settings
from src.plumbing.pinned_s3 import NO_PROXIES, pin_connections, watch_connections
from src.plumbing.s3_deadline import TimedOut, within
from src.plumbing.url_guard import AddressPolicy, resolve_checked

log = logging.getLogger(__name__)

# The client of other readers of the bucket (s3:// LoRA sources). They bound each
# operation in total with s3_deadline.within; botocore's retries would sleep past that
# deadline between attempts, so there is one attempt. Uploads use their own client (below).
_CLIENT_CONFIG = Config(
    signature_version="s3v4",
    s3={"addressing_style": "path"},
    retries={"mode": "standard", "total_max_attempts": 1},
    connect_timeout=5,
    read_timeout=30,
)
MAX_PARALLEL_UPLOADS = 8
# S3 error codes worth another attempt besides 5xx and 429 answers: throttling, and a
# body that arrived damaged or short (a checksum or length mismatch on the server).
TRANSIENT_S3_CODES = frozenset({
    "RequestTimeout", "SlowDown", "Throttling", "ThrottlingException", "TooManyRequests",
    "RequestLimitExceeded", "BadDigest", "IncompleteBody", "XAmzContentSHA256Mismatch",
})


# The longest S3 error code an error text repeats; the real ones are under 40 characters.
MAX_ERROR_CODE_CHARS = 64

# The job key a job bucket's endpoint is checked under.
JOB_ENDPOINT_KEY = "r2.endpoint_url"


class StorageError(RuntimeError):
    """An upload that did not complete; the message is safe to return to the caller."""


CONNECT_TIMEOUT_S = 5.0  # a reachable endpoint answers a TCP connect in well under this
BACKOFF_GROWTH = 8  # the backoff doubles up to this multiple of the first one


@dataclass(frozen=True)
class UploadPolicy:
    """How hard one object's upload tries. Each attempt is a PUT and a HEAD, each ending
    within `request_timeout_s()` in total, so an upload ends within `worst_case_s()`."""

    attempts: int = 4
    first_backoff_s: float = 0.5
    max_backoff_s: float = 4.0
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    read_timeout_s: float = 20.0

    @classmethod
    def from_settings(cls, settings: Settings) -> "UploadPolicy":
        """UPLOAD_ATTEMPTS, UPLOAD_TIMEOUT_S and UPLOAD_BACKOFF_S."""
        return cls(attempts=settings.upload_attempts, first_backoff_s=settings.upload_backoff_s,
                   max_backoff_s=BACKOFF_GROWTH * settings.upload_backoff_s,
                   connect_timeout_s=min(CONNECT_TIMEOUT_S, settings.upload_timeout_s),
                   read_timeout_s=settings.upload_timeout_s)

    def backoff_step_s(self, retry: int) -> float:
        """The backoff ceiling before retry number `retry` (1, 2, ...): doubling, capped."""
        return min(self.max_backoff_s, self.first_backoff_s * 2 ** (retry - 1))

    def backoff_s(self, retry: int) -> float:
        # Equal jitter: half the step fixed, half random, so workers that failed together
        # do not retry together, and a retry never comes sooner than half the step.
        step = self.backoff_step_s(retry)
        return step / 2 + random.uniform(0, step / 2)

    def request_timeout_s(self) -> float:
        """The longest one request (a PUT or a HEAD) may take: its connect and read timeouts."""
        return self.connect_timeout_s + self.read_timeout_s

    def worst_case_s(self) -> float:
        requests_s = self.attempts * 2 * self.request_timeout_s()
        return requests_s + sum(self.backoff_step_s(retry) for retry in range(1, self.attempts))


@dataclass(frozen=True)
class StoredObject:
    key: str
    url: str


class _Transient(Exception):
    """A failed attempt worth retrying; the message is an S3 code or an error type."""


class Bucket:
    """A bucket's clients: `client` for reads (such as s3:// LoRA sources), and uploads.

    `pinned_to`: the checked addresses of the endpoint's host, which every connection then
    goes to; None (the worker's own bucket) lets botocore resolve the host itself."""

    def __init__(self, config: BucketConfig, presign_expiry_s: int, policy: UploadPolicy = UploadPolicy(),
                 pinned_to: tuple[str, ...] | None = None):
        self.config = config
        self.presign_expiry_s = presign_expiry_s
        self.policy = policy
        self.pinned_to = pinned_to
        self.client = _client_for(config, pinned_to)
        # Uploads retry in `put`, where the read-back check is part of each attempt, so
        # their client does not retry by itself (that would multiply the attempts).
        self._uploads = _upload_client_for(config, policy, pinned_to)

    @classmethod
    def for_job(cls, config: BucketConfig, presign_expiry_s: int, policy: UploadPolicy,
                address_policy: AddressPolicy) -> "Bucket":
        """A job's own bucket: its endpoint's host is resolved once and checked against
        `address_policy` (UrlRefused naming `r2.endpoint_url` otherwise), before any
        connection; the bucket's clients then connect to those addresses only."""
        target = resolve_checked(config.endpoint_url or "", JOB_ENDPOINT_KEY, address_policy)
        return cls(config, presign_expiry_s, policy, pinned_to=target.addresses)

    def put_all(self, objects: list[tuple[str, bytes, str]]) -> list[StoredObject]:
        """Upload (key, data, content_type) triples in parallel; all succeed or StorageError."""
        if len(objects) == 1:
            return [self.put(*objects[0])]
        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_UPLOADS, len(objects))) as pool:
            return list(pool.map(lambda obj: self.put(*obj), objects))

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        """Upload and read back one object, retrying transient faults; StorageError otherwise."""
        started = time.monotonic()
        for attempt in range(1, self.policy.attempts + 1):
            try:
                self._put_once(key, data, content_type)
                break
            except _Transient as fault:
                if attempt == self.policy.attempts:
                    raise self._failed(f"{fault} ({attempt} attempts in {time.monotonic() - started:.1f} s)") from None
                log.info("upload of %s: %s; retrying (%d of %d attempts made)", key, fault, attempt,
                         self.policy.attempts)
                time.sleep(self.policy.backoff_s(attempt))
        url = self._uploads.generate_presigned_url(
            "get_object", Params={"Bucket": self.config.bucket_name, "Key": key}, ExpiresIn=self.presign_expiry_s,
        )
        return StoredObject(key=key, url=url)

    def _put_once(self, key: str, data: bytes, content_type: str) -> None:
        try:
            with within(self.policy.request_timeout_s()):
                self._uploads.put_object(Bucket=self.config.bucket_name, Key=key, Body=data,
                                         ContentType=content_type)
        except TimedOut:
            raise self._timed_out() from None
        except (ClientError, BotoCoreError) as exc:
            raise self._classify(exc) from None
        try:
            with within(self.policy.request_timeout_s()):
                head = self._uploads.head_object(Bucket=self.config.bucket_name, Key=key)
        except TimedOut:
            raise self._timed_out() from None
        except ClientError as exc:
            if _status(exc) == 404:  # the PUT was answered, yet nothing is there
                raise _Transient("object missing after upload") from None
            raise self._classify(exc) from None
        except BotoCoreError as exc:
            raise self._classify(exc) from None
        stored_bytes = head.get("ContentLength")
        if stored_bytes is None:  # a store that does not say: the upload cannot be confirmed
            raise self._failed("the read-back HEAD answered without a Content-Length, so the stored size "
                               "cannot be checked")
        if stored_bytes != len(data):
            raise _Transient(f"incomplete object ({stored_bytes} of {len(data)} bytes stored)")

    def _timed_out(self) -> _Transient:
        policy = self.policy
        return _Transient(f"no whole answer within {policy.request_timeout_s():g} s "
                          f"(UPLOAD_TIMEOUT_S {policy.read_timeout_s:g} s + {policy.connect_timeout_s:g} s to connect)")

    def _classify(self, exc: ClientError | BotoCoreError) -> Exception:
        """A transient fault to retry, or the StorageError to report now."""
        if isinstance(exc, ClientError):
            code = s3_error_code(exc)
            status = _status(exc)
            if status >= 500 or status == 429 or code in TRANSIENT_S3_CODES:
                return _Transient(code)
            return self._failed(code)
        if isinstance(exc, (BotoConnectionError, HTTPClientError)):  # refused, reset, timed out
            return _Transient(type(exc).__name__)
        return self._failed(type(exc).__name__)

    def _failed(self, reason: str) -> StorageError:
        return StorageError(f"storage: upload to bucket {self.config.bucket_name!r} failed: {reason}")


def s3_error_code(exc: ClientError) -> str:
    """The S3 error code of a failed request, as errors may show it: printable and short
    (a job's own endpoint chooses it), or the HTTP status where there is none."""
    code = str(exc.response.get("Error", {}).get("Code") or "")
    code = "".join(char for char in code if char.isprintable())[:MAX_ERROR_CODE_CHARS]
    return code or str(_status(exc) or "unknown")


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


# Clients are cached by the addresses they are pinned to as well: a job whose host now
# resolves elsewhere is checked again and gets a client of its own.
@lru_cache(maxsize=8)
def _client_for(config: BucketConfig, pinned_to: tuple[str, ...] | None = None):
    """One client per bucket configuration: building one costs ~50 ms, and jobs repeat them."""
    return _make_client(config, _CLIENT_CONFIG, pinned_to)


@lru_cache(maxsize=8)
def _upload_client_for(config: BucketConfig, policy: UploadPolicy, pinned_to: tuple[str, ...] | None = None):
    return _make_client(config, Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=policy.connect_timeout_s,
        read_timeout=policy.read_timeout_s,
    ), pinned_to)


def _make_client(config: BucketConfig, client_config: Config, pinned_to: tuple[str, ...] | None):
    if pinned_to is not None:
        client_config = client_config.merge(NO_PROXIES)
    client = boto3.client(
        "s3",
        endpoint_url=config.endpoint_url,
        aws_access_key_id=config.access_key_id,
        aws_secret_access_key=config.secret_access_key,
        # R2 wants "auto"; AWS needs a real region when none is given.
        region_name=config.region or ("auto" if config.endpoint_url else "us-east-1"),
        config=client_config,
    )
    if pinned_to is not None:
        pin_connections(client, pinned_to)
    else:
        watch_connections(client)
    return client
