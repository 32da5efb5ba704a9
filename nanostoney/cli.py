"""What every entry point shares: flag types that refuse a bad value where it is parsed, one
runner that turns any failure into one line and an exit code, and the output directory a run
owns (with its lock):

    p = cli.ArgumentParser(description="...")             # a bad flag: one line, exit 2
    cli.claim_out(out, overwrite=args.overwrite, resume=args.resume is not None, own=cli.RUN_FILES)
    cli.run_main(main)                                     # under if __name__ == "__main__"

Exit codes: 0 done; 2 bad input (UserError); 1 the run failed (RunFailed, or anything unexpected:
one sentence naming the stage and the log holding the traceback); 130 Ctrl-C; 128+N another
signal. Writes go to a temporary name first and the lock goes with the process, so none of these
leaves anything half-written. An output directory is ours only when it holds our marker file
(names alone prove nothing); `<out>/.lock` names the run writing it. Under torchrun only rank 0 locks.
"""
import argparse
import atexit
import contextlib
import fnmatch
import json
import math
import os
import select
import signal
import socket
import sys
import tempfile
import time
import traceback

from nanostoney.errors import RunFailed, UserError, first_line, mask_secrets
from nanostoney.files import pid_alive

MARKER, LOCK = ".nanostoney", ".lock"
# names a stage writes into its output directory: a folder that is not ours (no marker) may be
# written into with --overwrite only while it holds none of them
RUN_FILES = ("step_*", "latest", "latest.tmp-*", "metrics.jsonl", "wandb", "logs", "*_eval.json", "merged", "*.log")
SHARED_FILES = ("metrics.jsonl", "wandb", "logs")

_state = {"log_dir": None, "locks": [], "created": []}


def _rank(var="RANK"):
    try:
        return int(os.environ.get(var) or 0)
    except ValueError:
        return 0


def _checked(kind, what, ok):
    """A flag type: kind(text), refused in one line ("must be {what}") unless ok(value)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return parse


positive_int = _checked(int, "a positive integer", lambda v: v >= 1)
nonneg_int = _checked(int, "an integer >= 0", lambda v: v >= 0)


def finite_float(lo=None, hi=None, lo_open=False):
    """A float in [lo, hi] ((lo, hi] with lo_open); NaN and inf are refused."""
    bounds = [f"{'>' if lo_open else '>='} {lo:g}"] if lo is not None else []
    bounds += [f"<= {hi:g}"] if hi is not None else []
    return _checked(float, f"a finite number {' and '.join(bounds)}".rstrip(),
                    lambda v: math.isfinite(v) and (lo is None or v > lo or v == lo and not lo_open)
                    and (hi is None or v <= hi))


def out_path(text):
    """An output path: an empty one would silently become the default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a path, got an empty string")
    return text


DEVICES = ("auto", "cpu", "cuda", "mps")


def device(text):
    """auto, cpu, cuda, cuda:N or mps; a device this machine lacks is refused here, not in the run."""
    kind, _, index = text.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(DEVICES)} (or cuda:N), got {text!r}")
    import torch  # lazy: the flag types work before anything heavy is imported
    if kind == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but this machine has no usable CUDA GPU; "
                                         f"use cpu or auto")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but this machine has "
                                         f"{torch.cuda.device_count()} CUDA GPU(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError("'mps' asked for, but this machine has no Apple GPU; use cpu or auto")
    return text


