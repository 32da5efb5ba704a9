#!/usr/bin/env python3
"""
Rent a Lambda Cloud GPU node, run the speedrun on it, bring the report back, terminate the node.

    export LAMBDA_API_KEY=...     # create one at https://cloud.lambda.ai/api-keys
    export WANDB_API_KEY=...      # optional: without it the speedrun logs to W&B offline
    python launch_lambda.py --dry-run                    # plan and cost estimate, launches nothing
    python launch_lambda.py --ssh-key my-key --hours 4   # the real thing
    python launch_lambda.py --ssh-key my-key -- --depth 12   # arguments after -- go to the speedrun

Top to bottom: list instance types (prices, regions with capacity) -> pick type and region ->
check the SSH key -> launch -> poll until active -> copy the repo (git ls-files) -> start
`bash run_stoney_small.sh` detached on the node -> follow its log -> copy the report back ->
terminate. The node is terminated when done, on any error, on Ctrl-C and on SIGTERM, unless --keep.
Standard library only, so it runs from any laptop with Python 3 and ssh.

Secrets. The Lambda key comes from LAMBDA_API_KEY or --api-key-file, never from the command line
(argv is visible to every user of the machine in `ps`), and is redacted from every message we print.
The W&B key travels to the node on ssh's stdin: the remote shell `read`s one line into
WANDB_API_KEY, exports it and starts the speedrun, so the key lives only in that process tree's
environment -- never on a command line (local or remote `ps`), in a file on the node, or in a log.
We did not use ssh's SendEnv because sshd silently drops variables missing from its AcceptEnv list
(Ubuntu's default sshd_config, which Lambda's Ubuntu images keep, accepts only locale variables
such as LANG and LC_*): the key would not arrive and nothing would say so.

API: Lambda Cloud API v1, spec in ../shared/lambda/lambda_openapi.json (the subset the tests use is
in tests/fixtures/lambda_openapi_subset.json). Its limits are honoured: at most one request per
second overall and one launch per 12 seconds; errors whose code starts with `provider/` (upstream
hiccups) are retried with bounded exponential backoff; every other error is printed with its
`code`, `message` and `suggestion`.

Exit codes: 0 done, 1 API or remote failure, 2 bad input (fix the command), 130 interrupted.
"""
import argparse
import io
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tarfile
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_API_BASE = "https://cloud.lambda.ai/api/v1"  # the spec's production server
API_KEYS_URL = "https://cloud.lambda.ai/api-keys"  # the spec's x-lambda-api-keys-config-url
DASHBOARD_URL = "https://cloud.lambda.ai/instances"
DEFAULT_TYPE = "gpu_8x_h100_sxm5"  # 8x H100 80GB SXM5, the nanochat speedrun node
REMOTE_DIR = "nanostoney"  # on the node, relative to the ssh user's home
SPEEDRUN = "run_stoney_small.sh"
# What to bring back (relative to the repo on the node); a path that is missing is only a warning.
# out/ is run_stoney_small.sh's default --out; speedrun.log is the node-side log we write.
DEFAULT_FETCH = ["out/report", "out/eval", "out/logs", "out/stage_times.tsv", "out/speedrun.log"]
SECRET_ENV = ("LAMBDA_API_KEY", "WANDB_API_KEY")
GONE = ("terminated", "terminating", "preempted")  # instance statuses that will never become active

NEED_KEY = (f"launch_lambda.py needs a Lambda Cloud API key in the LAMBDA_API_KEY environment variable "
            f"(create one at {API_KEYS_URL}), even for --dry-run, which reads prices and capacity from the API.")


class UserError(Exception):
    """Something the user can fix in the command or the account; exit code 2."""


class RemoteError(Exception):
    """The node or the speedrun on it failed; exit code 1."""


class ApiError(Exception):
    """An error answer from the Lambda API, in the spec's shape {"error": {code, message, suggestion}}."""

    def __init__(self, status, code, message, suggestion=None):
        self.status, self.code = status, code
        self.message, self.suggestion = redact(message or ""), redact(suggestion or "")
        super().__init__(f"{code}: {self.message}")


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
# Rate limiting and the API client

