"""CPU/gloo runtime: the shims megatron-core 0.19 needs to train without a GPU, as one table.

Why this module exists: megatron-core assumes CUDA in a handful of places (side streams,
``torch.cuda.current_device()`` as a buffer device, the CUDA RNG tracker, literal ``device="cuda"``
tensors, numpy split sizes for all-to-all, the Apex/TE norm under sequence parallelism, uneven
all-gathers), and its trainer ``megatron.training`` a few more (T1, T2, T4, T5 in
``shared/docs/megatron_training_cpu.md``). CI trains on CPU with gloo, so these call sites are
patched, and **only when ``torch.cuda.is_available()`` is False**: on a GPU ``install()`` and
``install_training()`` return False without touching anything (no version check either), so the
GPU code path is megatron's own.

The table: ``SHIMS`` lists every shim as a ``Shim(name, call_site, install, uninstall, stage)``.
``name`` is what lands in ``APPLIED`` (the run log); ``call_site`` is the megatron module/function
the shim exists for, as a dotted path (``also`` lists further megatron names it rebinds or relies
on); ``install()`` applies it and returns what it replaced; ``uninstall(saved)`` puts that back;
``stage`` is "core" (``install()``), "training" (``install_training()``), "bridge"
(``install_bridge()``, Megatron-Bridge 0.6.x, ``BRIDGE_SUPPORTED``: its own CUDA assumption and two
import stand-ins, see the B0/B1 comments) or "scoped" (entered only for the duration of a ``with
device_redirect():`` block, see below). The table is written
against megatron-core ``SUPPORTED`` (0.19.x): before a stage is applied, the installed version is
compared with it and every call site of the stage is resolved, so a megatron upgrade raises a
RuntimeError naming the version or the shim and call site instead of silently skipping a shim.
Both install functions are idempotent; ``uninstall_all()`` undoes the applied shims in reverse
order (the tests use it to prove each restore is exact). Import order: call ``install()`` before
building models.

The device redirect (the "cudamode" shim, a ``TorchFunctionMode`` that turns every ``device="cuda"``
request into the CPU) is the one shim that changes what plain torch code does, so it is not left on
for the process: ``with device_redirect():`` enters it around a training run (``train.main``, the
example script) or a test (``tests/conftest.py`` wraps each test) and leaves it afterwards. Outside
such a block ``torch.zeros(1, device="cuda")`` fails as torch makes it fail on a machine without a
GPU.

``install_wheel_fixes()`` (T3) is not in the table: it fixes the pip wheel and applies with or
without CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import types
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from acmoe_megatron.runtime import import_standin

SUPPORTED = "0.19"  # the megatron-core release line the table's call sites were checked against
BRIDGE_SUPPORTED = "0.6"  # the Megatron-Bridge release line of the "bridge" stage

_INSTALLED = {"core": False, "training": False, "bridge": False}
APPLIED: list[str] = []  # names of the shims that were applied, in order, for the run log
_ORIGINALS: dict[str, Any] = {}  # shim name -> what its install() replaced (for uninstall)


def cpu_only() -> bool:
    """True when the shims are needed (no usable CUDA device)."""
    return not torch.cuda.is_available()


@dataclasses.dataclass(frozen=True)
class Shim:
    """One CPU shim: ``install()`` returns what it replaced, ``uninstall(saved)`` restores it."""

    name: str  # recorded in APPLIED
    call_site: str  # the megatron module/function this shim exists for (dotted path)
    install: Callable[[], Any]
    uninstall: Callable[[Any], None]
    stage: str  # "core" (install()), "training" (install_training()), "bridge" (install_bridge()) or "scoped"
    also: tuple[str, ...] = ()  # further megatron names it rebinds or relies on; must resolve too


# Patching helpers: _swap records (owner, attribute, previous own value) so _restore puts back
# exactly that object (or deletes the attribute if the owner had none of its own).
_MISSING = object()


def _swap(saved: list, owner, attr: str, value) -> None:
    saved.append((owner, attr, vars(owner).get(attr, _MISSING)))
    setattr(owner, attr, value)


def _restore(saved: list) -> None:
    for owner, attr, old in reversed(saved):
        if old is _MISSING:
            delattr(owner, attr)
        else:
            setattr(owner, attr, old)


# --------------------------------------------------------------------------------------------
# core 1 streams -- call site megatron.core.transformer.moe.token_dispatcher
#   MoEAlltoAllTokenDispatcher: __init__ creates ``torch.cuda.Stream()`` (class-level
#   ``cuda_dtoh_stream``) and ``_maybe_dtoh_and_synchronize`` uses current_stream / stream /
#   record_event. On CPU these raise "torch.cuda.Stream requires CUDA support".
class _NullEvent:
    def record(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def wait(self, *a, **k):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _NullStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, event=None):
        return _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _NullStream)

    def __hash__(self):
        return 0


_NULL_STREAM = _NullStream()


def _shim_streams():
    c, saved = torch.cuda, []
    current = lambda *a, **k: _NULL_STREAM  # noqa: E731
    _swap(saved, c, "Stream", _NullStream)
    _swap(saved, c, "Event", lambda *a, **k: _NullEvent())
    _swap(saved, c, "current_stream", current)
    _swap(saved, c, "default_stream", current)
    _swap(saved, c, "stream", lambda *a, **k: contextlib.nullcontext())
    _swap(saved, c, "synchronize", lambda *a, **k: None)
    return saved


# core 2 device -- call site megatron.core.transformer.moe.router.Router.gating (moves CPU
#   weights to ``torch.cuda.current_device()``); the same device is used for TopKRouter buffers,
#   expert buffers, tensor_parallel.mappings all-to-all/gather outputs and p2p_communication.
def _shim_device():
    saved = []
    _swap(saved, torch.cuda, "current_device", lambda: "cpu")
    return saved


# core 3 rng -- call site megatron.core.tensor_parallel.random: model_parallel_cuda_manual_seed ->
#   CudaRNGStatesTracker.add -> torch.cuda.get_rng_state; tracker.fork() (dropout, SP regions)
#   goes through _get_cuda_rng_state / _set_cuda_rng_state and needs the "model-parallel-rng"
#   state. The CPU generator stands in for the CUDA one.
def _shim_rng():
    import megatron.core.tensor_parallel.random as tp_random

    c, saved = torch.cuda, []
    get_state = lambda *a, **k: torch.get_rng_state()  # noqa: E731
    set_state = lambda s, *a, **k: torch.set_rng_state(s)  # noqa: E731
    _swap(saved, c, "get_rng_state", get_state)
    _swap(saved, c.random, "get_rng_state", get_state)
    _swap(saved, c, "set_rng_state", set_state)
    _swap(saved, c.random, "set_rng_state", set_state)
    _swap(saved, c, "manual_seed", lambda seed, *a, **k: torch.manual_seed(seed))
    _swap(saved, tp_random, "_get_cuda_rng_state", lambda *a, clone=False, **k: get_state())
    _swap(saved, tp_random, "_set_cuda_rng_state", lambda s, *a, **k: torch.set_rng_state(s))
    return saved


# core 4 cudamode -- call site megatron.core.transformer.utils.get_default_causal_mask, and every
#   other literal ``device="cuda"``: pipeline_parallel/schedules.py (total_num_tokens),
#   training.py (model.cuda(), JIT warm-up, loss reductions), clip_grads.py, optimizer.py,
#   rerun_state_machine.py. A TorchFunctionMode, entered only inside ``with device_redirect():``,
#   rewrites any CUDA device argument to "cpu", makes Tensor.cuda() the identity and drops pin_memory.
def _is_cuda_device(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.startswith("cuda")
    return isinstance(d, int) and not isinstance(d, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA device requests to the CPU (only installed when CUDA is absent)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("device") is not None and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        if func is torch.Tensor.cuda:
            return args[0]
        if (
            func is torch.Tensor.to
            and len(args) > 1
            and isinstance(args[1], (str, torch.device, int))
            and _is_cuda_device(args[1])
        ):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


_MODE: CudaToCpuMode | None = None


def _shim_cudamode():
    global _MODE
    _MODE = CudaToCpuMode()
    _MODE.__enter__()
    return _MODE


def _unshim_cudamode(mode: CudaToCpuMode) -> None:
    global _MODE
    depth = torch._C._len_torch_function_stack()
    if depth == 0 or torch._C._get_function_stack_at(depth - 1) is not mode:
        raise RuntimeError(
            "cpu_runtime: the CUDA->CPU function mode is not the innermost mode; leave the other "
            "torch function modes (or device_redirect_paused()) first"
        )
    mode.__exit__(None, None, None)
    _MODE = None


@contextlib.contextmanager
def device_redirect():
    """CUDA device requests land on the CPU inside the block (only without CUDA; a no-op with it).

    Applies the core shims first (``install()``; the redirect alone would not make megatron run) and
    checks the mode's call site against megatron-core once. Re-entrant: a nested block keeps the
    outer block's mode. Leaves the mode on exit, also on an exception. Yields whether the redirect
    is active (False with CUDA).
    """
    global _REDIRECT_CHECKED
    if not install():
        yield False
        return
    if _MODE is not None:
        yield True
        return
    shim = next(s for s in SHIMS if s.name == "cudamode")
    if not _REDIRECT_CHECKED:
        check_call_sites([shim])
        _REDIRECT_CHECKED = True
    mode = shim.install()
    try:
        yield True
    finally:
        shim.uninstall(mode)


_REDIRECT_CHECKED = False


def active() -> list[str]:
    """The shims in effect now, for the run log: ``APPLIED`` plus the scoped redirect when entered."""
    return list(APPLIED) + (["cudamode"] if _MODE is not None else [])


@contextlib.contextmanager
def device_redirect_paused():
    """Leave the CUDA→CPU function mode for a block that makes no CUDA device request.

    The mode costs a Python call per torch function; benchmarks that time per-op overhead (the
    overhead a GPU run would see, which has no such mode) run their timed region inside this.
    """
    mode = _MODE
    if mode is None:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


# core 5 splits -- call site megatron.core.transformer.moe.moe_utils.maybe_move_tensor_to_cpu
#   (t, as_numpy=True) converts to numpy only ``if tensor.is_cuda``; the all-to-all dispatcher
#   then passes tensors as split sizes to dist.all_to_all_single, which gloo rejects. Imported by
#   name in megatron.core.transformer.moe.token_dispatcher too.
def _shim_splits():
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    orig = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(orig)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return orig(tensor, as_numpy=as_numpy, record_stream=record_stream)

    saved = []
    _swap(saved, moe_utils, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)
    _swap(saved, token_dispatcher, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)
    return saved


# core 6 norm -- call site megatron.core.transformer.torch_norm.WrappedTorchNorm.__new__: without
#   Apex/TE the local spec's norm is WrappedTorchNorm, which asserts ``not
#   config.sequence_parallel``; MoE training with TP>1 requires SP. Build the plain torch norm and
#   tag its params ``sequence_parallel`` so finalize_model_grads all-reduces their grads over TP,
#   as megatron does for its own SP norms.
def _shim_norm():
    import megatron.core.transformer.torch_norm as torch_norm

    def __new__(cls, config, hidden_size, eps=1e-5, **_unused):
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[
            config.normalization
        ]
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm

    saved = []
    _swap(saved, torch_norm.WrappedTorchNorm, "__new__", __new__)
    return saved


# core 6b hybrid_norm -- call site megatron.core.models.hybrid.hybrid_block.TENorm: HybridStack
#   builds its final norm as Transformer Engine's ``TENorm`` whatever its spec says (megatron's
#   stock hybrid specs are TE-only), and TENorm raises without TE. Here (no CUDA, so no TE) it gets
#   the local spec's norm, megatron's WrappedTorchNorm (above) -- the class a GPTModel's local
#   spec uses for its final_layernorm, so a local hybrid stack computes what that GPTModel does.
def _shim_hybrid_norm():
    import megatron.core.models.hybrid.hybrid_block as hybrid_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    saved = []
    _swap(saved, hybrid_block, "TENorm", WrappedTorchNorm)
    return saved


# core 7 gloo_uneven -- call sites megatron.core.tensor_parallel.mappings._gather_along_first_dim
#   (dist.all_gather(list)) and _reduce_scatter_along_first_dim (dist.reduce_scatter(list)): with
#   expert-TP > 1 the all-to-all dispatcher gathers / scatters tokens over expt_tp with *uneven*
#   sizes; gloo only supports equal sizes. Pad-and-slice on gloo groups; other backends untouched.
def _shim_gloo_uneven():
    all_gather, reduce_scatter = dist.all_gather, dist.reduce_scatter

    @functools.wraps(all_gather)
    def _all_gather(tensor_list, tensor, group=None, async_op=False):
        shapes = {tuple(t.shape) for t in tensor_list} | {tuple(tensor.shape)}
        if len(shapes) == 1 or dist.get_backend(group) != "gloo":
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        n = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((n,) + tuple(tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        bufs = [torch.empty_like(padded) for _ in tensor_list]
        all_gather(bufs, padded, group=group)
        for out, buf in zip(tensor_list, bufs):
            out.copy_(buf[: out.shape[0]])
        return None

    @functools.wraps(reduce_scatter)
    def _reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if dist.get_backend(group) != "gloo":
            return reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        full = torch.cat([t.contiguous() for t in input_list])
        dist.all_reduce(full, op=op, group=group)
        offset = sum(t.shape[0] for t in input_list[: dist.get_rank(group)])
        output.copy_(full[offset : offset + output.shape[0]])
        return None

    saved = []
    _swap(saved, dist, "all_gather", _all_gather)
    _swap(saved, dist, "reduce_scatter", _reduce_scatter)
    return saved


# --------------------------------------------------------------------------------------------
# Trainer shims (megatron.training), CPU only.

# training T1+T2 -- call site megatron.training.training.initialize_megatron (pretrain() calls it;
#   imported by name from megatron.training.initialize, which is what gets wrapped).
#   T1 training/initialize.py: ``assert torch.cuda.is_available(), "Megatron requires CUDA."``
#      (pretrain() never passes allow_no_cuda) -> pass allow_no_cuda=True.
#   T2 training/initialize.py: mpu.initialize_model_parallel and model_parallel_cuda_manual_seed
#      run only ``if torch.cuda.device_count() > 0`` -> report one device while initializing and
#      make torch.cuda.set_device a no-op for that duration only.
def _without_cuda_devices(initialize):
    """``initialize(...)`` with allow_no_cuda=True, one reported CUDA device and a no-op set_device."""

    @functools.wraps(initialize)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        saved = torch.cuda.device_count, torch.cuda.set_device
        torch.cuda.device_count = lambda: 1
        torch.cuda.set_device = lambda *a, **k: None
        try:
            return initialize(*args, **kwargs)
        finally:
            torch.cuda.device_count, torch.cuda.set_device = saved

    return initialize_megatron


def _shim_initialize_without_cuda():
    import megatron.training.initialize as initialize
    import megatron.training.training as training

    saved = []
    _swap(saved, training, "initialize_megatron", _without_cuda_devices(initialize.initialize_megatron))
    return saved


# training T4 -- call site megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32 asserts
#   ``param.grad.type() == 'torch.cuda.FloatTensor'``; megatron.core.optimizer.optimizer imports
#   it by name. Both names get the device-agnostic twin below.
def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Device-agnostic twin of megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32."""
    import megatron.core.optimizer.clip_grads as clip_grads

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [
        clip_grads.to_local_if_dtensor(getattr(p, attr)).detach()
        for p in parameters
        if getattr(p, attr, None) is not None
    ]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(clip_coeff, torch.Tensor):
        clip_coeff = clip_coeff.clamp_max(1.0)
    elif clip_coeff >= 1.0:
        return
    for g in grads:
        g.mul_(clip_coeff)


