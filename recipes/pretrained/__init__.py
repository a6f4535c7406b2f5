"""Pretrained checkpoints, read offline with numpy-level code, as recipes models."""

from ._gguf import llama_from_gguf as llama_from_gguf
from ._hf_folder import llama_from_hf as llama_from_hf
from ._smollm2 import smollm2 as smollm2
