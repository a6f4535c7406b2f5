"""Pretrained models loaded offline from pip packages, with numpy-level readers."""

from ._efficientnet_lite0 import (
    EFFICIENTNET_LITE0_NORMALIZATION as EFFICIENTNET_LITE0_NORMALIZATION,
)
from ._efficientnet_lite0 import efficientnet_lite0 as efficientnet_lite0
from ._gguf import llama_from_gguf as llama_from_gguf
from ._hf_folder import llama_from_hf as llama_from_hf
from ._imagenet import imagenet_labels as imagenet_labels
from ._minilm import minilm as minilm
from ._mobilenet_v2 import MOBILENET_V2_NORMALIZATION as MOBILENET_V2_NORMALIZATION
from ._mobilenet_v2 import mobilenet_v2 as mobilenet_v2
from ._smollm2 import smollm2 as smollm2
from ._torch_checkpoint import read_torch_checkpoint as read_torch_checkpoint