def _shim_clip_grads():
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer

    saved = []
    _swap(saved, clip_grads, "clip_grad_by_total_norm_fp32", _clip_grad_by_total_norm_fp32)
    _swap(saved, optimizer, "clip_grad_by_total_norm_fp32", _clip_grad_by_total_norm_fp32)
    return saved


# training T5 -- call site megatron.training.utils.common_utils.get_device_arch_version:
#   megatron.training.arguments validate_args (TP > 1 or CP > 1) calls it (imported by name) ->
#   torch.cuda.get_device_properties ("Found no NVIDIA driver"). No GPU: report architecture 0
#   (pre-Blackwell rules apply).
def _shim_device_arch():
    import megatron.training.arguments as arguments
    import megatron.training.utils.common_utils as common_utils

    arch = lambda: 0  # noqa: E731
    saved = []
    _swap(saved, common_utils, "get_device_arch_version", arch)
    _swap(saved, arguments, "get_device_arch_version", arch)
    return saved


# --------------------------------------------------------------------------------------------
# Megatron-Bridge (stage "bridge", install_bridge(); written against Bridge BRIDGE_SUPPORTED, 0.6.x).
#
# B0 import stand-ins -- call sites megatron.bridge.peft.lora_layers (``import transformer_engine.pytorch
#   as te`` at module level, for LoRA annotations such as ``te.ops.Sequential``) and
#   megatron.bridge.training.pretrain (``from nvidia_resiliency_ext.inprocess import CallWrapper``, one
#   annotation). ``import megatron.bridge`` reaches the first through its model registry, and Bridge's
#   ``pretrain`` is the second, so without them Bridge does not import at all on a machine where
#   Transformer Engine (crashes megatron-core without its CUDA extension) and NVRx (0.4.1, the only
#   wheel for this glibc, breaks megatron-core's checkpointing import) cannot be installed. Each
#   importer sees a placeholder for its own body only (``import_standin``); nobody else ever does.
BRIDGE_STANDINS = (
    import_standin.StandIn("megatron.bridge.peft.lora_layers",
                           {"transformer_engine": (), "transformer_engine.pytorch": ("ops.Sequential",)},
                           "LoRA annotations (te.ops.Sequential); LoRA itself is not available on CPU"),
    import_standin.StandIn("megatron.bridge.training.pretrain",
                           {"nvidia_resiliency_ext": (), "nvidia_resiliency_ext.inprocess": ("CallWrapper",)},
                           "the annotation of pretrain's in-process restart wrapper; in-process restart itself "
                           "still needs nvidia-resiliency-ext"),
)


