"""GRPO on a toy verifiable task ("emit token 3") with a tiny model and no tokenizer:
advantages, the clipped objective's gradients, the k3 KL against the reference, the exact
ratio of the first update, and that reward actually rises (it would not with the advantage
sign or the ratio wrong)."""
import pytest
import torch

from nanostoney import grpo, letters, lora, policy, probes
from nanostoney.gpt import GPT, GPTConfig

V, TARGET = 8, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():  # nanochat's init zeroes these; give the toy a non-trivial start
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.1)
        model.lm_head.weight.normal_(0, 0.3)
    return model


def emit_target(prompt_index, completions):
    """Share of completion tokens equal to TARGET: a verifiable reward in [0, 1]."""
    return [sum(t == TARGET for t in c) / len(c) for c in completions]


def prompts(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[0] + torch.randint(1, V, (3,), generator=g).tolist() for _ in range(n)]


def setup(seed=0, beta=0.0, lr=0.01, **cfg_kw):
    model = tiny(seed)
    lora.apply_lora(model, rank=4, alpha=8, targets=("all", "lm_head"))
    opt = torch.optim.AdamW(lora.lora_parameters(model), lr=lr)
    cfg = grpo.GRPOConfig(group_size=8, max_new_tokens=4, kl_beta=beta, micro_batch=32, **cfg_kw)
    return model, opt, cfg, policy.make_reference(model)


def train(steps, **kw):
    model, opt, cfg, ref = setup(**kw)
    ps = prompts()
    hist = [grpo.grpo_step(model, opt, ps, emit_target, cfg, ref, seed=s)[0] for s in range(steps)]
    return hist, model


# -----------------------------------------------------------------------------
# advantages and the clipped objective


