"""adapterkit: parameter-efficient adapters for PyTorch.

    import adapterkit as ak
    ak.attach(model, ak.LoRAConfig(r=8, target_modules=["query", "value"]))
    ... train ...
    ak.save(model, "out/sentiment")
    ak.fuse(model); ak.unfuse(model)   # bit-exact
"""

from . import errors, metrics, quantization
from ._version import __version__
from .api import (
    activate,
    active_adapters,
    adapter_parameters,
    adapters,
    attach,
    config_of,
    detach,
    fuse,
    fused_adapters,
    merge,
    merge_and_unload,
    quantize,
    switch,
    trainable_parameters,
    unfuse,
)
from .artefact import export, load, save
from .composition import Stack
from .config import AdapterConfig
from .errors import (
    AdapterError,
    AdapterNotFoundError,
    ArtefactError,
    BaseModelMismatchError,
    ConfigError,
    CorruptFileError,
    DataNotFoundError,
    DuplicateAdapterError,
    FingerprintMismatchError,
    FusedStateError,
    FusionError,
    MissingFileError,
    NonFiniteWeightsError,
    NotFusableError,
    TargetError,
    UnknownMethodError,
    UnsafeFileError,
    UnsupportedError,
)
from .layers import AdaptedModule, AdapterLayer, DeltaLayer, ModuleLayer
from .methods import BottleneckConfig, DyLoRAConfig, LoRAConfig, MoSAConfig, ShiraConfig
from .methods import dylora, mosa
from .methods.dylora import RankSweep, rank_sweep, set_rank


def __getattr__(name: str):  # transformers is optional: import the Trainer integration on first use
    if name in ("AdapterTrainer", "StepCallback"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'adapterkit' has no attribute {name!r}")
from .registry import AdapterMethod, get_method, register_method, registered_methods
from .training import FrozenNormStatistics, TextBatches, accuracy, predict, step, train

__all__ = [
    "__version__",
    "errors",
    "metrics",
    "activate",
    "active_adapters",
    "adapter_parameters",
    "adapters",
    "attach",
    "config_of",
    "detach",
    "fuse",
    "fused_adapters",
    "merge",
    "quantize",
    "merge_and_unload",
    "switch",
    "trainable_parameters",
    "unfuse",
    "load",
    "save",
    "export",
    "dylora",
    "set_rank",
    "rank_sweep",
    "RankSweep",
    "DyLoRAConfig",
    "BottleneckConfig",
    "MoSAConfig",
    "mosa",
    "Stack",
    "StepCallback",
    "step",
    "FrozenNormStatistics",
    "AdapterConfig",
    "LoRAConfig",
    "ShiraConfig",
    "AdapterTrainer",
    "AdaptedModule",
    "AdapterLayer",
    "DeltaLayer",
    "ModuleLayer",
    "AdapterMethod",
    "get_method",
    "register_method",
    "registered_methods",
    "TextBatches",
    "accuracy",
    "predict",
    "train",
    "AdapterError",
    "AdapterNotFoundError",
    "ArtefactError",
    "BaseModelMismatchError",
    "ConfigError",
    "CorruptFileError",
    "DataNotFoundError",
    "DuplicateAdapterError",
    "FingerprintMismatchError",
    "FusedStateError",
    "FusionError",
    "MissingFileError",
    "NonFiniteWeightsError",
    "NotFusableError",
    "TargetError",
    "UnknownMethodError",
    "UnsafeFileError",
    "UnsupportedError",
]
