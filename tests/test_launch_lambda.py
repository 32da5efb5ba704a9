"""launch_lambda.py against a fake Lambda Cloud API and fake ssh/scp; no real network, no real node.

The fake API is a threading HTTP server on 127.0.0.1 built from the spec subset in
tests/fixtures/lambda_openapi_subset.json: it routes only the spec's paths and methods, validates
every request body against the spec's request schema (and its own answers against the response
schema) with jsonschema, and records every request. ssh and scp are small Python scripts put first
on PATH; they record their argv and what arrives on stdin, and play the node's part.
"""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
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


class FakeLambda:
    """Scenario knobs: launch_errors (answers to the first launches), boot_polls (GETs that still say
    booting), unauthorized_message (answer 401 with this message to everything)."""

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
        self.launch_errors = []  # (http status, error object), consumed one per launch
        self.boot_polls = 1
        self.unauthorized_message = None
        self.instances = {}
        self.requests = []  # (method, path, body)
        self.violations = []  # anything that breaks the spec, from either side
        self.lock = threading.Lock()
        self.routes = [(m.upper(), re.compile("^" + re.sub(r"\{[^}]+\}", "([^/]+)", p) + "$"), p, op)
                       for p, ops in SPEC["paths"].items() for m, op in ops.items()]

    def paths(self, method, path):
        return [b for (m, p, b) in self.requests if m == method and p == PREFIX + path]

    def instance(self, iid):
        inst = self.instances[iid]
        return {"id": iid, "name": inst["name"], "ip": "198.51.100.7", "private_ip": "10.0.2.7",
                "status": inst["status"], "ssh_key_names": inst["ssh_key_names"], "file_system_names": [],
                "region": {"name": inst["region"], "description": "somewhere"},
                "instance_type": self.types[inst["type"]]["instance_type"],
                "actions": {a: {"available": True}
                            for a in ("migrate", "rebuild", "restart", "cold_reboot", "terminate")}}

    def handle(self, method, path, headers, raw):
        """Return (status, body); record the request and every spec violation."""
        route = next(((op, tmpl, m.groups()) for (mm, rx, tmpl, op) in self.routes
                      if mm == method and (m := rx.match(path))), None)
        body = json.loads(raw) if raw else None
        with self.lock:
            self.requests.append((method, path, body))
            if route is None:
                self.violations.append(f"{method} {path} is not in the spec")
                return 404, {"error": {"code": "global/object-does-not-exist", "message": "no such route"}}
            op, tmpl, params = route
            if headers.get("Authorization") != f"Bearer {LAMBDA_KEY}" or self.unauthorized_message:
                return 401, {"error": {"code": "global/invalid-api-key",
                                       "message": self.unauthorized_message or "API key was invalid.",
                                       "suggestion": "Check your API key or create a new one, then try again."}}
            if "requestBody" in op:
                schema = op["requestBody"]["content"]["application/json"]["schema"]
                errors = ["no body"] if body is None else schema_errors(schema, body)
                if errors:
                    self.violations.append(f"{method} {path}: {errors}")
                    return 400, {"error": {"code": "global/invalid-parameters", "message": "; ".join(errors)}}
            elif body is not None:
                self.violations.append(f"{method} {path} sent a body the spec does not take")
            status, answer = self.answer(op["operationId"], params, body)
            declared = op["responses"].get(str(status))
            if declared:  # keep the fake honest: its answers must match the spec too
                errors = schema_errors(declared["content"]["application/json"]["schema"], answer)
                if errors:
                    self.violations.append(f"fake answer to {method} {path}: {errors}")
            return status, answer

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
            return 200, {"data": {"instance_ids": [iid]}}
        if operation == "listInstances":
            return 200, {"data": [self.instance(i) for i in self.instances]}
        if operation == "getInstance":
            inst = self.instances.get(params[0])
            if inst is None:
                return 404, {"error": {"code": "global/object-does-not-exist", "message": "no such instance"}}
            inst["polls"] += 1
            if inst["status"] == "booting" and inst["polls"] > self.boot_polls:
                inst["status"] = "active"
            return 200, {"data": self.instance(params[0])}
        if operation == "terminateInstance":
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
            status, answer = fake.handle(self.command, self.path, self.headers, raw)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
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
# Fake ssh/scp and a tiny repo to ship

