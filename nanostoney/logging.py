"""Run records: W&B (online or offline) behind one small interface, plus a plain JSON-lines file.

Every run leaves `<out_dir>/metrics.jsonl` (one JSON object per `.log` call, and the config as
the first line), so a run can be compared later even where wandb is not installed. On top of
that, W&B:
  mode "auto"     -> $WANDB_MODE if set, else "online" when WANDB_API_KEY is set and
                     "offline" run files otherwise
  mode "online"   -> sync to wandb.ai (wandb reads the key from the environment itself); the
                     server ($WANDB_BASE_URL or api.wandb.ai) is checked once, in seconds, and
                     when it cannot be reached (or refuses the key) the run says so in one
                     line and records offline instead of stalling for minutes
  mode "offline"  -> run files under <out_dir>/wandb/, `wandb sync` them later
  mode "disabled" -> no W&B at all (the jsonl is still written)
Entity/project/run name come from the arguments, else WANDB_ENTITY / WANDB_PROJECT / WANDB_NAME.
Only rank 0 logs; on other ranks every method is a no-op, so callers need no `if master`.

The API key is never read into our objects: configs are scrubbed of anything that looks like a
key/token/secret, and messages from a failed wandb.init have secret values masked.

    logger = Logger(mode="auto", project="nanostoney", config=vars(args), out_dir=out_dir)
    logger.log({"train/loss": 2.3, "attn/entropy_mean": 1.7}, step=step)
    logger.finish()
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
from nanostoney.governance import check_sources

MODES = ("auto", "online", "offline", "disabled")
DEFAULT_PROJECT = "nanostoney"
def scrub(obj):
    """A copy of a (nested) config with secret-looking keys and secret values redacted."""
    if isinstance(obj, dict):
        return {k: (REDACTED if looks_secret(k) else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    if isinstance(obj, str):
        return mask_secrets(obj)
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    return mask_secrets(str(obj))  # paths, dtypes, devices: keep a readable string


def _plain(v):
    """Metric values as JSON numbers (tensors and numpy scalars -> float)."""
    if hasattr(v, "item") and callable(v.item):
        try:
            return v.item()
        except (ValueError, RuntimeError):
            pass
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


def resolve_mode(mode):
    if mode not in MODES:
        raise UserError(f"unknown --wandb mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "auto":
        env = os.environ.get("WANDB_MODE")  # wandb's own switch, if the user set it, wins
        if env in ("online", "offline", "disabled"):
            return env
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


@functools.lru_cache(maxsize=1)
def wandb_reachable(timeout=3.0):
    """Can we open a TCP connection to the W&B server within `timeout` seconds? Name lookup
    included: it runs in a thread, so a dead resolver cannot stall the run either."""
    url = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host, port = url.hostname, url.port or (80 if url.scheme == "http" else 443)
    ok = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except (OSError, ValueError):
            pass
    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _go_offline(why, out_dir):
    where = os.path.join(out_dir, "wandb") if out_dir else "the wandb/ folder"
    print(f"note: {why}, so this run is recorded offline in {where} (`wandb sync` it later).")
    return "offline"


def add_logging_args(parser):
    """The W&B flags every training script shares."""
    parser.add_argument("--wandb", default="auto", choices=MODES,
                        help="auto: online if WANDB_API_KEY is set, else offline run files")
    parser.add_argument("--wandb-project", default=None, help="default: $WANDB_PROJECT or nanostoney")
    parser.add_argument("--wandb-entity", default=None, help="default: $WANDB_ENTITY")
    parser.add_argument("--run-name", default=None, help="default: $WANDB_NAME or wandb's own")
    return parser


class Logger:
    def __init__(self, mode="auto", project=None, run_name=None, entity=None, config=None,
                 out_dir=None, rank=None, tags=None):
        self.active = (get_rank() if rank is None else rank) == 0
        self.mode = resolve_mode(mode)
        self.out_dir = out_dir
        self.run = None
        self.wandb = None  # the wandb module once a run has started
        self._jsonl = None
        if config is not None and not isinstance(config, dict):
            config = vars(config)  # an argparse.Namespace
        self.config = scrub(dict(config or {}))
        if not self.active:
            return
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            self._jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a", encoding="utf-8")
            self._write({"event": "config", "time": time.time(), "config": self.config})
        if self.mode == "disabled":
            return
        if self.mode == "online" and not wandb_reachable():
            host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
            self.mode = _go_offline(f"W&B ({host}) cannot be reached", out_dir)
        try:
            import wandb  # lazy: heavy, and not needed with --wandb disabled
        except ImportError:
            print(f"wandb is not installed, so this run is recorded only in "
                  f"{os.path.join(out_dir, 'metrics.jsonl') if out_dir else 'nothing (no out_dir)'}.")
            return
        project = project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        entity = entity or os.environ.get("WANDB_ENTITY") or None
        run_name = run_name or os.environ.get("WANDB_NAME") or None
        self.wandb = wandb
        init = dict(project=project, entity=entity, name=run_name, config=self.config, dir=out_dir, tags=tags,
                    reinit="finish_previous")
        try:
            self.run = wandb.init(mode=self.mode, **init)
        except Exception as e:  # never let a message carrying the key escape
            if self.mode != "online":
                raise UserError(f"could not start W&B in {self.mode} mode ({first_line(e)}); "
                                f"pass --wandb disabled to run without it") from None
            self.mode = _go_offline(f"W&B refused to start online ({first_line(e)})", out_dir)
            self.run = wandb.init(mode=self.mode, **init)

    def _write(self, record):
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()

    def log(self, metrics, step=None):
        """Log a flat dict of scalars (floats, ints, 0-d tensors) at `step`."""
        if not self.active:
            return
        metrics = {k: _plain(v) for k, v in metrics.items()}
        self._write({"step": step, "time": time.time(), **metrics})
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_table(self, name, columns, rows, step=None):
        """A small table (e.g. sample completions); in the jsonl as one record."""
        if not self.active:
            return
        rows = [[_plain(v) for v in row] for row in rows]
        self._write({"step": step, "time": time.time(), "table": name, "columns": list(columns),
                     "rows": rows})
        if self.run is not None:
            self.run.log({name: self.wandb.Table(columns=list(columns), data=rows)}, step=step)

    def log_image(self, name, path, step=None):
        """An image file (e.g. a report figure); the jsonl records its path."""
        if not self.active:
            return
        self._write({"step": step, "time": time.time(), "image": name, "path": str(path)})
        if self.run is not None:
            self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def log_artifact(self, path, sources, name=None, type="model"):
        """Upload a file/dir as a W&B artifact, but only if every data source it was made from
        is approved for public release (raises UserError otherwise, before anything leaves)."""
        check_sources(list(sources), use="public_release")
        if not self.active:
            return
        self._write({"time": time.time(), "artifact": str(path), "sources": [str(s) for s in sources]})
        if self.run is None:
            return
        art = self.wandb.Artifact(name or os.path.basename(os.path.normpath(str(path))), type=type,
                             metadata={"sources": [str(s) for s in sources]})
        if os.path.isdir(path):
            art.add_dir(str(path))
        else:
            art.add_file(str(path))
        self.run.log_artifact(art)

    def summary(self, metrics):
        """Final numbers for the run (shown in the W&B run table)."""
        if not self.active:
            return
        metrics = {k: _plain(v) for k, v in metrics.items()}
        self._write({"event": "summary", "time": time.time(), **metrics})
        if self.run is not None:
            for k, v in metrics.items():
                self.run.summary[k] = v

    def finish(self):
        if self.run is not None:
            self.run.finish()
            # finish() can return before wandb's service process has flushed the run file (an
            # offline .wandb file was once read back holding only its header); teardown waits for
            # that process to exit, so the files are whole when we return
            self.wandb.teardown()
            self.run = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def from_args(args, config=None, out_dir=None):
    """A Logger from the flags of add_logging_args."""
    return Logger(mode=args.wandb, project=args.wandb_project, entity=args.wandb_entity,
                  run_name=args.run_name, config=config if config is not None else vars(args),
                  out_dir=out_dir)
