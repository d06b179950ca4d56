"""Synthetic inputs for the data tests (plain functions; the fixtures live in conftest.py)."""

from __future__ import annotations

WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()


def synthetic_words(seed: int, n_words: int) -> list[str]:
    """Random lower-case words (no 'AAA'), from a fixed list plus made-up ones."""
    import numpy as np

    rng = np.random.default_rng(seed)
    extra = ["".join(rng.choice(list("bcdfghklmnprstvwxyz"), size=k)) for k in rng.integers(2, 9, size=200)]
    vocab = WORDS + extra + ["naïve", "café", "日本"]
    return [vocab[i] for i in rng.integers(0, len(vocab), size=n_words)]


def wikitext_file_text(seed: int, n_articles: int, words_per_paragraph: int = 60) -> str:
    """Text in the WikiText token-file layout: ' = Title = ' articles with ' = = Section = = '."""
    words = iter(synthetic_words(seed, n_articles * 4 * words_per_paragraph))
    lines = [" \n"]
    for a in range(n_articles):
        lines += [f" = Article {seed} {a} = \n", " \n"]
        for p in range(4):
            if p == 2:
                lines += [" = = Section two = = \n", " \n"]
            lines += [" " + " ".join(next(words) for _ in range(words_per_paragraph)) + " \n", " \n"]
    return "".join(lines)
