"""Evaluate a model on a task (batched generation, then metrics) and on held-out text (bpb, masked loss).

Every metric has a 95% bootstrap interval over examples: accuracy (greedy), cloze (nanostoney.cloze),
answered ("Answer:" line), pass@k, and for open answers chrF++, MAUVE (sampled vs gold turns) and
COMET (no interval). Batch b samples with seed + b, so 1 process and torchrun agree. MAUVE's k-means
runs on one thread: fights with torch's OpenMP threads made it slow, and one is reproducible.
"""
import contextlib
import math
import os
import re
import sys
from types import SimpleNamespace

import numpy as np
import torch

from nanostoney.answers import answer_after, answer_part, parse_letter, rationale_part
from nanostoney.batches import collate
from nanostoney.dist import all_reduce_sum, autocast_ctx, map_over_ranks
from nanostoney.engine import Engine
from nanostoney.errors import UserError
from nanostoney.gpt import unwrap
from nanostoney.metrics import (bootstrap_ci, chrf_pp_ci, comet_score, eval_mode, mauve_score, pass_at_k,
                                pass_at_k_by_task)
from nanostoney.published import resolve
from nanostoney.rewards import CHAIN_ERRORS, chain_error, gold_lines
from nanostoney.tasks.base import stable_hash

# task -> what chrF++ compares: the open answer vs example["answer"], or the <think> reasoning vs the gold's
OPEN_TEXT = {"stoney_qa": "answer", "stoney_lexicon": "answer", "gsm8k": "rationale",
             "stoney_qa_unseen": "answer", "stoney_lexicon_unseen": "answer"}
N_SHOWN = 3  # completions kept verbatim in the results, per task
ONE_PROCESS = SimpleNamespace(rank=0, world_size=1, autocast_dtype=None)  # info=None: this process alone


def task_seed(seed, task_name):
    """Seed of one task's sampling: adding a task does not change another task's numbers."""
    return stable_hash(f"{seed}/{task_name}") % (2 ** 31)


def powers_of_two(n):
    """1, 2, 4, ... up to n (and n itself when it is not a power of two)."""
    ks = [2 ** i for i in range(n.bit_length())]
    return ks + [n] if ks and ks[-1] != n else ks


