"""The optimizer and its learning-rate schedule, shared by every training stage.

    optimizer = build_optimizer(model, "adamw")         # or "muon": Muon for matrices + AdamW
    set_lr(optimizer, lr_multiplier(step, num_iterations, warmup_steps=10))

nanochat's split (Muon for block matrices, AdamW for embeddings and the head) or plain AdamW, as
one object. The LR schedule is a pure function of the step, so a resumed run needs nothing saved.
"""
import torch

from nanostoney.cli import nonneg_float
from nanostoney.errors import UserError
from nanostoney.muon import Muon

# Muon's LR is in spectral units (0.02 as nanochat); AdamW's for the same matrices is per element.
# AdamW 3e-3 beat 1e-2 clearly in the CPU comparison (depth 4, 120 steps: 1.103 vs 1.207 bpb).
MATRIX_LR = {"muon": 0.02, "adamw": 3e-3}


def add_optim_args(parser, *, optimizer="adamw", matrix_lr=None, embedding_lr=0.2,
                   unembedding_lr=0.004, scalar_lr=0.01, weight_decay=0.0, matrix_flags=("--matrix-lr",)):
    g = parser.add_argument_group("optimizer")
    g.add_argument("--optimizer", default=optimizer, choices=["muon", "adamw"],
                   help="muon: Muon for block matrices + AdamW for embeddings/head; adamw: AdamW for all")
    g.add_argument(*matrix_flags, dest="matrix_lr", type=nonneg_float, default=matrix_lr,
                   help=f"LR of the block matrices (default: {MATRIX_LR['muon']} with Muon, "
                        f"{MATRIX_LR['adamw']} with AdamW)")
    g.add_argument("--embedding-lr", type=nonneg_float, default=embedding_lr, help="AdamW LR of the token embedding")
    g.add_argument("--unembedding-lr", type=nonneg_float, default=unembedding_lr, help="AdamW LR of lm_head")
    g.add_argument("--scalar-lr", type=nonneg_float, default=scalar_lr, help="AdamW LR of any other (1-D) parameter")
    g.add_argument("--weight-decay", type=nonneg_float, default=weight_decay, help="AdamW weight decay")
    return parser


class Optimizers:
    """Several torch optimizers stepped, zeroed, scheduled and checkpointed as one."""

    def __init__(self, optimizers):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state):
        states = state["optimizers"]
        if len(states) != len(self.optimizers):
            raise UserError(f"the checkpoint's optimizer has {len(states)} parts but this run builds "
                            f"{len(self.optimizers)}; resume with the same --optimizer.")
        for opt, s in zip(self.optimizers, states):
            opt.load_state_dict(s)


def build_optimizer(model, kind="adamw", matrix_lr=None, embedding_lr=0.2, unembedding_lr=0.004,
                    scalar_lr=0.01, weight_decay=0.0, betas=(0.8, 0.95)):
    """Parameter groups by role over the parameters that require grad (so LoRA just works); AdamW LRs
    of embedding and head scaled by (n_embd / 768)^-0.5 as nanochat's; set_lr scales initial_lr."""
    if kind not in MATRIX_LR:
        raise UserError(f"unknown --optimizer {kind!r}; use muon or adamw.")
    matrix_lr = MATRIX_LR[kind] if matrix_lr is None else matrix_lr
    roles = {"matrix": [], "embedding": [], "unembedding": [], "scalar": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_" in name:  # adapters are matrices wherever they sit (lm_head's included)
            roles["matrix"].append(p)
        elif name.startswith("transformer.wte"):
            roles["embedding"].append(p)
        elif name.startswith("lm_head"):
            roles["unembedding"].append(p)
        elif p.ndim == 2 and name.startswith("transformer.h"):
            roles["matrix"].append(p)
        else:
            roles["scalar"].append(p)
    if not any(roles.values()):
        raise UserError("the model has no trainable parameters; check --lora-targets or use --full.")
    n_embd = model.config.n_embd
    dmodel_scale = (n_embd / 768) ** -0.5
    adam_groups = []
    for role, lr in (("embedding", embedding_lr * dmodel_scale),
                     ("unembedding", unembedding_lr * dmodel_scale), ("scalar", scalar_lr)):
        if roles[role]:
            adam_groups.append({"params": roles[role], "lr": lr, "role": role})
    optimizers = []
    if kind == "muon":
        if roles["matrix"]:
            optimizers.append(Muon([{"params": roles["matrix"], "lr": matrix_lr, "role": "matrix"}]))
    elif roles["matrix"]:
        adam_groups.append({"params": roles["matrix"], "lr": matrix_lr, "role": "matrix"})
    if adam_groups:
        # fused AdamW on CUDA is one kernel for all params; eps small because grads can be tiny
        fused = next(model.parameters()).is_cuda
        optimizers.append(torch.optim.AdamW(adam_groups, betas=betas, eps=1e-10,
                                            weight_decay=weight_decay, fused=fused))
    opt = Optimizers(optimizers)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt


def optimizer_from_args(model, args):
    """build_optimizer with the flags of add_optim_args."""
    return build_optimizer(model, args.optimizer, args.matrix_lr, args.embedding_lr, args.unembedding_lr,
                           args.scalar_lr, args.weight_decay)


def lr_multiplier(step, num_iterations, warmup_steps=0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """Linear warmup to 1, flat, then linear warmdown to final_lr_frac over the last part."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    warmdown_steps = round(warmdown_ratio * num_iterations)
    if warmdown_steps <= 0 or step < num_iterations - warmdown_steps:
        return 1.0
    progress = (num_iterations - step) / warmdown_steps  # 1 -> 0 over the warmdown
    return progress + (1 - progress) * final_lr_frac


def set_lr(optimizer, mult):
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * mult
