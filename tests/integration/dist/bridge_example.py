"""Runs examples/bridge_pretrain_acmoe.py unchanged (under torchrun), adding only what the parity test
reads: the per-step router gradient norms our trainer logs with ``run.log_router_grad_norms``,
written by the same function around Bridge's own GPT forward step. Directory: $ACMOE_GRAD_NORM_DIR.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "examples"))

import bridge_pretrain_acmoe as example  # noqa: E402

from acmoe_megatron.runtime import hooks as run_hooks  # noqa: E402

LOG_DIR = Path(os.environ["ACMOE_GRAD_NORM_DIR"])


def logged_forward_step():
    from megatron.bridge.training.gpt_step import forward_step as gpt_forward_step
    from megatron.bridge.training.state import GlobalState

    def forward_step(state: GlobalState, data_iterator, model, return_schedule_plan: bool = False):
        run_hooks.log_router_grad_norms(model, LOG_DIR)
        return gpt_forward_step(state, data_iterator, model, return_schedule_plan)

    return forward_step


if __name__ == "__main__":
    # Bridge is imported only after the example installed its CPU shims (main() does that first)
    example.main(forward_step=lambda: logged_forward_step())