probability = finite_float(0, 1)
positive_float = finite_float(0, lo_open=True)
nonneg_float = finite_float(0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and the --debug flag the runner reads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")

    def error(self, message):
        if _rank() == 0:
            print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


class Stopped(BaseException):
    """SIGTERM/SIGHUP (args[0]): unwinds like Ctrl-C so temporary files are removed and the lock released."""


def _on_signal(signum, _frame):
    raise Stopped(signum)


def _install_signal_handlers():
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # scripts/__init__.py's quiet exit while importing
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:  # keep nohup's SIG_IGN
            signal.signal(sig, _on_signal)


def _command_line():
    """How this process was started, as the user typed it (python -m scripts.X ...)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
    return " ".join(head + sys.argv[1:])


def stage_name():
    """scripts.base_train -> base_train (also under python -m and torchrun)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = spec.name if spec is not None else os.path.splitext(os.path.basename(sys.argv[0]))[0]
    return name.rsplit(".", 1)[-1] or "nanostoney"


def _say(line, every_rank=False):
    """One line on stderr, from each node's first process (a node's user reads its own log)."""
    if every_rank or _rank("LOCAL_RANK") == 0:
        print(line, file=sys.stderr, flush=True)


def _stdout_broken():
    """Has the reader of stdout gone away (`| head`)? A closed pipe polls as an error, a file does not."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except ValueError:  # closed
        return False
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor (captured), no poll (Windows)
        return False


def _write_traceback(stage):
    """The traceback into <out>/logs/<stage>-error.log, else a temp file; its path, or None."""
    rank = _rank()
    name = f"{stage}-error{f'-rank{rank}' if rank else ''}.log"
    text = mask_secrets(f"{' '.join(sys.argv)}\n{time.strftime('%Y-%m-%d %H:%M:%S')}\n\n{traceback.format_exc()}")
    for folder in (_state["log_dir"], None):
        try:
            if folder is None:
                fd, path = tempfile.mkstemp(prefix=f"nanostoney-{name[:-4]}-", suffix=".log")
                os.close(fd)
            else:
                os.makedirs(folder, exist_ok=True)
                path = os.path.join(folder, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return None


def run_main(main):
    """Run an entry point's main(); every way out is one line on stderr and an exit code."""
    debug = "--debug" in sys.argv[1:] or os.environ.get("NANOSTONEY_DEBUG") == "1"
    stage = stage_name()
    _install_signal_handlers()
    _state["log_dir"] = None
    code = 0
    try:
        main()
        sys.stdout.flush()
    except (UserError, RunFailed) as e:
        _say(f"error: {e}")
        code = 2 if isinstance(e, UserError) else 1
    except KeyboardInterrupt:
        _say(f"interrupted: {stage} stopped by Ctrl-C; checkpoints and outputs already written are intact.")
        code = 130
    except Stopped as e:
        _say(f"stopped: {stage} received {signal.Signals(e.args[0]).name}; checkpoints and outputs already "
             f"written are intact.")
        code = 128 + e.args[0]
    except BrokenPipeError:
        code = 141 if _stdout_broken() else _unexpected(stage, debug)
    except Exception:
        code = _unexpected(stage, debug)
    release_locks()
    if _stdout_broken():  # the reader went away (e.g. `| head`): nothing left to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)


def _unexpected(stage, debug):
    e = sys.exc_info()[1]
    if debug:
        traceback.print_exc()
    log = _write_traceback(stage)
    where = f"the traceback is in {log}" if log else "the traceback could not be written to a file"
    _say(f"error: {stage} failed ({type(e).__name__}: {first_line(e)}); {where}"
         + ("." if debug else "; rerun with --debug to print it."), every_rank=True)
    return 1


def _read_lock(path):
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _stale(path, holder):
    """A lock nobody holds: its process is gone (same host), or it was never written whole and is old."""
    if not holder:
        try:
            return time.time() - os.path.getmtime(path) > 10
        except OSError:
            return True
    return holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
        and not pid_alive(holder["pid"])


def _in_use(path, what, holder):
    who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
           f"({holder.get('command')})") if holder else "another run"
    return (f"{what} is in use by {who}; wait for that run to finish or pick another output (remove {path} "
            f"only if no run is using it).")


