"""``acmoe-generate RUN_DIR --prompt TEXT``: sample text from a trained run's checkpoint.

    acmoe-generate runs/tiny_cpu --prompt "def main(" --max-new-tokens 64                 # greedy
    acmoe-generate runs/tiny_cpu --prompt "import " --temperature 0.8 --top-p 0.95 --seed 1
    acmoe-generate runs/tiny_cpu --prompt "class " --out generations.json --iteration 200

Checks everything it can before any process starts (run directory and checkpoint, the tokenizer of
the run's data, prompt length + new tokens within the model's positions, AC statistics), then runs
``acmoe_megatron.inference.generate`` under torchrun in one process: the checkpoint, saved in any parallel
layout, is resharded into TP = PP = EP = 1, and decoding uses megatron's KV cache.

AC models must route with a batch-independent transform: an ``acmoe.source: ema`` model has one (its
running statistics); an ``acmoe.source: batch`` model needs ``acmoe-eval RUN_DIR --calibrate N``
first, otherwise it is refused (at single-token decoding its batch statistics would make it the
cosine router).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from acmoe_megatron.cli.common import refuse_or_launch, run_worker, single_process_plan
from acmoe_megatron.core.errors import ConfigError
from acmoe_megatron.data.shards.manifest import read_manifest
from acmoe_megatron.data.tokenizers.byte import tokenizer_from_manifest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="acmoe-generate", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("run_dir", help="a run directory of acmoe-pretrain (config.yaml + checkpoints/)")
    p.add_argument("--prompt", action="append", required=True, help="text to continue (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: no cut)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the latest)")
    p.add_argument("--out", default=None, help="also write the generations as JSON here")
    p.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE recipe overrides")
    return p


def plan(cli) -> tuple[object, list[str]]:
    """(recipe, worker arguments): every check that needs no process, or ConfigError."""

    run_dir = Path(cli.run_dir)
    recipe, overrides, worker = single_process_plan(
        run_dir, cli.iteration, cli.overrides, "and at single-token decoding every cluster holds one token (every "
        "AC weight 1: the cosine router, not the trained model)")
    if cli.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {cli.max_new_tokens}: give at least 1")
    if cli.temperature < 0 or not 0.0 < cli.top_p <= 1.0:
        raise ConfigError(f"--temperature {cli.temperature} / --top-p {cli.top_p}: need temperature >= 0 and "
                          "0 < top-p <= 1")
    try:
        manifest = read_manifest(recipe.data.path)
        tokenizer = tokenizer_from_manifest(manifest.tokenizer)
    except (OSError, ValueError) as err:
        raise ConfigError(f"the run's data {recipe.data.path} names the tokenizer: {err}") from None
    limit = int(recipe.megatron.get("max_position_embeddings") or manifest.seq_length)
    for prompt in cli.prompt:
        n = len(tokenizer.tokenize(prompt))
        if n == 0:
            raise ConfigError("--prompt '': give at least one token of text")
        if n + cli.max_new_tokens > limit:
            raise ConfigError(f"--prompt of {n} tokens + --max-new-tokens {cli.max_new_tokens} exceeds the model's "
                              f"{limit} positions (max_position_embeddings); shorten one of them")
        worker.append(f"--prompt={prompt}")
    worker += ["--data", str(recipe.data.path), "--max-new-tokens", str(cli.max_new_tokens),
               "--temperature", str(cli.temperature), "--top-p", str(cli.top_p), "--seed", str(cli.seed)]
    if cli.out:
        worker += ["--out", str(cli.out)]
    return recipe, worker + overrides


def main(argv=None) -> int:
    cli = _parser().parse_intermixed_args(argv)
    config = ["--config", str(Path(cli.run_dir) / "config.yaml")]
    return refuse_or_launch("acmoe-generate", lambda: plan(cli)[1], lambda worker: run_worker(
        "acmoe_megatron.inference.generate", 1, [*config, *worker], prog="acmoe-generate", what="generation"))


if __name__ == "__main__":
    raise SystemExit(main())
