"""Runs examples/pretrain_gpt_acmoe.py unchanged (under torchrun), adding only what the parity test
reads: the per-step router gradient norms our trainer logs with ``run.log_router_grad_norms``,
written by the same function around the example's own forward step. Directory: $ACMOE_GRAD_NORM_DIR.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "examples"))

import pretrain_gpt_acmoe as example  # noqa: E402

from acmoe_megatron.runtime import hooks as run_hooks  # noqa: E402

LOG_DIR = Path(os.environ["ACMOE_GRAD_NORM_DIR"])
plain_forward_step = example.forward_step


def forward_step(data_iterator, model):
    run_hooks.log_router_grad_norms(model, LOG_DIR)
    return plain_forward_step(data_iterator, model)


example.forward_step = forward_step  # main() looks it up when it calls pretrain

if __name__ == "__main__":
    example.main()
