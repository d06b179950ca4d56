"""The trainer: recipe loading, megatron argument mapping, run plan, trainer hooks, checkpoint checks, the CPU runtime."""
