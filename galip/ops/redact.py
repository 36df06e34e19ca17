"""Credentials out of everything the project logs, shows or stores.

A tracking URI such as ``http://user:password@mlflow:5000`` or ``postgresql://user:password@db/x``
works as given, but its password must not reach a log line, a Prefect artifact or an MLflow param.
``redact`` rewrites every URI in a text: the password (or a bare token used as user name) becomes
``***`` and so do credential-like query parameters (``?token=``, presigned ``X-Amz-Signature=``).
"""

from __future__ import annotations

import logging
import re

MASK = "***"
# scheme://user[:password]@ ; the password runs to the last "@" before the path (an unescaped "@" in it too)
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^\s/@:]*)(?::(?P<password>[^\s/]*))?@")
_QUERY = re.compile(
    r"(?i)(?P<key>[?&](?:password|passwd|pwd|token|access_token|secret|api_key|apikey|sig|signature"
    r"|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&\s#\"']+"
)


def _userinfo(m: re.Match[str]) -> str:
    if m.group("password") is None:  # user@host: a bare user name may be a token (https://TOKEN@host)
        return f"{m.group('scheme')}{MASK}@"
    return f"{m.group('scheme')}{m.group('user')}:{MASK}@"


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced by ``***``."""
    if "://" not in text and "=" not in text:
        return text
    return _QUERY.sub(lambda m: m.group("key") + MASK, _USERINFO.sub(_userinfo, text))


def has_credentials(uri: str) -> bool:
    return redact(uri) != uri


class RedactFilter(logging.Filter):
    """Attach to a handler (or a logger): the record's message and traceback are redacted before output."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True
