"""Run entry points as `python -m` does, many times, paying for the imports once.

tests/test_bad_input.py drives dozens of cases through the real entry points. A fresh
`python -m scripts.X` spends ~5 s of CPU importing torch and the package before it can refuse a
bad flag; this server imports them once, then for each request forks a child that runs the module
exactly as `python -m` would (runpy.run_module with run_name="__main__": the script's
`if __name__ == "__main__": run_main(main)` block, its own stdout/stderr file descriptors, its
atexit handlers) and reports the exit status.

Protocol: one JSON request per line on stdin {"module", "argv", "cwd", "env", "stdout", "stderr"};
one JSON reply per line on stdout {"code"}.
"""
import atexit
import importlib
import json
import os
import runpy
import sys
import traceback

PRELOAD = ["torch", "numpy", "tokenizers", "yaml", "tqdm", "nanostoney.cli", "nanostoney.train",
           "nanostoney.checkpoint", "nanostoney.evaluate", "nanostoney.grpo", "nanostoney.interp.run",
           "nanostoney.interp.render", "nanostoney.tasks"]
SCRIPTS = ["base_train", "sft_train", "rm_train", "grpo_train", "star_train", "eval", "compare_reasoning",
           "tok_train", "tok_eval", "check_data", "sweep"]


def child(req):
    """In the forked child: become the entry point, then exit with its status."""
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = [req["module"]] + req["argv"]
    sys.modules.pop(req["module"], None)  # as in a fresh `python -m`: only its imports are preloaded
    code = 0
    try:
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # what python -m would print for an uncaught exception
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def main():
    for name in PRELOAD + [f"scripts.{s}" for s in SCRIPTS]:
        importlib.import_module(name)
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        out.flush()
        pid = os.fork()
        if pid == 0:
            child(req)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        out.write(json.dumps({"code": code}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