class RateLimiter:
    """Spaces calls: a call waits until every bucket it names has been quiet for that bucket's interval.

    Lambda allows one request per second overall ("any") and one launch per 12 seconds ("launch").
    clock and sleep are parameters so tests can check the spacing with a fake clock, not real time.
    """

    def __init__(self, intervals, clock=time.monotonic, sleep=time.sleep):
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


class LambdaAPI:
    """The few Lambda Cloud API v1 endpoints we use. Every attempt waits its turn on the limiter."""

    def __init__(self, base, key, interval=1.0, launch_interval=12.0, retries=5, backoff=2.0,
                 clock=time.monotonic, sleep=time.sleep, timeout=60):
        self.base = base.rstrip("/")
        self._key = key
        self.limiter = RateLimiter({"any": interval, "launch": launch_interval}, clock, sleep)
        self.retries, self.backoff, self.sleep, self.timeout = retries, backoff, sleep, timeout

    def __repr__(self):  # never show the key, even in a debugger or a traceback's locals
        return f"LambdaAPI({self.base!r})"

    def request(self, method, path, body=None, launch=False):
        """Send one request, retrying provider/* errors, HTTP 429 and (except for launch) network errors."""
        buckets = ("any", "launch") if launch else ("any",)
        for attempt in range(self.retries + 1):
            self.limiter.wait(*buckets)
            try:
                return self._send(method, path, body)
            except ApiError as e:
                if not (e.code.startswith("provider/") or e.status == 429) or attempt == self.retries:
                    raise
                reason = f"{e.code}: {e.message}"
            except OSError as e:  # connection refused/reset, DNS, timeout (HTTP errors are ApiError)
                # a launch whose answer got lost may still have started a node: never send it twice
                if launch or attempt == self.retries:
                    raise ApiError(None, "network/error", f"{method} {path} failed: {e}",
                                   "check your network connection and --api-base, then try again") from None
                reason = f"network error: {redact(e)}"
            delay = min(self.backoff * 2 ** attempt, 60.0)
            print(f"lambda api: {reason}; retrying in {delay:.1f}s ({attempt + 1}/{self.retries})", flush=True)
            self.sleep(delay)

    def _send(self, method, path, body):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self._key}", "Accept": "application/json",
            "Content-Type": "application/json", "User-Agent": "nanostoney-launch-lambda"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())["data"]
        except urllib.error.HTTPError as e:
            raise parse_error(e.code, e.read()) from None

    def instance_types(self):
        return self.request("GET", "/instance-types")

    def ssh_keys(self):
        return self.request("GET", "/ssh-keys")

    def launch(self, body):
        return self.request("POST", "/instance-operations/launch", body, launch=True)["instance_ids"]

    def instance(self, instance_id):
        return self.request("GET", f"/instances/{instance_id}")

    def instances(self):
        return self.request("GET", "/instances")

    def terminate(self, instance_ids):
        return self.request("POST", "/instance-operations/terminate", {"instance_ids": list(instance_ids)})


def parse_error(status, raw):
    try:
        err = json.loads(raw)["error"]
        return ApiError(status, err.get("code") or f"http/{status}", err.get("message"), err.get("suggestion"))
    except (ValueError, KeyError, TypeError, AttributeError):  # not the spec's shape (a proxy, an outage page)
        return ApiError(status, f"http/{status}", raw.decode("utf-8", "replace")[:300])


# ---------------------------------------------------------------------------------------------------
# Choosing what to rent

def pick_type_and_region(types, type_name, region=None):
    """Return (instance_type dict, region name or None if no capacity there, regions with capacity)."""
    if type_name not in types:
        raise UserError(f"Lambda does not offer instance type {type_name!r}; choose one of "
                        f"{', '.join(sorted(types))} with --type.")
    item = types[type_name]
    regions = [r["name"] for r in item["regions_with_capacity_available"]]
    if region:
        return item["instance_type"], (region if region in regions else None), regions
    return item["instance_type"], (regions[0] if regions else None), regions


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


