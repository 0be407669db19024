"""Files shipped inside the installed packages: the configs (``synqt/configs``) and sbatch scripts.

They are located through ``importlib.resources``, so a wheel installed anywhere finds them exactly as
a checkout does; the repository root keeps ``configs`` and ``slurm`` as symbolic links to these folders
so that paths like ``configs/sweeps/vtab1k.yaml`` and ``slurm/vtab.sh`` work from a checkout.

Only a package installed as plain files is supported (pip always installs wheels that way); a package
imported from a zip archive has no file-system path for YAML readers and subprocesses, and is refused
with an error naming the resource.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from synqt.errors import ConfigError


def package_path(package: str, *parts: str) -> Path:
    """File-system path of ``parts`` inside ``package`` (e.g. ``("synqt", "configs", "base.yaml")``).

    The path need not exist (callers check and name what they looked for). Raises ConfigError when
    the package is not installed as files on disk.
    """
    resource = importlib.resources.files(package).joinpath(*parts)
    path = Path(str(resource))
    if not isinstance(resource, Path) and not path.exists():
        raise ConfigError(
            f"shipped file {'/'.join(parts)} of package {package} is not on the file system ({resource!r}); "
            "install synqt-launcher as files (pip install), not from a zip archive"
        )
    return path


def shipped_config_dir() -> Path:
    """The shipped configs folder (base.yaml, vtab/, fgvc/, sweeps/, deepspeed/, demo.yaml)."""
    return package_path("synqt", "configs")
