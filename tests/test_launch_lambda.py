"""launch_lambda.py against a fake Lambda Cloud API and a fake ssh; no real network, no real node.

The fake API is a threading HTTP server on 127.0.0.1 built from the spec subset in
tests/fixtures/lambda_openapi_subset.json: it routes only the spec's paths and methods, validates
every request body against the spec's request schema (and its own answers against the response
schema) with jsonschema, records every request, and can be told to misbehave (slow or lost answers,
5xx, garbled JSON, redirects, a terminate that fails).

The fake ssh is a small Python script first on PATH: it records its argv, checks that its environment
holds no key, and runs the remote command for real with bash in a sandbox "node" home directory, so
the detached wrapper, `timeout`, the pid liveness check and the tar streams all run as on a node. A
fake `sudo` records the scheduled power-off. The launcher always runs in its own session and signals
go to its process group, as a real Ctrl-C or a closed terminal does; every test kills what it started.
"""
import importlib.util
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch_lambda.py"
SPEC = json.loads((ROOT / "tests/fixtures/lambda_openapi_subset.json").read_text())
LAMBDA_KEY = "secret_nanostoney-test-key_7f3a9c1e5b2d4f60"  # distinctive, so a leak is easy to spot
WANDB_KEY = "wandb-test-key-0123456789abcdef0123456789abcdef"
PREFIX = "/api/v1"
DASHBOARD = "https://cloud.lambda.ai/instances"
FIRST_ID = "0" * 32


def spec_validator(schema):
    # the schema's $refs point into the spec's components; resolve them against a root that has them
    return jsonschema.Draft202012Validator({**schema, "components": SPEC["components"]})


def schema_errors(schema, value):
    return [e.message for e in spec_validator(schema).iter_errors(value)]


# ---------------------------------------------------------------------------------------------------
# Fake Lambda API

def instance_type(name, gpus, cents):
    return {"name": name, "description": f"{gpus}x H100 (80 GB SXM5)", "gpu_description": "H100 (80 GB SXM5)",
            "price_cents_per_hour": cents, "specs": {"vcpus": 26 * gpus, "memory_gib": 225 * gpus,
                                                     "storage_gib": 2750 * gpus, "gpus": gpus}}


def api_error(code, message):
    return {"error": {"code": code, "message": message}}


BAD_GATEWAY = b"<html><body><h1>502 Bad Gateway</h1></body></html>"  # a proxy's page, not the API's JSON


class FakeLambda:
    """Scenario knobs: launch_errors / terminate_errors / get_errors (answers to the first calls:
    (status, body) with body a dict or raw bytes), terminate_fails (every terminate answers 500),
    delays (operationId -> seconds before answering), boot_polls (GETs that still say booting),
    boot_status (what booting turns into), garbled_listing (raw bytes the first garbled_listings GET
    /instances answer with), redirect (every request answers 302 to another path), retry_after (header
    on error answers), unauthorized_message (answer 401 with this message to everything),
    get_404_page (every GET /instances/ID answers a proxy's 404 page), launch_fails_after_start
    (answers to the first launches, sent after the node was started), outage_after_terminate
    (simulated seconds: from the first terminate on, every request gets a proxy's 502 page). Simulated
    time is real time x time_scale: a 20-minute outage passes in seconds, as the launcher's own
    --time-scale makes its clock and backoff pass, with no bound of its own changed."""

    def __init__(self):
        regions = [{"name": "us-east-1", "description": "Virginia, USA"},
                   {"name": "us-west-2", "description": "Arizona, USA"}]
        self.types = {
            "gpu_8x_h100_sxm5": {"instance_type": instance_type("gpu_8x_h100_sxm5", 8, 2392),
                                 "regions_with_capacity_available": regions},
            "gpu_1x_h100_sxm5": {"instance_type": instance_type("gpu_1x_h100_sxm5", 1, 329),
                                 "regions_with_capacity_available": []},
        }
        self.ssh_keys = [{"id": "ddf9a910ceb744a0bb95242cbba6cb50", "name": "my-key",
                          "public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICN+lJwsONkwrdsSnQsu1ydUkIu me"}]
        self.launch_errors, self.terminate_errors, self.get_errors = [], [], []
        self.terminate_fails = False
        self.delays = {}
        self.boot_polls, self.boot_status = 1, "active"
        self.garbled_listing, self.garbled_listings = None, 10 ** 9  # raw bytes to answer GET /instances with
        self.get_404_page = False
        self.terminate_refused_while_booting = False  # as the dashboard's greyed-out button: not yet
        self.launch_fails_after_start = []
        self.outage_after_terminate, self.time_scale, self.outage_start = None, 1.0, None
        self.redirect = False
        self.retry_after = None
        self.unauthorized_message = None
        self.instances = {}
        self.requests = []  # (time, method, path, body)
        self.violations = []  # anything that breaks the spec, from either side
        self.lock = threading.Lock()
        self.routes = [(m.upper(), re.compile("^" + re.sub(r"\{[^}]+\}", "([^/]+)", p) + "$"), p, op)
                       for p, ops in SPEC["paths"].items() for m, op in ops.items()]

    def paths(self, method, path):
        return [b for (_, m, p, b) in self.requests if m == method and p == PREFIX + path]

    def times(self, method, path):
        return [t for (t, m, p, _) in self.requests if m == method and p == PREFIX + path]

    def statuses(self):
        return {iid: inst["status"] for iid, inst in self.instances.items()}

    def instance(self, iid):
        inst = self.instances[iid]
        return {"id": iid, "name": inst["name"], "ip": "198.51.100.7", "private_ip": "10.0.2.7",
                "status": inst["status"], "ssh_key_names": inst["ssh_key_names"], "file_system_names": [],
                "region": {"name": inst["region"], "description": "somewhere"},
                "instance_type": self.types[inst["type"]]["instance_type"],
                "actions": {a: {"available": True}
                            for a in ("migrate", "rebuild", "restart", "cold_reboot", "terminate")}
                | self.terminate_action(inst)}

    def terminate_action(self, inst):
        if self.terminate_refused_while_booting and inst["status"] == "booting":
            return {"terminate": {"available": False, "reason_code": "vm-has-not-launched",
                                  "reason_description": "The instance has not launched yet."}}
        return {}

    def handle(self, method, path, headers, raw):
        """Return (status, body, headers); record the request and every spec violation."""
        route = next(((op, tmpl, m.groups()) for (mm, rx, tmpl, op) in self.routes
                      if mm == method and (m := rx.match(path))), None)
        body = json.loads(raw) if raw else None
        with self.lock:
            self.requests.append((time.time(), method, path, body))
            if self.redirect:
                return 302, b"", {"Location": PREFIX + "/elsewhere"}
            if self.in_outage(path):
                return 502, BAD_GATEWAY, {}
            if route is None:
                self.violations.append(f"{method} {path} is not in the spec")
                return 404, api_error("global/object-does-not-exist", "no such route"), {}
            op, tmpl, params = route
            if headers.get("Authorization") != f"Bearer {LAMBDA_KEY}" or self.unauthorized_message:
                return 401, {"error": {"code": "global/invalid-api-key",
                                       "message": self.unauthorized_message or "API key was invalid.",
                                       "suggestion": "Check your API key or create a new one, then try again."}}, {}
            if "requestBody" in op:
                schema = op["requestBody"]["content"]["application/json"]["schema"]
                errors = ["no body"] if body is None else schema_errors(schema, body)
                if errors:
                    self.violations.append(f"{method} {path}: {errors}")
                    return 400, api_error("global/invalid-parameters", "; ".join(errors)), {}
            elif body is not None:
                self.violations.append(f"{method} {path} sent a body the spec does not take")
        time.sleep(self.delays.get(op["operationId"], 0))  # outside the lock: other requests go on
        with self.lock:
            status, answer = self.answer(op["operationId"], params, body)
            declared = op["responses"].get(str(status))
            if declared and not isinstance(answer, bytes):  # keep the fake honest: its answers match the spec
                errors = schema_errors(declared["content"]["application/json"]["schema"], answer)
                if errors:
                    self.violations.append(f"fake answer to {method} {path}: {errors}")
            extra = {"Retry-After": self.retry_after} if self.retry_after and status >= 429 else {}
            return status, answer, extra

    def in_outage(self, path):
        if self.outage_after_terminate is None:
            return False
        if self.outage_start is None and path.endswith("/instance-operations/terminate"):
            self.outage_start = time.time()
        return self.outage_start is not None and \
            (time.time() - self.outage_start) * self.time_scale < self.outage_after_terminate

    def answer(self, operation, params, body):
        if operation == "listInstanceTypes":
            return 200, {"data": self.types}
        if operation == "listSSHKeys":
            return 200, {"data": self.ssh_keys}
        if operation == "launchInstance":
            if self.launch_errors:
                status, error = self.launch_errors.pop(0)
                return status, {"error": error}
            iid = f"{len(self.instances):032x}"
            self.instances[iid] = {"name": body.get("name", ""), "status": "booting", "polls": 0,
                                   "region": body["region_name"], "type": body["instance_type_name"],
                                   "ssh_key_names": body["ssh_key_names"]}
            if self.launch_fails_after_start:
                status, error = self.launch_fails_after_start.pop(0)
                return status, {"error": error}
            return 200, {"data": {"instance_ids": [iid]}}
        if operation == "listInstances":
            if self.garbled_listing and self.garbled_listings > 0:
                self.garbled_listings -= 1
                return 200, self.garbled_listing
            return 200, {"data": [self.instance(i) for i in self.instances]}
        if operation == "getInstance":
            if self.get_errors:
                return self.get_errors.pop(0)
            if self.get_404_page:
                return 404, b"<html><body><h1>404 Not Found</h1>nginx</body></html>"
            inst = self.instances.get(params[0])
            if inst is None:
                return 404, api_error("global/object-does-not-exist", "Specified instance does not exist.")
            inst["polls"] += 1
            if inst["status"] == "booting" and inst["polls"] > self.boot_polls:
                inst["status"] = self.boot_status
            return 200, {"data": self.instance(params[0])}
        if operation == "terminateInstance":
            if self.terminate_fails:
                return 500, api_error("global/unknown", "Internal server error")
            if self.terminate_errors:
                return self.terminate_errors.pop(0)
            if any(self.terminate_action(self.instances[i]) for i in body["instance_ids"] if i in self.instances):
                return 400, api_error("global/invalid-parameters", "The instance cannot be terminated yet.")
            if any(i not in self.instances for i in body["instance_ids"]):
                return 404, api_error("global/object-does-not-exist", "Specified instance does not exist.")
            for iid in body["instance_ids"]:
                self.instances[iid]["status"] = "terminating"
            return 200, {"data": {"terminated_instances": [self.instance(i) for i in body["instance_ids"]]}}
        raise AssertionError(operation)


