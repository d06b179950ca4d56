"""The model provider of megatron's trainer: megatron's ``GPTModel`` on megatron's own block spec
with our routers patched in (``model/spec.py``), or megatron's ``HybridModel`` when the recipe sets
``megatron.hybrid_layer_pattern`` (``model/hybrid_spec.py``), the chunk attached (``plugin.attach``), built
from megatron's parsed arguments. Shared by the trainer (``runtime/train.py``) and every tool that
loads a trained run (``inference/loader.py``), so a checkpoint is always loaded into the model it
was trained as.

megatron.training is imported when the provider runs, not at import: the worker installs the CPU
runtime (``cpu_runtime.install_for_training``) before megatron's trainer is imported.
"""

from __future__ import annotations

from acmoe_megatron.model.hybrid_spec import acmoe_hybrid_stack_spec
from acmoe_megatron.model.spec import acmoe_block_spec
from acmoe_megatron.runtime.attach import attach


def make_model_provider(recipe):
    """megatron's GPTModel on megatron's own block spec with our routers patched in, attached."""

    def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
        from megatron.core.models.gpt import GPTModel
        from megatron.training import get_args
        from megatron.training.arguments import core_transformer_config_from_args

        args = get_args()
        if config is None:
            config = core_transformer_config_from_args(args)
        if args.hybrid_layer_pattern:
            return _hybrid_model(args, config, pre_process, post_process, vp_stage, pg_collection)
        spec = acmoe_block_spec(
            config, recipe.acmoe, use_transformer_engine=args.transformer_impl == "transformer_engine",
            normalization=args.normalization, vp_stage=vp_stage, vocab_size=args.padded_vocab_size,
            elliptical=recipe.elliptical, qk_l2_norm=args.qk_l2_norm,
        )
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=args.padded_vocab_size,
            max_sequence_length=args.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
            parallel_output=True,
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            position_embedding_type=args.position_embedding_type,
            rotary_percent=args.rotary_percent,
            rotary_base=args.rotary_base,
            vp_stage=vp_stage,
            pg_collection=pg_collection,
        )
        attach(model)
        return model

    def _hybrid_model(args, config, pre_process, post_process, vp_stage, pg_collection):
        """megatron's HybridModel (``megatron.hybrid_layer_pattern``) on its stack spec, patched."""
        from megatron.core.models.hybrid.hybrid_model import HybridModel

        spec = acmoe_hybrid_stack_spec(
            config, recipe.acmoe, args.hybrid_layer_pattern,
            use_transformer_engine=args.transformer_impl == "transformer_engine",
            normalization=args.normalization, vocab_size=args.padded_vocab_size, qk_l2_norm=args.qk_l2_norm)
        model = HybridModel(
            config=config, hybrid_stack_spec=spec, vocab_size=args.padded_vocab_size,
            max_sequence_length=args.max_position_embeddings, hybrid_layer_pattern=args.hybrid_layer_pattern,
            pre_process=pre_process, post_process=post_process, fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
            parallel_output=True, share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
            rotary_base=args.rotary_base, vp_stage=vp_stage, pg_collection=pg_collection,
        )
        attach(model)
        return model

    return model_provider
