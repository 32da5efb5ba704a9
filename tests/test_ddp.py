"""DDP on CPU (gloo): torchrun runs must end with the weights of a single process.

Same global batch (64 tokens per step): 1 process x 2 micro-steps of gradient accumulation,
2 processes under one torchrun x 1 micro-step, and 2 torchrun "nodes" on 127.0.0.1 x 1 process
each. The streaming loader reads 2 lanes in all three (micro-step m of rank r reads lane
m x world + r: nanostoney/loader.py), so all three see the same rows; only the float summation
order of the gradient differs (<= 1e-5 after training).
"""
import socket
import subprocess

import pytest

from test_train import PY, base_cmd, env, final_weights, make_workspace, max_diff, run, ROOT

TORCHRUN = (PY, "-m", "torch.distributed.run")
STEPS = ["--num-iterations", "4", "--eval-every", "2", "--save-every", "0"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ddp_ws"))


@pytest.fixture(scope="module")
def single(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    r = run(base_cmd(ws, out, *STEPS))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 accum" in r.stdout  # 64 = 2 rows x 16 tokens x 1 process x 2 micro-steps
    return final_weights(out)


def test_two_processes_match_single_process(ws, single, tmp_path):
    out = tmp_path / "ddp"
    launcher = (*TORCHRUN, "--standalone", "--nproc_per_node=2")
    r = run(base_cmd(ws, out, *STEPS, launcher=launcher))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 proc x 1 accum" in r.stdout
    assert max_diff(single, final_weights(out)) <= 1e-5


def test_two_nodes_train_together(ws, single, tmp_path):
    out = tmp_path / "nodes"
    port = free_port()
    procs = []
    for node in range(2):
        launcher = (*TORCHRUN, "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
                    "--master_addr=127.0.0.1", f"--master_port={port}")
        procs.append(subprocess.Popen(base_cmd(ws, out, *STEPS, launcher=launcher), env=env(), cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=900))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-3000:]
    assert "2 proc x 1 accum" in outs[0][0]  # node 0 hosts rank 0, which prints
    assert max_diff(single, final_weights(out)) <= 1e-5
