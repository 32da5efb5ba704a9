#!/usr/bin/env python3
"""
Rent a Lambda Cloud GPU node, run the speedrun on it, bring the results back, terminate the node.

    export LAMBDA_API_KEY=...     # create one at https://cloud.lambda.ai/api-keys
    export WANDB_API_KEY=...      # optional: without it the speedrun logs to W&B offline (fetched back)
    python launch_lambda.py --dry-run                    # plan, expected and worst-case cost; launches nothing
    python launch_lambda.py --ssh-key my-key --hours 4   # the real thing: asks you to type yes (or --yes)
    python launch_lambda.py --ssh-key my-key -- --depth 12   # arguments after -- go to the speedrun
    python launch_lambda.py --cleanup                    # terminate every live nanostoney-* instance

Top to bottom: list instance types (prices, regions with capacity) -> pick type and region ->
check the SSH key -> launch (next region on insufficient capacity) -> poll until active -> copy the
repo (git ls-files) -> start `bash run_stoney_small.sh` detached on the node -> follow its log ->
copy the results back -> terminate the node and confirm it. Standard library only, so it runs from
any laptop with Python 3 and ssh.

A paid node is never left running silently (an 8xH100 node costs about $24 an hour):
- every ending (success, failure, Ctrl-C, SIGTERM, SIGHUP from a closed terminal, SIGQUIT) fetches
  what the run left and then terminates, unless --keep; further signals during that are counted,
  not obeyed (during the fetch the first one shortens it to a minute, a second one ends it; what
  arrived is kept). A signal ignored when we start (nohup) stays so;
- a print never raises: with stdout's reader gone (`| tee` killed by the same Ctrl-C, a closed
  terminal) text goes to stderr, then nowhere;
- terminate is retried with backoff that honours Retry-After for as long as the API fails (after a
  signal, or with the terminal gone, a detached child carries on after DETACH_SECONDS), and counts as
  done only when the API's own JSON says terminating/terminated or "does not exist" and the instance
  list agrees: a proxy's 404 page is no answer. Instances it cannot confirm are named, with the
  dashboard URL, and the exit code is 1;
- every id we may have started is written to --out-dir/UNTERMINATED the moment we know it, and all
  we print also goes to --out-dir/launch.log, so a dead launcher or a killed `| tee` loses neither.
  The next launch reads UNTERMINATED first and rents nothing while one of them may still bill;
- a launch whose answer was lost (timeout, 5xx, a garbled answer, Ctrl-C) may still have started a
  node: we look for its unique name in the instance list for several minutes, and a provider error
  is resent only after looking;
- the node ends its own bill (on by default, --no-watchdog turns it off): lambda_watchdog.py runs
  on the node as root and terminates the instance through the API at --max-hours plus the copy's
  bound and NODE_GRACE_MIN, or when this launcher's heartbeat (a file touched by every poll) stops for
  --heartbeat-minutes. Its key goes over ssh stdin into a root-only file on /run (tmpfs), which it
  reads and deletes. The run itself lives under `timeout` (--max-hours) and a power-off is
  scheduled as a last net (it does not end the bill: Lambda bills a powered-off node).

Secrets. The Lambda key comes from LAMBDA_API_KEY or --api-key-file, never from the command line
(argv is visible to every user of the machine in `ps`), is redacted from every message we print and
travels to the API (https, plain http only to localhost for tests, and no redirects, which would
carry the Authorization header elsewhere) and, for the watchdog, to the node on ssh's stdin. No file
named like a secret (.env, *.key), the --api-key-file, or a file holding a key we know is shipped to
the node, whatever .gitignore says. The W&B key travels to the node on ssh's stdin: the
remote shell `read`s one line into WANDB_API_KEY, exports it and starts the speedrun, so the key
lives only in that process tree's environment -- never on a command line (local or remote `ps`), in
a file on the node, or in a log. We did not use ssh's SendEnv because sshd silently drops variables
missing from its AcceptEnv list (Ubuntu's default accepts only LANG and LC_*).

API: Lambda Cloud API v1, spec in ../shared/lambda/lambda_openapi.json (the subset the tests use is
in tests/fixtures/lambda_openapi_subset.json). Its limits are honoured: at most one request per
second overall and one launch per 12 seconds. provider/* errors and 429 are retried, and so are 5xx,
network errors and garbled answers except on launch; every other error is printed with its `code`,
`message` and `suggestion`.

Exit codes: 0 done; 1 API or remote failure, or an instance we could not confirm stopped (its id is
printed); 2 bad input (fix the command); 3 the run ended well but its results did not all come back
(what arrived is kept); 130 interrupted by a signal (the node was still terminated).
"""
import argparse
import email.utils
import fnmatch
import http.client
import io
import json
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

DEFAULT_API_BASE = "https://cloud.lambda.ai/api/v1"  # the spec's production server
API_KEYS_URL = "https://cloud.lambda.ai/api-keys"  # the spec's x-lambda-api-keys-config-url
DASHBOARD_URL = "https://cloud.lambda.ai/instances"
DEFAULT_TYPE = "gpu_8x_h100_sxm5"  # 8x H100 80GB SXM5, the nanochat speedrun node
REMOTE_DIR = "nanostoney"  # on the node, relative to the ssh user's home
SPEEDRUN = "run_stoney_small.sh"
# The launcher's own files on the node, next to the repo; the speedrun's outputs go to its --out.
NODE_LOG, NODE_EXIT, NODE_PID = ".launch_log", ".launch_exit", ".launch_pid"
NODE_HEARTBEAT, WATCHDOG_LOG, WATCHDOG_PID = ".launch_heartbeat", ".watchdog_log", ".watchdog_pid"
# Brought back by default, under the speedrun's --out: small files only (checkpoints: --fetch).
FETCH_UNDER_OUT = ("report", "eval", "logs", "stage_times.tsv", "*/metrics.jsonl", "*/wandb")
# The node powers off this long after --max-hours: time to fetch a run cut short (logins stop 5 min
# before a scheduled power-off, and the launcher sees the deadline within a poll).
NODE_GRACE_MIN = 10
INTERRUPTED_FETCH_SECONDS = 60  # after a signal: its sender (shutdown, tmux kill) won't wait long
SECRET_ENV = ("LAMBDA_API_KEY", "WANDB_API_KEY")
SECRET_NAMES = (".env", ".env.*", "*.key", "*.pem")  # never shipped, ignored by git or not
GONE = ("terminated", "terminating", "preempted")  # statuses that no longer run
TERMINATED = ("terminated", "terminating")  # what counts as "the bill has ended" (preempted may not)
NOT_FOUND = "global/object-does-not-exist"  # the spec's 404 code: the API does not know the id
NAME_PREFIX = "nanostoney-"  # every instance we launch is named so; --cleanup ends them all
LEDGER = "UNTERMINATED"  # under --out-dir: ids we started and have not yet seen terminated
LOG_NAME = "launch.log"  # under --out-dir: everything we print, redacted, appended run after run
WATCHDOG = Path(__file__).resolve().parent / "lambda_watchdog.py"
NODE_RUN_DIR = "/run/nanostoney"  # root-only, on the node's tmpfs: the watchdog's key, for milliseconds
# With the watchdog the power-off waits this much longer, so a watchdog whose terminate meets an API
# outage at its deadline keeps trying with the node still up (a powered-off node still bills).
WATCHDOG_RETRY_MIN = 30
SSH_TRIES, SSH_CONNECT_TIMEOUT = 40, 15
UPLOAD_SECONDS = 600
DETACH_SECONDS = 30  # a failing cleanup after a signal, or with the terminal gone, goes on detached after this
MAX_HOURS_LIMIT = 24  # above this, --max-hours needs --allow-long-runs
EXIT_RESULTS_MISSING = 3  # the run ended well but its results did not all come back
INSUFFICIENT_CAPACITY = "instance-operations/launch/insufficient-capacity"
BAD_ANSWER = "http/bad-answer"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
TAR_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4 / 3.12

