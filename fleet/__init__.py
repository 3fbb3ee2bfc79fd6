"""fleet: a fleet of personalized LoRA models (one per company, team and person) on one shared
base model, on Ray.

Packages, by layer (README "Architecture"; ``tests/test_layering.py`` keeps them so): core
(``errors``, ``types``, ``config``, ``gpus``), foundation (``registry``, ``store``, ``data``,
``base``, ``lora``, ``handles``), subsystems (``scheduler``, ``train``, ``serve``, ``divergence``,
``deploy``), ``ops`` (the control loop), and the command line (``fleet.cli``). Each package's
``__init__`` states its contract.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fleet")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
