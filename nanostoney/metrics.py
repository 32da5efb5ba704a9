"""Evaluation metrics that work offline: pass@k, bootstrap intervals, chrF, MAUVE, COMET.

scripts/eval.py builds its table from these, the interpretability report its intervals
(bootstrap_means) and the Stoney tasks their verifier (sentence_chrf). Every metric is
deterministic given its inputs (and seed), so two evaluations of one checkpoint agree to the
last digit. sacrebleu, mauve and comet are imported inside the functions that use them: the
core training path imports nothing beyond torch/numpy/tokenizers.

MAUVE never featurises text itself here: the features come from `model_features` (a nanostoney
GPT we have on disk), because mauve's own featuriser downloads gpt2-large from the Hub.
"""
import functools
import importlib.util
import os
import warnings

import numpy as np
import torch

from nanostoney.errors import UserError
from nanostoney.gpt import norm, unwrap


# -----------------------------------------------------------------------------
# pass@k

def pass_at_k(n, c, k):
    """Unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained
    on Code", eq. 1): the chance that at least one of k samples drawn without replacement from
    n samples, c of them correct, is correct: 1 - C(n-c, k) / C(n, k).
    Computed as a running product, which avoids the huge binomials for large n."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_by_task(correct_by_task, ks, n_boot=1000, seed=0, alpha=0.05):
    """Per-task pass@k with bootstrap intervals over problems.

    correct_by_task: {task_name: [[bool per sample] per problem]} (every problem of a task
    has the same number of samples n; k values above n are skipped for that task).
    Returns {task_name: {"n_problems": P, "n_samples": n, "pass@k": (point, lo, hi), ...}}.
    The point is the mean over problems of the per-problem unbiased estimate; the interval
    resamples problems, since problems, not samples, are the unit that varies between runs.
    """
    table = {}
    for name, rows in correct_by_task.items():
        if not rows:
            raise UserError(f"task {name!r} has no evaluated problems; check its split and --max-problems.")
        n = len(rows[0])
        if n == 0 or any(len(r) != n for r in rows):
            raise ValueError(f"task {name!r}: every problem needs the same, non-zero number of samples")
        counts = [int(sum(bool(x) for x in r)) for r in rows]
        entry = {"n_problems": len(rows), "n_samples": n}
        for k in ks:
            if k > n:
                continue
            values = np.array([pass_at_k(n, c, k) for c in counts])
            entry[f"pass@{k}"] = bootstrap_ci(values, n_boot=n_boot, seed=seed, alpha=alpha)
        table[name] = entry
    return table


# -----------------------------------------------------------------------------
# bootstrap

def resample(n, n_boot, seed):
    """Indices (n_boot, n) of n_boot resamples with replacement of n items: numpy's Generator
    seeded with `seed`, so every interval built on them is the same on every run."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_ci(values, stat=np.mean, n_boot=1000, seed=0, alpha=0.05):
    """(point, lo, hi): stat(values) and its percentile-bootstrap (1 - alpha) interval.

    Resamples `values` (a sequence, or an array whose first axis is the items) n_boot times.
    `stat` receives a resampled array (e.g. np.mean, np.median, or a function of index arrays
    for corpus-level metrics: pass np.arange(N) as values).
    The interval is widened to include the point if needed: with a handful of items the
    percentile interval of a skewed statistic can miss its own point estimate, and a table
    should never show that.
    """
    values = np.asarray(values)
    if values.shape[0] == 0:
        raise UserError("bootstrap_ci got no values; evaluate at least one example.")
    point = float(stat(values))
    idx = resample(values.shape[0], n_boot, seed)
    if stat is np.mean and values.ndim == 1:
        boots = values[idx].mean(axis=1)  # vectorised fast path for the common case
    else:
        boots = np.array([float(stat(values[i])) for i in idx])
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return point, float(min(lo, point)), float(max(hi, point))


