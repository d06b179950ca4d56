"""The expert-specialisation recorder and report (specialisation.py) on a tiny megatron GPT with AC
routers (4 MoE layers, 4 experts, AC from MoE layer 3), checked against what the routers returned
(``testing.capture_router_outputs``), against a model whose first router sends byte v to expert
v % 4 (so the token ↔ router-position mapping is known without megatron's flattening), and against
the AC table the router actually scored with."""

import json
from collections import Counter

import pytest
import torch
import torch.distributed as dist

from acmoe_megatron.core import ac_stats
from acmoe_megatron.core.settings import ACSettings
from acmoe_megatron.inference.specialisation import EOD_ID, SpecialisationRecorder, router_order, write_report
from acmoe_megatron.model.routers import ACRouter
from acmoe_megatron.observability import metrics
from acmoe_megatron.testing import build_gpt, capture_router_outputs, tiny_config

pytestmark = pytest.mark.usefixtures("megatron_ws1")
B, S, E, VOCAB = 2, 32, 4, 257
TEXT = (b"The 3 quick brown foxes jumped over 12 LAZY dogs.\nA second line, with punctuation!  "
        b"Numbers: 2024 and 7.\tTabs too. Zebra quartz jinx wolf vex; pack my box with five dozen jugs")


def _batches(n=3):
    """``n`` fixed [B, S] micro-batches of text bytes, with an end-of-document id in the first."""
    ids = list(TEXT) * 2
    out = []
    for i in range(n):
        chunk = ids[i * B * S:(i + 1) * B * S]
        out.append(torch.tensor(chunk).view(B, S))
    out[0][0, 20] = EOD_ID
    return out


def _model():
    torch.manual_seed(0)
    model = build_gpt(tiny_config(num_layers=4, num_moe_experts=E), ACSettings(first_ac_layer=3),
                      vocab_size=VOCAB, max_sequence_length=S)
    return model.eval()


def _run(model, batches, recorder=None, on_batch=None):
    pos = torch.arange(S).unsqueeze(0).expand(B, -1)
    seen = capture_router_outputs(model)
    with torch.no_grad():
        for ids in batches:
            model(ids, pos, None)
            if on_batch is not None:
                on_batch(ids, dict(seen))


def _top1(probs_TE, map_TE):
    return torch.where(map_TE, probs_TE, torch.full_like(probs_TE, -1.0)).argmax(-1)


def test_load_fractions_match_the_router_outputs():
    model = _model()
    rec = SpecialisationRecorder(model)
    top1, slots, tokens = Counter(), Counter(), Counter()

    def count(_ids, seen):
        for layer, (probs, rmap) in seen.items():
            top1.update({(layer, e): int(n) for e, n in enumerate(torch.bincount(_top1(probs, rmap), minlength=E))})
            slots.update({(layer, e): int(n) for e, n in enumerate(rmap.sum(0))})
            tokens[layer] += probs.shape[0]

    _run(model, _batches(), rec, count)
    d = rec.finish().to_dict()
    assert [L["layer"] for L in d["layers"]] == [1, 2, 3, 4]
    assert [L["router"] for L in d["layers"]] == ["LabelSourceRouter"] * 2 + ["ACRouter"] * 2
    for L in d["layers"]:
        n = L["layer"]
        assert L["tokens"] == tokens[n] == 3 * B * S
        assert sum(L["load_top1"]) == pytest.approx(1.0) and sum(L["load_slots"]) == pytest.approx(1.0)
        assert L["load_top1"] == pytest.approx([top1[n, e] / tokens[n] for e in range(E)])
        assert L["load_slots"] == pytest.approx([slots[n, e] / (2 * tokens[n]) for e in range(E)])
        assert sum(sum(row) for row in L["class_counts"]) == tokens[n]


def test_agreement_and_cooccurrence_match_consecutive_router_outputs():
    model = _model()
    rec = SpecialisationRecorder(model)
    cooc = {n: torch.zeros(E, E, dtype=torch.long) for n in (2, 3, 4)}

    def count(_ids, seen):
        for n in (2, 3, 4):
            prev, this = _top1(*seen[n - 1]), _top1(*seen[n])
            cooc[n] += torch.bincount(prev * E + this, minlength=E * E).view(E, E)

    _run(model, _batches(), rec, count)
    layers = rec.finish().to_dict()["layers"]
    assert layers[0]["agreement"] is None and layers[0]["clusters"] is None
    for L in layers[1:]:
        c = cooc[L["layer"]]
        assert L["agreement"]["cooccurrence"] == c.tolist()
        assert L["agreement"]["same_index"] == pytest.approx(float(c.diag().sum() / c.sum()))
        assert 0.0 <= L["agreement"]["rand"] <= 1.0


def _byte_mod_model():
    """Layer 1's router input is a function of the token alone and its top-1 is byte v -> v % 4:
    embedding row v = one-hot at feature v % 4, attention output zero, router rows one-hot."""
    model = _model()
    with torch.no_grad():
        emb = model.embedding.word_embeddings.weight
        emb.zero_()
        emb[torch.arange(VOCAB), torch.arange(VOCAB) % E] = 1.0
        model.decoder.layers[0].self_attention.linear_proj.weight.zero_()
        router = model.decoder.layers[0].mlp.router.weight
        router.zero_()
        router[torch.arange(E), torch.arange(E)] = 1.0
    return model


