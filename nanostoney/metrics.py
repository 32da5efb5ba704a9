"""Evaluation metrics that work offline: pass@k, bootstrap intervals, tests of a difference, chrF,
MAUVE (features from a GPT on disk: mauve's own featuriser downloads gpt2-large), COMET.
Deterministic given inputs and seed; sacrebleu, mauve and comet are imported lazily.
"""
import contextlib
import functools
import importlib.util
import os
import warnings

import numpy as np
import torch

from nanostoney.errors import UserError
from nanostoney.gpt import norm, unwrap


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# -----------------------------------------------------------------------------
# pass@k

def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a running product."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_by_task(correct_by_task, ks, n_boot=1000, seed=0, alpha=0.05):
    """{task: {"n_problems", "n_samples", "pass@k": (point, lo, hi)}}; intervals resample problems."""
    table = {}
    for name, rows in correct_by_task.items():
        if not rows:
            raise UserError(f"task {name!r} has no evaluated problems; check its split and --max-problems.")
        n = len(rows[0])
        if n == 0 or any(len(r) != n for r in rows):
            raise ValueError(f"task {name!r}: every problem needs the same, non-zero number of samples")
        counts = [int(sum(bool(x) for x in r)) for r in rows]
        entry = {"n_problems": len(rows), "n_samples": n}
        for k in [k for k in ks if k <= n]:
            values = np.array([pass_at_k(n, c, k) for c in counts])
            entry[f"pass@{k}"] = bootstrap_ci(values, n_boot=n_boot, seed=seed, alpha=alpha)
        table[name] = entry
    return table


# -----------------------------------------------------------------------------
# bootstrap

def resample(n, n_boot, seed):
    """Indices (n_boot, n) of resamples with replacement, the same on every run."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_ci(values, stat=np.mean, n_boot=1000, seed=0, alpha=0.05):
    """(point, lo, hi): stat(values) and its percentile-bootstrap interval, widened to hold the point."""
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
    """bootstrap_ci of the mean of every entry of values [N, ...] at once (NaNs left out)."""
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
    """{"diff", "lo", "hi", "p", "n"}: a difference of means (b None: vs 0), bootstrap and permutation."""
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
    """Holm-Bonferroni adjusted p-values, in the order given."""
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
    """sacrebleu's sentence chrF (word_order=2: chrF++) of one hypothesis vs one reference, 0-100."""
    return _chrf(word_order).sentence_score(hypothesis, [reference]).score


def chrf_pp_ci(hyps, refs, n_boot=1000, seed=0, alpha=0.05):
    """(point, lo, hi): corpus chrF++ and its bootstrap over pairs (per-pair statistics re-summed)."""
    hyps, refs = list(hyps), list(refs)
    if len(hyps) != len(refs):
        raise ValueError(f"chrf_pp_ci got {len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise UserError("chrf_pp_ci got no hypotheses; evaluate at least one open-answer example.")
    stats = np.array(_chrf(2)._extract_corpus_statistics(hyps, [refs]))

    def corpus(idx):
        return _chrf(2)._compute_score_from_stats(stats[idx].sum(axis=0).tolist()).score
    return bootstrap_ci(np.arange(len(stats)), stat=corpus, n_boot=n_boot, seed=seed, alpha=alpha)


# -----------------------------------------------------------------------------
# MAUVE

def mauve_score(p_features, q_features, seed=0, num_buckets="auto", kmeans_num_redo=5,
                kmeans_max_iter=500, pca_max_data=-1, kmeans_explained_var=0.9,
                mauve_scaling_factor=5):
    """MAUVE (Pillutla et al. 2021) in (0, 1] between two (n, d) feature arrays; seeded."""
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
    """(N, n_embd) float32: the GPT's normed final hidden states, mean-pooled or at the last token."""
    model = unwrap(model)
    device = device or model.get_device()
    if pool not in ("mean", "last"):
        raise UserError(f"model_features pool must be 'mean' or 'last', got {pool!r}.")
    if len(texts) == 0:
        raise UserError("model_features got no texts; there is nothing to featurise.")
    max_tokens = max_tokens or model.config.sequence_len
    seqs = [([tokenizer.bos_id] + tokenizer.encode(t))[:max_tokens] for t in texts]
    feats = []
    with eval_mode(model), torch.no_grad():
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
    return torch.cat(feats).numpy().astype(np.float32)


# -----------------------------------------------------------------------------
# COMET (optional)

COMET_MODEL = "Unbabel/wmt22-comet-da"


def _local_comet_checkpoint(model_path):
    """Path of a COMET checkpoint on disk, or None; never touches the network."""
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
    """(COMET system score, "") when installed with a local checkpoint, else (None, why not)."""
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
