"""Inference-time AC statistics: the fixed per-cluster transform a trained model routes with outside
training, and the calibration that gives one to a ``batch``-trained model (issue #18 item 2).

The paper computes each AC layer's transform M_k = diag(w_k) (Definition 1) from the tokens of the
current micro-batch. At inference that makes a token's scores depend on the other tokens of its
batch (and on its own future tokens), and at single-token decoding every cluster holds at most one
token, so every weight is 1 and the AC router silently becomes the cosine router. A trained model
therefore routes with a *fixed* table ``w_KD`` per AC layer at inference:

* ``acmoe.source: ema`` models: the running statistics in the checkpoint (``ACRouter._ema_weights``);
* ``acmoe.source: batch`` models: a table calibrated after training: ``calibrate`` runs N
  micro-batches of training data (the training micro-batch size, so the statistic population of
  training) forward with the batch statistics and keeps, per AC layer and cluster, the token-weighted
  mean of the weight rows its tokens were routed with (``ac_stats.WeightAverage``). ``save`` writes
  the tables beside the checkpoint (``iter_NNNNNNN/acmoe_inference_stats.pt``, ``checkpoint_check.stats_path``), ``install``
  sets them on the routers (``ACRouter.set_inference_weights``).

Evaluating with batch statistics stays available (what the paper reports); tools label which was used.
The file is ours, not megatron's: a megatron checkpoint of a batch-trained model has no place for it
and must load unchanged into models built without it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from acmoe_megatron.core.ac_stats import WeightAverage
from acmoe_megatron.model.routers import ACRouter

FORMAT = "acmoe-inference-stats"
FORMAT_VERSION = 1


def ac_routers(model_chunks) -> list:
    """The AC routers of a model (a chunk or a list of chunks), in layer order."""

    chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    routers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, ACRouter)]
    return sorted(routers, key=lambda r: r.layer_number)


@torch.no_grad()
def calibrate(model_chunks, run_forward: Callable[[], None]) -> dict[int, dict]:
    """Per AC layer of this rank: ``{"w_KD", "counts_K"}`` averaged over the micro-batches that
    ``run_forward`` pushes through the model (with the batch statistics), summed over every replica
    (``tp_dp_cp``): identical on every rank of a pipeline stage."""
    routers = ac_routers(model_chunks)
    sources = {r.settings.source for r in routers}
    if sources - {"batch"}:
        raise ValueError(f"calibration is for acmoe.source=batch models; this one has source {sorted(sources)} "
                         "(an ema model routes with its checkpointed running statistics)")

    for r in routers:
        r.set_inference_weights(None)
        r.calibration = WeightAverage(r.num_experts, r.config.hidden_size, r.weight.device)
    try:
        run_forward()
        tables = {}
        for r in routers:
            group = r.tp_dp_cp_group
            reduce = None if group is None or dist.get_world_size(group) == 1 else (
                lambda t, g=group: dist.all_reduce(t, group=g))
            w_KD, counts_K = r.calibration.result(reduce, replicas=r.scope_replicas())
            tables[r.layer_number] = {"w_KD": w_KD.cpu(), "counts_K": counts_K.float().cpu()}
    finally:
        for r in routers:
            r.calibration = None
    return tables


def gather_stages(tables: dict[int, dict], pp_group) -> dict[int, dict]:
    """Every pipeline stage's tables on every rank of ``pp_group`` (the file holds all AC layers)."""
    if pp_group is None or dist.get_world_size(pp_group) == 1:
        return dict(tables)
    parts: list = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(parts, tables, group=pp_group)
    return {layer: t for part in parts for layer, t in part.items()}


def save(path: str | Path, tables: dict[int, dict], meta: dict) -> Path:
    """Write the tables atomically (a crash leaves the previous file or none)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "meta": meta,
                "layers": {int(k): v for k, v in sorted(tables.items())}}, tmp)
    tmp.replace(path)
    return path


def load(path: str | Path) -> tuple[dict[int, dict], dict]:
    """(tables, meta) of a file written by ``save``; a clear error for anything else."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no calibrated AC statistics; make them with "
                                "`acmoe-eval RUN_DIR --calibrate N`") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not an {FORMAT} file")
    if blob.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {blob.get('format_version')}, this code reads {FORMAT_VERSION}")
    return blob["layers"], blob["meta"]


def install(model_chunks, tables: dict[int, dict]) -> None:
    """Route every AC router of the model with its layer's calibrated table outside training."""
    routers = ac_routers(model_chunks)
    missing = [r.layer_number for r in routers if r.layer_number not in tables]
    if missing:
        raise ValueError(f"the calibrated statistics have no table for AC layer(s) {missing} "
                         f"(they hold layers {sorted(tables)}): calibrate this model again")
    for r in routers:
        r.set_inference_weights(tables[r.layer_number]["w_KD"])


def fixed_weights(model_chunks) -> dict[int, torch.Tensor]:
    """{layer number: ``w_KD``} every AC router routes with outside training; ValueError naming the
    layers that would fall back to batch statistics (a ``batch`` model without calibration)."""
    routers = ac_routers(model_chunks)
    tables = {r.layer_number: r.inference_weights() for r in routers}
    unset = [layer for layer, w in tables.items() if w is None]
    if unset:
        raise ValueError(f"AC layer(s) {unset} have no inference statistics: an acmoe.source=batch model routes "
                         "with the statistics of its batch, which single-token decoding cannot provide; "
                         "calibrate it first with `acmoe-eval RUN_DIR --calibrate N`")
    return {layer: w.detach().float().cpu() for layer, w in tables.items()}
