"""The cohort: G fusion models of one architecture trained as ONE fused model on one shared batch stream (HFTA).

Every parameter carries a leading member dimension and is named like the `FusionModel` state-dict entry it stacks
(`branches.wavlm.project.weight` of shape (G, P, 2D)), so a member exports to an ordinary `FusionModel` by
indexing. All members see the same batch: the first layer of each encoder branch is one GEMM for all members (the
ASP attention's first linear; with mean pooling, the projection), the ASP statistics of all members are one pass
over the frames (`model.attention_moments`), the rest are batched matmuls over the member dimension. The 2-layer
LSTM over the 3-step encoder sequence is written out with batched matmuls (`torch.func.vmap` has no batching rule
for `aten::lstm`), in PyTorch's gate order (i, f, g, o).

`CohortAdamW` is AdamW with a learning rate, weight decay and step count per member, with per-member gradient-norm
clipping (`clip_member_grads`) and float16 loss scaling (`MemberGradScaler`), all in `step_members`: elementwise, so
each member follows exactly the trajectory it would follow alone.
Members are independent in the backward pass as well: no operation mixes two members' values.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtser.trainer.config import ModelConfig
from mtser.trainer.model import GEMM_ROWS, Features, FusionModel, attention_moments, head_outputs, tanh_linear


def _key(name: str) -> str:
    return name.replace(".", "__")          # nn.Module attribute names cannot hold dots


class CohortModel(nn.Module):
    """G `FusionModel`s of one architecture as one module; `forward` returns logits (G, B, 8) and attributes
    (G, B, 3) in 1..7 for a batch every member shares."""

    def __init__(self, members: Sequence[FusionModel]):
        super().__init__()
        if not members:
            raise ValueError("CohortModel: needs at least one member")
        first = members[0]
        self.encoder_dims = dict(first.encoder_dims)
        self.cfg: ModelConfig = first.cfg
        shapes = {k: v.shape for k, v in first.state_dict().items()}
        for m in members[1:]:
            if m.encoder_dims != self.encoder_dims or m.cfg != self.cfg:
                raise ValueError("CohortModel: members must share encoders and model config "
                                 f"({m.encoder_dims}, {m.cfg} vs {self.encoder_dims}, {self.cfg})")
        self.names = list(shapes)
        states = [m.state_dict() for m in members]
        for name in self.names:
            stacked = torch.stack([s[name].detach() for s in states]).clone()
            self.register_parameter(_key(name), nn.Parameter(stacked))
        self._work: dict[str, torch.Tensor] = {}

    @property
    def size(self) -> int:
        return self.p("head.bias").shape[0]

    def p(self, name: str) -> torch.Tensor:
        return getattr(self, _key(name))

    def _work_tensor(self, key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A work tensor of `shape` reused from step to step, for the (B, T, D)-sized intermediates the pooling
        computes from the batch (which needs no gradient). A fresh block of tens of MB costs the CPU a page fault
        per 4 KiB on every step. Safe: were a step's saved tensor overwritten before its backward pass, autograd's
        version check would raise."""
        size = math.prod(shape)
        work = self._work.get(key)
        if work is None or work.numel() < size or work.dtype != like.dtype or work.device != like.device:
            work = self._work[key] = torch.empty(size + size // 4, dtype=like.dtype, device=like.device)
        return work[:size].view(shape)

    def named_member_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, self.p(name)) for name in self.names]

    # -------------------------------------------------------------------------------------------------- forward
    def _branch(self, name: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pooling → projection → LayerNorm (→ dropout) of one encoder for all members: (G, B, P)."""
        g, pre = self.size, f"branches.{name}."
        if self.cfg.pooling == "asp":
            w1 = self.p(pre + "pool.attention.0.weight")                      # (G, A, D)
            scores = self._attention_scores(pre, x, mask, w1)
            weights = torch.softmax(scores, dim=2)                             # (B, G, T)
            with torch.autocast(x.device.type, enabled=False):
                mean, second = attention_moments(weights, x.float())
                variance = second - mean**2
            pooled = torch.cat([mean, torch.sqrt(variance.clamp(min=1e-5))], dim=-1).transpose(0, 1)  # (G, B, 2D)
            w = self.p(pre + "project.weight")                                 # (G, P, 2D)
            projected = torch.baddbmm(self.p(pre + "project.bias")[:, None, :], pooled.to(w.dtype), w.transpose(1, 2))
        else:
            m = mask.unsqueeze(1).to(x.dtype)                                   # (B, 1, T)
            pooled = (torch.bmm(m, x) / m.sum(dim=2, keepdim=True).clamp(min=1.0)).squeeze(1)  # (B, D), shared
            w = self.p(pre + "project.weight")                                 # (G, P, D): one GEMM for all members
            projected = F.linear(pooled, w.reshape(-1, w.shape[-1]), self.p(pre + "project.bias").reshape(-1))
            projected = projected.view(len(pooled), g, -1).transpose(0, 1)      # (G, B, P)
        normed = F.layer_norm(projected, projected.shape[-1:])
        normed = normed * self.p(pre + "norm.weight")[:, None, :] + self.p(pre + "norm.bias")[:, None, :]
        return F.dropout(normed, self.cfg.dropout, self.training)

    def _attention_scores(self, pre: str, x: torch.Tensor, mask: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
        """ASP scores of every member (B, G, T), padding at float32's minimum (zero weight after softmax).

        The first layer is one GEMM for all members, over the real frames only (gathered): padding's rows have zero
        weight anyway. Gathering into a reused work tensor pays for itself even for a model alone (measured on this
        project's 2-core CPU at realistic shapes). The rows are zero-padded to a multiple of `GEMM_ROWS`; the
        padding rows' outputs are dropped, so their gradient is zero."""
        g = self.size
        frames = mask.reshape(-1).nonzero().squeeze(1)
        flat = x.reshape(-1, x.shape[-1])
        n = len(frames)
        rows = self._work_tensor(pre + "rows", (-(-n // GEMM_ROWS) * GEMM_ROWS, flat.shape[1]), flat)
        torch.index_select(flat, 0, frames, out=rows[:n])
        rows[n:].zero_()
        hidden = tanh_linear(rows, w1.reshape(-1, w1.shape[-1]),
                             self.p(pre + "pool.attention.0.bias").reshape(-1))[:n].view(n, g, -1)
        row_scores = (hidden * self.p(pre + "pool.attention.2.weight")[:, 0]).sum(-1).float()  # (n, G), no bmm
        lowest = torch.finfo(torch.float32).min
        scores = row_scores.new_full((mask.numel(), g), lowest).index_copy(0, frames, row_scores)
        return scores.view(*mask.shape, g).transpose(1, 2)

    def _lstm(self, sequence: torch.Tensor) -> torch.Tensor:
        """PyTorch's multi-layer LSTM (batch_first, zero initial state) per member; last output (G, B, H)."""
        g, b, steps, _ = sequence.shape
        layer_in = sequence
        for layer in range(self.cfg.lstm_layers):
            w_ih, w_hh = self.p(f"lstm.weight_ih_l{layer}"), self.p(f"lstm.weight_hh_l{layer}")
            bias = (self.p(f"lstm.bias_ih_l{layer}") + self.p(f"lstm.bias_hh_l{layer}"))[:, None, :]
            projected = torch.baddbmm(bias, layer_in.reshape(g, b * steps, -1), w_ih.transpose(1, 2))
            projected = projected.view(g, b, steps, -1)                          # (G, B, steps, 4H)
            h = c = None
            outputs = []
            for t in range(steps):
                gates = projected[:, :, t] if h is None else torch.baddbmm(projected[:, :, t], h, w_hh.transpose(1, 2))
                i, f, cell, o = gates.chunk(4, dim=-1)
                i, f, cell, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(cell), torch.sigmoid(o)
                c = i * cell if c is None else f * c + i * cell
                h = o * torch.tanh(c)
                outputs.append(h)
            layer_in = torch.stack(outputs, dim=2)
            if layer < self.cfg.lstm_layers - 1:
                layer_in = F.dropout(layer_in, self.cfg.dropout, self.training)
        return layer_in[:, :, -1]

    def forward(self, features: Features) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [name for name in self.encoder_dims if name not in features]
        if missing:
            raise KeyError(f"CohortModel: features of encoder(s) {missing} are missing")
        sequence = torch.stack([self._branch(name, *features[name]) for name in self.encoder_dims], dim=2)
        last = self._lstm(sequence)
        w, b = self.p("head.weight").float(), self.p("head.bias").float()
        with torch.autocast(last.device.type, enabled=False):           # the head in float32 (`head_outputs`)
            return head_outputs(torch.baddbmm(b[:, None, :], last.float(), w.transpose(1, 2)))

    # -------------------------------------------------------------------------------------------------- members
    def member_state(self, index: int) -> dict[str, torch.Tensor]:
        """Member `index` as a `FusionModel` state dict (CPU copies)."""
        return {name: self.p(name)[index].detach().to("cpu", copy=True) for name in self.names}

    def export(self, index: int) -> FusionModel:
        model = FusionModel(self.encoder_dims, self.cfg)
        model.load_state_dict(self.member_state(index))
        return model

    def select(self, keep: Sequence[int]) -> None:
        """Keep only the members at `keep` (in that order): the others leave the fused tensors and stop costing."""
        index = torch.as_tensor(list(keep), dtype=torch.long, device=self.p("head.bias").device)
        for name in self.names:
            setattr(self, _key(name), nn.Parameter(self.p(name).detach().index_select(0, index).clone()))


def member_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (G,) per-member tensor shaped to broadcast over a (G, ...) parameter."""
    return t.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


@torch.no_grad()
def clip_member_grads(model: CohortModel, max_norm: torch.Tensor) -> torch.Tensor:
    """Scale each member's gradients to at most its `max_norm` (G,) as `torch.nn.utils.clip_grad_norm_` does for a
    model alone; returns the members' total gradient norms (G,)."""
    grads = [p.grad for _, p in model.named_member_parameters() if p.grad is not None]
    squares = torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads]).sum(0)
    norms = squares.sqrt()
    coef = (max_norm.to(norms) / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(member_view(coef, g))
    return norms


class CohortAdamW:
    """AdamW (PyTorch's decoupled formulation) over a CohortModel's parameters with per-member lr (G,), weight
    decay (G,) and step counts. Each member's step is PyTorch's fused AdamW kernel (`aten::_fused_adamw_`, what
    `torch.optim.AdamW(fused=True)` runs) over that member's slices of the stacked tensors with the member's own
    settings, so it equals AdamW on the member alone, in one pass per tensor. `step(active=mask)` updates only the
    active members: an inactive member's weights, moments and step count stay exactly as they were, as if its
    optimiser had not been called.

    Not a `torch.optim.Optimizer`: its constructor imports torch._dynamo (1-4 s per process on a CPU) for hooks a
    cohort does not use. `param_groups` and `state` have the Optimizer's shape."""

    def __init__(self, model: CohortModel, lr: torch.Tensor, weight_decay: torch.Tensor,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param_groups = [{"params": [p for _, p in model.named_member_parameters()], "betas": betas, "eps": eps}]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        device = model.p("head.bias").device
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

    def select(self, model: CohortModel, keep: Sequence[int]) -> CohortAdamW:
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
    def unscale_(self, model: CohortModel) -> torch.Tensor:
        """Divide each member's gradients by its scale; returns (G,) True for the members whose gradients held an inf
        or NaN (all False when disabled)."""
        found = torch.zeros(len(self.scale), dtype=torch.float32, device=self.scale.device)
        if self.enabled:
            inv = self.scale.double().reciprocal().float()            # as GradScaler.unscale_
            grads = [p.grad for _, p in model.named_member_parameters() if p.grad is not None]
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
        """Keep the scales of the members at `keep` (after `CohortModel.select`)."""
        index = torch.as_tensor(list(keep), dtype=torch.long, device=self.scale.device)
        self.scale, self.growth_tracker = self.scale[index], self.growth_tracker[index]


def step_members(model: CohortModel, optimizer: CohortAdamW, scaler: MemberGradScaler, losses: torch.Tensor,
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
      gates, cell and hidden states (≈ 10·lstm_hidden).

    `frames` is a typical padded length per encoder (the trainer uses the 95th percentile of the Train split). The
    shared batch itself (B·T·D per encoder) and, with ASP, the pooling's work tensor (the gathered frames, ≈ B·T·D
    per encoder) are paid once per cohort, not per member, and are not included."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in FusionModel(encoder_dims, cfg).parameters())
    per_sample = 0
    for name, dim in encoder_dims.items():
        if cfg.pooling == "asp":
            per_sample += 2 * frames[name] * cfg.attention_dim + 4 * dim
        per_sample += 3 * cfg.proj_dim
    per_sample += cfg.lstm_layers * len(encoder_dims) * 10 * cfg.lstm_hidden
    return 16 * parameters + 4 * batch_size * per_sample


def member_flops(encoder_dims: dict[str, int], cfg: ModelConfig, frames: dict[str, int]) -> float:
    """Rough training FLOPs of one cohort member per sample (forward and backward ≈ 3 × 2 per multiply-add): every
    parameter once per sample, plus with ASP the attention MLP's first layer over each frame (T·D·attention_dim
    per encoder). A size for planning a search, not a measurement."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in FusionModel(encoder_dims, cfg).parameters())
    per_frame = sum(frames[n] * d * cfg.attention_dim for n, d in encoder_dims.items()) if cfg.pooling == "asp" else 0
    return 6.0 * (parameters + per_frame)
