"""Package contracts that resolve on first use (PEP 562).

``fleet --help``, the serving ingress and the registry-only commands import package contracts
such as ``fleet.lora`` or ``fleet.serve`` without paying for torch, transformers or Ray: a name
is imported from its module the first time it is read, then cached in the package.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``; ``exports`` maps each public name to
    ``"module"`` (same name there) or ``"module:attr"``."""

    def __getattr__(name: str) -> Any:
        target = exports.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attr = target.partition(":")
        value = getattr(importlib.import_module(module), attr or name)
        pkg = sys.modules[package]
        setattr(pkg, name, value)
        # Importing a submodule binds it on the package under its own name: where that name is also
        # an export of something in it (fleet.ops.evaluate the module, evaluate the function), the
        # binding would shadow the export; unbind it, so the next read resolves the export.
        for other, where in exports.items():
            submodule = f"{package}.{other}"
            if (
                other != name
                and where.partition(":")[0] == submodule
                and other in vars(pkg)
                and vars(pkg)[other] is sys.modules.get(submodule)
            ):
                delattr(pkg, other)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
