"""The package's layers hold (import-linter's contracts in pyproject.toml), the contracts can fail,
core stays free of torch.distributed, and the modules that must start fast stay light.

The layers (top to bottom): cli | testing > plugin | inference > runtime > observability > model >
data > core. A module imports only from its own layer or below; import-linter counts every import
statement, function-local ones included.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command(['--no-cache', '--no-logo']))"]

# Modules the commands import before they refuse a bad recipe or print --help: they must not import
# torch or megatron (10 s on a 2-core machine), so a recipe error exits 2 in about a second.
LIGHT = ["acmoe_megatron.core.settings", "acmoe_megatron.core.errors", "acmoe_megatron.core.exit_codes",
         "acmoe_megatron.core.registry", "acmoe_megatron.core.layers", "acmoe_megatron.runtime.recipe",
         "acmoe_megatron.cli.common", "acmoe_megatron.cli.pretrain", "acmoe_megatron.cli.launch",
         "acmoe_megatron.cli.data", "acmoe_megatron.cli.eval", "acmoe_megatron.cli.generate",
         "acmoe_megatron.cli.export", "acmoe_megatron.cli.plot"]


def _lint(cwd: Path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(LINT, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_contracts_are_kept():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_a_back_import_breaks_the_layers_contract(tmp_path):
    """The same check on a copy of the package where core imports the runtime: refused."""
    shutil.copytree(ROOT / "acmoe_megatron", tmp_path / "acmoe_megatron",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    labels = tmp_path / "acmoe_megatron" / "core" / "labels.py"
    labels.write_text(labels.read_text() + "\nfrom acmoe_megatron.runtime import recipe  # a back-import\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = _lint(tmp_path, env)
    assert out.returncode != 0, out.stdout
    assert "BROKEN" in out.stdout and "acmoe_megatron.core.labels -> acmoe_megatron.runtime.recipe" in out.stdout


def test_core_never_uses_torch_distributed():
    """import-linter cannot forbid a sub-package of torch: read core's imports directly."""
    found = []
    for path in sorted((ROOT / "acmoe_megatron" / "core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            found += [f"{path.name}: {n}" for n in names if n.startswith("torch.distributed")]
    assert not found, found


def test_the_commands_start_without_torch_or_megatron():
    code = ("import importlib, json, sys; mods = json.loads(sys.argv[1]); heavy = {}\n"
            "for m in mods:\n"
            "    importlib.import_module(m)\n"
            "    heavy[m] = sorted(k for k in ('torch', 'megatron', 'transformers') if k in sys.modules)\n"
            "print(json.dumps(heavy))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(LIGHT)], capture_output=True, text=True,
                         check=True, timeout=300)
    heavy = {m: h for m, h in json.loads(out.stdout.strip().splitlines()[-1]).items() if h}
    assert not heavy, f"modules that import heavy packages at start-up (first offender first): {heavy}"


def test_a_recipe_error_in_our_keys_is_refused_before_torch_is_imported():
    """acmoe-pretrain with a wrong value in each of our sections: exit 2 naming the key, and neither
    torch nor megatron imported (measured: 11.6 s before, ~0.5 s now on the 2-core machine)."""
    code = ("import sys; from acmoe_megatron.cli.pretrain import main\n"
            "for bad in sys.argv[1:]:\n"
            "    assert main(['--config', 'configs/tiny_cpu.yaml', bad]) == 2, bad\n"
            "print(sorted(k for k in ('torch', 'megatron') if k in sys.modules))")
    bad = ["data.seed=abc", "acmoe.router=nope", "run.keep_last_checkpoints=x", "elliptical.enabled=3",
           "nosuchsection.key=1"]
    out = subprocess.run([sys.executable, "-c", code, *bad], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
    for key in ("data.seed", "acmoe.router", "run.keep_last_checkpoints", "elliptical.enabled", "nosuchsection"):
        assert key in out.stderr


# Our own modules imported inside a function, each for a reason a contract above states: the command
# modules must start without torch/megatron (test_the_commands_start_without_torch_or_megatron), and
# the Hugging Face remote-code modules need the optional `transformers` (the `hf` extra).
LOCAL_IMPORTS = {
    ("cli/data.py", "acmoe_megatron.data.megatron.convert"): "acmoe-data convert: megatron's indexed builder",
    ("cli/eval.py", "acmoe_megatron.runtime.megatron_args"): "acmoe-eval's checks: megatron's argument parser",
    ("cli/plot.py", "acmoe_megatron.observability.figures"): "acmoe-plot: matplotlib",
    ("runtime/run_plan.py", "acmoe_megatron.runtime"): "the commands' plan: cpu_runtime imports torch",
    ("runtime/heartbeat.py", "acmoe_megatron.runtime.hooks"): "the hang watch process reads heartbeat records "
                                                              "without torch (hooks imports it)",
    ("runtime/run_plan.py", "acmoe_megatron.runtime.megatron_args"): "the commands' plan: megatron",
    ("inference/hf/convert.py", "acmoe_megatron.inference.hf.configuration_acmoe"): "transformers (hf extra)",
    ("inference/hf/convert.py", "acmoe_megatron.inference.hf.modeling_acmoe"): "transformers (hf extra)",
}


def test_function_local_imports_of_our_modules_are_the_justified_ones():
    package = ROOT / "acmoe_megatron"
    found = set()
    for path in sorted(package.rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("acmoe_megatron"):
                        found.add((str(path.relative_to(package)), node.module))
                    if isinstance(node, ast.Import):
                        found |= {(str(path.relative_to(package)), a.name) for a in node.names
                                  if a.name.startswith("acmoe_megatron")}
    assert found == set(LOCAL_IMPORTS), ("import our modules at module top; a function-local import needs a "
                                         f"reason in LOCAL_IMPORTS: new {found - set(LOCAL_IMPORTS)}, "
                                         f"gone {set(LOCAL_IMPORTS) - found}")