def take_lock(path, what, pid=None, command=None):
    """Create the lock `path` (O_EXCL) naming this run, or refuse in one sentence; released at exit."""
    me = {"pid": pid or os.getpid(), "host": socket.gethostname(), "command": command or _command_line(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if (holder.get("pid"), holder.get("host")) == (me["pid"], me["host"]):
                return path  # this process holds it already (main() called twice in one process)
            if _stale(path, holder):
                try:
                    _remove(path)
                except OSError as e:
                    raise UserError(f"the stale lock {path} cannot be removed ({e.strerror}); remove it yourself "
                                    f"(no run is using it) or pick another output.") from None
                _say(f"note: taking over the stale lock {path} (" + (f"pid {holder['pid']} is no longer running)."
                     if holder.get("pid") else "it is empty or unreadable and no run is writing it)."))
                continue
            raise UserError(_in_use(path, what, holder)) from None
        except OSError as e:
            raise _cannot_lock(path, e) from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(me))
        except OSError as e:  # disk full: no empty lock may stay behind to refuse the next run
            _remove(path)
            raise _cannot_lock(path, e) from None
        if pid is None:  # a lock held for another process (a shell script) is its to release
            _state["locks"].append((path, me["pid"]))
        return path
    raise UserError(f"could not lock {what}: other runs keep taking it; pick another output.")


def _cannot_lock(path, e):
    return UserError(f"cannot write the lock {path} ({e.strerror or e}); free some space or pick a place you can "
                     f"write to.")


def _remove(path):
    """Remove a file (a lock); one that is already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def release_locks():
    """Remove our locks, and any directory claim_out created that got nothing but our marker."""
    for path, pid in _state["locks"]:
        if _read_lock(path).get("pid") == pid:
            with contextlib.suppress(OSError):
                os.remove(path)
    _state["locks"].clear()
    for leaf, top in _state["created"]:
        with contextlib.suppress(OSError):
            if os.listdir(leaf) in ([MARKER], []):  # (a lock that could not be written: not even the marker)
                _remove(os.path.join(leaf, MARKER))
                while True:  # up to the first folder claim_out made
                    os.rmdir(leaf)
                    if leaf == top:
                        break
                    leaf = os.path.dirname(leaf)
    _state["created"].clear()


atexit.register(release_locks)


def is_ours(path):
    """A directory nanostoney made: it holds our marker (names alone prove nothing)."""
    return os.path.isfile(os.path.join(path, MARKER))


def _inside(a, b):
    """Is path a the same as, or inside, path b (links resolved)?"""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def refuse_overlap(path, inputs, flag="--out"):
    """Refuse an output that is, holds or sits inside an input of the run ({flag: path}), whatever the flags."""
    for name, inp in (inputs or {}).items():
        if inp and os.path.exists(inp) and (_inside(path, inp) or _inside(inp, path)):
            how = "is" if _inside(path, inp) and _inside(inp, path) else "is inside" if _inside(path, inp) else "holds"
            raise UserError(f"{flag} {path} {how} {name} {inp}, which this run reads; pick an {flag} apart from "
                            f"its inputs.")


def _refuse_theirs(path, entries, own, overwrite, flag):
    """The user's directory: refused, or with overwrite written beside if no name in `own` is taken."""
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    if not overwrite:
        raise UserError(f"{flag} {path} already holds files nanostoney did not write ({shown}); pick a new or "
                        f"empty directory, or pass --overwrite to write beside them (nothing of theirs is "
                        f"replaced or deleted).")
    taken = [e for e in entries if any(fnmatch.fnmatchcase(e, pat) for pat in own)]
    if taken:
        raise UserError(f"{flag} {path} is not a nanostoney output and already holds {taken[0]}, a name this run "
                        f"writes; pick a new or empty directory (nothing of theirs is replaced, even with "
                        f"--overwrite).")


def claim_out(path, *, overwrite=False, resume=False, own=RUN_FILES, training=True, flag="--out", pid=None,
              command=None, inputs=None, finished=()):
    """Make `path` this run's output directory (rank 0 creates, locks and marks it), or refuse in one
    sentence: a file, an input, another run's lock, another's files, with training checkpoints (unless
    resume or overwrite), a `finished` name (unless overwrite). pid, command: lock for a shell script."""
    if not path:
        raise UserError(f"{flag} is empty; pass a directory path.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a directory; pick a directory path.")
    refuse_overlap(path, inputs, flag)
    entries = sorted(set(os.listdir(path)) - {MARKER, LOCK}) if os.path.isdir(path) else []
    lock = os.path.join(path, LOCK)  # checked first: who holds it says more than what is in it
    holder = _read_lock(lock) if _rank() == 0 and os.path.exists(lock) else None  # (others see rank 0's own)
    if holder is not None and not _stale(lock, holder) and holder.get("pid") != os.getpid():
        raise UserError(_in_use(lock, f"{flag} {path}", holder))
    # (folders of ours hold nothing of the user's: out/ of out/tokenizer and out/base)
    theirs = [] if is_ours(path) else [e for e in entries if not is_ours(os.path.join(path, e))]
    if theirs:
        _refuse_theirs(path, theirs, own, overwrite, flag)
    elif entries and training and not resume and not overwrite and \
            ("latest" in entries or any(e.startswith("step_") for e in entries)):
        raise UserError(f"{flag} {path} already holds the checkpoints of a run; pass --resume to continue it, "
                        f"--overwrite to train again over it, or pick a new {flag}.")
    done = [e for e in entries if any(fnmatch.fnmatchcase(e, pat) for pat in finished)]
    if done and not overwrite:
        raise UserError(f"{flag} {path} already holds {done[0]} from an earlier run; pass --overwrite to replace it, "
                        f"or pick a new {flag}.")
    if _rank() == 0:
        top = os.path.abspath(path)  # the first folder of path that does not exist yet
        while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
            top = os.path.dirname(top)
        existed = os.path.exists(path)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {flag} {path} ({e.strerror}); pick a directory you can write to.") from None
        if pid is None and not existed:
            _state["created"].append((os.path.abspath(path), top))
        take_lock(lock, f"{flag} {path}", pid=pid, command=command)
        marker = os.path.join(path, MARKER)
        if not os.path.exists(marker):
            with open(marker, "w", encoding="utf-8") as f:
                f.write(json.dumps({"created_by": stage_name(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    _state["log_dir"] = os.path.join(path, "logs")
    return path


def claim_out_file(path, *, overwrite=False, is_ours=lambda p: False, flag="--out", inputs=None):
    """The same for a one-file output (an existing one not ours only with overwrite), locked as <file>.lock."""
    if not path:
        raise UserError(f"{flag} is empty; pass a file path.")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory; pass a file path such as {os.path.join(path, 'results.json')}.")
    refuse_overlap(path, inputs, flag)
    if os.path.exists(path) and not overwrite and not is_ours(path):
        raise UserError(f"{flag} {path} already exists and was not written by nanostoney; pick another file name "
                        f"or pass --overwrite to replace it.")
    parent = os.path.dirname(os.path.abspath(path))
    if _rank() == 0:
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {parent} for {flag} {path} ({e.strerror}); pick a writable "
                            f"place.") from None
        take_lock(f"{path}.lock", f"{flag} {path}")
    return path


def refuse_same(outputs):
    """Two outputs of one run ({flag: path}) may not be the same path (one would overwrite the other)."""
    seen = {}
    for flag, path in outputs.items():
        if not path:
            continue
        key = os.path.realpath(path)
        if key in seen:
            raise UserError(f"{seen[key]} and {flag} are the same path ({path}); give each output its own path.")
        seen[key] = flag


def main(argv=None):
    """`python -m nanostoney.cli DIR --pid PID`: claim DIR for run_stoney_small.sh, which removes the lock."""
    p = ArgumentParser(description="Claim and lock an output directory for a shell script.")
    p.add_argument("directory", type=out_path)
    p.add_argument("--pid", type=positive_int, required=True)
    p.add_argument("--flag", default="--out")
    p.add_argument("--command-line", default=None)
    args = p.parse_args(argv)
    claim_out(args.directory, training=False, flag=args.flag, pid=args.pid, command=args.command_line)


if __name__ == "__main__":
    run_main(main)