def _shim_bridge_imports():
    return import_standin.install(BRIDGE_STANDINS)


def _unshim_bridge_imports(_finder) -> None:
    import_standin.uninstall()


# B1 -- call site megatron.bridge.training.setup.initialize_megatron (imported by name from
#   megatron.bridge.training.initialize): Bridge's setup() never passes allow_no_cuda (``assert
#   torch.cuda.is_available()``), and its torch_dist_init sets the device and seeds the model-parallel
#   RNG tracker only ``if torch.cuda.device_count() > 0`` -> as T1/T2 for megatron.training: pass
#   allow_no_cuda=True, report one device and make set_device a no-op while initializing.
def _shim_bridge_initialize_without_cuda():
    import megatron.bridge.training.setup as setup

    saved = []
    _swap(saved, setup, "initialize_megatron", _without_cuda_devices(setup.initialize_megatron))
    return saved


# --------------------------------------------------------------------------------------------
# The table, in install order (uninstall_all() walks it backwards).
_MOE = "megatron.core.transformer.moe"
_TP = "megatron.core.tensor_parallel"
SHIMS: tuple[Shim, ...] = (
    Shim("streams",
         f"{_MOE}.token_dispatcher.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize",
         _shim_streams, _restore, "core"),
    Shim("device", f"{_MOE}.router.Router.gating", _shim_device, _restore, "core"),
    Shim("rng", f"{_TP}.random._get_cuda_rng_state", _shim_rng, _restore, "core",
         also=(f"{_TP}.random._set_cuda_rng_state",
               f"{_TP}.random.model_parallel_cuda_manual_seed")),
    Shim("cudamode", "megatron.core.transformer.utils.get_default_causal_mask",
         _shim_cudamode, _unshim_cudamode, "scoped"),
    Shim("splits", f"{_MOE}.moe_utils.maybe_move_tensor_to_cpu", _shim_splits, _restore, "core",
         also=(f"{_MOE}.token_dispatcher.maybe_move_tensor_to_cpu",)),
    Shim("norm", "megatron.core.transformer.torch_norm.WrappedTorchNorm.__new__",
         _shim_norm, _restore, "core"),
    Shim("hybrid_norm", "megatron.core.models.hybrid.hybrid_block.TENorm", _shim_hybrid_norm, _restore, "core"),
    Shim("gloo_uneven", f"{_TP}.mappings._gather_along_first_dim",
         _shim_gloo_uneven, _restore, "core",
         also=(f"{_TP}.mappings._reduce_scatter_along_first_dim",)),
    Shim("T1_T2_initialize_without_cuda", "megatron.training.training.initialize_megatron",
         _shim_initialize_without_cuda, _restore, "training",
         also=("megatron.training.initialize.initialize_megatron",)),
    Shim("T4_clip_grads", "megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32",
         _shim_clip_grads, _restore, "training",
         also=("megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32",
               "megatron.core.optimizer.clip_grads.to_local_if_dtensor")),
    Shim("T5_device_arch", "megatron.training.utils.common_utils.get_device_arch_version",
         _shim_device_arch, _restore, "training",
         also=("megatron.training.arguments.get_device_arch_version",)),
    Shim("B0_bridge_import_standins", "megatron.bridge.peft.lora_layers",
         _shim_bridge_imports, _unshim_bridge_imports, "bridge", also=("megatron.bridge.training.pretrain",)),
    Shim("B1_bridge_initialize_without_cuda", "megatron.bridge.training.setup.initialize_megatron",
         _shim_bridge_initialize_without_cuda, _restore, "bridge",
         also=("megatron.bridge.training.initialize.initialize_megatron",)),
)


