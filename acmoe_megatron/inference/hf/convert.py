"""Megatron GPT with ACMoE routers -> a Hugging Face model directory (issue #18 item 5).

The directory loads on CPU with ``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)``
(and ``AutoTokenizer``) and computes megatron's logits: modeling_acmoe.py is the model,
configuration_acmoe.py its config, both copied in as remote code. AC layers route with the fixed
inference table of each layer (``inference_stats.fixed_weights``): batch statistics cannot be
exported, since they depend on the other tokens of a batch.

Pure functions, then the one entry point a command calls with a loaded model:

* ``GPTInfo.from_model(gpt, megatron_args)`` — the ``GPTModel`` arguments the config lacks
  (vocabulary, positions, RoPE, tied output layer);
* ``hf_config(config, settings, gpt_info, ...)`` — the ``ACMoEConfig`` fields as a dict; refuses
  what the HF model does not compute (baseline routers with cross-token selection, elliptical
  attention, capacity dropping, shared experts, ...) with one message listing every reason;
* ``hf_state_dict(megatron_state_dict, hf_cfg, ac_tables)`` — a single-process (TP = PP = EP = 1)
  state dict, local or Transformer Engine module names, to HF names; the fused QKV weight
  ``[ng · (np/ng + 2) · hn, D]`` is split per query group into q / k / v; every megatron key must
  be used (an unknown one is a feature the export would silently drop);
* ``save_pretrained_dir(out_dir, hf_cfg, state_dict, tokenizer_info)`` — config.json (``auto_map``),
  model.safetensors, generation_config.json (eos = end of document), the remote code, a tokenizer;
* ``export(model, recipe_or_settings, out_dir, megatron_args=, tokenizer=, ac_tables=)``.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from acmoe_megatron.core import layers, registry
from acmoe_megatron.core.settings import ACSettings, EllipticalSettings
from acmoe_megatron.data.tokenizers.byte import EOD_ID, VOCAB_SIZE, load_tokenizer
from acmoe_megatron.inference import calibration as inference_stats
from acmoe_megatron.model.chunk_state import unwrap_chunk
from acmoe_megatron.model.elliptical import EllipticalAttentionMixin
from acmoe_megatron.runtime.recipe import Recipe

HF_DIR = Path(__file__).resolve().parent
REMOTE_CODE = ("configuration_acmoe.py", "modeling_acmoe.py")
BYTE_TOKENIZER_CODE = "tokenization_acmoe.py"
AUTO_MAP = {
    "AutoConfig": "configuration_acmoe.ACMoEConfig",
    "AutoModel": "modeling_acmoe.ACMoEModel",
    "AutoModelForCausalLM": "modeling_acmoe.ACMoEForCausalLM",
}
EOD_TOKEN = "<|endoftext|>"  # the byte tokenizer's end-of-document token (id 256) in the export

# What the HF model calls each router (or why it cannot compute it) is the registry's
# (``RouterEntry.hf_router`` / ``hf_refusal``). NOT_EXPORTABLE: the refusals, read by the command's
# early check (cli/export.py).
NOT_EXPORTABLE = {e.name: e.hf_refusal for e in registry.ROUTERS.values() if e.hf_router is None}


def _hf_router(name: str) -> str:
    """The HF ``router_types`` entry of the router registered as ``name`` (itself if it has none)."""
    entry = registry.ROUTERS.get(name)
    return name if entry is None or entry.hf_router is None else entry.hf_router


# -- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTInfo:
    """What megatron's ``GPTModel`` takes beside its ``TransformerConfig``."""

    vocab_size: int  # the padded vocabulary (rows of the embedding)
    max_position_embeddings: int
    position_embedding_type: str = "rope"
    rotary_percent: float = 1.0
    rotary_base: float = 10000
    seq_len_interpolation_factor: float | None = None
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    tie_word_embeddings: bool = False

    @classmethod
    def from_model(cls, gpt, megatron_args=None) -> GPTInfo:
        """Read from a built ``GPTModel``; ``megatron_args`` gives what the model does not keep
        (``rope_scaling_factor``). The RoPE frequencies are checked against the model's."""
        rotary = getattr(gpt, "rotary_pos_emb", None)
        info = cls(
            vocab_size=int(gpt.vocab_size),
            max_position_embeddings=int(gpt.max_sequence_length),
            position_embedding_type=str(gpt.position_embedding_type),
            rotary_percent=float(gpt.rotary_percent),
            rotary_base=gpt.rotary_base,
            seq_len_interpolation_factor=getattr(rotary, "seq_len_interpolation_factor", None),
            rope_scaling=bool(getattr(gpt, "rotary_scaling", False)),
            rope_scaling_factor=float(getattr(megatron_args, "rope_scaling_factor", 8.0) or 8.0),
            tie_word_embeddings=bool(gpt.share_embeddings_and_output_weights),
        )
        if info.position_embedding_type == "rope" and rotary is not None:
            from acmoe_megatron.inference.hf.configuration_acmoe import ACMoEConfig
            from acmoe_megatron.inference.hf.modeling_acmoe import rope_inv_freq

            cfg = ACMoEConfig(head_dim=gpt.config.kv_channels, rotary_base=info.rotary_base,
                              rotary_percent=info.rotary_percent, rope_llama3_scaling=info.rope_scaling,
                              rope_llama3_scaling_factor=info.rope_scaling_factor, num_hidden_layers=0)
            ours, theirs = rope_inv_freq(cfg), rotary.inv_freq.detach().float().cpu()
            if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-6, atol=0):
                raise ValueError("the model's RoPE frequencies differ from those of rotary_base="
                                 f"{info.rotary_base}, rotary_percent={info.rotary_percent}, rope_scaling="
                                 f"{info.rope_scaling} (factor {info.rope_scaling_factor}): pass the megatron "
                                 "arguments the model was built with")
        return info