@torch.no_grad()
def generate_completions(model, tokenizer, prompts, info=None, num_samples=1, temperature=0.0,
                         top_k=None, max_new_tokens=256, seed=0, batch_size=32, desc=None):
    """[[num_samples completions] per prompt] on every rank; batch b samples with seed + b."""
    from tqdm import tqdm  # lazy: the core path imports with torch, numpy and tokenizers only
    model, info = unwrap(model), info or ONE_PROCESS
    engine = Engine(model, tokenizer)
    stops = set(engine.stop_ids)
    positions = model.cos.size(1)
    longest = max((len(p) for p in prompts), default=0)
    if positions - longest < 1:  # checked up front: every rank stops, none waits in the gather
        raise UserError(f"a prompt of {longest} tokens leaves no room in the model's {positions} "
                        f"positions; evaluate a model with a longer sequence_len.")
    per = max(1, batch_size // max(1, num_samples))
    batches = [prompts[i:i + per] for i in range(0, len(prompts), per)]

    def generate(b):
        chunk = batches[b]
        n_new = min(max_new_tokens, positions - max(len(p) for p in chunk))
        with autocast_ctx(info):
            out = engine.generate(chunk, n_new, temperature=temperature, top_k=top_k, seed=seed + b,
                                  num_samples=num_samples)
        texts = [tokenizer.decode(t[:-1] if t and t[-1] in stops else t) for t in out.tokens]
        return [texts[j * num_samples:(j + 1) * num_samples] for j in range(len(chunk))]

    with eval_mode(model):
        done = map_over_ranks(generate, list(range(len(batches))), info,
                              wrap=lambda idx: tqdm(idx, desc=desc, disable=info.rank != 0, leave=False))
    return [c for part in done for c in part]


def length_budget(tokenizer, examples, max_new_tokens, margin=16):
    """New tokens allowed on a task: its longest reference plus a margin, at most max_new_tokens."""
    longest = max(len(tokenizer.encode(ex["messages"][-1]["content"])) for ex in examples)
    return max(1, min(max_new_tokens, longest + margin))


def complete_task(model, tokenizer, task, examples, info=None, num_samples=0, temperature=1.0,
                  top_k=None, max_new_tokens=256, seed=0, batch_size=32):
    """(greedy [str], sampled [[str] * num_samples]) per example, within length_budget."""
    prompts = [tokenizer.render_prompt({"messages": task.prompt(ex)}) for ex in examples]
    max_new_tokens = length_budget(tokenizer, examples, max_new_tokens)
    greedy = [g[0] for g in generate_completions(model, tokenizer, prompts, info, 1, 0.0, None, max_new_tokens,
                                                 0, batch_size, desc=f"{task.name} greedy")]
    if num_samples <= 0:
        return greedy, [[] for _ in examples]
    sampled = generate_completions(model, tokenizer, prompts, info, num_samples, temperature, top_k,
                                   max_new_tokens, task_seed(seed, task.name), batch_size,
                                   desc=f"{task.name} x{num_samples}")
    return greedy, sampled


def open_pair(task, example, completion):
    """(hypothesis, reference) for chrF++ of an open-answer task."""
    if OPEN_TEXT[task.name] == "answer":
        return answer_part(completion), example["answer"]
    return rationale_part(completion), rationale_part(example["messages"][-1]["content"])


# -----------------------------------------------------------------------------
# metrics with intervals

def _ci(point, lo, hi):
    return {"value": float(point), "ci95": [float(lo), float(hi)]}


def mean_ci(values, n_boot=1000, seed=0):
    """{"value", "ci95"}: the mean of 0/1 (or any) values and its bootstrap interval."""
    return _ci(*bootstrap_ci(np.array(values, dtype=float), n_boot=n_boot, seed=seed))


@contextlib.contextmanager
def _mauve_quietly():
    """One BLAS/OpenMP thread, and faiss's C-level warnings (one per k-means fit) off the terminal."""
    # lazy (heavy, eval only); importing mauve loads faiss and OpenBLAS, so the limit reaches them
    import mauve  # noqa: F401
    from threadpoolctl import threadpool_limits
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def mauve_with_ci(p_features, q_features, n_boot=100, seed=0):
    """MAUVE between paired feature rows, with a bootstrap over pairs (n_boot k-means fits)."""
    p, q = np.asarray(p_features), np.asarray(q_features)
    with _mauve_quietly():
        return bootstrap_ci(np.arange(len(p)), stat=lambda i: mauve_score(p[i], q[i], seed=seed),
                            n_boot=n_boot, seed=seed)


def by_field(examples, correct, field, n_boot=1000, seed=0):
    """{value: {"n", "accuracy": {"value", "ci95"}}} over the examples that record `field` (arith's
    "depth", the lexicon's "direction"), else {}."""
    out = {}
    for v in sorted({str(ex[field]) for ex in examples if ex.get(field)}):
        c = [x for ex, x in zip(examples, correct) if str(ex.get(field)) == v]
        out[v] = {"n": len(c), "accuracy": mean_ci(c, n_boot, seed)}
    return out


def score_task(task, examples, greedy, sampled, featurize=None, n_boot=1000, mauve_boot=100, seed=0,
               comet=True, comet_model=None, cloze=None):
    """(result, notes) of one task; cloze: 0/1 per MC example; featurize: texts -> MAUVE features."""
    notes = []
    correct = [int(bool(task.evaluate(ex, c))) for ex, c in zip(examples, greedy)]
    metrics = {"accuracy": mean_ci(correct, n_boot, seed)}
    if task.name not in ("stoney_qa", "stoney_qa_unseen"):  # their references have no "Answer:"
        metrics["answered"] = mean_ci([answer_after(c) is not None for c in greedy], n_boot, seed)
    if cloze is not None:
        metrics["cloze"] = mean_ci(cloze, n_boot, seed)
    if task.kind == "numeric" and any(gold_lines(ex) for ex in examples):
        # where the written chains first go wrong: misreading the question vs wrong arithmetic
        errors = [chain_error(ex, c) for ex, c in zip(examples, greedy)]
        for kind in CHAIN_ERRORS:
            metrics[f"first error: {kind}"] = mean_ci([e == kind for e in errors], n_boot, seed)
    n_samples = len(sampled[0]) if sampled else 0
    sample_correct = [[bool(task.evaluate(ex, c)) for c in cs] for ex, cs in zip(examples, sampled)]
    if n_samples:
        entry = pass_at_k_by_task({task.name: sample_correct}, powers_of_two(n_samples),
                                  n_boot=n_boot, seed=seed)[task.name]
        for k in powers_of_two(n_samples):
            metrics[f"pass@{k}"] = _ci(*entry[f"pass@{k}"])
    if task.name in OPEN_TEXT:
        hyps, refs = zip(*[open_pair(task, ex, c) for ex, c in zip(examples, greedy)])
        metrics["chrf++"] = _ci(*chrf_pp_ci(hyps, refs, n_boot=n_boot, seed=seed))
        if featurize is not None and len(examples) >= 2:
            model_texts = [cs[0] for cs in sampled] if n_samples else list(greedy)
            gold_texts = [ex["messages"][-1]["content"] for ex in examples]
            p, q = featurize(model_texts), featurize(gold_texts)
            metrics["mauve"] = _ci(*mauve_with_ci(p, q, n_boot=mauve_boot, seed=seed))
        elif featurize is not None:
            notes.append(f"MAUVE skipped for {task.name}: it needs at least 2 examples.")
        if comet:
            srcs = [ex["messages"][-2]["content"] for ex in examples]
            score, why = comet_score(srcs, list(hyps), list(refs), model_path=comet_model,
                                     gpus=1 if torch.cuda.is_available() else 0)
            if score is None:
                notes.append(why)
            else:
                metrics["comet"] = {"value": score, "ci95": None}
    return {"family": task.family, "control": task.control, "kind": task.kind, "n": len(examples),
           "n_samples": n_samples, "metrics": metrics, "by_depth": by_field(examples, correct, "depth", n_boot, seed),
           "by_direction": by_field(examples, correct, "direction", n_boot, seed),
           "per_example": {"id": [ex["id"] for ex in examples], "correct": correct,
                           "n_correct_samples": [sum(s) for s in sample_correct],
                           **({"cloze": list(cloze)} if cloze is not None else {})},
           "samples": [{"id": ex["id"], "prompt": ex["messages"][-2]["content"],
                        "reference": ex["messages"][-1]["content"], "greedy": g, "sampled": list(cs)}
                       for ex, g, cs in list(zip(examples, greedy, sampled))[:N_SHOWN]]}, notes


def family_metrics(task_results, n_boot=1000, seed=0):
    """Metrics pooled over the examples of each family's tasks, the controls apart ("<family> control")."""
    out = {}

    def group(r):
        return r["family"] + (" control" if r.get("control") else "")
    for family in sorted({group(r) for r in task_results.values()}):
        members = [t for t, r in task_results.items() if group(r) == family]
        correct = [c for t in members for c in task_results[t]["per_example"]["correct"]]
        entry = {"tasks": members, "n": len(correct), "metrics": {"accuracy": mean_ci(correct, n_boot, seed)}}
        cloze = [task_results[t]["per_example"].get("cloze") for t in members]
        if all(c is not None for c in cloze):  # every member multiple choice
            entry["metrics"]["cloze"] = mean_ci([x for c in cloze for x in c], n_boot, seed)
        ns = {task_results[t]["n_samples"] for t in members}
        if len(ns) == 1 and (n := ns.pop()) > 0:
            counts = [c for t in members for c in task_results[t]["per_example"]["n_correct_samples"]]
            for k in powers_of_two(n):
                values = np.array([pass_at_k(n, c, k) for c in counts])
                entry["metrics"][f"pass@{k}"] = _ci(*bootstrap_ci(values, n_boot=n_boot, seed=seed))
        out[family] = entry
    return out


# -----------------------------------------------------------------------------
# during training: accuracy on chat tasks, bits per byte, masked loss

def task_accuracy(model, tokenizer, task, examples, info, max_new_tokens=256, batch_size=16, texts=None):
    """[0/1 per example] of greedy completions on every rank; `texts` receives the completions."""
    if not examples:
        return []
    prompts = [tokenizer.render_prompt({"messages": task.prompt(ex)}) for ex in examples]
    got = generate_completions(model, tokenizer, prompts, info, max_new_tokens=length_budget(
        tokenizer, examples, max_new_tokens), batch_size=batch_size, desc=f"eval {task.name}")
    if texts is not None:
        texts.extend(t[0] for t in got)
    return [int(bool(task.evaluate(ex, t[0]))) for ex, t in zip(examples, got)]


def letter_answer(text):
    """Is the answer a bare option letter ("C", "(C)")? (an open question answered as multiple choice)"""
    answer = answer_after(text)
    return answer is not None and parse_letter(answer) is not None and len(answer.strip(" ()[]*.:")) == 1


def accuracy_table(model, tokenizer, item_sets, info, max_new_tokens=256, seed=0):
    """{(task name, split): {"n", "accuracy", "ci95", ...}} for {(task, split): examples}."""
    table = {}
    for (task, split), exs in item_sets.items():
        texts = []
        correct = task_accuracy(model, tokenizer, task, exs, info, max_new_tokens, texts=texts)
        point, lo, hi = bootstrap_ci([float(c) for c in correct], seed=seed) if correct else (float("nan"),) * 3
        n = max(1, len(texts))
        table[(task.name, split)] = {"n": len(correct), "accuracy": point, "ci95": [lo, hi], "correct": correct,
                                     "by_depth": by_field(exs, correct, "depth", seed=seed),
                                     "answered": sum(answer_after(t) is not None for t in texts) / n,
                                     "letter_answers": sum(letter_answer(t) for t in texts) / n}
    return table


def token_byte_lengths(tokenizer, device="cpu"):
    """LongTensor: UTF-8 bytes of text each token id stands for; 0 for special tokens."""
    return torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.long, device=device)


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes, info):
    """Bits per byte of the (x, y) batches' targets, all ranks; 0-byte and ignored targets left out."""
    stats = torch.zeros(2, dtype=torch.float64, device=info.device)  # nats, bytes
    with eval_mode(model):
        for x, y in batches:
            with autocast_ctx(info):
                loss = model(x, y, loss_reduction="none").reshape(-1).double()
            y = y.reshape(-1)
            counted = token_bytes[y.clamp(min=0)] * (y >= 0)
            stats += torch.stack([(loss * (counted > 0)).sum(), counted.sum().double()])
    nats, nbytes = all_reduce_sum(stats).tolist()
    return float("nan") if nbytes == 0 else nats / (math.log(2) * nbytes)