def _independent_keys(batches, n=3):
    """Per expert (= byte % 4): Counters of tokens, n-grams (within the document) and words."""
    out = {k: [Counter() for _ in range(E)] for k in ("tokens", "ngrams", "words")}
    for ids in batches:
        for row in ids.tolist():
            eods = [t for t, v in enumerate(row) if v == EOD_ID]
            for t, v in enumerate(row):
                start = max([0, t - n + 1] + [i + 1 for i in eods if i < t])
                out["tokens"][v % E][(v,)] += 1
                out["ngrams"][v % E][tuple(row[start:t + 1])] += 1
            word = []
            for v in row + [ord(" ")]:
                if v == EOD_ID or bytes([v]).isspace():
                    for u in word:
                        out["words"][u % E][tuple(word)] += 1
                    word = []
                else:
                    word.append(v)
    return out


def test_tokens_ngrams_and_words_land_on_the_expert_that_routed_them():
    """Breaks if token ids are matched to router positions in [B, S] instead of megatron's [S, B]."""
    model = _byte_mod_model()
    rec = SpecialisationRecorder(model)
    batches = _batches()
    _run(model, batches, rec, lambda ids, seen: torch.testing.assert_close(
        _top1(*seen[1]), ids.t().reshape(-1) % E))  # the crafted routing holds
    result = rec.finish()
    expected = _independent_keys(batches)
    for kind in ("tokens", "ngrams", "words"):
        assert result.layers[0].counters[kind] == expected[kind], kind
    layer1 = result.to_dict(min_count=1)["layers"][0]
    for x in layer1["experts"]:  # every byte of expert e is only ever routed to e: lift = 1 / load
        assert all(r["ids"][0] % E == x["expert"] for r in x["top_tokens"])
        assert [r["lift"] for r in x["top_tokens"]] == pytest.approx([1 / x["load_top1"]] * len(x["top_tokens"]))


def test_top_keys_are_ranked_by_lift_above_the_minimum_count():
    model = _model()
    rec = SpecialisationRecorder(model)
    _run(model, _batches(), rec)
    result = rec.finish()
    layer = result.layers[1]
    for kind in ("tokens", "ngrams", "words"):
        counters = layer.counters[kind]
        everyone = sum(counters, Counter())
        n_E = [sum(c.values()) for c in counters]
        for min_count in (1, 3):
            experts = result.to_dict(min_count=min_count, top=1000)["layers"][1]["experts"]
            for e, x in enumerate(experts):
                rows = x[f"top_{kind}"]
                assert {tuple(r["ids"]) for r in rows} == {k for k, c in counters[e].items() if c >= min_count}
                for r in rows:
                    share_all = everyone[tuple(r["ids"])] / sum(n_E)
                    assert r["lift"] == pytest.approx(r["count"] / n_E[e] / share_all)
                lifts = [r["lift"] for r in rows]
                assert lifts == sorted(lifts, reverse=True)
    assert all(len(x["top_tokens"]) <= 10 for x in result.to_dict(min_count=1)["layers"][1]["experts"])


def test_router_order_is_megatrons_s_major_flattening_and_its_sequence_parallel_shard():
    ids_BS = torch.arange(16).view(2, 8)  # value = b * 8 + s
    full = router_order(ids_BS, 8, 0)
    assert full.tolist() == [b * 8 + s for s in range(8) for b in range(2)]
    shard = router_order(ids_BS, 4, 1)  # tensor-parallel rank 1 of 2 sees positions 4..7
    assert shard.tolist() == [b * 8 + s for s in range(4, 8) for b in range(2)]
    assert router_order(ids_BS, 3, 0) is None


def _capture_ac(monkeypatch, model):
    """Per micro-batch: {layer: (router input [T, D], the w_KD the router scored with)}."""
    calls, inputs = [], {}
    real = ac_stats.ac_scores

    def scores(x_TD, e_ED, w_KD=None, labels_T=None, **kw):
        calls.append(w_KD)
        return real(x_TD, e_ED, w_KD, labels_T, **kw)

    monkeypatch.setattr(ac_stats, "ac_scores", scores)
    def keep(router, args, _out):
        inputs[router.layer_number] = (args[0].reshape(-1, args[0].shape[-1]), calls[-1])

    for r in model.modules():
        if isinstance(r, ACRouter):
            r.register_forward_hook(keep)
    return inputs