def _activation_name(config) -> str | None:
    import torch.nn.functional as F
    from megatron.core.activations import fast_gelu, quick_gelu, squared_relu

    names = {F.gelu: "gelu", F.silu: "silu", F.relu: "relu", squared_relu: "squared_relu",
             quick_gelu: "quick_gelu", fast_gelu: "fast_gelu"}
    name = names.get(config.activation_func)
    if name == "gelu" and config.bias_activation_fusion:
        return "gelu_tanh"  # megatron's fused bias-GeLU / GeGLU kernels use the tanh approximation
    return name


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _unsupported(config, settings: ACSettings, gpt: GPTInfo, elliptical: EllipticalSettings | None) -> list[str]:
    """Every reason the HF model would not compute what megatron computes."""
    get = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    problems = []
    entry = registry.entry(settings.router)
    if entry.hf_router is None:
        exportable = [e.name for e in registry.ROUTERS.values() if e.hf_router is not None]
        problems.append(f"acmoe.router={settings.router!r} cannot be exported: {entry.hf_refusal} (exportable "
                        f"routers: {', '.join(exportable)})")
    if elliptical is not None and elliptical.enabled:
        problems.append("elliptical attention (elliptical.enabled) is not implemented by the HF model")
    if get("moe_expert_capacity_factor") is not None:
        problems.append(f"moe_expert_capacity_factor={get('moe_expert_capacity_factor')}: capacity dropping depends "
                        "on the other tokens of the batch; the HF model routes tokens one at a time (dropless)")
    if get("moe_router_load_balancing_type") == "quantile_balancing":
        problems.append("moe_router_load_balancing_type=quantile_balancing is not implemented by the HF model")
    if get("moe_input_jitter_eps") is not None:
        problems.append("moe_input_jitter_eps: megatron multiplies the router input by random noise even at "
                        "inference, which the HF model does not reproduce")
    checks = [
        ("moe_shared_expert_intermediate_size", None, "shared experts"),
        ("moe_latent_size", None, "latent MoE"),
        ("multi_latent_attention", False, "multi-latent attention"),
        ("attention_output_gate", False, "gated attention output"),
        ("window_size", None, "sliding-window attention"),
        ("use_mup", False, "MuP scaling"),
        ("mtp_num_layers", None, "multi-token prediction layers"),
        ("no_rope_freq", None, "layers without RoPE (no_rope_freq)"),
        ("use_te_activation_func", False, "Transformer Engine activation functions"),
        ("moe_router_force_load_balancing", False, "random router logits (moe_router_force_load_balancing)"),
        ("moe_router_force_biased", None, "biased random router logits (moe_router_force_biased)"),
        ("heterogeneous_block_specs", False, "heterogeneous layers"),
    ]
    for name, default, what in checks:
        value = get(name, default)
        if value not in (default, None, False, 0):
            problems.append(f"{name}={value!r}: {what} are not implemented by the HF model")
    if get("softmax_type", "vanilla") != "vanilla":
        problems.append(f"softmax_type={get('softmax_type')!r}: only the vanilla attention softmax is implemented")
    if get("normalization") not in ("LayerNorm", "RMSNorm"):
        problems.append(f"normalization={get('normalization')!r}: LayerNorm or RMSNorm")
    if _activation_name(config) is None:
        problems.append(f"activation_func={get('activation_func')!r}: the HF model has gelu, silu (swiglu), relu, "
                        "squared_relu, quick_gelu and fast_gelu")
    if gpt.position_embedding_type not in ("rope", "learned_absolute", "none"):
        problems.append(f"position_embedding_type={gpt.position_embedding_type!r}: rope, learned_absolute or none")
    return problems


