"""Pretrained models loaded offline from pip packages, with numpy-level readers."""

from ._gguf import llama_from_gguf as llama_from_gguf
from ._hf_folder import llama_from_hf as llama_from_hf
from ._minilm import minilm as minilm
from ._smollm2 import smollm2 as smollm2
