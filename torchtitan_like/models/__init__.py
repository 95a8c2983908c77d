"""Model registry: family name -> flavors and constructor. Read-only after import."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from torch import nn

from torchtitan_like.models.llama3 import LLAMA3_FLAVORS, Transformer, TransformerArgs


@dataclass(frozen=True)
class ModelSpec:
    name: str
    flavors: Mapping[str, TransformerArgs]
    build: Callable[[TransformerArgs], nn.Module]

    def args(self, flavor: str, *, n_layers: int | None = None) -> TransformerArgs:
        """The flavor's arguments, with `n_layers` blocks instead of its own when given (model.n_layers)."""
        args = self.flavors[flavor]
        return args if n_layers is None else replace(args, n_layers=n_layers)


MODELS: Mapping[str, ModelSpec] = MappingProxyType(
    {"llama3": ModelSpec(name="llama3", flavors=MappingProxyType(LLAMA3_FLAVORS), build=Transformer)}
)
