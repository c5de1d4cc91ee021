"""What tests/test_distributed.py runs in its spawned ranks (importable by name, light imports:
no transformers, so a rank starts in ~3 s): a tiny classifier, one adapter per method, the
global batches, and each rank's work. Every rank writes its results to ``out`` (safetensors +
JSON); the test process compares them with single-process training."""

from __future__ import annotations

import dataclasses
import json
import os
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

import adapterkit as ak
from adapterkit.core.state import get_state
from adapterkit.methods.mosa import two_pass_loss
from adapterkit.methods.ranking import RankingAdapterConfig, ranking_layer, ranking_loss
from adapterkit.train import distributed

STEPS_LR = 1e-2
SIZES = (4, 5, 3, 1)  # global batch sizes: even, odd (3/2 rows), and one row (rank 1 gets none: weight 0)


class Tiny(nn.Module):
    """Embedding, two hidden linears, a head; returns ``{"loss", "logits"}`` like an HF model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.l1, self.l2, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        h = torch.relu(self.l2(torch.relu(self.l1(self.emb(input_ids).mean(1)))))
        logits = self.head(h)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class Encoders(nn.Module):
    """Frozen stand-ins with the token widths the ranking adapter reads."""

    image_token_dim, text_token_dim = 12, 10

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(6, 12)


def _lowbit(bits: int) -> Callable[[nn.Module], None]:
    def attach(model: nn.Module) -> None:
        ak.attach(model, ak.LoRAConfig(r=4, target_modules=["l1", "l2"]), "a")
        ak.quantize(model, "a", bits)
    return attach


TARGETS = ["l1", "l2"]
#: method case -> how to attach adapter "a" to a fresh Tiny (seeded by the caller)
ATTACH: dict[str, Callable[[nn.Module], None]] = {
    "lora": lambda m: ak.attach(m, ak.LoRAConfig(r=4, target_modules=TARGETS), "a"),
    "shira": lambda m: ak.attach(m, ak.ShiraConfig(r=2, target_modules=TARGETS), "a"),
    "dylora": lambda m: ak.attach(m, ak.DyLoRAConfig(r_max=4, target_modules=TARGETS, scope="per_layer"), "a"),
    "bottleneck": lambda m: ak.attach(m, ak.BottleneckConfig(bottleneck=4, target_modules=TARGETS), "a"),
    "mosa": lambda m: ak.attach(m, ak.MoSAConfig(base=ak.LoRAConfig(r=4, target_modules=TARGETS), n_modules=3), "a"),
    "mosa_bottleneck": lambda m: ak.attach(m, ak.MoSAConfig(base=ak.BottleneckConfig(bottleneck=4, target_modules=TARGETS),
                                                            split="both", consistency_weight=0.5), "a"),
    "lora_1bit": _lowbit(1),
    "lora_4bit": _lowbit(4),
    "sft": lambda m: ak.attach(m, ak.SFTConfig(k=60, target_modules=TARGETS, selection="random"), "a"),
}
#: cases whose single-process and 2-rank runs must agree (FSDP2: a subset, to bound the time)
FSDP_CASES = ("lora", "dylora", "mosa")


def adapted(case: str) -> nn.Module:
    torch.manual_seed(0)
    model = Tiny().requires_grad_(False)
    ATTACH[case](model)
    return model


def global_batches() -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 50, (n, 5), generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}
            for n in SIZES]


def draws(model: nn.Module) -> list[int]:
    """This step's DyLoRA ranks and MoSA module choices, read from the layers."""
    out: list[int] = []
    for _, layer in get_state(model).layers("a"):
        out += [layer.train_rank] if hasattr(layer, "train_rank") else []
        out += [split.selected for split in getattr(layer, "split_modules", lambda: [])()]
    return out


