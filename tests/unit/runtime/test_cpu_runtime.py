"""The CPU/gloo runtime shims (cpu_runtime.py): applied once without CUDA, never with CUDA.

The in-process tests install the core shims into the pytest process (as the ``megatron_ws1``
fixture does anyway); everything that must see a pristine ``torch.cuda`` (a faked GPU, the
trainer shims, a 2-rank gloo group) runs in a fresh ``python -c`` subprocess. The shim table
(``cpu_runtime.SHIMS``) is checked against the installed megatron-core: every call site resolves,
another megatron-core version is refused with the fix in the message, and ``uninstall_all()``
restores each replaced object exactly (also in a subprocess).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from acmoe_megatron.runtime import cpu_runtime

ROOT = Path(__file__).resolve().parents[3]
CORE_SHIMS = ["streams", "device", "rng", "splits", "norm", "hybrid_norm", "gloo_uneven"]
SCOPED_SHIMS = ["cudamode"]  # entered only inside ``with cpu_runtime.device_redirect():``
TRAINING_SHIMS = ["T1_T2_initialize_without_cuda", "T4_clip_grads", "T5_device_arch"]
BRIDGE_SHIMS = ["B0_bridge_import_standins", "B1_bridge_initialize_without_cuda"]  # install_bridge()

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shims apply only without CUDA")


def _python(code: str, timeout: int = 180, env: dict | None = None, python=sys.executable) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [str(python), "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, f"exit {out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def installed():
    assert cpu_runtime.install() is True
    return cpu_runtime


def test_install_is_true_and_idempotent(installed):
    before = list(cpu_runtime.APPLIED)
    assert cpu_runtime.install() is True
    assert cpu_runtime.install() is True
    assert cpu_runtime.APPLIED == before
    assert len(cpu_runtime.APPLIED) == len(set(cpu_runtime.APPLIED))
    assert set(CORE_SHIMS) <= set(cpu_runtime.APPLIED)
    assert cpu_runtime.cpu_only() is True


def test_cuda_device_requests_land_on_the_cpu(installed):
    t = torch.zeros(2, device="cuda")
    assert t.device.type == "cpu" and t.tolist() == [0.0, 0.0]
    assert torch.empty(3, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.tensor([1.0], device=0).device.type == "cpu"
    x = torch.arange(4.0)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    assert x.to(device="cuda:0").device.type == "cpu"
    y = x.to("cuda", torch.float64)
    assert y.device.type == "cpu" and y.dtype == torch.float64
    assert x.new_zeros(2, device="cuda").device.type == "cpu"
    # pin_memory needs a CUDA driver; the mode drops the request
    assert torch.empty(2, pin_memory=True).device.type == "cpu"
    # CPU work is unaffected
    assert torch.equal(x.to("cpu"), x) and torch.ones(2).device.type == "cpu"


def test_tensor_to_integer_cuda_index_lands_on_the_cpu(installed):
    assert torch.arange(2.0).to(0).device.type == "cpu"


def test_current_device_streams_and_events(installed):
    assert torch.cuda.current_device() == "cpu"
    assert torch.arange(3, device=torch.cuda.current_device()).device.type == "cpu"
    stream = torch.cuda.Stream()
    assert isinstance(stream, cpu_runtime._NullStream)
    assert torch.cuda.current_stream() == stream and torch.cuda.default_stream() == stream
    with torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.current_stream())
    event = torch.cuda.Event()
    event.record()
    assert event.query() is True and stream.record_event().query() is True
    torch.cuda.synchronize()


def test_cuda_rng_calls_drive_the_cpu_generator(installed):
    torch.cuda.manual_seed(5)
    a = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(4), a)
    state = torch.cuda.get_rng_state()
    b = torch.rand(4)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(4), b)


def test_split_sizes_become_numpy_for_gloo(installed):
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher
    import numpy as np

    assert token_dispatcher.maybe_move_tensor_to_cpu is moe_utils.maybe_move_tensor_to_cpu
    sizes = moe_utils.maybe_move_tensor_to_cpu(torch.tensor([3, 1, 4]), as_numpy=True)
    assert isinstance(sizes, np.ndarray) and sizes.tolist() == [3, 1, 4]
    t = torch.tensor([1, 2])
    assert torch.is_tensor(moe_utils.maybe_move_tensor_to_cpu(t))


def test_norm_shim_builds_torch_norms():
    from types import SimpleNamespace

    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cpu_runtime.install()
    cfg = SimpleNamespace(normalization="RMSNorm", sequence_parallel=True)
    norm = WrappedTorchNorm(cfg, 8, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm)
    assert all(p.sequence_parallel is True for p in norm.parameters())
    norm = WrappedTorchNorm(SimpleNamespace(normalization="LayerNorm", sequence_parallel=False), 8)
    assert isinstance(norm, torch.nn.LayerNorm)


def test_with_cuda_install_touches_nothing():
    """A machine with CUDA: install()/install_training() return False and leave torch.cuda alone."""
    out = _python(
        """
        import torch
        orig = {name: getattr(torch.cuda, name) for name in
                ("Stream", "Event", "current_stream", "current_device", "synchronize", "get_rng_state",
                 "manual_seed")}
        torch.cuda.is_available = lambda: True  # pretend a GPU is present
        from acmoe_megatron.runtime import cpu_runtime
        assert cpu_runtime.cpu_only() is False
        assert cpu_runtime.install() is False
        assert cpu_runtime.install_training() is False
        assert cpu_runtime.APPLIED == [], cpu_runtime.APPLIED
        assert cpu_runtime._MODE is None
        assert torch._C._len_torch_function_stack() == 0  # no CudaToCpuMode entered
        with cpu_runtime.device_redirect() as redirected:
            assert redirected is False and torch._C._len_torch_function_stack() == 0
        for name, value in orig.items():
            assert getattr(torch.cuda, name) is value, name
        assert torch.cuda.Stream is not cpu_runtime._NullStream
        assert not issubclass(torch.cuda.Stream, cpu_runtime._NullStream)
        print("UNTOUCHED")
        """
    )
    assert "UNTOUCHED" in out.stdout


def test_training_shims_are_idempotent_and_listed():
    """install_training() on CPU: core + trainer shims once each, even when called twice."""
    out = _python(
        """
        import torch
        from acmoe_megatron.runtime import cpu_runtime
        assert cpu_runtime.install_training() is True
        import megatron.training.training as training
        import megatron.core.optimizer.clip_grads as clip_grads
        import megatron.core.optimizer.optimizer as optimizer
        wrapped = training.initialize_megatron
        assert cpu_runtime.install_training() is True and cpu_runtime.install() is True
        assert training.initialize_megatron is wrapped  # not wrapped twice
        applied = list(cpu_runtime.APPLIED)
        assert len(applied) == len(set(applied)), applied
        assert applied[-3:] == ["T1_T2_initialize_without_cuda", "T4_clip_grads", "T5_device_arch"], applied
        assert clip_grads.clip_grad_by_total_norm_fp32 is cpu_runtime._clip_grad_by_total_norm_fp32
        assert optimizer.clip_grad_by_total_norm_fp32 is cpu_runtime._clip_grad_by_total_norm_fp32
        # the clip shim scales grads by max_norm / total_norm, and leaves them when under the norm
        p = torch.nn.Parameter(torch.ones(4)); p.grad = torch.full((4,), 3.0)
        cpu_runtime._clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=6.0)
        assert torch.allclose(p.grad, torch.full((4,), 0.5), atol=1e-6), p.grad
        cpu_runtime._clip_grad_by_total_norm_fp32([p], max_norm=10.0, total_norm=1.0)
        assert torch.allclose(p.grad, torch.full((4,), 0.5), atol=1e-6), p.grad
        # device_count / set_device are faked only while initialize_megatron runs
        assert torch.cuda.device_count() == 0
        print("APPLIED", applied)
        """
    )
    assert "T4_clip_grads" in out.stdout


_GLOO_WORKER = """
import os, torch, torch.distributed as dist
from acmoe_megatron.runtime import cpu_runtime
cpu_runtime._shim_gloo_uneven()
dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=2)
rank = dist.get_rank()
rows = [2, 3]  # uneven first dimensions, as the expert-TP token all-gather produces
mine = torch.full((rows[rank], 4), float(rank + 1))
out = [torch.empty(r, 4) for r in rows]
dist.all_gather(out, mine)
assert torch.equal(out[0], torch.full((2, 4), 1.0)) and torch.equal(out[1], torch.full((3, 4), 2.0)), out
inputs = [torch.full((r, 4), float(10 * (rank + 1) + i)) for i, r in enumerate(rows)]
result = torch.empty(rows[rank], 4)
dist.reduce_scatter(result, inputs)
assert torch.equal(result, torch.full((rows[rank], 4), float(10 + 20 + 2 * rank))), result
# equal shapes still go through gloo's own all_gather
same = [torch.empty(2) for _ in range(2)]
dist.all_gather(same, torch.full((2,), float(rank)))
assert [t.tolist() for t in same] == [[0.0, 0.0], [1.0, 1.0]]
dist.destroy_process_group()
print("RANK_OK", rank)
"""


def test_gloo_uneven_all_gather_and_reduce_scatter_two_ranks():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _GLOO_WORKER], cwd=ROOT, env={**env, "RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and f"RANK_OK {rank}" in text, text[-3000:]


# ---- the shim table (cpu_runtime.SHIMS) against the installed megatron-core ----------------------


def test_every_call_site_resolves_in_installed_megatron():
    """Each table entry's call site (and ``also`` names) exists in this megatron-core; a missing one
    makes install() raise naming the shim and the call site, before anything is patched."""
    out = _python(
        f"""
        import dataclasses
        import torch
        from acmoe_megatron.runtime import cpu_runtime
        shims = cpu_runtime.SHIMS
        names = [s.name for s in shims]
        assert sorted(names) == sorted({CORE_SHIMS + SCOPED_SHIMS + TRAINING_SHIMS + BRIDGE_SHIMS!r}), names
        stages = {{s.name: s.stage for s in shims}}
        assert stages == {{**dict.fromkeys({CORE_SHIMS!r}, "core"), **dict.fromkeys({SCOPED_SHIMS!r}, "scoped"),
                          **dict.fromkeys({TRAINING_SHIMS!r}, "training"),
                          **dict.fromkeys({BRIDGE_SHIMS!r}, "bridge")}}, stages
        shims = tuple(s for s in shims if s.stage != "bridge")  # Bridge's: test_bridge_shims_install_and_restore
        sites = [site for s in shims for site in (s.call_site, *s.also)]
        for site in sites:
            assert site.startswith("megatron."), site
            cpu_runtime.resolve(site)  # raises if megatron lacks it
        cpu_runtime.check_call_sites(shims)
        assert cpu_runtime.APPLIED == [] and cpu_runtime._MODE is None  # checking patches nothing

        # a call site megatron does not have (a function, a module): loud, naming shim and site
        splits = next(s for s in shims if s.name == "splits")
        for missing in ("megatron.core.transformer.moe.moe_utils.no_such_function",
                        "megatron.core.no_such_module.maybe_move_tensor_to_cpu"):
            bogus = dataclasses.replace(splits, call_site=missing)
            cpu_runtime.SHIMS = tuple(bogus if s is splits else s for s in shims)
            stream = torch.cuda.Stream
            try:
                cpu_runtime.install()
            except RuntimeError as e:
                msg = str(e)
            else:
                raise AssertionError("install() accepted a missing call site")
            assert "'splits'" in msg and missing in msg, msg
            assert cpu_runtime.APPLIED == [] and torch.cuda.Stream is stream  # nothing half-patched
        print("RESOLVED", len(sites))
        """
    )
    assert "RESOLVED" in out.stdout


BRIDGE_PYTHON = ROOT / ".venv-bridge" / "bin" / "python"  # make bridge (a venv layered on .venv: Makefile)
_HAVE_BRIDGE = BRIDGE_PYTHON.exists() and _python("import importlib.util as u; print(u.find_spec('megatron.bridge') "
                                                  "is not None)", python=BRIDGE_PYTHON).stdout.strip()


@pytest.mark.skipif(_HAVE_BRIDGE != "True", reason="Megatron-Bridge is not installed (make bridge)")
def test_bridge_shims_install_and_restore():
    """install_bridge(): B0 before Bridge is imported, every Bridge call site resolves, Bridge's own
    initialize_megatron gets allow_no_cuda, no stand-in is left for anybody else, and uninstall_all()
    puts Bridge's function back."""
    out = _python(
        f"""
        import importlib
        from acmoe_megatron.runtime import cpu_runtime
        cpu_runtime.install_for_training()
        applied = cpu_runtime.install_bridge()
        assert applied[:2] == {BRIDGE_SHIMS!r} and applied[2] == "T3_prebuilt_dataset_helpers_bridge", applied
        assert cpu_runtime.install_bridge() == ["T3_prebuilt_dataset_helpers_bridge"]  # idempotent
        import megatron.bridge.training.setup as setup
        import megatron.bridge.training.initialize as initialize
        import megatron.bridge.training.pretrain  # noqa: F401  (the NVRx stand-in's importer)
        assert setup.initialize_megatron is not initialize.initialize_megatron
        assert setup.initialize_megatron.__wrapped__ is initialize.initialize_megatron
        for name in ("transformer_engine", "nvidia_resiliency_ext.inprocess"):
            try:
                importlib.import_module(name)
            except ImportError:
                pass
            else:
                raise AssertionError(name + " stood in beyond its importer")
        import megatron.core.extensions.transformer_engine as te_ext
        assert te_ext.HAVE_TE is False
        undone = cpu_runtime.uninstall_all()
        assert undone[:2] == {BRIDGE_SHIMS[::-1]!r}, undone
        assert setup.initialize_megatron is initialize.initialize_megatron
        print("BRIDGE_OK")
        """, timeout=300, python=BRIDGE_PYTHON)
    assert "BRIDGE_OK" in out.stdout


