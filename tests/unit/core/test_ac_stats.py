"""ac_stats against a literal re-implementation of the official LM code (COSAGate_Balance, use_var
+ mad), written the way the release computes it: ``index_reduce(..., "mean", include_self=False)``,
K = 1 + max of all previous top-k indices via ``.item()``, W = 1/(A + 1e-4), clip at 10·mean,
per-feature normalisation, m = W[c] (spec §3.1)."""


import pytest
import torch
from reference_acmoe import official_scores, official_weights

from acmoe_megatron.core import ac_stats


def _labels(T, E, k, gen, missing=()):
    """Random top-k indices per token (distinct experts), avoiding the experts in ``missing``."""
    allowed = torch.tensor([e for e in range(E) if e not in missing])
    idx = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:k]] for _ in range(T)])
    return idx


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("missing", [(), (1,), (0, 5), (7,)])
def test_weights_match_release(seed, missing):
    gen = torch.Generator().manual_seed(seed)
    T, D, E, k = 96, 24, 8, 2
    X = torch.randn(T, D, generator=gen) * torch.rand(D, generator=gen) * 3
    prev = _labels(T, E, k, gen, missing)
    W_ref, m_ref = official_weights(X, prev)
    K = W_ref.shape[0]
    w = ac_stats.ac_weights(X, prev[:, 0], E, mode="release", max_label=prev.max())
    torch.testing.assert_close(w[:K], W_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w[prev[:, 0]], m_ref, rtol=1e-6, atol=1e-6)


def test_empty_and_singleton_clusters_follow_release():
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(10, 6, generator=gen)
    prev = torch.tensor([[0, 1]] * 6 + [[3, 0]] * 3 + [[4, 0]])  # cluster 1, 2 empty as top-1; 4 singleton
    W_ref, _ = official_weights(X, prev)
    w = ac_stats.ac_weights(X, prev[:, 0], 6, mode="release", max_label=prev.max())
    torch.testing.assert_close(w[:5], W_ref, rtol=1e-6, atol=1e-6)
    # empty rows 1, 2 and the singleton row 4 got MAD 0 -> the clipped maximum before normalising
    assert torch.isfinite(w).all()


def test_scores_match_release():
    gen = torch.Generator().manual_seed(4)
    T, D, E = 64, 16, 8
    X = torch.randn(T, D, generator=gen)
    prev = _labels(T, E, 2, gen)
    emb = torch.randn(E, D, generator=gen)
    w = ac_stats.ac_weights(X, prev[:, 0], E, max_label=prev.max())
    S = ac_stats.ac_scores(X, emb, w, prev[:, 0])
    torch.testing.assert_close(S, official_scores(X, prev, emb), rtol=1e-5, atol=1e-5)


