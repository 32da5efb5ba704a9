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
