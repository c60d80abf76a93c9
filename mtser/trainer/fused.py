"""Fused layers (HFTA, Wang et al. 2021): each parameter carries a leading member dimension G and the name of the
ordinary module's parameter it stacks (`FusedLinear.weight` (G, out, in) stacks `nn.Linear.weight`), so member g
of a layer is an ordinary module's state by indexing, and an ordinary module loads into member g by name. A model
built from them (`model.FusionNetwork`) trains, evaluates and predicts G models of one architecture in one forward
pass; a model alone is G = 1. Members are independent: no operation mixes two members' values, forward or backward.

Where every member reads the same input, the first layer is one GEMM for all members: `FusedLinear` on a shared
(N, in) input, and the ASP attention's first layer over the batch's real frames (`FusedAttentivePooling`)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtser.trainer import kernels



class MemberModule(nn.Module):
    """A module all of whose parameters have a leading member dimension: member g in and out by parameter name."""

    @property
    def size(self) -> int:
        """The number of members G."""
        return next(self.parameters()).shape[0]

    def member_state(self, g: int) -> dict[str, torch.Tensor]:
        """Member g as the ordinary module's state dict (CPU copies)."""
        return {name: p[g].detach().to("cpu", copy=True) for name, p in self.named_parameters()}

    @torch.no_grad()
    def load_member(self, g: int, source: nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Load member g from an ordinary module or its state dict (the same names; RuntimeError names a missing,
        unexpected or differently shaped entry)."""
        state = source.state_dict() if isinstance(source, nn.Module) else source
        params = dict(self.named_parameters())
        missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
        if missing or unexpected:
            raise RuntimeError(f"missing keys {missing}, unexpected keys {unexpected}")
        for name, p in params.items():
            if tuple(state[name].shape) != tuple(p.shape[1:]):
                raise RuntimeError(f"size mismatch for {name}: {tuple(state[name].shape)} in the source, "
                                   f"{tuple(p.shape[1:])} in the model")
            p[g].copy_(state[name])

    def select(self, keep: Sequence[int]) -> None:
        """Keep only the members at `keep` (in that order): the others leave the fused tensors and stop costing."""
        index = torch.as_tensor(list(keep), dtype=torch.long, device=next(self.parameters()).device)
        for module in self.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    setattr(module, name, nn.Parameter(p.detach().index_select(0, index).clone()))

    def _init_members(self, init) -> None:  # noqa: ANN001 (init(g): initialise member g as the ordinary module does)
        """Initialise each member as the ordinary module would be initialised (the same random draws in the same
        order, so a G = 1 layer built after `torch.manual_seed(s)` equals the ordinary module built after it)."""
        if next(self.parameters()).device.type != "meta":
            with torch.no_grad():
                for g in range(self.size):
                    init(g)


class FusedLinear(MemberModule):
    """G `nn.Linear`s: `weight` (G, out, in), `bias` (G, out). Input (G, N, in) per member, or (N, in) shared by all
    members (one GEMM for all); output (G, N, out)."""

    def __init__(self, members: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(members, out_features)) if bias else None
        self._init_members(self._init_member)

    def _init_member(self, g: int) -> None:
        nn.init.kaiming_uniform_(self.weight[g], a=math.sqrt(5))        # nn.Linear.reset_parameters
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight.shape[2])
            nn.init.uniform_(self.bias[g], -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:                                                  # shared input: one GEMM for all members
            g, out, _ = self.weight.shape
            bias = None if self.bias is None else self.bias.reshape(-1)
            return F.linear(x, self.weight.reshape(g * out, -1), bias).view(len(x), g, out).transpose(0, 1)
        if self.bias is None:
            return torch.bmm(x, self.weight.transpose(1, 2))
        return torch.baddbmm(self.bias[:, None, :], x, self.weight.transpose(1, 2))


class FusedLayerNorm(MemberModule):
    """G `nn.LayerNorm`s over the last dimension of (G, ..., D): `weight` (G, D), `bias` (G, D)."""

    def __init__(self, members: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(members, dim))
        self.bias = nn.Parameter(torch.zeros(members, dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], *[1] * (x.dim() - 2), x.shape[-1])
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * self.weight.view(shape) + self.bias.view(shape)


class FusedLSTM(MemberModule):
    """G `nn.LSTM(batch_first=True)`s (zero initial state), with its parameter names (`weight_ih_l0`, ...) and gate
    order (i, f, g, o); dropout between layers in training, as nn.LSTM. Written with batched matmuls
    (`torch.func.vmap` has no batching rule for `aten::lstm`). Input (G, B, T, in), output (G, B, T, H)."""

    def __init__(self, members: int, input_size: int, hidden_size: int, num_layers: int, dropout: float = 0.0):
        super().__init__()
        self.num_layers, self.dropout = num_layers, dropout
        for layer in range(num_layers):
            width = input_size if layer == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(members, 4 * hidden_size, width)))
            self.register_parameter(f"weight_hh_l{layer}",
                                    nn.Parameter(torch.empty(members, 4 * hidden_size, hidden_size)))
            self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(members, 4 * hidden_size)))
            self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(members, 4 * hidden_size)))
        bound = 1 / math.sqrt(hidden_size)                                # nn.LSTM.reset_parameters
        self._init_members(lambda g: [nn.init.uniform_(p[g], -bound, bound) for p in self.parameters()])

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        g, b, steps, _ = sequence.shape
        layer_in = sequence
        for layer in range(self.num_layers):
            w_ih, w_hh = getattr(self, f"weight_ih_l{layer}"), getattr(self, f"weight_hh_l{layer}")
            bias = (getattr(self, f"bias_ih_l{layer}") + getattr(self, f"bias_hh_l{layer}"))[:, None, :]
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
            if layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, self.training)
        return layer_in


class FusedAttentivePooling(MemberModule):
    """G attentive statistics poolings (Okabe et al. 2018) over frames x (B, T, D) every member shares: softmax
    attention over frames (`attention`: FusedLinear(D, A), tanh, FusedLinear(A, 1) without bias: softmax is
    shift-invariant, a score bias could not change the output), then the attention-weighted mean and standard
    deviation (G, B, 2D). Padded frames get exactly zero weight. Frames (G, B, T, D) of each member's own (the
    members' mixes of layers, `layer_mix.LayerMix`) go through each member's attention (`member_scores`).

    The first layer is one GEMM for all members over the real frames only, gathered into a work tensor reused from
    step to step (it pays for itself even for a model alone, measured on a 2-core CPU at realistic shapes) and
    zero-padded to a multiple of `GEMM_ROWS`; the padding rows' outputs are dropped, so their gradient is zero. The
    statistics of all members are one pass over the frames in float32 (`attention_moments`; also under autocast:
    E[x²] − E[x]² needs the precision)."""

    def __init__(self, members: int, dim: int, attention_dim: int, eps: float = 1e-5):
        super().__init__()
        self.attention = nn.Sequential(FusedLinear(members, dim, attention_dim), nn.Tanh(),
                                       FusedLinear(members, attention_dim, 1, bias=False))
        self.eps = eps
        self._work: torch.Tensor | None = None

    def _rows(self, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """The reused work tensor as (rows, D). A fresh block of tens of MB costs the CPU a page fault per 4 KiB on
        every step. Safe: were a step's saved tensor overwritten before its backward pass, autograd's version
        check would raise."""
        size = math.prod(shape)
        work = self._work
        if work is None or work.numel() < size or work.dtype != like.dtype or work.device != like.device:
            work = self._work = torch.empty(size + size // 4, dtype=like.dtype, device=like.device)
        return work[:size].view(shape)

    def scores(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Every member's scores (B, G, T) in float32, padding at float32's minimum (zero weight after softmax)."""
        first, second = self.attention[0], self.attention[2]
        g = first.weight.shape[0]
        frames = mask.reshape(-1).nonzero().squeeze(1)
        flat = x.reshape(-1, x.shape[-1])
        n = len(frames)
        rows = self._rows((-(-n // kernels.GEMM_ROWS) * kernels.GEMM_ROWS, flat.shape[1]), flat)
        torch.index_select(flat, 0, frames, out=rows[:n])
        rows[n:].zero_()
        hidden = kernels.tanh_linear(rows, first.weight.reshape(-1, first.weight.shape[-1]),
                                     first.bias.reshape(-1))[:n].view(n, g, -1)
        row_scores = (hidden * second.weight[:, 0]).sum(-1).float()           # (n, G), no bmm
        lowest = torch.finfo(torch.float32).min
        scores = row_scores.new_full((mask.numel(), g), lowest).index_copy(0, frames, row_scores)
        return scores.view(*mask.shape, g).transpose(1, 2)

    def member_scores(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`scores` for frames x (G, B, T, D) of each member's own (mixed layers): (G, B, T), the first layer one
        batched GEMM over each member's real frames."""
        first, second = self.attention[0], self.attention[2]
        frames = mask.reshape(-1).nonzero().squeeze(1)
        hidden = torch.tanh(first(x.flatten(1, 2).index_select(1, frames)))       # (G, n, A)
        row_scores = (hidden * second.weight).sum(-1).float()                     # (G, n)
        lowest = torch.finfo(torch.float32).min
        scores = row_scores.new_full((len(row_scores), mask.numel()), lowest).index_copy(1, frames, row_scores)
        return scores.view(-1, *mask.shape)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Frames x (B, T, D) every member shares, or (G, B, T, D) each member's own → (G, B, 2D)."""
        if x.dim() == 4:                                                      # one head per (member, sample)
            weights = torch.softmax(self.member_scores(x, mask), dim=2).flatten(0, 1)[:, None]   # (G·B, 1, T)
            frames = x.flatten(0, 1)
        else:
            weights, frames = torch.softmax(self.scores(x, mask), dim=2), x  # (B, G, T)
        with torch.autocast(x.device.type, enabled=False):
            mean, second = kernels.attention_moments(weights, frames.float())
            variance = second - mean**2
        stats = torch.cat([mean, torch.sqrt(variance.clamp(min=self.eps))], dim=-1)
        return stats.view(*x.shape[:2], -1) if x.dim() == 4 else stats.transpose(0, 1)  # (G, B, 2D)


class MeanPooling(nn.Module):
    """The mean over the unpadded frames (B, T, D) → (B, D) (zeros for an empty sequence): no parameters, so one
    result shared by all members (the projection after it is then one GEMM for all, `FusedLinear`)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(1).to(x.dtype)                                   # (B, 1, T)
        return (torch.bmm(m, x) / m.sum(dim=2, keepdim=True).clamp(min=1.0)).squeeze(1)
