"""LoRA: train a low-rank update W + (alpha/r) B A of chosen linear layers, base frozen.

LoRALinear is an nn.Linear sharing the base `weight` (no copy) plus `lora_A` (r x in) and `lora_B`
(out x r): the base state-dict keys are unchanged. B starts at zero, so a fresh model computes the base.

    names = apply_lora(model, rank=8, alpha=16)      # freezes everything but the adapters
    with disable_adapters(model):                    # the base model: GRPO's KL reference
        ref_logits = model(x)
    save_adapters(model, "out/sft_lora", base_checkpoint="out/base/step_001000")
"""
import argparse
import fnmatch
import math
import os
import shutil
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanostoney.cli import positive_float, positive_int, probability
from nanostoney.errors import UserError
from nanostoney.files import read_json, read_torch, save_torch, write_json

ATTN_TARGETS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj")
MLP_TARGETS = ("mlp.c_fc", "mlp.c_proj")
DEFAULT_TARGETS = ATTN_TARGETS
# "head" adapts the unembedding too. Chat fine-tuning needs it: the base never saw the chat
# tokens as targets, so lm_head's <|assistant_end|> row is near zero and, frozen, the model can
# only make the stop token top-1 of a flat distribution (greedy stops, sampling never does).
HEAD_TARGETS = ("lm_head",)
ALIASES = {"attn": ATTN_TARGETS, "mlp": MLP_TARGETS, "all": ATTN_TARGETS + MLP_TARGETS, "head": HEAD_TARGETS,
           "q": ("attn.c_q",), "k": ("attn.c_k",), "v": ("attn.c_v",), "o": ("attn.c_proj",),
           "proj": ("attn.c_proj",)}
ADAPTER_FILE = "adapters.pt"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "nanostoney-lora-1"


class LoRALinear(nn.Linear):
    """y = x W^T (+ b) + (alpha / r) * dropout(x) A^T B^T, with W shared with the wrapped layer."""

    def __init__(self, base: nn.Linear, rank=8, alpha=16.0, dropout=0.0):
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate a new weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True   # False inside disable_adapters
        self.merged = False   # True when B A has been added into weight

    def delta_weight(self):
        # in float32 so merge followed by unmerge returns (almost) exactly the old weight
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.enabled and not self.merged:
            y = y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale
        return y

    @torch.no_grad()
    def merge(self, merged=True):
        """Fold B A into the weight, or with merged=False take it back out; a no-op when already so."""
        if self.merged != merged:
            delta = self.delta_weight().to(self.weight.dtype)
            self.weight += delta if merged else -delta
            self.merged = merged

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}"


def add_lora_args(parser, rank=16, alpha=32.0, targets="all,head", dropout=0.0):
    """The LoRA flags of the fine-tuning stages; an init that carries adapters keeps its own shape."""
    g = parser.add_argument_group("LoRA")
    g.add_argument("--full", action="store_true", help="fine-tune every weight instead of LoRA adapters")
    g.add_argument("--lora-rank", type=positive_int, default=rank, help="adapter rank r")
    g.add_argument("--lora-alpha", type=positive_float, default=alpha, help="adapter scale is alpha / rank")
    g.add_argument("--lora-targets", type=_targets_arg, default=targets,
                   help="comma list or alias: attn, mlp, all, head (lm_head), q, k, v, o")
    g.add_argument("--lora-dropout", type=probability, default=dropout)
    return parser


def _targets_arg(text):
    """The argparse type of --lora-targets (the error then names the flag)."""
    try:
        parse_targets(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def parse_targets(targets):
    """"attn.c_q,attn.c_v" or ["attn", "mlp"] or aliases (attn, mlp, all, head, q, k, v, o) -> tuple."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out = list(dict.fromkeys(name for t in targets for name in ALIASES.get(t, (t,))))
    if not out:
        raise UserError("no LoRA targets given; name some, e.g. attn.c_q,attn.c_v (or attn, mlp, all).")
    return tuple(out)


def _matches(name, pattern):
    # "attn.c_q" matches "transformer.h.3.attn.c_q"; glob patterns match the full name
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def lora_modules(model):
    """(name, LoRALinear) pairs, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(model, rank=8, alpha=16, dropout=0.0, targets=DEFAULT_TARGETS):
    """Wrap every nn.Linear whose name matches a target and freeze the rest; the wrapped names."""
    targets = parse_targets(targets)
    if lora_modules(model):
        raise UserError("this model already has LoRA adapters; remove_lora() before applying new ones.")
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(_matches(n, t) for t in targets)]
    if not names:
        raise UserError(f"no linear layer matches the LoRA targets {', '.join(targets)}; "
                        f"valid ones look like {', '.join(ATTN_TARGETS + MLP_TARGETS)}.")
    side, layer = min((min(model.get_submodule(n).in_features, model.get_submodule(n).out_features), n)
                       for n in names)
    if not 1 <= rank <= side:  # a rank past a layer's smaller side adds parameters and no capacity
        raise UserError(f"LoRA rank {rank} is outside 1..{side} ({side}: the smaller side of {layer}); "
                        f"use a rank of at least 1 and at most {side}.")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        model.set_submodule(n, LoRALinear(model.get_submodule(n), rank, alpha, dropout))
    model.lora_config = {"rank": int(rank), "alpha": float(alpha), "dropout": float(dropout),
                         "targets": list(targets)}
    return names


def lora_parameters(model):
    """The adapter parameters (A and B of every LoRALinear): what the optimizer should see."""
    return [p for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)]


