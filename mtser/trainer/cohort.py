"""The cohort's optimiser side: G fusion models of one architecture trained as ONE fused model
(`model.FusionNetwork`, HFTA) on one shared batch stream, each with its own optimiser settings and state.

`CohortAdamW` is AdamW with a learning rate, weight decay and step count per member, with per-member gradient-norm
clipping (`clip_member_grads`) and float16 loss scaling (`MemberGradScaler`), all in `step_members`: elementwise, so
each member follows exactly the trajectory it would follow alone.
Members are independent in the backward pass as well: no operation mixes two members' values.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from mtser.trainer.config import ModelConfig
from mtser.trainer.model import FusionNetwork


def member_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (G,) per-member tensor shaped to broadcast over a (G, ...) parameter."""
    return t.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


@torch.no_grad()
def clip_member_grads(model: FusionNetwork, max_norm: torch.Tensor) -> torch.Tensor:
    """Scale each member's gradients to at most its `max_norm` (G,) as `torch.nn.utils.clip_grad_norm_` does for a
    model alone; returns the members' total gradient norms (G,)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    squares = torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads]).sum(0)
    norms = squares.sqrt()
    coef = (max_norm.to(norms) / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(member_view(coef, g))
    return norms


class CohortAdamW:
    """AdamW (PyTorch's decoupled formulation) over a FusionNetwork's parameters with per-member lr (G,), weight
    decay (G,) and step counts. Each member's step is PyTorch's fused AdamW kernel (`aten::_fused_adamw_`, what
    `torch.optim.AdamW(fused=True)` runs) over that member's slices of the stacked tensors with the member's own
    settings, so it equals AdamW on the member alone, in one pass per tensor. `step(active=mask)` updates only the
    active members: an inactive member's weights, moments and step count stay exactly as they were, as if its
    optimiser had not been called.

    Not a `torch.optim.Optimizer`: its constructor imports torch._dynamo (1-4 s per process on a CPU) for hooks a
    cohort does not use. `param_groups` and `state` have the Optimizer's shape."""

    def __init__(self, model: FusionNetwork, lr: torch.Tensor, weight_decay: torch.Tensor,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param_groups = [{"params": list(model.parameters()), "betas": betas, "eps": eps}]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        device = model.head.bias.device
        self.lr = torch.as_tensor(lr, dtype=torch.float64, device=device).clone()
        self.weight_decay = torch.as_tensor(weight_decay, dtype=torch.float64, device=device).clone()
        self.steps = torch.zeros(model.size, dtype=torch.float32, device=device)  # the fused kernel's step type

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self, active: torch.Tensor | None = None) -> None:
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if p not in self.state:
                self.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        on = [True] * len(self.steps) if active is None else active.tolist()
        lrs, decays = self.lr.tolist(), self.weight_decay.tolist()
        for g in (g for g, is_on in enumerate(on) if is_on):
            self.steps[g] += 1
            torch._fused_adamw_([p[g] for p in params], [p.grad[g] for p in params],
                                [self.state[p]["exp_avg"][g] for p in params],
                                [self.state[p]["exp_avg_sq"][g] for p in params], [], [self.steps[g]] * len(params),
                                lr=lrs[g], beta1=beta1, beta2=beta2, weight_decay=decays[g], eps=group["eps"],
                                amsgrad=False, maximize=False)

    def select(self, model: FusionNetwork, keep: Sequence[int]) -> CohortAdamW:
        """The optimiser of `model` after `model.select(keep)`: the kept members' moments, steps and settings."""
        index = torch.as_tensor(list(keep), dtype=torch.long, device=self.steps.device)
        group = self.param_groups[0]
        new = CohortAdamW(model, self.lr[index], self.weight_decay[index], group["betas"], group["eps"])
        new.steps = self.steps[index].clone()
        for old_p, new_p in zip(group["params"], new.param_groups[0]["params"]):
            if old_p in self.state:
                new.state[new_p] = {k: v.index_select(0, index.to(v.device)).clone()
                                    for k, v in self.state[old_p].items()}
        return new


class MemberGradScaler:
    """float16 loss scaling with a scale per member: `torch.amp.GradScaler`'s rule and kernels (scale 2¹⁶ at first,
    halved and the step skipped when the member's gradients hold an inf or NaN, doubled after `growth_interval`
    steps in a row without one) applied to each member's slices on its own, so one member's overflow neither skips
    another member's step nor halves its scale: each follows the trajectory it would follow alone. Disabled (no
    float16): the plain sum of the losses, no check, no overhead."""

    def __init__(self, size: int, device: torch.device, enabled: bool, init_scale: float = 2.0**16,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.enabled = enabled
        self.scale = torch.full((size,), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros(size, dtype=torch.int32, device=device)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval

    def scaled_sum(self, losses: torch.Tensor) -> torch.Tensor:
        """Σ_g scale_g·loss_g, to call backward on (each member's gradients come out scaled by its own scale)."""
        return (losses * self.scale.to(losses.dtype)).sum() if self.enabled else losses.sum()

    @torch.no_grad()
    def unscale_(self, model: FusionNetwork) -> torch.Tensor:
        """Divide each member's gradients by its scale; returns (G,) True for the members whose gradients held an inf
        or NaN (all False when disabled)."""
        found = torch.zeros(len(self.scale), dtype=torch.float32, device=self.scale.device)
        if self.enabled:
            inv = self.scale.double().reciprocal().float()            # as GradScaler.unscale_
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            for g in range(len(self.scale)):
                torch._amp_foreach_non_finite_check_and_unscale_([grad[g] for grad in grads], found[g:g + 1],
                                                                 inv[g:g + 1])
        return found.bool()

    def update(self, overflow: torch.Tensor, took_part: torch.Tensor) -> None:
        """GradScaler.update per member for the members that took part in the step (`took_part`: finite loss; a
        member whose loss was not finite skipped the step as a model alone would, its scale unchanged)."""
        if not self.enabled:
            return
        found = overflow.float()
        for g in (g for g, part in enumerate(took_part.tolist()) if part):
            torch._amp_update_scale_(self.scale[g:g + 1], self.growth_tracker[g:g + 1], found[g:g + 1],
                                     self.growth_factor, self.backoff_factor, self.growth_interval)

    def select(self, keep: Sequence[int]) -> None:
        """Keep the scales of the members at `keep` (after `FusionNetwork.select`)."""
        index = torch.as_tensor(list(keep), dtype=torch.long, device=self.scale.device)
        self.scale, self.growth_tracker = self.scale[index], self.growth_tracker[index]


def step_members(model: FusionNetwork, optimizer: CohortAdamW, scaler: MemberGradScaler, losses: torch.Tensor,
                 max_norm: torch.Tensor) -> torch.Tensor:
    """One training step of every member whose loss (G,) is finite: backward of the (scaled) losses, per-member
    unscaling, gradient-norm clipping to `max_norm` (G,) and AdamW. A non-finite loss (a bad feature, a diverging
    member) leaves that member as it was and the others unaffected, as does a member's float16 gradient overflow.
    Returns the finite-loss mask (G,)."""
    finite = torch.isfinite(losses)
    if finite.any():
        optimizer.zero_grad(set_to_none=True)
        scaler.scaled_sum(torch.where(finite, losses, 0.0)).backward()
        overflow = scaler.unscale_(model)
        clip_member_grads(model, max_norm)
        optimizer.step(active=finite & ~overflow)
        scaler.update(overflow, finite)
    return finite


def member_bytes(encoder_dims: dict[str, int], cfg: ModelConfig, batch_size: int, frames: dict[str, int]) -> int:
    """Estimated training memory of one cohort member, in bytes (float32):

    - parameters × 16: weights, gradients and AdamW's two moments;
    - activations kept for the backward pass, per sample: for each encoder with ASP the attention's pre- and
      post-tanh hidden states (2·T·attention_dim) and the pooled mean/std (4·D), with mean pooling only the
      projection; per encoder the projection and LayerNorm outputs (3·proj_dim); per LSTM layer and step the four
      gates, cell and hidden states (≈ 10·lstm_hidden); with layer weights and ASP, the member's mixed frames and
      their gathered rows (2·T·D).

    `frames` is a typical padded length per encoder (the trainer uses the 95th percentile of the Train split). The
    shared batch itself (B·T·D per encoder) and, with ASP, the pooling's work tensor (the gathered frames, ≈ B·T·D
    per encoder) are paid once per cohort, not per member, and are not included."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in FusionNetwork(encoder_dims, cfg).parameters())
    per_sample = 0
    for name, dim in encoder_dims.items():
        if cfg.pooling == "asp":
            per_sample += 2 * frames[name] * (cfg.attention_dim + (dim if cfg.layer_weights else 0)) + 4 * dim
        per_sample += 3 * cfg.proj_dim
    per_sample += cfg.lstm_layers * len(encoder_dims) * 10 * cfg.lstm_hidden
    return 16 * parameters + 4 * batch_size * per_sample


def member_flops(encoder_dims: dict[str, int], cfg: ModelConfig, frames: dict[str, int]) -> float:
    """Rough training FLOPs of one cohort member per sample (forward and backward ≈ 3 × 2 per multiply-add): every
    parameter once per sample, plus with ASP the attention MLP's first layer over each frame (T·D·attention_dim
    per encoder). A size for planning a search, not a measurement."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in FusionNetwork(encoder_dims, cfg).parameters())
    per_frame = sum(frames[n] * d * cfg.attention_dim for n, d in encoder_dims.items()) if cfg.pooling == "asp" else 0
    return 6.0 * (parameters + per_frame)
