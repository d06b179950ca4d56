"""Plain-text files as a corpus: a directory (all files, recursively) or a glob pattern.

- A directory selects every regular file below it, recursively, except hidden files and files in
  hidden directories (names starting with "."). Relative paths are taken from the directory.
- A glob (``*``, ``?``, ``[``; ``**`` matches across directories) selects the regular files it
  matches. Relative paths are taken from the glob's literal leading directory, e.g. ``data/raw``
  for ``data/raw/**/*.txt``, so a file's split does not depend on which other files match.
- Files with NUL bytes are rejected as binary (see ``corpus.FileCorpus.documents``).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from acmoe_megatron.data.corpora.corpus import FileCorpus

__all__ = ["select_files", "text_files_corpus"]


def select_files(spec: str, suffixes: tuple[str, ...] | None = None, what: str = "text") -> tuple[Path, list[str]]:
    """The files named by a directory, a file or a glob: ``(root, relative posix paths)``.

    ``suffixes`` (e.g. ``(".jsonl",)``) restricts what a directory contributes; ``what`` names
    the kind of file in error messages.
    """
    if glob.has_magic(spec):
        root = _literal_prefix_dir(spec)
        files = [Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
        relpaths = [Path(os.path.relpath(p, root)).as_posix() for p in files]
    elif os.path.isdir(spec):
        root = Path(spec)
        relpaths = [
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
            and (suffixes is None or p.name.lower().endswith(suffixes))
        ]
    elif os.path.isfile(spec):
        root = Path(spec).parent
        relpaths = [Path(spec).name]
    else:
        raise FileNotFoundError(
            f"{what} source {spec!r} does not exist (no such file or directory, and not a glob "
            f"pattern); pass an existing {what} file or directory, a glob such as "
            f"'DIR/**/*{(suffixes or ('.txt',))[0]}', or --source stdlib"
        )
    if not relpaths:
        raise FileNotFoundError(
            f"{what} source {spec!r} matched no files"
            + (f" ending in {' or '.join(suffixes)}" if suffixes else "")
            + "; check the path or pattern (use '**' with a glob to match files in subdirectories)"
        )
    return root, relpaths


def text_files_corpus(
    path_or_glob: str | os.PathLike,
    valid_fraction: float = 0.02,
    test_fraction: float = 0.02,
    max_bytes: int | None = None,
) -> FileCorpus:
    """A ``FileCorpus`` over the text files named by a directory or a glob pattern."""
    spec = os.fspath(path_or_glob)
    root, relpaths = select_files(spec)
    return FileCorpus(
        kind="text",
        root=root,
        relpaths=relpaths,
        valid_fraction=valid_fraction,
        test_fraction=test_fraction,
        max_bytes=max_bytes,
        extra={"spec": spec},
    )


def _literal_prefix_dir(pattern: str) -> Path:
    """The leading directories of ``pattern`` that contain no glob characters."""
    parts = Path(pattern).parts
    literal = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        literal.append(part)
    return Path(*literal) if literal else Path(".")
