"""dist.py: single process without torchrun, and a real 2-process gloo group under torchrun."""
import json
import os
import subprocess
import sys
import textwrap

import torch

from nanostoney import dist

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    from nanostoney.dist import init_dist, all_reduce_mean, autocast_ctx, print0, cleanup
    import torch.distributed as td

    info = init_dist(device="cpu")
    assert td.is_initialized() and td.get_backend() == "gloo", "expected a gloo group"
    t = torch.tensor([float(info.rank + 1), 10.0 * (info.rank + 1)])
    all_reduce_mean(t)
    f = all_reduce_mean(float(info.rank))
    with autocast_ctx(info):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    print0("only-rank0-prints")
    out = {"rank": info.rank, "world": info.world_size, "master": info.is_master,
           "t": t.tolist(), "f": f, "dtype": str(y.dtype)}
    with open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w") as fh:
        json.dump(out, fh)
    cleanup()
    assert not td.is_initialized()
""")


def test_single_process_without_torchrun(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    info = dist.init_dist(device="cpu")
    assert (info.rank, info.world_size, info.is_master) == (0, 1, True)
    assert not info.is_distributed
    assert info.device == torch.device("cpu") and info.autocast_dtype is None
    assert not torch.distributed.is_initialized()
    x = torch.tensor([3.0])
    assert dist.all_reduce_mean(x) is x and x.item() == 3.0
    with dist.autocast_ctx(info):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    dist.cleanup()  # harmless without a group


def test_print0_silent_off_rank0(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    dist.print0("hidden")
    monkeypatch.setenv("RANK", "0")
    dist.print0("shown")
    assert capsys.readouterr().out == "shown\n"


def test_two_process_gloo_all_reduce(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("only-rank0-prints") == 1
    outs = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [o["rank"] for o in outs] == [0, 1]
    assert [o["master"] for o in outs] == [True, False]
    for o in outs:
        assert o["world"] == 2
        assert o["t"] == [1.5, 15.0]  # mean of (1,10) and (2,20)
        assert o["f"] == 0.5
        assert o["dtype"] == "torch.float32"


# -----------------------------------------------------------------------------
# GPUs that are visible but unusable stop the run; they never turn into a silent CPU run


def fake_gpus(monkeypatch, smi_lines=None, driver=None, visible=None):
    """torch sees no usable GPU; nvidia-smi (when smi_lines is given) lists smi_lines and reports
    `driver`; CUDA_VISIBLE_DEVICES is `visible` (None: unset)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def smi(*args):
        if smi_lines is None:
            return None
        return "\n".join(smi_lines) + "\n" if args == ("-L",) else (driver + "\n" if driver else "")
    monkeypatch.setattr(dist, "_nvidia_smi", smi)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def exit_and_stderr(main, capsys):
    from nanostoney.cli import run_main
    try:
        run_main(main)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_visible_but_unusable_gpus_stop_with_one_sentence(monkeypatch, capsys):
    smi = ["GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)", "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)"]
    fake_gpus(monkeypatch, smi_lines=smi, driver="535.104.05")
    code, err = exit_and_stderr(lambda: dist.init_dist(), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: 2 GPU(s) are visible"), err
    assert "NVIDIA driver 535.104.05" in lines[0] and f"CUDA {torch.version.cuda}" in lines[0]
    assert "--device cpu" in lines[0] and "Traceback" not in err


def test_cuda_visible_devices_without_nvidia_smi_also_stops(monkeypatch, capsys):
    fake_gpus(monkeypatch, smi_lines=None, visible="0,1,2,3")
    code, err = exit_and_stderr(lambda: dist.init_dist(), capsys)
    assert code == 2 and "4 GPU(s) are visible" in err and "could not report" in err


def test_a_script_stops_before_any_work_on_unusable_gpus(monkeypatch, capsys, tmp_path):
    from scripts import sft_train
    fake_gpus(monkeypatch, smi_lines=["GPU 0: NVIDIA H100 (UUID: GPU-1)"], driver="470.82.01")
    code, err = exit_and_stderr(lambda: sft_train.main(["--init", str(tmp_path), "--wandb", "disabled"]), capsys)
    assert code == 2 and "470.82.01" in err and len(err.strip().splitlines()) == 1


def test_cpu_on_purpose_still_runs(monkeypatch):
    fake_gpus(monkeypatch, smi_lines=["GPU 0: NVIDIA H100 (UUID: GPU-1)"], driver="535.104.05")
    assert dist.init_dist(device="cpu").device == torch.device("cpu")       # --device cpu
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert dist.init_dist().device == torch.device("cpu")                   # GPUs hidden on purpose
    fake_gpus(monkeypatch, smi_lines=[])                                    # a machine without GPUs
    assert dist.init_dist().device == torch.device("cpu")


def test_map_over_ranks_gives_every_rank_the_whole_list_in_order(monkeypatch):
    from types import SimpleNamespace
    parts = []
    monkeypatch.setattr(dist, "gather_lists", lambda items: parts.extend(items) or items)
    items = list(range(10))
    for rank in range(3):
        mine = dist.map_over_ranks(lambda x: x * x, items, SimpleNamespace(rank=rank, world_size=3))
        assert mine == [x * x for x in items[rank::3]]  # (the fake gather returns this rank's part)
    assert [v for _, v in sorted(parts)] == [x * x for x in items]
    assert dist.map_over_ranks(str, items) == [str(x) for x in items]  # one process: no collective
