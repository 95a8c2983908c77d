from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS, RopeScaling, TransformerArgs
from torchtitan_like.models.llama3.model import Transformer

__all__ = ["LLAMA3_FLAVORS", "RopeScaling", "Transformer", "TransformerArgs"]
