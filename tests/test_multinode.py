"""Several nodes: run_stoney_small.sh's --nnodes / --node-rank / --master-addr, and the check that
every rank reads the same corpus files and the same tokenizer (dist.check_same_inputs), on real
gloo ranks under torchrun."""
import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from test_train import ROOT, env, make_workspace
from test_world_sizes import free_port, two_nodes

TORCHRUN = (sys.executable, "-m", "torch.distributed.run")

# Each rank checks twice: the same inputs (must pass, and leaves a mark), then rank 1 with another
# tokenizer or rank 2 with a corpus file of another size (through run_main: every rank exits 2).
WORKER = textwrap.dedent("""
    import os, sys
    from nanostoney.dist import check_same_inputs, cleanup, init_dist
    from nanostoney.cli import run_main
    from nanostoney.tokenizer import Tokenizer

    root, case = sys.argv[1], sys.argv[2]
    info = init_dist("cpu")
    tok = Tokenizer.load(os.path.join(root, "tok"))
    same = [os.path.join(root, "a", "data", "corpus.jsonl"), os.path.join(root, "MANIFEST.yml"), "hf://not/a/file"]
    check_same_inputs(same, tok)
    open(os.path.join(root, f"passed{info.rank}"), "w").close()
    files, mine = same, tok
    if case == "tokenizer" and info.rank == 1:
        mine = Tokenizer.load(os.path.join(root, "tok2"))
    if case == "corpus" and info.rank == 2:
        files = [os.path.join(root, "b", "data", "corpus.jsonl"), os.path.join(root, "MANIFEST.yml")]
    run_main(lambda: check_same_inputs(files, mine))
    cleanup()
""")


def three_ranks(root, case):
    """The one error line of WORKER on 3 gloo ranks; every rank passed the first check, and rank 0
    exited 2 on the second."""
    e = {**env(), "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=3", str(root / "worker.py"), str(root), case],
                       capture_output=True, text=True, timeout=600, env=e, cwd=ROOT)
    out = r.stdout + r.stderr
    # torchrun's summary: local rank 0 exits first, with 2 (bad input), and the others are stopped
    root_cause = out[out.index("Root Cause"):] if "Root Cause" in out else out
    assert r.returncode != 0 and "rank      : 0 (local_rank: 0)\n" in root_cause, out[-3000:]
    assert "exitcode  : 2 " in root_cause and "SIGABRT" not in out, out[-3000:]
    assert all((root / f"passed{i}").exists() for i in range(3))  # the same inputs pass on every rank
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, r.stderr[-3000:]  # said once per node (by its local rank 0)
    assert f'File "{ROOT / "nanostoney"}' not in out  # no traceback through our code (torchrun prints its own)
    return lines[0]


@pytest.fixture
def inputs(tmp_path):
    from nanostoney.tokenizer import Tokenizer
    ws = make_workspace(tmp_path)
    for d in ("a", "b"):  # two copies of data/corpus.jsonl, under different roots
        (tmp_path / d / "data").mkdir(parents=True)
        shutil.copy(ws.corpus, tmp_path / d / "data" / "corpus.jsonl")
    with open(tmp_path / "b" / "data" / "corpus.jsonl", "a") as f:  # one more document in rank 2's copy
        f.write(json.dumps({"text": "Eli had 3 stones."}) + "\n")
    docs = [json.loads(line)["text"] for line in ws.corpus.read_text().splitlines()]
    Tokenizer.train(docs, 290).save(str(tmp_path / "tok2"))
    (tmp_path / "worker.py").write_text(WORKER)
    return tmp_path


def test_a_rank_with_another_corpus_file_stops_every_rank_with_one_sentence(inputs):
    line = three_ranks(inputs, "corpus")
    size_a, size_b = ((inputs / d / "data" / "corpus.jsonl").stat().st_size for d in ("a", "b"))
    assert line.startswith("error: rank 2 on ") and "reads a different corpus (rank 2's data/corpus.jsonl is " \
        f"{size_b:,} bytes, rank 0's {size_a:,}; rank 2 reads 2 files of " in line
    assert "tokenizer (" not in line and "give every node the same corpus files" in line


def test_a_rank_with_another_tokenizer_stops_every_rank_with_one_sentence(inputs):
    from nanostoney.tokenizer import Tokenizer
    line = three_ranks(inputs, "tokenizer")
    n1, n0 = Tokenizer.load(str(inputs / "tok2")).vocab_size, Tokenizer.load(str(inputs / "tok")).vocab_size
    assert line.startswith("error: rank 1 on ") and "reads a different tokenizer (on rank 1 its vocabulary" in line
    assert f"{n1} tokens; on rank 0 to " in line and f"{n0} tokens)" in line and "corpus (" not in line