# --------------------------------------------------------------------------------------------
# Checks against the installed megatron-core.


def megatron_version() -> str:
    """The installed megatron-core version (``megatron.core.package_info.__version__``)."""
    import megatron.core.package_info as package_info

    return package_info.__version__


def _call_site_list(shims=SHIMS) -> str:
    return "\n".join(f"  {s.name} [{s.stage}]: {', '.join((s.call_site, *s.also))}" for s in shims)


def on_supported_line(version: str, line: str = SUPPORTED) -> bool:
    """Whether ``version`` is on the release ``line`` (a VCS suffix "0.19.2+03caca8" is fine); default
    megatron-core's ``SUPPORTED``, which the CPU shims and the trainer hooks (``runtime/hooks.py``) are
    both written against (Bridge's: ``BRIDGE_SUPPORTED``)."""
    release = version.split("+")[0]
    return release == line or release.startswith(line + ".")


def check_megatron_version(version: str | None = None) -> None:
    """Raise RuntimeError unless megatron-core is on the ``SUPPORTED`` release line (0.19.x)."""
    version = megatron_version() if version is None else version
    if on_supported_line(version):
        return
    raise RuntimeError(
        f"acmoe_megatron.runtime.cpu_runtime: installed megatron-core {version} is not supported; the CPU "
        f"shims are written for megatron-core {SUPPORTED}.x. Fix: pin megatron-core {SUPPORTED}.x "
        f"(pip install 'megatron-core=={SUPPORTED}.*'), or review each shim's megatron call site "
        f"below in megatron-core {version} and then update cpu_runtime.SUPPORTED:\n"
        + _call_site_list()
    )