def test_statistics_by_hand():
    X = torch.tensor([[1.0, 0.0], [3.0, 0.0], [10.0, 4.0], [10.0, 8.0]])
    labels = torch.tensor([0, 0, 1, 1])
    counts = ac_stats.cluster_counts(labels, 3)
    assert counts.tolist() == [2.0, 2.0, 0.0]
    mean = ac_stats.cluster_means(X, labels, counts)
    assert mean.tolist() == [[2.0, 0.0], [10.0, 6.0], [0.0, 0.0]]
    mad = ac_stats.cluster_mad(X, labels, mean, counts)
    assert mad.tolist() == [[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]
    w = ac_stats.inverse_dispersion(mad, eps=1.0)
    torch.testing.assert_close(w, torch.tensor([[0.5, 1.0], [1.0, 1 / 3], [1.0, 1.0]]))


def test_clip_and_feature_normalisation():
    w = torch.tensor([[1.0, 100.0], [1.0, 1.0]])
    rows = torch.tensor([True, True])
    clipped = ac_stats.clip_weights(w, rows, clip=2.0)  # mean = 25.75 -> threshold 51.5
    assert clipped.tolist() == [[1.0, 51.5], [1.0, 1.0]]
    normed = ac_stats.normalize_per_feature(clipped, rows)
    torch.testing.assert_close(normed.mean(0), torch.ones(2))


def test_clean_mode_gives_identity_to_small_clusters():
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(20, 4, generator=gen)
    labels = torch.tensor([0] * 10 + [1] * 9 + [2])
    w = ac_stats.ac_weights(X, labels, 4, mode="clean", min_cluster_size=2)
    assert torch.equal(w[2], torch.ones(4)) and torch.equal(w[3], torch.ones(4))
    torch.testing.assert_close(w[:2].mean(0), torch.ones(4))


def test_inverse_dispersion_weights_tight_features_more():
    # cluster 0 is tight along feature 0, cluster 1 along feature 1 (Theorem 1: weight tight features)
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(50, 2, generator=gen) * torch.tensor([0.1, 5.0])
    b = torch.randn(50, 2, generator=gen) * torch.tensor([5.0, 0.1])
    labels = torch.tensor([0] * 50 + [1] * 50)
    w = ac_stats.ac_weights(torch.cat([a, b]), labels, 2)
    assert w[0, 0] > 1 > w[1, 0] and w[1, 1] > 1 > w[0, 1]


def test_nonfinite_scores_replaced_by_min_finite():
    """Through ac_scores (M = I, unit embeddings, so scores = x): NaN and inf scores become the
    minimum finite score."""
    x = torch.tensor([[1.0, 0.0], [float("nan"), float("nan")], [0.0, -2.0], [float("inf"), float("-inf")]])
    out = ac_stats.ac_scores(x, torch.eye(2))
    assert out.tolist() == [[1.0, 0.0], [-2.0, -2.0], [0.0, -2.0], [-2.0, -2.0]]


def test_no_gradient_through_transform():
    gen = torch.Generator().manual_seed(7)
    X = torch.randn(32, 8, generator=gen, requires_grad=True)
    emb = torch.randn(4, 8, generator=gen, requires_grad=True)
    labels = torch.randint(0, 4, (32,), generator=gen)
    w = ac_stats.ac_weights(X, labels, 4)
    assert not w.requires_grad
    ac_stats.ac_scores(X, emb, w, labels).sum().backward()
    assert X.grad is not None and emb.grad is not None


def test_statistics_are_fp32_for_bf16_input():
    X = torch.randn(16, 8).to(torch.bfloat16)
    labels = torch.randint(0, 3, (16,))
    w = ac_stats.ac_weights(X, labels, 3)
    assert w.dtype == torch.float32
    assert ac_stats.ac_scores(X, torch.randn(3, 8), w, labels).dtype == torch.float32


def test_unknown_row_mode_is_an_error():
    with pytest.raises(ValueError, match="release"):
        ac_stats.ac_weights(torch.randn(4, 2), torch.zeros(4, dtype=torch.long), 2, mode="bogus")


def _literal_scores(x, emb, w, labels, dtype):
    """The autograd-traced formula: (x ⊙ w[c]) · normalize(e)^T, non-finite replaced."""
    xm = x.to(dtype) if w is None else x.to(dtype) * w.to(dtype)[labels]
    s = xm @ torch.nn.functional.normalize(emb.to(dtype), dim=1).t()
    finite = torch.isfinite(s)
    low = torch.where(finite, s, torch.full_like(s, float("inf"))).amin()
    return torch.where(finite, s, low.detach())


@pytest.mark.parametrize("cosine", [False, True])
def test_scores_backward_matches_autograd_of_the_formula(cosine):
    gen = torch.Generator().manual_seed(8)
    T, D, E = 40, 12, 5
    X = torch.randn(T, D, generator=gen, dtype=torch.float64, requires_grad=True)
    emb = torch.randn(E, D, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, E, (T,), generator=gen)
    w = None if cosine else ac_stats.ac_weights(X, labels, E).double()
    assert torch.autograd.gradcheck(lambda x, e: ac_stats.ac_scores(x, e, w, labels, torch.float64), (X, emb))
    out = ac_stats.ac_scores(X, emb, w, labels, torch.float64)
    ref = _literal_scores(X, emb, w, labels, torch.float64)
    g = torch.randn(T, E, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, (X, emb), g)
    grads_ref = torch.autograd.grad(ref, (X, emb), g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_scores_backward_with_bf16_input_and_nonfinite_scores():
    """bf16 x and embedding (megatron's bf16 params): fp32 maths, grads in the inputs' dtype; a
    token whose score is non-finite gets no gradient from the replaced entries (they are constants)."""
    gen = torch.Generator().manual_seed(9)
    T, D, E = 16, 8, 4
    X = torch.randn(T, D, generator=gen).to(torch.bfloat16)
    X[3, 0] = float("inf")
    X.requires_grad_(True)
    emb = torch.randn(E, D, generator=gen).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, E, (T,), generator=gen)
    w = torch.rand(E, D, generator=gen) + 0.5
    out = ac_stats.ac_scores(X, emb, w, labels)
    ref = _literal_scores(X, emb, w, labels, torch.float32)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)
    g = torch.randn(T, E, generator=gen)
    dx, de = torch.autograd.grad(out, (X, emb), g)
    dx_ref, de_ref = torch.autograd.grad(ref, (X, emb), g)
    assert dx.dtype == torch.bfloat16 and de.dtype == torch.bfloat16
    torch.testing.assert_close(dx.float(), dx_ref.float())
    # the inf token poisons the embedding gradient (0 · inf) in both, as in megatron's own router
    torch.testing.assert_close(de.float(), de_ref.float(), equal_nan=True)


