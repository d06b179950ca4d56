"""Import stand-ins (runtime/import_standin.py): only the named importer sees them, only for its own body.

Each case runs in a fresh interpreter over a throwaway package in tmp_path, so the pytest process's
``sys.modules`` and ``sys.meta_path`` are never touched.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _package(tmp_path: Path, importer_body: str) -> Path:
    pkg = tmp_path / "fakebridge"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("VALUE = 1\n")
    (pkg / "lora.py").write_text(textwrap.dedent(importer_body))
    (pkg / "other.py").write_text(textwrap.dedent("""
        try:
            import missing_gpu_pkg  # noqa: F401
            HAVE = True
        except ImportError:
            HAVE = False
    """))
    return tmp_path


def _run(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    prelude = """
        import sys
        from acmoe_megatron.runtime import import_standin as s
        STANDIN = s.StandIn("fakebridge.lora", {"missing_gpu_pkg": (), "missing_gpu_pkg.pytorch": ("ops.Sequential",)},
                            "a test")
    """
    return subprocess.run([sys.executable, "-c", textwrap.dedent(prelude) + textwrap.dedent(code)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"})


LORA = """
    from fakebridge.helper import VALUE
    import missing_gpu_pkg.pytorch as te

    def fused() -> te.ops.Sequential:  # evaluated when the module body runs
        return te
"""


def test_only_the_importer_sees_the_standin_and_only_during_its_body(tmp_path):
    out = _run(_package(tmp_path, LORA), """
        finder = s.install((STANDIN,))
        import fakebridge.lora as lora
        import fakebridge.other as other
        assert lora.fused().__name__ == "missing_gpu_pkg.pytorch" and lora.VALUE == 1
        assert other.HAVE is False                     # later importers: the package is still missing
        assert "missing_gpu_pkg" not in sys.modules and "missing_gpu_pkg.pytorch" not in sys.modules
        try:
            import missing_gpu_pkg  # noqa: F401
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError("the stand-in leaked")
        assert finder.used == ["fakebridge.lora"]
        s.uninstall()
        assert finder not in sys.meta_path
        print("OK")
    """)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_without_the_standin_the_importer_fails(tmp_path):
    """The mechanism is what makes the import work (the test above fails without it)."""
    out = _run(_package(tmp_path, LORA), "import fakebridge.lora\n")
    assert out.returncode != 0 and "No module named 'missing_gpu_pkg'" in out.stderr, out.stderr[-2000:]


def test_a_module_first_imported_inside_the_window_is_refused_by_name(tmp_path):
    body = textwrap.dedent(LORA) + "\nimport importlib\nimportlib.import_module('fakebridge.other')\n"
    out = _run(_package(tmp_path, body), """
        s.install((STANDIN,))
        import fakebridge.lora
    """)
    assert out.returncode != 0 and "['fakebridge.other']" in out.stderr and "review" in out.stderr, out.stderr[-2000:]
    assert "missing_gpu_pkg" not in out.stdout


def test_an_importable_package_needs_no_standin(tmp_path):
    root = _package(tmp_path, LORA)
    real = root / "missing_gpu_pkg"
    (real / "pytorch").mkdir(parents=True)
    (real / "__init__.py").write_text("")
    (real / "pytorch" / "__init__.py").write_text("class _O:\n    Sequential = object\nops = _O\n")
    out = _run(root, """
        s.install((STANDIN,))
        import fakebridge.lora
    """)
    assert out.returncode != 0 and "is importable here, so the stand-in is not needed" in out.stderr, out.stderr[-2000:]


def test_installing_after_the_importer_was_imported_is_refused(tmp_path):
    out = _run(_package(tmp_path, "X = 1\n"), """
        import fakebridge.lora
        try:
            s.install((STANDIN,))
        except RuntimeError as e:
            assert "install_bridge() before importing megatron.bridge" in str(e), e
            print("REFUSED")
    """)
    assert "REFUSED" in out.stdout, out.stderr[-2000:]
