#!/bin/bash
# Environment of the training steps: sourced by pretrain.sbatch on the head node before any step
# starts (srun passes the environment to every task). Each variable keeps a value the job already
# has (from the submitting shell, --env KEY=VALUE, or ENV_FILE, which is sourced after this file).
#
# NCCL / Transformer Engine: the defaults NeMo-Run's and Megatron-Bridge's Slurm executors set
# (DEFAULT_ENV_VARS of their performance recipes), plus megatron's own requirement.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}        # megatron: TP/SP comm overlap order
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a lost rank ends the job, no hang
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}  # frees collective buffers sooner
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}                              # NVLink SHARP off (memory, stability)
export NVTE_DP_AMAX_REDUCE_INTERVAL=${NVTE_DP_AMAX_REDUCE_INTERVAL:-0}      # FP8 delayed scaling: no DP amax reduce
export NVTE_ASYNC_AMAX_REDUCTION=${NVTE_ASYNC_AMAX_REDUCTION:-1}            # FP8: overlap the amax reduction
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