@pytest.fixture
def api():
    fake = FakeLambda()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.reply()

        def do_POST(self):
            self.reply()

        def reply(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, answer, headers = fake.handle(self.command, self.path, self.headers, raw)
            data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "text/html" if isinstance(answer, bytes) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client gave up waiting (a launch whose answer is lost): fine
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.timeout = 0.05
    stop = threading.Event()
    deadline = time.monotonic() + 120  # the server stops by itself even if teardown never runs

    def serve():
        while not stop.is_set() and time.monotonic() < deadline:
            server.handle_request()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    fake.base = f"http://127.0.0.1:{server.server_address[1]}{PREFIX}"
    yield fake
    stop.set()
    thread.join(timeout=5)
    server.server_close()


# ---------------------------------------------------------------------------------------------------
# Fake ssh and sudo, a fake node home, and a tiny repo to ship

FAKE_SSH = r'''
import json, os, signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_DFL)  # die quietly on Ctrl-C, as ssh does
state = os.environ["FAKE_STATE"]
args = sys.argv[1:]
i = 0
while i < len(args) and args[i].startswith("-"):
    i += 2 if args[i] in ("-o", "-i", "-p", "-F", "-l") else 1
command = " ".join(args[i + 1:])
if any(k in os.environ for k in ("LAMBDA_API_KEY", "WANDB_API_KEY")):
    open(os.path.join(state, "env_leak"), "w").write(command)
with open(os.path.join(state, "calls.jsonl"), "a") as f:
    f.write(json.dumps({"time": time.time(), "argv": sys.argv}) + "\n")
if os.path.exists(os.path.join(state, "network_down")):
    sys.stderr.write("ssh: connect to host 198.51.100.7 port 22: Connection timed out\n")
    sys.exit(255)
if "tar -czf" in command and os.path.exists(os.path.join(state, "fetch_fails")):
    sys.stderr.write("ssh: connect to host 198.51.100.7 port 22: Connection reset by peer\n")
    sys.exit(255)
if "tar -czf" in command and os.path.exists(os.path.join(state, "fetch_slow")):
    time.sleep(float(open(os.path.join(state, "fetch_slow")).read() or 2))
home = os.path.join(state, "home")
os.makedirs(home, exist_ok=True)
sys.exit(subprocess.run(["bash", "-c", command], cwd=home).returncode)
'''

# Records its argv; runs what it is given (as the user: the fake node has no root), except shutdown.
FAKE_SUDO = r'''
import json, os, sys
with open(os.path.join(os.environ["FAKE_STATE"], "sudo.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
args = sys.argv[2:] if sys.argv[1:2] == ["-n"] else sys.argv[1:]
if args[0] != "shutdown":
    os.execvp(args[0], args)
'''

# Plays run_stoney_small.sh on the node: writes what the real one writes under its --out, then ends
# as FAKE_RUN says: ok (exit FAKE_RUN_EXIT), hang (until killed), die (kills its wrapper, as an OOM
# kill or a reboot would, and lingers).
FAKE_SPEEDRUN = r'''#!/usr/bin/env bash
OUT=out ARGS="$*"
while [ $# -gt 0 ]; do case "$1" in --out) OUT="$2"; shift ;; esac; shift; done
mkdir -p "$OUT/report" "$OUT/eval" "$OUT/logs" "$OUT/base/wandb/offline-run-1"
echo '<html></html>' > "$OUT/report/index.html"
echo '{"step": 1, "loss": 3.2}' > "$OUT/base/metrics.jsonl"
echo run > "$OUT/base/wandb/offline-run-1/run-1.wandb"
echo weights > "$OUT/base/model.pt"
printf 'base\t1\n' > "$OUT/stage_times.tsv"
printf '%s' "${WANDB_API_KEY:-}" > "$FAKE_STATE/wandb_env"
echo "step 1 (args: $ARGS)"
case "${FAKE_RUN:-ok}" in
    hang) exec sleep 600 ;;
    die) kill -9 "$(cut -d' ' -f1 .launch_pid)"; echo '{"died": true}' >> "$FAKE_STATE/calls.jsonl"; exec sleep 600 ;;
    *) echo "speedrun finished"; exit "${FAKE_RUN_EXIT:-0}" ;;
esac
'''


def node_sessions(state):
    """Pids of every process in the detached wrapper's session on the fake node (timeout moves the
    speedrun into its own process group, but not out of the session)."""
    pid_file = state / "home" / "nanostoney" / ".launch_pid"
    if not pid_file.exists() or not pid_file.read_text().split():
        return []
    sid, pids = pid_file.read_text().split()[0], []
    for proc in Path("/proc").iterdir():
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if proc.name.isdigit() and fields[3] == sid:
            pids.append(int(proc.name))
    return pids


@pytest.fixture
def node(tmp_path):
    """Fake bin dir, node state (its home under state/home), and a tiny git repo with a fake speedrun."""
    bin_dir, state, repo = tmp_path / "bin", tmp_path / "state", tmp_path / "repo"
    for d in (bin_dir, state, repo):
        d.mkdir()
    for name, body in (("ssh", FAKE_SSH), ("sudo", FAKE_SUDO)):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{body}")
        (bin_dir / name).chmod(0o755)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "run_stoney_small.sh").write_text(FAKE_SPEEDRUN)
    (repo / ".gitignore").write_text("out/\n")
    (repo / "out").mkdir()
    (repo / "out" / "ignored.bin").write_text("never shipped\n")
    yield {"bin": bin_dir, "state": state, "repo": repo, "out": tmp_path / "results",
           "home": state / "home" / "nanostoney", "run": state / "run"}
    stop_node(state)


