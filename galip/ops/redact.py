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
# The same URI percent-encoded inside another one (a redirect target, a query value): scheme%3A%2F%2F
# user%3Apassword%40. The password stops at the first %40 ("@" inside it is itself encoded as %2540).
_ENCODED_USERINFO = re.compile(r"(?i)(?P<scheme>\b[a-z][a-z0-9+.-]*%3A%2F%2F)(?P<user>[^\s/@%]*)(?:%3A(?P<password>[^\s/@]*?))?%40")
_QUERY = re.compile(
    r"(?i)(?P<key>[?&](?:password|passwd|pwd|token|access_token|secret|api_key|apikey|sig|signature"
    r"|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&\s#\"']+"
)


def _userinfo(colon: str, at: str):
    def sub(m: re.Match[str]) -> str:
        if m.group("password") is None:  # user@host: a bare user name may be a token (https://TOKEN@host)
            return f"{m.group('scheme')}{MASK}{at}"
        return f"{m.group('scheme')}{m.group('user')}{colon}{MASK}{at}"

    return sub


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced by ``***`` (also where the URI is
    percent-encoded inside another)."""
    if "://" not in text and "=" not in text and "%3a%2f%2f" not in text.lower():
        return text
    text = _ENCODED_USERINFO.sub(_userinfo("%3A", "%40"), _USERINFO.sub(_userinfo(":", "@"), text))
    return _QUERY.sub(lambda m: m.group("key") + MASK, text)


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


_factory_installed = False


def redact_every_log_record() -> None:
    """Mask credentials in every log record of this process as it is created, whichever logger and
    handler it goes to: libraries with their own handlers (MLflow's system-metrics monitor warns
    "Failed to get mlflow run: API request to http://user:password@host ...") are covered too.
    Records are only created for enabled levels, so this costs nothing for suppressed debug logging."""
    global _factory_installed
    if _factory_installed:
        return
    make = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        RedactFilter().filter(record)
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True
