"""published.py: fine-tuning models published as nanochat checkpoint dirs, in the transformers
NanoChat layout, or on the hub (hf:OWNER/NAME), all built here (no network).

The nanochat directory is written the way nanochat's own code (Oct 2025) writes it:
checkpoint_manager.save_checkpoint (model_XXXXXX.pt = torch.save of the state dict with the
embedding in bf16, meta_XXXXXX.json with model_config, optim_XXXXXX_rank0.pt) under
<base>/chatsft_checkpoints/d2, and RustBPETokenizer.save (pickle.dump of a tiktoken Encoding
built from rustbpe's mergeable ranks) into <base>/tokenizer/tokenizer.pkl. The transformers
directory is what convert_nanochat_checkpoints writes: config.json (model_type nanochat),
model.safetensors with its key names, tokenizer.json.
"""
import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import types

import pytest
import torch

from nanostoney import checkpoint, lora, published
from nanostoney.errors import UserError
from nanostoney.engine import Engine
from nanostoney.gpt import GPT, GPTConfig
from nanostoney.tokenizer import SPECIAL_TOKENS
from test_train import PY, ROOT, cli_error, env

CFG = {"sequence_len": 1024, "vocab_size": 300, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64}
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
SFT = ["--tasks", "stoney_mc=1", "--max-train-examples", "4", "--num-iterations", "2", "--device-batch-size", "2",
       "--total-batch-size", "2", "--eval-every", "0", "--final-eval-examples", "0", "--eval-examples", "0",
       "--keep-truncated", "--sequence-len", "512", "--lora-rank", "4", "--device", "cpu", "--wandb", "disabled"]
GRPO = ["--tasks", "stoney_mc", "--eval-tasks", "stoney_mc", "--max-train-examples", "4", "--num-iterations", "2",
        "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "6", "--final-eval-examples", "0",
        "--probe-prompts", "0", "--rewards", "accuracy=1,format=0.2", "--lora-rank", "4", "--device", "cpu",
        "--wandb", "disabled"]


def tiktoken_pickle(path, ranks, pattern, specials):
    """pickle.dump of a tiktoken Encoding, without tiktoken: its __getstate__ is the constructor's
    arguments, and the pickle names the class tiktoken.core.Encoding."""
    class Encoding:
        def __getstate__(self):
            return {"name": "rustbpe", "pat_str": pattern, "mergeable_ranks": ranks, "special_tokens": specials}

    Encoding.__module__, Encoding.__qualname__ = "tiktoken.core", "Encoding"
    core, pkg = types.ModuleType("tiktoken.core"), types.ModuleType("tiktoken")
    core.Encoding, pkg.core = Encoding, core
    saved = {k: sys.modules.get(k) for k in ("tiktoken", "tiktoken.core")}
    sys.modules.update({"tiktoken": pkg, "tiktoken.core": core})
    try:
        with open(path, "wb") as f:
            pickle.dump(Encoding(), f)
    finally:
        for k, v in saved.items():
            sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)


