"""Model registry: family name -> flavors and constructor. Read-only after import."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

from torchtitan_like.models.llama3 import LLAMA3_FLAVORS, Transformer, TransformerArgs


@dataclass(frozen=True)
class ModelSpec:
    name: str
    flavors: Mapping[str, TransformerArgs]
    build: Callable[[TransformerArgs], nn.Module]


MODELS: Mapping[str, ModelSpec] = MappingProxyType(
    {"llama3": ModelSpec(name="llama3", flavors=MappingProxyType(LLAMA3_FLAVORS), build=Transformer)}
)