def print_plan(args, itype, region, regions, ssh_key, files):
    price = itype["price_cents_per_hour"] / 100
    wandb = "online (key sent on ssh stdin)" if os.environ.get("WANDB_API_KEY") else "offline (WANDB_API_KEY not set)"
    speedrun = " ".join(["bash", SPEEDRUN, *map(shlex.quote, args.speedrun_args)])
    print("plan:")
    print(f"  instance type  {itype['name']} -- {itype['description']}, ${price:.2f}/h")
    print(f"  region         {region or 'none: no capacity right now'} "
          f"(capacity now in: {', '.join(regions) or 'none'})")
    print(f"  ssh key        {ssh_key} (user {args.ssh_user})")
    print(f"  copy           {len(files)} files (git ls-files) to ~/{REMOTE_DIR}")
    print(f"  run            {speedrun}, W&B {wandb}")
    print(f"  bring back     {', '.join(args.fetch)} -> {args.out_dir}/<instance name>/")
    print(f"  afterwards     {'keep the instance running (--keep)' if args.keep else 'terminate the instance'}")
    print(f"  estimate       {args.hours:g} h x ${price:.2f}/h = ${args.hours * price:.2f} "
          f"(--hours sets the expected run length; billing is per minute while the instance exists)", flush=True)


# ---------------------------------------------------------------------------------------------------
# The repo we ship

def repo_files(repo):
    """Tracked files plus untracked ones that are not ignored (work in progress ships too, but never
    out/, .venv/ or checkpoints)."""
    r = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True)
    if r.returncode != 0:
        raise UserError(f"{repo} is not a git checkout (git ls-files failed); "
                        f"run launch_lambda.py from a clone of the repo.")
    files = sorted({f for f in r.stdout.decode().split("\0") if f and (repo / f).is_file()})
    if SPEEDRUN not in files:
        raise UserError(f"{SPEEDRUN} is missing from {repo}; the node would have nothing to run.")
    return files


