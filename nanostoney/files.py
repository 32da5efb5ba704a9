"""Files written whole or not at all, and JSON read back with a one-sentence error.

A reader (a person, a later stage, a resumed run) sees the old file or the new one, never half
of one: every write goes to a temporary name beside the target and is renamed over it.

    write_json("out/sft/sft_eval.json", report)
    meta = read_json("out/base/step_000500/meta.json")
"""
import json
import os

from nanostoney.errors import UserError


def write_text(path, text):
    """Write `text` to `path` atomically (parent directories are created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj, indent=2):
    """`obj` as JSON (UTF-8, non-JSON values as str) written atomically to `path`."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


def read_json(path, fix="the file is damaged or the path is wrong"):
    """The JSON value in `path`; a UserError naming the file and `fix` when it is missing or bad."""
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing; {fix}.")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}); {fix}.") from None