@pytest.mark.parametrize("version", ["0.5.0", "0.7.1", "1.0.0"])
def test_wrong_bridge_version_is_refused(version):
    with pytest.raises(RuntimeError, match=f"Megatron-Bridge {version} is not supported") as exc:
        cpu_runtime.check_bridge_version(version)
    assert "megatron.bridge.training.setup.initialize_megatron" in str(exc.value)  # the call sites to review
    cpu_runtime.check_bridge_version("0.6.2")


@pytest.mark.parametrize("version", ["0.19.2", "0.19.2+03caca8", "0.19.0rc1", "0.19"])
def test_supported_megatron_versions_pass(version):
    cpu_runtime.check_megatron_version(version)


def test_installed_megatron_version_is_supported():
    cpu_runtime.check_megatron_version()


@pytest.mark.parametrize("version", ["0.20.0", "0.190.1", "0.18.5", "1.0.0+abc"])
def test_wrong_megatron_version_raises(monkeypatch, version):
    import megatron.core.package_info as package_info

    monkeypatch.setattr(package_info, "__version__", version)
    with pytest.raises(RuntimeError) as exc:
        cpu_runtime.check_megatron_version()
    msg = str(exc.value)
    assert f"megatron-core {version}" in msg  # the installed version
    assert f"megatron-core {cpu_runtime.SUPPORTED}.x" in msg and cpu_runtime.SUPPORTED == "0.19"
    assert "pin megatron-core 0.19.x" in msg  # the fix ...
    for shim in cpu_runtime.SHIMS:  # ... or review these call sites
        assert f"{shim.name} [{shim.stage}]: {shim.call_site}" in msg, shim.name
    # install() checks before patching: nothing is (re)applied on the wrong version
    monkeypatch.setattr(cpu_runtime, "_INSTALLED", {"core": False, "training": False})
    before = list(cpu_runtime.APPLIED)
    with pytest.raises(RuntimeError, match="is not supported"):
        cpu_runtime.install()
    with pytest.raises(RuntimeError, match="is not supported"):
        cpu_runtime.install_training()
    assert cpu_runtime.APPLIED == before


