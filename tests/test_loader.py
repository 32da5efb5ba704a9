"""loader.py: streaming rows from parquet row groups; lanes, exact resume, bounded memory, bad input.

The end-to-end tests run scripts.base_train as a user would (tests/test_train.py's workspace),
on parquet shards written here; tests/test_ddp.py keeps the N-ranks-vs-accumulation check.
"""
import json
import random
import subprocess
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanostoney import curriculum, loader
from nanostoney.errors import UserError
from test_train import PY, ROOT, base_cmd, cli_error, env, final_weights, make_workspace, max_diff, run

TORCHRUN = (PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
WORDS = ["stone", "river", "count", "seven", "found", "more", "Ada", "Bo", "has", "and", "the", "of"]


def write_parquet(path, docs, row_group=16, column="text"):
    pq.write_table(pa.table({column: docs}), str(path), row_group_size=row_group)
    return str(path)


def synthetic_docs(n, seed=0, words=(5, 60)):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) + "." for _ in range(n)]


def info_for(rank=0, world=1):
    return SimpleNamespace(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("loader_ws"))


@pytest.fixture(scope="module")
def tok(ws):
    from nanostoney.tokenizer import Tokenizer
    return Tokenizer.load(str(ws.tok))


@pytest.fixture(scope="module")
def shards(ws):
    """Two parquet files, 13 row groups of 16 documents (the last holds 8)."""
    docs = synthetic_docs(200, words=(2, 12))
    return [write_parquet(ws.root / "shard_a.parquet", docs[:120]), write_parquet(ws.root / "shard_b.parquet", docs[120:])]


def batches(data, steps, accum):
    return [torch.cat([data.get(s, m)[0] for m in range(accum)]) for s in steps]


# -----------------------------------------------------------------------------
# rows


