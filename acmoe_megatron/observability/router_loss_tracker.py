"""Megatron's MoE metrics tracker, reporting our routers' own losses too.

Megatron's ``training_log`` asks its global ``MoEMetricsTracker`` to report a fixed list of names
(``track_names``: the load-balancing and z losses). A loss that one of our routers records through the
same tracker (StableMoE's distillation loss) would be accumulated but never reported. ``RouterLossTracker``
adds those names to every such request; ``observability.report_extra_moe_losses`` installs it with
megatron's own ``set_moe_metrics_tracker``, so it is reduced and logged exactly like megatron's losses.
Kept apart from ``observability`` because importing it imports megatron-core.
"""

from __future__ import annotations

from megatron.core.transformer.moe.moe_logging import MoEMetricsTracker


class RouterLossTracker(MoEMetricsTracker):
    def __init__(self, extra_names: tuple[str, ...]):
        super().__init__()
        self.extra_names = tuple(extra_names)

    def report(self, *args, track_names=None, **kwargs):
        if track_names is not None:  # None already reports every recorded name
            names = [track_names] if isinstance(track_names, str) else list(track_names)
            track_names = names + [n for n in self.extra_names if n not in names]
        return super().report(*args, track_names=track_names, **kwargs)