FAKE_SSH = r'''
import json, os, sys, time
state = os.environ["FAKE_STATE"]
args = sys.argv[1:]
i = 0
while i < len(args) and args[i].startswith("-"):
    i += 2 if args[i] in ("-o", "-i", "-p", "-F", "-l") else 1
command = " ".join(args[i + 1:])
if any(k in os.environ for k in ("LAMBDA_API_KEY", "WANDB_API_KEY")):
    open(os.path.join(state, "env_leak"), "w").write(command)
with open(os.path.join(state, "calls.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv) + "\n")
if "tar -xzf" in command:                      # the repo upload
    open(os.path.join(state, "upload.tgz"), "wb").write(sys.stdin.buffer.read())
elif "run_stoney_small.sh" in command:         # the detached start: the W&B key arrives on stdin
    open(os.path.join(state, "wandb_stdin"), "w").write(sys.stdin.readline())
elif ".launch_exit" in command:                # a poll of the running speedrun
    path = os.path.join(state, "polls")
    n = int(open(path).read()) + 1 if os.path.exists(path) else 1
    open(path, "w").write(str(n))
    if os.environ.get("FAKE_RUN_HANG"):
        time.sleep(0.2)
    if n >= 2 and not os.environ.get("FAKE_RUN_HANG"):
        print(os.environ.get("FAKE_RUN_EXIT", "0")); print("speedrun finished")
    else:
        print("running"); print(f"step {n}")
'''

FAKE_SCP = r'''
import json, os, sys
state = os.environ["FAKE_STATE"]
with open(os.path.join(state, "calls.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv) + "\n")
dest, sources = sys.argv[-1], [a for a in sys.argv[1:-1] if ":" in a and not a.startswith("-") and "=" not in a]
for src in sources:
    name = os.path.basename(src.split(":", 1)[1])
    if name in os.environ.get("FAKE_SCP_MISSING", "").split(","):
        sys.exit(1)
    if "." in name:
        open(os.path.join(dest, name), "w").write("log\n")
    else:
        os.makedirs(os.path.join(dest, name), exist_ok=True)
        open(os.path.join(dest, name, "index.html"), "w").write("<html></html>\n")
'''


@pytest.fixture
def node(tmp_path):
    """Fake bin dir, node state dir, and a tiny git repo with a speedrun script."""
    bin_dir, state, repo = tmp_path / "bin", tmp_path / "state", tmp_path / "repo"
    for d in (bin_dir, state, repo):
        d.mkdir()
    for name, body in (("ssh", FAKE_SSH), ("scp", FAKE_SCP)):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{body}")
        (bin_dir / name).chmod(0o755)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "run_stoney_small.sh").write_text("echo speedrun\n")
    (repo / ".gitignore").write_text("out/\n")
    (repo / "out").mkdir()
    (repo / "out" / "ignored.bin").write_text("never shipped\n")
    return {"bin": bin_dir, "state": state, "repo": repo, "out": tmp_path / "results"}


def launcher_cmd(api, node, *extra):
    return [sys.executable, str(LAUNCHER), "--api-base", api.base, "--repo", str(node["repo"]),
            "--out-dir", str(node["out"]), "--poll-seconds", "0.01", "--api-interval", "0.001",
            "--launch-interval", "0.002", "--backoff-seconds", "0.001", *extra]


