"""Expert specialisation report (issue #18 item 3): what the experts of a trained MoE model take.

``SpecialisationRecorder`` hooks a model's chunks (megatron ``GPTModel``s, possibly wrapped) and
records, during ordinary no-grad forward passes, per MoE layer (every megatron ``TopKRouter``):

* load: each expert's share of the tokens by top-1 (the selected expert with the largest gate,
  ``labels.labels_from_routing``) and of the routed slots (top-k);
* what each expert takes (top-1): token ids, the n-gram (default 3) of tokens ending at the token
  (within its document: an n-gram never reaches back past an end-of-document id) and the word that
  contains it (the run of tokens between whitespace bytes / EOD, within the sequence: a word cut
  by the sequence edge counts as its visible part; whitespace and EOD tokens have no word);
* token classes, on byte ids (the project's byte tokenizer, ids 0..255 plus EOD 256): ``lower``
  a-z, ``upper`` A-Z, ``digit`` 0-9, ``space`` (space, \\t \\n \\v \\f \\r), ``punct`` (the other
  printable ASCII), ``utf8`` (bytes 0x80-0xFF, pieces of multi-byte characters), ``other``
  (control bytes, EOD, any id above 255);
* the AC clusters of the paper: the hidden states entering the layer grouped by the *previous*
  MoE layer's top-1 expert (as the chunk state holds it, i.e. what an AC router clusters by; else
  the previous router's top-1 seen by this recorder). Per cluster the mean absolute deviation per
  feature, averaged over features (MAD), and the separation ratio — mean between-centroid L1
  distance per feature over the mean within-cluster MAD (``metrics.separation``). Centroids are
  over all recorded tokens (sums); a MAD over all tokens would need a second pass, so MAD is the
  per-micro-batch MAD weighted by the cluster's token count. For ``ACRouter`` layers also in the
  transformed space x ⊙ w_c with the router's own table (``router.inference_weights()``) or, when
  it has none, the table its batch statistics give (``ac_stats.weights_from_stats`` on this
  micro-batch's MAD with the router's constants and mode) — this rank's tokens only;
* agreement with the previous MoE layer: 1 − Rand disagreement of the two top-1 partitions (first
  ``sample`` tokens of each micro-batch, as metrics.py), the share of tokens whose top-1 is the same
  expert index, and the E×E co-occurrence counts (rows: previous layer's expert, columns: this one).

Megatron flattens a router's input [s, b, h] to tokens t = s·b_size + b: token ids [b, s] map to the
router's order by ``ids.t().reshape(-1)`` (under sequence parallelism the router sees the s-shard
of its tensor-parallel rank). Numbers are float64 counters on the host (one ``all_reduce`` in
``finish``); the key counts are ``Counter``s (``all_gather_object``), each held to ``max_keys``
keys by dropping the rarest when it doubles (counts of the kept top keys are exact unless a key was
once dropped; then they are lower bounds). Word ids are local to a rank (a table of the distinct words
seen, which grows with the text) and become tuples of token ids in ``finish``.

Ranking: keys are ranked by **lift** — (share of the expert's tokens) / (share of all tokens at that
layer) — among keys seen at least ``min_count`` times with that expert; the count is shown beside.
Ranking by count puts spaces and 'e' on top of every expert (they are everywhere), which says
nothing about specialisation; the minimum count keeps one-off rare keys from topping the list.

``write_report`` writes into ``out_dir``: ``specialisation.md``, ``specialisation.json`` (every
number, top lists with ids, text, count, lift) and per MoE layer LL (two digits):
``layerLL_load.png`` (top-1 and slot load per expert), ``layerLL_token_classes.png`` (expert ×
class: share of each class's tokens whose top-1 is the expert) and, from the second MoE layer on,
``layerLL_cooccurrence.png`` (previous layer's top-1 × this layer's top-1, rows normalised).

Usage (every rank; ``finish`` is collective when given a group)::

    rec = SpecialisationRecorder(model_chunks, decode=tokenizer.decode)
    with torch.no_grad(): ...forward passes...
    result = rec.finish(group)      # sums over the ranks that saw different tokens
    rec.detach()
    if rank == 0: write_report(result, out_dir, title="...")

``group`` must hold ranks that saw different tokens or different layers (data parallel, pipeline
stages, tensor-parallel ranks under sequence parallelism); tensor-parallel ranks without sequence
parallelism see the same tokens and would be counted twice.
"""