def tarball(repo, files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in files:
            tar.add(repo / f, arcname=f, recursive=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# ssh and scp: one place starts them

def run_command(argv, stdin=None, capture=False):
    """Run ssh/scp. argv never holds a secret (secrets travel on stdin), and children get our
    environment minus the secrets, so even an ssh config with `SendEnv *` cannot leak them.
    Tests replace ssh/scp with fakes first on PATH, or pass another runner to Remote."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    return subprocess.run(argv, input=stdin, stdout=subprocess.PIPE if capture else None, env=env)


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

    def ssh(self, command, stdin=None, capture=False, quiet=False):
        if not quiet:
            print(f"[{self.host}] $ {command}", flush=True)
        return self.runner(["ssh", *self.opts, self.target, command], stdin=stdin, capture=capture)

    def fetch(self, remote_path, local_dir):
        print(f"[{self.host}] scp -r {remote_path} -> {local_dir}/", flush=True)
        return self.runner(["scp", "-r", *self.opts, f"{self.target}:{REMOTE_DIR}/{remote_path}", str(local_dir)])


# The speedrun runs detached (setsid nohup) so a dropped connection costs one poll, not hours of
# training; it writes its exit code to out/.launch_exit when it ends. The first stdin line is the
# W&B key (empty when there is none): `read` keeps it off every command line and out of every file.
START = ("cd {dir} && mkdir -p out && rm -f out/.launch_exit || exit 1; IFS= read -r WANDB_API_KEY; "
         "if [ -n \"$WANDB_API_KEY\" ]; then export WANDB_API_KEY; else unset WANDB_API_KEY; fi; "
         "setsid nohup bash -c {run} > out/speedrun.log 2>&1 < /dev/null &")
# Exit code (or "running") on the first line, then the log from byte `start` on. The exit file is
# read first, so once it exists the log we read after it is complete. The log may not exist yet.
POLL = ("cd {dir} && {{ cat out/.launch_exit 2>/dev/null || echo running; "
        "tail -c +{start} out/speedrun.log 2>/dev/null || true; }}")


def wait_for_ssh(remote, poll, tries=40):
    """sshd comes up a little after the API says active."""
    for _ in range(tries):
        if remote.ssh("true", quiet=True).returncode == 0:
            return
        time.sleep(poll)
    raise RemoteError(f"could not ssh into {remote.target} after {tries} tries; check --ssh-key, "
                      f"--identity-file and --ssh-user.")


def upload_repo(remote, repo, files):
    r = remote.ssh(f"mkdir -p {REMOTE_DIR} && tar -xzf - -C {REMOTE_DIR}", stdin=tarball(repo, files))
    if r.returncode != 0:
        raise RemoteError(f"copying the repo to the node failed (ssh exit {r.returncode}).")


def start_speedrun(remote, speedrun_args):
    run = " ".join(["bash", SPEEDRUN, *map(shlex.quote, speedrun_args)])
    command = START.format(dir=REMOTE_DIR, run=shlex.quote(f"{run}; echo $? > out/.launch_exit"))
    wandb_key = remember_secret(os.environ.get("WANDB_API_KEY", "").strip())
    r = remote.ssh(command, stdin=(wandb_key + "\n").encode())
    if r.returncode != 0:
        raise RemoteError(f"starting the speedrun failed (ssh exit {r.returncode}).")


def follow_speedrun(remote, poll, max_seconds, max_failures=10):
    """Print the node's log as it grows; return the speedrun's exit code."""
    offset, failures, deadline = 0, 0, time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        r = remote.ssh(POLL.format(dir=REMOTE_DIR, start=offset + 1), capture=True, quiet=True)
        if r.returncode != 0:
            failures += 1  # a network blip: the detached run goes on, so just try again
            if failures >= max_failures:
                raise RemoteError(f"lost the connection to {remote.target} ({failures} failed polls in a row).")
        else:
            failures = 0
            status, _, log = r.stdout.partition(b"\n")
            offset += len(log)
            sys.stdout.write(redact(log.decode("utf-8", "replace")))
            sys.stdout.flush()
            if status.strip() != b"running":
                return int(status) if status.strip().isdigit() else 1
        time.sleep(poll)
    raise RemoteError("the speedrun was still running after --max-hours; giving up on it.")


def fetch_results(remote, paths, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in paths:
        if remote.fetch(p, out_dir).returncode != 0:
            print(f"warning: could not copy {p} back (not produced on the node?)", flush=True)
    print(f"results in {out_dir}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Launch, run, and always clean up

def wait_until_active(api, instance_id, poll, max_seconds):
    deadline, last = time.monotonic() + max_seconds, None
    while time.monotonic() < deadline:
        inst = api.instance(instance_id)
        if inst["status"] == "active" and inst.get("ip"):
            print(f"instance {instance_id} active at {inst['ip']}", flush=True)
            return inst["ip"]
        if inst["status"] in GONE:
            raise RemoteError(f"instance {instance_id} is {inst['status']} before it became active.")
        if inst["status"] != last:
            print(f"instance {instance_id}: {inst['status']}", flush=True)
            last = inst["status"]
        time.sleep(poll)
    raise RemoteError(f"instance {instance_id} did not become active within {max_seconds / 60:.0f} minutes.")


def cleanup(api, name, launched, keep):
    """Terminate what we launched: the ids the API gave us, plus any instance carrying our unique name
    (a launch interrupted before its answer arrived may still have started one)."""
    if keep:
        for i in launched:
            print(f"--keep: instance {i} ({name}) is still running and billing; end it with "
                  f"`python launch_lambda.py --terminate {i}` or at {DASHBOARD_URL}", flush=True)
        return
    # a second Ctrl-C must not stop us halfway and leave a paid machine running
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    ids = set(launched)
    try:
        try:
            ids |= {i["id"] for i in api.instances() if i.get("name") == name and i["status"] not in GONE}
        except ApiError as e:
            print(f"warning: could not list instances to double-check ({e})", flush=True)
        if ids:
            print(f"terminating {', '.join(sorted(ids))} ...", flush=True)
            api.terminate(sorted(ids))
            print("terminated.", flush=True)
    except Exception as e:
        print(f"WARNING: could not terminate {', '.join(sorted(ids))}: {redact(e)}\n"
              f"  It may still be billing: terminate it at {DASHBOARD_URL} "
              f"or with `python launch_lambda.py --terminate ID`.", file=sys.stderr, flush=True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def launch_and_run(api, args, itype, region, ssh_key, files):
    name = f"nanostoney-{secrets.token_hex(4)}"  # unique, so cleanup can find it even without an id
    out_dir = Path(args.out_dir) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    launched = []
    try:
        print(f"launching {itype['name']} in {region} as {name} ...", flush=True)
        launched += api.launch({"region_name": region, "instance_type_name": itype["name"],
                                "ssh_key_names": [ssh_key], "name": name})
        ip = wait_until_active(api, launched[0], args.poll_seconds, args.boot_timeout_min * 60)
        remote = Remote(ip, args.ssh_user, args.identity_file, out_dir / "known_hosts")
        wait_for_ssh(remote, args.poll_seconds)
        upload_repo(remote, args.repo, files)
        start_speedrun(remote, args.speedrun_args)
        code = follow_speedrun(remote, args.poll_seconds, args.max_hours * 3600)
        fetch_results(remote, args.fetch, out_dir)  # also after a failure: the log says why
        if code != 0:
            raise RemoteError(f"{SPEEDRUN} exited with code {code}; its log is in {out_dir}/speedrun.log.")
        return 0
    finally:
        cleanup(api, name, launched, args.keep)


# ---------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description="Run the nanostoney speedrun on a rented Lambda Cloud GPU node.",
                                allow_abbrev=False)  # no prefix matching: --api-key must never mean --api-key-file
    p.add_argument("--type", default=DEFAULT_TYPE, help="instance type name (default %(default)s)")
    p.add_argument("--region", help="region name (default: the first with capacity)")
    p.add_argument("--ssh-key", help="name of your SSH key in Lambda Cloud (default: your only one)")
    p.add_argument("--identity-file", help="private key file for ssh/scp (default: ssh's own choice)")
    p.add_argument("--ssh-user", default="ubuntu")
    p.add_argument("--hours", type=float, default=4.0, help="expected run length, for the cost estimate")
    p.add_argument("--max-hours", type=float, default=12.0, help="give up on the run (and terminate) after this")
    p.add_argument("--boot-timeout-min", type=float, default=30.0, help="give up if not active after this")
    p.add_argument("--fetch", action="append", help=f"path under the repo on the node to copy back "
                   f"(repeatable; default {' '.join(DEFAULT_FETCH)})")
    p.add_argument("--out-dir", default="out/lambda", help="where results land, one folder per instance")
    p.add_argument("--dry-run", action="store_true", help="print the plan and cost estimate, launch nothing")
    p.add_argument("--keep", action="store_true", help="leave the instance running at the end")
    p.add_argument("--terminate", metavar="INSTANCE_ID", help="only terminate this instance, then exit")
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
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent, help=hidden)
    args = p.parse_args(argv)
    args.fetch = args.fetch or DEFAULT_FETCH
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--api-key" or a.startswith("--api-key=") for a in argv):  # refuse before argparse echoes it
        raise UserError("the API key is never taken on the command line (every user can read it in `ps`); "
                        "set LAMBDA_API_KEY or use --api-key-file.")
    args = parse_args(argv)

    def interrupted(signum, frame):  # Ctrl-C and `kill` both unwind through the cleanup in launch_and_run
        raise KeyboardInterrupt
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, interrupted)

    api = LambdaAPI(args.api_base, read_api_key(args.api_key_file), interval=args.api_interval,
                    launch_interval=args.launch_interval, retries=args.retries, backoff=args.backoff_seconds)
    if args.terminate:
        api.terminate([args.terminate])
        print(f"terminated {args.terminate}")
        return 0
    files = repo_files(args.repo)  # before any money is spent
    types = api.instance_types()
    itype, region, regions = pick_type_and_region(types, args.type, args.region)
    try:
        ssh_key = resolve_ssh_key(api, args.ssh_key)
    except UserError as e:
        if not args.dry_run:
            raise
        ssh_key = f"! {e}"
    print_plan(args, itype, region, regions, ssh_key, files)
    if args.dry_run:
        return 0
    if region is None:
        where = f"in {args.region}" if args.region else "in any region"
        raise RemoteError(f"no capacity for {args.type} {where} right now; types with capacity: "
                          f"{types_with_capacity(types)}.")
    return launch_and_run(api, args, itype, region, ssh_key, files)


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {redact(e)}", file=sys.stderr)
        sys.exit(2)
    except ApiError as e:
        print(f"error: Lambda API request failed: {e.code}\n  message: {e.message}", file=sys.stderr)
        if e.suggestion:
            print(f"  suggestion: {e.suggestion}", file=sys.stderr)
        sys.exit(1)
    except RemoteError as e:
        print(f"error: {redact(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted.", file=sys.stderr)
        sys.exit(130)
    except Exception:  # a bug: show where, but never a secret
        print(redact(traceback.format_exc()), file=sys.stderr)
        sys.exit(1)