def bootstrap_means(values, n_boot=1000, seed=0, alpha=0.05):
    """bootstrap_ci of the mean for every entry of values [N, ...] at once (the same resamples
    of the N items for all entries): (point, lo, hi) arrays of shape values.shape[1:]. A NaN
    entry (a statistic undefined for an example) is left out of that entry's mean. Resampled
    means are one product of resample counts (n_boot, N) with the values, so memory does not
    grow with n_boot x N x entries."""
    v = np.asarray(values, dtype=np.float64)
    n = v.shape[0]
    flat = v.reshape(n, -1)
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.arange(n_boot)[:, None], resample(n, n_boot, seed)), 1.0)
    ok = ~np.isnan(flat)
    x = np.where(ok, flat, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        point = x.sum(0) / ok.sum(0)
        boots = (counts @ x) / (counts @ ok)
    with warnings.catch_warnings():  # an entry undefined for every example stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanquantile(boots, [alpha / 2, 1 - alpha / 2], axis=0) if n_boot else (point, point)
    lo, hi = np.fmin(lo, point), np.fmax(hi, point)
    return point.reshape(v.shape[1:]), lo.reshape(v.shape[1:]), hi.reshape(v.shape[1:])


# -----------------------------------------------------------------------------
# tests of a difference of means, and the correction for testing many of them

def mean_difference(a, b=None, paired=False, n_boot=10000, n_perm=9999, seed=0, alpha=0.05):
    """A difference of means with its percentile-bootstrap (1 - alpha) interval and a two-sided
    permutation p-value: {"diff", "lo", "hi", "p", "n"}.

    b None: is mean(a) zero? (one sample, tested by sign flips). paired: mean(a - b) over pairs
    (a[i] and b[i] are one item measured twice), resampling pairs and flipping signs of a - b.
    Otherwise two independent samples: mean(a) - mean(b), each resampled on its own, the labels
    shuffled for the test. NaN values are left out (pairs with a NaN side as a whole).
    p = (1 + #{|T*| >= |T|}) / (1 + n_perm): never 0, exact under exchangeability; the smallest
    reachable p is 1 / (1 + n_perm), so n_perm must be large when many tests are corrected.
    """
    a = np.asarray(a, dtype=np.float64)
    if b is not None and paired:
        b = np.asarray(b, dtype=np.float64)
        a, b = a - b, None
    a = a[~np.isnan(a)]
    rng = np.random.default_rng(seed)
    if b is None:
        if a.size == 0:
            return None
        boots = a[rng.integers(0, a.size, (n_boot, a.size))].mean(1)
        t = abs(a.mean())
        flips = rng.choice(np.array([-1.0, 1.0]), (n_perm, a.size))
        t_null = np.abs(flips @ a) / a.size
        diff, n = float(a.mean()), int(a.size)
    else:
        b = np.asarray(b, dtype=np.float64)
        b = b[~np.isnan(b)]
        if a.size == 0 or b.size == 0:
            return None
        boots = (a[rng.integers(0, a.size, (n_boot, a.size))].mean(1)
                 - b[rng.integers(0, b.size, (n_boot, b.size))].mean(1))
        both = np.concatenate([a, b])
        t = abs(a.mean() - b.mean())
        perm = rng.permuted(np.broadcast_to(both, (n_perm, both.size)), axis=1)
        t_null = np.abs(perm[:, :a.size].mean(1) - perm[:, a.size:].mean(1))
        diff, n = float(a.mean() - b.mean()), [int(a.size), int(b.size)]
    p = (1 + int((t_null >= t - 1e-12 * max(1.0, t)).sum())) / (1 + n_perm)  # ties count against us
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return {"diff": diff, "lo": float(min(lo, diff)), "hi": float(max(hi, diff)), "p": float(p), "n": n}


def holm(pvalues):
    """Holm-Bonferroni adjusted p-values (same order as given): the k-th smallest p times
    (m - k + 1), made non-decreasing in that order and capped at 1. Rejecting every hypothesis
    whose adjusted p is below alpha keeps the chance of any false rejection among all m at
    most alpha, whatever their dependence."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adj = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


# -----------------------------------------------------------------------------
# chrF and chrF++

@functools.lru_cache(maxsize=None)
def _chrf(word_order):
    from sacrebleu.metrics import CHRF  # lazy: the core training path must not need sacrebleu
    return CHRF(word_order=word_order)


def sentence_chrf(hypothesis, reference, word_order=0):
    """sacrebleu's sentence chrF (character 1..6-grams, beta 2; word_order=2 is chrF++) of one
    hypothesis against one reference, on its 0-100 scale."""
    return _chrf(word_order).sentence_score(hypothesis, [reference]).score


def _chrf_pp_stats(hyps, refs, who):
    """chrF++ n-gram statistics (N, n_stats) of hypothesis/reference pairs."""
    hyps, refs = list(hyps), list(refs)
    if len(hyps) != len(refs):
        raise ValueError(f"{who} got {len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise UserError(f"{who} got no hypotheses; evaluate at least one open-answer example.")
    return np.array(_chrf(2)._extract_corpus_statistics(hyps, [refs]))


def chrf_pp(hyps, refs):
    """chrF++ (sacrebleu CHRF, char order 6, word order 2) with one reference per hypothesis.
    Returns (corpus_score, sentence_scores), both on sacrebleu's 0-100 scale.
    The corpus score pools n-gram statistics over all pairs (not the mean of sentences)."""
    stats = _chrf_pp_stats(hyps, refs, "chrf_pp")
    score = _chrf(2)._compute_score_from_stats
    return score(stats.sum(axis=0).tolist()).score, [score(row.tolist()).score for row in stats]


def chrf_pp_ci(hyps, refs, n_boot=1000, seed=0, alpha=0.05):
    """(point, lo, hi): corpus chrF++ and its bootstrap interval over sentence pairs.
    Per-pair n-gram statistics are extracted once and the resamples only re-sum them
    (sacrebleu's own bootstrap does the same, through these two semi-private methods), so
    1000 resamples cost about as much as one corpus score."""
    stats = _chrf_pp_stats(hyps, refs, "chrf_pp_ci")

    def corpus(idx):
        return _chrf(2)._compute_score_from_stats(stats[idx].sum(axis=0).tolist()).score
    return bootstrap_ci(np.arange(len(stats)), stat=corpus, n_boot=n_boot, seed=seed, alpha=alpha)


# -----------------------------------------------------------------------------
# MAUVE

def mauve_score(p_features, q_features, seed=0, num_buckets="auto", kmeans_num_redo=5,
                kmeans_max_iter=500, pca_max_data=-1, kmeans_explained_var=0.9,
                mauve_scaling_factor=5):
    """MAUVE (Pillutla et al. 2021) between two samples of texts given as feature arrays.

    p_features, q_features: (n, d) arrays, e.g. from `model_features` for model completions
    and for references. Returns the MAUVE score in (0, 1]; higher = closer distributions.
    num_buckets="auto" uses n/10 clusters (mauve's default). The k-means is seeded, so a
    given seed and features give the same number every run. Features are always passed in,
    so mauve never loads (or downloads) its own featuriser; HF_HUB_OFFLINE is set anyway.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    p, q = np.asarray(p_features, dtype=np.float32), np.asarray(q_features, dtype=np.float32)
    for name, f in (("p_features", p), ("q_features", q)):
        if f.ndim != 2 or f.shape[0] < 2:
            raise UserError(f"mauve_score needs {name} as an (n >= 2, d) array, got shape "
                            f"{f.shape}; featurise at least two texts.")
    if p.shape[1] != q.shape[1]:
        raise UserError(f"mauve_score needs features of one width, got {p.shape[1]} and "
                        f"{q.shape[1]}; featurise both samples with the same model.")
    from mauve import compute_mauve  # lazy: heavy (faiss, sklearn), only the eval stage needs it
    out = compute_mauve(p_features=p, q_features=q, num_buckets=num_buckets,
                        pca_max_data=pca_max_data, kmeans_explained_var=kmeans_explained_var,
                        kmeans_num_redo=kmeans_num_redo, kmeans_max_iter=kmeans_max_iter,
                        mauve_scaling_factor=mauve_scaling_factor, seed=seed, verbose=False)
    return float(out.mauve)


def model_features(model, tokenizer, texts, device=None, pool="mean", batch_size=16,
                   max_tokens=None):
    """Featurise texts with a nanostoney GPT: its final hidden state after the final norm
    (the input of lm_head), mean-pooled over tokens (pool="mean") or at the last token
    (pool="last", what MAUVE's paper does with GPT-2). Returns a float32 (N, n_embd) array.

    device defaults to the model's. Each text is encoded as <|bos|> + tokens and truncated to max_tokens (default the model's
    sequence_len). Batches are right-padded: the model is causal, so padding after a text
    never changes that text's hidden states, and pooling only reads its real positions.
    The features are norm(model.trunk(ids)): the same tensor lm_head reads, without paying
    for the vocabulary-sized logits. LoRA adapters, if applied, are active (they are part of
    the evaluated model).
    """
    model = unwrap(model)
    device = device or model.get_device()
    if pool not in ("mean", "last"):
        raise UserError(f"model_features pool must be 'mean' or 'last', got {pool!r}.")
    if len(texts) == 0:
        raise UserError("model_features got no texts; there is nothing to featurise.")
    max_tokens = max_tokens or model.config.sequence_len
    seqs = [([tokenizer.bos_id] + tokenizer.encode(t))[:max_tokens] for t in texts]
    feats = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(seqs), batch_size):
                chunk = seqs[i:i + batch_size]
                lens = torch.tensor([len(s) for s in chunk], device=device)
                T = int(lens.max())
                idx = torch.zeros(len(chunk), T, dtype=torch.long, device=device)
                for j, s in enumerate(chunk):
                    idx[j, :len(s)] = torch.tensor(s, dtype=torch.long, device=device)
                h = norm(model.trunk(idx)).float()  # (B, T, C)
                if pool == "mean":
                    valid = (torch.arange(T, device=device)[None, :] < lens[:, None]).float()
                    f = (h * valid[..., None]).sum(1) / lens[:, None].float()
                else:
                    f = h[torch.arange(len(chunk), device=device), lens - 1]
                feats.append(f.cpu())
    finally:
        model.train(was_training)
    return torch.cat(feats).numpy().astype(np.float32)


# -----------------------------------------------------------------------------
# COMET (optional)

COMET_MODEL = "Unbabel/wmt22-comet-da"


def _local_comet_checkpoint(model_path):
    """Path of a COMET checkpoint on disk, or None. Never touches the network."""
    if model_path:
        p = os.path.join(model_path, "checkpoints", "model.ckpt") if os.path.isdir(model_path) else model_path
        return p if os.path.isfile(p) else None
    try:
        from huggingface_hub import snapshot_download  # lazy: only when COMET is asked for
        d = snapshot_download(COMET_MODEL, local_files_only=True)
    except Exception:  # not in the local cache (or huggingface_hub absent)
        return None
    p = os.path.join(d, "checkpoints", "model.ckpt")
    return p if os.path.isfile(p) else None


def comet_score(srcs, hyps, refs, model_path=None, batch_size=8, gpus=0):
    """(score, reason): COMET system score when the unbabel-comet package and a checkpoint
    are on this machine, else (None, one sentence saying what is missing). Never downloads:
    model_path is a local checkpoint (file or model dir); without it the Hugging Face cache is
    searched offline for Unbabel/wmt22-comet-da."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if importlib.util.find_spec("comet") is None:
        return None, "COMET skipped: the unbabel-comet package is not installed."
    ckpt = _local_comet_checkpoint(model_path)
    if ckpt is None:
        where = model_path or f"the local Hugging Face cache ({COMET_MODEL})"
        return None, f"COMET skipped: no COMET checkpoint found in {where} and this machine cannot download one."
    from comet import load_from_checkpoint  # lazy: optional, rarely installed
    model = load_from_checkpoint(ckpt)
    data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(srcs, hyps, refs)]
    out = model.predict(data, batch_size=batch_size, gpus=gpus, progress_bar=False)
    return float(out.system_score), ""
