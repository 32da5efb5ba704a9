"""Run records: `<out_dir>/metrics.jsonl` (the config, then one JSON object per call), so runs can
be compared even without wandb, and W&B behind the same calls. Mode "auto" is $WANDB_MODE if set,
else "online" with WANDB_API_KEY and "offline" (run files under <out_dir>/wandb/, `wandb sync` them
later) without; "online" checks the server once, in seconds, and records offline with a one-line
note when it cannot be reached or refuses the key; "disabled" writes the jsonl alone. Only rank 0
logs. The API key is never read into our objects: configs are scrubbed of anything that looks
like a secret, and wandb's messages are masked.
"""
import functools
import json
import os
import socket
import threading
import time
import urllib.parse

from nanostoney.dist import get_rank
from nanostoney.errors import REDACTED, UserError, first_line, looks_secret, mask_secrets

MODES = ("auto", "online", "offline", "disabled")


def scrub(obj):
    """A copy of a (nested) config with secret-looking keys and secret values redacted."""
    if isinstance(obj, dict):
        return {k: (REDACTED if looks_secret(k) else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    return mask_secrets(obj)  # strings, and paths, dtypes, devices as a readable string


def _plain(v):
    """Metric values as JSON numbers (tensors and numpy scalars -> float)."""
    if callable(getattr(v, "item", None)):
        try:
            return v.item()
        except (ValueError, RuntimeError):
            pass
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)


def resolve_mode(mode):
    if mode not in MODES:
        raise UserError(f"unknown --wandb mode {mode!r}; use one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")  # wandb's own switch, if the user set it, wins
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _server():
    return urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")


@functools.lru_cache(maxsize=1)
def wandb_reachable(timeout=3.0):
    """Can we connect to the W&B server within `timeout` seconds (name lookup included, in a thread)?"""
    url, ok = _server(), []

    def connect():
        try:
            socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)),
                                     timeout=timeout).close()
            ok.append(True)
        except (OSError, ValueError):
            pass
    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def add_logging_args(parser):
    """The W&B flags every training script shares."""
    parser.add_argument("--wandb", default="auto", choices=MODES,
                        help="auto: online if WANDB_API_KEY is set, else offline run files")
    parser.add_argument("--wandb-project", default=None, help="default: $WANDB_PROJECT or nanostoney")
    parser.add_argument("--wandb-entity", default=None, help="default: $WANDB_ENTITY")
    parser.add_argument("--run-name", default=None, help="default: $WANDB_NAME or wandb's own")
    return parser


class Logger:
    def __init__(self, mode="auto", project=None, run_name=None, entity=None, config=None, out_dir=None, rank=None):
        self.active = (get_rank() if rank is None else rank) == 0
        self.mode, self.out_dir = resolve_mode(mode), out_dir
        self.run = self.wandb = self._jsonl = None  # self.wandb: the wandb module once a run has started
        self.config = scrub(dict(config or {}) if config is None or isinstance(config, dict) else vars(config))
        if not self.active:
            return
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            self._jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a", encoding="utf-8")
            self._write({"event": "config", "time": time.time(), "config": self.config})
        if self.mode == "disabled":
            return
        if self.mode == "online" and not wandb_reachable():
            self._go_offline(f"W&B ({_server().hostname}) cannot be reached")
        try:
            import wandb  # lazy: heavy, and not needed with --wandb disabled
        except ImportError:
            print(f"wandb is not installed, so this run is recorded only in "
                  f"{os.path.join(out_dir, 'metrics.jsonl') if out_dir else 'nothing (no out_dir)'}.")
            return
        self.wandb = wandb
        init = dict(project=project or os.environ.get("WANDB_PROJECT") or "nanostoney",
                    entity=entity or os.environ.get("WANDB_ENTITY") or None,
                    name=run_name or os.environ.get("WANDB_NAME") or None,
                    config=self.config, dir=out_dir, reinit="finish_previous")
        try:
            self.run = wandb.init(mode=self.mode, **init)
        except Exception as e:  # never let a message carrying the key escape
            if self.mode != "online":
                raise UserError(f"could not start W&B in {self.mode} mode ({first_line(e)}); "
                                f"pass --wandb disabled to run without it") from None
            self._go_offline(f"W&B refused to start online ({first_line(e)})")
            self.run = wandb.init(mode=self.mode, **init)

    def _go_offline(self, why):
        where = os.path.join(self.out_dir, "wandb") if self.out_dir else "the wandb/ folder"
        print(f"note: {why}, so this run is recorded offline in {where} (`wandb sync` it later).")
        self.mode = "offline"

    def _write(self, record, to_run=None):
        """`record` into the jsonl, then to_run(run) when a W&B run is live."""
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self.run is not None and to_run is not None:
            to_run(self.run)

    def log(self, metrics, step=None):
        """Log a flat dict of scalars (floats, ints, 0-d tensors) at `step`."""
        if self.active:
            metrics = {k: _plain(v) for k, v in metrics.items()}
            self._write({"step": step, "time": time.time(), **metrics}, lambda run: run.log(metrics, step=step))

    def log_table(self, name, columns, rows, step=None):
        """A small table (e.g. sample completions); in the jsonl as one record."""
        if self.active:
            rows, columns = [[_plain(v) for v in row] for row in rows], list(columns)
            self._write({"step": step, "time": time.time(), "table": name, "columns": columns, "rows": rows},
                        lambda run: run.log({name: self.wandb.Table(columns=columns, data=rows)}, step=step))

    def log_image(self, name, path, step=None):
        """An image file (e.g. a report figure); the jsonl records its path."""
        if self.active:
            self._write({"step": step, "time": time.time(), "image": name, "path": str(path)},
                        lambda run: run.log({name: self.wandb.Image(str(path))}, step=step))

    def summary(self, metrics):
        """Final numbers for the run (shown in the W&B run table)."""
        if self.active:
            metrics = {k: _plain(v) for k, v in metrics.items()}
            self._write({"event": "summary", "time": time.time(), **metrics}, lambda run: run.summary.update(metrics))

    def finish(self):
        if self.run is not None:
            self.run.finish()
            # finish() can return before wandb's service process has flushed the run file (an offline
            # .wandb file once held only its header); teardown waits for that process to exit
            self.wandb.teardown()
            self.run = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def from_args(args, config=None, out_dir=None):
    """A Logger from the flags of add_logging_args."""
    return Logger(mode=args.wandb, project=args.wandb_project, entity=args.wandb_entity,
                  run_name=args.run_name, config=config if config is not None else vars(args), out_dir=out_dir)
