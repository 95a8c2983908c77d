"""AdamW / Adam over every parameter of the model parts on this rank."""

from __future__ import annotations

import torch
from torch import nn

from torchtitan_like.config.schema import Optimizer
from torchtitan_like.errors import ConfigError


def _fused_devices() -> set[str]:
    # Private helper, present since torch 2.4; it is the list torch itself checks for fused=True.
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return set(_get_fused_kernels_supported_devices())


def check_optimizer(cfg: Optimizer, *, device_type: str) -> None:
    """Refuse what the optimizer cannot do on `device_type`, before anything is built."""
    if cfg.implementation == "fused" and device_type not in _fused_devices():
        raise ConfigError(
            f"optimizer.implementation='fused' is not available on {device_type}: set it to 'foreach' or 'for-loop'"
        )


def build_optimizer(model_parts: list[nn.Module], cfg: Optimizer, *, device_type: str) -> torch.optim.Optimizer:
    check_optimizer(cfg, device_type=device_type)
    params = [p for m in model_parts for p in m.parameters() if p.requires_grad]
    impl = {"fused": cfg.implementation == "fused", "foreach": cfg.implementation == "foreach"}
    cls = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}[cfg.name]
    return cls(
        params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay, **impl
    )


def build_optimizers(model_parts: list[nn.Module], cfg: Optimizer, *, device_type: str) -> list[torch.optim.Optimizer]:
    """One optimizer per model part (pipeline stages on this rank): each part's optimizer state then
    keeps its own parameter names in the checkpoint, the same names a one-part run saves."""
    return [build_optimizer([part], cfg, device_type=device_type) for part in model_parts]
