"""The router-quality benchmark behind ``benchmarks/quality.py`` (the command line: argument
parsing and ``main``), one concern per module:

- ``rows``: the rows (name + recipe overrides on one shared base recipe: ``ROWS``, add a row
  there), the ablation table's pairs (``ABLATIONS``), the small default CPU model
  (``CPU_DEFAULTS``), the ``Plan`` of one invocation built from the arguments, each run's
  overrides and the hash of the base recipe every row shares;
- ``statistics``: pure statistics over the per-run results: mean ± std over seeds, steps to a
  target loss, differences paired by seed with their 95 % confidence interval, the verdict lines;
- ``runner``: training one (row, seed) through ``acmoe-pretrain`` and evaluating its final
  checkpoint on word-swap-corrupted text, extracting the results from TensorBoard / the summary /
  the log, and the per-run JSON cache;
- ``report``: the Markdown results file (header, settings, tables, verdict, investigation notes);
- ``figures``: the validation-curve figure and ``acmoe-plot`` of the first seed's runs.

Importing the package is cheap: torch, matplotlib and acmoe_megatron are imported inside the
functions that need them.
"""
