"""DPO on a tiny model and token ids: the loss is log 2 at the start (reference == policy), its
gradient has the right sign (implicit-reward accuracy rises on a toy preference task, held-out
prompts included), 2 ranks take the step of 1 process, pairs split where the answer starts, and
the script runs end to end (ground-truth and on-policy pairs) and logs what it promises."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from nanostoney import dpo, lora, policy, probes
from test_grpo import V, byte_tokenizer, prompts, tiny, two_rank_state


pytestmark = pytest.mark.usefixtures("one_thread")


GOOD, BAD = 3, 5  # the toy preference: completions of token 3 over completions of token 5


def toy_pairs(n, seed):
    """(prompt, chosen, rejected): 3-token completions, chosen all GOOD, rejected all BAD (with a
    random token mixed in so rows differ)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in prompts(n, seed):
        r = int(torch.randint(0, V, (1,), generator=g))
        out.append((p, [GOOD, GOOD, r], [BAD, BAD, r]))
    return out


def lora_model(seed=0):
    model = tiny(seed)
    lora.apply_lora(model, rank=4, alpha=8, targets=("all", "lm_head"))
    return model


def test_loss_is_log_2_at_the_start_with_fresh_adapters():
    model = lora_model()
    ref = policy.make_reference(model, "init")
    pairs = toy_pairs(6, 1)
    pi_w, pi_l, ref_w, ref_l, kl, tokens = dpo.pair_forward(model, ref, pairs, dpo.DPOConfig(), "cpu")
    assert torch.equal(pi_w.detach(), ref_w) and torch.equal(pi_l.detach(), ref_l)
    loss, st = dpo.dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.1, n_pairs=len(pairs))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert st["margin"] == 0.0 and st["accuracy"] == 0.0 and kl == 0.0 and tokens == 2 * 3 * len(pairs)


def test_loss_is_minus_log_sigmoid_of_beta_times_the_margin():
    pi_w, pi_l = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    ref_w, ref_l = torch.tensor([-1.5, -2.0]), torch.tensor([-2.0, -2.0])
    loss, st = dpo.dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.5, n_pairs=4)
    m = 0.5 * ((pi_w - ref_w) - (pi_l - ref_l))    # [0.75, -0.5]
    want = -torch.nn.functional.logsigmoid(m).sum() / 4
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert st["accuracy"] == 1.0 and st["margin"] == pytest.approx(0.25)


def train(steps, beta=0.1, lr=0.02, seed=0):
    model = lora_model(seed)
    ref = policy.make_reference(model, "init")
    opt = torch.optim.AdamW(lora.lora_parameters(model), lr=lr)
    cfg = dpo.DPOConfig(beta=beta, micro_batch=8)
    pairs = toy_pairs(16, 1)
    hist = [dpo.dpo_step(model, opt, [pairs[:8], pairs[8:]], cfg, ref, n_pairs=16) for _ in range(steps)]
    return model, ref, hist


def test_implicit_reward_accuracy_rises_on_a_toy_preference_task():
    """Fails with the sign of the loss flipped, the reference and policy swapped, or log-probs of
    the wrong tokens (the prompt's instead of the completion's)."""
    model, ref, hist = train(8)
    assert hist[0]["accuracy"] == 0.0 and hist[0]["loss"] / 16 == pytest.approx(math.log(2), abs=1e-5)
    last = hist[-1]
    assert last["accuracy"] / 16 == 1.0 and last["loss"] / 16 < 0.6 and last["margin"] > 0
    # and on held-out prompts the policy now prefers GOOD over BAD more than the reference does
    held = toy_pairs(16, 7)
    pi_w, pi_l, ref_w, ref_l, kl, _ = dpo.pair_forward(model, ref, held, dpo.DPOConfig(), "cpu")
    assert ((pi_w - ref_w) - (pi_l - ref_l) > 0).float().mean().item() == 1.0
    assert kl != 0.0


def test_larger_beta_moves_the_log_ratios_less():
    small = train(6, beta=0.1)[2][-1]
    large = train(6, beta=2.0)[2][-1]
    # implicit margin / beta = the log-ratio margin itself
    assert large["margin"] / 2.0 < small["margin"] / 0.1


