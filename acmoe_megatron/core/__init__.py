"""Settings, errors, layer arithmetic, router registry, AC statistics and labels: no megatron import."""
