"""The two kinds of failure a user is told about in one sentence, without a traceback, and the
masking that keeps secrets out of every such sentence, log and record.

UserError: a problem in the user's input (a bad path, flag or data file, unapproved data); the
message names the problem and the fix; exit code 2. RunFailed: a run that cannot go on for a
reason the message states (the loss became NaN, the disk filled up); exit code 1. The runner
that prints them (and everything else) is nanostoney.cli.run_main.
"""
import os
import re


class UserError(Exception):
    """A problem in the user's input; the message names the problem and the fix."""


class RunFailed(Exception):
    """A run stopped for a reason the message states; what it had finished is intact."""


REDACTED = "<redacted>"
# name parts (split on _ - . space) that mark a secret: api_key, hf_token, WANDB_API_KEY, ...
_SECRET_PARTS = {"key", "apikey", "token", "secret", "password", "passwd", "credential",
                 "credentials", "auth", "bearer", "cookie"}


def looks_secret(name):
    parts = re.split(r"[_\-.\s/]+", str(name).lower())
    return any(p in _SECRET_PARTS for p in parts)


def secret_values():
    """Values of environment variables whose names look secret (to mask them in any text)."""
    return [v for k, v in os.environ.items() if looks_secret(k) and len(v) >= 6]


def mask_secrets(text):
    """Replace every secret environment value inside `text` with <redacted>."""
    text = str(text)
    for value in secret_values():
        text = text.replace(value, REDACTED)
    return text


def first_line(e):
    """The first non-blank line of an exception's message, secrets masked."""
    lines = [ln.strip() for ln in mask_secrets(e).splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(e).__name__
