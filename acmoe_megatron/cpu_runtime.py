"""CPU/gloo runtime: the small set of shims megatron-core 0.19 needs to train without a GPU.

megatron-core assumes CUDA in a handful of places (side streams, ``torch.cuda.current_device()``
as a buffer device, the CUDA RNG tracker, literal ``device="cuda"`` tensors, numpy split sizes for
all-to-all, the Apex/TE norm under sequence parallelism, even all-gathers). ``install()`` patches
exactly those call sites, and **only when ``torch.cuda.is_available()`` is False**: on a GPU it
returns without touching anything, so the GPU code path is megatron's own.

Every shim names the megatron call site it covers. ``install_training()`` adds the four more
that ``megatron.training`` (the trainer) needs (T1..T4 in ``shared/docs/megatron_training_cpu.md``).
Both are idempotent. Import order: call ``install()`` before building models.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_INSTALLED = {"core": False, "training": False}
APPLIED: list[str] = []  # names of the shims that were applied, for the run log


def cpu_only() -> bool:
    """True when the shims are needed (no usable CUDA device)."""
    return not torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# 1 streams: MoEAlltoAllTokenDispatcher.__init__ creates ``torch.cuda.Stream()`` (class-level
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
    c = torch.cuda
    c.Stream = _NullStream
    c.Event = lambda *a, **k: _NullEvent()
    c.current_stream = c.default_stream = lambda *a, **k: _NULL_STREAM
    c.stream = lambda *a, **k: contextlib.nullcontext()
    c.synchronize = lambda *a, **k: None
    APPLIED.append("streams")


# 2 device: ``device=torch.cuda.current_device()`` in TopKRouter buffers, expert buffers,
#   tensor_parallel.mappings all-to-all/gather outputs and p2p_communication; Router.gating moves
#   CPU weights to that device.
def _shim_device():
    torch.cuda.current_device = lambda: "cpu"
    APPLIED.append("device")


# 3 rng: model_parallel_cuda_manual_seed -> CudaRNGStatesTracker.add -> torch.cuda.get_rng_state;
#   tracker.fork() (dropout, SP regions) needs the "model-parallel-rng" state. The CPU generator
#   stands in for the CUDA one.
def _shim_rng():
    c = torch.cuda
    c.get_rng_state = c.random.get_rng_state = lambda *a, **k: torch.get_rng_state()
    c.set_rng_state = c.random.set_rng_state = lambda s, *a, **k: torch.set_rng_state(s)
    c.manual_seed = lambda seed, *a, **k: torch.manual_seed(seed)
    import megatron.core.tensor_parallel.random as tp_random

    tp_random._get_cuda_rng_state = lambda *a, clone=False, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda s, *a, **k: torch.set_rng_state(s)
    APPLIED.append("rng")


# 4 cudamode: literal ``device="cuda"`` in pipeline_parallel/schedules.py (total_num_tokens),
#   transformer/utils.py get_default_causal_mask, training.py (model.cuda(), JIT warm-up, loss
#   reductions), clip_grads.py, optimizer.py, rerun_state_machine.py. A global TorchFunctionMode
#   rewrites any CUDA device argument to "cpu", makes Tensor.cuda() the identity and drops
#   pin_memory.
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
    APPLIED.append("cudamode")


@contextlib.contextmanager
def device_redirect_paused():
    """Leave the CUDA→CPU function mode for a block that makes no CUDA device request.

    The mode costs a Python call per torch function; benchmarks that time per-op overhead (the
    overhead a GPU run would see, which has no such mode) run their timed region inside this.
    """
    if _MODE is None:
        yield
        return
    _MODE.__exit__(None, None, None)
    try:
        yield
    finally:
        _MODE.__enter__()


# 5 splits: moe_utils.maybe_move_tensor_to_cpu(t, as_numpy=True) converts to numpy only
#   ``if tensor.is_cuda``; the all-to-all dispatcher then passes tensors as split sizes to
#   dist.all_to_all_single, which gloo rejects. Imported by name in token_dispatcher too.
def _shim_splits():
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    orig = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(orig)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return orig(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    APPLIED.append("splits")


# 6 norm: without Apex/TE the local spec's norm is transformer/torch_norm.py WrappedTorchNorm,
#   which asserts ``not config.sequence_parallel``; MoE training with TP>1 requires SP. Build the
#   plain torch norm and tag its params ``sequence_parallel`` so finalize_model_grads all-reduces
#   their grads over TP, as megatron does for its own SP norms.
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

    torch_norm.WrappedTorchNorm.__new__ = __new__
    APPLIED.append("norm")


# 7 gloov: with expert-TP > 1 the all-to-all dispatcher all-gathers / reduce-scatters tokens over
#   expt_tp with *uneven* sizes (tensor_parallel/mappings.py _gather_along_first_dim ->
#   dist.all_gather(list), _reduce_scatter_along_first_dim -> dist.reduce_scatter(list)); gloo
#   only supports equal sizes. Pad-and-slice on gloo groups; other backends are untouched.
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

    dist.all_gather, dist.reduce_scatter = _all_gather, _reduce_scatter
    APPLIED.append("gloo_uneven")


def install() -> bool:
    """Apply the megatron-core CPU shims if CUDA is absent. Returns True if they are active."""
    if not cpu_only():
        return False
    if not _INSTALLED["core"]:
        _shim_streams()
        _shim_device()
        _shim_rng()
        _shim_cudamode()
        _shim_splits()
        _shim_norm()
        _shim_gloo_uneven()
        _INSTALLED["core"] = True
    return True


# --------------------------------------------------------------------------------------------
# Trainer shims (megatron.training), CPU only.


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


def install_training() -> bool:
    """Apply the extra shims Megatron's trainer needs on CPU (after ``install()``)."""
    if not install():
        return False
    if _INSTALLED["training"]:
        return True
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer
    import megatron.training.initialize as initialize
    import megatron.training.training as training

    orig_initialize = initialize.initialize_megatron

    # T1 training/initialize.py: ``assert torch.cuda.is_available(), "Megatron requires CUDA."``
    #    (pretrain() never passes allow_no_cuda) -> pass allow_no_cuda=True.
    # T2 training/initialize.py: mpu.initialize_model_parallel and model_parallel_cuda_manual_seed
    #    run only ``if torch.cuda.device_count() > 0`` -> report one device while initializing and
    #    make torch.cuda.set_device a no-op for that duration only.
    @functools.wraps(orig_initialize)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        saved = torch.cuda.device_count, torch.cuda.set_device
        torch.cuda.device_count = lambda: 1
        torch.cuda.set_device = lambda *a, **k: None
        try:
            return orig_initialize(*args, **kwargs)
        finally:
            torch.cuda.device_count, torch.cuda.set_device = saved

    training.initialize_megatron = initialize_megatron
    APPLIED.append("T1_T2_initialize_without_cuda")

    # T4 core/optimizer/clip_grads.py clip_grad_by_total_norm_fp32 asserts
    #    ``param.grad.type() == 'torch.cuda.FloatTensor'``; optimizer.py imports it by name.
    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    APPLIED.append("T4_clip_grads")

    # T5 training/arguments.py validate_args (TP > 1 or CP > 1) calls
    #    utils/common_utils.py get_device_arch_version() -> torch.cuda.get_device_properties
    #    ("Found no NVIDIA driver"). No GPU: report architecture 0 (pre-Blackwell rules apply).
    import megatron.training.arguments as arguments
    import megatron.training.utils.common_utils as common_utils

    common_utils.get_device_arch_version = lambda: 0
    if hasattr(arguments, "get_device_arch_version"):
        arguments.get_device_arch_version = common_utils.get_device_arch_version
    APPLIED.append("T5_device_arch")
    _INSTALLED["training"] = True
    return True


def install_wheel_fixes() -> list[str]:
    """Fixes for the pip wheel of megatron-core, needed on GPU and CPU alike.

    T3 training/initialize.py _compile_dependencies -> core/datasets/utils.py compile_helpers runs
    ``make`` inside site-packages; the wheel ships the prebuilt ``helpers_cpp`` extension but no
    Makefile, so it calls sys.exit(1). When the prebuilt extension imports, compiling is not needed.
    """
    fixed = []
    import megatron.core.datasets.utils as ds_utils

    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401  (prebuilt in the wheel)

        ds_utils.compile_helpers = lambda: None
        fixed.append("T3_prebuilt_dataset_helpers")
    except ImportError:
        pass  # a source checkout of megatron: keep megatron's own compile step
    return fixed


def install_for_training() -> list[str]:
    """Everything a Megatron training script needs here, before ``parse_and_validate_args``: the
    CPU shims (only without CUDA) and the wheel fixes (always). Returns the wheel fixes applied."""
    install()
    install_training()
    return install_wheel_fixes()
