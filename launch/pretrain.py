"""Megatron-style training script: the ACMoE pretraining worker, for torchrun / srun.

Every process runs this file; it is ``acmoe_megatron.runtime.train.main`` (see that module for details).

Examples::

    # one machine, 2 processes, expert parallel 2 over gloo (CPU)
    torchrun --nproc_per_node 2 launch/pretrain.py --config configs/tiny_cpu.yaml
    # overrides: SECTION.KEY=VALUE, values parsed as YAML
    torchrun --nproc_per_node 2 launch/pretrain.py --config configs/tiny_cpu.yaml \
        megatron.train_iters=100 acmoe.router=cosine run.dir=runs/cosine
    # 8 GPUs on one node
    torchrun --nproc_per_node 8 launch/pretrain.py --config configs/<gpu recipe>.yaml

The data directory named by ``data.path`` must exist (``acmoe-data prepare``), or use
``acmoe-pretrain``, which builds the embedded corpus and starts torchrun for you.
"""

from acmoe_megatron.runtime.train import main

if __name__ == "__main__":
    main()