@torch.no_grad()
def masked_loss(model, rows, pad_id, info, batch_size=16):
    """Mean loss (nats/token) over the assistant tokens of (ids, mask) rows, all ranks together."""
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    mine = rows[info.rank::info.world_size]
    with eval_mode(model):
        for i in range(0, len(mine), batch_size):
            x, y = collate(mine[i:i + batch_size], pad_id, info.device)
            with autocast_ctx(info):
                loss = model(x, y, loss_reduction="sum")
            total += torch.stack([loss.double(), (y >= 0).sum().double()])
    all_reduce_sum(total)
    return (total[0] / total[1].clamp(min=1)).item()


def named_checkpoints(specs):
    """{name: local path} of NAME=PATH or PATH (named by its folder, a step dir "base@60") arguments."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or os.sep in name:
            norm = os.path.normpath(spec)
            base, path = os.path.basename(norm), spec
            if re.fullmatch(r"step_\d+", base):
                base = f"{os.path.basename(os.path.dirname(os.path.abspath(norm)))}@{int(base[5:])}"
            name, i = base, 2
            while name in out:
                name, i = f"{base}-{i}", i + 1
        elif not name or not path:
            raise UserError(f"checkpoint {spec!r} is malformed; write NAME=PATH.")
        elif name in out:
            raise UserError(f"checkpoint name {name!r} is given twice; give each checkpoint its own name.")
        path = resolve(os.path.expanduser(path))
        if not os.path.exists(path):
            raise UserError(f"checkpoint {name} = {path} does not exist; pass a checkpoint directory (a run dir, "
                            f"step dir, LoRA adapter dir, nanochat or transformers dir) or hf:OWNER/NAME.")
        out[name] = path
    return out
