"""adapterkit: parameter-efficient adapters for PyTorch.

    import adapterkit as ak
    ak.attach(model, ak.LoRAConfig(r=8, target_modules=["query", "value"]))
    ... train ...
    ak.save(model, "out/sentiment")
    ak.fuse(model); ak.unfuse(model)   # bit-exact
"""

from . import errors
from .analysis import metrics
from .core import quantization
from ._version import __version__
from .core.api import (
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
    to_plain,
    merge_and_unload,
    quantize,
    switch,
    trainable_parameters,
    unfuse,
)
from .io.artefact import export, load, save
from .core.activation import routing
from .core.per_row import per_row
from .core.packing import is_packed, pack, unpack
from .core.composition import Add, Split, Stack
from .core.config import AdapterConfig
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
    UnknownMemberError,
    UnknownMethodError,
    UnsafeFileError,
    UnsupportedError,
)
from .core.host import AdaptedModule, ModelHost
from .core.layers import AdapterLayer, DeltaLayer, ModelLayer, ModuleLayer
from .methods import BottleneckConfig, DyLoRAConfig, LoRAConfig, MoSAConfig, ShiraConfig
from .methods import dylora, mosa
from .methods import ranking, sft
from .methods.ranking import RankingAdapterConfig
from .methods.sft import SFTConfig
from .methods.dylora import RankSweep, rank_sweep, set_rank


from .core.registry import AdapterMethod, get_method, register_method, registered_methods
from .core.steps import step
from .train.loop import FrozenNormStatistics, TextBatches, accuracy, predict, train


def __getattr__(name: str):  # transformers is optional: import the Trainer integration on first use
    if name in ("AdapterTrainer",
    "MoSATrainer", "StepCallback", "MoSATrainer"):
        from .train import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'adapterkit' has no attribute {name!r}")

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
    "to_plain",
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
    "Add",
    "Split",
    "routing",
    "per_row",
    "pack",
    "unpack",
    "is_packed",
    "StepCallback",
    "step",
    "FrozenNormStatistics",
    "AdapterConfig",
    "LoRAConfig",
    "ShiraConfig",
    "SFTConfig",
    "sft",
    "ranking",
    "RankingAdapterConfig",
    "AdapterTrainer",
    "MoSATrainer",
    "AdaptedModule",
    "AdapterLayer",
    "DeltaLayer",
    "ModuleLayer",
    "ModelLayer",
    "ModelHost",
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
    "UnknownMemberError",
    "UnknownMethodError",
    "UnsafeFileError",
    "UnsupportedError",
]
