"""The embedded default corpus: the running Python's standard-library source code.

Every Python install carries ~10 MB of real, varied, permissively licensed text, so the project
can train and test without downloading anything. The corpus is:

- all ``*.py`` files under ``sysconfig.get_paths()["stdlib"]``, recursively;
- excluding ``site-packages``/``dist-packages`` (third-party code) and test suites: directories
  named ``test`` or ``tests`` and ``idlelib/idle_test`` (this also removes ``lib2to3/tests``);
- sorted by relative posix path and split train/valid/test by a stable hash of that path
  (see ``corpus.split_of``).

The content depends on the Python version; the manifest records it.
"""

from __future__ import annotations

import platform
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from acmoe_megatron.data.corpora.corpus import Document, FileCorpus

__all__ = ["stdlib_corpus", "stdlib_documents", "stdlib_files", "stdlib_root"]

_EXCLUDED_DIR_NAMES = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__"})
_EXCLUDED_DIR_PATHS = ("idlelib/idle_test", "lib2to3/tests")


def stdlib_root() -> Path:
    """The standard-library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative posix paths of the standard-library ``*.py`` files in the corpus, sorted."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"standard-library directory {root} does not exist; this Python install has no stdlib "
            "sources (e.g. a stripped container image). Use --source PATH_OR_GLOB with text files instead."
        )
    selected = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        dirs = rel.split("/")[:-1]
        if any(d in _EXCLUDED_DIR_NAMES for d in dirs):
            continue
        dir_path = "/" + "/".join(dirs) + "/"
        if any(f"/{p}/" in dir_path for p in _EXCLUDED_DIR_PATHS):
            continue
        if path.is_file():
            selected.append(rel)
    return sorted(selected)


def stdlib_corpus(
    valid_fraction: float = 0.02,
    test_fraction: float = 0.02,
    max_bytes: int | None = None,
    root: Path | None = None,
) -> FileCorpus:
    """The standard-library corpus as a ``FileCorpus`` (see the module docstring)."""
    root = stdlib_root() if root is None else Path(root)
    return FileCorpus(
        kind="stdlib",
        root=root,
        relpaths=stdlib_files(root),
        valid_fraction=valid_fraction,
        test_fraction=test_fraction,
        max_bytes=max_bytes,
        extra={"python_version": platform.python_version(), "pattern": "**/*.py"},
    )


def stdlib_documents(
    split: str,
    valid_fraction: float = 0.02,
    test_fraction: float = 0.02,
    max_bytes: int | None = None,
) -> Iterator[Document]:
    """Yield ``(relative_path, text)`` documents of one split of the standard-library corpus."""
    yield from stdlib_corpus(valid_fraction, test_fraction, max_bytes).documents(split)