NEED_KEY = (f"launch_lambda.py needs a Lambda Cloud API key in the LAMBDA_API_KEY environment variable "
            f"(create one at {API_KEYS_URL}), even for --dry-run, which reads prices and capacity from the API.")


class Clock:
    """Time as the launcher sees it. scale > 1 (tests only, --time-scale) makes simulated time pass
    faster, so a test can live through a 20-minute API outage in seconds with every bound unchanged."""
    scale = 1.0

    @classmethod
    def now(cls):
        return time.monotonic() * cls.scale

    @classmethod
    def sleep(cls, seconds):
        time.sleep(max(seconds, 0.0) / cls.scale)


class UserError(Exception):
    """Something the user can fix in the command or the account; exit code 2."""


class RemoteError(Exception):
    """The node or the speedrun on it failed; exit code 1."""


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived. A KeyboardInterrupt, so that no `except Exception` swallows it."""


class ApiError(Exception):
    """An error answer from the Lambda API, in the spec's shape {"error": {code, message, suggestion}},
    or our stand-in for one (network/error, http/bad-answer)."""

    def __init__(self, status, code, message, suggestion=None, retry_after=None):
        self.status, self.code, self.retry_after = status, code, retry_after
        self.message, self.suggestion = redact(message or ""), redact(suggestion or "")
        super().__init__(f"{code}: {self.message}")

    @property
    def lost(self):
        """True when we cannot tell whether the request took effect: no answer, a 5xx that is not the
        API's own provider/* error, or an answer we could not read."""
        return (self.status is None or self.code == BAD_ANSWER
                or (self.status >= 500 and not self.code.startswith("provider/")))


# ---------------------------------------------------------------------------------------------------
# Secrets: remember every secret we read so that anything we print can be scrubbed of it.

_SECRETS = []


def remember_secret(value):
    if value and value not in _SECRETS:
        _SECRETS.append(value)
    return value


def redact(text):
    text = str(text)
    for s in _SECRETS:
        text = text.replace(s, "***")
    return text


def read_api_key(key_file):
    if key_file:
        try:
            key = Path(key_file).read_text().strip()
        except OSError as e:
            # not naming the path: a user who typed the key itself in its place must not see it echoed
            raise UserError(f"cannot read the file given to --api-key-file ({e.strerror}); "
                            f"point it at a file holding only your Lambda API key.") from None
    else:
        key = os.environ.get("LAMBDA_API_KEY", "").strip()
    if not key:
        raise UserError(NEED_KEY)
    return remember_secret(key)


# ---------------------------------------------------------------------------------------------------
# Output that cannot fail, and signals that cannot skip the cleanup

_DEAD = set()  # "stdout" / "stderr" once its reader is gone
_LOG = []  # [file, path] of our own log, once open: what we print survives a killed `| tee` or a closed window


def open_log(out_dir):
    path = Path(out_dir) / LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    _LOG[:] = [os.fdopen(fd, "a", buffering=1), path]
    _LOG[0].write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} launch_lambda.py {os.getpid()}\n")
    return path


def _to_log(text):
    try:
        if _LOG:
            _LOG[0].write(text)
    except (OSError, ValueError):
        _LOG.clear()


def say(text="", err=False, end="\n"):
    """print() that never raises. A write to a pipe whose reader exited (EPIPE) or to a closed
    terminal (EIO) moves on to the other stream, then to silence: a print must never abort a cleanup
    that still has a node to terminate."""
    text = redact(text) + end
    _to_log(text)
    for name in ("stderr", "stdout") if err else ("stdout", "stderr"):
        if name in _DEAD:
            continue
        stream = getattr(sys, name)
        try:
            stream.write(text)
            stream.flush()
            return
        except (OSError, ValueError):
            _DEAD.add(name)
            _drain_to_devnull(stream)


