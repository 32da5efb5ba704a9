"""The two failures a user is told about in one sentence, without a traceback (printed by
cli.run_main), and the masking that keeps secrets out of every such sentence, log and record."""
import os
import re


class UserError(Exception):
    """A problem in the user's input; the message names the problem and the fix (exit 2)."""


class RunFailed(Exception):
    """A run stopped for a reason the message states; what it had finished is intact (exit 1)."""


REDACTED = "<redacted>"
# name parts (split on _ - . space) that mark a secret: api_key, hf_token, WANDB_API_KEY, ...
_SECRET_PARTS = {"key", "apikey", "token", "secret", "password", "passwd", "credential",
                 "credentials", "auth", "bearer", "cookie"}


def looks_secret(name):
    return any(p in _SECRET_PARTS for p in re.split(r"[_\-.\s/]+", str(name).lower()))


def mask_secrets(text):
    """`text` with the value of every secret-looking environment variable replaced by <redacted>."""
    text = str(text)
    for k, v in os.environ.items():
        if looks_secret(k) and len(v) >= 6:
            text = text.replace(v, REDACTED)
    return text


def first_line(e):
    """The first non-blank line of an exception's message, secrets masked."""
    lines = [ln.strip() for ln in mask_secrets(e).splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(e).__name__
