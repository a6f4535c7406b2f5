"""Texts -> token arrays with a `tokenizers.Tokenizer`: padded batches for encoders,
fixed-length windows over concatenated documents for language models, and the byte
count of what a window holds (for bits per byte)."""

from collections.abc import Sequence

import numpy as np
import tokenizers
from jaxtyping import Int

# End-of-document tokens, in order of preference, put between concatenated texts.
SEPARATORS = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")


def _check_tokenizer(tokenizer) -> None:
    if not isinstance(tokenizer, tokenizers.Tokenizer):
        raise TypeError(
            f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}; "
            "load one with recipes.pretrained or tokenizers.Tokenizer.from_file"
        )


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(
            f"texts must be a sequence of strings, got {type(texts).__name__}; "
            "wrap a single text in a list"
        )
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty sequence of strings")
    return list(texts)


def tokenize(
    tokenizer: tokenizers.Tokenizer, texts: Sequence[str]
) -> tuple[Int[np.ndarray, "n T"], Int[np.ndarray, "n T"]]:
    """Encode texts with the tokenizer's own settings (special tokens, truncation,
    padding: `recipes.pretrained.minilm`'s pads every text to its `max_length`).

    Args:
        tokenizer: a `tokenizers.Tokenizer` that pads to one length.
        texts: the texts.

    Returns:
        `(ids, mask)`, int32 arrays `(len(texts), T)`; mask is 1 on real tokens.
    """
    _check_tokenizer(tokenizer)
    encodings = tokenizer.encode_batch(_check_texts(texts))
    lengths = sorted({len(e.ids) for e in encodings})
    if len(lengths) > 1:
        raise ValueError(
            f"the tokenizer gave sequences of lengths {lengths[0]}..{lengths[-1]}; enable "
            "fixed padding (tokenizer.enable_padding(length=...)) to stack them"
        )
    ids = np.array([e.ids for e in encodings], dtype=np.int32)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int32)
    return ids, mask


def _separator_id(tokenizer: tokenizers.Tokenizer, separator: str | None) -> int:
    candidates = SEPARATORS if separator is None else (separator,)
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    if separator is not None:
        raise ValueError(
            f"separator {separator!r} is not in the tokenizer's vocabulary; "
            "pass one of its special tokens"
        )
    raise ValueError(
        f"the tokenizer has none of the end-of-document tokens {list(SEPARATORS)}; "
        "pass separator= with the token to put between texts"
    )


def token_windows(
    tokenizer: tokenizers.Tokenizer,
    texts: Sequence[str],
    seq_len: int,
    count: int,
    *,
    seed: int,
    separator: str | None = None,
) -> Int[np.ndarray, "count seq_len"]:
    """`count` non-overlapping windows of `seq_len` tokens over the concatenated texts.

    Each text is encoded without special tokens, padding or truncation (on a copy:
    the tokenizer passed in is left as it is) and followed by an end-of-document token;
    the stream is cut into consecutive windows of `seq_len` tokens and `count` of them
    are picked by a seeded permutation, so they spread over all the texts. A window may
    span the end of one text and the start of the next. For next-token losses, ask
    for `seq_len = T + 1` and use `w[:, :-1]` as inputs, `w[:, 1:]` as targets.

    Args:
        tokenizer: a `tokenizers.Tokenizer`.
        texts: the documents, in order.
        seq_len: tokens per window.
        count: number of windows.
        seed: seed of the pick; the same arguments give the same windows.
        separator: the token put after each text; None takes the first of
            `<|endoftext|>`, `</s>`, `<eos>`, `[SEP]` in the vocabulary.

    Returns:
        int32 token ids `(count, seq_len)`, windows in stream order.
    """
    _check_tokenizer(tokenizer)
    texts = _check_texts(texts)
    for name, value in [("seq_len", seq_len), ("count", count)]:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    plain = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    plain.no_padding()
    plain.no_truncation()
    sep = _separator_id(plain, separator)
    encodings = plain.encode_batch(texts, add_special_tokens=False)
    stream = np.concatenate([np.asarray(e.ids + [sep], dtype=np.int32) for e in encodings])
    available = stream.shape[0] // seq_len
    if available < count:
        raise ValueError(
            f"the {len(texts)} texts give {stream.shape[0]:,} tokens, {available:,} windows "
            f"of seq_len={seq_len}, fewer than count={count} (needs {count * seq_len:,} "
            "tokens); pass more text, a smaller count or a shorter seq_len"
        )
    picked = np.sort(np.random.default_rng(seed).permutation(available)[:count])
    return stream[picked[:, None] * seq_len + np.arange(seq_len)[None, :]]


def text_bytes(tokenizer: tokenizers.Tokenizer, ids: Int[np.ndarray, "n T"]) -> int:
    """UTF-8 bytes of the text that token ids decode to, summed over the rows (special
    tokens, such as the separators of `token_windows`, are skipped): the denominator
    of bits per byte. Exact for byte-level BPE tokenizers (LLaMA, GPT-2 families) but
    for a character split between two rows; for WordPiece (BERT) decoding normalizes
    the text, so the count is approximate.

    Args:
        tokenizer: the tokenizer that made the ids.
        ids: token ids, one row per window (e.g. the targets `w[:, 1:]`).

    Returns:
        The byte count.
    """
    _check_tokenizer(tokenizer)
    rows = np.asarray(ids)
    if rows.ndim != 2:
        raise ValueError(f"ids must be 2-D (windows, tokens), got shape {rows.shape}")
    decoded = tokenizer.decode_batch(rows.tolist(), skip_special_tokens=True)
    return sum(len(t.encode("utf-8")) for t in decoded)
