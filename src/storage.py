"""Result images to an S3-compatible bucket, handed back as presigned GET URLs.

Works with AWS S3, Cloudflare R2, MinIO and moto (path-style addressing, SigV4).
Error texts name the bucket and the S3 error code, never a credential.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from src.config import BucketConfig

# Connect and read timeouts keep a dead endpoint from holding a paid GPU for minutes;
# botocore's standard retry mode backs off on throttling and 5xx answers.
_CLIENT_CONFIG = Config(
    signature_version="s3v4",
    s3={"addressing_style": "path"},
    retries={"mode": "standard", "max_attempts": 4},
    connect_timeout=5,
    read_timeout=30,
)
MAX_PARALLEL_UPLOADS = 8


class StorageError(RuntimeError):
    """An upload that did not complete; the message is safe to return to the caller."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    url: str


class Bucket:
    def __init__(self, config: BucketConfig, presign_expiry_s: int):
        self.config = config
        self.presign_expiry_s = presign_expiry_s
        self._client = _client_for(config)

    def put_all(self, objects: list[tuple[str, bytes, str]]) -> list[StoredObject]:
        """Upload (key, data, content_type) triples in parallel; all succeed or StorageError."""
        if len(objects) == 1:
            return [self.put(*objects[0])]
        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_UPLOADS, len(objects))) as pool:
            return list(pool.map(lambda obj: self.put(*obj), objects))

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        try:
            self._client.put_object(Bucket=self.config.bucket_name, Key=key, Body=data, ContentType=content_type)
            url = self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.config.bucket_name, "Key": key},
                ExpiresIn=self.presign_expiry_s,
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "unknown")
            raise StorageError(f"storage: upload to bucket {self.config.bucket_name!r} failed: {code}") from None
        except BotoCoreError as exc:
            raise StorageError(f"storage: upload to bucket {self.config.bucket_name!r} failed: "
                               f"{type(exc).__name__}") from None
        return StoredObject(key=key, url=url)


@lru_cache(maxsize=8)
def _client_for(config: BucketConfig):
    """One client per bucket configuration: building one costs ~50 ms, and jobs repeat them."""
    return boto3.client(
        "s3",
        endpoint_url=config.endpoint_url,
        aws_access_key_id=config.access_key_id,
        aws_secret_access_key=config.secret_access_key,
        # R2 wants "auto"; AWS needs a real region when none is given.
        region_name=config.region or ("auto" if config.endpoint_url else "us-east-1"),
        config=_CLIENT_CONFIG,
    )