def resolve(dotted: str):
    """The object at a dotted path such as ``megatron.core.transformer.moe.moe_utils.f``,
    importing modules along the way. Raises ImportError / AttributeError if it does not exist."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    path = parts[0]
    for part in parts[1:]:
        path = f"{path}.{part}"
        if isinstance(obj, types.ModuleType):
            try:
                obj = importlib.import_module(path)
                continue
            except ModuleNotFoundError as e:
                if e.name != path:  # a dependency of that module is missing: report it as is
                    raise
        obj = getattr(obj, part)
    return obj


def check_call_sites(shims=SHIMS) -> None:
    """Raise RuntimeError naming every shim whose megatron call site (or ``also`` name) is gone."""
    missing = []
    for shim in shims:
        for site in (shim.call_site, *shim.also):
            try:
                resolve(site)
            except (ImportError, AttributeError) as e:
                missing.append(f"  shim {shim.name!r}: call site {site} does not exist ({e})")
    if missing:
        raise RuntimeError(
            f"acmoe_megatron.runtime.cpu_runtime: megatron-core {megatron_version()} lacks the call sites "
            "these CPU shims patch (nothing was patched); review the shims against this "
            f"megatron-core or pin megatron-core {SUPPORTED}.x:\n" + "\n".join(missing)
        )


def _apply(stage: str) -> None:
    """Check version and call sites of one stage, then apply its shims in table order."""
    shims = [s for s in SHIMS if s.stage == stage]
    check_megatron_version()
    check_call_sites(shims)
    for shim in shims:
        _install_one(shim)
    _INSTALLED[stage] = True


def _install_one(shim: Shim) -> str:
    """Apply one shim, keeping what it replaced for ``uninstall_all()``; returns its name."""
    _ORIGINALS[shim.name] = shim.install()
    APPLIED.append(shim.name)
    return shim.name


# --------------------------------------------------------------------------------------------
# Public entry points.


def install() -> bool:
    """Apply the megatron-core CPU shims if CUDA is absent. Returns True if they are active."""
    if not cpu_only():
        return False
    if not _INSTALLED["core"]:
        _apply("core")
    return True


def install_training() -> bool:
    """Apply the extra shims Megatron's trainer needs on CPU (after ``install()``)."""
    if not install():
        return False
    if not _INSTALLED["training"]:
        _apply("training")
    return True


