"""Import stand-ins: a missing package seen by exactly one importing module, for exactly its own body.

Why this module exists: Megatron-Bridge 0.6 imports two GPU-only packages unguarded at module level,
where nothing on the CPU training path uses them (``megatron.bridge.peft.lora_layers`` does
``import transformer_engine.pytorch as te`` for LoRA type annotations; ``megatron.bridge.training.
pretrain`` does ``from nvidia_resiliency_ext.inprocess import CallWrapper`` for one annotation). Neither
package can be installed on a CPU machine without breaking ``import megatron.core`` (Transformer
Engine without its compiled extension crashes it; the only NVRx wheel pip finds for this glibc,
0.4.1, has no ``__version__``, which megatron-core's checkpointing reads). No library offers a
scoped stand-in, so this one is ours; ``cpu_runtime``'s shim table is what installs it (Bridge stage,
only without CUDA).

Scope, so that nobody else sees a package that is not there:

* a ``StandIn`` names the one importing module (``importer``) and the stand-in modules with their
  attributes (placeholder classes nothing is an instance of);
* a meta-path finder wraps only that importer's loader. Before its body runs, every other module its
  top-level ``import`` statements name is imported normally (so nothing else is first imported while
  the stand-in exists); the stand-ins are put into ``sys.modules`` for the duration of the importer's
  body and removed right after, whatever happens;
* any other module that gets imported during that window is an error naming it (a Bridge release
  that imports something new at that point must be reviewed, not silently given the stand-in);
* every later ``import transformer_engine`` anywhere fails as it does without the stand-in, so
  ``HAVE_TE``-style checks in megatron-core and Bridge stay False.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.abc
import importlib.util
import sys
import types

__all__ = ["StandIn", "StandInFinder", "install", "uninstall"]


@dataclasses.dataclass(frozen=True)
class StandIn:
    """``importer`` gets ``modules`` (dotted name -> names of placeholder classes) for its own body."""

    importer: str
    modules: dict[str, tuple[str, ...]]
    reason: str

    def build(self) -> dict[str, types.ModuleType]:
        """Fresh stand-in modules; a dotted attribute ``ops.Linear`` becomes a namespace ``ops``."""
        built: dict[str, types.ModuleType] = {}
        for name in sorted(self.modules, key=lambda n: n.count(".")):
            module = types.ModuleType(name, f"acmoe import stand-in for {self.importer} ({self.reason})")
            module.__path__ = []  # a package: importing a submodule that is not listed still fails
            for attr in self.modules[name]:
                owner = module
                *parents, leaf = attr.split(".")
                for parent in parents:
                    if not hasattr(owner, parent):
                        setattr(owner, parent, types.SimpleNamespace())
                    owner = getattr(owner, parent)
                setattr(owner, leaf, type(leaf, (), {"__module__": name,
                                                     "__doc__": "import stand-in placeholder (never instantiated)"}))
            parent_name, _, child = name.rpartition(".")
            if parent_name in built:
                setattr(built[parent_name], child, module)
            built[name] = module
        return built


def _imported_names(source: str, package: str) -> list[str]:
    """The modules that the top-level import statements of ``source`` name (relative ones resolved)."""
    names = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]  # submodules among the names
    return names


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


class _Loader(importlib.abc.Loader):
    def __init__(self, standin: StandIn, inner: importlib.abc.Loader, spec):
        self.standin, self.inner, self.spec = standin, inner, spec

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        source = self.inner.get_source(module.__name__)
        covered = set(self.standin.modules)
        for name in _imported_names(source, module.__package__ or ""):
            if name.split(".")[0] in {c.split(".")[0] for c in covered} or name in sys.modules:
                continue
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as err:
                if err.name != name:  # not "a name in `from x import name` is an attribute": a real gap
                    raise
        built = self.standin.build()
        needed = [name for name, attrs in self.standin.modules.items() if attrs and _importable(name)]
        if needed:
            raise RuntimeError(f"import stand-in for {self.standin.importer}: {needed} is importable here, so "
                               "the stand-in is not needed; remove it from cpu_runtime's Bridge shims")
        before = set(sys.modules)
        shadowed = {name: sys.modules[name] for name in built if name in sys.modules}  # e.g. an empty namespace dir
        sys.modules.update(built)
        try:
            self.inner.exec_module(module)
        finally:
            for name in built:
                sys.modules.pop(name, None)
            sys.modules.update(shadowed)
        others = sorted(set(sys.modules) - before - set(built) - {module.__name__})
        if others:
            raise RuntimeError(
                f"import stand-in for {self.standin.importer}: its body also imported {others} while "
                f"{sorted(built)} stood in; review this Bridge release (cpu_runtime's Bridge shims) before "
                "letting them see a stand-in")


class StandInFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of each ``StandIn.importer``; every other import is left alone."""

    def __init__(self, standins: tuple[StandIn, ...]):
        self.by_importer = {s.importer: s for s in standins}
        self.used: list[str] = []

    def find_spec(self, fullname, path, target=None):
        standin = self.by_importer.get(fullname)
        if standin is None:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "get_source"):
            return spec
        spec.loader = _Loader(standin, spec.loader, spec)
        self.used.append(fullname)
        return spec


_FINDER: StandInFinder | None = None


def install(standins: tuple[StandIn, ...]) -> StandInFinder:
    """Put the finder first on ``sys.meta_path`` (before the importers are imported). Raises if an
    importer is already imported: its stand-in would come too late."""
    global _FINDER
    early = [s.importer for s in standins if s.importer in sys.modules]
    if early:
        raise RuntimeError(f"{early} was imported before the import stand-ins were installed: call "
                           "cpu_runtime.install_bridge() before importing megatron.bridge")
    uninstall()
    _FINDER = StandInFinder(standins)
    sys.meta_path.insert(0, _FINDER)
    return _FINDER


def uninstall() -> None:
    global _FINDER
    if _FINDER is not None and _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    _FINDER = None
