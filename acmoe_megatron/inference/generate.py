"""Generation worker of ``acmoe-generate`` (run under torchrun, one process): incremental decoding
with a KV cache on megatron's own model.

The model is the trained run's (``evaluate.load_trained``: our routers, the checkpoint resharded
into one process). Decoding uses megatron-core's ``StaticInferenceContext``: the prompt is one
forward (pre-fill) that fills each attention layer's key/value cache, then every new token is a
forward of that token alone at its position, attending to the cache. Megatron's attention, RoPE and
MoE layers run unchanged with our routers (checked on CPU; tests/unit/inference/test_generate.py). Why not
megatron's ``TextGenerationController``/engines: they need megatron's tokenizer objects and CUDA
graphs/dynamic batching machinery that buy nothing for a one-process sampler of a CPU-sized model;
the loop here is thirty lines over megatron's own KV cache.

AC layers route with a fixed, batch-independent transform (inference/calibration.py): an
``acmoe.source: batch`` model's calibrated table or an ``ema`` model's running statistics. With
the batch statistics a decoding step's single token would form clusters of one token (every AC
weight 1: the cosine router, not the trained model), so such a model is refused until calibrated.
With a fixed transform the AC router is causal, and the incremental logits equal a full-sequence
forward's.

Sampling: ``temperature`` 0 is greedy (argmax); otherwise softmax(logits / T) restricted to the
smallest set of tokens whose probability reaches ``top_p`` (nucleus), drawn with a seeded
``torch.Generator``: the same command gives the same text. Generation stops at the tokenizer's
end-of-document id or after ``max_new_tokens``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from acmoe_megatron.data.shards.manifest import read_manifest
from acmoe_megatron.data.tokenizers.byte import tokenizer_from_manifest
from acmoe_megatron.inference import calibration as inference_stats
from acmoe_megatron.inference.loader import load_trained
from acmoe_megatron.runtime import cpu_runtime
from acmoe_megatron.runtime.lifetime import die_with_parent


def parse_cli(argv=None):
    p = argparse.ArgumentParser(prog="acmoe-generate-worker", description="acmoe-generate worker (under torchrun)")
    p.add_argument("--config", required=True, help="the run's resolved recipe (RUN_DIR/config.yaml)")
    p.add_argument("--data", required=True, help="the run's shard directory (its manifest names the tokenizer)")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats-file", default=None, help="calibrated AC statistics to route with")
    p.add_argument("--out", default=None, help="JSON file for the generations")
    p.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE overrides")
    return p.parse_args(argv)


def next_token(logits_V: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy (temperature 0) or nucleus sampling from one position's logits."""
    if temperature == 0.0:
        return int(torch.argmax(logits_V))
    probs_V = torch.softmax(logits_V.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_V, order_V = torch.sort(probs_V, descending=True)
        keep_V = torch.cumsum(sorted_V, 0) - sorted_V < top_p  # the smallest prefix reaching top_p
        probs_V = torch.zeros_like(probs_V).scatter_(0, order_V[keep_V], sorted_V[keep_V])
    return int(torch.multinomial(probs_V.cpu(), 1, generator=generator))


@torch.no_grad()
def generate_tokens(model, prompt_ids: list[int], max_new_tokens: int, *, vocab_size: int,
                    temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                    eod: int | None = None, return_logits: bool = False):
    """The new token ids after ``prompt_ids`` (and, with ``return_logits``, the ``[n, V]`` logits
    each was drawn from), decoded with megatron's KV cache."""
    from megatron.core.inference.contexts import StaticInferenceContext

    chunk = model[0] if isinstance(model, list) else model
    device = next(chunk.parameters()).device
    ctx = StaticInferenceContext(1, len(prompt_ids) + max_new_tokens)
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    positions = torch.arange(len(prompt_ids), device=device).unsqueeze(0)
    logits = chunk(tokens, positions, None, inference_context=ctx)[0, -1, :vocab_size]
    ctx.sequence_len_offset += len(prompt_ids)
    out, seen = [], []
    for step in range(max_new_tokens):
        token = next_token(logits.float(), temperature, top_p, generator)
        out.append(token)
        seen.append(logits.float().cpu())
        if token == eod or step == max_new_tokens - 1:
            break
        position = torch.tensor([[ctx.sequence_len_offset]], device=device)
        logits = chunk(torch.tensor([[token]], device=device), position, None, inference_context=ctx)[0, -1, :vocab_size]
        ctx.sequence_len_offset += 1
    return (out, torch.stack(seen)) if return_logits else out


def main(argv=None) -> None:
    die_with_parent()  # a killed torchrun / launcher takes this worker with it (runtime/lifetime.py)
    cpu_runtime.install_for_training()

    cli = parse_cli(argv)
    tokenizer = tokenizer_from_manifest(read_manifest(cli.data).tokenizer)
    generator = torch.Generator().manual_seed(cli.seed)
    start = time.time()
    with cpu_runtime.device_redirect():  # without CUDA: megatron's device="cuda" requests -> CPU
        recipe, args, model, iteration = load_trained(cli.config, cli.overrides, cli.data, "acmoe-generate",
                                                      stats_file=cli.stats_file)
        inference_stats.fixed_weights(model)  # every AC layer has a batch-independent transform, or ValueError
        generations = []
        for prompt in cli.prompt:
            ids = list(tokenizer.tokenize(prompt))
            new = generate_tokens(model, ids, cli.max_new_tokens, vocab_size=tokenizer.vocab_size,
                                  temperature=cli.temperature, top_p=cli.top_p, generator=generator,
                                  eod=tokenizer.eod)
            text = tokenizer.detokenize([t for t in new if t != tokenizer.eod])
            generations.append({"prompt": prompt, "prompt_tokens": len(ids), "new_token_ids": new, "text": text,
                                "stopped_at_eod": bool(new) and new[-1] == tokenizer.eod})
            print(f"[acmoe-generate] {prompt!r} -> {text!r}", flush=True)
    result = {"run_dir": str(Path(cli.config).parent), "iteration": iteration,
              "ac_statistics": "calibrated" if cli.stats_file else ("ema" if recipe.acmoe.source == "ema" else "none"),
              "stats_file": cli.stats_file, "sampling": {"max_new_tokens": cli.max_new_tokens, "temperature":
              cli.temperature, "top_p": cli.top_p, "seed": cli.seed}, "generations": generations,
              "wall_time_s": round(time.time() - start, 1), "device": str(next(model[0].parameters()).device)}
    if cli.out:
        path = Path(cli.out)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        tmp.replace(path)
        print(f"[acmoe-generate] wrote {path}", flush=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
