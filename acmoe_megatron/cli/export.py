"""``acmoe-export-hf RUN_DIR OUT``: a trained run as a Hugging Face ``transformers`` model directory.

    acmoe-export-hf runs/tiny_cpu hf/tiny_cpu
    acmoe-export-hf runs/tiny_cpu hf/tiny_cpu_200 --iteration 200

    python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; \\
      m = AutoModelForCausalLM.from_pretrained('hf/tiny_cpu', trust_remote_code=True); \\
      t = AutoTokenizer.from_pretrained('hf/tiny_cpu', trust_remote_code=True); \\
      print(t.decode(m.generate(**t('def main(', return_tensors='pt'), max_new_tokens=40)[0]))"

OUT gets config.json, model.safetensors, generation_config.json, the modelling code (loaded with
``trust_remote_code=True``: hf/modeling_acmoe.py), the tokenizer, and ``acmoe_export.json``. The
export is checked before the command succeeds: the HF model's logits on a validation sample equal
megatron's (max difference ≤ 1e-4). AC layers export a fixed transform: an ``acmoe.source: batch``
model needs ``acmoe-eval RUN_DIR --calibrate N`` first (refused otherwise, before any process
starts). Needs the ``hf`` extra: ``pip install 'acmoe-megatron[hf]'``.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from acmoe_megatron.cli.common import refuse_or_launch, run_worker, single_process_plan
from acmoe_megatron.core import registry
from acmoe_megatron.core.errors import ConfigError
from acmoe_megatron.data.shards.manifest import read_manifest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="acmoe-export-hf", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("run_dir", help="a run directory of acmoe-pretrain (config.yaml + checkpoints/)")
    p.add_argument("out", help="the Hugging Face model directory to write (new or empty)")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the latest)")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT (its files are replaced)")
    p.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE recipe overrides")
    return p


def plan(cli) -> list[str]:
    """The worker's arguments after every check that needs no process, or ConfigError."""

    missing = [m for m in ("transformers", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"acmoe-export-hf needs {' and '.join(missing)}: pip install 'acmoe-megatron[hf]'")
    out = Path(cli.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not cli.force)):
        raise ConfigError(f"{out} exists and is not an empty directory; choose another OUT or pass --force")
    recipe, overrides, worker = single_process_plan(Path(cli.run_dir), cli.iteration, cli.overrides,
                                                    "which an exported model cannot carry")
    refusal = registry.entry(recipe.acmoe.router).hf_refusal
    if refusal is not None:
        raise ConfigError(f"acmoe.router={recipe.acmoe.router!r} cannot be exported: {refusal}")
    if recipe.elliptical.enabled:
        raise ConfigError("elliptical attention cannot be exported (the HF model has megatron's dot-product attention)")
    if recipe.megatron.get("hybrid_layer_pattern"):
        raise ConfigError("a HybridModel run (megatron.hybrid_layer_pattern) cannot be exported yet: the HF model is a "
                          "GPT decoder of attention+MLP layers; acmoe-eval and acmoe-generate load it")
    try:
        read_manifest(recipe.data.path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"the run's data {recipe.data.path} (its tokenizer and the check's sample): {err}") from None
    return worker + ["--data", str(recipe.data.path), "--out", str(out), *overrides]


def main(argv=None) -> int:
    cli = _parser().parse_intermixed_args(argv)
    config = ["--config", str(Path(cli.run_dir) / "config.yaml")]
    return refuse_or_launch("acmoe-export-hf", lambda: plan(cli), lambda worker: run_worker(
        "acmoe_megatron.inference.export_hf", 1, [*config, *worker], prog="acmoe-export-hf", what="export"))


if __name__ == "__main__":
    raise SystemExit(main())