def _drain_to_devnull(stream):
    """Point a dead stream's file descriptor at /dev/null, so what is still buffered in it drains there
    rather than failing again at exit (which would also turn our exit code into 120)."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, stream.fileno())
        os.close(fd)
    except (OSError, ValueError):
        pass


class _Signals:
    armed = True  # the next stop signal raises Interrupted; False while cleaning up
    seen = []  # every stop signal received, for the exit code


def on_signal(signum, frame):
    _Signals.seen.append(signum)
    if _Signals.armed:
        _Signals.armed = False  # one raise per arming: nothing can interrupt whoever handles this one
        raise Interrupted(signum)


def guarded(fn, *args):
    """Run fn(*args) with signals armed and return (result, exception), disarmed whatever happened.
    The first signal stops fn; since the handler disarms itself before raising, no later signal can
    escape between fn's end and the caller's cleanup: from then on signals are only counted."""
    try:
        try:
            _Signals.armed = True
            return fn(*args), None
        finally:
            _Signals.armed = False
    except BaseException as e:  # Interrupted included: the caller decides
        return None, e


# ---------------------------------------------------------------------------------------------------
# Rate limiting and the API client

class RateLimiter:
    """Spaces calls: a call waits until every bucket it names has been quiet for that bucket's interval.

    Lambda allows one request per second overall ("any") and one launch per 12 seconds ("launch").
    clock and sleep are parameters so tests can check the spacing with a fake clock, not real time.
    """

    def __init__(self, intervals, clock=Clock.now, sleep=Clock.sleep):
        self.intervals, self.clock, self.sleep = dict(intervals), clock, sleep
        self.last = {}  # bucket -> clock time of its last call

    def wait(self, *buckets):
        now = self.clock()
        ready = max((self.last[b] + self.intervals[b] for b in buckets if b in self.last), default=now)
        if ready > now:
            self.sleep(ready - now)
            now = self.clock()
        for b in buckets:
            self.last[b] = now


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):  # a followed redirect would carry our Authorization header along
        return None


class LambdaAPI:
    """The few Lambda Cloud API v1 endpoints we use. Every attempt waits its turn on the limiter."""

    def __init__(self, base, key, interval=1.0, launch_interval=12.0, retries=5, backoff=2.0,
                 clock=Clock.now, sleep=Clock.sleep, timeout=60):
        self.base = base.rstrip("/")
        self._key = key
        self.limiter = RateLimiter({"any": interval, "launch": launch_interval}, clock, sleep)
        self.retries, self.backoff, self.sleep, self.timeout = retries, backoff, sleep, timeout
        self.opener = urllib.request.build_opener(_NoRedirect)

    def __repr__(self):  # never show the key, even in a debugger or a traceback's locals
        return f"LambdaAPI({self.base!r})"

    def request(self, method, path, body=None, launch=False, retries=None, before_resend=None):
        """Send one request, retrying what is safe to retry (see retryable) with exponential backoff.
        before_resend(), when given, runs before each resend; a true answer is returned instead."""
        retries = self.retries if retries is None else retries
        buckets = ("any", "launch") if launch else ("any",)
        for attempt in range(retries + 1):
            self.limiter.wait(*buckets)
            try:
                return self._send(method, path, body)
            except ApiError as e:
                if attempt == retries or not retryable(e, launch):
                    raise
                delay = max(min(self.backoff * 2 ** attempt, 60.0), min(e.retry_after or 0, 300.0))
                say(f"lambda api: {e.code}: {e.message}; retrying in {delay:.1f}s ({attempt + 1}/{retries})")
                self.sleep(delay)
                found = before_resend() if before_resend else None
                if found:
                    return found

    def _send(self, method, path, body):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self._key}", "Accept": "application/json",
            "Content-Type": "application/json", "User-Agent": "nanostoney-launch-lambda"})
        try:
            with self.opener.open(req, timeout=self.timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            raise http_error(e) from None
        except (OSError, http.client.HTTPException) as e:  # refused, reset, DNS, timeout, cut-off answer
            raise ApiError(None, "network/error", f"{method} {path} failed: {e!r}",
                           "check your network connection and --api-base, then try again") from None
        try:
            return json.loads(raw)["data"]
        except (ValueError, KeyError, TypeError):  # a proxy's page, a truncated body
            raise ApiError(status, BAD_ANSWER, f"{method} {path}: the answer is not the API's JSON: "
                           f"{raw[:200].decode('utf-8', 'replace')!r}") from None

    def instance_types(self):
        return self.request("GET", "/instance-types")

    def ssh_keys(self):
        return self.request("GET", "/ssh-keys")

    def launch(self, body, find=None):
        """find() -> ids of a node this launch already started (looked up by name before resending)."""
        before = (lambda: {"instance_ids": found} if (found := find()) else None) if find else None
        data = self.request("POST", "/instance-operations/launch", body, launch=True, before_resend=before)
        ids = data.get("instance_ids") if isinstance(data, dict) else None
        if not ids:  # it may have launched all the same: treat it like a lost answer
            raise ApiError(200, BAD_ANSWER, f"the launch answer holds no instance ids: {str(data)[:200]}")
        return ids

    def instance(self, instance_id, retries=None):
        return self.request("GET", f"/instances/{instance_id}", retries=retries)

    def instances(self, retries=None):
        return self.request("GET", "/instances", retries=retries)

    def terminate(self, instance_ids, retries=None):
        return self.request("POST", "/instance-operations/terminate",
                            {"instance_ids": sorted(instance_ids)}, retries=retries)


def retryable(e, launch):
    """provider/* (upstream hiccups) and 429 are answers that nothing happened: always retried. 5xx,
    network errors and garbled answers leave a launch's outcome unknown: never resent (see
    find_lost_launch), but a GET or a terminate is safe to repeat."""
    if e.code.startswith("provider/") or e.status == 429:
        return True
    return not launch and e.lost


def http_error(e):
    """An ApiError from urllib's HTTPError: the spec's error shape if the body has it."""
    try:
        raw = e.read()
    except (OSError, http.client.HTTPException):
        raw = b""
    retry_after = retry_after_seconds(e.headers.get("Retry-After") if e.headers else None)
    if 300 <= e.code < 400:
        return ApiError(e.code, f"http/{e.code}", "the API answered with a redirect, which we do not follow "
                        "(it would carry your key to another address)", "check --api-base")
    try:
        err = json.loads(raw)["error"]
        return ApiError(e.code, err.get("code") or f"http/{e.code}", err.get("message"), err.get("suggestion"),
                        retry_after)
    except (ValueError, KeyError, TypeError, AttributeError):  # not the spec's shape (a proxy, an outage page)
        return ApiError(e.code, f"http/{e.code}", raw.decode("utf-8", "replace")[:300], None, retry_after)


def retry_after_seconds(value):
    """Retry-After is seconds or an HTTP date (RFC 9110); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def check_api_base(base):
    """https only; plain http just for a local fake API (the key must never cross a network in clear)."""
    url = urllib.parse.urlsplit(base)
    if url.scheme == "https" or (url.scheme == "http" and url.hostname in ("localhost", "127.0.0.1", "::1")):
        return base
    raise UserError(f"--api-base must be an https:// URL (plain http only for localhost), not {base!r}; "
                    f"the default is {DEFAULT_API_BASE}.")


# ---------------------------------------------------------------------------------------------------
# Choosing what to rent

def pick_type_and_regions(types, type_name, region=None):
    """Return (instance_type dict, regions to try in order, regions with capacity now)."""
    if type_name not in types:
        raise UserError(f"Lambda does not offer instance type {type_name!r}; choose one of "
                        f"{', '.join(sorted(types))} with --type.")
    item = types[type_name]
    capacity = [r["name"] for r in item["regions_with_capacity_available"]]
    if region:
        return item["instance_type"], [region] if region in capacity else [], capacity
    return item["instance_type"], capacity, capacity


def types_with_capacity(types):
    return ", ".join(f"{name} ({', '.join(r['name'] for r in item['regions_with_capacity_available'])})"
                     for name, item in sorted(types.items()) if item["regions_with_capacity_available"]) or "none"


def resolve_ssh_key(api, wanted):
    """The SSH key name to launch with; it must exist in the account, or the node is unreachable."""
    names = [k["name"] for k in api.ssh_keys()]
    if wanted in names:
        return wanted
    if wanted is None and len(names) == 1:
        return names[0]
    have = ", ".join(names) if names else "none yet (add one in the Lambda Cloud dashboard, SSH keys)"
    what = f"there is no SSH key named {wanted!r} in your Lambda account" if wanted else "pass --ssh-key NAME"
    raise UserError(f"{what}; your SSH keys: {have}.")


def shutdown_minutes(max_hours, watchdog):
    return math.ceil(max_hours * 60) + NODE_GRACE_MIN + (WATCHDOG_RETRY_MIN if watchdog else 0)


def watchdog_deadline_seconds(max_hours):
    """From the watchdog's start, which comes before the copy: the cap, the copy's bound and the grace
    (the launcher's time to fetch a run cut short), so it never ends a run before --max-hours does."""
    return max_hours * 3600 + UPLOAD_SECONDS + NODE_GRACE_MIN * 60


def worst_case_seconds(args):
    """Every bound from the launch to the terminate: a lost launch answer, boot, ssh, the copy, the
    run's cap, then the fetch (or the watchdog's grace, whichever is longer)."""
    ssh = SSH_TRIES * (SSH_CONNECT_TIMEOUT + args.poll_seconds)
    return (args.lost_launch_seconds + args.boot_timeout_min * 60 + ssh + UPLOAD_SECONDS
            + args.max_hours * 3600 + max(NODE_GRACE_MIN * 60, args.fetch_seconds))


def print_plan(args, itype, regions, capacity, ssh_key, files, secret):
    price = itype["price_cents_per_hour"] / 100
    wandb = "online (key sent on ssh stdin)" if os.environ.get("WANDB_API_KEY") else "offline (WANDB_API_KEY not set)"
    speedrun = " ".join(["bash", SPEEDRUN, *map(shlex.quote, args.speedrun_args)])
    then = f" (then {', '.join(regions[1:])} if it runs out of capacity)" if len(regions) > 1 else ""
    worst_h = worst_case_seconds(args) / 3600
    say("plan:")
    say(f"  instance type  {itype['name']} -- {itype['description']}, ${price:.2f}/h")
    say(f"  region         {regions[0] if regions else 'none: no capacity right now'}{then} "
        f"(capacity now in: {', '.join(capacity) or 'none'})")
    say(f"  ssh key        {ssh_key} (user {args.ssh_user})")
    say(f"  copy           {len(files)} files (git ls-files) to ~/{REMOTE_DIR}"
        + (f"; withheld as secrets: {', '.join(secret)}" if secret else ""))
    say(f"  run            {speedrun}, W&B {wandb}")
    say(f"  bring back     {', '.join(args.fetch)} -> {args.out_dir}/<instance name>/ (up to {args.fetch_seconds:g} s)")
    say(f"  afterwards     {'keep the instance running (--keep)' if args.keep else 'terminate the instance'}")
    say(f"  log            {Path(args.out_dir) / LOG_NAME}; live ids in {Path(args.out_dir) / LEDGER}")
    say(f"  node-side cap  the run is stopped on the node after {args.max_hours:g} h (--max-hours)")
    if args.watchdog:
        late = (watchdog_deadline_seconds(args.max_hours) - args.max_hours * 3600) / 60
        say(f"  watchdog       on: the node terminates itself at most {late:.0f} min after the cap, or after "
            f"{args.heartbeat_minutes:g} min without a heartbeat from this launcher (--no-watchdog turns it off)")
    else:
        say(f"  watchdog       off ({'--keep' if args.keep else '--no-watchdog'})")
    say(f"  estimate       {args.hours:g} h x ${price:.2f}/h = ${args.hours * price:.2f} expected (--hours); "
        f"billing is per minute until the instance is terminated")
    bound = (f"{worst_h:.2f} h x ${price:.2f}/h = ${worst_h * price:.2f} (lost launch, boot, ssh, copy, the cap, "
             f"the fetch: every bound)")
    if args.keep:
        say("  worst case     unbounded: --keep leaves the instance billing until you terminate it")
    elif args.watchdog:
        say(f"  worst case     {bound}, even if this launcher dies once the watchdog runs; longer only "
            f"while the Lambda API is down")
    else:
        say(f"  worst case     unbounded if this launcher dies (no watchdog); {bound} if it lives")


# ---------------------------------------------------------------------------------------------------
# The repo we ship

def withheld(path, key_file):
    """A file that must never reach a rented disk: named like a secret (.env, *.key), the --api-key-file,
    or holding a secret we know (the Lambda or W&B key), ignored by git or not."""
    if any(fnmatch.fnmatch(path.name, pattern) for pattern in SECRET_NAMES):
        return True
    if key_file and path.resolve() == Path(key_file).resolve():
        return True
    try:
        data = path.read_bytes()
    except OSError:
        return True
    return any(s.encode() in data for s in _SECRETS)


def repo_files(repo, key_file=None):
    """(files to ship, files withheld as secrets): tracked files plus untracked ones that are not
    ignored (work in progress ships too, but never out/, .venv/ or checkpoints), less any secret."""
    r = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True)
    if r.returncode != 0:
        raise UserError(f"{repo} is not a git checkout (git ls-files failed); "
                        f"run launch_lambda.py from a clone of the repo.")
    files = sorted({f for f in r.stdout.decode().split("\0") if f and (repo / f).is_file()})
    secret = [f for f in files if withheld(repo / f, key_file)]
    files = [f for f in files if f not in secret]
    if SPEEDRUN not in files:
        raise UserError(f"{SPEEDRUN} is missing from {repo}; the node would have nothing to run.")
    return files, secret


def tarball(repo, files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in files:
            tar.add(repo / f, arcname=f, recursive=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# ssh: one place starts it

def run_command(argv, **kwargs):
    """Run ssh. argv never holds a secret (secrets travel on stdin), and children get our environment
    minus the secrets, so even an ssh config with `SendEnv *` cannot leak them. Tests put a fake ssh
    first on PATH, or pass another runner to Remote."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    return subprocess.run(argv, env=env, **kwargs)


class Remote:
    def __init__(self, host, user, identity_file, known_hosts, runner=run_command):
        self.host, self.target, self.runner = host, f"{user}@{host}", runner
        # a fresh node has a new host key: trust it on first use, but in a per-run known_hosts file so a
        # later node that reuses this IP does not trip "host key changed" in the user's own file
        self.opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
                     "-o", f"UserKnownHostsFile={known_hosts}", "-o", "ConnectTimeout=15",
                     "-o", "ServerAliveInterval=30", "-o", "ServerAliveCountMax=6"]
        if identity_file:
            self.opts += ["-i", str(identity_file)]

    def ssh(self, command, note=None, **kwargs):
        """Output is captured unless the caller says otherwise: an ssh writing to our stdout would die
        with it when the terminal or `| tee` goes away."""
        if note:
            say(f"[{self.host}] {note}")
        if "input" not in kwargs:
            kwargs.setdefault("stdin", subprocess.DEVNULL)  # never our terminal's keystrokes
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        return self.runner(["ssh", *self.opts, self.target, command], **kwargs)

    def popen(self, command, **kwargs):
        """ssh in the background, in its own session, so that a terminal's signal leaves it running."""
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        return subprocess.Popen(["ssh", *self.opts, self.target, command], env=env, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kwargs)


def last_line(raw):
    lines = (raw or b"").decode("utf-8", "replace").strip().splitlines()
    return redact(lines[-1]) if lines else "no message"


# The speedrun runs detached (setsid nohup), so a dropped connection costs one poll, not hours of
# training. The wrapper records its pid with the boot id (a poll can tell it died, even across a
# reboot), runs the speedrun under `timeout` (the node-side deadline) and writes the exit code last,
# atomically. A power-off is scheduled for the deadline plus NODE_GRACE_MIN: systemd keeps that timer,
# so it fires even if the wrapper, ssh and this launcher are all gone. The first stdin line is the
# W&B key (empty when there is none): `read` keeps it off every command line and out of every file.
WRAPPER = ('echo "$$ $(cat /proc/sys/kernel/random/boot_id)" > {pid}; timeout --kill-after=60 {seconds:.1f} {run}; '
           'echo $? > {exit}.tmp && mv {exit}.tmp {exit}')
SHUTDOWN = ('sudo -n shutdown -h +{minutes} >/dev/null 2>&1 '
            '&& echo "node-side cap: the run stops after {hours:g} h and this node powers off in {minutes} min" '
            '|| echo "WARNING: could not schedule the node-side power-off (sudo shutdown failed)"')
START = """cd {dir} && rm -f {exit} {pid} || exit 1
IFS= read -r WANDB_API_KEY
if [ -n "$WANDB_API_KEY" ]; then export WANDB_API_KEY; else unset WANDB_API_KEY; fi
{cap}
setsid nohup bash -c {wrapper} > {log} 2>&1 < /dev/null &
for i in $(seq 100); do [ -s {pid} ] && exit 0; sleep 0.1; done
echo "the run did not start on the node" >&2; exit 1"""
# First line: the exit code, "running" (the wrapper's pid is alive in this boot, and not a zombie:
# a killed process passes `kill -0` until its parent reaps it) or "dead"; then the log from byte
# `start` on. The exit file is read before the log, so once it exists the log is complete; it is read
# again after the liveness check, for a wrapper that ended in between.
POLL = """cd {dir} || exit 1
touch {heartbeat}
if [ -s {exit} ]; then cat {exit}
elif read pid boot 2>/dev/null < {pid} && [ "$boot" = "$(cat /proc/sys/kernel/random/boot_id)" ] \\
     && kill -0 "$pid" 2>/dev/null && ! grep -qs '^State:[[:space:]]*Z' /proc/"$pid"/status; then echo running
elif [ -s {exit} ]; then cat {exit}
else echo dead; fi
tail -c +{start} {log} 2>/dev/null || true"""
# One gzipped tar stream of the paths that exist (globs expanded on the node), on stdout.
FETCH = """cd {dir} && for p in {patterns}; do [ -e "$p" ] && printf '%s\\0' "$p"; done | tar -czf - --null -T -"""


# The watchdog (lambda_watchdog.py) ends the node's bill when this launcher cannot. Its stdin: the API
# key on the first line, then the script. The key goes into a root-only file on /run (a tmpfs: never
# on disk) through printf, a shell builtin (never on a command line); the watchdog, started as root,
# reads it and deletes the file. NANOSTONEY_NODE_RUN moves that folder for the tests' fake node only
# (ssh does not forward it to a real one).
WATCHDOG_START = """mkdir -p {dir} && cd {dir} || exit 1
RUN="${{NANOSTONEY_NODE_RUN:-{run_dir}}}"
IFS= read -r KEY
sudo -n install -d -m 700 "$RUN" || exit 1
printf '%s\\n' "$KEY" | sudo -n sh -c 'umask 077 && cat > "$1"' sh "$RUN/lambda_key" || exit 1
unset KEY
cat > {script} && touch {heartbeat} && rm -f {pid} || exit 1
sudo -n setsid nohup python3 {script} --key-file "$RUN/lambda_key" {options} > {log} 2>&1 < /dev/null &
for i in $(seq 100); do [ -s {pid} ] && exit 0; sleep 0.1; done
sudo -n rm -f "$RUN/lambda_key"
echo "the watchdog did not start on the node" >&2; exit 1"""


def start_watchdog(remote, args, instance_id, api):
    options = {"--api-base": args.api_base, "--instance-id": instance_id, "--heartbeat": NODE_HEARTBEAT,
               "--pid-file": WATCHDOG_PID, "--deadline-seconds": watchdog_deadline_seconds(args.max_hours),
               "--heartbeat-seconds": args.heartbeat_minutes * 60, "--poll": min(args.poll_seconds, 30.0),
               "--interval": args.api_interval, "--backoff": args.backoff_seconds}
    command = WATCHDOG_START.format(dir=REMOTE_DIR, run_dir=NODE_RUN_DIR, script=".watchdog.py", pid=WATCHDOG_PID,
                                    heartbeat=NODE_HEARTBEAT, log=WATCHDOG_LOG,
                                    options=" ".join(f"{k} {shlex.quote(str(v))}" for k, v in options.items()))
    r = remote.ssh(command, note=f"starting the node's watchdog (it terminates the node if this launcher is "
                                 f"silent for {args.heartbeat_minutes:g} min)",
                   input=(api._key + "\n" + WATCHDOG.read_text()).encode())
    if r.returncode != 0:
        raise RemoteError(f"starting the node's watchdog failed (ssh exit {r.returncode}: {last_line(r.stderr)}); "
                          f"without it, use --no-watchdog.")


def wait_for_ssh(remote, poll, tries=SSH_TRIES):
    """sshd comes up a little after the API says active."""
    for _ in range(tries):
        if remote.ssh("true").returncode == 0:
            return
        Clock.sleep(poll)
    raise RemoteError(f"could not ssh into {remote.target} after {tries} tries; check --ssh-key, "
                      f"--identity-file and --ssh-user.")


def upload_repo(remote, repo, files):
    try:
        r = remote.ssh(f"mkdir -p {REMOTE_DIR} && tar -xzf - -C {REMOTE_DIR}", note=f"copying {len(files)} files",
                       input=tarball(repo, files), timeout=UPLOAD_SECONDS)
    except subprocess.TimeoutExpired:
        raise RemoteError(f"copying the repo to the node took longer than {UPLOAD_SECONDS / 60:.0f} min.") from None
    if r.returncode != 0:
        raise RemoteError(f"copying the repo to the node failed (ssh exit {r.returncode}: {last_line(r.stderr)}).")


def start_speedrun(remote, args):
    run = " ".join(["bash", SPEEDRUN, *map(shlex.quote, args.speedrun_args)])
    names = {"pid": NODE_PID, "exit": NODE_EXIT}
    wrapper = WRAPPER.format(seconds=args.max_hours * 3600, run=run, **names)
    minutes = shutdown_minutes(args.max_hours, args.watchdog)
    cap = "true" if args.keep else SHUTDOWN.format(minutes=minutes, hours=args.max_hours)
    command = START.format(dir=REMOTE_DIR, cap=cap, wrapper=shlex.quote(wrapper), log=NODE_LOG, **names)
    wandb_key = remember_secret(os.environ.get("WANDB_API_KEY", "").strip())
    r = remote.ssh(command, note=f"starting {run} (detached)", input=(wandb_key + "\n").encode())
    say(r.stdout.decode("utf-8", "replace"), end="")
    if r.returncode != 0:
        raise RemoteError(f"starting the speedrun failed (ssh exit {r.returncode}: {last_line(r.stderr)}).")


def follow_speedrun(remote, poll, max_seconds, max_failures=10):
    """Print the node's log as it grows; return the speedrun's exit code."""
    offset, failures, deadline = 0, 0, Clock.now() + max_seconds
    while Clock.now() < deadline:
        r = remote.ssh(POLL.format(dir=REMOTE_DIR, start=offset + 1, exit=NODE_EXIT, pid=NODE_PID, log=NODE_LOG,
                                   heartbeat=NODE_HEARTBEAT))
        if r.returncode != 0:
            failures += 1  # a network blip: the detached run goes on, so just try again
            if failures >= max_failures:
                raise RemoteError(f"lost the connection to {remote.target} ({failures} failed polls in a row; "
                                  f"last: {last_line(r.stderr)}).")
        else:
            failures = 0
            status, _, log = r.stdout.partition(b"\n")
            offset += len(log)
            say(log.decode("utf-8", "replace"), end="")
            status = status.strip()
            if status == b"dead":
                raise RemoteError("the run on the node died without an exit code (the node rebooted, or its "
                                  "wrapper was killed, e.g. out of memory).")
            if status != b"running":
                return int(status) if status.isdigit() else 1
        Clock.sleep(poll)
    raise RemoteError("the speedrun was still running after --max-hours; giving up on it.")


def glob_quote(path):
    """Quote a path for the remote shell but leave * ? [ ] live, so out/*/metrics.jsonl expands there."""
    return "".join(p if p in "*?[]" else shlex.quote(p) for p in re.split(r"([*?\[\]])", path) if p)


def fetch_results(remote, paths, out_dir, seconds):
    """Copy paths (relative to the repo on the node, globs allowed) back as one tar stream, keeping
    whatever arrived: a missing path is skipped, a stream cut short keeps the files before the cut.
    Returns None, or what went wrong (the exit code tells the user the results are incomplete)."""
    archive = out_dir / "results.tgz.part"
    say(f"[{remote.host}] copying back {', '.join(paths)} (up to {seconds:.0f} s)")
    command = FETCH.format(dir=REMOTE_DIR, patterns=" ".join(map(glob_quote, [NODE_LOG, *paths])))
    with open(archive, "wb") as f, tempfile.TemporaryFile() as err:
        code, problem = wait_fetch(remote.popen(command, stdout=f, stderr=err), seconds)
        err.seek(0)
        if code not in (0, None):
            problem = f"ssh exit {code}: {last_line(err.read())}"
    names = unpack(archive, out_dir)
    archive.unlink()
    if (out_dir / NODE_LOG).is_file():
        os.replace(out_dir / NODE_LOG, out_dir / "speedrun.log")
    if problem:
        say(f"warning: copying the results back failed ({problem}); kept the {len(names)} files that arrived.")
    say(f"results in {out_dir} ({len(names)} files)")
    return problem


def wait_fetch(proc, seconds):
    """Wait for the fetch's ssh (in its own session: a terminal's Ctrl-C does not reach it). The first
    stop signal shortens what is left to INTERRUPTED_FETCH_SECONDS, a second ends it (the first, when a
    signal already ended the run); what arrived is kept either way. Returns (exit code or None, problem)."""
    deadline, seen = Clock.now() + seconds, len(_Signals.seen)
    end_at = 1 if seen else 2
    while proc.poll() is None:
        signals = len(_Signals.seen) - seen
        if 0 < signals < end_at and deadline - Clock.now() > INTERRUPTED_FETCH_SECONDS:
            say(f"signal received: the copy gets {INTERRUPTED_FETCH_SECONDS} s more (another signal ends it)")
            deadline = Clock.now() + INTERRUPTED_FETCH_SECONDS
        if signals >= end_at or Clock.now() >= deadline:
            proc.kill()
            proc.wait()
            return None, "cut short by a signal" if signals >= end_at else f"it took longer than {seconds:.0f} s"
        time.sleep(0.05)
    return proc.returncode, None


def unpack(archive, out_dir):
    """Extract regular files and folders, never outside out_dir; return the file names."""
    names = []
    if not archive.stat().st_size:
        return names
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar:
                if (m.isfile() or m.isdir()) and not os.path.isabs(m.name) and ".." not in Path(m.name).parts:
                    tar.extract(m, out_dir, **TAR_FILTER)
                    names += [m.name] if m.isfile() else []
    except (tarfile.TarError, EOFError, OSError) as e:  # a stream cut short: keep what came before the cut
        say(f"warning: the results archive is incomplete ({e}); kept the files before the cut.")
    return names


# ---------------------------------------------------------------------------------------------------
# Launching, and finding a launch whose answer was lost

class Rental:
    """What we rented and how far the run got: everything the cleanup needs."""

    def __init__(self, out_root):
        self.name = f"{NAME_PREFIX}{secrets.token_hex(4)}"  # unique, so an instance can be found without its id
        self.out_root, self.out_dir = Path(out_root), Path(out_root) / self.name
        self.ids = []
        self.launch_pending = False  # a launch was sent and we do not know whether it started a node
        self.remote, self.started, self.fetch_problem = None, False, None

    def found(self, ids):
        """Ids we now know we started: on disk at once, in case we die before terminating them."""
        self.ids = ids
        ledger_update(self.out_root, add=[(i, self.name) for i in ids], drop={("?", self.name)})
        return ids

    def refused(self):
        """The API said no to the launch: nothing started, nothing to look for."""
        self.launch_pending = False
        ledger_update(self.out_root, drop={("?", self.name)})


def launch(api, args, rental, itype, regions, ssh_key):
    """Launch in the first region that has capacity; fills rental.ids."""
    for n, region in enumerate(regions):
        say(f"launching {itype['name']} in {region} as {rental.name} ...")
        rental.launch_pending = True
        ledger_update(rental.out_root, add=[("?", rental.name)])
        try:  # a provider error is resent, but only after looking for a node it started all the same
            rental.found(api.launch({"region_name": region, "instance_type_name": itype["name"],
                                     "ssh_key_names": [ssh_key], "name": rental.name},
                                    find=lambda: instances_named(api, rental.name, 0, 0)))
        except ApiError as e:
            if e.lost:
                rental.found(find_lost_launch(api, args, rental, e))
            elif e.code == INSUFFICIENT_CAPACITY and n + 1 < len(regions):
                rental.refused()
                say(f"no capacity in {region} after all; trying {regions[n + 1]}")
                continue
            else:
                rental.refused()
                raise
        rental.launch_pending = False
        return


def find_lost_launch(api, args, rental, error):
    minutes = args.lost_launch_seconds / 60
    say(f"the launch answer was lost ({error.code}); the node may have started all the same: looking for "
        f"{rental.name} in your instances for up to {minutes:.0f} min")
    ids = instances_named(api, rental.name, args.lost_launch_seconds, args.poll_seconds)
    if not ids:
        rental.launch_pending = False  # looked long enough; the cleanup looks once more
        raise RemoteError(f"the launch answer was lost and no instance named {rental.name} appeared within "
                          f"{minutes:.0f} min; if one shows up at {DASHBOARD_URL}, terminate it there.")
    say(f"found {rental.name}: {', '.join(ids)}")
    return ids


def instances_named(api, name, patience, poll):
    """Ids of live instances carrying our unique name, looking for up to `patience` seconds until one
    shows up (a launch whose answer was lost can be listed late). Never raises."""
    deadline = Clock.now() + patience
    while True:
        try:
            found = sorted(i["id"] for i in api.instances() if i.get("name") == name and i.get("status") not in GONE)
        except Exception as e:  # a proxy's page, a bug: the ids we already know are terminated anyway
            say(f"warning: could not list instances to look for {name} ({redact(e)})")
            found = []
        if found or Clock.now() >= deadline:
            return found
        Clock.sleep(poll)


def wait_until_active(api, instance_id, poll, max_seconds):
    deadline, last = Clock.now() + max_seconds, None
    while Clock.now() < deadline:
        inst = api.instance(instance_id)  # 5xx and network errors are retried inside
        if inst["status"] == "active" and inst.get("ip"):
            say(f"instance {instance_id} active at {inst['ip']}")
            return inst["ip"]
        if inst["status"] in GONE or inst["status"] == "unhealthy":
            raise RemoteError(f"instance {instance_id} is {inst['status']} before it became active; "
                              f"terminating it; try again.")
        if inst["status"] != last:
            say(f"instance {instance_id}: {inst['status']}")
            last = inst["status"]
        Clock.sleep(poll)
    raise RemoteError(f"instance {instance_id} did not become active within {max_seconds / 60:.0f} minutes.")


# ---------------------------------------------------------------------------------------------------
# The ledger: every id we may have started, on disk from the moment we know it, so that a launcher
# that dies (SIGKILL, power, a killed `| tee` and a closed window) leaves the ids behind. The next run
# and --cleanup read it first. "? NAME" is a launch whose answer we have not seen.

def ledger_read(out_dir):
    try:
        lines = (Path(out_dir) / LEDGER).read_text().splitlines()
    except OSError:
        return []
    return [tuple(line.split()[:2]) for line in lines if len(line.split()) >= 2]


def ledger_update(out_dir, add=(), drop=()):
    """Add (id, name) entries; drop entries whose id, or whose (id, name), is in drop. Never raises."""
    path = Path(out_dir) / LEDGER
    try:
        entries = [e for e in ledger_read(out_dir) if e[0] not in drop and e not in drop and e not in add]
        entries += list(add)
        if not entries:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{LEDGER}.{os.getpid()}")
        tmp.write_text("".join(f"{i} {n}\n" for i, n in entries))
        os.replace(tmp, path)
    except OSError as e:
        say(f"warning: could not update {path} ({e.strerror}); live ids: {', '.join(i for i, _ in add) or 'none'}")


# ---------------------------------------------------------------------------------------------------
# Stopping what we rented, and confirming it

def terminate_once(api, ids):
    """One terminate request; never raises. Returns (accepted, seconds the API asked us to wait,
    refused): refused is a 401/403, an answer that retrying cannot change."""
    try:
        api.terminate(ids, retries=0)
        return True, 0.0, False
    except ApiError as e:
        say(f"warning: terminate {', '.join(sorted(ids))} failed ({e.code}: {e.message}); trying again")
        return False, e.retry_after or 0.0, e.status in (401, 403)
    except Exception as e:
        say(f"warning: terminate {', '.join(sorted(ids))} failed ({redact(e)}); trying again")
        return False, 0.0, False


def is_stopped(api, instance_id):
    """Only the API's own JSON ends a bill: the instance says terminating/terminated, or a 404 in the
    spec's shape says the id does not exist -- and the instance list agrees. A proxy's 404 page while
    the API is failing is no answer. Never raises."""
    try:
        if api.instance(instance_id, retries=0)["status"] not in TERMINATED:
            return False
    except ApiError as e:
        if e.status != 404 or e.code != NOT_FOUND:
            return False
    except Exception:
        return False
    try:
        listed = {i["id"]: i.get("status") for i in api.instances(retries=0)}
    except Exception:
        return False
    return listed.get(instance_id, "terminated") in TERMINATED


def detach():
    """Carry on in a child in its own session, which a closed terminal or a signal to our group does
    not reach; the parent returns at once (whoever signalled it may not wait). True in the child."""
    try:
        pid = os.fork()
    except OSError:
        return False
    if pid:
        say(f"the terminate is still failing; a detached process (pid {pid}) keeps trying, "
            f"logging to {_LOG[1] if _LOG else 'nowhere'}", err=True)
        return False
    os.setsid()
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    _DEAD.update(("stdout", "stderr"))  # the log is all it writes to
    return True


def stop_instances(api, ids, patience, requested=(), may_detach=False):
    """Terminate ids until the API confirms each (is_stopped). Every failure is retried with backoff
    that honours Retry-After for as long as the API fails (an outage is waited out, never a reason
    to leave a node billing), up to `patience` seconds (tests bound it; by default there is none).
    Only a refused key (401/403) ends it early. With may_detach, once it has failed for DETACH_SECONDS
    with the terminal gone or a signal received, a detached child goes on. Returns the ids never confirmed."""
    start = Clock.now()
    pending, deadline, delay = set(ids), start + patience, max(api.backoff, 0.01)
    ask = pending - set(requested)
    while True:
        _, wait, refused = terminate_once(api, ask) if ask else (True, 0.0, False)
        pending = {i for i in sorted(pending) if not is_stopped(api, i)}
        left = deadline - Clock.now()
        if not pending or left <= 0 or refused:
            return pending
        if may_detach and (_Signals.seen or {"stdout", "stderr"} <= _DEAD) and Clock.now() - start > DETACH_SECONDS:
            may_detach = False
            if not detach():
                return pending
        api.sleep(min(max(delay, wait), left))
        delay, ask = min(delay * 2, 60.0), pending


def stop_rental(api, args, rental):
    """Terminate every instance we may have started, then confirm; return the ids not confirmed."""
    known = set(rental.ids)
    requested = known if known and terminate_once(api, known)[0] else set()  # first, before any talk
    patience = args.lost_launch_seconds if rental.launch_pending else 0
    if patience:
        say(f"a launch answer was lost: watching your instances for {rental.name} for up to {patience / 60:.0f} min")
    ids = known | set(instances_named(api, rental.name, patience, args.poll_seconds))
    unstopped = stop_instances(api, ids, args.cleanup_seconds, requested, may_detach=True) if ids else set()
    if ids - unstopped:
        say(f"terminated {', '.join(sorted(ids - unstopped))} (the API confirms it is terminating).")
    # a lost launch answer with no node found yet stays "? NAME": the next run looks for it again
    ledger_update(args.out_dir, drop={*(ids - unstopped), *([("?", rental.name)] if ids else [])})
    return unstopped


def stop_by_hand(ids, out_dir):
    say(f"ERROR: could not confirm that {', '.join(sorted(ids))} stopped; it may still be billing.\n"
        f"  Terminate it at {DASHBOARD_URL}, with `python launch_lambda.py --terminate ID`, or with "
        f"`python launch_lambda.py --cleanup` (the ids are in {Path(out_dir) / LEDGER}).", err=True)


def finish(api, args, rental):
    """Every ending: fetch what the run left, then stop what we rented. Runs disarmed: signals are
    counted, not obeyed; the first one shortens the fetch, a second one ends it. Returns unconfirmed ids."""
    if rental.started:
        try:
            seconds = min(args.fetch_seconds, INTERRUPTED_FETCH_SECONDS) if _Signals.seen else args.fetch_seconds
            rental.fetch_problem = fetch_results(rental.remote, args.fetch, rental.out_dir, seconds)
        except Exception as e:  # a bug or a full disk: the node must still be terminated
            rental.fetch_problem = redact(e)
            say(f"warning: results not copied back ({rental.fetch_problem}).")
    if args.keep:
        for i in rental.ids:
            say(f"--keep: instance {i} ({rental.name}) is still running and billing; end it with "
                f"`python launch_lambda.py --terminate {i}` or at {DASHBOARD_URL}")
        return set()
    return stop_rental(api, args, rental)


def run_on_node(api, args, rental, itype, regions, ssh_key, files):
    rental.out_dir.mkdir(parents=True, exist_ok=True)
    launch(api, args, rental, itype, regions, ssh_key)
    ip = wait_until_active(api, rental.ids[0], args.poll_seconds, args.boot_timeout_min * 60)
    remote = rental.remote = Remote(ip, args.ssh_user, args.identity_file, rental.out_dir / "known_hosts")
    wait_for_ssh(remote, args.poll_seconds)
    if args.watchdog:  # first thing: from here on the node ends its own bill
        start_watchdog(remote, args, rental.ids[0], api)
    upload_repo(remote, args.repo, files)
    rental.started = True  # from here on there may be results to fetch
    start_speedrun(remote, args)
    code = follow_speedrun(remote, args.poll_seconds, args.max_hours * 3600 + NODE_GRACE_MIN * 60)
    if code == 124:  # timeout's code: the node-side deadline
        raise RemoteError(f"the run passed --max-hours ({args.max_hours:g} h) and was stopped on the node; "
                          f"what it wrote is in {rental.out_dir}.")
    if code != 0:
        raise RemoteError(f"{SPEEDRUN} exited with code {code}; its log is in {rental.out_dir}/speedrun.log.")
    return 0


def launch_and_run(api, args, itype, regions, ssh_key, files):
    rental = Rental(args.out_dir)
    result, error = guarded(run_on_node, api, args, rental, itype, regions, ssh_key, files)
    unstopped = finish(api, args, rental)  # disarmed from here on: nothing can skip it
    if unstopped:  # what the user must act on comes last, after why the run ended
        if error is not None and not isinstance(error, KeyboardInterrupt):
            say(f"error: {redact(error)}", err=True)
        stop_by_hand(unstopped, args.out_dir)
        return 1
    if _Signals.seen:
        raise Interrupted(_Signals.seen[0])
    if error is not None:
        raise error
    if rental.fetch_problem:
        say(f"error: the run finished but its results did not all come back ({rental.fetch_problem}); "
            f"what arrived is in {rental.out_dir}.", err=True)
        return EXIT_RESULTS_MISSING
    return result


# ---------------------------------------------------------------------------------------------------

def speedrun_out(speedrun_args):
    """The speedrun's --out (run_stoney_small.sh's parser: `--out DIR`, default out)."""
    out = "out"
    for flag, value in zip(speedrun_args, speedrun_args[1:]):
        if flag == "--out":
            out = value
    return out.rstrip("/") or "/"


def parse_args(argv):
    p = argparse.ArgumentParser(description="Run the nanostoney speedrun on a rented Lambda Cloud GPU node.",
                                allow_abbrev=False)  # no prefix matching: --api-key must never mean --api-key-file
    p.add_argument("--type", default=DEFAULT_TYPE, help="instance type name (default %(default)s)")
    p.add_argument("--region", help="region name (default: each region with capacity in turn)")
    p.add_argument("--ssh-key", help="name of your SSH key in Lambda Cloud (default: your only one)")
    p.add_argument("--identity-file", help="private key file for ssh (default: ssh's own choice)")
    p.add_argument("--ssh-user", default="ubuntu")
    p.add_argument("--hours", type=float, default=4.0, help="expected run length, for the cost estimate")
    p.add_argument("--max-hours", type=float, help="node-side deadline: the run is stopped after this "
                   f"(default: twice --hours; at most {MAX_HOURS_LIMIT} without --allow-long-runs)")
    p.add_argument("--allow-long-runs", action="store_true", help=f"allow --max-hours above {MAX_HOURS_LIMIT}")
    p.add_argument("--boot-timeout-min", type=float, default=30.0, help="give up if not active after this")
    p.add_argument("--fetch", action="append", default=[], help="another path (glob) under the repo on the node "
                   f"to copy back, besides {', '.join(FETCH_UNDER_OUT)} under the speedrun's --out (repeatable)")
    p.add_argument("--fetch-seconds", type=float, default=600.0, help="time limit for copying results back")
    p.add_argument("--out-dir", default="out/lambda", help="results (one folder per instance), log, live ids")
    p.add_argument("--dry-run", action="store_true", help="print the plan and cost estimate, launch nothing")
    p.add_argument("--yes", action="store_true", help="launch (or --cleanup) without asking to type yes")
    p.add_argument("--keep", action="store_true", help="leave the instance running at the end (no power-off)")
    p.add_argument("--no-watchdog", dest="watchdog", action="store_false", help="no node-side watchdog (then a "
                   "dead launcher leaves the node billing until you terminate it)")
    p.add_argument("--heartbeat-minutes", type=float, default=30.0, help="the watchdog terminates the node "
                   "after this long without a word from this launcher (default %(default)s)")
    p.add_argument("--terminate", metavar="INSTANCE_ID", help="only terminate this instance, confirm, exit")
    p.add_argument("--cleanup", action="store_true", help=f"terminate every live {NAME_PREFIX}* instance and "
                   f"every id in --out-dir's {LEDGER} (after confirmation), exit")
    p.add_argument("--api-key-file", help="file holding the API key (default: the LAMBDA_API_KEY env var)")
    p.add_argument("--api-base", default=DEFAULT_API_BASE, help="API root (default %(default)s)")
    p.add_argument("--poll-seconds", type=float, default=15.0, help="seconds between status polls")
    p.add_argument("speedrun_args", nargs="*", help=f"arguments after -- go to {SPEEDRUN}")
    # for tests only: faster clocks and a tiny repo; the real limits are the API's
    hidden = argparse.SUPPRESS
    p.add_argument("--api-interval", type=float, default=1.0, help=hidden)
    p.add_argument("--launch-interval", type=float, default=12.0, help=hidden)
    p.add_argument("--backoff-seconds", type=float, default=2.0, help=hidden)
    p.add_argument("--retries", type=int, default=5, help=hidden)
    p.add_argument("--http-timeout", type=float, default=60.0, help=hidden)
    p.add_argument("--lost-launch-seconds", type=float, default=300.0, help=hidden)
    p.add_argument("--cleanup-seconds", type=float, default=math.inf, help=hidden)  # default: while the API fails
    p.add_argument("--time-scale", type=float, default=1.0, help=hidden)  # see Clock
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent, help=hidden)
    args = p.parse_args(argv)
    check_api_base(args.api_base)
    check_numbers(args)
    args.watchdog = args.watchdog and not args.keep
    out = speedrun_out(args.speedrun_args)
    args.fetch = [f"{out}/{p}" for p in FETCH_UNDER_OUT] + args.fetch  # --fetch adds, never replaces
    return args


def check_numbers(args):
    args.max_hours = 2 * args.hours if args.max_hours is None else args.max_hours
    for flag in ("hours", "max_hours", "heartbeat_minutes", "fetch_seconds", "poll_seconds", "boot_timeout_min"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--{flag.replace('_', '-')} must be a positive finite number, not {value:g}; "
                            f"give a number of {flag.rsplit('_', 1)[-1]}.")
    if args.hours > args.max_hours:
        raise UserError(f"--max-hours ({args.max_hours:g}) must be at least --hours ({args.hours:g}); "
                        f"raise --max-hours or lower --hours.")
    if args.max_hours > MAX_HOURS_LIMIT and not args.allow_long_runs:
        raise UserError(f"--max-hours {args.max_hours:g} is above {MAX_HOURS_LIMIT} h (about "
                        f"${args.max_hours * 24:,.0f} on an 8xH100 node); add --allow-long-runs if you mean it.")


def check_ssh(args):
    """Before renting: a node we cannot reach still bills."""
    if shutil.which("ssh") is None:
        raise UserError("ssh is not installed or not on PATH; install OpenSSH's client, then launch again.")
    if args.identity_file and not os.access(args.identity_file, os.R_OK):
        raise UserError(f"cannot read the --identity-file {args.identity_file}; give the private key that "
                        f"matches your Lambda SSH key.")


def confirm(args, question):
    """A typed yes, or --yes: forgetting --dry-run must not rent a node."""
    if args.yes:
        return
    if not sys.stdin or not sys.stdin.isatty():
        raise UserError(f"{question} needs confirmation and stdin is not a terminal; add --yes.")
    say(f"{question}? Type yes to go on: ", end="")
    if sys.stdin.readline().strip().lower() != "yes":
        raise UserError("not confirmed, so nothing was done; answer yes (or pass --yes) to go on.")


def check_ledger(api, out_dir):
    """Read what an earlier launcher left in the ledger first: drop what the API confirms is gone, and
    rent nothing more while an instance of ours may still be billing."""
    live, gone = [], set()
    for iid, name in ledger_read(out_dir):
        found = instances_named(api, name, 0, 0) if iid == "?" else ([] if is_stopped(api, iid) else [iid])
        live += found
        gone |= set() if found else {(iid, name)}
    ledger_update(out_dir, drop=gone)
    if live:
        raise UserError(f"instances from an earlier launch may still be billing ({', '.join(sorted(live))}, "
                        f"listed in {Path(out_dir) / LEDGER}); end them with `python launch_lambda.py --cleanup` "
                        f"(or let that launch finish), then launch again.")


def terminate_one(api, args):
    unstopped = stop_instances(api, [args.terminate], args.cleanup_seconds)
    if unstopped:
        stop_by_hand(unstopped, args.out_dir)
        return 1
    ledger_update(args.out_dir, drop={args.terminate})
    say(f"{args.terminate} is terminating or gone (the API confirms it).")
    return 0


def cleanup(api, args):
    """--cleanup: every live instance named nanostoney-*, and every id in the ledger, terminated."""
    listed = [i for i in api.instances() if i.get("status") not in TERMINATED]
    ids = {i["id"] for i in listed if str(i.get("name", "")).startswith(NAME_PREFIX)}
    ids |= {i for i, _ in ledger_read(args.out_dir) if i != "?" and not is_stopped(api, i)}
    if not ids:
        ledger_update(args.out_dir, drop={e for e in ledger_read(args.out_dir)})
        say(f"no live {NAME_PREFIX}* instances: nothing to terminate.")
        return 0
    for i in sorted(ids):
        info = next((x for x in listed if x["id"] == i), {})
        say(f"  {i}  {info.get('name', '?')}  {info.get('status', 'unknown')}")
    confirm(args, f"terminate these {len(ids)} instances")
    unstopped = stop_instances(api, ids, args.cleanup_seconds)
    ledger_update(args.out_dir, drop={*(ids - unstopped), *[e for e in ledger_read(args.out_dir) if e[0] == "?"]})
    if unstopped:
        stop_by_hand(unstopped, args.out_dir)
        return 1
    say(f"terminated {', '.join(sorted(ids))} (the API confirms it).")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--api-key" or a.startswith("--api-key=") for a in argv):  # refuse before argparse echoes it
        raise UserError("the API key is never taken on the command line (every user can read it in `ps`); "
                        "set LAMBDA_API_KEY or use --api-key-file.")
    for s in STOP_SIGNALS:  # Ctrl-C, kill, a closed terminal, Ctrl-\ : all unwind through the cleanup
        if signal.getsignal(s) is not signal.SIG_IGN:  # but under nohup a closed terminal must not end the run
            signal.signal(s, on_signal)
    args = parse_args(argv)
    Clock.scale = args.time_scale
    api = LambdaAPI(args.api_base, read_api_key(args.api_key_file), interval=args.api_interval,
                    launch_interval=args.launch_interval, retries=args.retries, backoff=args.backoff_seconds,
                    timeout=args.http_timeout)
    remember_secret(os.environ.get("WANDB_API_KEY", "").strip())
    if not args.dry_run:
        open_log(args.out_dir)
    if args.terminate:
        return terminate_one(api, args)
    if args.cleanup:
        return cleanup(api, args)
    return plan_and_launch(api, args)


def plan_and_launch(api, args):
    check_ssh(args)
    files, secret = repo_files(args.repo, args.api_key_file)  # before any money is spent
    types = api.instance_types()
    itype, regions, capacity = pick_type_and_regions(types, args.type, args.region)
    try:
        ssh_key = resolve_ssh_key(api, args.ssh_key)
    except UserError as e:
        if not args.dry_run:
            raise
        ssh_key = f"! {e}"
    print_plan(args, itype, regions, capacity, ssh_key, files, secret)
    if args.dry_run:
        return 0
    check_ledger(api, args.out_dir)
    if not regions:
        where = f"in {args.region}" if args.region else "in any region"
        raise RemoteError(f"no capacity for {args.type} {where} right now; types with capacity: "
                          f"{types_with_capacity(types)}.")
    confirm(args, f"rent {itype['name']} at ${itype['price_cents_per_hour'] / 100:.2f}/h")
    return launch_and_run(api, args, itype, regions, ssh_key, files)


def exit_code():
    """Run main and turn its ending into an exit code and (at most) a few lines on stderr."""
    try:
        return main()
    except UserError as e:
        say(f"error: {e}", err=True)
        return 2
    except ApiError as e:
        say(f"error: Lambda API request failed: {e.code}\n  message: {e.message}"
            + (f"\n  suggestion: {e.suggestion}" if e.suggestion else ""), err=True)
        return 1
    except RemoteError as e:
        say(f"error: {e}", err=True)
        return 1
    except KeyboardInterrupt:
        say("interrupted.", err=True)
        return 130
    except Exception:  # a bug: show where, but never a secret
        say(traceback.format_exc(), err=True)
        return 1


if __name__ == "__main__":
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError):
        pass
    sys.exit(exit_code())
