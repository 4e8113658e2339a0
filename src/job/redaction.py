"""The secret parts of URLs taken out of any text bound for an error or a log line.

A job's URLs carry credentials in their user info (`https://user:password@host/…`) and
query string (presigned URLs: `?X-Amz-Signature=…`). They reach texts in many shapes: a
URL where a URL belongs, a URL inside a mis-shaped entry echoed by the schema, a scheme
spelt another way (`hTTps://`, `S3://`), or a third-party exception's message. So the
rule works on text, not on keys: `redact` keeps a URL's scheme, host, port and path and
drops its user info, query and fragment, for any scheme in any case; and it drops the
query of scheme-less text that reads as a host or path (`host/file?sig=…`).
`RedactingFilter` applies it to every log record, tracebacks included.
"""

from __future__ import annotations

import logging
import re

# What ends a URL inside a text: white space, quotes and angle brackets (a repr or a log line).
_STOP = r"\s'\"<>`"
_URL = re.compile(rf"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<authority>[^{_STOP}/?#]*)(?P<path>[^{_STOP}?#]*)"
                  rf"(?:[?#][^{_STOP}]*)?")
# A query after something that reads as a host or a path (a '/', '.', ':' or '@' before the '?').
_SCHEMELESS_QUERY = re.compile(rf"(?P<head>[^{_STOP}?#]*[/.:@][^{_STOP}?#]*)[?#][^{_STOP}]+")


def redact(text: str) -> str:
    """`text` with every URL's user info, query string and fragment taken out."""
    if "?" not in text and "#" not in text and "@" not in text:
        return text  # nothing to take out: the common case, without running the patterns
    text = _URL.sub(_without_secrets, text)
    return _SCHEMELESS_QUERY.sub(r"\g<head>", text)


def _without_secrets(match: re.Match) -> str:
    host = match["authority"].rpartition("@")[2]
    return f"{match['scheme']}{host}{match['path']}"


class RedactingFilter(logging.Filter):
    """Redacts each record's message, traceback and stack before a handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
