"""Vision (and later text) models for the recipes, as unbatched Equinox modules."""

from ._bert import (
    Bert,
    BertAttention,
    BertEmbeddings,
    BertIntermediate,
    BertLayer,
    BertOutput,
)
from ._efficientnet import EfficientNet, MBConv, efficientnet_b0
from ._generate import generate_greedy
from ._layers import BATCH_AXIS, StochasticDepth
from ._llama import KVCache, Llama, LlamaAttention, LlamaBlock, LlamaConfig, LlamaMLP
from ._resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50
from ._transformer import BYTE_VOCAB, Transformer, TransformerBlock, TransformerMLP

__all__ = [
    "BATCH_AXIS",
    "BYTE_VOCAB",
    "BasicBlock",
    "Bert",
    "BertAttention",
    "BertEmbeddings",
    "BertIntermediate",
    "BertLayer",
    "BertOutput",
    "Bottleneck",
    "EfficientNet",
    "KVCache",
    "Llama",
    "LlamaAttention",
    "LlamaBlock",
    "LlamaConfig",
    "LlamaMLP",
    "MBConv",
    "ResNet",
    "StochasticDepth",
    "Transformer",
    "TransformerBlock",
    "TransformerMLP",
    "efficientnet_b0",
    "generate_greedy",
    "resnet18",
    "resnet34",
    "resnet50",
]
