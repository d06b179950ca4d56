"""Corpus readers: where the text of ``acmoe-data prepare`` comes from, and how it is split.

- ``corpus``: the ``Document``/``Corpus`` base (``FileCorpus``), the deterministic train/valid/test
  split of documents (``split_of``) and the checks shared by the readers.
- readers: ``stdlib`` (this Python's standard-library sources, the embedded default), ``text``
  (plain-text files), ``records`` (the base of ``jsonl`` and ``parquet``), ``wikitext``, ``enwik8``
  and ``synthetic``.
- ``sources``: the registry that turns a ``--source``/``--format`` into a corpus (``resolve_source``).
- ``corrupt``: word-swap corruption of the evaluation splits (``--corrupt word-swap:P``).

Modules that need optional libraries (``parquet``: pyarrow) import them only when used.
"""
