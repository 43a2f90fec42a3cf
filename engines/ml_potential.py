"""What the machine-learned-potential engines (chgnet, mace) share.

Their options (a model, the device it runs on, and the md integrator's), the check that
their Python packages are installed, found without importing them, and the torch device
an option names, which imports torch and so is only called in a runner process.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

from pydantic import Field

from atomforge.engines.errors import InputError
from atomforge.engines.md_options import MdOptions

INSTALL_HINT = "pip install 'atomforge[ml]'"
"""How to install the ``ml`` extra, which holds torch and every ML potential's package."""


class MlOptions(MdOptions):
    """Options every ML potential has: the device, and the integrator for kind ``md``."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the model runs: auto takes a CUDA GPU when torch sees one."
    )


def absolute_path(path: str) -> str:
    """Return ``path`` with ``~`` expanded, made absolute (runners work in other folders)."""
    return str(Path(path).expanduser().absolute())


def missing_packages(modules: Iterable[str]) -> list[str]:
    """Return the top-level modules of ``modules`` that cannot be imported here.

    Looks them up without importing them: importing atomforge never imports torch.
    """
    return [name for name in modules if find_spec(name) is None]


def require_packages(engine: str, modules: dict[str, str]) -> None:
    """Raise InputError in one line naming the packages of ``modules`` (module: package
    name) that are not installed, and how to install them."""
    missing = [modules[name] for name in missing_packages(modules)]
    if missing:
        raise InputError(f"{engine}: {' and '.join(missing)} not installed: {INSTALL_HINT}")


def resolve_device(engine: str, device: str) -> str:
    """Return the torch device for option ``device``; InputError for cuda without a GPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{engine}: device 'cuda' but torch sees no CUDA GPU (use auto or cpu)")
    return device