def test_full_finetune_uses_a_frozen_copy_and_base_reference_ignores_adapters():
    model = tiny(0)
    ref = policy.make_reference(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pairs = toy_pairs(8, 1)
    first = dpo.dpo_step(model, opt, [pairs], dpo.DPOConfig(), ref, n_pairs=8)
    second = dpo.dpo_step(model, opt, [pairs], dpo.DPOConfig(), ref, n_pairs=8)
    assert first["margin"] == 0.0 and second["margin"] > 0.0


def test_attention_entropy_probe_sees_the_first_micro_batch():
    model = lora_model()
    ref = policy.make_reference(model)
    opt = torch.optim.SGD(lora.lora_parameters(model), lr=0.0)
    ent = probes.EntropyProbe(1, 2)
    dpo.dpo_step(model, opt, [toy_pairs(2, 1)], dpo.DPOConfig(), ref, n_pairs=2, attn_entropy=ent)
    assert ent.per_layer_head.shape == (1, 2) and (ent.per_layer_head > 0).all()


def test_pairs_split_where_the_answer_starts():
    from nanostoney.tasks import get_task
    from nanostoney import reward_model
    tok = byte_tokenizer()
    task = get_task("arith_mc")
    rm_pairs = reward_model.build_pairs(task, tok, "train", max_examples=3)
    pairs = dpo.pairs_from_conversations(rm_pairs)
    for rp, p in zip(rm_pairs, pairs):
        assert p["prompt"] + p["chosen"] == rp["chosen"] and p["prompt"] + p["rejected"] == rp["rejected"]
        assert p["prompt"][-1] == tok.token_id("<|assistant_start|>")
        assert p["chosen"][-1] == tok.token_id("<|assistant_end|>") and p["chosen"] != p["rejected"]
    assert dpo.on_policy_pair(["a", "b", "c"], [False, True, False]) == ("b", "a")
    assert dpo.on_policy_pair(["a", "b"], [True, True]) is None


# -----------------------------------------------------------------------------
# two ranks with half the pairs each take the same step as one process with all of them

DDP_WORKER = '''
import sys, torch
sys.path.insert(0, sys.argv[2])
from test_dpo import fixed_step
from nanostoney.dist import init_dist, cleanup
info = init_dist(device="cpu")
state = fixed_step(info.rank, info.world_size)
if info.rank == 0:
    torch.save(state, sys.argv[1])
cleanup()
'''


def fixed_step(rank=0, world=1):
    """One DPO step (SGD: a wrong normaliser shows) on 6 fixed pairs of mixed lengths; this rank
    takes pairs rank::world, in micro-batches of 2. Returns the adapters after the step."""
    model = lora_model()
    with torch.no_grad():  # adapters as a trained SFT leaves them: reference "init" is a snapshot
        for p in lora.lora_parameters(model):
            p.add_(0.05)
    ref = policy.make_reference(model, "init")
    opt = torch.optim.SGD(lora.lora_parameters(model), lr=0.5)
    g = torch.Generator().manual_seed(3)
    pairs = [(p, torch.randint(0, V, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist(),
              torch.randint(0, V, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist())
             for p in prompts(6, 2)]
    mine = pairs[rank::world]
    dpo.dpo_step(model, opt, [mine[i:i + 2] for i in range(0, len(mine), 2)], dpo.DPOConfig(beta=0.5), ref,
                 n_pairs=len(pairs))
    return {k: v.clone() for k, v in lora.lora_state_dict(model).items()}


def test_two_ranks_take_the_same_step_as_one_process(tmp_path):
    two, one = two_rank_state(tmp_path, DDP_WORKER), fixed_step()
    start = lora.lora_state_dict(lora_model())
    assert any(not torch.equal(one[k], start[k] + 0.05) for k in one)   # the step moved something
    for k in one:
        assert torch.allclose(two[k], one[k], atol=1e-6), k


# -----------------------------------------------------------------------------
# the script, end to end on a tiny checkpoint (arith_mc: generated, with a rationale for every wrong option)

from test_grpo import tiny_sft  # noqa: E402,F401  (the module fixture: base + LoRA "SFT" checkpoints)

ARGS = ["--tasks", "arith_mc", "--eval-tasks", "arith_mc", "--device", "cpu", "--wandb", "disabled",
        "--max-new-tokens", "6", "--max-train-examples", "6", "--eval-pairs", "3", "--final-eval-examples", "2",
        "--num-iterations", "2", "--device-batch-size", "2"]


def test_dpo_train_script_logs_everything_and_saves_adapters(tiny_sft):
    from nanostoney import checkpoint
    from scripts import dpo_train
    root, sft = tiny_sft
    out = str(root / "dpo")
    dpo_train.main(ARGS + ["--init", sft, "--out", out, "--grad-accum-steps", "2"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    first = [r for r in rows if r.get("step") == 1][0]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "kl_proxy",
                "grad_norm", "attn/entropy/layer_0", "attn/entropy_mean", "letters/kl", "letters/arith_mc/margin",
                "letters/arith_mc/argmax_correct", "letters/count_A"):
        assert key in first, key
    # the SFT adapters are the reference (init): the first step starts at log 2 exactly
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["kl_proxy"] == 0.0
    assert first["letters/kl"] == pytest.approx(0.0, abs=1e-7)
    report = json.load(open(os.path.join(out, "dpo_eval.json")))
    for when in ("start", "final"):
        assert report[when]["pairs"]["arith_mc"]["n"] == 3 and report[when]["accuracy"]["arith_mc"]["n"] == 2
    assert report["pairs"]["arith_mc"] == {"ground_truth": 6, "on_policy": 0}
    model, tok, meta = checkpoint.load_model(out)
    assert lora.lora_modules(model) and tok is not None and meta["stage"] == "dpo" and meta["step"] == 2


def test_dpo_train_on_policy_pairs_come_from_the_policys_samples(tiny_sft, monkeypatch):
    from scripts import dpo_train
    from nanostoney.errors import UserError
    root, sft = tiny_sft
    with pytest.raises(UserError, match="no on_policy pairs"):   # a random model is never right
        dpo_train.main(ARGS + ["--init", sft, "--out", str(root / "none"), "--pairs", "on_policy",
                               "--on-policy-prompts", "2", "--samples-per-prompt", "2"])
    seen = []

    def first_two(samples, correct):   # pretend the first sample was right and the second wrong
        seen.append(samples)
        return samples[0], samples[1]

    monkeypatch.setattr(dpo, "on_policy_pair", first_two)
    out = root / "on_policy"
    dpo_train.main(ARGS + ["--init", sft, "--out", str(out), "--pairs", "both", "--on-policy-prompts", "3",
                           "--samples-per-prompt", "2", "--eval-pairs", "0", "--final-eval-examples", "0"])
    report = json.load(open(out / "dpo_eval.json"))
    assert report["pairs"]["arith_mc"] == {"ground_truth": 6, "on_policy": 3} and len(seen) == 3
    assert all(len(s) == 2 and all(1 <= len(c) <= 6 for c in s) for s in seen)   # real samples, <= 6 tokens


@pytest.mark.slow  # 6 tiny training runs and one eval, as subprocesses
def test_method_seeds_bench_compares_star_dpo_grpo_on_the_same_items(tiny_sft, tmp_path):
    root, sft = tiny_sft
    ev = "--eval-tasks arith_mc --max-new-tokens 4 "
    cmd = [sys.executable, "-m", "bench.method_seeds", "--init", sft, "--out", str(tmp_path / "m"), "--seeds", "0", "1",
           "--tasks", "arith_mc", "--max-examples", "3", "--max-new-tokens", "4", "--threads", "1",
           "--star", ev + "--rounds 1 --prompts-per-round 2 --samples-per-prompt 2 --num-iterations 1 --eval-examples 1",
           "--dpo", ev + "--max-train-examples 4 --num-iterations 1 --device-batch-size 2 --eval-pairs 0 "
                         "--final-eval-examples 0",
           "--grpo", ev + "--max-train-examples 4 --num-iterations 1 --prompts-per-rank 1 --group-size 2 "
                          "--final-eval-examples 0 --probe-prompts 0"]
    root_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=root_dir)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env, cwd=root_dir)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.load(open(tmp_path / "m" / "eval.json"))
    assert set(results["checkpoints"]) == {"sft"} | {f"{m}_{s}" for m in ("star", "dpo", "grpo") for s in (0, 1)}
    rows = json.load(open(tmp_path / "m" / "summary.json"))["rows"]
    pairs = [("star", "sft"), ("dpo", "sft"), ("grpo", "sft"), ("star", "dpo"), ("star", "grpo"), ("dpo", "grpo")]
    assert [(r["metric"], r["a"], r["b"]) for r in rows] == [(m, a, b) for m in ("greedy", "cloze") for a, b in pairs]
    assert all(r["n"] == 3 and r["lo"] <= r["diff"] <= r["hi"] and r["p_holm"] >= r["p"] for r in rows)
    summary = (tmp_path / "m" / "summary.md").read_text()
    assert "| arith_mc | greedy | dpo - sft | 3 |" in summary and "| arith_mc | cloze | dpo - sft | 3 |" in summary
