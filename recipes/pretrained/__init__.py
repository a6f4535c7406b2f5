"""Pretrained models loaded offline from pip packages, with numpy-level readers."""

from ._minilm import minilm as minilm
