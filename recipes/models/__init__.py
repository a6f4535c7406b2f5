"""Vision (and later text) models for the recipes, as unbatched Equinox modules."""

from ._bert import Bert
from ._bert_layers import (
    BertAttention,
    BertEmbeddings,
    BertIntermediate,
    BertLayer,
    BertOutput,
)
from ._efficientnet import EfficientNet, MBConv, efficientnet_b0
from ._efficientnet_lite import EFFICIENTNET_LITE0_STAGES, EfficientNetLite
from ._fold import FoldedBatchNorm, fold_batchnorm
from ._generate import generate_greedy
from ._layers import BATCH_AXIS, StochasticDepth
from ._llama import Llama
from ._llama_layers import KVCache, LlamaAttention, LlamaBlock, LlamaConfig, LlamaMLP
from ._mobilenet_v2 import MOBILENET_V2_STAGES, InvertedResidual, MobileNetV2
from ._resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50
from ._transformer import BYTE_VOCAB, Transformer, TransformerBlock, TransformerMLP

__all__ = [
    "BATCH_AXIS",
    "BYTE_VOCAB",
    "EFFICIENTNET_LITE0_STAGES",
    "MOBILENET_V2_STAGES",
    "BasicBlock",
    "Bert",
    "BertAttention",
    "BertEmbeddings",
    "BertIntermediate",
    "BertLayer",
    "BertOutput",
    "Bottleneck",
    "EfficientNet",
    "EfficientNetLite",
    "FoldedBatchNorm",
    "InvertedResidual",
    "KVCache",
    "Llama",
    "LlamaAttention",
    "LlamaBlock",
    "LlamaConfig",
    "LlamaMLP",
    "MBConv",
    "MobileNetV2",
    "ResNet",
    "StochasticDepth",
    "Transformer",
    "TransformerBlock",
    "TransformerMLP",
    "efficientnet_b0",
    "fold_batchnorm",
    "generate_greedy",
    "resnet18",
    "resnet34",
    "resnet50",
]