def test_a_node_with_another_copy_of_the_corpus_is_refused_by_base_train(tmp_path):
    """Two torchrun nodes (one process each): node 1's corpus.jsonl has one more document than
    node 0's. base_train stops on both nodes with the sentence, before any step."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    ws = make_workspace(nodes[0])
    shutil.copytree(nodes[0], nodes[1])
    with open(nodes[1] / "corpus.jsonl", "a") as f:
        f.write(json.dumps({"text": "Eli had 3 stones and found 4 more, so Eli has 7 stones now."}) + "\n")
    args = ["--tokenizer", "tok", "--data", "corpus.jsonl", "--manifest", "MANIFEST.yml", "--depth", "1",
            "--head-dim", "32", "--sequence-len", "16", "--device-batch-size", "2", "--total-batch-size", "64",
            "--num-iterations", "2", "--eval-tokens", "256", "--sample-tokens", "0", "--wandb", "disabled",
            "--device", "cpu", "--out", "out"]
    outs = two_nodes("scripts.base_train", args, cwds=nodes, timeout=600)
    size0, size1 = ws.corpus.stat().st_size, (nodes[1] / "corpus.jsonl").stat().st_size
    for code, so, se in outs:
        lines = [ln for ln in se.splitlines() if ln.startswith("error: ")]
        assert code != 0 and lines, se[-3000:]
        assert lines[0].startswith("error: rank 1 on ") and (
            f"a different corpus (rank 1's corpus.jsonl is {size1:,} bytes, rank 0's {size0:,}; ") in lines[0], se
        assert "tokenizer (" not in lines[0] and f'File "{ROOT / "nanostoney"}' not in se
    assert not [p for n in nodes for p in (n / "out").glob("step_*")]  # refused before training


# -----------------------------------------------------------------------------
# run_stoney_small.sh: the flags of a multi-node run, as its plan shows them


def plan(*flags):
    return subprocess.run(["bash", "run_stoney_small.sh", "--plan", "--size", "tiny", *flags], capture_output=True,
                          text=True, timeout=300, env=env(), cwd=ROOT)


def test_the_plan_of_a_multi_node_run_launches_torchrun_across_the_nodes(tmp_path):
    r = plan("--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-2000:]
    stages = [ln for ln in r.stdout.splitlines() if ln.startswith("  ")]
    launched = [ln for ln in stages if "torchrun" in ln]
    assert {ln.split(":")[0].strip() for ln in launched} == {"tokenizer", "base", "sft", "rm", "grpo", "eval", "report"}
    for ln in launched:
        assert ("torchrun --nnodes=2 --node_rank=1 --master_addr=10.0.0.1 --master_port=29500 --nproc_per_node=1 -m"
                in ln and "--standalone" not in ln)
    r = plan("--nnodes", "2", "--node-rank", "0", "--master-addr", "node0.cluster", "--master-port", "29999",
             "--out", str(tmp_path / "o"))
    assert r.returncode == 0 and "--node_rank=0 --master_addr=node0.cluster --master_port=29999" in r.stdout
    r = plan("--out", str(tmp_path / "o"))  # one node: as before
    assert r.returncode == 0 and "--nnodes" not in r.stdout


def test_bad_multi_node_flags_are_one_sentence(tmp_path):
    cases = {("--nnodes", "0"): "--nnodes 0 is not a positive whole number of nodes",
             ("--nnodes", "two"): "--nnodes two is not a positive whole number of nodes",
             ("--nnodes", "2", "--node-rank", "2", "--master-addr", "h"): "--node-rank 2 is not a node of --nnodes 2",
             ("--nnodes", "2", "--node-rank", "-1", "--master-addr", "h"): "--node-rank -1 is not a node of --nnodes 2",
             ("--nnodes", "2", "--node-rank", "1"): "--nnodes 2 needs --master-addr HOST",
             ("--nnodes", "2", "--master-addr", "a b"): "--nnodes 2 needs --master-addr HOST",
             ("--nnodes", "2", "--master-addr", "h", "--master-port", "70000"): "--master-port 70000 is not a TCP port",
             ("--node-rank", "1"): "pass --nnodes N as well",
             ("--master-addr", "h"): "pass --nnodes N as well"}
    for flags, words in cases.items():
        r = plan(*flags, "--out", str(tmp_path / "o"))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0], (flags, r.stderr)
        assert not (tmp_path / "o").exists()


@pytest.mark.slow  # ~12 min on the loaded 2-core machine
def test_the_tiny_pipeline_on_two_nodes(tmp_path):
    """run_stoney_small.sh on two "nodes" (one process each, 127.0.0.1, one shared --out): every
    torchrun stage spans both, every stage's same-inputs check passes, both finish."""
    out, port = tmp_path / "out", free_port()
    e = {**env(), "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}
    procs = [subprocess.Popen(["bash", "run_stoney_small.sh", "--nnodes", "2", "--node-rank", str(node),
                               "--master-addr", "127.0.0.1", "--master-port", str(port), "--size", "tiny",
                               "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e, cwd=ROOT)
             for node in (0, 1)]
    try:
        logs = [p.communicate(timeout=3000)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    for stage in ("base", "sft", "rm", "grpo", "eval", "report"):
        assert "2 process(es)" in (out / "logs" / f"{stage}.log").read_text()
    assert (out / "report" / "index.html").exists() and (out / "grpo" / "latest").exists()