@pytest.mark.parametrize("fixed_table", [False, True])
def test_cluster_separation_raw_and_ac_use_the_routers_table(monkeypatch, fixed_table):
    model = _model()
    if fixed_table:  # a batch-independent table (inference_weights), as EMA / calibrated routers have
        for r in model.modules():
            if isinstance(r, ACRouter):
                w_KD = torch.rand(E, 64, generator=torch.Generator().manual_seed(r.layer_number)) + 0.5
                monkeypatch.setattr(r, "inference_weights", lambda w=w_KD: w, raising=False)
    inputs = _capture_ac(monkeypatch, model)
    rec = SpecialisationRecorder(model)
    sums = {n: dict(n_K=0, sum_KD=0, mad_K=0, ac_KD=0, acmad_K=0) for n in (3, 4)}

    def accumulate(_ids, seen):
        for n in (3, 4):
            x_TD, w_KD = inputs[n]
            st = ac_stats.cluster_stats(x_TD, _top1(*seen[n - 1]), E)
            acc, n_K = sums[n], st.counts_K
            acc["n_K"] += n_K
            acc["sum_KD"] += st.mean_KD * n_K[:, None]
            acc["mad_K"] += st.mad_KD.mean(1) * n_K
            acc["ac_KD"] += st.mean_KD * w_KD * n_K[:, None]
            acc["acmad_K"] += (st.mad_KD * w_KD).mean(1) * n_K

    _run(model, _batches(2), rec, accumulate)
    layers = {L["layer"]: L for L in rec.finish().to_dict()["layers"]}
    for n in (3, 4):
        a, c = sums[n], layers[n]["clusters"]
        present, n_K = a["n_K"] > 0, a["n_K"].clamp_min(1)
        raw = metrics.separation(a["sum_KD"] / n_K[:, None], (a["mad_K"] / n_K)[:, None], present)
        ac = metrics.separation(a["ac_KD"] / n_K[:, None], (a["acmad_K"] / n_K)[:, None], present)
        assert c["ac_weights"] == ("inference" if fixed_table else "batch")
        assert c["counts"] == a["n_K"].long().tolist()
        assert c["mad"] == pytest.approx((a["mad_K"] / n_K).tolist(), rel=1e-5)
        assert c["separation_raw"] == pytest.approx(float(raw), rel=1e-5)
        assert c["separation_ac"] == pytest.approx(float(ac), rel=1e-5)
    assert layers[2]["clusters"]["separation_ac"] is None  # not an AC layer: raw only


def test_single_micro_batch_matches_the_training_metrics_summary(monkeypatch):
    """One micro-batch: the separation ratios equal metrics.ac_summary's (the TensorBoard scalars)."""
    model = _model()
    inputs = _capture_ac(monkeypatch, model)
    rec = SpecialisationRecorder(model)
    got = {}

    def keep(_ids, seen):
        x_TD, w_KD = inputs[3]
        st = ac_stats.cluster_stats(x_TD, _top1(*seen[2]), E)
        got["summary"] = metrics.ac_summary(st.counts_K, st.mean_KD, st.mad_KD, w_KD, st.counts_K > 0, 1e-4, 10.0)

    _run(model, _batches(1), rec, keep)
    c = rec.finish().to_dict()["layers"][2]["clusters"]
    assert [c["separation_raw"], c["separation_ac"]] == pytest.approx(got["summary"][5:7].tolist(), rel=1e-5)


def test_finish_over_a_process_group_gives_the_same_numbers():
    model = _model()
    rec = SpecialisationRecorder(model)
    _run(model, _batches(), rec)
    local = rec.finish()
    reduced = rec.finish(dist.new_group([0], backend="gloo"))
    assert reduced.to_dict(min_count=1) == local.to_dict(min_count=1)
    for a, b in zip(local.layers, reduced.layers):
        assert a.counters == b.counters
        assert all(torch.equal(a.acc[k], b.acc[k]) for k in a.acc)


def test_only_no_grad_passes_are_recorded_and_detach_removes_the_hooks():
    model = _model()
    rec = SpecialisationRecorder(model)
    pos = torch.arange(S).unsqueeze(0).expand(B, -1)
    ids = _batches(1)[0]
    model(ids, pos, None)  # grad enabled: not an evaluation pass
    assert rec.finish().to_dict()["layers"][0]["tokens"] == 0
    _run(model, [ids], rec)
    rec.detach()
    _run(model, [ids], rec)
    assert rec.finish().to_dict()["layers"][0]["tokens"] == B * S


def test_report_files(tmp_path):
    model = _model()
    rec = SpecialisationRecorder(model)
    _run(model, _batches(), rec)
    paths = write_report(rec.finish(), tmp_path, title="tiny AC model", min_count=1)
    md = (tmp_path / "specialisation.md").read_text()
    data = json.loads((tmp_path / "specialisation.json").read_text())
    assert md.startswith("# tiny AC model") and data["title"] == "tiny AC model"
    for n in (1, 2, 3, 4):
        assert f"## MoE layer {n} " in md
        assert (tmp_path / f"layer{n:02d}_load.png").stat().st_size > 0
        assert (tmp_path / f"layer{n:02d}_token_classes.png").stat().st_size > 0
        assert (tmp_path / f"layer{n:02d}_cooccurrence.png").exists() == (n > 1)
    assert "AC-transformed" in md and md.count("| 3 |") == 4  # expert 3's row in each layer's table
    assert all(p.exists() for p in paths) and len(paths) == 2 + 4 * 2 + 3
    assert [len(L["experts"]) for L in data["layers"]] == [E] * 4
