"""Preflight: a recipe's parallel layout, precision, storage and memory proven on the target
machines in minutes, before the allocation is spent (``acmoe-preflight``, ``acmoe-launch slurm
--preflight``).

* ``plan.py``     what the launching process derives: the shrunk recipe (the recipe's exact
                  layout, tiny dimensions, a few steps, checkpoints and TensorBoard on the run
                  directory's file system) and the full recipe's memory estimate (``memory.py``).
* ``worker.py``   the per-process worker (torchrun / srun): environment, fused paths, FP8 GEMM,
                  memory against the GPU, the shrunk model's training steps through megatron's own
                  trainer, collectives per process group, checkpoint and TensorBoard round trips;
                  one ``rank_<r>.json`` per process, rewritten after every item.
* ``report.py``   the merge of the rank files into ``preflight.json``, the verdict and the table
                  (no torch: the login node prints it).

Nothing like it exists to reuse: Megatron-LM, Megatron-Bridge and torchtitan start the real job;
nccl-tests times collectives but knows nothing of the recipe.
"""
