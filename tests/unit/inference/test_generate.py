"""acmoe-generate's decoding loop on megatron's KV cache: incremental logits equal a full forward's,
greedy and seeded sampling are reproducible, nucleus sampling keeps the smallest set reaching top_p."""

import pytest
import torch

from acmoe_megatron.core.settings import ACSettings
from acmoe_megatron.inference import calibration as inference_stats
from acmoe_megatron.inference.generate import generate_tokens, next_token
from acmoe_megatron.model.chunk_state import state_of
from acmoe_megatron.runtime import cpu_runtime
from acmoe_megatron.testing import build_gpt, tiny_config

SEQ, VOCAB = 32, 128


def _full_logits(model, ids):
    state_of(model).reset()
    tokens = torch.tensor([ids])
    with torch.no_grad():
        return model(tokens, torch.arange(len(ids)).unsqueeze(0), None)[0]


@pytest.fixture(scope="module")
def calibrated_model(megatron_ws1):
    torch.manual_seed(0)
    with cpu_runtime.device_redirect():
        model = build_gpt(tiny_config(), ACSettings(first_ac_layer=2, source="batch"), vocab_size=VOCAB,
                          max_sequence_length=SEQ)
        model.eval()
        batches = [torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(k)) for k in range(3)]
        inference_stats.install(model, inference_stats.calibrate(model, lambda: [
            model(b, torch.arange(SEQ).unsqueeze(0).expand(4, -1), None) for b in batches]))
    return model


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_incremental_decoding_logits_equal_a_full_forward(calibrated_model, temperature):
    prompt = [5, 17, 99, 3, 42, 8]
    new, logits_NV = generate_tokens(calibrated_model, prompt, 12, vocab_size=VOCAB, temperature=temperature,
                                     generator=torch.Generator().manual_seed(3), return_logits=True)
    assert len(new) == 12
    full_SV = _full_logits(calibrated_model, prompt + new[:-1])
    torch.testing.assert_close(logits_NV, full_SV[len(prompt) - 1:], rtol=1e-4, atol=1e-4)
    if temperature == 0.0:  # greedy: every token is the argmax of the full forward at its position
        assert new == full_SV[len(prompt) - 1:].argmax(-1).tolist()


def test_generation_is_reproducible_and_stops_at_eod(calibrated_model):
    prompt = [1, 2, 3]
    greedy = [generate_tokens(calibrated_model, prompt, 10, vocab_size=VOCAB) for _ in range(2)]
    assert greedy[0] == greedy[1]
    sampled = [generate_tokens(calibrated_model, prompt, 10, vocab_size=VOCAB, temperature=1.0, top_p=0.9,
                               generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]
    eod = greedy[0][3]
    assert generate_tokens(calibrated_model, prompt, 10, vocab_size=VOCAB, eod=eod) == greedy[0][:greedy[0].index(eod) + 1]


@pytest.mark.usefixtures("megatron_ws1")
def test_batch_statistics_decoding_differs_from_the_full_forward():
    """Why batch-trained models are refused uncalibrated: one-token clusters change the scores."""
    torch.manual_seed(0)
    model = build_gpt(tiny_config(), ACSettings(first_ac_layer=2, source="batch"), vocab_size=VOCAB,
                      max_sequence_length=SEQ)
    model.eval()
    prompt = [5, 17, 99, 3, 42, 8, 11, 60]
    new, logits_NV = generate_tokens(model, prompt, 6, vocab_size=VOCAB, return_logits=True)
    full_SV = _full_logits(model, prompt + new[:-1])
    assert not torch.allclose(logits_NV, full_SV[len(prompt) - 1:], atol=1e-4)
    with pytest.raises(ValueError, match="calibrate it first"):
        inference_stats.fixed_weights(model)


def test_next_token_greedy_and_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert next_token(logits, 0.0, 1.0, None) == 0
    g = torch.Generator().manual_seed(0)
    assert {next_token(logits, 1.0, 0.5, g) for _ in range(50)} == {0}  # 0.5 alone reaches top_p
    assert {next_token(logits, 1.0, 0.8, g) for _ in range(200)} == {0, 1}  # 0.5 + 0.3 reach 0.8
    assert {next_token(logits, 1.0, 1.0, g) for _ in range(400)} == {0, 1, 2, 3}