def launcher_env(node, key=LAMBDA_KEY, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("LAMBDA_API_KEY", "WANDB_API_KEY")}
    env.update(PATH=f"{node['bin']}{os.pathsep}{env.get('PATH', '')}", FAKE_STATE=str(node["state"]),
               WANDB_API_KEY=WANDB_KEY, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", **extra)
    if key:
        env["LAMBDA_API_KEY"] = key
    return env


def run_launcher(api, node, *extra, key=LAMBDA_KEY, **env):
    r = subprocess.run(launcher_cmd(api, node, *extra), env=launcher_env(node, key, **env),
                       capture_output=True, text=True, timeout=60)
    assert_no_secrets(r.stdout + r.stderr)
    return r


def assert_no_secrets(text):
    assert LAMBDA_KEY not in text and WANDB_KEY not in text


def ssh_calls(node):
    path = node["state"] / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def terminated_ids(api):
    return [i for body in api.paths("POST", "/instance-operations/terminate") for i in body["instance_ids"]]


# ---------------------------------------------------------------------------------------------------
# The full flow

def test_success_validates_requests_ships_repo_passes_key_on_stdin_and_terminates(api, node):
    r = run_launcher(api, node, "--ssh-key", "my-key")
    assert r.returncode == 0, r.stderr
    assert api.violations == []
    launches = api.paths("POST", "/instance-operations/launch")
    assert len(launches) == 1
    assert launches[0]["instance_type_name"] == "gpu_8x_h100_sxm5"
    assert launches[0]["region_name"] == "us-east-1"  # the first region with capacity
    assert launches[0]["ssh_key_names"] == ["my-key"]
    assert terminated_ids(api) == list(api.instances)
    assert [i["status"] for i in api.instances.values()] == ["terminating"]
    # the repo went over: tracked/untracked files yes, ignored ones no
    with tarfile.open(node["state"] / "upload.tgz") as tar:
        names = tar.getnames()
    assert "run_stoney_small.sh" in names and not any(n.startswith("out/") for n in names)
    # the W&B key arrived on stdin, and never on an ssh/scp command line
    assert (node["state"] / "wandb_stdin").read_text() == WANDB_KEY + "\n"
    calls = ssh_calls(node)
    assert calls and not any(WANDB_KEY in arg or LAMBDA_KEY in arg for call in calls for arg in call)
    assert not (node["state"] / "env_leak").exists()  # ssh's environment carries neither key
    # the report came back
    (result_dir,) = node["out"].iterdir()
    assert (result_dir / "report" / "index.html").exists()
    assert (result_dir / "speedrun.log").exists()
    assert "step 1" in r.stdout and "terminated" in r.stdout


def test_remote_failure_reports_and_terminates(api, node):
    r = run_launcher(api, node, "--ssh-key", "my-key", FAKE_RUN_EXIT="3", FAKE_SCP_MISSING="report")
    assert r.returncode == 1
    assert "exited with code 3" in r.stderr
    assert terminated_ids(api) == list(api.instances) and len(api.instances) == 1
    assert api.violations == []


def test_launch_without_ssh_key_uses_the_only_one_and_speedrun_args_pass_through(api, node):
    r = run_launcher(api, node, "--", "--depth", "4")
    assert r.returncode == 0, r.stderr
    assert api.paths("POST", "/instance-operations/launch")[0]["ssh_key_names"] == ["my-key"]
    start = next(c for c in ssh_calls(node) if "run_stoney_small.sh" in c[-1])
    assert "run_stoney_small.sh --depth 4" in start[-1]


def wait_for(condition, what, proc):
    for _ in range(600):  # bounded: at most ~30 s
        if condition():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"never saw {what}; launcher exit {proc.returncode}\n{out}\n{err}")