def test_uninstall_all_restores_the_originals_and_install_reapplies():
    """uninstall_all() puts back exactly the objects every shim replaced; install() applies again."""
    out = _python(
        """
        import numpy as np
        import torch
        import torch.distributed as dist
        import megatron.core.optimizer.clip_grads as clip_grads
        import megatron.core.optimizer.optimizer as optimizer
        import megatron.core.tensor_parallel.random as tp_random
        import megatron.core.transformer.moe.moe_utils as moe_utils
        import megatron.core.transformer.moe.token_dispatcher as token_dispatcher
        import megatron.core.transformer.torch_norm as torch_norm
        import megatron.core.models.hybrid.hybrid_block as hybrid_block
        import megatron.training.arguments as arguments
        import megatron.training.training as training
        import megatron.training.utils.common_utils as common_utils

        PATCHED = [
            *[(torch.cuda, n) for n in ("Stream", "Event", "current_stream", "default_stream", "stream",
                                        "synchronize", "current_device", "get_rng_state",
                                        "set_rng_state", "manual_seed")],
            (torch.cuda.random, "get_rng_state"), (torch.cuda.random, "set_rng_state"),
            (tp_random, "_get_cuda_rng_state"), (tp_random, "_set_cuda_rng_state"),
            (moe_utils, "maybe_move_tensor_to_cpu"), (token_dispatcher, "maybe_move_tensor_to_cpu"),
            (torch_norm.WrappedTorchNorm, "__new__"), (hybrid_block, "TENorm"),
            (dist, "all_gather"), (dist, "reduce_scatter"),
            (training, "initialize_megatron"),
            (clip_grads, "clip_grad_by_total_norm_fp32"), (optimizer, "clip_grad_by_total_norm_fp32"),
            (common_utils, "get_device_arch_version"), (arguments, "get_device_arch_version"),
        ]
        snapshot = lambda: [vars(owner)[name] for owner, name in PATCHED]
        original = snapshot()
        orig_move = moe_utils.maybe_move_tensor_to_cpu

        from acmoe_megatron.runtime import cpu_runtime
        assert cpu_runtime.uninstall_all() == []  # nothing applied yet: a no-op
        assert cpu_runtime.install_training() is True
        applied = list(cpu_runtime.APPLIED)
        patched = snapshot()
        for (owner, name), old, new in zip(PATCHED, original, patched):
            assert new is not old, f"{name} was not patched"
        assert torch._C._len_torch_function_stack() == 0  # the device redirect is scoped, not installed
        with cpu_runtime.device_redirect():
            assert torch._C._len_torch_function_stack() == 1

        assert cpu_runtime.uninstall_all() == applied[::-1]
        assert cpu_runtime.APPLIED == [] and cpu_runtime._MODE is None
        assert torch._C._len_torch_function_stack() == 0
        for (owner, name), old, now in zip(PATCHED, original, snapshot()):
            assert now is old, f"{getattr(owner, '__name__', owner)}.{name} not restored"
        try:
            torch.zeros(1, device="cuda")  # no CUDA->CPU mode any more: torch's own error
        except (RuntimeError, AssertionError):
            pass
        else:
            raise AssertionError("CUDA device requests are still redirected")

        # install() applies afresh, wrapping the restored original (not a previous wrapper)
        assert cpu_runtime.install() is True
        assert cpu_runtime.APPLIED == applied[:7], cpu_runtime.APPLIED  # the core shims
        assert moe_utils.maybe_move_tensor_to_cpu is not orig_move
        assert moe_utils.maybe_move_tensor_to_cpu.__wrapped__ is orig_move
        assert token_dispatcher.maybe_move_tensor_to_cpu is moe_utils.maybe_move_tensor_to_cpu
        sizes = moe_utils.maybe_move_tensor_to_cpu(torch.tensor([2, 1]), as_numpy=True)
        assert isinstance(sizes, np.ndarray)
        with cpu_runtime.device_redirect():
            assert torch.zeros(1, device="cuda").device.type == "cpu"
        assert cpu_runtime.install_training() is True and cpu_runtime.APPLIED == applied
        orig_init = original[PATCHED.index((training, "initialize_megatron"))]
        assert training.initialize_megatron.__wrapped__ is orig_init
        print("RESTORED", len(PATCHED))
        """
    )
    assert "RESTORED" in out.stdout


