"""The Hugging Face export (acmoe_megatron/inference/hf): a tiny megatron GPT of each exportable router,
converted and loaded back with ``AutoModelForCausalLM.from_pretrained(trust_remote_code=True)``.

Reference: megatron's own forward of the same model (eval mode, AC routers on fixed inference
tables): logits equal within 1e-4, incremental decoding with a KV cache equals the full forward,
greedy ``generate`` follows megatron's argmax. Weights are drawn with std 0.1 (not megatron's
0.02) and norm weights / biases away from ones / zeros, so that attention and routing are far from
uniform and a wrong RoPE convention, QKV layout, norm or AC table shows in the logits.
Run: ``pytest tests/unit/inference/test_hf_export.py`` (about 30 s on 2 CPU cores).
"""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402

from acmoe_megatron.core.settings import ACSettings, EllipticalSettings  # noqa: E402
from acmoe_megatron.data.tokenizers.byte import ByteTokenizer  # noqa: E402
from acmoe_megatron.inference import calibration as inference_stats  # noqa: E402
from acmoe_megatron.inference.hf import convert  # noqa: E402
from acmoe_megatron.model.chunk_state import state_of  # noqa: E402
from acmoe_megatron.testing import build_gpt, tiny_config  # noqa: E402

SEQ = 12
ATOL = 1e-4
# transformers 5 names the KV cache ``cache`` (4.x: ``past_key_values``)
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

CASES = {
    # the paper's placement: MoE layer 1 megatron's top-k router, AC from MoE layer 2
    "ac": (ACSettings(router="ac", first_ac_layer=2), {}),
    "topk": (ACSettings(router="topk"), {}),
    # cosine with RMSNorm, GQA (2 query groups of 2 heads), q/k layernorm, SwiGLU experts
    "cosine-gqa-swiglu": (ACSettings(router="cosine", first_ac_layer=2),
                          dict(normalization="RMSNorm", num_query_groups=2, qk_layernorm=True,
                               gated_linear_unit=True, activation_func=torch.nn.functional.silu)),
    # a dense layer between MoE layers (the AC labels skip it), sigmoid scores, interleaved RoPE on 25 %
    "ac-dense-sigmoid": (ACSettings(router="ac", first_ac_layer=2),
                         dict(moe_layer_freq=[1, 0, 1, 1], moe_router_score_function="sigmoid",
                              moe_router_topk_scaling_factor=2.0, rotary_interleaved=True)),
    # biases on every linear layer (the AC routers' unused megatron bias is dropped), tied output layer
    "ac-bias-tied": (ACSettings(router="ac", first_ac_layer=2), dict(add_bias_linear=True)),
    # acmoe.lead_router=cosine at the release's expert norm: MoE layer 1 the cosine router, AC from layer 2
    "ac-cosine-lead": (ACSettings(router="ac", first_ac_layer=2, lead_router="cosine", expert_norm=1.5), {}),
    # XMoE (a baseline exportable as is): (W_p x) · e_j / ||e_j|| on every MoE layer
    "xmoe": (ACSettings(router="xmoe"), {}),
}


def _megatron(settings, vocab=100, **overrides):
    torch.manual_seed(0)
    gpt_kw = {k: overrides.pop(k) for k in ("rotary_percent", "share_embeddings_and_output_weights") if k in overrides}
    config = tiny_config(init_method_std=0.1, **overrides)
    model = build_gpt(config, settings, vocab_size=vocab, max_sequence_length=64, **gpt_kw)
    model.eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norm weights and biases away from megatron's ones / zeros: a swap shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("norm.weight") else 0.0))
    for r in inference_stats.ac_routers(model):  # a fixed positive AC table per layer, far from M = I
        r.set_inference_weights(torch.rand(r.num_experts, config.hidden_size, generator=g) * 2 + 0.1)
    return model


def _megatron_logits(model, tokens_BS):
    state_of(model).reset()
    pos = torch.arange(tokens_BS.shape[1]).unsqueeze(0).expand(tokens_BS.shape[0], -1)
    with torch.no_grad():
        return model(tokens_BS, pos, None)


def _tokens(vocab, b=2, s=SEQ, seed=3):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def _load(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.usefixtures("megatron_ws1")
@pytest.mark.parametrize("case", list(CASES))
def test_hf_logits_equal_megatron_logits(case, tmp_path):
    settings, overrides = CASES[case]
    gpt_kw = {"ac-dense-sigmoid": dict(rotary_percent=0.25),
              "ac-bias-tied": dict(share_embeddings_and_output_weights=True)}.get(case, {})
    model = _megatron(settings, **overrides, **gpt_kw)
    tokens = _tokens(100)
    reference = _megatron_logits(model, tokens)
    assert reference.shape == (2, SEQ, 100)
    hf = _load(convert.export(model, settings, tmp_path))
    with torch.no_grad():
        logits = hf(tokens).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=ATOL)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_acmoe.ACMoEForCausalLM"
    assert sorted(p.name for p in tmp_path.glob("*.py")) == ["configuration_acmoe.py", "modeling_acmoe.py"]


@pytest.fixture(scope="module")
def byte_export(tmp_path_factory, megatron_ws1):
    """An AC model on the byte tokenizer's vocabulary (257), exported with its tokenizer."""
    from acmoe_megatron.runtime import cpu_runtime
    with cpu_runtime.device_redirect():
        settings = ACSettings(router="ac", first_ac_layer=2)
        model = _megatron(settings, vocab=257)
        out = convert.export(model, settings, tmp_path_factory.mktemp("byte_export"), tokenizer="bytes")
    return model, out


