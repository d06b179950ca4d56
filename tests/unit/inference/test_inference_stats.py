"""Inference-time AC statistics: the calibrated table of a batch-trained model, the EMA model's
running statistics, and what they buy (scores independent of the batch, causal)."""

import pytest
import torch

from acmoe_megatron.core.ac_stats import WeightAverage
from acmoe_megatron.core.settings import ACSettings
from acmoe_megatron.inference import calibration as inference_stats
from acmoe_megatron.model.chunk_state import state_of
from acmoe_megatron.model.routers import ACRouter
from acmoe_megatron.runtime.checkpoint_check import INFERENCE_STATS_FILE
from acmoe_megatron.testing import build_gpt, tiny_config

SEQ, VOCAB = 32, 128


def test_weight_average_is_the_token_weighted_mean_row_with_a_fallback_for_unseen_clusters():
    avg = WeightAverage(3, 2, "cpu")
    avg.add(torch.tensor([[1.0, 2.0], [4.0, 4.0], [9.0, 9.0]]), torch.tensor([3.0, 1.0, 0.0]))
    avg.add(torch.tensor([[3.0, 6.0], [8.0, 0.0], [7.0, 7.0]]), torch.tensor([1.0, 1.0, 0.0]))
    w_KD, counts_K = avg.result()
    assert counts_K.tolist() == [4.0, 2.0, 0.0]
    assert torch.allclose(w_KD[0], torch.tensor([(3 * 1 + 3) / 4, (3 * 2 + 6) / 4]))
    assert torch.allclose(w_KD[1], torch.tensor([6.0, 2.0]))
    # cluster 2 never held a token: the mean row over all tokens, not its never-used rows
    assert torch.allclose(w_KD[2], torch.tensor([(3 + 4 + 3 + 8) / 6, (6 + 4 + 6 + 0) / 6]))
    # a group whose ranks hold the same statistics twice: same table, counts not doubled
    w2, c2 = avg.result(all_reduce=lambda t: t.mul_(2), replicas=2)
    assert torch.allclose(w2, w_KD) and c2.tolist() == counts_K.tolist()


def _model(source="batch", mode="release"):
    torch.manual_seed(0)
    model = build_gpt(tiny_config(), ACSettings(first_ac_layer=2, source=source, mode=mode),
                      vocab_size=VOCAB, max_sequence_length=SEQ)
    return model


def _tokens(seed, b):
    return torch.randint(0, VOCAB, (b, SEQ), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens):
    state_of(model).reset()
    pos = torch.arange(SEQ).unsqueeze(0).expand(tokens.shape[0], -1)
    with torch.no_grad():
        return model(tokens, pos, None)


def _one_by_one(model, tokens):
    return torch.cat([_logits(model, tokens[i:i + 1]) for i in range(tokens.shape[0])])


def _calibrated(model, batches=4, b=4):
    def run():
        for k in range(batches):
            _logits(model, _tokens(100 + k, b))

    model.eval()
    return inference_stats.calibrate(model, run)


@pytest.mark.usefixtures("megatron_ws1")
@pytest.mark.parametrize("mode", ["release", "clean"])
def test_calibrated_statistics_make_the_scores_independent_of_the_batch_and_causal(mode):
    model = _model(mode=mode)
    tokens = _tokens(1, 8)
    model.eval()
    batch8, batch1 = _logits(model, tokens), _one_by_one(model, tokens)
    assert not torch.allclose(batch8, batch1, atol=1e-4), "batch statistics should depend on the batch"

    tables = _calibrated(model)
    assert sorted(tables) == [2, 3, 4]  # every MoE layer from the first AC layer
    assert all(t["counts_K"].sum() == 4 * 4 * SEQ for t in tables.values())
    with pytest.raises(ValueError, match="no inference statistics"):
        inference_stats.fixed_weights(model)  # calibrate() leaves the routers as they were
    inference_stats.install(model, tables)
    cal8, cal1 = _logits(model, tokens), _one_by_one(model, tokens)
    torch.testing.assert_close(cal8, cal1, rtol=1e-5, atol=1e-5)
    # causal: a prefix scores the same whatever follows it
    t = SEQ // 2
    other = tokens.clone()
    other[:, t + 1:] = _tokens(7, 8)[:, t + 1:]
    torch.testing.assert_close(_logits(model, other)[:, : t + 1], cal8[:, : t + 1], rtol=1e-5, atol=1e-5)
    assert set(inference_stats.fixed_weights(model)) == {2, 3, 4}
    # training still routes with the batch statistics (tiny_config has no dropout)
    model.train()
    torch.testing.assert_close(_logits(model, tokens), batch8, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("megatron_ws1")
def test_the_calibrated_table_is_the_mean_of_the_weights_the_routers_used():
    """One calibration micro-batch: the table equals that micro-batch's own AC weights on every
    cluster that held a token (what the router routed with), so evaluation of that very batch with the
    calibrated table reproduces the batch-statistics logits."""
    model = _model()
    model.eval()
    tokens = _tokens(100, 4)
    reference = _logits(model, tokens)
    tables = _calibrated(model, batches=1, b=4)
    inference_stats.install(model, tables)
    torch.testing.assert_close(_logits(model, tokens), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("megatron_ws1")
def test_ema_models_route_with_their_running_statistics_and_refuse_calibration():
    model = _model(source="ema")
    for r in inference_stats.ac_routers(model):  # as if trained: running statistics present
        g = torch.Generator().manual_seed(r.layer_number)
        r.ac_ema_mad.copy_(torch.rand(r.ac_ema_mad.shape, generator=g) + 0.05)
        r.ac_ema_count.fill_(100.0)
    model.eval()
    tokens = _tokens(1, 8)
    torch.testing.assert_close(_logits(model, tokens), _one_by_one(model, tokens), rtol=1e-5, atol=1e-5)
    assert set(inference_stats.fixed_weights(model)) == {2, 3, 4}
    with pytest.raises(ValueError, match="calibration is for acmoe.source=batch models"):
        _calibrated(model)


def test_saved_tables_load_back_and_a_foreign_file_is_refused(tmp_path):
    tables = {3: {"w_KD": torch.rand(4, 8), "counts_K": torch.tensor([1.0, 2.0, 0.0, 5.0])}}
    path = inference_stats.save(tmp_path / INFERENCE_STATS_FILE, tables, {"micro_batches": 4})
    back, meta = inference_stats.load(path)
    assert meta == {"micro_batches": 4} and torch.equal(back[3]["w_KD"], tables[3]["w_KD"])
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not an acmoe-inference-stats file"):
        inference_stats.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="acmoe-eval RUN_DIR --calibrate N"):
        inference_stats.load(tmp_path / "missing.pt")


@pytest.mark.usefixtures("megatron_ws1")
def test_inference_weights_of_the_wrong_shape_are_refused():
    router = inference_stats.ac_routers(_model())[0]
    with pytest.raises(ValueError, match=r"inference weights of shape \(3, 64\), the router needs \(4, 64\)"):
        router.set_inference_weights(torch.ones(3, 64))
    assert isinstance(router, ACRouter)