def uninstall_all() -> list[str]:
    """Undo every applied shim in reverse order, restoring the replaced objects exactly.

    Returns the names undone (reverse of ``APPLIED``); afterwards ``APPLIED`` is empty and
    ``install()`` / ``install_training()`` apply the shims afresh. A no-op when nothing is applied.
    """
    by_name = {s.name: s for s in SHIMS}
    undone = []
    for name in reversed(list(APPLIED)):
        by_name[name].uninstall(_ORIGINALS.pop(name))
        APPLIED.remove(name)
        undone.append(name)
    _INSTALLED.update(core=False, training=False, bridge=False)
    return undone


def install_wheel_fixes() -> list[str]:
    """Fixes for the pip wheel of megatron-core, needed on GPU and CPU alike (not in ``SHIMS``).

    T3 training/initialize.py _compile_dependencies -> core/datasets/utils.py compile_helpers runs
    ``make`` inside site-packages; the wheel ships the prebuilt ``helpers_cpp`` extension but no
    Makefile, so it calls sys.exit(1). When the prebuilt extension imports, compiling is not needed.
    """
    fixed = []
    import megatron.core.datasets.utils as ds_utils

    if _prebuilt_dataset_helpers():
        ds_utils.compile_helpers = lambda: None
        fixed.append("T3_prebuilt_dataset_helpers")
    # else: a source checkout of megatron: keep megatron's own compile step
    return fixed


