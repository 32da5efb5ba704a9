"""Muon: momentum, then orthogonalise the update, for the 2-D weight matrices of the blocks.

SGD-momentum on a matrix moves along a few dominant directions; Muon replaces the momentum
M = U S V^T by about U V^T (a few Newton-Schulz iterations, not an SVD), so every singular
direction moves alike. Embeddings and the head stay on AdamW, as in nanochat and modded-nanogpt.
Under DDP every rank holds the same averaged gradient and runs the same update.
"""
import torch


@torch.no_grad()
def orthogonalize(G, steps=5):
    """About U V^T for G = U S V^T by a quintic Newton-Schulz iteration, whose coefficients push small
    singular values up fastest while keeping all near 1; bf16 on GPU (robust, the hot loop), else fp32."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the smaller Gram matrix X X^T
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """SGD with (Nesterov) momentum whose update is orthogonalised; params must be 2-D. lr is in
    spectral units, scaled by sqrt(max(1, rows/cols)) so tall matrices step like wide ones."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D weight matrices only, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            mom = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - mom)  # buf = mom * buf + (1 - mom) * g
                # Nesterov: look ahead along the momentum; smoother than plain momentum here.
                g = g.lerp(buf, mom) if group["nesterov"] else buf
                update = orthogonalize(g, steps=group["ns_steps"])
                scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                p.add_(update, alpha=-group["lr"] * scale)
