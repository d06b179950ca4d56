"""Which library warnings a worker's log leaves out.

megatron-core and torch warn at import and at every model build about things a user of this
package cannot act on (deprecated megatron internals, CPU-only code paths, torch's own
deprecations inside megatron); in a multi-process log they repeat once per rank and bury the
lines that matter. The filter is by the module that warns: warnings raised in megatron, torch,
Transformer Engine or Apex are left out; every warning raised in our code, or attributed to it
(a deprecation of something we call), still shows. Replaces the earlier process-wide
``filterwarnings("ignore", category=UserWarning)``, which hid ours too.
"""

from __future__ import annotations

import warnings

LIBRARIES = r"(megatron|torch|transformer_engine|apex)(\..*)?"


def quiet_library_warnings() -> None:
    for category in (UserWarning, DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
