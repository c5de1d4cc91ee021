"""The transferable bundle: everything a later transfer needs once the training data is gone.

``bundle.json`` (seeds, task instruction and descriptor, verdict template, seed-prompt settings,
candidate and labelling settings, the source model's identity) with two adapter directories in the
usual safetensors + JSON format: ``discriminator/`` (trained on the source base model) and
``source_adapter/`` (a copy of the adapter being transferred). Loading checks the format and every
field; attaching to a model checks that it is the source base model.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from ..._version import __version__
from ...errors import BaseModelMismatchError, CorruptFileError, MissingFileError
from ...io.fingerprint import tensor_sample_digest
from ...io.safefiles import read_json, write_json
from ...train.causal import Sampling
from ...zoo.lm_tasks import LMExample
from .discriminator import Verdict
from .prompts import SeedPrompt

FORMAT = "adapterkit-transfer-bundle"
FORMAT_VERSION = 1
BUNDLE_FILE = "bundle.json"
DISCRIMINATOR_DIR = "discriminator"
SOURCE_ADAPTER_DIR = "source_adapter"


def model_identity(model: nn.Module) -> dict[str, Any]:
    """What identifies a base model: its architecture sizes and a sample hash of its input embeddings."""
    config = getattr(model, "config", None)
    sizes = {key: getattr(config, key, None) for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")}
    return {**sizes, "embedding_sample_sha256": tensor_sample_digest(model.get_input_embeddings().weight)}


def check_identity(model: nn.Module, recorded: Mapping[str, Any], what: str) -> None:
    """Raise :class:`BaseModelMismatchError` naming the first field where ``model`` differs."""
    actual = model_identity(model)
    if set(recorded) != set(actual):
        raise BaseModelMismatchError(f"{what} records an incomplete model identity {sorted(recorded)}; "
                                     f"expected the fields {sorted(actual)}")
    for key, value in recorded.items():
        if actual.get(key) != value:
            raise BaseModelMismatchError(f"{what} was made for another base model: {key} is {actual.get(key)!r}, "
                                         f"the bundle recorded {value!r}")


@dataclasses.dataclass(frozen=True)
class TransferBundle:
    """The data-free description of a task and its source adapter (see the module docstring)."""

    task: str
    instruction: str
    seeds: tuple[LMExample, ...]
    verdict: Verdict
    seed_prompt: SeedPrompt
    candidate_sampling: Sampling
    answer_tokens: int
    source_model: str
    source_identity: dict[str, Any]
    discriminator_accuracy: float | None = None
    directory: Path | None = dataclasses.field(default=None, compare=False)

    def prompt(self, text: str) -> str:
        """The task prompt of an input: the instruction, a blank line, the input."""
        return f"{self.instruction}\n\n{text}" if self.instruction else text

    @property
    def discriminator_dir(self) -> Path:
        return self._path(DISCRIMINATOR_DIR)

    @property
    def source_adapter_dir(self) -> Path:
        return self._path(SOURCE_ADAPTER_DIR)

    def _path(self, name: str) -> Path:
        if self.directory is None:
            raise MissingFileError("this bundle has not been saved or loaded from a directory")
        return self.directory / name

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "adapterkit_version": __version__,
            "task": self.task, "instruction": self.instruction,
            "seeds": [{"input": s.input, "target": s.target} for s in self.seeds],
            "verdict": dataclasses.asdict(self.verdict),
            "seed_prompt": {"n_total": self.seed_prompt.n_total, "header": self.seed_prompt.header},
            "candidate_sampling": dataclasses.asdict(self.candidate_sampling),
            "answer_tokens": self.answer_tokens, "source_model": self.source_model,
            "source_identity": self.source_identity, "discriminator_accuracy": self.discriminator_accuracy,
        }


def save_bundle(bundle: TransferBundle, directory: str | Path, discriminator_dir: Path, source_adapter_dir: Path) -> TransferBundle:
    """Write ``bundle`` with copies of the two adapter directories; returns it bound to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for source, name in ((discriminator_dir, DISCRIMINATOR_DIR), (source_adapter_dir, SOURCE_ADAPTER_DIR)):
        if Path(source).resolve() != (directory / name).resolve():
            shutil.rmtree(directory / name, ignore_errors=True)
            shutil.copytree(source, directory / name)
    write_json(directory / BUNDLE_FILE, bundle.to_json())
    return dataclasses.replace(bundle, directory=directory)


def _field(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CorruptFileError(f"{where}: field {key!r} is missing or not {getattr(kind, '__name__', kind)}")
    return value


def load_bundle(directory: str | Path) -> TransferBundle:
    """Read and validate a bundle written by :func:`save_bundle`."""
    directory = Path(directory)
    where = directory / BUNDLE_FILE
    if not where.is_file():
        raise MissingFileError(f"no transfer bundle in {directory} (missing {BUNDLE_FILE})")
    data = read_json(where)
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise CorruptFileError(f"{where}: not a version-{FORMAT_VERSION} {FORMAT} file")
    try:
        seeds = tuple(LMExample(_field(s, "input", str, where), _field(s, "target", str, where))
                      for s in _field(data, "seeds", list, where))
        verdict = Verdict(**_field(data, "verdict", dict, where))
        prompt = SeedPrompt(tuple(s.input for s in seeds), **_field(data, "seed_prompt", dict, where))
        sampling = Sampling(**_field(data, "candidate_sampling", dict, where))
    except (TypeError, ValueError, AttributeError) as exc:
        raise CorruptFileError(f"{where}: invalid bundle ({exc})") from None
    accuracy = data.get("discriminator_accuracy")
    bundle = TransferBundle(
        task=_field(data, "task", str, where), instruction=_field(data, "instruction", str, where), seeds=seeds,
        verdict=verdict, seed_prompt=prompt, candidate_sampling=sampling,
        answer_tokens=_field(data, "answer_tokens", int, where), source_model=_field(data, "source_model", str, where),
        source_identity=_field(data, "source_identity", dict, where),
        discriminator_accuracy=float(accuracy) if isinstance(accuracy, (int, float)) else None, directory=directory)
    if bundle.answer_tokens < 1:
        raise CorruptFileError(f"{where}: answer_tokens must be a positive integer, got {bundle.answer_tokens}")
    for path in (bundle.discriminator_dir, bundle.source_adapter_dir):
        if not path.is_dir():
            raise MissingFileError(f"the bundle in {directory} lacks {path.name}/")
    return bundle
