"""Carry AC labels (and elliptical attention's values) across pipeline stages, beside megatron's
activations.

megatron's pipeline schedules send exactly one activation tensor per micro-batch between stages
(``[s/tp, b, h]``), and ``GPTModel.set_input_tensor`` accepts only that one; the hook for extra
tensors (``adjust_tensor_shapes_fn``) exists only in the non-interleaved schedule. So the labels
travel on a **process group of their own** over the same pipeline ranks:

Both run in the chunk's forward hooks (``chunk_state.ChunkState.pre_forward`` / ``post_forward``):

* after a chunk's forward, ``send`` posts a non-blocking send of the chunk's latest labels
  (``[layer, max_label, top1...]``, int64, ``layer = -1`` before the first MoE layer) to the next
  virtual stage: same pipeline group, next rank, or the next model chunk on rank 0 after the last
  rank (interleaved schedule);
* before a chunk's forward, ``receive`` takes them from the previous virtual stage and files them
  in the chunk's ``ChunkState`` under the current micro-batch, so the first AC layer of the stage
  finds "the previous MoE layer's labels" exactly as inside one stage (and recompute replays find
  them later under the same micro-batch id).
* with elliptical attention (``state.value_handoff``, planned by ``plugin.attach``) a second message follows:
  the values of the chunk's last attention layer (float32, flat; the reader reshapes them to its
  own values' shape), sent only when the next stage's first layer applies the metric and filed
  there under that layer's predecessor — so its first elliptical layer sees exactly the values it
  would see inside one stage. Both sides decide statically (from the layer numbers), so nothing
  is sent when elliptical attention is off.

Why this is safe: every rank runs the same sequence of (chunk, micro-batch) forwards in every
megatron schedule (1F1B, interleaved, forward-only evaluation), so sends and receives between a pair
of ranks are posted in the same order on both sides; a separate communicator keeps them from
interleaving with megatron's own activation p2p (NCCL matches p2p by order, not by tag), and the
send is non-blocking so the sender never waits on a receiver that first waits for activations.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from acmoe_megatron.core.labels import LayerLabels
from acmoe_megatron.model.chunk_state import VALUES, ChunkState


class LabelTransport:
    """Sends/receives one int64 label tensor per (chunk, micro-batch) between virtual stages
    (plus one float32 value tensor with elliptical attention)."""

    def __init__(self, pp_ranks: list[int], vp_size: int | None):
        self.pp_ranks = pp_ranks
        self.pp_size = len(pp_ranks)
        self.pp_rank = pp_ranks.index(dist.get_rank())
        self.vp_size = vp_size or 1
        self.group = _label_group(pp_ranks)
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []

    @classmethod
    def create(cls, vp_size: int | None) -> LabelTransport | None:
        """Collective (every rank, same time): None when there is no pipeline parallelism."""
        from megatron.core import parallel_state

        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return None
        ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
        return cls(list(ranks), vp_size)

    # virtual stage (pp_rank, vp_stage) -> its neighbours
    def _next(self, vp_stage: int) -> tuple[int, int] | None:
        if self.pp_rank < self.pp_size - 1:
            return self.pp_rank + 1, vp_stage
        return (0, vp_stage + 1) if vp_stage + 1 < self.vp_size else None

    def _prev(self, vp_stage: int) -> tuple[int, int] | None:
        if self.pp_rank > 0:
            return self.pp_rank - 1, vp_stage
        return (self.pp_size - 1, vp_stage - 1) if vp_stage > 0 else None

    def receive(self, state: ChunkState, vp_stage: int, num_tokens: int, device) -> None:
        prev = self._prev(vp_stage)
        if prev is None:
            return
        buf = torch.empty(num_tokens + 2, dtype=torch.long, device=device)
        dist.recv(buf, src=self.pp_ranks[prev[0]], group=self.group, tag=vp_stage)
        # The sender's latest MoE layer is known statically (no host read of buf[0]): the last
        # MoE layer before this chunk's first layer.
        layer = state.previous_moe_layer(state.local_layer_numbers[0])
        if layer is not None:
            state.put_labels(layer, LayerLabels(buf[2:], buf[1]))
        handoff = state.value_handoff
        layer = None if handoff is None else handoff.layer_to_receive(state.local_layer_numbers)
        if layer is not None:
            values = torch.empty(handoff.numel(num_tokens), dtype=torch.float32, device=device)
            dist.recv(values, src=self.pp_ranks[prev[0]], group=self.group, tag=self._value_tag(vp_stage))
            state.put_state(VALUES, layer, values)

    def send(self, state: ChunkState, vp_stage: int, num_tokens: int, device) -> None:
        nxt = self._next(vp_stage)
        if nxt is None:
            return
        latest = state.latest_labels()
        buf = torch.full((num_tokens + 2,), -1, dtype=torch.long, device=device)
        if latest is not None:
            layer, labels = latest
            buf[0] = layer
            buf[1] = labels.max_label
            buf[2:] = labels.top1_T
        self._pending = [(w, t) for (w, t) in self._pending if not w.is_completed()]
        work = dist.isend(buf, dst=self.pp_ranks[nxt[0]], group=self.group, tag=nxt[1])
        self._pending.append((work, buf))
        handoff = state.value_handoff
        layer = None if handoff is None else handoff.layer_to_send(state.local_layer_numbers)
        if layer is not None:
            values = state.get_state(VALUES, layer)
            if values is None:
                raise RuntimeError(
                    f"elliptical attention: layer {layer} stored no values for micro-batch "
                    f"{state.current_mb}, but the next pipeline stage needs them; run the chunk's "
                    "forward before LabelTransport.send"
                )
            flat = values.detach().reshape(-1).to(torch.float32).contiguous()
            if flat.numel() != handoff.numel(num_tokens):
                raise RuntimeError(
                    f"elliptical attention: layer {layer} has {flat.numel()} value elements, the next "
                    f"stage expects {handoff.numel(num_tokens)} for {num_tokens} tokens (context "
                    "parallelism and packed sequences are not supported)"
                )
            if flat.data_ptr() == values.data_ptr():
                flat = flat.clone()  # the send buffer must not alias the live activation
            work = dist.isend(flat, dst=self.pp_ranks[nxt[0]], group=self.group, tag=self._value_tag(nxt[1]))
            self._pending.append((work, flat))

    def _value_tag(self, vp_stage: int) -> int:
        """Value messages get tags of their own (labels use the receiving virtual stage)."""
        return self.vp_size + vp_stage

    def wait_all(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()


_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


def _label_group(pp_ranks: list[int]) -> dist.ProcessGroup:
    """A new group per pipeline group; every rank must create all of them in the same order."""
    key = tuple(pp_ranks)
    if key not in _GROUPS:
        world = dist.get_world_size()
        everyone: list = [None] * world
        dist.all_gather_object(everyone, key)
        for ranks in sorted(set(everyone)):
            group = dist.new_group(list(ranks))
            _GROUPS.setdefault(ranks, group)
    return _GROUPS[key]
