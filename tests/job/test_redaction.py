"""URL secrets out of texts (src/job/redaction.py): what `redact` keeps and drops, and the
log filter on messages, arguments and tracebacks."""

from __future__ import annotations

import io
import logging

import pytest

from src.job.redaction import RedactingFilter, redact

SIGNATURE = "X-Amz-Signature=9f8e7d6c5b4a"


@pytest.mark.parametrize("text, expected", [
    (f"https://bucket.example/a/b.safetensors?{SIGNATURE}", "https://bucket.example/a/b.safetensors"),
    ("https://user:hunter2@host.example:8443/x?token=abc#frag", "https://host.example:8443/x"),
    ("hTTpS://host/x?sig=abc", "hTTpS://host/x"),
    ("S3://bucket/key?versionId=abc", "S3://bucket/key"),
    ("ftp://user:hostile-password@host", "ftp://host"),
    (f"got {{'source': 'https://h/x.safetensors?{SIGNATURE}', 'scale': 1.0}}",
     "got {'source': 'https://h/x.safetensors', 'scale': 1.0}"),
    (f"no file at '/runpod-volume/https:/h/x?{SIGNATURE}'", "no file at '/runpod-volume/https:/h/x'"),
    (f"host.example/x.png?{SIGNATURE} and http://a/b?c=d", "host.example/x.png and http://a/b"),
    ("https://h/x#access_token=abc", "https://h/x"),
])
def test_user_info_query_and_fragment_are_taken_out(text, expected):
    assert redact(text) == expected
    assert redact(expected) == expected


@pytest.mark.parametrize("text", [
    "prompt: is it blue? make it so", "a?b=c", "steps: 'why?'", "seed: input should be less than 4294967296",
    "https://host.example/a/b.safetensors", "user@example.com wrote", "loras[0].source: 's3://bucket/key'",
])
def test_text_without_url_secrets_is_left_as_it_is(text):
    assert redact(text) == text


def test_the_log_filter_redacts_messages_arguments_and_tracebacks():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("tests.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("fetching %s", f"https://host/a.png?{SIGNATURE}")
        logger.warning(f"inline https://u:hunter2@host/b.png?{SIGNATURE}")
        try:
            raise ValueError(f"could not read https://host/c.safetensors?{SIGNATURE}")
        except ValueError:
            logger.exception("job failed")
    finally:
        logger.removeHandler(handler)
    written = stream.getvalue()
    assert "https://host/a.png" in written and "https://host/b.png" in written
    assert "ValueError: could not read https://host/c.safetensors" in written  # the traceback is kept
    assert "9f8e7d6c5b4a" not in written and "hunter2" not in written and "X-Amz" not in written
