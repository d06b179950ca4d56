"""Pretrain a GPT MoE with the AC router from a plain Megatron-LM script: the plugin API in ~100 lines.

Everything here is megatron's own (``parse_and_validate_args``, ``pretrain``, ``GPTModel``,
``get_gpt_decoder_block_spec`` with the script's own options, a plain forward step and loss) plus
four calls of ``acmoe_megatron.plugin``:

  add_arguments(parser)        the --acmoe-* flags, in megatron's extra_args_provider
  validate_args(args)          our checks on the parsed flags -> the typed router settings
  patch_block_spec(spec, ...)  our routers into the spec this script built (qk_l2_norm etc. stay)
  attach(model)                the per-micro-batch state and its hooks (PP, VPP, recompute work)

Data: the webdataset token shards of ``acmoe-data prepare`` (``--shards DIR``); swap in megatron's
``GPTDataset`` provider for indexed ``.bin/.idx`` data. On a machine without CUDA, megatron-core
needs the CPU runtime (``cpu_runtime.install_for_training``; a no-op with CUDA except the wheel fix)
and ``pretrain`` runs inside ``cpu_runtime.device_redirect()`` (megatron's literal ``device="cuda"``
tensors land on the CPU for that block only; a no-op with CUDA).

Example (2 processes on CPU, expert parallel 2)::

    torchrun --nproc_per_node 2 examples/pretrain_gpt_acmoe.py \\
        --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 64 \\
        --max-position-embeddings 64 --num-experts 4 --moe-router-topk 2 --expert-model-parallel-size 2 \\
        --micro-batch-size 4 --global-batch-size 8 --train-iters 20 --lr 1e-3 \\
        --tokenizer-type NullTokenizer --vocab-size 257 --dataloader-type external \\
        --transformer-impl local --distributed-backend gloo --use-cpu-initialization --no-persist-layer-norm \\
        --acmoe-router ac --acmoe-first-ac-layer 2 --shards data/stdlib
"""

from functools import partial

import torch

from acmoe_megatron import plugin
from acmoe_megatron.runtime import cpu_runtime


def extra_args(parser):
    plugin.add_arguments(parser)
    group = parser.add_argument_group("example data")
    group.add_argument("--shards", required=True, help="token shard directory (acmoe-data prepare)")
    group.add_argument("--shards-seed", type=int, default=1234, help="shuffle seed of the training stream")
    return parser


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    config = config or core_transformer_config_from_args(args)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=args.transformer_impl == "transformer_engine",
                                      normalization=args.normalization, qk_l2_norm=args.qk_l2_norm,
                                      vp_stage=vp_stage)
    settings, elliptical = plugin.settings_from_args(args)
    spec = plugin.patch_block_spec(spec, settings, config, vp_stage=vp_stage, vocab_size=args.padded_vocab_size,
                                   elliptical=elliptical)
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        parallel_output=True, share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base, vp_stage=vp_stage, pg_collection=pg_collection,
    )
    plugin.attach(model)
    return model


def loss_func(loss_mask, output_tensor):
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.cat([loss.detach().view(1), num_tokens.detach().view(1).float()])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    tokens, labels, loss_mask, position_ids = (
        batch[k].to(device, non_blocking=True) for k in ("tokens", "labels", "loss_mask", "position_ids"))
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(loss_func, loss_mask)


def main():
    cpu_runtime.install_for_training()
    from megatron.core.enums import ModelType
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.training import pretrain

    from acmoe_megatron.data.megatron.shard_provider import shard_datasets_provider

    args = parse_and_validate_args(extra_args_provider=extra_args)
    plugin.validate_args(args)
    plugin.install_expert_norm()
    with cpu_runtime.device_redirect():  # CPU only: megatron's device="cuda" requests go to the CPU
        pretrain(pretrain_cfg_container_from_args(args), shard_datasets_provider(args.shards, args.shards_seed),
                 ModelType.encoder_or_decoder, forward_step, model_provider=model_provider)


if __name__ == "__main__":
    main()