def test_equal_rewards_give_zero_advantages():
    r = torch.tensor([0.5] * 4 + [1.0, 0.0, 1.0, 0.0])
    for std_scaling in (True, False):
        a = grpo.group_advantages(r, 4, std_scaling)
        assert torch.equal(a[:4], torch.zeros(4))
        assert a[4] > 0 and a[5] < 0
    # each group is centred on its own mean, and scaled by its own std when asked
    a = grpo.group_advantages(torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0]), 3, True)
    assert torch.allclose(a[:3], a[3:], atol=1e-3)
    assert torch.allclose(a.view(2, 3).mean(1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(grpo.group_advantages(torch.tensor([1.0, 3.0]), 2, False), torch.tensor([-1.0, 1.0]))


def _grad_at(ratio, adv, eps=0.2):
    old = torch.zeros(1, 1)
    logp = torch.full((1, 1), float(torch.log(torch.tensor(ratio))), requires_grad=True)
    loss, _ = grpo.policy_loss(logp, old, None, torch.tensor([adv]), torch.ones(1, 1), eps, 0.0, "token", 1, 1)
    loss.backward()
    return logp.grad.item()


def test_clip_removes_the_gradient_only_past_the_trust_region_in_the_advantage_direction():
    # A > 0: pushing the ratio up stops at 1 + eps; below 1 - eps the gradient stays (pessimism)
    assert _grad_at(1.5, 1.0) == 0.0
    assert _grad_at(0.5, 1.0) < 0          # loss decreases as logp rises: keep raising it
    assert _grad_at(1.1, 1.0) < 0
    # A < 0: pushing the ratio down stops at 1 - eps; above 1 + eps the gradient stays
    assert _grad_at(0.5, -1.0) == 0.0
    assert _grad_at(1.5, -1.0) > 0
    assert _grad_at(0.9, -1.0) > 0
    # inside the region the gradient is -A * ratio
    assert _grad_at(1.1, 2.0) == pytest.approx(-2.0 * 1.1, rel=1e-5)


def test_k3_is_zero_when_equal_and_positive_otherwise():
    a = torch.tensor([-1.0, -2.0, -0.1])
    assert torch.equal(grpo.kl_k3(a, a), torch.zeros(3))
    assert (grpo.kl_k3(a, a + 0.3) > 0).all() and (grpo.kl_k3(a, a - 0.3) > 0).all()


def test_loss_norms_weigh_tokens_or_sequences():
    # one row of 1 token with loss 1, one of 3 tokens with loss 0 (ratio 1, adv -1 / 0)
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    adv = torch.tensor([-1.0, 0.0])
    tok, _ = grpo.policy_loss(logp, logp.detach(), None, adv, mask, 0.2, 0.0, "token", 4, 2)
    seq, _ = grpo.policy_loss(logp, logp.detach(), None, adv, mask, 0.2, 0.0, "sequence", 4, 2)
    assert tok.item() == pytest.approx(1 / 4)
    assert seq.item() == pytest.approx(1 / 2)


# -----------------------------------------------------------------------------
# log-probs, reference and KL


def test_recomputed_logprobs_match_the_engine_and_the_first_ratio_is_exactly_one():
    model, opt, cfg, ref = setup(inner_epochs=2)
    ro = grpo.sample(model, prompts(), cfg, seed=0)
    grpo.score(ro, emit_target, cfg)
    prep = grpo.prepare(model, ro, cfg, ref)
    # same positions as the cached sampler (an off-by-one here would be far from 1e-4)
    assert prep["engine_gap"] < 1e-4
    upd = grpo.update(model, opt, ro, cfg)
    assert upd["ratio_dev_first"] == 0.0   # old log-probs came from the very same forward
    assert upd["ratio_dev"] > 0.0          # the second inner epoch sees the moved policy


def test_kl_is_exactly_zero_at_the_first_step_and_grows_as_the_policy_moves():
    hist, _ = train(10, beta=0.0)
    kl = [h["kl/mean"] for h in hist]
    assert kl[0] == 0.0
    assert kl[1] > 0.0
    assert sum(kl[-3:]) / 3 > 3 * kl[1]


def test_larger_beta_keeps_kl_smaller():
    free, _ = train(10, beta=0.0)
    tied, _ = train(10, beta=2.0)
    kl_free = sum(h["kl/mean"] for h in free[-4:]) / 4
    kl_tied = sum(h["kl/mean"] for h in tied[-4:]) / 4
    assert kl_tied < 0.5 * kl_free


def test_reference_init_is_the_policy_at_the_start_even_with_trained_adapters():
    model, opt, cfg, _ = setup()
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.add_(0.1 * torch.randn_like(p))
    x = torch.tensor([prompts()[0]])
    start = model(x)
    ref_init = policy.make_reference(model, "init")
    ref_base = policy.make_reference(model, "base")
    grpo.grpo_step(model, opt, prompts(), emit_target, cfg, ref_init, seed=0)
    assert not torch.allclose(model(x), start)
    with ref_init() as r:
        assert torch.equal(r(x), start)
    with ref_base() as r:
        assert not torch.allclose(r(x), start)


# -----------------------------------------------------------------------------
# learning


def test_mean_reward_rises_on_a_verifiable_toy_task():
    # Fails with the advantage sign flipped (reward falls towards 0) or with the ratio wrong
    # (exp(old - new): the gradient points the other way; detached: no gradient at all).
    hist, _ = train(12, beta=0.04)
    first = hist[0]["reward/mean"]
    last = sum(h["reward/mean"] for h in hist[-3:]) / 3
    assert first < 0.5
    assert last > first + 0.3


def test_sequence_norm_and_inner_epochs_also_learn():
    hist, _ = train(10, loss_norm="sequence", inner_epochs=2, std_scaling=False)
    assert sum(h["reward/mean"] for h in hist[-3:]) / 3 > hist[0]["reward/mean"] + 0.3


def test_full_finetune_uses_a_frozen_copy_as_reference():
    model = tiny(0)
    ref = policy.make_reference(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cfg = grpo.GRPOConfig(group_size=8, max_new_tokens=4, kl_beta=0.04, micro_batch=32)
    hist = [grpo.grpo_step(model, opt, prompts(), emit_target, cfg, ref, seed=s)[0] for s in range(6)]
    assert hist[0]["kl/mean"] == 0.0 and hist[-1]["kl/mean"] > 0.0
    assert hist[-1]["reward/mean"] > hist[0]["reward/mean"]


def test_rollouts_run_under_the_configured_autocast():
    """grpo.sample generates inside cfg.autocast (bf16 on CUDA): rollouts are most of a step."""
    import contextlib
    model, _, cfg, _ = setup()
    entered = []

    @contextlib.contextmanager
    def counting():
        entered.append(1)
        yield

    cfg.autocast = counting
    grpo.sample(model, prompts(2), cfg, seed=0)
    assert entered == [1]


def test_attention_entropy_counts_real_tokens_only():
    model = tiny()
    cfg = grpo.GRPOConfig(group_size=2, micro_batch=4)
    ro = grpo.Rollout(prompts=[[0, 1, 2, 3], [0, 5]], completions=[[4, 4, 1], [6]], prompt_index=[0, 1],
                      stopped=[True, True], engine_logprobs=[[0.0] * 3, [0.0]])
    ro.advantages = torch.zeros(2)
    ent = probes.EntropyProbe(1, 2)
    grpo.prepare(model, ro, cfg, None, ent)
    # the same as measuring each row alone (6 and 2 real input tokens), weighted by tokens
    alone = []
    for seq in ([0, 1, 2, 3, 4, 4], [0, 5]):
        with probes.attention_entropy_probe(model) as e:
            model(torch.tensor([seq]))
        alone.append(e.per_layer_head * len(seq))
    assert torch.allclose(ent.per_layer_head, (alone[0] + alone[1]) / 8, atol=1e-5)


def test_letter_slot_and_letter_stats():
    marker = [5, 6]
    assert letters.letter_context([1, 5, 6, 2, 7], marker, (7,)) == (True, [1, 5, 6])       # read in place
    assert letters.letter_context([1, 2, 7], marker, (7,)) == (False, [1, 2, 5, 6])        # forced format
    assert letters.letter_context([1, 5, 6], marker, (7,)) == (False, [1, 5, 6])           # cut after the marker
    # a tokenizer where "Answer: X" is marker + one letter token
    fake = {f"Answer: {L}": [9, 9, i] for i, L in enumerate("ABCDE")}
    assert letters.letter_tokens(fake.get) == ([9, 9], [0, 1, 2, 3, 4])
    model, _, _, ref = setup()
    ids = [1, 2, 3, 4, 5]
    pol, rf = letters.letter_logits(model, ref, [[0, 1, 2], [0, 3]], ids)
    st = letters.letter_summary(pol, rf, [0, 2])
    assert torch.equal(st["kl"], torch.zeros(2))     # policy == reference at the start
    logits = model(torch.tensor([[0, 1, 2]]))[0, -1, ids]
    assert st["margin"][0].item() == pytest.approx((logits[0] - logits[1:].max()).item(), abs=1e-5)
    assert st["pred"][0].item() == logits.argmax().item()
    # the letter logits of rollout rows (own forward of the context) equal the logits that
    # training's packed, right-padded forward of the whole completion computes at that slot
    ro = grpo.Rollout(prompts=[[0, 1], [0, 1]], completions=[[2, 4, 6], [3, 3, 3]], prompt_index=[0, 0],
                      stopped=[False, False], engine_logprobs=[[0.0] * 3] * 2)
    mb = grpo.micro_batches(ro, 4, "cpu")[0]
    packed = policy.completion_logits(model, mb.idx, mb.pos)
    seqs = [ro.prompts[0] + ro.completions[0][:2], ro.prompts[1] + ro.completions[1][:0]]
    pol, rf = letters.letter_logits(model, ref, seqs, ids)
    for row, k in ((0, 2), (1, 0)):
        want = packed[row, k, ids]
        assert torch.allclose(pol[row], want, atol=1e-5)
        assert torch.allclose(rf[row], want, atol=1e-5)   # fresh adapters: ref == policy


# -----------------------------------------------------------------------------
# the scripts, end to end on a tiny checkpoint (aqua_mc: the task that loads fastest)


def byte_tokenizer():
    from nanostoney.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer
    ranks = {bytes([i]): i for i in range(256)}
    return Tokenizer.from_mergeable_ranks(ranks, SPLIT_PATTERN, {s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)})


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    """A base checkpoint and LoRA 'SFT' adapters on it (random weights: shapes are the point)."""
    from nanostoney import checkpoint
    root = tmp_path_factory.mktemp("grpo_scripts")
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=1024, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    base = checkpoint.save_checkpoint(str(root / "base"), model, 1, tokenizer=tok)
    lora.apply_lora(model, rank=2, alpha=4)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.add_(0.01 * torch.randn_like(p))
    sft = checkpoint.save_checkpoint(str(root / "sft"), model, 1, base_checkpoint=base)
    return root, sft


COMMON = ["--tasks", "aqua_mc", "--eval-tasks", "aqua_mc", "--device", "cpu", "--wandb", "disabled",
          "--max-new-tokens", "6"]


def test_grpo_train_script_logs_everything_and_saves_adapters(tiny_sft):
    import json
    import os
    from nanostoney import checkpoint
    from scripts import grpo_train
    root, sft = tiny_sft
    out = str(root / "grpo")
    grpo_train.main(COMMON + ["--init", sft, "--out", out, "--max-train-examples", "4", "--num-iterations", "2",
                              "--prompts-per-step", "2", "--group-size", "2", "--final-eval-examples", "2",
                              "--pass-k", "2", "--rewards", "accuracy=1,format=0.2,repetition=0.1"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    logged = set().union(*(r.keys() for r in rows if r.get("step") == 1))
    for key in ("reward/mean", "reward/std", "reward/accuracy/mean", "reward/format/mean", "reward/repetition/mean",
                "reward/aqua_mc/mean", "kl/mean", "clip_frac", "policy/entropy", "completion/length",
                "attn/entropy/layer_0", "attn/entropy_mean", "letters/kl", "letters/margin", "letters/count_A",
                "letters/aqua_mc/kl", "time/sample_s", "time/score_s", "time/update_s", "time/step_s"):
        assert key in logged, key
    assert [r for r in rows if r.get("step") == 1][0]["kl/mean"] == 0.0  # reference = init policy
    report = json.load(open(os.path.join(out, "grpo_eval.json")))
    assert set(report["start"]["aqua_mc"]) >= {"pass@1", "pass@2", "n"} and "final" in report
    model, tok, _ = checkpoint.load_model(out)      # adapters naming the base: loads stand-alone
    assert lora.lora_modules(model) and tok is not None


def test_grpo_train_rejects_bad_flags_in_one_sentence(tiny_sft):
    from nanostoney.errors import UserError
    from scripts import grpo_train
    root, sft = tiny_sft
    with pytest.raises(UserError, match="unknown reward 'bogus'"):
        grpo_train.main(COMMON + ["--init", sft, "--rewards", "accuracy=1,bogus=2"])
    with pytest.raises(UserError, match="--init"):
        grpo_train.main(COMMON + ["--init", str(root / "missing")])
    with pytest.raises(UserError, match="reward-model"):
        grpo_train.main(COMMON + ["--init", sft, "--rewards", "reward_model=1"])


def test_star_train_script_keeps_correct_rationales_and_fine_tunes_on_them(tiny_sft, monkeypatch):
    import json
    import os
    from nanostoney import star
    from scripts import star_train
    root, sft = tiny_sft
    calls = []
    real_collect = star.collect

    def collect(model, tok, task, examples, args, info, seed, hint=False):
        calls.append(hint)
        real_collect(model, tok, task, examples, args, info, seed, hint)   # sampling runs for real
        # a random tiny model never answers right: pretend prompt 0 was solved, so SFT runs
        return [] if hint else [(0, "<think>x</think>\nAnswer: " + examples[0]["answer"])]

    monkeypatch.setattr(star, "collect", collect)
    out = str(root / "star")
    star_train.main(COMMON + ["--init", sft, "--out", out, "--rounds", "2", "--prompts-per-round", "2",
                              "--samples-per-prompt", "2", "--num-iterations", "1", "--eval-examples", "2",
                              "--rationalize", "--total-batch-size", "2", "--device-batch-size", "2"])
    report = json.load(open(os.path.join(out, "star_eval.json")))
    assert calls == [False, True, False, True]       # each round: sample, then rationalise the failures
    assert [r["kept_total"]["aqua_mc"] for r in report["rounds"]] == [1, 2]
    assert all("accuracy" in r for r in report["rounds"]) and "aqua_mc" in report["start"]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]   # one SFT step per round, in order


# -----------------------------------------------------------------------------
# two ranks with half the groups each take the same step as one process with all of them

DDP_WORKER = '''
import sys, torch
sys.path.insert(0, sys.argv[2])
from test_grpo import fixed_update
import torch.distributed as td
from nanostoney.dist import init_dist, cleanup
info = init_dist(device="cpu")
states = {norm: fixed_update(info.rank, info.world_size, norm) for norm in ("token", "sequence")}
if info.rank == 0:
    torch.save(states, sys.argv[1])
cleanup()
'''


def fixed_update(rank=0, world=1, loss_norm="token"):
    """One prepare + update (2 inner epochs) on a fixed rollout of 4 groups; this rank takes
    groups rank::world. Returns the adapter state after the step."""
    model, _, cfg, ref = setup(beta=0.1, loss_norm=loss_norm, inner_epochs=2)
    opt = torch.optim.SGD(lora.lora_parameters(model), lr=0.5)  # not scale-invariant like Adam:
    cfg.micro_batch = 4                                          # a wrong normaliser shows
    g = torch.Generator().manual_seed(3)
    ps = prompts(4)
    rows = [(i, torch.randint(0, V, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist())
            for i in range(4) for _ in range(cfg.group_size)]
    rewards = torch.rand(len(rows), generator=g).tolist()
    mine = [r for r, (i, _) in enumerate(rows) if i % world == rank]
    ro = grpo.Rollout(prompts=[ps[rows[r][0]] for r in mine], completions=[rows[r][1] for r in mine],
                      prompt_index=[rows[r][0] for r in mine], stopped=[False] * len(mine),
                      engine_logprobs=[[0.0] * len(rows[r][1]) for r in mine])
    grpo.score(ro, lambda pi, c: [rewards[r] for r in mine], cfg)
    grpo.prepare(model, ro, cfg, ref)
    grpo.update(model, opt, ro, cfg)   # normalised by the tokens and rows of all ranks
    return {k: v.clone() for k, v in lora.lora_state_dict(model).items()}


def two_rank_state(tmp_path, worker):
    """Run `worker` (argv: output path, this folder) on 2 gloo ranks; the state dict it saved."""
    import os
    import subprocess
    import sys
    script = tmp_path / "worker.py"
    script.write_text(worker)
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.path.dirname(here) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "state.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(out), here]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return torch.load(out)


def test_two_ranks_take_the_same_step_as_one_process(tmp_path):
    two = two_rank_state(tmp_path, DDP_WORKER)
    start = lora.lora_state_dict(setup()[0])
    for norm in ("token", "sequence"):
        one = fixed_update(loss_norm=norm)
        assert any(not torch.equal(one[k], start[k]) for k in one)   # the step moved something
        for k in one:
            assert torch.allclose(two[norm][k], one[k], atol=1e-6), (norm, k)


# -----------------------------------------------------------------------------
# groups without signal, and the shuffled-reward control


def fixed_rollout(rewards, n_groups=3):
    """A rollout of n_groups groups of G = 8 fixed completions, scored with `rewards`."""
    model, opt, cfg, ref = setup(beta=0.1)
    ps = prompts(n_groups)
    rows = [(i, [1 + (i + j) % (V - 1)] * (1 + j % 3)) for i in range(n_groups) for j in range(cfg.group_size)]
    ro = grpo.Rollout(prompts=[ps[i] for i, _ in rows], completions=[c for _, c in rows],
                      prompt_index=[i for i, _ in rows], stopped=[False] * len(rows),
                      engine_logprobs=[[0.0] * len(c) for _, c in rows])
    grpo.score(ro, lambda pi, c: list(rewards), cfg)
    return model, opt, cfg, ref, ro


def test_groups_whose_rewards_are_all_equal_are_skipped_and_counted():
    G = 8
    rewards = [1.0] * G + [0.0, 1.0] * (G // 2) + [0.0] * G   # group 1 alone has signal
    model, opt, cfg, ref, ro = fixed_rollout(rewards)
    assert ro.keep == list(range(G, 2 * G))
    ro.stats = grpo.prepare(model, ro, cfg, ref)
    assert sorted(r for mb in ro.batches for r in mb.rows) == list(range(G, 2 * G))
    grpo.learn(model, opt, ro, cfg)
    m = grpo.summarize(ro, cfg)
    assert m["groups/skipped"] == 2 and m["groups/skipped_frac"] == pytest.approx(2 / 3)
    assert m["update/skipped"] == 0.0


def test_a_step_where_every_group_is_equal_takes_no_optimizer_step():
    model, opt, cfg, ref, ro = fixed_rollout([0.5] * 24)
    before = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
    opt.param_groups[0]["weight_decay"] = 0.1   # a zero-gradient AdamW step would still move the weights
    ro.stats = grpo.prepare(model, ro, cfg, ref)
    grpo.learn(model, opt, ro, cfg)
    assert ro.keep == [] and grpo.summarize(ro, cfg)["update/skipped"] == 1.0
    after = lora.lora_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_shuffled_rewards_are_a_real_permutation_across_the_batch():
    rewards = [float(r) for r in range(24)]
    _, _, cfg, _, _ = fixed_rollout(rewards)
    cfg.shuffle_rewards = True
    perms = []
    for seed in (0, 1):
        ro = fixed_rollout(rewards)[-1]
        grpo.score(ro, lambda pi, c: list(rewards), cfg, seed=seed)
        assert ro.rewards.tolist() == rewards                        # what is logged: the true rewards
        shuffled = ro.train_rewards.tolist()
        assert sorted(shuffled) == rewards and shuffled != rewards    # a permutation, not the identity
        assert {int(x) // 8 for x in shuffled[:8]} != {0}             # rewards crossed groups
        assert torch.equal(ro.advantages, grpo.group_advantages(ro.train_rewards, 8))
        perms.append(shuffled)
    assert perms[0] != perms[1]                                       # a fresh permutation per step


def test_shuffled_rewards_do_not_teach_the_toy_task():
    """The control: the same run as test_mean_reward_rises_on_a_verifiable_toy_task, with the
    rewards permuted across the batch before the advantages, does not learn it."""
    hist, _ = train(12, beta=0.04, shuffle_rewards=True)
    first = hist[0]["reward/mean"]
    last = sum(h["reward/mean"] for h in hist[-3:]) / 3
    assert all(h["reward/shuffled"] == 1.0 and h["reward/shuffle_moved"] > 0.5 for h in hist)
    assert last < first + 0.15


def test_depth_curriculum_starts_shallow_and_reaches_every_depth():
    from nanostoney.batches import curriculum_stages, depth_curriculum
    exs = [{"id": str(i), "depth": 1 + i % 4} for i in range(40)]
    flat = [{"id": "s" + str(i)} for i in range(5)]
    schedule = [(t, i) for _ in range(40) for t, i in ((0, _ % 40), (1, _ % 5))]  # 2 prompts per step, 40 steps
    cur = depth_curriculum(schedule, [exs, flat], per_step=2, n_steps=40)
    by_step = [max(exs[i]["depth"] for t, i in cur[2 * s:2 * s + 2] if t == 0) for s in range(40)]
    assert by_step[:10] == [1] * 10 and max(by_step[10:20]) == 2 and max(by_step[30:]) == 4
    assert all(d <= 1 + s * 4 // 40 for s, d in enumerate(by_step))             # never deeper than its stage
    assert [x for x in cur if x[0] == 1] == [x for x in schedule if x[0] == 1]   # a flat task is untouched
    assert "depth <= 1" in curriculum_stages(cur, [exs, flat], 2) and "depth <= 4" in curriculum_stages(cur, [exs, flat], 2)


def test_grpo_train_control_run_logs_shuffled_rewards_and_skipped_groups(tiny_sft, capsys):
    import json
    import os
    from scripts import grpo_train
    root, sft = tiny_sft
    out = str(root / "grpo_control")
    grpo_train.main(["--tasks", "arith", "--eval-tasks", "arith", "--device", "cpu", "--wandb", "disabled",
                     "--max-new-tokens", "6", "--init", sft, "--out", out, "--max-train-examples", "8",
                     "--num-iterations", "2", "--prompts-per-step", "2", "--group-size", "2",
                     "--final-eval-examples", "0", "--probe-prompts", "0", "--shuffle-rewards", "--depth-curriculum",
                     "--rewards", "accuracy=1,chain=0.5,format=0.2"])
    plan = capsys.readouterr().out
    assert "REWARDS SHUFFLED" in plan and "depth curriculum: steps 1-1: depth <= 1; steps 2-2: depth <= " in plan
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in rows if "reward/mean" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["reward/shuffled"] == 1.0 and "reward/shuffle_moved" in r and "reward/chain/mean" in r
        assert 0 <= r["groups/skipped"] <= 2 and "update/skipped" in r


def test_grpo_seeds_pools_each_items_change_over_seeds():
    """bench.grpo_seeds: the pooled change is the bootstrap of each item's change averaged over
    seeds; no reward table when the runs measured no training prompts (--probe-prompts 0)."""
    from bench.grpo_seeds import paired_change, summarize

    def run(start, final):
        ids = list(range(len(start)))
        return {"init": "sft", "steps": 3,
                "start": {"arith": {"n": 4, "pass@1": [0.5, 0, 1], "items": {"id": ids, "correct": start}}},
                "final": {"arith": {"n": 4, "pass@1": [0.5, 0, 1], "items": {"id": ids, "correct": final}}}}
    results = {0: run([0, 0, 1, 1], [1, 1, 1, 1]), 1: run([0, 0, 1, 1], [1, 0, 1, 0])}
    ch = paired_change(results, "arith", [0, 1])
    assert ch[0][0] == 0.5 and ch[1][0] == 0.0 and ch["pooled"][0] == 0.25
    md = summarize(results)
    assert "training prompts" not in md and "+0.250" in md
