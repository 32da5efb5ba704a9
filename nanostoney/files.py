"""Files written whole or not at all (a temporary name beside the target, renamed over it), and
read back with a one-sentence error. A failed write removes its temporary file, leaves the old
file as it was and says so in one sentence naming the file and the reason (RunFailed)."""
import json
import os

from nanostoney.errors import RunFailed, UserError


def write_failed(path, e, kept="the previous version, if any, is unchanged"):
    """The one-sentence RunFailed for an OSError met while writing `path`."""
    return RunFailed(f"could not write {e.filename or path} ({e.strerror or e}); {kept}.")


def write_text(path, text):
    """Write `text` to `path` atomically (parent directories are created)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise write_failed(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj, indent=2):
    """`obj` as JSON (UTF-8, non-JSON values as str) written atomically to `path`."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


def pid_alive(pid):
    """Is process `pid` running (on this host)? Decides whether a lock or a temporary file is stale."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is not ours to signal
        pass
    return True


class _Writes:
    """The file torch.save writes into, keeping the exception of a failed write (torch turns it
    into 'unexpected pos', naming neither file nor reason): an OSError, or a Ctrl-C / SIGTERM."""

    def __init__(self, f):
        self.f, self.name, self.error = f, f.name, None

    def write(self, data):
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[self.f.write(view):]
        except BaseException as e:
            self.error = e
            raise
        return len(data)

    def flush(self):  # every write went straight to the file
        pass


def save_torch(obj, path):
    """torch.save whose failure is an OSError naming the file and the reason; on disk on return."""
    import torch
    try:
        with open(path, "wb", buffering=0) as f:
            out = _Writes(f)
            try:
                torch.save(obj, out)
            except RuntimeError:
                if out.error is None:
                    raise
                raise out.error from None
            os.fsync(f.fileno())
    except OSError as e:
        e.filename = e.filename or path
        raise


def read_json(path, fix="the file is damaged or the path is wrong"):
    """The JSON value in `path`; a UserError naming the file and `fix` when it is missing or bad."""
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing; {fix}.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); {fix}.") from None


def read_torch(path, fix="the file is damaged or not a torch checkpoint"):
    """torch.load(weights_only) of `path`; a UserError naming the file when it is missing or unreadable."""
    import torch
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing; the checkpoint is incomplete or the path is wrong.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"could not read {path} ({type(e).__name__}); {fix}.") from None
