"""The errors our checks raise: each message names the problem and the fix.

One module for them so that a check anywhere (recipe loading, the launchers, the data loader, the
run plan) raises the same class without importing the module that happens to use it most, and so
that the data package's modules need no import of one another for an exception (that was the
manifest → remote → store → manifest cycle of the shard modules).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key and the fix."""


class ShardError(RuntimeError):
    """A shard is missing, corrupt or does not match the manifest."""