@pytest.mark.usefixtures("megatron_ws1")
def test_incremental_decoding_with_a_kv_cache_equals_the_full_forward(byte_export):
    model, out = byte_export
    hf = _load(out)
    tokens = _tokens(257, b=2, s=SEQ)
    with torch.no_grad():
        full = hf(tokens).logits
        steps, cache = [], None
        for t in range(SEQ):
            o = hf(tokens[:, t:t + 1], use_cache=True, **{CACHE: cache})
            cache = getattr(o, CACHE)
            steps.append(o.logits)
    assert cache.get_seq_length() == SEQ
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=ATOL)
    torch.testing.assert_close(full, _megatron_logits(model, tokens), rtol=0, atol=ATOL)


@pytest.mark.usefixtures("megatron_ws1")
def test_greedy_generate_is_deterministic_and_follows_megatrons_argmax(byte_export):
    model, out = byte_export
    hf = _load(out)
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    prompt = tok("def f(x):", return_tensors="pt")
    hf.generation_config.eos_token_id = None  # a random model may emit EOD: generate all 6 tokens
    kw = dict(max_new_tokens=6, do_sample=False)
    first = hf.generate(**prompt, **kw)
    assert torch.equal(first, hf.generate(**prompt, **kw))
    ids = prompt["input_ids"]
    for _ in range(6):  # megatron, one full forward per step
        next_id = _megatron_logits(model, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(first, ids)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 256 and hf.config.eos_token_id == 256


def test_byte_tokenizer_round_trips_text(byte_export):
    _, out = byte_export
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    text = "naïve café — 漢字 🙂\n\tdef f(x): return x  # ok"
    ids = tok(text)["input_ids"]
    assert ids == ByteTokenizer().encode(text).tolist()  # no special tokens added
    assert tok.decode(ids) == text
    assert len(tok) == 257 and tok.eos_token_id == 256 and tok.pad_token_id == 256
    assert tok.decode(ids + [256]) == text + "<|endoftext|>"
    assert tok.decode(ids + [256], skip_special_tokens=True) == text


def test_a_tokenizer_json_is_exported_as_a_fast_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from acmoe_megatron.data.tokenizers.hf import HFTokenizer

    vocab = {"[UNK]": 0, "<|endoftext|>": 1, "hello": 2, "world": 3, "!": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens(["<|endoftext|>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    ours = HFTokenizer(tmp_path / "tokenizer.json")
    info = convert.tokenizer_info(ours)
    assert info["eod"] == 1 and info["kind"] == "tokenizers"
    convert.write_tokenizer(tmp_path / "out", info, max_length=64)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("hello world !")["input_ids"] == ours.encode("hello world !").tolist() == [2, 3, 4]
    assert tok.eos_token_id == 1


def test_the_fused_qkv_rows_split_per_query_group():
    """megatron's linear_qkv rows are [group g: its np/ng query heads, k_g, v_g] (GQA)."""
    np_, ng, hn = 4, 2, 3
    # row label = 100 * group + 10 * slot (0..np/ng-1 queries, then k, v) + channel
    labels = torch.tensor([100 * g + 10 * s + c for g in range(ng) for s in range(np_ // ng + 2) for c in range(hn)])
    w = labels.unsqueeze(1).float().expand(-1, 5)
    q, k, v = convert.split_qkv(w, np_, ng, hn)
    assert q[:, 0].tolist() == [0, 1, 2, 10, 11, 12, 100, 101, 102, 110, 111, 112]  # heads 0..3 in order
    assert k[:, 0].tolist() == [20, 21, 22, 120, 121, 122]
    assert v[:, 0].tolist() == [30, 31, 32, 130, 131, 132]


@pytest.mark.parametrize("router", ["usmoe", "etr", "stablemoe"])
def test_routers_that_see_other_tokens_are_refused_by_name(router):
    config = tiny_config()
    info = convert.GPTInfo(vocab_size=100, max_position_embeddings=64)
    with pytest.raises(ValueError, match=f"acmoe.router='{router}' cannot be exported"):
        convert.hf_config(config, ACSettings(router=router), info)


def test_elliptical_attention_and_capacity_dropping_are_refused():
    config = tiny_config(moe_expert_capacity_factor=1.25)
    info = convert.GPTInfo(vocab_size=100, max_position_embeddings=64)
    with pytest.raises(ValueError) as err:
        convert.hf_config(config, ACSettings(), info, elliptical=EllipticalSettings(enabled=True))
    assert "elliptical attention" in str(err.value) and "moe_expert_capacity_factor=1.25" in str(err.value)


@pytest.mark.usefixtures("megatron_ws1")
def test_an_ac_model_without_fixed_inference_tables_is_refused(tmp_path):
    settings = ACSettings(router="ac", first_ac_layer=2)
    model = _megatron(settings)
    for r in inference_stats.ac_routers(model):
        r.set_inference_weights(None)  # a batch-trained model that was never calibrated
    with pytest.raises(ValueError, match="have no inference statistics"):
        convert.export(model, settings, tmp_path)
    with pytest.raises(ValueError, match="are not those of acmoe.router='topk'"):
        convert.export(model, ACSettings(router="topk"), tmp_path, ac_tables={})