def _prebuilt_dataset_helpers() -> bool:
    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401  (prebuilt in the wheel)
    except ImportError:
        return False
    return True


def bridge_version() -> str:
    """The installed Megatron-Bridge version, read from its metadata (importing it needs B0 first)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-bridge")
    except PackageNotFoundError:
        raise RuntimeError("Megatron-Bridge is not installed in this Python: pip install -e '.[bridge]' and then "
                           "pip install --no-deps 'megatron-bridge==0.6.2' (make bridge does both, into .venv-bridge: "
                           "run .venv-bridge/bin/python or .venv-bridge/bin/torchrun; README, 'Megatron-Bridge')") from None


def check_bridge_version(version: str | None = None) -> None:
    """Raise RuntimeError unless Megatron-Bridge is on the ``BRIDGE_SUPPORTED`` line (0.6.x)."""
    version = bridge_version() if version is None else version
    if on_supported_line(version, BRIDGE_SUPPORTED):
        return
    raise RuntimeError(
        f"acmoe_megatron.runtime.cpu_runtime: installed Megatron-Bridge {version} is not supported; the Bridge "
        f"shims are written for Megatron-Bridge {BRIDGE_SUPPORTED}.x. Fix: pip install --no-deps "
        f"'megatron-bridge=={BRIDGE_SUPPORTED}.2', or review these call sites in Bridge {version} and then update "
        "cpu_runtime.BRIDGE_SUPPORTED:\n" + _call_site_list([s for s in SHIMS if s.stage == "bridge"]))


def install_bridge() -> list[str]:
    """Before ``import megatron.bridge``: the Bridge shims without CUDA (B0 first, because checking the
    call sites imports Bridge), and Bridge's share of the wheel fix (T3, with or without CUDA). Call
    after ``install_for_training()``. Returns the names applied by this call (also in ``APPLIED``)."""
    check_bridge_version()
    applied = []
    if cpu_only() and not _INSTALLED["bridge"]:
        check_megatron_version()
        shims = [s for s in SHIMS if s.stage == "bridge"]
        applied.append(_install_one(shims[0]))  # B0: resolving the other call sites imports Bridge
        try:
            check_call_sites(shims)
        except RuntimeError:
            uninstall_all()
            raise
        applied += [_install_one(shim) for shim in shims[1:]]
        _INSTALLED["bridge"] = True
    if _prebuilt_dataset_helpers():
        import megatron.bridge.training.initialize as bridge_initialize

        bridge_initialize.compile_helpers = lambda: None  # T3 for Bridge: it imported the name itself
        applied.append("T3_prebuilt_dataset_helpers_bridge")
    return applied


def install_for_training() -> list[str]:
    """Everything a Megatron training script needs here, before ``parse_and_validate_args``: the
    CPU shims (only without CUDA) and the wheel fixes (always). Returns the wheel fixes applied."""
    install()
    install_training()
    return install_wheel_fixes()