from __future__ import annotations

import json
import math
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from acmoe_megatron.core import ac_stats
from acmoe_megatron.core.labels import LayerLabels, labels_from_routing
from acmoe_megatron.model.chunk_state import state_of, unwrap_chunk
from acmoe_megatron.model.routers import ACRouter
from acmoe_megatron.observability import metrics

EOD_ID = 256  # data.tokenizer.EOD_ID
TOKEN_CLASSES = ("lower", "upper", "digit", "space", "punct", "utf8", "other")
KINDS = ("tokens", "ngrams", "words")
TOP, MIN_COUNT, MAX_KEYS = 10, 5, 5000
_SPACE = b" \t\n\v\f\r"


def default_decode(ids) -> str:
    """Byte ids as UTF-8 (invalid bytes as U+FFFD); EOD as ``<eod>``."""
    out, run = [], bytearray()
    for i in ids:
        if 0 <= i < 256:
            run.append(i)
            continue
        out += [run.decode("utf-8", errors="replace"), "<eod>" if i == EOD_ID else f"<{i}>"]
        run = bytearray()
    return "".join(out) + run.decode("utf-8", errors="replace")


def token_class_table(vocab_size: int) -> torch.Tensor:
    """``[V]`` index into ``TOKEN_CLASSES`` of each token id (byte semantics, see the docstring)."""
    table = torch.full((vocab_size,), TOKEN_CLASSES.index("other"), dtype=torch.long)
    for b in range(min(vocab_size, 256)):
        c = chr(b)
        name = ("space" if b in _SPACE else "lower" if "a" <= c <= "z" else "upper" if "A" <= c <= "Z"
                else "digit" if c.isdigit() else "punct" if c in string.punctuation else "utf8" if b >= 128
                else "other")
        table[b] = TOKEN_CLASSES.index(name)
    return table


# -- token keys of a micro-batch (pure functions on [B, S] ids) -----------------------------------

def ngram_codes(ids_BS: torch.Tensor, n: int, base: int, eod_id: int = EOD_ID) -> torch.Tensor:
    """The n-gram ending at each token as one int64: Σ_k (id[t−k] + 1)·base^k over the k < n
    positions inside the sequence and the token's document (0 digits: absent)."""
    eod_BS = (ids_BS == eod_id).long()
    doc_BS = eod_BS.cumsum(1) - eod_BS  # an EOD closes its document
    code_BS = ids_BS + 1
    for k in range(1, n):
        prev_BS = torch.nn.functional.pad(ids_BS, (k, 0), value=-1)[:, :-k]
        same_doc_BS = torch.nn.functional.pad(doc_BS, (k, 0), value=-1)[:, :-k] == doc_BS
        code_BS = code_BS + torch.where(same_doc_BS, prev_BS + 1, 0) * base**k
    return code_BS


