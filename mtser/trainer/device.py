"""Device and precision: the device a config asks for, mixed precision on it, and a model's forward over batches
there (training's evaluation and inference both run it)."""
from __future__ import annotations

import torch

from mtser.configio import ConfigError
from mtser.trainer import data


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is available")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


class Precision:
    """Mixed precision on CUDA (bfloat16 where supported, else float16 with loss scaling, `loss_scaling`: training
    scales each member's loss by its own scale, `cohort.MemberGradScaler`); float32 on CPU."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device_type = device.type
        self.enabled = enabled and device.type == "cuda"
        self.dtype = torch.bfloat16 if self.enabled and torch.cuda.is_bf16_supported() else torch.float16
        self.loss_scaling = self.enabled and self.dtype == torch.float16

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


@torch.no_grad()
def run_model(model: torch.nn.Module, batches, device: torch.device, precision: Precision | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated (logits, attributes) of `batches` (each a Batch or a features dict), float32 on CPU: (G, N, 8)
    and (G, N, 3) for a network of G members, all members from one read."""
    model.eval()
    precision = precision or Precision(device, enabled=False)
    logits, attrs = [], []
    for batch in batches:
        features = data.features_to(batch.features if isinstance(batch, data.Batch) else batch, device)
        with precision.autocast():
            out_logits, out_attrs = model(features)
        logits.append(out_logits.float().cpu())
        attrs.append(out_attrs.float().cpu())
    return torch.cat(logits, dim=-2), torch.cat(attrs, dim=-2)
