"""Export worker of ``acmoe-export-hf`` (run under torchrun, one process): a trained run as a Hugging
Face ``transformers`` model directory, checked against megatron before it is declared done.

The run's checkpoint is loaded into one process (``evaluate.load_trained``: the parallel layout it
was saved in is resharded to TP = PP = EP = 1), a ``batch``-trained AC model gets its calibrated
table (inference/calibration.py; an ``ema`` model carries its running statistics), and
``hf.convert.export`` writes the directory. Then the export is loaded back with
``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` and its logits on the first
validation sample are compared with megatron's (max |difference| ≤ ``--tolerance``, default 1e-4):
a mismatch exits non-zero and says so. ``OUT/acmoe_export.json`` records the source run, iteration,
AC statistics and the check.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from acmoe_megatron.data.shards.manifest import read_manifest
from acmoe_megatron.data.shards.store import ShardSamples
from acmoe_megatron.inference.hf.convert import export
from acmoe_megatron.inference.loader import load_trained
from acmoe_megatron.model.chunk_state import state_of
from acmoe_megatron.runtime import cpu_runtime
from acmoe_megatron.runtime.lifetime import die_with_parent


def parse_cli(argv=None):
    p = argparse.ArgumentParser(prog="acmoe-export-hf-worker", description="acmoe-export-hf worker (under torchrun)")
    p.add_argument("--config", required=True, help="the run's resolved recipe (RUN_DIR/config.yaml)")
    p.add_argument("--data", required=True, help="the run's shard directory (tokenizer, the check's sample)")
    p.add_argument("--out", required=True, help="the Hugging Face model directory to write")
    p.add_argument("--stats-file", default=None, help="calibrated AC statistics to export")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |logit difference| of the check")
    p.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE overrides")
    return p.parse_args(argv)


def check_sample(data: str, seq_length: int) -> torch.Tensor:
    """The first validation (else test, else train) sample's input tokens ``[1, S]``."""
    import numpy as np

    manifest = read_manifest(data)
    split = next(s for s in ("valid", "test", "train") if s in manifest.splits and manifest.splits[s].num_samples)
    store = ShardSamples(data, split)
    try:
        sample = store.read(np.array([0]))[0]
    finally:
        store.close()
    return torch.as_tensor(sample[:seq_length].astype("int64")).unsqueeze(0)


def main(argv=None) -> None:
    die_with_parent()  # a killed torchrun / launcher takes this worker with it (runtime/lifetime.py)
    cpu_runtime.install_for_training()

    cli = parse_cli(argv)
    start = time.time()
    with cpu_runtime.device_redirect():  # without CUDA: megatron's device="cuda" requests -> CPU
        recipe, args, model, iteration = load_trained(cli.config, cli.overrides, cli.data, "acmoe-export-hf",
                                                      stats_file=cli.stats_file)
        tokenizer = read_manifest(cli.data).tokenizer
        out = export(model, recipe, cli.out, megatron_args=args, tokenizer=tokenizer)
        tokens = check_sample(cli.data, args.seq_length)
        chunk = model[0]
        state_of(chunk).reset()
        with torch.no_grad():
            reference = chunk(tokens.to(next(chunk.parameters()).device), torch.arange(tokens.shape[1]).unsqueeze(0),
                              None).float().cpu()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(tokens).logits.float()
    vocab = min(logits.shape[-1], reference.shape[-1])
    diff = float((logits[..., :vocab] - reference[..., :vocab]).abs().max())
    passed = diff <= cli.tolerance
    record = {"run_dir": str(Path(cli.config).parent), "iteration": iteration,
              "ac_statistics": "calibrated" if cli.stats_file else ("ema" if recipe.acmoe.source == "ema" else "none"),
              "stats_file": cli.stats_file, "router": recipe.acmoe.router,
              "check": {"tokens": int(tokens.shape[1]), "max_abs_logit_difference": diff, "tolerance": cli.tolerance,
                        "passed": passed},
              "wall_time_s": round(time.time() - start, 1)}
    (Path(out) / "acmoe_export.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"[acmoe-export-hf] wrote {out}; check on {tokens.shape[1]} tokens: max |HF - megatron logit| = {diff:.2e} "
          f"({'within' if passed else 'ABOVE'} {cli.tolerance:g})", flush=True)
    if not passed:
        raise SystemExit(f"acmoe-export-hf: the exported model's logits differ from megatron's by {diff:.2e} > "
                         f"{cli.tolerance:g}; the export in {out} is not faithful (please report this)")


if __name__ == "__main__":
    main()