def _cuda_request_fails() -> bool:
    try:
        torch.zeros(1, device="cuda")
    except (RuntimeError, AssertionError):
        return True
    return False


@pytest.mark.no_device_redirect
def test_device_redirect_is_scoped_to_its_block():
    """Outside ``device_redirect()`` a CUDA request fails as torch makes it fail without a GPU (the
    core shims alone change nothing for plain torch code); inside it lands on the CPU; nested blocks
    keep the outer mode; leaving the block (also by an exception) removes the mode."""
    cpu_runtime.install()
    depth = torch._C._len_torch_function_stack()
    assert cpu_runtime._MODE is None and "cudamode" not in cpu_runtime.active()
    assert _cuda_request_fails()
    with cpu_runtime.device_redirect() as redirected:
        assert redirected is True and "cudamode" in cpu_runtime.active()
        assert torch.zeros(1, device="cuda").device.type == "cpu"
        with cpu_runtime.device_redirect():
            assert torch._C._len_torch_function_stack() == depth + 1  # not entered twice
        assert torch.ones(1).cuda().device.type == "cpu"  # the outer block's mode is still there
    assert _cuda_request_fails() and torch._C._len_torch_function_stack() == depth
    with pytest.raises(ValueError):
        with cpu_runtime.device_redirect():
            raise ValueError("inside")
    assert cpu_runtime._MODE is None and _cuda_request_fails()