def lora_state_dict(model):
    """Only the adapter tensors, under their full model names (small: r * (in + out) each)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


@contextmanager
def disable_adapters(model):
    """Inside the block the model computes the base function, without a copy."""
    mods = [m for _, m in lora_modules(model)]
    state = [(m.enabled, m.merged) for m in mods]
    for m in mods:
        m.merge(False)
        m.enabled = False
    try:
        yield model
    finally:
        for m, (enabled, merged) in zip(mods, state):
            m.enabled = enabled
            m.merge(merged)


def merge_lora(model):
    """Fold B A into the weights (faster inference; the adapters stay, so unmerge can undo it)."""
    for _, m in lora_modules(model):
        m.merge()


def unmerge_lora(model):
    for _, m in lora_modules(model):
        m.merge(False)


def remove_lora(model, merge=True):
    """A plain, all-trainable model again: each LoRALinear an nn.Linear (B A merged in when merge)."""
    for name, m in lora_modules(model):
        m.merge(merge)
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                        device=m.weight.device, dtype=m.weight.dtype)
        lin.weight, lin.bias = m.weight, m.bias
        model.set_submodule(name, lin)
    if hasattr(model, "lora_config"):
        del model.lora_config
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def adapter_config(model, base_checkpoint=None, at=None):
    """The JSON that goes next to the adapter tensors."""
    if not lora_modules(model):
        raise UserError("the model has no LoRA adapters to save; apply_lora() first.")
    cfg = dict(getattr(model, "lora_config", {}))
    if not cfg:  # adapters built by hand: read the shape from the first module
        m = lora_modules(model)[0][1]
        cfg = {"rank": m.rank, "alpha": m.alpha, "dropout": 0.0, "targets": list(DEFAULT_TARGETS)}
    cfg["format"] = FORMAT
    cfg["modules"] = [n for n, _ in lora_modules(model)]
    if base_checkpoint is not None:
        path = os.path.abspath(base_checkpoint)
        cfg["base_checkpoint"] = {"path": path, "relpath": os.path.relpath(path, at or os.getcwd())}
    return cfg


def write_adapter_files(model, directory, base_checkpoint=None):
    """adapters.pt + adapter_config.json into an existing directory (checkpoint.py reuses this)."""
    if any(m.merged for _, m in lora_modules(model)):
        raise UserError("the LoRA adapters are merged into the weights; unmerge_lora() before saving them.")
    cfg = adapter_config(model, base_checkpoint, at=os.path.dirname(os.path.abspath(directory)))
    save_torch({k: v.detach().cpu() for k, v in lora_state_dict(model).items()}, os.path.join(directory, ADAPTER_FILE))
    write_json(os.path.join(directory, ADAPTER_CONFIG), cfg)


def save_adapters(model, path, base_checkpoint=None):
    """The adapters alone in a directory naming their base checkpoint; written whole or not at all."""
    path = os.path.abspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write_adapter_files(model, tmp, base_checkpoint)
        if os.path.exists(path):  # only an adapter dir of ours is replaced, never anything else
            if not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
                raise UserError(f"{path} exists and is not a LoRA adapter directory; pick another path.")
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_adapter_config(path):
    f = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(f):
        raise UserError(f"{path} is not a LoRA adapter directory (no {ADAPTER_CONFIG}).")
    cfg = read_json(f, fix="re-save the adapters")
    if not isinstance(cfg, dict) or not {"rank", "alpha", "targets"} <= set(cfg):
        raise UserError(f"{f} is not a LoRA adapter config (a JSON object with rank, alpha and targets); "
                        f"re-save the adapters.")
    return cfg


def base_checkpoint_of(path):
    """The base checkpoint of an adapter dir (relative location first: a moved pair resolves), or None."""
    ref = read_adapter_config(path).get("base_checkpoint")
    if not ref:
        return None
    rel = os.path.join(os.path.dirname(os.path.abspath(path)), ref["relpath"])
    for cand in (rel, ref["path"]):
        if os.path.exists(cand):
            return cand
    raise UserError(f"the base checkpoint of the adapters in {path} is missing "
                    f"(looked for {rel} and {ref['path']}); copy it back or load the base explicitly.")


def load_adapters(model, path):
    """Apply adapters with the saved rank/alpha/targets to a base model and load their weights."""
    cfg = read_adapter_config(path)
    f = os.path.join(path, ADAPTER_FILE)
    if not os.path.isfile(f):
        raise UserError(f"{path} has {ADAPTER_CONFIG} but no {ADAPTER_FILE}; the save did not finish.")
    if not lora_modules(model):
        apply_lora(model, cfg["rank"], cfg["alpha"], cfg.get("dropout", 0.0), cfg["targets"])
    load_adapter_state(model, read_torch(f, fix="the adapters are damaged; re-save them"), path)
    return model


def load_adapter_state(model, sd, where="the adapters"):
    own = lora_state_dict(model)
    if not isinstance(sd, dict):
        raise UserError(f"{where} hold a {type(sd).__name__}, not a state dict; re-save them.")
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or extra:
        raise UserError(f"{where} do not fit this model's LoRA modules (missing {missing[:3]}, "
                        f"unexpected {extra[:3]}); load them onto the base they were trained on.")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise UserError(f"{where}: {k} has shape {tuple(v.shape)} but this model's is "
                            f"{tuple(own[k].shape)}; load them onto the base they were trained on.")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)