def stop_node(state):
    """Kill whatever a test left running on the "node", its watchdog included."""
    for pid in node_sessions(state) + [p for p in [watchdog_pid(state / "home" / "nanostoney")] if p]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def watchdog_pid(home):
    """The node's watchdog, while it runs (its own session: nothing the launcher's group gets reaches it)."""
    try:
        pid = int((home / ".watchdog_pid").read_text())
        return pid if ".watchdog.py" in Path(f"/proc/{pid}/cmdline").read_text() else None
    except (OSError, ValueError):
        return None


def launcher_cmd(api, node, *extra):
    return [sys.executable, str(LAUNCHER), "--api-base", api.base, "--repo", str(node["repo"]),
            "--out-dir", str(node["out"]), "--poll-seconds", "0.05", "--api-interval", "0.001",
            "--launch-interval", "0.002", "--backoff-seconds", "0.001", "--cleanup-seconds", "5",
            "--lost-launch-seconds", "10", "--yes", *extra]


def launcher_env(node, key=LAMBDA_KEY, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("LAMBDA_API_KEY", "WANDB_API_KEY")}
    env.update(PATH=f"{node['bin']}{os.pathsep}{env.get('PATH', '')}", FAKE_STATE=str(node["state"]),
               WANDB_API_KEY=WANDB_KEY, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
               NANOSTONEY_NODE_RUN=str(node["run"]))
    env.update(extra)
    if key:
        env["LAMBDA_API_KEY"] = key
    return env


def run_launcher(api, node, *extra, key=LAMBDA_KEY, **env):
    proc = subprocess.Popen(launcher_cmd(api, node, *extra), env=launcher_env(node, key, **env),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        kill_group(proc)
    assert_no_secrets(out + err)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_group(proc):
    """The launcher and anything left in its process group (ssh children)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class Launcher:
    """The launcher in its own session (so a signal to its group reaches it and its ssh children, as
    a terminal's Ctrl-C does), killed with its whole group on exit."""

    def __init__(self, api, node, *extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE, prefix=(), **env):
        self.proc = subprocess.Popen([*prefix, *launcher_cmd(api, node, "--ssh-key", "my-key", *extra)],
                                     env=launcher_env(node, **env), stdin=subprocess.DEVNULL,
                                     stdout=stdout, stderr=stderr, start_new_session=True)

    def signal(self, sig):
        os.killpg(self.proc.pid, sig)

    def wait_for(self, condition, what):
        for _ in range(600):  # bounded: at most ~30 s
            if condition():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        kill_group(self.proc)
        out, err = self.proc.communicate()
        pytest.fail(f"never saw {what}; launcher exit {self.proc.returncode}\n{out}\n{err}")

    def finish(self, timeout=60):
        out, err = self.proc.communicate(timeout=timeout)
        out, err = (x.decode() if isinstance(x, bytes) else x or "" for x in (out, err))
        assert_no_secrets(out + err)
        return self.proc.returncode, out, err

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        kill_group(self.proc)


def assert_no_secrets(text):
    assert LAMBDA_KEY not in text and WANDB_KEY not in text


def ssh_calls(node):
    path = node["state"] / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def polls(node):
    return [c for c in ssh_calls(node) if "argv" in c and ".launch_exit" in c["argv"][-1]]


def sudo_calls(node, what="shutdown"):
    path = node["state"] / "sudo.jsonl"
    calls = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [c for c in calls if what in c]


def terminated_ids(api):
    return [i for body in api.paths("POST", "/instance-operations/terminate") for i in body["instance_ids"]]


def assert_all_stopped(api):
    """Every launched instance was terminated and the launcher then checked it with a GET."""
    assert api.instances and set(api.statuses().values()) == {"terminating"}, api.statuses()
    last_terminate = max(api.times("POST", "/instance-operations/terminate"))
    for iid in api.instances:
        assert any(t > last_terminate for t in api.times("GET", f"/instances/{iid}")), "termination not confirmed"
    assert api.violations == []


def result_dir(node):
    (d,) = [d for d in node["out"].iterdir() if d.is_dir()]  # beside it: launch.log (and UNTERMINATED)
    return d


def run_started(node):
    return lambda: (node["home"] / ".launch_pid").exists() and polls(node)


# ---------------------------------------------------------------------------------------------------
# The full flow

def test_success_ships_repo_passes_key_on_stdin_fetches_results_and_terminates(api, node):
    r = run_launcher(api, node, "--ssh-key", "my-key")
    assert r.returncode == 0, r.stderr
    assert api.violations == []
    launches = api.paths("POST", "/instance-operations/launch")
    assert len(launches) == 1
    assert launches[0]["instance_type_name"] == "gpu_8x_h100_sxm5"
    assert launches[0]["region_name"] == "us-east-1"  # the first region with capacity
    assert launches[0]["ssh_key_names"] == ["my-key"]
    assert terminated_ids(api) == list(api.instances)
    assert_all_stopped(api)
    # the repo went over: tracked/untracked files yes, ignored ones no
    assert (node["home"] / "run_stoney_small.sh").exists() and not (node["home"] / "out" / "ignored.bin").exists()
    # the W&B key reached the speedrun's environment through ssh's stdin, never an argv or ssh's env
    assert (node["state"] / "wandb_env").read_text() == WANDB_KEY
    calls = [c["argv"] for c in ssh_calls(node)]
    assert calls and not any(WANDB_KEY in arg or LAMBDA_KEY in arg for call in calls for arg in call)
    assert not (node["state"] / "env_leak").exists()
    # the results came back from the speedrun's --out, checkpoints excepted, and the node's log too
    out = result_dir(node)
    for path in ("out/report/index.html", "out/base/metrics.jsonl", "out/base/wandb/offline-run-1/run-1.wandb",
                 "out/stage_times.tsv", "speedrun.log"):
        assert (out / path).is_file(), path
    assert not (out / "out" / "base" / "model.pt").exists()
    assert "speedrun finished" in (out / "speedrun.log").read_text()
    assert "step 1" in r.stdout and "terminated" in r.stdout
    # the node-side cap: a power-off scheduled for --max-hours (default twice --hours) + 10 min
    assert sudo_calls(node) == [["-n", "shutdown", "-h", f"+{8 * 60 + 10 + 30}"]]  # 30: the watchdog's
    # the watchdog started as root, and its key file is gone from the node's tmpfs folder
    assert [c[3:5] for c in sudo_calls(node, "setsid")] == [["python3", ".watchdog.py"]]
    assert node["run"].is_dir() and list(node["run"].iterdir()) == []


def test_remote_failure_fetches_results_and_terminates(api, node):
    r = run_launcher(api, node, "--ssh-key", "my-key", FAKE_RUN_EXIT="3")
    assert r.returncode == 1
    assert "exited with code 3" in r.stderr
    assert (result_dir(node) / "out/base/metrics.jsonl").is_file()
    assert (result_dir(node) / "speedrun.log").is_file()
    assert len(api.instances) == 1
    assert_all_stopped(api)


def test_only_ssh_key_speedrun_args_and_its_out_dir(api, node):
    r = run_launcher(api, node, "--", "--depth", "4", "--out", "runs/d4")
    assert r.returncode == 0, r.stderr
    assert api.paths("POST", "/instance-operations/launch")[0]["ssh_key_names"] == ["my-key"]
    assert "step 1 (args: --depth 4 --out runs/d4)" in r.stdout
    out = result_dir(node)
    assert (out / "runs/d4/report/index.html").is_file() and (out / "runs/d4/base/metrics.jsonl").is_file()
    assert not (out / "out").exists()


def test_keep_leaves_the_instance_running_without_a_power_off(api, node):
    r = run_launcher(api, node, "--ssh-key", "my-key", "--keep")
    assert r.returncode == 0, r.stderr
    assert terminated_ids(api) == []
    assert "--terminate" in r.stdout
    assert sudo_calls(node) == []


# ---------------------------------------------------------------------------------------------------
# Signals, to the process group, as a terminal sends them

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT])
def test_signal_during_the_run_fetches_results_and_terminates(api, node, sig):
    with Launcher(api, node, FAKE_RUN="hang") as launcher:
        launcher.wait_for(run_started(node), "the run")
        launcher.signal(sig)
        code, out, err = launcher.finish()
    assert code == 130, err
    assert terminated_ids(api) == [FIRST_ID], out + err
    assert_all_stopped(api)
    assert (result_dir(node) / "out/report/index.html").is_file()
    fetch = [c["time"] for c in ssh_calls(node) if "argv" in c and "tar -czf" in c["argv"][-1]]
    assert fetch and max(fetch) < min(api.times("POST", "/instance-operations/terminate"))


