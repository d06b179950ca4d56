"""acmoe-launch from an installed wheel (not an editable checkout): the sbatch template and its
helper scripts come from the package, the job's paths from the directory it runs in, and the
recorded code version from the package itself (#19).

The wheel is built without dependencies and installed into a fresh virtual environment; torch and
megatron-core come from this environment's site-packages through PYTHONPATH (their ``.pth`` files,
including the editable install of this checkout, are not read from a PYTHONPATH entry)."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_installed_wheel_renders_a_job_for_the_directory_it_runs_in(tmp_path):
    from acmoe_megatron.data import prepare

    # build from a copy of the tracked files: setuptools' in-tree build/ directory would carry over
    src = tmp_path / "src"
    files = _run(["git", "ls-files", "-z"], cwd=ROOT).stdout.split("\0")
    for name in filter(None, files):
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_symlink():
            target.symlink_to(os.readlink(ROOT / name))
        elif (ROOT / name).is_file():
            target.write_bytes((ROOT / name).read_bytes())
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
          str(src)], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("acmoe_megatron-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)])
    site = next((venv / "lib").glob("python3*/site-packages"))
    package = site / "acmoe_megatron" / "cli"  # the SLURM templates sit beside acmoe-launch's module
    assert (package / "slurm" / "pretrain.sbatch").is_file() and (package / "slurm" / "torchrun_node.sh").is_file()

    project = tmp_path / "my project"  # another directory, with a space
    project.mkdir()
    prepare(source="stdlib", out_dir=project / "data" / "shards", seq_length=64, max_bytes=100_000)
    (project / "recipe.yaml").write_text((ROOT / "configs" / "tiny_cpu.yaml").read_text())
    env = dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"])
    env.pop("VIRTUAL_ENV", None)
    out = _run([str(venv / "bin" / "acmoe-launch"), "slurm", "--config", "recipe.yaml", "--nodes", "1",
                "--gpus-per-node", "0", "--procs-per-node", "2", "--dry-run", "data.path=data/shards",
                "megatron.seq_length=64", "run.dir=runs/first"], cwd=project, env=env)
    script = out.stdout
    assert f"export ACMOE_ROOT='{project}'" in script
    assert f"export ACMOE_SCRIPTS={package / 'slurm'}" in script
    assert f"export RUN_DIR='{project / 'runs' / 'first'}'" in script
    assert f"export DATA='{project / 'data' / 'shards'}'" in script
    assert f"export CONFIG='{project / 'recipe.yaml'}'" in script
    assert str(ROOT) not in script  # nothing of the checkout the wheel was built from

    # inside the job, `resolve` records the code that runs: the installed package's version, no git SHA
    run_dir = project / "runs" / "first"
    _run([str(venv / "bin" / "acmoe-launch"), "resolve", "--config", "recipe.yaml", "--run-dir", str(run_dir),
          "--data", str(project / "data" / "shards"), "--world-size", "2", "--", "megatron.seq_length=64"],
         cwd=project, env=env)
    assert (run_dir / "git_sha.txt").read_text().startswith("acmoe-megatron 0.1.0 (installed package")
