"""Tokenizers for LLaMA-family checkpoints, as `tokenizers.Tokenizer`: built from a GGUF
file's own vocabulary and merges (GPT-2 byte-level BPE), or read from a tokenizer.json.
"""

import os
from collections.abc import Callable, Sequence

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
)

# llama.cpp's token types (gguf.TokenType): CONTROL tokens are special (<|im_end|>),
# USER_DEFINED ones are matched whole but decoded like text.
_CONTROL = 3
_USER_DEFINED = 4


def _starcoder_split():
    # llama.cpp's STARCODER/SMOLLM/REFACT pre-tokenizer: every digit alone, then GPT-2's regex.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _gpt2_split():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "smollm": _starcoder_split,
    "starcoder": _starcoder_split,
    "refact": _starcoder_split,
    "gpt2": _gpt2_split,
}


def _merge_pairs(merges: Sequence[str], path: str) -> list[tuple[str, str]]:
    """The BPE merges "a b" as pairs; raises on an entry that is not two tokens."""
    pairs = [tuple(merge.split(" ")) for merge in merges]
    bad = [merge for merge, pair in zip(merges, pairs) if len(pair) != 2]
    if bad:
        raise ValueError(
            f"{path}: tokenizer.ggml.merges has entries that are not two tokens "
            f"separated by one space, e.g. {bad[0]!r}; the file's vocabulary is not GPT-2 "
            "byte-level BPE. Pass tokenizer_json= instead"
        )
    return pairs


def _add_bos_eos(tokenizer: Tokenizer, metadata, tokens: Sequence[str], path: str) -> None:
    """Give `tokenizer` its post-processor: BOS / EOS added where the GGUF metadata asks
    for it, else the byte-level one."""
    template, specials = ["$A"], []
    for key in ("bos", "eos"):
        if not metadata(f"tokenizer.ggml.add_{key}_token", False):
            continue
        token_id = metadata(f"tokenizer.ggml.{key}_token_id", None)
        if token_id is None:
            raise ValueError(
                f"{path}: tokenizer.ggml.add_{key}_token is set but "
                f"tokenizer.ggml.{key}_token_id is missing; pass tokenizer_json= instead"
            )
        token = tokens[int(token_id)]
        template = [token, *template] if key == "bos" else [*template, token]
        specials.append((token, int(token_id)))
    if specials:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(template), special_tokens=specials
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)


def tokenizer_from_gguf_metadata(metadata: Callable[[str, object], object], path: str) -> Tokenizer:
    """The byte-level BPE tokenizer that a GGUF file's `tokenizer.ggml.*` keys describe.

    Args:
        metadata: `metadata(key, default)` returns a metadata value (default if absent).
        path: the GGUF file, for error messages.

    Returns:
        A `tokenizers.Tokenizer` with the file's control tokens as special tokens and
        BOS/EOS added to encodings where the file asks for it.
    """
    kind = metadata("tokenizer.ggml.model", None)
    if kind != "gpt2":
        raise ValueError(
            f"{path}: tokenizer.ggml.model={kind!r} is not supported; only 'gpt2' "
            "(byte-level BPE) vocabularies are built from GGUF metadata. Pass "
            "tokenizer_json= the model's tokenizer.json instead"
        )
    pre = metadata("tokenizer.ggml.pre", "gpt2")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"{path}: tokenizer.ggml.pre={pre!r} is not supported (supported: "
            f"{', '.join(sorted(_PRE_TOKENIZERS))}). Pass tokenizer_json= the model's "
            "tokenizer.json instead"
        )
    tokens: Sequence[str] = metadata("tokenizer.ggml.tokens", None)
    merges: Sequence[str] = metadata("tokenizer.ggml.merges", None)
    if tokens is None or merges is None:
        raise ValueError(
            f"{path}: tokenizer.ggml.tokens/merges missing from the metadata; pass "
            "tokenizer_json= the model's tokenizer.json instead"
        )
    pairs = _merge_pairs(merges, path)
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    types = metadata("tokenizer.ggml.token_type", None) or [1] * len(tokens)
    tokenizer.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, token_type in zip(tokens, types)
            if token_type == _CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(token, special=False, normalized=False)
            for token, token_type in zip(tokens, types)
            if token_type == _USER_DEFINED
        ]
    )
    _add_bos_eos(tokenizer, metadata, tokens, path)
    return tokenizer


def tokenizer_from_json(path: str | os.PathLike) -> Tokenizer:
    """Read a Hugging Face `tokenizer.json`.

    Args:
        path: the file.

    Returns:
        The `tokenizers.Tokenizer` it describes.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer file {path} does not exist; pass the path of a tokenizer.json"
        )
    try:
        return Tokenizer.from_file(path)
    except Exception as error:  # the Rust parser raises a bare Exception
        raise ValueError(
            f"{path}: not a readable tokenizer.json ({error}); pass a Hugging Face tokenizers file"
        ) from error