def test_sigterm_during_the_boot_poll_terminates(api, node):
    api.boot_polls = 10 ** 9  # never becomes active: the launcher sits polling the API
    with Launcher(api, node) as launcher:
        launcher.wait_for(lambda: len(api.paths("GET", f"/instances/{FIRST_ID}")) >= 2, "the boot poll")
        launcher.signal(signal.SIGTERM)
        code, out, err = launcher.finish()
    assert code == 130, err
    assert_all_stopped(api)


def test_sighup_with_the_terminal_gone_still_terminates(api, node):
    """The terminal closes: writes to it fail with EIO, and the session gets SIGHUP."""
    master, slave = pty.openpty()
    stop, seen = threading.Event(), []

    def drain():  # the terminal's side, until it closes
        while not stop.is_set():
            if select.select([master], [], [], 0.05)[0]:
                try:
                    seen.append(os.read(master, 65536))
                except OSError:
                    break
        os.close(master)
    reader = threading.Thread(target=drain)
    reader.start()
    try:
        with Launcher(api, node, stdout=slave, stderr=slave, FAKE_RUN="hang") as launcher:
            os.close(slave)
            launcher.wait_for(run_started(node), "the run")
            stop.set()
            reader.join()  # the terminal is closed now
            launcher.signal(signal.SIGHUP)
            code, _, _ = launcher.finish()
    finally:
        stop.set()
        reader.join()
    assert code == 130
    assert_all_stopped(api)
    assert LAMBDA_KEY.encode() not in b"".join(seen) and WANDB_KEY.encode() not in b"".join(seen)


def test_under_nohup_a_closed_terminal_does_not_end_the_run(api, node):
    with Launcher(api, node, prefix=["nohup"], FAKE_RUN="hang") as launcher:
        launcher.wait_for(run_started(node), "the run")
        launcher.signal(signal.SIGHUP)
        seen = len(polls(node))
        launcher.wait_for(lambda: len(polls(node)) >= seen + 3, "polls going on after SIGHUP")
        assert terminated_ids(api) == []
        launcher.signal(signal.SIGINT)  # nohup leaves Ctrl-C (and kill) working
        code, out, err = launcher.finish()
    assert code == 130, err
    assert_all_stopped(api)


def test_ctrl_c_with_stdout_piped_into_a_reader_that_exited(api, node):
    """`launch_lambda.py | tee log` and Ctrl-C: tee dies too; cleanup must survive EPIPE."""
    read_end, write_end = os.pipe()
    with Launcher(api, node, stdout=write_end, FAKE_RUN="hang") as launcher:
        os.close(write_end)
        launcher.wait_for(run_started(node), "the run")
        os.close(read_end)  # the reader exits
        launcher.signal(signal.SIGINT)
        code, _, err = launcher.finish()
    assert code == 130, err
    assert_all_stopped(api)
    assert "terminated" in err  # what could not go to stdout went to stderr
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_second_signal_during_cleanup_does_not_skip_it(api, node):
    api.delays["terminateInstance"] = 0.5  # a slow terminate: signals arrive while it is in flight
    with Launcher(api, node, FAKE_RUN="hang") as launcher:
        launcher.wait_for(run_started(node), "the run")
        launcher.signal(signal.SIGINT)
        launcher.wait_for(lambda: api.paths("POST", "/instance-operations/terminate"), "the terminate")
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            launcher.signal(sig)
        code, out, err = launcher.finish()
    assert code == 130, err
    assert_all_stopped(api)


def test_interrupt_during_a_launch_finds_and_terminates_the_node(api, node):
    api.delays["launchInstance"] = 1.0  # the node is created while the answer is still on its way
    with Launcher(api, node) as launcher:
        launcher.wait_for(lambda: api.paths("POST", "/instance-operations/launch"), "the launch")
        launcher.signal(signal.SIGINT)
        code, out, err = launcher.finish()
    assert code == 130, err
    assert terminated_ids(api) == [FIRST_ID], out + err
    assert_all_stopped(api)


# ---------------------------------------------------------------------------------------------------
# The API misbehaving

def test_terminate_errors_are_retried_and_confirmed(api, node):
    api.terminate_errors = [(500, api_error("global/unknown", "Internal server error")), (502, BAD_GATEWAY)]
    r = run_launcher(api, node, "--ssh-key", "my-key")
    assert r.returncode == 0, r.stderr
    assert len(api.paths("POST", "/instance-operations/terminate")) == 3
    assert_all_stopped(api)


def test_terminate_that_never_succeeds_names_the_instance_and_fails(api, node):
    api.terminate_fails = True
    r = run_launcher(api, node, "--ssh-key", "my-key", "--cleanup-seconds", "1", FAKE_RUN_EXIT="3")
    assert r.returncode == 1 and "exited with code 3" in r.stderr
    assert FIRST_ID in r.stderr and DASHBOARD in r.stderr and "may still be billing" in r.stderr
    assert len(api.paths("POST", "/instance-operations/terminate")) >= 2


def test_terminate_subcommand_confirms(api, node):
    api.instances[FIRST_ID] = {"name": "x", "status": "active", "polls": 0, "region": "us-east-1",
                               "type": "gpu_8x_h100_sxm5", "ssh_key_names": ["my-key"]}
    r = run_launcher(api, node, "--terminate", FIRST_ID)
    assert r.returncode == 0, r.stderr
    assert_all_stopped(api)
    api.terminate_fails = True
    r = run_launcher(api, node, "--terminate", "f" * 32, "--cleanup-seconds", "0.5")
    assert r.returncode == 0, r.stderr  # 404 on the GET: it does not exist, so nothing bills


@pytest.mark.parametrize("listing", [BAD_GATEWAY, b'{"data": "not a list of instances"}'])
def test_garbled_listing_during_cleanup_still_terminates_the_known_node(api, node, listing):
    api.garbled_listing, api.garbled_listings = listing, 2  # then the API answers again: confirmed
    r = run_launcher(api, node, "--ssh-key", "my-key", "--retries", "1")
    assert r.returncode == 0, r.stderr
    assert "could not list instances" in r.stdout + r.stderr
    assert_all_stopped(api)


