"""``acmoe-launch`` from a checkout: submit to SLURM or run locally (``acmoe_megatron.cli.launch``).

Examples::

    # render slurm/pretrain.sbatch for 2 nodes x 8 GPUs and print it
    python launch/acmoe_launch.py slurm --config configs/multinode_h100_fp8.yaml \\
        --nodes 2 --gpus-per-node 8 --partition batch --time 04:00:00 --dry-run
    # the same recipe on this machine (torchrun, 2 processes)
    python launch/acmoe_launch.py local --nproc 2 --config configs/tiny_cpu.yaml

The installed console script ``acmoe-launch`` is the same program. See docs/slurm.md.
"""

from acmoe_megatron.cli.launch import main

if __name__ == "__main__":
    raise SystemExit(main())