def decode_ngram(code: int, n: int, base: int) -> tuple[int, ...]:
    digits = [(code // base**k) % base for k in range(n)]
    return tuple(d - 1 for d in reversed(digits) if d)


def word_ids(ids_BS: torch.Tensor, boundary_V: torch.Tensor, vocabulary: dict) -> torch.Tensor:
    """``[B, S]`` id (in ``vocabulary``: tuple of token ids -> int, extended here) of the word each
    token lies in; −1 for boundary tokens (whitespace, EOD)."""
    out = []
    for row, row_inside in zip(ids_BS.tolist(), (~boundary_V[ids_BS]).tolist()):
        words, start = [-1] * len(row), None
        for s, inside in enumerate(row_inside + [False]):
            if inside and start is None:
                start = s
            elif not inside and start is not None:
                words[start:s] = [vocabulary.setdefault(tuple(row[start:s]), len(vocabulary))] * (s - start)
                start = None
        out.append(words)
    return torch.tensor(out, dtype=torch.long).view(ids_BS.shape)


def router_order(x_BS: torch.Tensor, s_local: int, tp_rank: int) -> torch.Tensor | None:
    """``[B, S]`` per-token values in a router's token order (t = s·B + b), for a router that sees
    ``s_local`` positions (the ``tp_rank``-th s-shard under sequence parallelism); None if the
    shapes do not fit."""
    S = x_BS.shape[-1]
    if S % s_local:
        return None
    x_SB = x_BS.transpose(-1, -2)[..., tp_rank * s_local:(tp_rank + 1) * s_local, :]
    return x_SB.reshape(*x_BS.shape[:-2], -1)


# -- accumulators ----------------------------------------------------------------------------------

def _fields(E: int, D: int) -> dict[str, tuple[int, ...]]:
    C = len(TOKEN_CLASSES)
    return {"tokens": (1,), "top1": (E,), "slots": (E,), "keyed": (E,), "worded": (E,), "classes": (E, C),
            "cooc": (E, E), "same": (1,), "rand_sum": (1,), "rand_n": (1,), "cluster_n": (E,),
            "cluster_sum": (E, D), "cluster_mad": (E,), "ac_sum": (E, D), "ac_mad": (E,)}


def _zeros(E: int, D: int) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(shape, dtype=torch.float64) for k, shape in _fields(E, D).items()}


def _bump(counters: list[Counter], codes_T: torch.Tensor, top1_T: torch.Tensor, max_keys: int) -> None:
    """Count (key, top-1 expert) pairs of the tokens with a key (>= 0) into ``counters[expert]``."""
    keep, E = codes_T >= 0, len(counters)
    pairs, counts = torch.unique(codes_T[keep] * E + top1_T[keep], return_counts=True)
    for pair, c in zip(pairs.tolist(), counts.tolist()):
        counters[pair % E][pair // E] += c
    for e, ctr in enumerate(counters):
        if len(ctr) > 2 * max_keys:
            counters[e] = Counter(dict(ctr.most_common(max_keys)))


def separation_of(n_K: torch.Tensor, sum_KD: torch.Tensor, mad_K: torch.Tensor) -> float | None:
    """Separation ratio from summed statistics (``metrics.separation``); None with < 2 clusters."""
    present_K = n_K > 0
    if int(present_K.sum()) < 2:
        return None
    mean_KD = sum_KD / n_K.clamp_min(1).unsqueeze(1)
    return float(metrics.separation(mean_KD, (mad_K / n_K.clamp_min(1)).unsqueeze(1), present_K))


def ac_weights_for(router, stats: ac_stats.ClusterStats, prev: LayerLabels) -> tuple[torch.Tensor, str]:
    """(the AC table ``[K, D]`` the router routes with, ``"inference"`` | ``"batch"``)."""
    w_KD = router.inference_weights()
    if w_KD is not None:
        return w_KD.float(), "inference"
    c, s = router.ac_constants, router.settings
    return ac_stats.weights_from_stats(stats.mad_KD, stats.counts_K, eps=c["eps"], clip=c["clip"], norm=c["norm"],
                                       mode=s.mode, max_label=prev.max_label,
                                       min_cluster_size=s.min_cluster_size), "batch"


# -- the recorder ----------------------------------------------------------------------------------

@dataclass
class _Chunk:
    gpt: object
    moe_layers: list[int]
    keys_KBS: torch.Tensor | None = None  # [3, B, S]: token id, n-gram code, word id
    labels: dict[int, LayerLabels] = field(default_factory=dict)  # this forward's top-1 per layer


class SpecialisationRecorder:
    """Forward hooks on model chunks that accumulate the specialisation statistics (no-grad passes)."""

    def __init__(self, model, *, decode: Callable = default_decode, ngram: int = 3, sample: int = 256,
                 max_keys: int = MAX_KEYS, eod_id: int = EOD_ID):
        from megatron.core.transformer.moe.router import TopKRouter

        self.decode, self.ngram, self.sample, self.max_keys, self.eod_id = decode, ngram, sample, max_keys, eod_id
        self._is_ac = lambda r: isinstance(r, ACRouter)
        self._handles, self._chunks, self._routers = [], [], {}
        self._words: dict[tuple, int] = {}
        self.acc: dict[int, dict[str, torch.Tensor]] = {}
        self.counters: dict[int, dict[str, list[Counter]]] = {}
        self.ac_source: dict[int, str] = {}
        self.micro_batches = 0
        for index, chunk in enumerate(model if isinstance(model, (list, tuple)) else [model]):
            gpt = unwrap_chunk(chunk)
            routers = [m for m in gpt.modules() if isinstance(m, TopKRouter) and not m.is_mtp_layer]
            state = state_of(gpt)
            moe_layers = state.moe_layer_numbers if state is not None else sorted(r.layer_number for r in routers)
            self._chunks.append(_Chunk(gpt, moe_layers))
            self._handles.append(gpt.register_forward_pre_hook(partial(self._pre, index), with_kwargs=True))
            for r in routers:
                self._routers[r.layer_number] = r
                self._handles.append(r.register_forward_hook(partial(self._routed, index), with_kwargs=True))
        if not self._routers:
            raise ValueError("SpecialisationRecorder: the model has no MoE layer (no megatron TopKRouter)")
        self.moe_layers = sorted({n for c in self._chunks for n in c.moe_layers})
        self.num_experts = next(iter(self._routers.values())).num_experts
        self.hidden_size = next(iter(self._routers.values())).config.hidden_size
        vocab = max(getattr(c.gpt, "vocab_size", 0) for c in self._chunks) or eod_id + 1
        self.base = vocab + 1  # n-gram digit base
        if self.base**ngram * self.num_experts >= 2**63:
            raise ValueError(f"specialisation: {ngram}-grams of a {vocab}-token vocabulary overflow int64; "
                             "use a smaller ngram")
        self.class_V = token_class_table(vocab)
        self.boundary_V = self.class_V == TOKEN_CLASSES.index("space")
        self.boundary_V[eod_id:] = True

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()

    # -- hooks (thin: the maths is in the functions above) ----------------------------------------

    def _pre(self, index: int, gpt, args, kwargs) -> None:
        if torch.is_grad_enabled():
            return
        chunk = self._chunks[index]
        chunk.labels.clear()
        input_ids = args[0] if args else kwargs.get("input_ids")
        chunk.keys_KBS = None
        if input_ids is not None:
            ids_BS = input_ids.detach().long().cpu()
            chunk.keys_KBS = torch.stack([ids_BS, ngram_codes(ids_BS, self.ngram, self.base, self.eod_id),
                                          word_ids(ids_BS, self.boundary_V, self._words)])
        self.micro_batches += bool(getattr(gpt, "pre_process", True))

    def _previous_labels(self, chunk: _Chunk, layer: int) -> LayerLabels | None:
        """The previous MoE layer's labels: the chunk state's (what AC clusters by; from the previous
        pipeline stage too), else the previous router's top-1 seen here (a model not attached)."""
        state = state_of(chunk.gpt)
        labels = state.previous_labels(layer) if state is not None else None
        earlier = [n for n in chunk.moe_layers if n < layer]
        return labels if labels is not None or not earlier else chunk.labels.get(earlier[-1])

    def _routed(self, index: int, router, args, kwargs, output) -> None:
        if not torch.is_grad_enabled():  # evaluation passes only (never training or its replays)
            self._record(self._chunks[index], router, args[0] if args else kwargs["input"], *output)

    def _record(self, chunk: _Chunk, router, x, probs_TE: torch.Tensor, routing_map_TE: torch.Tensor) -> None:
        layer, E = router.layer_number, router.num_experts
        labels = labels_from_routing(probs_TE, routing_map_TE)
        chunk.labels[layer] = labels
        acc = self.acc.setdefault(layer, _zeros(E, self.hidden_size))
        top1_T = labels.top1_T.cpu()
        acc["tokens"] += top1_T.numel()
        acc["top1"] += torch.bincount(top1_T, minlength=E)
        acc["slots"] += routing_map_TE.sum(0).cpu()
        if chunk.keys_KBS is not None:
            tp_rank = dist.get_rank(router.tp_group) if router.config.sequence_parallel else 0
            keys_KT = router_order(chunk.keys_KBS, x.shape[0], tp_rank)
            if keys_KT is not None and keys_KT.shape[1] == top1_T.numel():
                self._count_keys(layer, E, keys_KT, top1_T, acc)
        prev = self._previous_labels(chunk, layer)
        if prev is None or prev.top1_T.numel() != top1_T.numel():
            return
        prev_T = prev.top1_T.cpu()
        acc["cooc"] += torch.bincount(prev_T * E + top1_T, minlength=E * E).view(E, E)
        acc["same"] += (prev_T == top1_T).sum()
        acc["rand_sum"] += float(metrics.rand_disagreement(prev_T[: self.sample], top1_T[: self.sample]))
        acc["rand_n"] += 1
        stats = ac_stats.cluster_stats(x.reshape(-1, x.shape[-1]), prev.top1_T, E)
        n_K1 = stats.counts_K.unsqueeze(1)
        acc["cluster_n"] += stats.counts_K.cpu()
        acc["cluster_sum"] += (stats.mean_KD * n_K1).cpu()
        acc["cluster_mad"] += (stats.mad_KD.mean(1) * stats.counts_K).cpu()
        if self._is_ac(router):
            w_KD, self.ac_source[layer] = ac_weights_for(router, stats, prev)
            w_KD = w_KD.to(stats.mean_KD.device)
            acc["ac_sum"] += (stats.mean_KD * w_KD * n_K1).cpu()
            acc["ac_mad"] += ((stats.mad_KD * w_KD).mean(1) * stats.counts_K).cpu()

    def _count_keys(self, layer: int, E: int, keys_KT: torch.Tensor, top1_T: torch.Tensor, acc) -> None:
        counters = self.counters.setdefault(layer, {k: [Counter() for _ in range(E)] for k in KINDS})
        ids_T, _, words_T = keys_KT
        acc["keyed"] += torch.bincount(top1_T, minlength=E)
        acc["worded"] += torch.bincount(top1_T[words_T >= 0], minlength=E)
        acc["classes"] += torch.bincount(top1_T * len(TOKEN_CLASSES) + self.class_V[ids_T],
                                         minlength=E * len(TOKEN_CLASSES)).view(E, -1)
        for kind, codes_T in zip(KINDS, keys_KT):
            _bump(counters[kind], codes_T, top1_T, self.max_keys)

    # -- reduction ------------------------------------------------------------------------------

    def _keyed_counters(self) -> dict[int, dict[str, list[Counter]]]:
        """The counters with rank-independent keys: tuples of token ids."""
        words = {i: w for w, i in self._words.items()}
        to_key = {"tokens": lambda k: (k,), "ngrams": lambda k: decode_ngram(k, self.ngram, self.base),
                  "words": words.__getitem__}
        return {layer: {kind: [Counter({to_key[kind](k): c for k, c in ctr.items()}) for ctr in per_e]
                        for kind, per_e in kinds.items()} for layer, kinds in self.counters.items()}

    def finish(self, group=None) -> SpecialisationResult:
        """Totals over ``group`` (every rank of it must call; None: this rank's alone)."""
        E, D = self.num_experts, self.hidden_size
        fields = _fields(E, D)
        packed_LW = torch.stack([torch.cat([self.acc.get(layer, _zeros(E, D))[k].reshape(-1) for k in fields])
                                 for layer in self.moe_layers])
        info = {layer: (type(r).__name__, r.topk, self.ac_source.get(layer)) for layer, r in self._routers.items()}
        gathered = [(self._keyed_counters(), info, self.micro_batches)]
        if group is not None:  # also at world size 1: one code path
            device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
            packed_LW = packed_LW.to(device)
            dist.all_reduce(packed_LW, group=group)
            packed_LW = packed_LW.cpu()
            gathered = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, (self._keyed_counters(), info, self.micro_batches), group=group)
        counters, infos = {}, {}
        for rank_counters, rank_info, _ in gathered:
            infos.update(rank_info)
            for layer, kinds in rank_counters.items():
                mine = counters.setdefault(layer, {k: [Counter() for _ in range(E)] for k in KINDS})
                for kind, per_e in kinds.items():
                    for e, ctr in enumerate(per_e):
                        mine[kind][e].update(ctr)
        layers = []
        for i, layer in enumerate(self.moe_layers):
            parts = torch.split(packed_LW[i], [math.prod(s) for s in fields.values()])
            acc = {k: p.view(s) for (k, s), p in zip(fields.items(), parts)}
            router, topk, ac_source = infos.get(layer, ("?", None, None))
            layers.append(LayerResult(layer, router, topk, acc, counters.get(layer), ac_source))
        return SpecialisationResult(layers, self.ngram, max(g[2] for g in gathered), self.decode)


# -- results ---------------------------------------------------------------------------------------

@dataclass
class LayerResult:
    layer: int
    router: str
    topk: int | None
    acc: dict[str, torch.Tensor]  # the summed fields of ``_fields``
    counters: dict[str, list[Counter]] | None  # kind -> per expert: tuple of ids -> count
    ac_source: str | None  # "inference" | "batch" | None (not an AC layer)


def top_keys(counters: list[Counter], totals_E: torch.Tensor, top: int, min_count: int) -> list[list[tuple]]:
    """Per expert [(key, count, lift)], by lift among keys with count >= ``min_count`` (see the module
    docstring); ``totals_E``: the tokens each expert's counts are shares of."""
    everyone, n_all = Counter(), float(totals_E.sum())
    for ctr in counters:
        everyone.update(ctr)
    out = []
    for ctr, n_e in zip(counters, totals_E.tolist()):
        rows = [(key, c, (c / n_e) / (everyone[key] / n_all)) for key, c in ctr.items() if c >= min_count]
        rows.sort(key=lambda r: (-r[2], -r[1], r[0]))
        out.append(rows[:top])
    return out


@dataclass
class SpecialisationResult:
    layers: list[LayerResult]
    ngram: int
    micro_batches: int  # forward passes of the first pipeline stage on one rank (the most of any rank)
    decode: Callable = default_decode

    def to_dict(self, *, title: str = "", decode: Callable | None = None, top: int = TOP,
                min_count: int = MIN_COUNT) -> dict:
        decode = decode or self.decode
        out = {"title": title, "micro_batches": self.micro_batches, "ngram": self.ngram,
               "ranking": f"lift among keys with count >= {min_count}", "token_classes": list(TOKEN_CLASSES),
               "layers": []}
        previous = None
        for lr in self.layers:
            a, E = lr.acc, lr.acc["top1"].numel()
            n = max(float(a["tokens"]), 1.0)
            paired = float(a["cooc"].sum())
            entry = {"layer": lr.layer, "router": lr.router, "num_experts": E, "topk": lr.topk,
                     "tokens": int(a["tokens"]), "load_top1": (a["top1"] / n).tolist(),
                     "load_slots": (a["slots"] / max(float(a["slots"].sum()), 1.0)).tolist(),
                     "class_counts": a["classes"].long().tolist(), "previous_layer": previous,
                     "agreement": None, "clusters": None, "experts": []}
            if paired > 0:
                entry["agreement"] = {"rand": 1.0 - float(a["rand_sum"] / a["rand_n"]),
                                      "same_index": float(a["same"]) / paired,
                                      "cooccurrence": a["cooc"].long().tolist()}
                entry["clusters"] = {"counts": a["cluster_n"].long().tolist(),
                                     "mad": (a["cluster_mad"] / a["cluster_n"].clamp_min(1)).tolist(),
                                     "separation_raw": separation_of(a["cluster_n"], a["cluster_sum"],
                                                                     a["cluster_mad"]),
                                     "separation_ac": None if lr.ac_source is None else
                                     separation_of(a["cluster_n"], a["ac_sum"], a["ac_mad"]),
                                     "ac_weights": lr.ac_source}
            tops = {kind: top_keys(lr.counters[kind], a["worded"] if kind == "words" else a["keyed"], top, min_count)
                    if lr.counters else [[]] * E for kind in KINDS}
            for e in range(E):
                expert = {"expert": e, "load_top1": entry["load_top1"][e], "load_slots": entry["load_slots"][e]}
                for kind in KINDS:
                    expert[f"top_{kind}"] = [{"ids": list(k), "text": decode(list(k)), "count": c, "lift": lift}
                                             for k, c, lift in tops[kind][e]]
                entry["experts"].append(expert)
            out["layers"].append(entry)
            previous = lr.layer
        return out


# -- the report ------------------------------------------------------------------------------------

_ESCAPES = {" ": "␣", "\n": "\\n", "\t": "\\t", "\r": "\\r", "|": "\\|", "`": "ˋ"}


def _md(text: str) -> str:
    shown = "".join(_ESCAPES.get(ch, ch if ch.isprintable() else f"\\x{ord(ch):02x}") for ch in text)
    return f"`{shown}`"


def _md_top(rows: list[dict], n: int = 5) -> str:
    return " ".join(f"{_md(r['text'])} {r['count']} ({r['lift']:.1f}×)" for r in rows[:n]) or "–"


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _markdown(d: dict) -> str:
    lines = [f"# {d['title'] or 'Expert specialisation'}", "",
             f"{d['micro_batches']} micro-batches. Per expert: top-1 and slot load, the MAD (mean absolute "
             "deviation per feature, averaged over features) of its AC cluster — the tokens entering this layer "
             "whose top-1 at the previous MoE layer was that expert — and the tokens, "
             f"{d['ngram']}-grams (ending at the token) and words of its top-1 tokens, ranked by {d['ranking']}: "
             "count (lift = share of the expert's tokens / share of all tokens).", ""]
    for L in d["layers"]:
        lines += [f"## MoE layer {L['layer']} ({L['router']}, top-{L['topk']})", "", f"{L['tokens']} tokens."]
        if L["agreement"]:
            g = L["agreement"]
            lines.append(f"Agreement with MoE layer {L['previous_layer']}: 1 − Rand disagreement {g['rand']:.3f}; "
                         f"same top-1 expert index {g['same_index']:.3f}.")
        if L["clusters"]:
            c = L["clusters"]
            ac = (f"; AC-transformed {_fmt(c['separation_ac'])} ({c['ac_weights']} weights)"
                  if c["ac_weights"] else "")
            lines.append(f"Cluster separation (between-centroid L1 / within MAD): raw {_fmt(c['separation_raw'])}{ac}.")
        lines += ["", "| expert | top-1 load | slot load | cluster MAD | top tokens | top n-grams | top words |",
                  "|---:|---:|---:|---:|---|---|---|"]
        for x in L["experts"]:
            mad = L["clusters"]["mad"][x["expert"]] if L["clusters"] else None
            lines.append(f"| {x['expert']} | {x['load_top1']:.3f} | {x['load_slots']:.3f} | {_fmt(mad)} | "
                         f"{_md_top(x['top_tokens'])} | {_md_top(x['top_ngrams'])} | {_md_top(x['top_words'])} |")
        lines.append("")
    return "\n".join(lines)


def _figure(size=(7.0, 4.0)):
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=100, layout="constrained")