def test_launch_that_times_out_is_found_by_its_name(api, node):
    api.delays["launchInstance"] = 1.5  # the answer comes after the client gave up
    r = run_launcher(api, node, "--ssh-key", "my-key", "--http-timeout", "0.5")
    assert r.returncode == 0, r.stderr
    assert len(api.paths("POST", "/instance-operations/launch")) == 1  # never sent twice
    assert "launch answer was lost" in r.stdout
    assert (result_dir(node) / "out/report/index.html").is_file()  # and the run went on, on that node
    assert_all_stopped(api)


def test_5xx_during_the_boot_poll_is_retried(api, node):
    api.get_errors = [(502, BAD_GATEWAY), (503, api_error("global/unknown", "unavailable"))]
    r = run_launcher(api, node, "--ssh-key", "my-key")
    assert r.returncode == 0, r.stderr
    assert_all_stopped(api)


def test_unhealthy_instance_is_terminated(api, node):
    api.boot_status = "unhealthy"
    r = run_launcher(api, node, "--ssh-key", "my-key")
    assert r.returncode == 1 and "unhealthy" in r.stderr
    assert_all_stopped(api)


def test_insufficient_capacity_tries_the_next_region_unless_one_was_given(api, node):
    no_capacity = (400, {"code": "instance-operations/launch/insufficient-capacity",
                         "message": "Not enough capacity to fulfill launch request.",
                         "suggestion": "Try another region or instance type."})
    api.launch_errors = [no_capacity]
    r = run_launcher(api, node, "--ssh-key", "my-key", "--region", "us-east-1")
    assert r.returncode == 1
    assert "instance-operations/launch/insufficient-capacity" in r.stderr
    assert "Try another region or instance type." in r.stderr
    assert len(api.paths("POST", "/instance-operations/launch")) == 1 and terminated_ids(api) == []
    api.launch_errors = [no_capacity]
    r = run_launcher(api, node, "--ssh-key", "my-key")
    assert r.returncode == 0, r.stderr
    assert [b["region_name"] for b in api.paths("POST", "/instance-operations/launch")[1:]] == \
        ["us-east-1", "us-west-2"]
    assert_all_stopped(api)


def test_provider_errors_are_retried(api, node):
    unavailable = (503, {"code": "provider/internal-unavailable", "message": "Provider unavailable",
                         "suggestion": "Try again shortly"})
    api.launch_errors = [unavailable, unavailable]
    r = run_launcher(api, node, "--ssh-key", "my-key")
    assert r.returncode == 0, r.stderr
    assert len(api.paths("POST", "/instance-operations/launch")) == 3
    assert r.stdout.count("provider/internal-unavailable") == 2
    assert_all_stopped(api)


def test_provider_retries_are_bounded(api, node):
    api.launch_errors = [(503, {"code": "provider/internal-unavailable", "message": "Provider unavailable",
                                "suggestion": "Try again shortly"})] * 10
    r = run_launcher(api, node, "--ssh-key", "my-key", "--retries", "2")
    assert r.returncode == 1
    assert len(api.paths("POST", "/instance-operations/launch")) == 3
    assert "provider/internal-unavailable" in r.stderr and "Try again shortly" in r.stderr


def test_redirects_are_not_followed(api, node):
    api.redirect = True
    r = run_launcher(api, node, "--dry-run")
    assert r.returncode == 1 and "redirect" in r.stderr
    assert [p for (_, _, p, _) in api.requests] == [PREFIX + "/instance-types"]  # never /elsewhere


def test_plain_http_is_refused_except_for_localhost(api, node):
    r = run_launcher(api, node, "--dry-run", "--api-base", "http://cloud.lambda.ai/api/v1")
    assert r.returncode == 2 and "https" in r.stderr and "\n" not in r.stderr.strip()
    assert api.requests == []


def test_api_key_is_redacted_even_when_the_api_echoes_it(api, node):
    api.unauthorized_message = f"API key {LAMBDA_KEY} was invalid, expired, or deleted."
    r = run_launcher(api, node, "--dry-run")  # run_launcher asserts the key is absent from the output
    assert r.returncode == 1
    assert "global/invalid-api-key" in r.stderr and "***" in r.stderr


def test_api_key_is_refused_on_the_command_line(api, node):
    r = run_launcher(api, node, "--api-key", LAMBDA_KEY, "--dry-run")
    assert r.returncode == 2 and "LAMBDA_API_KEY" in r.stderr
    assert api.requests == []


def test_api_key_file(api, node, tmp_path):
    (tmp_path / "key").write_text(LAMBDA_KEY + "\n")
    r = run_launcher(api, node, "--dry-run", "--api-key-file", str(tmp_path / "key"), key=None)
    assert r.returncode == 0, r.stderr
    r = run_launcher(api, node, "--dry-run", "--api-key-file", str(tmp_path / LAMBDA_KEY), key=None)
    assert r.returncode == 2  # and the "path" (here: a key typed in its place) is not echoed


def test_unknown_type_and_region_without_capacity(api, node):
    r = run_launcher(api, node, "--type", "gpu_9x_nope")
    assert r.returncode == 2 and "gpu_8x_h100_sxm5" in r.stderr
    r = run_launcher(api, node, "--type", "gpu_1x_h100_sxm5", "--ssh-key", "my-key")
    assert r.returncode == 1 and "no capacity" in r.stderr and "gpu_8x_h100_sxm5 (us-east-1, us-west-2)" in r.stderr
    r = run_launcher(api, node, "--ssh-key", "nobody")
    assert r.returncode == 2 and "my-key" in r.stderr
    assert api.paths("POST", "/instance-operations/launch") == []


# ---------------------------------------------------------------------------------------------------
# The node: a dead wrapper, and the node-side cap

def test_dead_wrapper_is_noticed_in_one_poll(api, node):
    r = run_launcher(api, node, "--ssh-key", "my-key", FAKE_RUN="die")
    assert r.returncode == 1 and "died without an exit code" in r.stderr
    calls = ssh_calls(node)
    died = next(n for n, c in enumerate(calls) if c.get("died"))
    assert len([c for c in calls[died:] if "argv" in c and ".launch_exit" in c["argv"][-1]]) <= 1
    assert (result_dir(node) / "out/base/metrics.jsonl").is_file()
    assert_all_stopped(api)


def test_lost_connection_still_terminates(api, node):
    with Launcher(api, node, FAKE_RUN="hang") as launcher:
        launcher.wait_for(run_started(node), "the run")
        (node["state"] / "network_down").touch()  # every ssh from now on fails, fetch included
        code, out, err = launcher.finish()
    assert code == 1 and "lost the connection" in err and "Connection timed out" in err
    assert "copying the results back failed" in out
    assert_all_stopped(api)


def test_max_hours_stops_the_run_on_the_node(api, node):
    r = run_launcher(api, node, "--ssh-key", "my-key", "--hours", "0.0001", "--max-hours", "0.0005",
                     FAKE_RUN="hang")  # a 1.8 s deadline
    assert r.returncode == 1 and "--max-hours" in r.stderr
    assert sudo_calls(node) == [["-n", "shutdown", "-h", f"+{1 + 10 + 30}"]]
    assert (result_dir(node) / "out/report/index.html").is_file()
    assert_all_stopped(api)


def test_node_side_cap_works_without_the_launcher(api, node):
    with Launcher(api, node, "--hours", "0.0001", "--max-hours", "0.0005", FAKE_RUN="hang") as launcher:
        launcher.wait_for(run_started(node), "the run")
        launcher.signal(signal.SIGKILL)  # the launcher and its ssh die without a word
        launcher.proc.wait()
    assert sudo_calls(node) == [["-n", "shutdown", "-h", f"+{1 + 10 + 30}"]]  # the power-off is the node's own
    exit_file = node["home"] / ".launch_exit"
    for _ in range(200):  # the run still ends at its deadline on the node (bounded wait, ~10 s)
        if exit_file.exists():
            break
        time.sleep(0.05)
    assert exit_file.read_text().strip() == "124"  # timeout's code


