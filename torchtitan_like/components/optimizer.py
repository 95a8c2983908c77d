"""AdamW / Adam over every parameter of the model parts on this rank, optionally without weight decay on
the parameters that optimizer.no_weight_decay_keywords names."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from torchtitan_like.config.schema import Optimizer
from torchtitan_like.distributed.utils import plain_name
from torchtitan_like.errors import ConfigError

logger = logging.getLogger(__name__)


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


def _no_decay(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def unmatched_patterns(patterns: Sequence[str], model: nn.Module) -> list[str]:
    """The optimizer.no_weight_decay_keywords patterns that name no parameter of `model`."""
    names = [plain_name(n) for n, _ in model.named_parameters()]
    return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]


def check_no_weight_decay(cfg: Optimizer, whole_model: nn.Module) -> None:
    """Each optimizer.no_weight_decay_keywords pattern matches a parameter of the whole model (before any
    pipeline split, so a stage without the match is no error); logs what decays and what does not."""
    patterns = cfg.no_weight_decay_keywords
    if not patterns:
        return
    names = {plain_name(n): p.numel() for n, p in whole_model.named_parameters()}
    unmatched = unmatched_patterns(patterns, whole_model)
    if unmatched:
        examples = ", ".join(list(names)[:2] + [n for n in names if n.endswith("norm.weight")][:2] + list(names)[-1:])
        raise ConfigError(
            f"optimizer.no_weight_decay_keywords pattern {unmatched[0]!r} matches no parameter of the model: "
            f"parameter names look like {examples} (a glob: '*norm*' matches every norm weight)"
        )
    excluded = [n for n in names if _no_decay(n, patterns)]
    logger.info(
        "optimizer: no weight decay on %d of %d parameters (%.1f%% of the elements), those matching "
        "optimizer.no_weight_decay_keywords=%s; weight_decay=%g on the rest",
        len(excluded), len(names), 100 * sum(names[n] for n in excluded) / sum(names.values()), patterns,
        cfg.weight_decay,
    )


def param_groups(model_parts: Sequence[nn.Module], cfg: Optimizer) -> list[dict[str, Any]]:
    """The parts' trainable parameters as optimizer param groups: one, or with no_weight_decay_keywords the
    decaying ones and then (weight_decay 0) the others, leaving out an empty group."""
    decay, no_decay = [], []
    for part in model_parts:
        for name, p in part.named_parameters():
            if p.requires_grad:
                (no_decay if _no_decay(plain_name(name), cfg.no_weight_decay_keywords) else decay).append(p)
    groups = [{"params": decay}] if decay else []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model_parts: list[nn.Module], cfg: Optimizer, *, device_type: str) -> torch.optim.Optimizer:
    check_optimizer(cfg, device_type=device_type)
    impl = {"fused": cfg.implementation == "fused", "foreach": cfg.implementation == "foreach"}
    cls = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}[cfg.name]
    return cls(
        param_groups(model_parts, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        weight_decay=cfg.weight_decay, **impl,
    )


def build_optimizers(model_parts: list[nn.Module], cfg: Optimizer, *, device_type: str) -> list[torch.optim.Optimizer]:
    """One optimizer per model part (pipeline stages on this rank): each part's optimizer state then
    keeps its own parameter names in the checkpoint, the same names a one-part run saves."""
    return [build_optimizer([part], cfg, device_type=device_type) for part in model_parts]