def router_types(config, settings: ACSettings) -> tuple[list[str], list[str | None]]:
    """(``mlp_layer_types``, ``router_types``) per decoder layer, as ``spec.patch_block_spec`` builds them
    (``layers.layer_routers``), each router under its HF name."""
    names = ([None] * config.num_layers if not config.num_moe_experts else
             layers.layer_routers(config.num_layers, config.moe_layer_freq, settings.router, settings.first_ac_layer,
                                  settings.lead_router))
    return (["dense" if n is None else "moe" for n in names],
            [None if n is None else _hf_router(n) for n in names])


def hf_config(config, settings: ACSettings, gpt: GPTInfo, *, eos_token_id: int | None = None,
              elliptical: EllipticalSettings | None = None, qk_norm: str | None = "config") -> dict:
    """The ``ACMoEConfig`` of a megatron ``TransformerConfig`` + our router settings, as a dict.

    ``qk_norm``: the q/k norm the model was built with (``qk_norm_of``); by default the one
    ``runtime/model_provider.py`` builds from the config (``qk_l2_norm``, ``qk_layernorm``).
    Raises ValueError naming every setting the HF model would not reproduce."""
    problems = _unsupported(config, settings, gpt, elliptical)
    if problems:
        raise ValueError("cannot export this model to Hugging Face:\n  - " + "\n  - ".join(problems))
    mlp_types, routers = router_types(config, settings)
    if qk_norm == "config":
        qk_norm = "L2Norm" if config.qk_l2_norm else config.normalization if config.qk_layernorm else None
    cfg = dict(
        architectures=["ACMoEForCausalLM"],
        model_type="acmoe",
        auto_map=dict(AUTO_MAP),
        vocab_size=gpt.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels,
        max_position_embeddings=gpt.max_position_embeddings,
        normalization=config.normalization,
        layernorm_epsilon=config.layernorm_epsilon,
        layernorm_zero_centered_gamma=bool(config.layernorm_zero_centered_gamma),
        qk_norm=qk_norm,
        position_embedding_type=gpt.position_embedding_type,
        rotary_base=float(gpt.rotary_base),
        rotary_percent=float(gpt.rotary_percent),
        rotary_interleaved=bool(config.rotary_interleaved),
        rotary_seq_len_interpolation_factor=gpt.seq_len_interpolation_factor,
        rope_llama3_scaling=gpt.rope_scaling,
        rope_llama3_scaling_factor=gpt.rope_scaling_factor,
        softmax_scale=config.softmax_scale,
        add_bias_linear=bool(config.add_bias_linear),
        add_qkv_bias=bool(config.add_qkv_bias),
        ffn_hidden_size=config.ffn_hidden_size,
        moe_ffn_hidden_size=config.moe_ffn_hidden_size,
        gated_linear_unit=bool(config.gated_linear_unit),
        hidden_act=_activation_name(config),
        glu_linear_offset=float(config.glu_linear_offset),
        activation_clamp_value=getattr(config, "activation_func_clamp_value", None),
        mlp_layer_types=mlp_types,
        num_experts=config.num_moe_experts or 0,
        moe_router_topk=config.moe_router_topk,
        router_types=routers,
        moe_router_score_function=config.moe_router_score_function,
        moe_router_pre_softmax=bool(config.moe_router_pre_softmax),
        moe_router_topk_scaling_factor=config.moe_router_topk_scaling_factor,
        moe_router_num_groups=config.moe_router_num_groups,
        moe_router_group_topk=config.moe_router_group_topk,
        moe_router_enable_expert_bias=bool(config.moe_router_enable_expert_bias),
        moe_router_load_balancing_type=config.moe_router_load_balancing_type,
        moe_router_dtype="fp64" if config.moe_router_dtype == "fp64" else "fp32",
        moe_apply_probs_on_input=bool(config.moe_apply_probs_on_input),
        xmoe_dim=(settings.xmoe_dim or max(1, (config.num_moe_experts or 2) // 2)) if "xmoe" in routers else None,
        acmoe={**asdict(settings), "exported_routers": sorted({r for r in routers if r})},
        tie_word_embeddings=False,  # the export writes lm_head even for a tied megatron model
        megatron_tied_embeddings=gpt.tie_word_embeddings,
        dtype=_dtype_name(config.params_dtype),
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    return cfg


# -- weights -----------------------------------------------------------------------------------

# Transformer Engine module names -> the local spec's (fused norms, grouped experts).
_TE_RENAMES = [
    (re.compile(r"^(.*)\.self_attention\.linear_qkv\.layer_norm_(weight|bias)$"), r"\1.input_layernorm.\2"),
    (re.compile(r"^(.*)\.mlp\.linear_fc1\.layer_norm_(weight|bias)$"), r"\1.pre_mlp_layernorm.\2"),
    (re.compile(r"^(.*)\.mlp\.experts\.linear_fc([12])\.(weight|bias)(\d+)$"),
     r"\1.mlp.experts.local_experts.\4.linear_fc\2.\3"),
]
# Buffers megatron or our routers save that the HF model does not need (the AC running statistics
# are exported as the fixed table they give).
_IGNORED = re.compile(r"(_extra_state$|\.router\.ac_ema_(count|mad)$)")


def _local_names(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        for pattern, repl in _TE_RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def split_qkv(w: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    """megatron's fused QKV rows ``[ng, (np/ng + 2), hn]`` (q heads of group g, then k_g, v_g)
    -> (q ``[np·hn]``, k ``[ng·hn]``, v ``[ng·hn]``) rows, heads in megatron's order."""
    per_group = num_heads // num_groups
    rest = w.shape[1:]
    w = w.reshape(num_groups, per_group + 2, head_dim, *rest)
    q = w[:, :per_group].reshape(num_heads * head_dim, *rest)
    k = w[:, per_group].reshape(num_groups * head_dim, *rest)
    v = w[:, per_group + 1].reshape(num_groups * head_dim, *rest)
    return q, k, v


def _table(ac_tables: dict, layer: int) -> torch.Tensor:
    entry = ac_tables[layer]
    return entry["w_KD"] if isinstance(entry, dict) else entry


def hf_state_dict(megatron_sd: dict, cfg: dict, ac_tables: dict | None = None) -> dict[str, torch.Tensor]:
    """HF tensors of a single-process megatron GPTModel state dict (``model.state_dict()``).

    ``ac_tables``: {global layer number: ``w_KD`` [E, D]} (or {layer: {"w_KD": ...}} as
    ``inference_stats`` stores them) for every layer whose ``router_types`` entry is ``"ac"``."""
    sd = _local_names({k: v for k, v in megatron_sd.items() if not _IGNORED.search(k)})
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise KeyError(f"the megatron state dict has no {key!r} (a model built with other settings, "
                           "or not a single-process TP=PP=EP=1 state dict)")
        value = sd.pop(key)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key}: expected a tensor, got {type(value).__name__}")
        return value.detach().cpu()

    def move(src: str, dst: str, optional: bool = False) -> None:
        if optional and src not in sd:
            return
        out[dst] = take(src)

    def norm(src: str, dst: str, kind: str | None) -> None:
        if kind in ("LayerNorm", "RMSNorm"):
            move(f"{src}.weight", f"{dst}.weight")
        if kind == "LayerNorm":
            move(f"{src}.bias", f"{dst}.bias")

    np_, ng, hn = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    bias = cfg["add_bias_linear"]
    move("embedding.word_embeddings.weight", "model.embed_tokens.weight")
    if cfg["position_embedding_type"] == "learned_absolute":
        move("embedding.position_embeddings.weight", "model.embed_positions.weight")
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"decoder.layers.{i}", f"model.layers.{i}"
        norm(f"{src}.input_layernorm", f"{dst}.input_layernorm", cfg["normalization"])
        q, k, v = split_qkv(take(f"{src}.self_attention.linear_qkv.weight"), np_, ng, hn)
        out.update({f"{dst}.self_attn.q_proj.weight": q, f"{dst}.self_attn.k_proj.weight": k,
                    f"{dst}.self_attn.v_proj.weight": v})
        if bias or cfg["add_qkv_bias"]:
            q, k, v = split_qkv(take(f"{src}.self_attention.linear_qkv.bias"), np_, ng, hn)
            out.update({f"{dst}.self_attn.q_proj.bias": q, f"{dst}.self_attn.k_proj.bias": k,
                        f"{dst}.self_attn.v_proj.bias": v})
        move(f"{src}.self_attention.linear_proj.weight", f"{dst}.self_attn.o_proj.weight")
        if bias:
            move(f"{src}.self_attention.linear_proj.bias", f"{dst}.self_attn.o_proj.bias")
        norm(f"{src}.self_attention.q_layernorm", f"{dst}.self_attn.q_norm", cfg["qk_norm"])
        norm(f"{src}.self_attention.k_layernorm", f"{dst}.self_attn.k_norm", cfg["qk_norm"])
        norm(f"{src}.pre_mlp_layernorm", f"{dst}.post_attention_layernorm", cfg["normalization"])
        if cfg["mlp_layer_types"][i] == "moe":
            router = cfg["router_types"][i]
            move(f"{src}.mlp.router.weight", f"{dst}.mlp.router.weight")
            if router == "topk" and bias:
                move(f"{src}.mlp.router.bias", f"{dst}.mlp.router.bias")
            elif bias:  # megatron's TopKRouter makes one for every router; cosine / AC scores never use it
                sd.pop(f"{src}.mlp.router.bias", None)
            if router == "xmoe":
                move(f"{src}.mlp.router.proj", f"{dst}.mlp.router.proj")
            if cfg["moe_router_enable_expert_bias"]:
                out[f"{dst}.mlp.router.expert_bias"] = take(f"{src}.mlp.router.expert_bias").float()
            if router == "ac":
                out[f"{dst}.mlp.router.ac_weight"] = _ac_table(ac_tables, i + 1, cfg)
            for e in range(cfg["num_experts"]):
                for fc in ("fc1", "fc2"):
                    expert = f"{src}.mlp.experts.local_experts.{e}.linear_{fc}"
                    move(f"{expert}.weight", f"{dst}.mlp.experts.{e}.{fc}.weight")
                    if bias:
                        move(f"{expert}.bias", f"{dst}.mlp.experts.{e}.{fc}.bias")
        else:
            for fc in ("fc1", "fc2"):
                move(f"{src}.mlp.linear_{fc}.weight", f"{dst}.mlp.{fc}.weight")
                if bias:
                    move(f"{src}.mlp.linear_{fc}.bias", f"{dst}.mlp.{fc}.bias")
    norm("decoder.final_layernorm", "model.norm", cfg["normalization"])
    if cfg.get("megatron_tied_embeddings"):
        sd.pop("output_layer.weight", None)
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
    else:
        move("output_layer.weight", "lm_head.weight")
    if sd:
        raise ValueError(f"megatron weights the HF model has no place for (a feature the export does not "
                         f"support): {sorted(sd)[:12]}{' ...' if len(sd) > 12 else ''}")
    return {k: v.contiguous() for k, v in out.items()}


def _ac_table(ac_tables: dict | None, layer: int, cfg: dict) -> torch.Tensor:
    if not ac_tables or layer not in ac_tables:
        raise ValueError(f"AC layer {layer} has no fixed inference table (ac_tables holds layers "
                         f"{sorted(ac_tables or {})}): calibrate a batch-trained model first "
                         "(`acmoe-eval RUN_DIR --calibrate N`)")
    w_KD = _table(ac_tables, layer).detach().float().cpu()
    shape = (cfg["num_experts"], cfg["hidden_size"])
    if tuple(w_KD.shape) != shape:
        raise ValueError(f"AC layer {layer}: table of shape {tuple(w_KD.shape)}, the layer needs {shape}")
    if not torch.isfinite(w_KD).all():
        raise ValueError(f"AC layer {layer}: the inference table has non-finite entries")
    return w_KD


# -- files -------------------------------------------------------------------------------------


def tokenizer_info(tokenizer) -> dict | None:
    """What ``save_pretrained_dir`` needs of a tokenizer: our ``ByteTokenizer`` / ``HFTokenizer``, a
    manifest's ``tokenizer`` entry (their ``describe()``), ``"bytes"``, a tokenizer.json path, or None."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, Path)):

        tokenizer = load_tokenizer(tokenizer)
    described = tokenizer if isinstance(tokenizer, dict) else tokenizer.describe()
    if described.get("name") == "bytes":

        return {"kind": "bytes", "eod": EOD_ID, "eod_token": EOD_TOKEN, "vocab_size": VOCAB_SIZE}
    if described.get("library") == "tokenizers" and described.get("file"):
        return {"kind": "tokenizers", "file": str(described["file"]), "eod": int(described["eod"]),
                "eod_token": described["eod_token"], "vocab_size": int(described["vocab_size"])}
    raise ValueError(f"tokenizer {described.get('name')!r}: the export knows the byte tokenizer and local "
                     "Hugging Face tokenizer.json files")


def save_pretrained_dir(out_dir, cfg: dict, state_dict: dict[str, torch.Tensor], tok: dict | None = None) -> Path:
    """Write a directory ``from_pretrained(out_dir, trust_remote_code=True)`` loads."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from acmoe_megatron.inference.hf.configuration_acmoe import ACMoEConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in REMOTE_CODE:
        shutil.copyfile(HF_DIR / name, out / name)
    config = ACMoEConfig(**cfg)
    config.auto_map = dict(AUTO_MAP)
    config.save_pretrained(out)
    save_file(state_dict, str(out / "model.safetensors"), metadata={"format": "pt"})
    eod = cfg.get("eos_token_id")
    GenerationConfig(eos_token_id=eod, pad_token_id=eod).save_pretrained(out)
    if tok is not None:
        write_tokenizer(out, tok, cfg["max_position_embeddings"])
    return out


def write_tokenizer(out_dir, tok: dict, max_length: int) -> None:
    """The tokenizer files of ``tok`` (``tokenizer_info``) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = {"eos_token": tok["eod_token"], "pad_token": tok["eod_token"], "model_max_length": max_length,
              "clean_up_tokenization_spaces": False}
    if tok["kind"] == "bytes":
        shutil.copyfile(HF_DIR / BYTE_TOKENIZER_CODE, out / BYTE_TOKENIZER_CODE)
        config = {"tokenizer_class": "ACMoEByteTokenizer",
                  "auto_map": {"AutoTokenizer": ["tokenization_acmoe.ACMoEByteTokenizer", None]},
                  "added_tokens_decoder": {str(tok["eod"]): {"content": tok["eod_token"], "special": True,
                                                             "lstrip": False, "rstrip": False,
                                                             "normalized": False, "single_word": False}},
                  **common}
    else:
        shutil.copyfile(tok["file"], out / "tokenizer.json")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **common}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": tok["eod_token"], "pad_token": tok["eod_token"]}, indent=2) + "\n")


# -- the entry point ---------------------------------------------------------------------------


def qk_norm_of(gpt) -> str | None:
    """The q/k norm of a built model: megatron's spec decides it (an ``IdentityOp`` where the spec was
    built without ``qk_l2_norm`` / ``qk_layernorm``), not the config alone."""
    from megatron.core.transformer.identity_op import IdentityOp

    attn = gpt.decoder.layers[0].self_attention
    norm = getattr(attn, "q_layernorm", None)
    if norm is None or isinstance(norm, IdentityOp):
        return None
    if type(norm).__name__ == "L2Norm":
        return "L2Norm"
    return gpt.config.normalization


def _routers_in_model(gpt) -> dict[int, str]:
    """{layer number: registered router name} of the model's MoE routers ("megatron": unregistered)."""
    from megatron.core.transformer.moe.router import TopKRouter

    return {m.layer_number: registry.name_of(type(m)) or "megatron" for m in gpt.modules()
            if isinstance(m, TopKRouter)}


def export(model, recipe_or_settings, out_dir, *, megatron_args=None, tokenizer=None,
           ac_tables: dict | None = None) -> Path:
    """Write ``out_dir``: a Hugging Face model of ``model`` (one process: TP = PP = EP = 1).

    Args:
        model: the megatron GPTModel (possibly in DDP / Float16Module wrappers, or a one-chunk list)
            with its weights loaded; AC routers with their fixed inference tables installed
            (``inference_stats.install`` for a batch-trained model; an ema model carries them)
            unless ``ac_tables`` is given.
        recipe_or_settings: the run's ``config.Recipe`` (its ``acmoe`` and ``elliptical`` sections) or
            an ``ACSettings``.
        out_dir: the directory to write (created; files in it are overwritten).
        megatron_args: megatron's parsed arguments (for ``rope_scaling_factor``); optional.
        tokenizer: the run's tokenizer (see ``tokenizer_info``); None writes no tokenizer files.
        ac_tables: {layer number: w_KD} instead of the routers' own tables.
    """

    if isinstance(model, (list, tuple)):  # megatron's get_model returns the chunks as a list
        if len(model) != 1:
            raise ValueError(f"export one model chunk (no virtual pipeline), got {len(model)}")
        model = model[0]
    gpt = unwrap_chunk(model)
    if isinstance(recipe_or_settings, Recipe):
        settings, elliptical = recipe_or_settings.acmoe, recipe_or_settings.elliptical
    elif isinstance(recipe_or_settings, ACSettings):
        settings, elliptical = recipe_or_settings, None
    else:
        raise TypeError(f"recipe_or_settings: a Recipe or ACSettings, got {type(recipe_or_settings).__name__}")
    config = gpt.config
    sizes = {k: getattr(config, k, 1) or 1 for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                                     "expert_model_parallel_size", "expert_tensor_parallel_size",
                                                     "context_parallel_size")}
    if any(v != 1 for v in sizes.values()) or not (gpt.pre_process and gpt.post_process):
        raise ValueError(f"export a model built on one process (all parallel sizes 1), not {sizes}")

    if any(isinstance(m, EllipticalAttentionMixin) for m in gpt.modules()):
        elliptical = EllipticalSettings(enabled=True)
    tok = tokenizer_info(tokenizer)
    info = GPTInfo.from_model(gpt, megatron_args)
    cfg = hf_config(config, settings, info, eos_token_id=None if tok is None else tok["eod"], elliptical=elliptical,
                    qk_norm=qk_norm_of(gpt))
    built = _routers_in_model(gpt)
    expected = {n + 1: r for n, r in enumerate(cfg["router_types"]) if r}
    found = {n: _hf_router(r) for n, r in built.items()}
    if found != expected:
        raise ValueError(f"the model's routers {built} are not those of acmoe.router={settings.router!r}, "
                         f"first_ac_layer={settings.first_ac_layer} ({expected}): pass the run's own settings")
    if ac_tables is None and "ac" in cfg["router_types"]:
        ac_tables = inference_stats.fixed_weights(gpt)
    state_dict = hf_state_dict(gpt.state_dict(), cfg, ac_tables)
    return save_pretrained_dir(out_dir, cfg, state_dict, tok)
