#!/usr/bin/env python3
"""
The node's own end of its bill. launch_lambda.py starts this on the rented node (as root, detached)
before the speedrun; it terminates this very instance through the Lambda API when

  - the deadline passes (--max-hours plus the grace the launcher had to fetch the results), or
  - the launcher's heartbeat stops (the launcher touches a file on every poll of the run) for
    --heartbeat-seconds: the laptop slept, lost power or its network, or the launcher was killed.

Lambda bills a powered-off node until it is terminated, so only a terminate ends the bill, and only
the node itself is sure to be there to send it. The key arrives in a root-only file on a tmpfs
(/run); we read it and delete the file at once, so it lives only in this process's memory: never on
disk, on a command line or in our log. A terminate is retried with backoff for as long as the API
fails, and counts as done only when the API's own JSON says the instance is terminating, terminated
or does not exist. Standard library only: it runs with the node's python3.
"""
import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

GONE = ("terminating", "terminated")
NOT_FOUND = "global/object-does-not-exist"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):  # a redirect would carry the Authorization header elsewhere
        return None


def log(text):
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} watchdog: {text}", flush=True)


def call(args, key, method, path, body=None):
    """(HTTP status or None, the answer's JSON or None); never raises."""
    req = urllib.request.Request(args.api_base.rstrip("/") + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {key}", "Accept": "application/json",
                                          "Content-Type": "application/json", "User-Agent": "nanostoney-watchdog"})
    try:
        with urllib.request.build_opener(_NoRedirect).open(req, timeout=30) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read() if e.fp else b""
    except Exception:  # refused, reset, timeout, DNS: try again later
        return None, None
    try:
        return status, json.loads(raw)
    except ValueError:  # a proxy's page: not an answer from the API
        return status, None


def gone(args, key):
    """True only when the API's own JSON says this instance is terminating, terminated or unknown."""
    status, answer = call(args, key, "GET", f"/instances/{args.instance_id}")
    time.sleep(args.interval)
    if not isinstance(answer, dict):
        return False
    if status == 200:
        return (answer.get("data") or {}).get("status") in GONE
    return status == 404 and (answer.get("error") or {}).get("code") == NOT_FOUND


def end_bill(args, key, why):
    log(f"{why}: terminating instance {args.instance_id}")
    delay = args.backoff
    while not gone(args, key):
        status, answer = call(args, key, "POST", "/instance-operations/terminate",
                              {"instance_ids": [args.instance_id]})
        time.sleep(args.interval)
        if status == 200:
            continue  # accepted: confirm with a GET
        code = (answer.get("error") or {}).get("code") if isinstance(answer, dict) else None
        log(f"terminate failed (HTTP {status}, {code or 'no API answer'}); retrying in {delay:g} s")
        time.sleep(delay)
        delay = min(delay * 2, 60.0)
    log(f"instance {args.instance_id} is terminating (the API confirms it)")


def reason_to_stop(args, deadline):
    now = time.time()
    if now >= deadline:
        return "the deadline (--max-hours plus the grace) passed"
    try:
        quiet = now - os.stat(args.heartbeat).st_mtime
    except OSError:
        quiet = float("inf")
    if quiet > args.heartbeat_seconds:
        return f"no heartbeat from the launcher for {quiet:.0f} s"
    return None


def read_key(path):
    """Read the key, then delete its file: from here on it is only in this process's memory."""
    try:
        with open(path) as f:
            return f.read().strip()
    finally:
        os.unlink(path)


def main(argv=None):
    p = argparse.ArgumentParser(description="Terminate this Lambda instance when the launcher is gone.")
    for name in ("--api-base", "--instance-id", "--key-file", "--heartbeat", "--pid-file"):
        p.add_argument(name, required=True)
    for name, default in (("--deadline-seconds", None), ("--heartbeat-seconds", None), ("--poll", 30.0),
                          ("--interval", 1.0), ("--backoff", 2.0)):
        p.add_argument(name, type=float, default=default, required=default is None)
    args = p.parse_args(argv)
    key = read_key(args.key_file)
    with open(args.pid_file, "w") as f:
        f.write(f"{os.getpid()}\n")
    deadline = time.time() + args.deadline_seconds
    log(f"watching instance {args.instance_id}: ends it after {args.deadline_seconds:.0f} s, or after "
        f"{args.heartbeat_seconds:.0f} s without a heartbeat from the launcher")
    while True:
        why = reason_to_stop(args, deadline)
        if why:
            end_bill(args, key, why)
            return 0
        time.sleep(args.poll)


if __name__ == "__main__":
    sys.exit(main())