def test_scores_save_no_fp32_copy_of_the_tokens():
    """Backward keeps x in its own dtype and small tables, nothing else of size T×D (memory: the
    literal formula saves x in fp32, m and x ⊙ m — three fp32 T×D tensors per AC layer)."""
    T, D, E = 64, 32, 4
    X = torch.randn(T, D).to(torch.bfloat16).requires_grad_(True)
    emb = torch.randn(E, D, requires_grad=True)
    labels = torch.randint(0, E, (T,))
    w = torch.rand(E, D) + 0.5
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ac_stats.ac_scores(X, emb, w, labels)
    big = [t for t in saved if t.numel() >= T * D]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16 and big[0].data_ptr() == X.data_ptr()


def _needs_inductor():
    import shutil

    if shutil.which("c++") is None and shutil.which("g++") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler (none on PATH)")


@pytest.mark.parametrize("norm,mode", [("feature", "release"), ("global_post", "clean")])
def test_compiled_statistics_match_eager(norm, mode):
    """acmoe.compile: the compiled statistics + weights equal the eager ones."""
    _needs_inductor()
    gen = torch.Generator().manual_seed(10)
    T, D, E = 96, 16, 8
    X = torch.randn(T, D, generator=gen) * torch.rand(D, generator=gen) * 3
    prev = _labels(T, E, 2, gen, missing=(6,))
    kw = dict(eps=1e-4, clip=10.0, norm=norm, mode=mode, max_label=prev.max(), min_cluster_size=2)
    w, stats = ac_stats.local_weights(X, prev[:, 0], E, **kw)
    w_c, stats_c = ac_stats.compiled(ac_stats.local_weights)(X, prev[:, 0], E, **kw)
    torch.testing.assert_close(w_c, w, rtol=1e-6, atol=1e-6)
    for a, b in zip((stats_c.counts_K, stats_c.mean_KD, stats_c.mad_KD), (stats.counts_K, stats.mean_KD, stats.mad_KD)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # with a collective the router compiles the weights alone (statistics stay eager around it)
    w_only = ac_stats.compiled(ac_stats.weights_from_stats)(stats.mad_KD, stats.counts_K, **kw)
    torch.testing.assert_close(w_only, w, rtol=1e-6, atol=1e-6)


def test_compiled_scores_match_eager_forward_and_backward():
    _needs_inductor()
    gen = torch.Generator().manual_seed(11)
    T, D, E = 48, 16, 6
    X = torch.randn(T, D, generator=gen).to(torch.bfloat16).requires_grad_(True)
    emb = torch.randn(E, D, generator=gen, requires_grad=True)
    labels = torch.randint(0, E, (T,), generator=gen)
    w = torch.rand(E, D, generator=gen) + 0.5
    g = torch.randn(T, E, generator=gen)
    outs = []
    for compile_ in (False, True):
        s = ac_stats.ac_scores(X, emb, w, labels, compile=compile_)
        outs.append((s, *torch.autograd.grad(s, (X, emb), g)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5)


def test_statistics_and_scores_stay_fp32_under_autocast():
    """A torch.autocast region around the model (bf16) does not lower the AC maths' precision."""
    gen = torch.Generator().manual_seed(12)
    T, D, E = 64, 16, 4
    X = torch.randn(T, D, generator=gen, requires_grad=True)
    emb = torch.randn(E, D, generator=gen, requires_grad=True)
    labels = torch.randint(0, E, (T,), generator=gen)
    ref_w = ac_stats.ac_weights(X, labels, E)
    ref = ac_stats.ac_scores(X, emb, ref_w, labels)
    ref_grads = torch.autograd.grad(ref.sum(), (X, emb))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with ac_stats.no_autocast(X.device):
            w = ac_stats.ac_weights(X, labels, E)
        out = ac_stats.ac_scores(X, emb, w, labels)
        grads = torch.autograd.grad(out.sum(), (X, emb))
    assert out.dtype == torch.float32
    torch.testing.assert_close(w, ref_w, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the guard prevents: bf16 maths
        assert (X @ emb.t()).dtype == torch.bfloat16