@pytest.mark.parametrize("sig, phase", [(signal.SIGINT, "remote run"), (signal.SIGTERM, "boot poll")])
def test_interrupt_terminates_the_instance(api, node, sig, phase):
    if phase == "boot poll":
        api.boot_polls = 10 ** 9  # never becomes active: the launcher sits polling the API
        ready = lambda: len(api.paths("GET", f"/instances/{'0' * 32}")) >= 2
        extra = {}
    else:
        ready = lambda: (node["state"] / "polls").exists()  # the fake speedrun runs forever
        extra = {"FAKE_RUN_HANG": "1"}
    proc = subprocess.Popen(launcher_cmd(api, node, "--ssh-key", "my-key"), env=launcher_env(node, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ready, phase, proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_no_secrets(out + err)
    assert proc.returncode == 130, err
    assert terminated_ids(api) == ["0" * 32], out + err
    assert api.violations == []


def test_keep_leaves_the_instance_running(api, node):
    r = run_launcher(api, node, "--ssh-key", "my-key", "--keep")
    assert r.returncode == 0, r.stderr
    assert terminated_ids(api) == []
    assert "--terminate" in r.stdout


# ---------------------------------------------------------------------------------------------------
# Errors

def test_insufficient_capacity_is_reported_with_code_and_suggestion(api, node):
    api.launch_errors = [(400, {"code": "instance-operations/launch/insufficient-capacity",
                                "message": "Not enough capacity to fulfill launch request.",
                                "suggestion": "Try another region or instance type."})]
    r = run_launcher(api, node, "--ssh-key", "my-key")
    assert r.returncode == 1
    assert "instance-operations/launch/insufficient-capacity" in r.stderr
    assert "Try another region or instance type." in r.stderr
    assert len(api.paths("POST", "/instance-operations/launch")) == 1  # not a provider error: no retry
    assert terminated_ids(api) == [] and api.violations == []


def test_provider_errors_are_retried(api, node):
    unavailable = (503, {"code": "provider/internal-unavailable", "message": "Provider unavailable",
                         "suggestion": "Try again shortly"})
    api.launch_errors = [unavailable, unavailable]
    r = run_launcher(api, node, "--ssh-key", "my-key")
    assert r.returncode == 0, r.stderr
    assert len(api.paths("POST", "/instance-operations/launch")) == 3
    assert r.stdout.count("provider/internal-unavailable") == 2
    assert terminated_ids(api) == list(api.instances)


def test_provider_retries_are_bounded(api, node):
    api.launch_errors = [(503, {"code": "provider/internal-unavailable", "message": "Provider unavailable",
                                "suggestion": "Try again shortly"})] * 10
    r = run_launcher(api, node, "--ssh-key", "my-key", "--retries", "2")
    assert r.returncode == 1
    assert len(api.paths("POST", "/instance-operations/launch")) == 3
    assert "provider/internal-unavailable" in r.stderr and "Try again shortly" in r.stderr


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
    assert "gpu_8x_h100_sxm5" in r.stdout and "us-east-1" in r.stdout
    assert "$23.92/h" in r.stdout and "$59.80" in r.stdout  # 2392 cents/h x 2.5 h
    assert "my-key" in r.stdout
    assert api.paths("POST", "/instance-operations/launch") == [] and api.violations == []


# ---------------------------------------------------------------------------------------------------
# Rate limiting, with a fake clock (no wall-clock assertions)

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


def test_backoff_is_bounded(launcher, api):
    clock = FakeClock()
    client = launcher.LambdaAPI(api.base, LAMBDA_KEY, clock=clock, sleep=clock.sleep, retries=8, backoff=2.0,
                                interval=0.0, launch_interval=0.0)
    api.launch_errors = [(503, {"code": "provider/x", "message": "down"})] * 9
    with pytest.raises(launcher.ApiError) as e:
        client.launch({"region_name": "us-east-1", "instance_type_name": "gpu_8x_h100_sxm5", "ssh_key_names": ["k"]})
    assert e.value.code == "provider/x"
    assert len(api.paths("POST", "/instance-operations/launch")) == 9
    assert max(clock.sleeps) == 60.0  # capped
