"""Trans-LoRA: move a trained adapter to a new base model without the training data.

The pieces stand alone: :class:`SeedPrompt` (the numbered-list prompt and its parser),
:class:`LMGenerator` / :class:`FunctionGenerator` (candidate inputs), :class:`Discriminator`
(``p(yes) > p(no)``), :class:`RejectionSampler`, :func:`distill` (sequence- or logit-level), the
:class:`TransferBundle`, and :func:`prepare` / :class:`Transfer` which chain them with resumable
stages. Nothing here depends on the adapter method on either side.
"""

from .bundle import TransferBundle, load_bundle, model_identity, save_bundle
from .discriminator import Discriminator, Verdict, train_discriminator
from .distill import Teacher, activated, check_same_vocabulary, distill, logit_kd_loss, soft_cross_entropy
from .generator import CANDIDATE_SAMPLING, FunctionGenerator, Generator, LMGenerator, candidates
from .mmd import mmd
from .pipeline import (PrepareSettings, Transfer, TransferOutcome, TransferSettings, load_source, prepare, sample_stream,
                       train_student)
from .prompts import SeedPrompt
from .sampler import RejectionSampler, SampleResult

__all__ = [
    "CANDIDATE_SAMPLING", "Discriminator", "FunctionGenerator", "Generator", "LMGenerator", "PrepareSettings",
    "RejectionSampler", "SampleResult", "SeedPrompt", "Teacher", "Transfer", "TransferBundle", "TransferOutcome",
    "TransferSettings", "Verdict", "activated", "candidates", "check_same_vocabulary", "distill", "load_bundle",
    "load_source", "logit_kd_loss", "mmd", "model_identity", "prepare", "sample_stream", "save_bundle",
    "soft_cross_entropy", "train_student",
    "train_discriminator",
]