# ---------------------------------------------------------------------------------------------------
# Dry run

def test_dry_run_without_key_explains_in_one_sentence(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LAMBDA_API_KEY"}
    r = subprocess.run([sys.executable, str(LAUNCHER), "--dry-run", "--api-base", "http://127.0.0.1:9/api/v1"],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stdout == ""
    message = r.stderr.strip()
    assert "\n" not in message and message.count(". ") == 0 and message.endswith(".")
    assert "LAMBDA_API_KEY" in message and "https://cloud.lambda.ai/api-keys" in message


def test_dry_run_prints_plan_and_cost_and_launches_nothing(api, node):
    r = run_launcher(api, node, "--dry-run", "--hours", "2.5")
    assert r.returncode == 0, r.stderr
    assert "gpu_8x_h100_sxm5" in r.stdout and "us-east-1" in r.stdout and "us-west-2" in r.stdout
    assert "$23.92/h" in r.stdout and "$59.80" in r.stdout  # 2392 cents/h x 2.5 h
    # worst case, every bound: the lost-launch watch (10 s here), boot 30 min, ssh 40 x (15 + 0.05) s,
    # the copy 10 min, the 5 h cap (twice --hours), the fetch 10 min: 6.0033 h x $23.92/h
    assert "$143.60" in r.stdout and "even if this launcher dies" in r.stdout
    assert "watchdog       on" in r.stdout and "my-key" in r.stdout
    assert api.paths("POST", "/instance-operations/launch") == [] and api.violations == []
    r = run_launcher(api, node, "--dry-run", "--hours", "2.5", "--no-watchdog")
    assert "unbounded if this launcher dies" in r.stdout and "$143.60" in r.stdout and "if it lives" in r.stdout
    for bad in (["--hours", "3", "--max-hours", "2"], ["--max-hours", "1e6"], ["--hours", "inf"],
                ["--hours", "nan"], ["--max-hours", "-1"]):
        r = run_launcher(api, node, "--dry-run", *bad)
        assert r.returncode == 2 and "hours" in r.stderr and "Traceback" not in r.stderr, bad
        assert "\n" not in r.stderr.strip(), r.stderr
    r = run_launcher(api, node, "--dry-run", "--max-hours", "30", "--allow-long-runs")
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------------
# The client, with a fake clock (no wall-clock assertions)

@pytest.fixture(scope="module")
def launcher():
    spec = importlib.util.spec_from_file_location("launch_lambda", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeClock:
    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def test_rate_limiter_spaces_calls(launcher):
    clock = FakeClock()
    limiter = launcher.RateLimiter({"any": 1.0, "launch": 12.0}, clock, clock.sleep)
    times = []
    for gap, buckets in [(0, ("any",)), (0.2, ("any",)), (0, ("any", "launch")), (0, ("any", "launch")),
                         (30, ("any",)), (0.5, ("any", "launch"))]:
        clock.now += gap
        limiter.wait(*buckets)
        times.append((clock.now, buckets))
    anys = [t for t, _ in times]
    launches = [t for t, b in times if "launch" in b]
    assert all(b - a >= 1.0 for a, b in zip(anys, anys[1:]))
    assert all(b - a >= 12.0 for a, b in zip(launches, launches[1:]))
    assert clock.sleeps[:3] == [pytest.approx(0.8), pytest.approx(1.0), pytest.approx(12.0)]
    assert len(clock.sleeps) == 4  # the call after 30 s idle did not wait; the last launch did


def test_client_spaces_requests_and_backs_off_on_provider_errors(launcher, api):
    clock = FakeClock()
    sent = []
    client = launcher.LambdaAPI(api.base, LAMBDA_KEY, clock=clock, sleep=clock.sleep, retries=4, backoff=2.0)
    waits = []  # the limiter's sleeps, kept apart from the client's backoff sleeps in clock.sleeps

    def limiter_sleep(seconds):
        waits.append(seconds)
        clock.now += seconds
    client.limiter.sleep = limiter_sleep
    real_send = client._send
    client._send = lambda *a: (sent.append(clock.now), real_send(*a))[1]
    unavailable = (503, {"code": "provider/internal-unavailable", "message": "down", "suggestion": "later"})
    api.launch_errors = [unavailable] * 3
    body = {"region_name": "us-east-1", "instance_type_name": "gpu_8x_h100_sxm5", "ssh_key_names": ["my-key"]}
    client.instance_types()
    first = client.launch(body)
    second = client.launch(body)
    assert first != second and api.violations == []
    assert all(b - a >= 1.0 for a, b in zip(sent, sent[1:]))
    launches = sent[1:]
    assert all(b - a >= 12.0 for a, b in zip(launches, launches[1:]))
    assert clock.sleeps == [2.0, 4.0, 8.0]  # three provider errors, exponential backoff
    assert waits  # and the limiter did make requests wait
    assert repr(client).count(LAMBDA_KEY) == 0


def test_backoff_is_bounded_and_honours_retry_after(launcher, api):
    clock = FakeClock()
    client = launcher.LambdaAPI(api.base, LAMBDA_KEY, clock=clock, sleep=clock.sleep, retries=8, backoff=2.0,
                                interval=0.0, launch_interval=0.0)
    api.launch_errors = [(503, {"code": "provider/x", "message": "down"})] * 9
    with pytest.raises(launcher.ApiError) as e:
        client.launch({"region_name": "us-east-1", "instance_type_name": "gpu_8x_h100_sxm5", "ssh_key_names": ["k"]})
    assert e.value.code == "provider/x"
    assert len(api.paths("POST", "/instance-operations/launch")) == 9
    assert max(clock.sleeps) == 60.0  # capped
    clock.sleeps.clear()
    api.retry_after = "7"
    api.get_errors = [(429, api_error("global/rate-limited", "slow down"))] * 2
    with pytest.raises(launcher.ApiError):  # the id does not exist: 404 after two 429s
        client.instance(FIRST_ID)
    assert clock.sleeps == [7.0, 7.0]  # the server's Retry-After beats our 2 s and 4 s


def test_lost_answers_are_told_apart_from_refusals(launcher):
    def err(status, code):
        return launcher.ApiError(status, code, "m")
    assert err(None, "network/error").lost and err(502, "http/502").lost and err(200, launcher.BAD_ANSWER).lost
    assert not err(503, "provider/internal-unavailable").lost and not err(400, launcher.INSUFFICIENT_CAPACITY).lost
    assert launcher.retryable(err(502, "http/502"), launch=False)
    assert not launcher.retryable(err(502, "http/502"), launch=True)  # a launch is never sent twice blindly
    assert launcher.retryable(err(429, "global/rate-limited"), launch=True)
    assert launcher.glob_quote("my out/*/metrics.jsonl") == "'my out/'*/metrics.jsonl"
    assert launcher.speedrun_out(["--depth", "4", "--out", "runs/x/"]) == "runs/x"


def test_a_signal_raises_once_per_arming_and_cleanup_runs_disarmed(launcher):
    launcher._Signals.armed, launcher._Signals.seen = True, []
    with pytest.raises(launcher.Interrupted):
        launcher.on_signal(signal.SIGINT, None)
    try:
        launcher.on_signal(signal.SIGTERM, None)  # the first disarmed the handler: counted, not raised
    except KeyboardInterrupt:
        pytest.fail("a second signal raised: it would cut a cleanup short")
    assert launcher._Signals.seen == [signal.SIGINT, signal.SIGTERM]
    result, error = launcher.guarded(launcher.on_signal, signal.SIGHUP, None)  # a signal inside fn
    assert result is None and isinstance(error, launcher.Interrupted) and not launcher._Signals.armed
    assert launcher.guarded(lambda: 5) == (5, None) and not launcher._Signals.armed


# ---------------------------------------------------------------------------------------------------
# A launcher that dies, or believes the wrong answer (issue 28)

def wait_until(condition, what, seconds=30):
    for _ in range(int(seconds / 0.05)):  # bounded
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"never saw {what}")


def assert_key_nowhere(root, allowed=()):
    """The Lambda key in no file under root (results, log, ledger, the fake node's disk and tmpfs
    folder), and on no process's command line; the watchdog's environment does not hold it either."""
    key = LAMBDA_KEY.encode()
    for path in Path(root).rglob("*"):
        if path.is_file() and path not in allowed:
            assert key not in path.read_bytes(), path
    for proc in Path("/proc").iterdir():
        try:
            assert key not in (proc / "cmdline").read_bytes(), proc
        except OSError:
            pass


def running(pid):
    """Alive and not a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def ledger(node):
    path = node["out"] / "UNTERMINATED"
    return path.read_text() if path.exists() else ""


def test_sigkilled_launcher_is_ended_by_the_node_watchdog(api, node, tmp_path):
    with Launcher(api, node, "--heartbeat-minutes", "0.03", FAKE_RUN="hang") as launcher:
        launcher.wait_for(lambda: run_started(node)() and watchdog_pid(node["home"]), "the run and the watchdog")
        pid = watchdog_pid(node["home"])
        assert LAMBDA_KEY.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
        assert_key_nowhere(tmp_path)  # while it all runs: the key file on the "tmpfs" is already gone
        launcher.signal(signal.SIGKILL)  # no cleanup, no word: only the node can end the bill now
        launcher.proc.wait()
    assert terminated_ids(api) == [] and FIRST_ID in ledger(node)  # the dead launcher left its ids behind
    wait_until(lambda: api.statuses() == {FIRST_ID: "terminating"}, "the watchdog's terminate")
    wait_until(lambda: watchdog_pid(node["home"]) is None, "the watchdog's end")
    log = (node["home"] / ".watchdog_log").read_text()
    assert "no heartbeat from the launcher" in log and "the API confirms it" in log
    assert terminated_ids(api) == [FIRST_ID] and api.violations == []
    assert_key_nowhere(tmp_path)
    # the next run reads the ledger first: the API confirms the node is gone, so it launches
    stop_node(node["state"])  # the first run's speedrun, still "hanging" on the fake node
    r = run_launcher(api, node, "--ssh-key", "my-key")
    assert r.returncode == 0, r.stderr
    assert ledger(node) == ""


def test_watchdog_retries_its_terminate_while_the_api_fails(api, node):
    api.terminate_errors = [(500, api_error("global/unknown", "Internal server error")), (502, BAD_GATEWAY)]
    with Launcher(api, node, "--heartbeat-minutes", "0.03", FAKE_RUN="hang") as launcher:
        launcher.wait_for(lambda: run_started(node)() and watchdog_pid(node["home"]), "the watchdog")
        launcher.signal(signal.SIGKILL)
        launcher.proc.wait()
    wait_until(lambda: api.statuses() == {FIRST_ID: "terminating"}, "the watchdog's terminate")
    wait_until(lambda: watchdog_pid(node["home"]) is None, "the watchdog's end")
    assert len(terminated_ids(api)) == 3
    assert LAMBDA_KEY not in (node["home"] / ".watchdog_log").read_text()


def test_proxy_404_during_a_failing_terminate_is_not_a_termination(api, node):
    api.terminate_fails, api.get_404_page = True, True  # the boot poll fails on it too: cleanup at once
    r = run_launcher(api, node, "--ssh-key", "my-key", "--cleanup-seconds", "1")
    assert r.returncode == 1 and FIRST_ID in r.stderr and "may still be billing" in r.stderr
    assert api.statuses() == {FIRST_ID: "booting"} and FIRST_ID in ledger(node)
    r = run_launcher(api, node, "--terminate", FIRST_ID, "--cleanup-seconds", "1")
    assert r.returncode == 1 and FIRST_ID in r.stderr


def test_a_status_that_still_bills_is_not_a_termination(api, node):
    api.terminate_errors = [(200, {"data": {"terminated_instances": []}})] * 100  # accepted, yet nothing happens
    r = run_launcher(api, node, "--ssh-key", "my-key", "--cleanup-seconds", "1")
    assert r.returncode == 1 and FIRST_ID in r.stderr and api.statuses() == {FIRST_ID: "active"}


def test_killed_tee_leaves_the_ids_in_the_ledger_and_a_detached_cleanup_finishes(api, node):
    api.terminate_fails = True
    read_end, write_end = os.pipe()
    # 100x simulated time: the launcher detaches after 30 simulated seconds of failing, 0.3 s here
    with Launcher(api, node, "--cleanup-seconds", "6000", "--time-scale", "100", stdout=write_end, stderr=write_end,
                  FAKE_RUN="hang") as launcher:
        os.close(write_end)
        launcher.wait_for(run_started(node), "the run")
        os.close(read_end)  # Ctrl-C kills `tee` as well: nothing we print is seen any more
        launcher.signal(signal.SIGINT)
        code, _, _ = launcher.finish()
    assert code == 1
    assert FIRST_ID in ledger(node)
    log = (node["out"] / "launch.log").read_text()
    assert f"could not confirm that {FIRST_ID} stopped; it may still be billing" in log
    child = int(re.search(r"a detached process \(pid (\d+)\) keeps trying", log).group(1))
    try:
        api.terminate_fails = False  # the API recovers: the detached child finishes the job
        wait_until(lambda: api.statuses() == {FIRST_ID: "terminating"} and ledger(node) == "", "the detached cleanup")
        wait_until(lambda: not running(child), "the detached child's end")
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert "terminated" in (node["out"] / "launch.log").read_text().split(str(child), 1)[1]
    assert LAMBDA_KEY not in log


def test_a_20_minute_api_outage_during_cleanup_still_ends_terminated(api, node):
    """Simulated time runs 600x (the fake's outage and the launcher's own clock and backoff alike):
    20 minutes pass in 2 s, twice the 600 s the cleanup used to give up after."""
    api.time_scale, api.outage_after_terminate = 600.0, 20 * 60
    cmd = launcher_cmd(api, node, "--ssh-key", "my-key", "--time-scale", "600", "--backoff-seconds", "2")
    at = cmd.index("--cleanup-seconds")
    del cmd[at:at + 2]  # the launcher's own default: no limit while the API fails
    r = subprocess.run(cmd, env=launcher_env(node), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=90, start_new_session=True)
    assert_no_secrets(r.stdout + r.stderr)
    assert r.returncode == 0, r.stderr
    assert_all_stopped(api)
    assert r.stdout.count("warning: terminate") >= 10 and "http/502" in r.stdout
    assert ledger(node) == ""


def test_ledger_blocks_the_next_launch_until_cleanup(api, node):
    for iid, name in ((FIRST_ID, "nanostoney-dead0001"), ("1" * 32, "nanostoney-orphan"), ("2" * 32, "not-ours")):
        api.instances[iid] = {"name": name, "status": "active", "polls": 0, "region": "us-east-1",
                              "type": "gpu_8x_h100_sxm5", "ssh_key_names": ["my-key"]}
    node["out"].mkdir()
    (node["out"] / "UNTERMINATED").write_text(f"{FIRST_ID} nanostoney-dead0001\n")
    r = run_launcher(api, node, "--ssh-key", "my-key")
    assert r.returncode == 2 and FIRST_ID in r.stderr and "--cleanup" in r.stderr
    assert api.paths("POST", "/instance-operations/launch") == []
    r = run_launcher(api, node, "--cleanup", key=LAMBDA_KEY)  # launcher_cmd says --yes
    assert r.returncode == 0, r.stderr
    assert api.statuses() == {FIRST_ID: "terminating", "1" * 32: "terminating", "2" * 32: "active"}
    assert ledger(node) == ""


def test_no_launch_without_confirmation(api, node):
    cmd = [a for a in launcher_cmd(api, node, "--ssh-key", "my-key") if a != "--yes"]
    r = subprocess.run(cmd, env=launcher_env(node), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "--yes" in r.stderr and "plan:" in r.stdout
    assert api.paths("POST", "/instance-operations/launch") == []


def test_secrets_in_the_checkout_never_reach_the_node(api, node, tmp_path):
    repo = node["repo"]
    (repo / ".env").write_text("HF_TOKEN=hf_something\n")
    (repo / "lambda.key").write_text(LAMBDA_KEY + "\n")  # --api-key-file inside the checkout
    (repo / "notes.txt").write_text(f"wandb: {WANDB_KEY}\n")  # a secret we know, in a file of any name
    (repo / "conf").mkdir()
    (repo / "conf" / ".env.local").write_text("X=1\n")
    (repo / "conf" / "ok.txt").write_text("fine\n")
    r = run_launcher(api, node, "--ssh-key", "my-key", "--api-key-file", str(repo / "lambda.key"), key=None)
    assert r.returncode == 0, r.stderr
    shipped = {p.relative_to(node["home"]).as_posix() for p in node["home"].rglob("*") if p.is_file()}
    assert "conf/ok.txt" in shipped
    assert not shipped & {".env", "lambda.key", "notes.txt", "conf/.env.local"}
    assert "withheld as secrets: .env, conf/.env.local, lambda.key, notes.txt" in r.stdout
    assert_key_nowhere(tmp_path, allowed={repo / "lambda.key"})
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", ".env", "lambda.key"],
                             capture_output=True, text=True)
    assert ignored.stdout.split() == [".env", "lambda.key"]  # and our own checkout ignores both


@pytest.mark.parametrize("how", ["fails", "slow"])
def test_a_failed_fetch_after_a_good_run_exits_non_zero(api, node, how):
    if how == "fails":
        (node["state"] / "fetch_fails").touch()
    else:
        (node["state"] / "fetch_slow").write_text("5")
    r = run_launcher(api, node, "--ssh-key", "my-key", "--fetch-seconds", "1")
    assert r.returncode == 3, r.stderr
    assert "results did not all come back" in r.stderr
    assert ("Connection reset" if how == "fails" else "longer than 1 s") in r.stdout + r.stderr
    assert_all_stopped(api)


def test_first_signal_during_the_fetch_shortens_it_and_keeps_what_arrived(api, node):
    (node["state"] / "fetch_slow").write_text("1.5")
    with Launcher(api, node) as launcher:
        launcher.wait_for(lambda: any("tar -czf" in c["argv"][-1] for c in ssh_calls(node) if "argv" in c), "the fetch")
        launcher.signal(signal.SIGINT)
        code, out, err = launcher.finish()
    assert code == 130, err
    assert "the copy gets 60 s more" in out
    assert (result_dir(node) / "out/report/index.html").is_file()
    assert_all_stopped(api)


def test_fetch_adds_to_the_defaults(api, node):
    r = run_launcher(api, node, "--ssh-key", "my-key", "--fetch", "out/base/model.pt")
    assert r.returncode == 0, r.stderr
    assert (result_dir(node) / "out/base/model.pt").is_file() and (result_dir(node) / "out/report/index.html").is_file()


def test_provider_error_after_the_node_started_is_not_resent(api, node):
    api.launch_fails_after_start = [(503, {"code": "provider/internal-unavailable", "message": "Provider unavailable"})]
    r = run_launcher(api, node, "--ssh-key", "my-key")
    assert r.returncode == 0, r.stderr
    assert len(api.paths("POST", "/instance-operations/launch")) == 1 and len(api.instances) == 1
    assert_all_stopped(api)


def test_ssh_is_checked_before_renting(api, node, tmp_path):
    r = run_launcher(api, node, "--ssh-key", "my-key", "--identity-file", str(tmp_path / "no_such_key"))
    assert r.returncode == 2 and "--identity-file" in r.stderr
    r = run_launcher(api, node, "--ssh-key", "my-key", PATH=str(tmp_path / "empty"))
    assert r.returncode == 2 and "ssh is not installed" in r.stderr
    assert api.paths("POST", "/instance-operations/launch") == []


def test_a_terminate_refused_while_booting_is_retried_until_it_is_possible(api, node):
    api.terminate_refused_while_booting, api.boot_polls = True, 6
    with Launcher(api, node) as launcher:
        launcher.wait_for(lambda: api.paths("GET", f"/instances/{FIRST_ID}"), "the boot poll")
        launcher.signal(signal.SIGTERM)
        code, out, err = launcher.finish()
    assert code == 130, err
    assert "cannot be terminated yet" in out and len(terminated_ids(api)) >= 2
    assert_all_stopped(api)


def test_a_lost_launch_never_found_stays_in_the_ledger_for_the_next_run(api, node):
    api.launch_errors = [(502, BAD_GATEWAY)]  # lost: no node was started, but we cannot know that
    r = run_launcher(api, node, "--ssh-key", "my-key", "--lost-launch-seconds", "0.5")
    assert r.returncode == 1 and "no instance named" in r.stderr
    (name,) = re.findall(r"\? (nanostoney-\w+)", ledger(node))
    r = run_launcher(api, node, "--ssh-key", "my-key")  # looks for it by name first: nothing, so it launches
    assert r.returncode == 0, r.stderr
    assert name not in ledger(node) and len(api.instances) == 1
    assert_all_stopped(api)


def test_watchdog_ends_the_bill_at_its_deadline_and_trusts_only_the_api_json(api, tmp_path):
    """lambda_watchdog.py on its own: a fresh heartbeat, but the deadline passes. While GET answers a
    proxy's 404 page it keeps terminating; the spec's 404 JSON (the id is unknown) ends it."""
    api.instances[FIRST_ID] = {"name": "nanostoney-x", "status": "active", "polls": 0, "region": "us-east-1",
                               "type": "gpu_8x_h100_sxm5", "ssh_key_names": ["my-key"]}
    api.get_404_page = True
    key_file, heartbeat = tmp_path / "lambda_key", tmp_path / "heartbeat"
    key_file.write_text(LAMBDA_KEY + "\n")
    heartbeat.touch()
    proc = subprocess.Popen([sys.executable, str(ROOT / "lambda_watchdog.py"), "--api-base", api.base,
                             "--instance-id", FIRST_ID, "--key-file", str(key_file), "--heartbeat", str(heartbeat),
                             "--pid-file", str(tmp_path / "pid"), "--deadline-seconds", "0.3",
                             "--heartbeat-seconds", "600", "--poll", "0.05", "--interval", "0.001",
                             "--backoff", "0.01"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: len(terminated_ids(api)) >= 3, "terminates while the GET is a proxy's page")
        assert proc.poll() is None and not key_file.exists()  # the key lives in its memory only
        api.get_404_page = False
        del api.instances[FIRST_ID]  # now the API itself says: no such instance
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "the deadline" in out and "the API confirms it" in out
    assert LAMBDA_KEY not in out
    assert_key_nowhere(tmp_path)


def test_a_second_signal_during_the_fetch_ends_it_and_still_terminates(api, node):
    (node["state"] / "fetch_slow").write_text("20")  # a fetch that would outlast the test
    with Launcher(api, node) as launcher:
        launcher.wait_for(lambda: any("tar -czf" in c["argv"][-1] for c in ssh_calls(node) if "argv" in c), "the fetch")
        launcher.signal(signal.SIGINT)
        launcher.wait_for(lambda: "copy gets" in (node["out"] / "launch.log").read_text(), "the shortened fetch")
        launcher.signal(signal.SIGINT)
        code, out, err = launcher.finish()
    assert code == 130, err
    assert "cut short by a signal" in out
    assert_all_stopped(api)