def trainable(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


@dataclasses.dataclass
class Run:
    params: dict[str, Tensor]
    draws: list[list[int]]
    losses: list[float]


def single_process(case: str) -> Run:
    """The reference: one process, the global batches, :func:`adapterkit.train`."""
    model = adapted(case)
    seen: list[list[int]] = []
    losses = ak.train(model, global_batches(), lr=STEPS_LR, progress=False, loss_fn=two_pass_loss,
                      on_step=lambda *_: seen.append(draws(model)))
    return Run(trainable(model), seen, losses)


def single_process_iterable() -> Run:
    """The reference of :func:`_ddp_iterable`: LoRA, one process, a generator of the global batches."""
    model = adapted("lora")
    losses = ak.train(model, (b for b in global_batches()), lr=STEPS_LR, progress=False)
    return Run(trainable(model), [], losses)


def _ddp(case: str) -> Run:
    model = adapted(case)
    seen: list[list[int]] = []
    losses = distributed.train(model, global_batches(), lr=STEPS_LR, loss_fn=two_pass_loss,
                               on_step=lambda *_: seen.append(draws(model)))
    return Run(trainable(model), seen, losses)


def _ddp_plain(case: str) -> Run:
    """DDP around the model itself (as the Hugging Face Trainer wraps it) with MoSA's two passes
    inside one forward (:func:`distributed.two_pass_in_one_forward`, what MoSATrainer uses)."""
    model = adapted(case)
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    seen: list[list[int]] = []

    def loss(m: nn.Module, shard: distributed.Shard) -> Tensor:
        distributed.check_draws(m)
        return distributed.two_pass_in_one_forward(m, shard.batch) * shard.weight

    losses = ak.train(ddp, distributed.ShardedBatches(global_batches()), lr=STEPS_LR, progress=False, loss_fn=loss,
                      on_step=lambda *_: seen.append(draws(model)))
    return Run(trainable(model), seen, losses)


def _fsdp(case: str) -> Run:
    """FSDP2: ``fully_shard`` on the model, the same shards and weights, :func:`adapterkit.train`."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = adapted(case)
    fully_shard(model)
    seen: list[list[int]] = []

    def loss(m: nn.Module, shard: distributed.Shard) -> Tensor:
        distributed.check_draws(m)
        return two_pass_loss(m, shard.batch) * shard.weight

    losses = ak.train(model, distributed.ShardedBatches(global_batches()), lr=STEPS_LR, progress=False, loss_fn=loss,
                      on_step=lambda *_: seen.append(draws(model)))
    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone().contiguous()
            for n, p in model.named_parameters() if p.requires_grad}
    return Run(full, seen, losses)


def _write(out: Path, key: str, run: Run) -> None:
    save_file(run.params, str(out / f"{key}.safetensors"))
    (out / f"{key}.json").write_text(json.dumps({"draws": run.draws, "losses": run.losses}))


def _ddp_iterable() -> Run:
    """LoRA trained from a generator of the global batches (no length)."""
    model = adapted("lora")
    losses = distributed.train(model, (b for b in global_batches()), lr=STEPS_LR)
    return Run(trainable(model), [], losses)


class Spare(Tiny):
    """Tiny with a linear layer its forward never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(16, 16)


def _unused() -> str:
    """An adapter on a module the forward never runs: refused after the first step on every rank."""
    torch.manual_seed(0)
    model = Spare().requires_grad_(False)
    ak.attach(model, ak.LoRAConfig(r=2, target_modules=["l1", "spare"]), "a")
    before = trainable(model)
    try:
        distributed.train(model, global_batches(), lr=STEPS_LR)
    except ak.AdapterError as error:
        unchanged = all(torch.equal(before[k], v) for k, v in trainable(model).items())
        return f"{type(error).__name__} unchanged={unchanged}: {error}"
    return "trained"


def _batch_desync(rank: int) -> str:
    """Rank 1 is given other global batches of the same shapes: refused at the first step."""
    model = adapted("lora")
    batches = global_batches()
    if rank == 1:
        batches[0]["input_ids"][0, 0] = (batches[0]["input_ids"][0, 0] + 1) % 50
    before = trainable(model)
    try:
        distributed.train(model, batches, lr=STEPS_LR)
    except distributed.RankMismatchError as error:
        unchanged = all(torch.equal(before[k], v) for k, v in trainable(model).items())
        return f"RankMismatchError unchanged={unchanged}: {error}"
    return "trained"


def _desync(rank: int) -> str:
    """Rank 1 draws one extra time before training: both ranks must refuse at the first step."""
    model = adapted("dylora")
    if rank == 1:
        ak.step(model)
    before = trainable(model)
    try:
        distributed.train(model, global_batches(), lr=STEPS_LR)
    except distributed.RankMismatchError as error:
        unchanged = all(torch.equal(before[k], v) for k, v in trainable(model).items())
        return f"RankMismatchError unchanged={unchanged}: {error}"
    return "trained"


def _mosa_settings() -> dict[str, str]:
    """MoSA under the DDP settings :func:`distributed.wrap` does not choose: each must fail loudly."""
    outcomes = {}
    for label, options in (("static_graph", {"static_graph": True, "find_unused_parameters": False}),
                           ("no_unused_search", {"find_unused_parameters": False})):
        try:
            distributed.train(adapted("mosa"), global_batches(), lr=STEPS_LR, loss_fn=two_pass_loss, ddp_options=options)
            outcomes[label] = "trained"
        except ak.AdapterError as error:
            outcomes[label] = str(error)
    return outcomes


def _on_main(rank: int, out: Path) -> dict[str, Any]:
    model = adapted("lora")
    written = distributed.on_main(ak.save, model, out / "saved", "a")
    result: dict[str, Any] = {"returned": None if written is None else str(written)}

    def fail() -> None:
        raise ak.ConfigError("disk full")

    try:
        distributed.on_main(fail)
        result["error"] = None
    except ak.AdapterError as error:
        result["error"] = f"{type(error).__name__}: {error}"
    return result


def ranking_run() -> Run:
    """The ranking adapter's pairwise loss compares rows of one batch with each other, so its
    shards' losses are not the global loss; DDP must still keep the ranks identical."""
    torch.manual_seed(0)
    model = Encoders().requires_grad_(False)
    ak.attach(model, RankingAdapterConfig(width=16, heads=2, fusion_layers=1, encoder_layers=1, prompt_tokens=4,
                                          relation_tokens=3, dropout=0.0), "r")
    g = torch.Generator().manual_seed(3)
    batches = [{"image": torch.randn(6, 7, 12, generator=g), "y": torch.randn(6, generator=g)} for _ in range(3)]
    text = torch.randn(5, 10, generator=torch.Generator().manual_seed(4))

    def loss(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return ranking_loss(ranking_layer(m, "r")(batch["image"], text, pairs=True), batch["y"]).total

    before = trainable(model)
    losses = distributed.train(model, batches, lr=STEPS_LR, loss_fn=loss)
    after = trainable(model)
    moved = float(sum((after[k] - before[k]).abs().sum() for k in after))
    return Run(after, [], [*losses, moved])


def worker(rank: int, world: int, init: str, out_dir: str) -> None:
    """One rank: every case under DDP, the refusals, rank-0-only saving, FSDP2, the ranking adapter."""
    torch.set_num_threads(1)
    out = Path(out_dir)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    report: dict[str, Any] = {"rank": rank, "errors": {}}
    jobs: list[tuple[str, Callable[[], Any]]] = [(f"ddp_{case}", lambda case=case: _ddp(case)) for case in ATTACH]
    jobs += [(f"fsdp_{case}", lambda case=case: _fsdp(case)) for case in FSDP_CASES]
    jobs += [(f"ddpplain_{case}", lambda case=case: _ddp_plain(case)) for case in ("mosa", "mosa_bottleneck")]
    jobs += [("ranking", ranking_run), ("desync", lambda: _desync(rank)), ("on_main", lambda: _on_main(rank, out)),
             ("mosa_settings", _mosa_settings), ("ddp_iterable", _ddp_iterable), ("unused", _unused),
             ("batch_desync", lambda: _batch_desync(rank))]
    try:
        for key, job in jobs:
            try:
                result = job()
            except Exception:  # reported to the test, which names the case
                report["errors"][key] = traceback.format_exc(limit=-4)
                continue
            if isinstance(result, Run):
                _write(out, f"{key}_rank{rank}", result)
            else:
                report[key] = result
    finally:
        (out / f"report_rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()


def cuda_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    """One rank of an NCCL group (one GPU each): the draw and batch checks, on_main, and
    :func:`distributed.train` of DyLoRA on the GPU; writes ``cuda_rank<r>.json``."""
    out = Path(out_dir)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    report: dict[str, Any] = {}
    try:
        model = adapted("dylora").cuda()
        ak.step(model)
        distributed.check_draws(model)
        batches = [{k: v.cuda() for k, v in batch.items()} for batch in global_batches()]
        distributed.check_draws(model, distributed.shard_batch(batches[0], rank, world))
        report["on_main"] = distributed.on_main(lambda: "done")
        report["device"] = str(distributed.collective_device())
        model = adapted("dylora").cuda()
        report["losses"] = distributed.train(model, batches, lr=STEPS_LR)
        distributed.check_in_sync(model)
    except Exception:
        report["error"] = traceback.format_exc()
    finally:
        (out / f"cuda_rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()


def returns_rank() -> int:
    """A :func:`distributed.launch` target: this process's rank, from its environment."""
    return int(os.environ["RANK"])


def waits(flag: str) -> None:
    """A :func:`distributed.launch` target that writes its pid to ``flag``, then waits to be stopped."""
    import time

    Path(flag).write_text(str(os.getpid()))
    time.sleep(120)


def spawn(out: Path, world: int = 2, timeout: float = 240.0, target: Callable[..., None] = worker) -> None:
    """Run ``target(rank, world, init, out)`` (default :func:`worker`) on ``world`` ranks; kill
    them and fail after ``timeout`` seconds. The ranks get OMP_NUM_THREADS=1 unless it is set;
    this process's environment is left as it was."""
    import time

    import torch.multiprocessing as mp

    init = f"file://{out / 'rendezvous'}"
    had = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:  # spawned children copy the environment when they start
        context = mp.start_processes(target, args=(world, init, str(out)), nprocs=world, join=False, start_method="spawn")
    finally:
        if had is None:
            del os.environ["OMP_NUM_THREADS"]
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"the {world} ranks did not finish within {timeout:.0f} s")