def _heatmap(matrix, xlabels, ylabel: str, xlabel: str, title: str, path: Path, annotate=None) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    im = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    ax.set_xticks(range(len(xlabels)), xlabels, fontsize=8)
    ax.set_yticks(range(matrix.shape[0]))
    if annotate is not None and matrix.size <= 256:  # the counts on the cells
        top = max(float(matrix.max()), 1e-12)
        for i, row in enumerate(annotate):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] < 0.6 * top else "black")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax)
    fig.savefig(path, format="png")


def _figures(L: dict, out: Path) -> list[Path]:
    import numpy as np

    tag, E = f"layer{L['layer']:02d}", L["num_experts"]
    fig = _figure()
    ax = fig.add_subplot()
    xs = np.arange(E)
    ax.bar(xs - 0.2, L["load_top1"], 0.4, label="top-1 tokens")
    ax.bar(xs + 0.2, L["load_slots"], 0.4, label="routed slots")
    ax.axhline(1.0 / E, color="grey", ls="--", lw=0.8, label="uniform")
    if E <= 32:
        ax.set_xticks(xs)
    ax.set_xlabel("expert")
    ax.set_ylabel("load fraction")
    ax.set_title(f"MoE layer {L['layer']}: load per expert", fontsize=10)
    ax.legend(fontsize="small")
    paths = [out / f"{tag}_load.png"]
    fig.savefig(paths[0], format="png")
    classes = np.asarray(L["class_counts"], dtype=float)
    paths.append(out / f"{tag}_token_classes.png")
    _heatmap(classes / np.maximum(classes.sum(0, keepdims=True), 1.0), TOKEN_CLASSES, "expert", "token class",
             f"MoE layer {L['layer']}: share of each class's tokens per expert (top-1)", paths[-1])
    if L["agreement"]:
        cooc = np.asarray(L["agreement"]["cooccurrence"], dtype=float)
        paths.append(out / f"{tag}_cooccurrence.png")
        _heatmap(cooc / np.maximum(cooc.sum(1, keepdims=True), 1.0), list(range(E)),
                 f"layer {L['previous_layer']} top-1", f"layer {L['layer']} top-1",
                 f"MoE layer {L['previous_layer']} → {L['layer']}: P(this expert | previous expert)", paths[-1],
                 annotate=L["agreement"]["cooccurrence"])
    return paths


def write_report(result, out_dir, *, title: str = "Expert specialisation", decode: Callable | None = None,
                 top: int = TOP, min_count: int = MIN_COUNT) -> list[Path]:
    """``specialisation.md``, ``specialisation.json`` and the per-layer PNGs in ``out_dir`` (see the
    module docstring); ``result``: a ``SpecialisationResult`` or a recorder (finished locally)."""
    if isinstance(result, SpecialisationRecorder):
        result = result.finish()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = result.to_dict(title=title, decode=decode, top=top, min_count=min_count)
    paths = [out / "specialisation.json", out / "specialisation.md"]
    paths[0].write_text(json.dumps(d, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    paths[1].write_text(_markdown(d), encoding="utf-8")
    for L in d["layers"]:
        paths += _figures(L, out)
    return paths