def write_safetensors(path, tensors):
    """The safetensors format, written independently of published.read_safetensors."""
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def hf_name(key):
    key = key.replace("transformer.wte.", "model.embed_tokens.").replace("transformer.h.", "model.layers.")
    for ours, theirs in (("attn.c_q", "self_attn.q_proj"), ("attn.c_k", "self_attn.k_proj"), ("attn.c_v", "self_attn.v_proj"),
                         ("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        key = key.replace(ours, theirs)
    return key


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(nanochat checkpoint dir, transformers dir, a hub cache holding the latter as hf:owner/nanochat-tiny)."""
    from nanostoney.tokenizer import Tokenizer
    root = tmp_path_factory.mktemp("published")
    texts = ["Which English word means îyâhe? Answer: mountain.", "The farmer has 12 cows and buys 5 more."] * 40
    rust = Tokenizer.train(texts, CFG["vocab_size"]).rust
    ranks = {bytes(b): i for b, i in rust.get_mergeable_ranks()}
    specials = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
    (root / "nanochat" / "tokenizer").mkdir(parents=True)
    tiktoken_pickle(root / "nanochat" / "tokenizer" / "tokenizer.pkl", ranks, rust.get_pattern(), specials)

    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # nanochat zero-inits some projections: make every weight matter
    sd = {k: v.to(torch.bfloat16) if k == "transformer.wte.weight" else v for k, v in model.state_dict().items()}
    nano = root / "nanochat" / "chatsft_checkpoints" / "d2"
    nano.mkdir(parents=True)
    torch.save(sd, nano / "model_000020.pt")
    (nano / "meta_000020.json").write_text(json.dumps({"step": 20, "val_loss": 1.0, "model_config": CFG}, indent=2))
    torch.save({"state": {}}, nano / "optim_000020_rank0.pt")

    hf = root / "hf"
    hf.mkdir()
    write_safetensors(hf / "model.safetensors", {hf_name(k): v.to(torch.bfloat16) for k, v in sd.items()})
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["NanoChatForCausalLM"], "model_type": "nanochat", "vocab_size": CFG["vocab_size"],
        "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 1024, "hidden_act": "relu2", "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "final_logit_softcapping": 15.0,
        "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    nano_tok = Tokenizer.from_nanochat_pickle(str(root / "nanochat" / "tokenizer" / "tokenizer.pkl"))
    (hf / "tokenizer.json").write_text(nano_tok.hf.to_str())
    cache = root / "hub"
    repo = cache / "models--owner--nanochat-tiny"
    shutil.copytree(hf, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return str(nano), str(hf), str(cache)


def offline_env(cache):
    return {**env(), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": cache, "HF_HOME": os.path.dirname(cache)}


def test_both_layouts_load_as_the_same_model(models):
    nano, hf, _ = models
    m1, t1, meta1 = checkpoint.load_model(os.path.dirname(os.path.dirname(nano)) + "/chatsft_checkpoints")
    m2, t2, meta2 = checkpoint.load_model(hf)
    assert meta1["source"] == "nanochat" and meta1["step"] == 20 and meta2["source"] == "transformers"
    idx = torch.randint(0, CFG["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the transformers converter stores every weight in bf16
        for p in m1.parameters():
            p.copy_(p.bfloat16().float())
    # the same weights; transformers' forward differs from nanochat's only in its numerics (RMSNorm
    # eps 1e-6, float32 rotary tables), which the transformers layout carries into the config
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m1.state_dict().items())
    assert m2.config == dataclasses.replace(m1.config, norm_eps=1e-6, rope_dtype="float32")
    assert (m1(idx) - m2(idx)).abs().max() < 0.1
    text = "Which English word means îyâhe?"
    assert t1.encode(text) == t2.encode(text) and len(t1.encode(text)) < len(text.encode())  # merges kept
    for t in (t1, t2):
        published.check_chat_tokens(t, "test")  # nanochat's special tokens are ours, by name
        assert t.token_id("<|assistant_end|>") == CFG["vocab_size"] - len(SPECIAL_TOKENS) + 4


def test_sft_then_grpo_on_a_nanochat_checkpoint(models, tmp_path):
    from scripts import grpo_train, rm_train, sft_train
    from scripts.eval import main as eval_main
    nano, _, _ = models
    sft, grpo = str(tmp_path / "sft"), str(tmp_path / "grpo")
    sft_train.main(SFT + ["--init", nano, "--out", sft])
    ckpt = checkpoint.latest_checkpoint(sft)
    assert os.path.samefile(lora.base_checkpoint_of(ckpt), nano)  # the adapters name their base
    tuned, tok, meta = checkpoint.load_model(sft)  # and load onto it again
    base, _, _ = checkpoint.load_model(nano)
    assert meta["base"]["source"] == "nanochat" and lora.lora_modules(tuned) and tok is not None
    assert all(torch.equal(tuned.state_dict()[k], v) for k, v in base.state_dict().items())
    grpo_train.main(GRPO + ["--init", sft, "--out", grpo])
    model, _, meta = checkpoint.load_model(grpo)
    assert meta["step"] == 2 and lora.lora_modules(model)
    rm = str(tmp_path / "rm")  # the reward model and evaluation stand on it too
    rm_train.main(["--init", sft, "--tasks", "stoney_mc", "--max-train-examples", "4", "--eval-pairs", "2",
                   "--num-iterations", "2", "--device-batch-size", "2", "--max-len", "512", "--lora-rank", "4",
                   "--device", "cpu", "--wandb", "disabled", "--out", rm])
    assert checkpoint.latest_checkpoint(rm) is not None
    results = str(tmp_path / "eval.json")
    eval_main(["--checkpoints", f"nanochat={nano}", f"sft={sft}", "--tasks", "stoney_mc", "--max-examples", "2",
               "--num-samples", "0", "--max-new-tokens", "8", "--n-boot", "20", "--device", "cpu",
               "--wandb", "disabled", "--out", results])
    table = json.load(open(results))["checkpoints"]
    assert set(table) == {"nanochat", "sft"} and all(table[c]["tasks"]["stoney_mc"]["n"] == 2 for c in table)


def test_knowledge_stage_then_sft_on_a_nanochat_checkpoint(models, tmp_path):
    """The speedrun's knowledge stage (base_train --init): a published model continues pretraining
    on the bundled corpus with its own tokenizer and architecture, and SFT stands on the result."""
    from scripts import base_train, sft_train
    nano, _, _ = models
    knowledge, sft = str(tmp_path / "knowledge"), str(tmp_path / "sft")
    base_train.main(["--init", nano, "--out", knowledge, "--num-iterations", "2", "--sequence-len", "64",
                     "--device-batch-size", "2", "--total-batch-size", "128", "--eval-every", "0", "--eval-tokens",
                     "256", "--sample-tokens", "0", "--augment", "0", "--device", "cpu", "--wandb", "disabled"])
    model, tok, meta = checkpoint.load_model(knowledge)
    published_model, published_tok, _ = checkpoint.load_model(nano)
    assert model.config == published_model.config and meta["step"] == 2 and meta["stage"] == "knowledge"
    text = "Which English word means îyâhe?"
    assert tok.encode(text) == published_tok.encode(text)
    assert any(not torch.equal(v, published_model.state_dict()[k]) for k, v in model.state_dict().items())
    sft_train.main(SFT + ["--init", knowledge, "--out", sft])
    assert os.path.samefile(lora.base_checkpoint_of(checkpoint.latest_checkpoint(sft)),
                            checkpoint.latest_checkpoint(knowledge))


def test_sft_on_the_transformers_layout_and_grpo_on_a_cached_hub_id_offline(models, tmp_path):
    from scripts import sft_train
    _, hf, cache = models
    sft = str(tmp_path / "sft")
    sft_train.main(SFT + ["--init", hf, "--out", sft])
    assert os.path.samefile(lora.base_checkpoint_of(checkpoint.latest_checkpoint(sft)), hf)
    grpo = str(tmp_path / "grpo")
    r = subprocess.run([PY, "-m", "scripts.grpo_train", *GRPO, "--init", "hf:owner/nanochat-tiny", "--out", grpo],
                       capture_output=True, text=True, timeout=900, env=offline_env(cache), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = checkpoint.latest_checkpoint(grpo)
    assert os.path.realpath(lora.base_checkpoint_of(ckpt)).endswith(os.path.join("snapshots", SNAPSHOT))  # the cached copy
    r = subprocess.run([PY, "-m", "scripts.sft_train", *SFT, "--init", "hf:owner/not-cached", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=900, env=offline_env(cache), cwd=ROOT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert "hf:owner/not-cached is not in the Hugging Face cache" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def test_bad_published_models_are_one_sentence(models, tmp_path, capsys):
    nano, hf, _ = models
    bare = tmp_path / "bare"
    shutil.copytree(nano, bare)  # no tokenizer beside it, nor two levels up
    code, err = cli_error("sft_train", SFT + ["--init", str(bare), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"error: --init {bare}: the nanochat model in {bare} has no tokenizer; put its tokenizer.pkl "
        f"(or tokenizer.json) beside the weights."]
    odd = tmp_path / "odd"
    shutil.copytree(hf, odd)
    tj = json.loads((odd / "tokenizer.json").read_text())
    for t in tj["added_tokens"]:
        t["content"] = t["content"].replace("<|assistant_end|>", "<|endoftext|>")
    (odd / "tokenizer.json").write_text(json.dumps(tj))
    code, err = cli_error("sft_train", SFT + ["--init", str(odd), "--out", str(tmp_path / "o2")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "has no <|assistant_end|> special token" in lines[0]
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "hidden_act": "silu"}))
    with pytest.raises(UserError, match="hidden_act"):
        published.load_hf(str(odd))
    (odd / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="not a readable safetensors file"):
        published.load_hf(str(odd))


# -----------------------------------------------------------------------------
# the publishers' own files: ../shared/fixtures/published (README there), written by nanochat's
# October-2025 code and by transformers 5.25's NanoChatForCausalLM, with their reference outputs

def published_fixtures():
    """The fixture folder: beside the clone (CI copies shared/ there) or inside it."""
    for d in (ROOT.parent / "shared" / "fixtures" / "published", ROOT / "shared" / "fixtures" / "published"):
        if d.is_dir():
            return d
    return None


PUBLISHED = published_fixtures()
FIXTURES = {"nanochat-cache": ("nanochat/cache/base_checkpoints", "nanochat"),  # nanochat's ~/.cache layout
            "nanochat-flat": ("nanochat/flat", "nanochat"),  # a Hugging Face upload of nanochat's files
            "transformers": ("hf", "hf")}  # NanoChatForCausalLM.save_pretrained
needs_fixtures = pytest.mark.skipif(PUBLISHED is None, reason=f"no published-model fixtures at "
                                    f"{ROOT.parent / 'shared' / 'fixtures' / 'published'} "
                                    f"(copy shared/ beside the clone)")
CHAT = [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "3 plus 4 is 7."}]


def fixture(name):
    path, ref = FIXTURES[name]
    return str(PUBLISHED / path), json.loads((PUBLISHED / ref / "reference.json").read_text())


def tree_digest(root):
    """{file: sha256} under root: the fixtures must come out of every run byte for byte."""
    return {os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(root) for f in files}


@needs_fixtures
@pytest.mark.parametrize("name", FIXTURES)
def test_a_published_model_reproduces_its_publishers_outputs(name):
    """Logits within 1e-4 of the publisher's own forward pass, the same 12 greedy tokens, the same
    token ids from the tokenizer shipped with the model (and nanochat's chat rendering)."""
    path, ref = fixture(name)
    model, tok, meta = checkpoint.load_model(path)
    assert meta["source"] == ("transformers" if name == "transformers" else "nanochat") and tok is not None
    bos = tok.token_id("<|bos|>")
    for text, ids, logits, greedy in zip(ref["texts"], ref["ids"], ref["logits"], ref["greedy"]):
        assert [bos] + tok.encode(text) == ids
        with torch.no_grad():
            got = model(torch.tensor([ids]))[0]
        want = torch.tensor(logits)
        assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-4
        assert Engine(model, tok, stop_ids=[]).generate([ids], len(greedy), temperature=0.0).tokens[0] == greedy
    published.check_chat_tokens(tok, name)
    if "chat_ids" in ref:  # nanochat's render_conversation of CHAT (decoded from chat_ids)
        assert {k: tok.token_id(k) for k in ref["special"]} == ref["special"]
        assert tok.decode(ref["chat_ids"]).endswith(CHAT[1]["content"] + "<|assistant_end|>")
        assert tok.render_conversation(CHAT) == (ref["chat_ids"], ref["chat_mask"])


@needs_fixtures
@pytest.mark.parametrize("name", FIXTURES)
def test_sft_then_grpo_from_a_published_model(name, tmp_path):
    """The real scripts, two steps each: SFT from the published model (the transformers one fully
    fine-tuned, so its numerics must survive our own checkpoint format), then GRPO from that; the
    publishers' files are left byte for byte as they were."""
    path, ref = fixture(name)
    before = tree_digest(PUBLISHED)
    sft, grpo = str(tmp_path / "sft"), str(tmp_path / "grpo")
    how = ["--full"] if name == "transformers" else ["--lora-rank", "4"]
    for script, argv in (("sft_train", SFT + ["--init", path, "--out", sft]),
                         ("grpo_train", GRPO + ["--init", sft, "--out", grpo])):
        argv = " ".join(argv).replace("--lora-rank 4", " ".join(how)).split()
        r = subprocess.run([PY, "-m", f"scripts.{script}", *argv], capture_output=True, text=True, timeout=900,
                           env=env(), cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
    base, _, _ = checkpoint.load_model(path)
    ids = torch.tensor(ref["ids"][:1])
    for run in (sft, grpo):
        model, _, meta = checkpoint.load_model(run)
        assert meta["step"] == 2 and model.config == base.config  # eps and rotary precision carried
        assert bool(lora.lora_modules(model)) == (name != "transformers")
        with torch.no_grad():
            assert not torch.equal(model(ids), base(ids))  # trained, on top of the published weights
    assert tree_digest(PUBLISHED) == before


@needs_fixtures
@pytest.mark.parametrize("field,value", [("rope_parameters", {"rope_theta": 500000.0, "rope_type": "default"}),
                                         ("final_logit_softcapping", 30.0), ("attention_bias", True),
                                         ("intermediate_size", 128), ("hidden_act", "gelu")])
def test_a_transformers_setting_we_cannot_compute_is_one_sentence(field, value, tmp_path, capsys):
    odd = tmp_path / "odd"
    shutil.copytree(PUBLISHED / "hf", odd)
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, field: value}))
    code, err = cli_error("sft_train", SFT + ["--init", str(odd), "--out", str(tmp_path / "o")], capsys)
    lines = err.strip().splitlines()
    key = "rope_theta" if field == "rope_parameters" else field
    assert code == 2 and len(lines) == 1 and f"sets {key}=" in lines[0] and "cannot be loaded exactly" in lines[0]
    assert not (tmp_path / "o").exists()


@needs_fixtures
def test_tied_transformers_embeddings_are_the_lm_head(tmp_path):
    tied = tmp_path / "tied"
    shutil.copytree(PUBLISHED / "hf", tied)
    sd = {k: v for k, v in published.read_safetensors(str(tied / "model.safetensors")).items() if k != "lm_head.weight"}
    write_safetensors(tied / "model.safetensors", sd)  # save_pretrained leaves a tied lm_head out
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    model, _, _ = published.load_hf(str(tied))
    assert torch.equal(model.lm_head.weight, sd["model.embed_tokens.weight"])


def test_model_numerics_round_trip_and_bad_ones_are_one_sentence(tmp_path):
    """Our checkpoints carry norm_eps and rope_dtype; one written before them loads with nanochat's
    defaults; a damaged value is one sentence."""
    model = GPT(GPTConfig(**CFG, norm_eps=1e-6, rope_dtype="float32"))
    checkpoint.save_checkpoint(str(tmp_path / "run"), model, 1)
    again, _, _ = checkpoint.load_model(str(tmp_path / "run"))
    assert again.config == model.config and again.cos.dtype == torch.float32
    old = published.config_from_dict(dict(CFG), "old")
    assert old.norm_eps is None and old.rope_dtype == "bfloat16" and GPT(old).cos.dtype == torch.bfloat16
    for bad in ({"norm_eps": "tiny"}, {"norm_eps": 0}, {"rope_dtype": "float16"}):
        with pytest.raises(UserError, match=f"model settings \\['{next(iter(bad))}'\\] that are out of range"):
            published.config_from_dict({**CFG, **bad}, "cfg")
