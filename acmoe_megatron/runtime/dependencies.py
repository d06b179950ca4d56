"""Installed packages that break megatron-core, refused by name before megatron is imported.

nvidia-resiliency-ext (NVRx, NVIDIA's fault-tolerance package: ``ft_launcher``, in-process restart,
megatron's ``--enable-ft-package``) is optional for megatron-core 0.19, but once installed it is
imported by megatron's checkpointing, which reads ``nvidia_resiliency_ext.__version__`` and needs
>= 0.6.0. The 0.5-0.7 wheels need glibc >= 2.39; below that a plain ``pip install
nvidia-resiliency-ext`` picks 0.4.1, which has no ``__version__``, and every ``import
megatron.training`` then dies in an AttributeError deep inside megatron. Nothing else checks this
before start, so this module does, from the package metadata alone (importing the package would be
the import that fails). Our ``[ft]`` extra asks for >= 0.6.0, so pip refuses it where no such wheel
exists instead of installing 0.4.1.
"""

from __future__ import annotations

from importlib import metadata

from packaging.version import InvalidVersion, Version

from acmoe_megatron.core.errors import ConfigError

NVRX = "nvidia-resiliency-ext"
NVRX_MIN = "0.6.0"  # megatron.core.dist_checkpointing.strategies.nvrx.NVRX_MIN_VERSION in 0.19

__all__ = ["NVRX_MIN", "check_ft_launcher", "check_installed", "ft_launcher_problem", "nvrx_problem"]


def nvrx_problem(version: str | None) -> str | None:
    """Why NVRx ``version`` (None: not installed) breaks megatron-core 0.19, or None when it does not."""
    if version is None:
        return None
    try:
        too_old = Version(version) < Version(NVRX_MIN)
    except InvalidVersion:
        too_old = True
    if not too_old:
        return None
    return (f"{NVRX} {version} is installed, and megatron-core 0.19 needs >= {NVRX_MIN}: its checkpointing reads "
            f"nvidia_resiliency_ext.__version__ (absent before 0.6), so `import megatron.training` fails. "
            f"Fix: pip uninstall -y {NVRX} (it is optional), or install >= {NVRX_MIN} where a wheel exists "
            f"(glibc >= 2.39): pip install -e '.[ft]'")


def ft_launcher_problem(version: str | None) -> str | None:
    """Why ``acmoe-launch slurm --launcher ft`` (NVRx's ft_launcher + megatron's --enable-ft-package)
    cannot run with NVRx ``version`` (None: not installed), or None when it can."""
    instead = ("or use --launcher torchrun (the default), whose hang watch (run.hang_timeout_s) needs no extra "
               "package")
    if version is None:
        return (f"--launcher ft runs NVIDIA's ft_launcher, from {NVRX} >= {NVRX_MIN}, which is not installed in this "
                f"environment: pip install -e '.[ft]' where a wheel exists (glibc >= 2.39), {instead}")
    problem = nvrx_problem(version)
    if problem:
        return f"--launcher ft: {problem}; {instead}"
    return None


def check_ft_launcher() -> None:
    """Raise ConfigError when the ft launcher cannot run in this environment (see ft_launcher_problem)."""
    problem = ft_launcher_problem(_version(NVRX))
    if problem:
        raise ConfigError(problem)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_installed() -> None:
    """Raise ConfigError naming an installed package that would break megatron-core and the fix."""
    problem = nvrx_problem(_version(NVRX))
    if problem:
        raise ConfigError(problem)