def test_rows_are_the_corpus_stream_cut_with_one_token_overlap(shards, tok):
    corpus = loader.Corpus(shards)
    lane = loader.Lane(corpus, tok, seq_len=8, shuffle=False)
    docs = [t for path in shards for t in pq.read_table(path).column("text").to_pylist()]
    stream = np.concatenate([[tok.bos_id] + ids for ids in tok.encode_batch(docs)])
    rows = [lane.row() for _ in range((len(stream) - 1) // 8)]
    for i, r in enumerate(rows):  # every token a target once, nothing cropped or skipped
        assert np.array_equal(r, stream[i * 8:i * 8 + 9])
    assert lane.epoch() == 0
    nxt = lane.row()  # the stream wraps into the next epoch
    assert np.array_equal(nxt[:len(stream) - len(rows) * 8], stream[len(rows) * 8:])


def test_lanes_give_the_same_rows_to_ranks_as_to_accumulation(shards, tok):
    corpus = loader.Corpus(shards)
    single = loader.PretrainLoader(corpus, tok, 32, device_batch=4, grad_accum=2, info=info_for(), seed=3)
    ranks = [loader.PretrainLoader(corpus, tok, 32, 4, 1, info_for(r, 2), seed=3) for r in range(2)]
    steps = range(60)  # about 3 epochs of this corpus: crosses epoch boundaries
    a = batches(single, steps, 2)
    b = [torch.cat([ranks[0].get(s, 0)[0], ranks[1].get(s, 0)[0]]) for s in steps]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert single.mine[0].epoch() >= 2
    # rank r of 2 reads row groups r, r + 2, ... of each epoch's permutation
    lane = ranks[1].mine[0]
    assert [lane.unit(j) for j in range(3)] == [corpus.units[int(lane._perms[0][k])] for k in (1, 3, 5)]
    x, y = single.get(60, 0)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


@pytest.mark.parametrize("world", [1, 2])
def test_position_resumes_on_the_exact_next_tokens(shards, tok, world):
    corpus = loader.Corpus(shards)
    accum = 2 // world

    def make(position=None):
        return [loader.PretrainLoader(corpus, tok, 32, 3, accum, info_for(r, world), seed=1, position=position)
                for r in range(world)]

    def position(loaders):  # what the collective gathers from every rank
        states = sorted((m * world + r, lane.position()) for r, d in enumerate(loaders) for m, lane in d.mine.items())
        return {"lanes": 2, "states": [s for _, s in states]}

    def step_rows(loaders, s):
        return torch.cat([d.get(s, m)[0] for m in range(accum) for d in loaders])

    ref, seen, ref_rows = make(), [], {}
    for s in range(50):
        if s in (0, 3, 17, 31):  # 17 and 31 are in later epochs
            seen.append((s, json.loads(json.dumps(position(ref)))))  # through JSON, as in meta.json
        ref_rows[s] = step_rows(ref, s)
    for s0, pos in seen:
        resumed = make(pos)
        for s in range(s0, 50):
            assert torch.equal(step_rows(resumed, s), ref_rows[s]), (s0, s)
    assert any(o > 0 for _, pos in seen for _, _, o in pos["states"])  # resumed mid-document
    with pytest.raises(UserError, match="data lanes"):
        loader.PretrainLoader(corpus, tok, 32, 3, 4, info_for(), position=seen[1][1])


def test_validation_rows_read_the_corpus_once(shards, tok):
    val = loader.Corpus(shards[1:])
    rows = loader.validation_rows(val, tok, 8, max_rows=10_000)
    docs = pq.read_table(shards[1]).column("text").to_pylist()
    n = sum(len(ids) + 1 for ids in tok.encode_batch(docs))
    assert len(rows) == (n - 1) // 8  # the whole corpus, no row wrapped into it again
    assert torch.equal(loader.validation_rows(val, tok, 8, max_rows=5), rows[:5])


def test_token_estimate_is_exact_on_a_small_corpus_and_close_on_a_sample(tmp_path, tok):
    docs = synthetic_docs(400, seed=5, words=(20, 200))
    corpus = loader.Corpus([write_parquet(tmp_path / "est.parquet", docs, row_group=64)])
    exact = sum(len(ids) + 1 for ids in tok.encode_batch(docs))
    assert loader.estimate_tokens(corpus, tok) == (exact, True)
    est, is_exact = loader.estimate_tokens(corpus, tok, sample_bytes=20_000)  # about a tenth
    assert not is_exact and abs(est - exact) / exact < 0.05, (est, exact)


# -----------------------------------------------------------------------------
# bad input


def test_bad_parquet_is_one_sentence(ws, tmp_path, capsys):
    no_text = write_parquet(tmp_path / "notext.parquet", synthetic_docs(40), column="body")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet at all")
    manifest = tmp_path / "MANIFEST.yml"
    manifest.write_text(ws.manifest.read_text().replace('"*.jsonl"', '"*.parquet"'))
    for path, what in ((no_text, "no 'text' column (columns: body); pass --text-column"),
                       (str(broken), "not a readable parquet file")):
        argv = base_cmd(ws, tmp_path / "out")[3:]
        argv[argv.index("--data") + 1] = path
        argv[argv.index("--manifest") + 1] = str(manifest)
        code, err = cli_error("base_train", argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path}") and what in lines[0], err
    with pytest.raises(UserError, match="single row group"):
        loader.Corpus([write_parquet(tmp_path / "one.parquet", synthetic_docs(5))]).split_last()


# -----------------------------------------------------------------------------
# end to end: resume exact at 1 and 2 ranks; memory does not grow with the corpus


def parquet_cmd(ws, shards, out, *extra, launcher=(PY,)):
    cmd = base_cmd(ws, out, "--num-iterations", "6", "--save-every", "3", "--keep-last", "0",
                   "--eval-every", "3", *extra, launcher=launcher)
    i = cmd.index("--data")
    cmd[i + 1:i + 2] = list(shards)
    manifest = ws.root / "MANIFEST_parquet.yml"
    manifest.write_text(ws.manifest.read_text().replace('"*.jsonl"', '"*.parquet"'))
    cmd[cmd.index("--manifest") + 1] = str(manifest)
    return cmd


@pytest.mark.parametrize("launcher", [(PY,), TORCHRUN], ids=["1rank", "2ranks"])
def test_resume_mid_epoch_is_bitwise_the_uninterrupted_run(ws, shards, tmp_path, launcher):
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    r = run(parquet_cmd(ws, shards, ref, launcher=launcher))
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((ref / "step_000003" / "meta.json").read_text())
    states = meta["data_position"]["states"]
    assert meta["data_position"]["lanes"] == 2 and len(states) == 2
    assert all(j < 6 for j, _, _ in states) and any(d > 0 or o > 0 for _, d, o in states)  # mid-epoch
    r = run(parquet_cmd(ws, shards, resumed, "--resume", str(ref / "step_000003"), launcher=launcher))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert max_diff(final_weights(ref), final_weights(resumed)) == 0.0
    assert json.loads((resumed / "step_000006" / "meta.json").read_text())["data_position"] == \
        json.loads((ref / "step_000006" / "meta.json").read_text())["data_position"]


MEASURE = """
import sys, threading, time
from scripts import base_train

def anon_kb():  # private memory only: shared-library pages come and go with the page cache
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

peak = [0]
def watch():
    while True:
        peak[0] = max(peak[0], anon_kb())
        time.sleep(0.02)

threading.Thread(target=watch, daemon=True).start()
base_train.main(sys.argv[1:])
print("PEAK_ANON_KB", max(peak[0], anon_kb()))
"""


def test_memory_does_not_grow_with_the_corpus(ws, tmp_path):
    """Peak private memory of a run on ~3 MB and on ~33 MB of parquet text: the old loader held
    every token of the corpus (about 36 bytes per token as Python ints, hundreds of MB here)."""
    rss, text_mb = {}, {}
    for n_docs in (1_000, 10_000):
        docs = synthetic_docs(n_docs, words=(400, 1000))
        text_mb[n_docs] = sum(map(len, docs)) / 2**20
        path = write_parquet(tmp_path / f"c{n_docs}.parquet", docs, row_group=256)
        cmd = parquet_cmd(ws, [path], tmp_path / f"o{n_docs}", "--save-every", "0", "--eval-every", "0")
        cmd[1:3] = ["-c", MEASURE]  # python -c MEASURE <base_train args>
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env(), cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        rss[n_docs] = int(r.stdout.split("PEAK_ANON_KB")[1].split()[0]) / 1024
        assert "epochs" in r.stdout and "~" in r.stdout  # the plan estimated, not counted, the tokens
    grew = rss[10_000] - rss[1_000]
    assert grew < 0.1 * (text_mb[10_000] - text_mb[1_000]), (rss, text_mb)


# -----------------------------------------------------------------------------
# getting a web corpus: the manifest record, the download script (no network), the tokenizer


def test_the_web_corpus_record_approves_only_fineweb_shards(tmp_path):
    from nanostoney.governance import check_sources
    ok = tmp_path / "fineweb-edu-100b-shuffle" / "shard_00007.parquet"
    assert check_sources([str(ok)], use="training") == [(str(ok), "fineweb_edu_100b_shuffle")]
    for other in (tmp_path / "other" / "shard_00007.parquet", tmp_path / "fineweb-edu-100b-shuffle" / "x.parquet"):
        with pytest.raises(UserError, match="no record"):
            check_sources([str(other)], use="training")
    with pytest.raises(UserError, match="may not be used for public_release"):
        check_sources([str(ok)], use="public_release")


def test_download_corpus_keeps_shards_and_fails_offline_in_one_sentence(tmp_path):
    out = tmp_path / "fineweb-edu-100b-shuffle"
    out.mkdir()
    for i in range(2):
        write_parquet(out / f"shard_{i:05d}.parquet", synthetic_docs(50, seed=i))
    offline = {**env(), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    cmd = [PY, "-m", "scripts.download_corpus", "--out", str(out)]
    r = subprocess.run(cmd + ["--num-shards", "2"], capture_output=True, text=True, timeout=300, env=offline, cwd=ROOT)
    assert r.returncode == 2 and "--overwrite" in r.stderr, r.stderr  # a folder of the user's: refused ...
    r = subprocess.run(cmd + ["--num-shards", "2", "--overwrite"], capture_output=True, text=True, timeout=300,
                       env=offline, cwd=ROOT)  # ... or written beside (no shard of theirs is replaced)
    assert r.returncode == 0 and "2 there, 0 to download" in r.stdout and "approved for training" in r.stdout, r.stderr
    r = subprocess.run(cmd + ["--tokens", "1.2e8"], capture_output=True, text=True, timeout=300, env=offline, cwd=ROOT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "3 shards" in r.stdout and lines[-1] == (
        f"error: could not download shard_00002.parquet of karpathy/fineweb-edu-100b-shuffle (HF_HUB_OFFLINE is "
        f"set); check the connection and run again (the shards already in {out} are kept).")
    assert sorted(p.name for p in out.glob("*.parquet")) == ["shard_00000.parquet", "shard_00001.parquet"]


def test_tok_train_streams_parquet_up_to_max_chars(ws, shards, tmp_path, capsys):
    from scripts import tok_train
    manifest = tmp_path / "MANIFEST.yml"
    manifest.write_text(ws.manifest.read_text().replace('"*.jsonl"', '"*.parquet"'))
    tok_train.main(["--data", *shards, "--manifest", str(manifest), "--vocab-size", "280", "--max-chars", "3000",
                    "--out", str(tmp_path / "tok")])
    out = capsys.readouterr().out
    docs = int(out.split("trained on ")[1].split()[0])  # pieces of text read
    assert "first 3,000 characters" in out and 0 < docs < 200  # stopped long before the end of the corpus
    assert (tmp_path / "tok" / "tokenizer.json").exists()


def test_steps_come_from_the_token_budget_and_a_repeated_corpus_is_warned_about(shards, tok, capsys):
    from scripts import base_train
    budget = SimpleNamespace(num_iterations=None, target_param_data_ratio=20.0)
    assert base_train.plan_steps(budget, num_params=1000, total_batch=64) == 313  # ceil(20 x 1000 / 64)
    assert base_train.plan_steps(SimpleNamespace(num_iterations=7, target_param_data_ratio=20.0), 1000, 64) == 7
    corpus = loader.Corpus(shards, "text")
    have, _ = loader.estimate_tokens(corpus, tok)
    once = SimpleNamespace(num_iterations=max(1, have // 2 // 64), device_batch_size=4)  # reads half the corpus
    no_curriculum = curriculum.Curriculum()
    tokens, words = base_train.corpus_plan(once, 1000, 64, corpus, tok, no_curriculum)
    assert tokens == have and "0.49 epochs" in words and "warning" not in capsys.readouterr().out
    thrice = SimpleNamespace(num_iterations=3 * have // 64, device_batch_size=4)
    _, words = base_train.corpus_plan(thrice, 1000, 64, corpus, tok, no_curriculum)
    assert "epochs" in words and "reads its training corpus 3.0 times" in capsys.readouterr().out
