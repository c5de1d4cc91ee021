#!/usr/bin/env python
"""LoRA benchmark: adapterkit side by side with the real ``peft`` package, in the same run.

    .venv/bin/python bench/lora_bench.py            # full run (~5-10 min on 2 CPU cores)
    .venv/bin/python bench/lora_bench.py --quick    # smoke run (small stack, few repeats)

Two model settings:

* ``minilm``: all-MiniLM-L6-v2 (BertModel), LoRA r=8, alpha=16 on ``query``/``value``;
  batch of 32 random-token sentences of 32 tokens.
* ``stack``: ``nn.Sequential`` of 4096x4096 ``nn.Linear`` (fp32, no bias), LoRA r=32, alpha=64
  on every layer, input 8x4096; plus a bf16 copy for fuse/unfuse/switch.

Metrics (medians after warm-up, ``time.perf_counter``, libraries alternated round by round):
attach, train step (forward+backward+AdamW), peak RSS while training (each library in its own
fresh subprocess), fuse, unfuse, switch (fused a -> fused b), adapter load (cold and warm),
inference forward unfused vs fused.

Sanity checks (asserts): adapterkit and peft hold the very same A/B weights (adapterkit loads
the directories peft saved) and their unfused, fused and switched outputs agree; after
``ak.unfuse`` the base weights are bit-identical to the originals.

Writes ``bench/results/lora_bench.json`` and ``bench/results/lora_bench.md`` (``--quick``:
``lora_bench.quick.*``, not meant to be committed).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _timing import CpuWatch, PeakRSS, Step, hardware, now_iso, rounds, rss_bytes, summary, wait_until_quiet  # noqa: E402

AK = "adapterkit"
PEFT = "peft"
LIBS = (AK, PEFT)
RESULT_TAG = "__LORA_BENCH_RESULT__"
QUIET = 0.15  # other processes may keep at most this many cores busy during a timing section


def quiet_warnings() -> None:
    # peft warns that adapter name "a" is a substring of the "lora_" prefix (harmless here: the
    # benchmark asserts that loaded weights are identical) and about other benign things.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


# --------------------------------------------------------------------------------------------
# parameters


@dataclasses.dataclass
class Params:
    quick: bool = False
    seed: int = 0
    # MiniLM
    mini_batch: int = 32
    mini_seq: int = 32
    mini_r: int = 8
    mini_alpha: float = 16.0
    # Linear stack
    stack_layers: int = 4
    stack_width: int = 4096
    stack_batch: int = 8
    stack_r: int = 32
    stack_alpha: float = 64.0
    bf16: bool = True
    rss: bool = True
    # repeats: (timed repeats, warm-up rounds)
    attach: tuple[int, int] = (7, 1)
    train: tuple[int, int] = (10, 2)
    rss_runs: int = 2
    rss_train_steps: int = 5
    fuse_mini: tuple[int, int] = (30, 2)
    switch_mini: tuple[int, int] = (30, 2)
    fuse_stack: tuple[int, int] = (15, 1)
    switch_stack: tuple[int, int] = (16, 2)
    fuse_bf16: tuple[int, int] = (7, 1)
    switch_bf16: tuple[int, int] = (8, 2)
    infer: tuple[int, int] = (20, 3)
    load_warm: tuple[int, int] = (10, 1)
    load_cold: int = 3

    @classmethod
    def quick_params(cls) -> "Params":
        return cls(
            quick=True, stack_layers=2, stack_width=1024, attach=(3, 1), train=(3, 1), rss_runs=1,
            rss_train_steps=2, fuse_mini=(5, 1), switch_mini=(6, 1), fuse_stack=(5, 1), switch_stack=(6, 1),
            fuse_bf16=(3, 1), switch_bf16=(4, 1), infer=(5, 1), load_warm=(3, 1), load_cold=2,
        )


# --------------------------------------------------------------------------------------------
# models, inputs, configs


def build_base(setting: str, p: Params) -> nn.Module:
    if setting == "minilm":
        import transformers
        from transformers import AutoModel

        from adapterkit.models import minilm_path

        transformers.logging.set_verbosity_error()  # no load report / progress bar in the output
        transformers.logging.disable_progress_bar()
        return AutoModel.from_pretrained(str(minilm_path()), add_pooling_layer=False).eval()
    torch.manual_seed(p.seed)
    layers = [nn.Linear(p.stack_width, p.stack_width, bias=False) for _ in range(p.stack_layers)]
    return nn.Sequential(*layers).eval()


def make_input(setting: str, p: Params, base: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(p.seed + 1)
    if setting == "minilm":
        vocab = base.config.vocab_size
        ids = torch.randint(1000, vocab, (p.mini_batch, p.mini_seq), generator=g)
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"x": torch.randn(p.stack_batch, p.stack_width, generator=g)}


def forward(model: nn.Module, setting: str, inp: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if setting == "minilm":
        return model(**inp).last_hidden_state
    return model(inp["x"].to(dtype))


def targets(setting: str, p: Params) -> list[str]:
    if setting == "minilm":
        return ["query", "value"]
    return [str(i) for i in range(p.stack_layers)]


def ak_config(setting: str, p: Params, random_b: bool):
    import adapterkit as ak

    r, alpha = (p.mini_r, p.mini_alpha) if setting == "minilm" else (p.stack_r, p.stack_alpha)
    return ak.LoRAConfig(r=r, alpha=alpha, target_modules=targets(setting, p), init="random" if random_b else "default")


def peft_config(setting: str, p: Params, random_b: bool):
    from peft import LoraConfig

    r, alpha = (p.mini_r, p.mini_alpha) if setting == "minilm" else (p.stack_r, p.stack_alpha)
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets(setting, p),
        init_lora_weights=False if random_b else True,
    )


def peft_attach(model: nn.Module, setting: str, p: Params, random_b: bool, name: str = "a"):
    from peft import get_peft_model

    return get_peft_model(model, peft_config(setting, p, random_b), adapter_name=name)


def attach(lib: str, model: nn.Module, setting: str, p: Params, random_b: bool, name: str = "a") -> nn.Module:
    if lib == AK:
        import adapterkit as ak

        return ak.attach(model, ak_config(setting, p, random_b), name)
    return peft_attach(model, setting, p, random_b, name)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [q for q in model.parameters() if q.requires_grad]


def make_train_step(model: nn.Module, setting: str, inp: dict[str, torch.Tensor]) -> Callable[[], None]:
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = forward(model, setting, inp).float().pow(2).mean()
        loss.backward()
        opt.step()

    return step


def random_b_for_train(setting: str) -> bool:
    return setting != "minilm"  # MiniLM: default init (B = 0) as in real fine-tuning; stack: random B


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base (non-adapter) weights of a plain, adapterkit or peft model, by the plain model's names."""
    out = {}
    for name, param in model.named_parameters():
        if ".adapters." in name or "lora_" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out[name] = param.detach()
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------
# peak RSS: one fresh subprocess per library


def rss_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs inside a fresh interpreter: only one library is ever imported."""
    quiet_warnings()
    p = Params(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["params"].items()})
    setting, lib, mode = spec["setting"], spec["lib"], spec["mode"]
    if lib == AK:
        import adapterkit  # noqa: F401
    else:
        import peft  # noqa: F401
    # Touch torch's optimizer/autograd machinery first: its lazy imports (e.g. torch._dynamo on
    # the first AdamW) add ~70 MB of RSS, which `import peft` happens to pay up front but
    # `import adapterkit` does not; without this the first library would be charged for it.
    warm = nn.Parameter(torch.zeros(4))
    warm_opt = torch.optim.AdamW([warm])
    (nn.Linear(4, 4)(warm) * warm).sum().backward()
    warm_opt.step()
    del warm, warm_opt
    torch.manual_seed(p.seed)
    base = build_base(setting, p)
    inp = make_input(setting, p, base)
    out: dict[str, Any] = {"setting": setting, "lib": lib, "mode": mode}
    if mode == "train":
        gc.collect()
        baseline = rss_bytes()
        with PeakRSS() as peak:
            model = attach(lib, base, setting, p, random_b_for_train(setting))
            model.train()
            step = make_train_step(model, setting, inp)
            for _ in range(p.rss_train_steps):
                step()
        gc.collect()
        out.update(baseline=baseline, peak=peak.peak, held=rss_bytes() - baseline, delta=peak.peak - baseline)
    elif mode == "fuse":
        model = attach(lib, base, setting, p, True, "a")
        if lib == AK:
            import adapterkit as ak

            ak.attach(model, ak_config(setting, p, True), "b")
            ops = [lambda: ak.fuse(model, ["a"]), lambda: ak.switch(model, "b"), lambda: ak.switch(model, "a")]
        else:
            model.add_adapter("b", peft_config(setting, p, True))

            def peft_switch(name: str) -> None:
                model.unmerge_adapter()
                model.set_adapter(name)
                model.merge_adapter()

            ops = [lambda: model.merge_adapter(["a"]), lambda: peft_switch("b"), lambda: peft_switch("a")]
        gc.collect()
        baseline = rss_bytes()
        with torch.no_grad(), PeakRSS() as peak:
            for op in ops:
                op()
        gc.collect()
        out.update(baseline=baseline, peak=peak.peak, held=rss_bytes() - baseline, delta=peak.peak - baseline)
    else:
        raise ValueError(mode)
    return out


def run_rss(setting: str, lib: str, mode: str, p: Params) -> dict[str, Any]:
    spec = {"setting": setting, "lib": lib, "mode": mode, "params": dataclasses.asdict(p)}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--_rss-worker", json.dumps(spec)],
        capture_output=True, text=True, env=os.environ.copy(), timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"RSS worker {setting}/{lib}/{mode} failed:\n{proc.stderr[-4000:]}")
    line = next(l for l in reversed(proc.stdout.splitlines()) if l.startswith(RESULT_TAG))
    return json.loads(line[len(RESULT_TAG):])


def bench_rss(setting: str, mode: str, p: Params, runs: int) -> dict[str, Any]:
    raw: dict[str, list[dict[str, Any]]] = {lib: [] for lib in LIBS}
    for i in range(runs):
        for lib in LIBS if i % 2 == 0 else LIBS[::-1]:
            raw[lib].append(run_rss(setting, lib, mode, p))
    metric = {"unit": "bytes", "runs": runs}
    for lib in LIBS:
        metric[lib] = summary([r["delta"] for r in raw[lib]])
        metric[lib]["held_after"] = summary([r["held"] for r in raw[lib]])["median"]
        metric[lib]["baseline_rss"] = [r["baseline"] for r in raw[lib]]
        metric[lib]["peak_rss"] = [r["peak"] for r in raw[lib]]
    return metric


# --------------------------------------------------------------------------------------------
# timed measurements in this process


def metric(samples: dict[str, dict[str, list[float]]], step: str, libs=LIBS, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"unit": "s", **extra}
    for lib in libs:
        out[lib] = summary(samples[lib][step])
    return out


def bench_attach(setting: str, base: nn.Module, p: Params, random_b: bool) -> dict[str, Any]:
    import adapterkit as ak

    holder: dict[str, Any] = {}
    cfg_ak, cfg_peft = ak_config(setting, p, random_b), peft_config(setting, p, random_b)

    def fresh() -> None:
        holder.clear()
        gc.collect()
        holder["m"] = copy.deepcopy(base)

    def peft_run() -> None:
        from peft import get_peft_model

        holder["pm"] = get_peft_model(holder["m"], cfg_peft, adapter_name="a")

    seqs = {
        AK: [Step(None, fresh), Step("attach", lambda: ak.attach(holder["m"], cfg_ak, "a"))],
        PEFT: [Step(None, fresh), Step("attach", peft_run)],
    }
    n, w = p.attach
    samples = rounds(seqs, n, w)
    holder.clear()
    return metric(samples, "attach", repeats=n, warmup=w, note="fresh deepcopy of the base model per repeat (copy not timed)")


def bench_train(setting: str, base: nn.Module, inp: dict[str, torch.Tensor], p: Params, sanity: dict[str, Any]) -> dict[str, Any]:
    random_b = random_b_for_train(setting)
    models = {lib: attach(lib, copy.deepcopy(base), setting, p, random_b) for lib in LIBS}
    counts = {lib: sum(q.numel() for q in trainable(m)) for lib, m in models.items()}
    assert counts[AK] == counts[PEFT], f"trainable parameter counts differ: {counts}"
    sanity["trainable_params"] = counts[AK]
    steps = {}
    for lib, m in models.items():
        m.train()
        steps[lib] = make_train_step(m, setting, inp)
    n, w = p.train
    samples = rounds({lib: [Step("train_step", steps[lib])] for lib in LIBS}, n, w)
    return metric(samples, "train_step", repeats=n, warmup=w, note="zero_grad + forward + loss + backward + AdamW.step")


@dataclasses.dataclass
class Pair:
    """An adapterkit model and a peft model holding the very same adapters "a" and "b"."""

    akm: nn.Module
    pm: Any
    original: dict[str, torch.Tensor]
    peft_dirs: dict[str, Path]


def make_pair(setting: str, base: nn.Module, p: Params, dtype: torch.dtype, tmp: Path) -> Pair:
    """peft creates "a" and "b" with random non-zero B and saves them; adapterkit loads those
    PEFT directories, so both libraries fuse identical A/B values."""
    import adapterkit as ak
    from adapterkit.state import get_state

    plain = copy.deepcopy(base).to(dtype)
    original = {k: v.clone() for k, v in base_weights(plain).items()}
    pm = peft_attach(copy.deepcopy(plain), setting, p, True, "a")
    pm.add_adapter("b", peft_config(setting, p, True))
    pm.save_pretrained(str(tmp), selected_adapters=["a", "b"])
    dirs = {n: tmp / n for n in ("a", "b")}
    akm = plain
    for n in ("a", "b"):
        ak.load(akm, dirs[n], n)
    ak.activate(akm, "a")
    pm.set_adapter("a")
    akm.eval()
    pm.eval()
    for n in ("a", "b"):
        for path, layer in get_state(akm).layers(n):
            module = pm.base_model.model.get_submodule(path)
            assert torch.equal(layer.lora_A, module.lora_A[n].weight), f"lora_A differs at {path}"
            assert torch.equal(layer.lora_B, module.lora_B[n].weight), f"lora_B differs at {path}"
            assert layer.scaling == module.scaling[n], f"scaling differs at {path}"
    return Pair(akm, pm, original, dirs)


def check_pair(setting: str, pair: Pair, plain: nn.Module, inp: dict[str, torch.Tensor], dtype: torch.dtype, tol: float) -> dict[str, Any]:
    """Both libraries' outputs agree unfused, fused with "a" and after switching to "b"; ak.unfuse is bit-exact."""
    import adapterkit as ak

    akm, pm = pair.akm, pair.pm
    out: dict[str, Any] = {"tolerance_rel_max_abs": tol}
    with torch.no_grad():
        y_base = forward(plain, setting, inp, dtype)
        y_ak, y_pf = forward(akm, setting, inp, dtype), forward(pm, setting, inp, dtype)
        out["unfused_rel_err"] = rel_err(y_ak, y_pf)
        out["adapter_effect_rel"] = rel_err(y_ak, y_base)
        assert out["adapter_effect_rel"] > 1e-3, "adapter 'a' does not change the output: fusing would do no work"
        ak.fuse(akm, ["a"])
        pm.merge_adapter(["a"])
        f_ak, f_pf = forward(akm, setting, inp, dtype), forward(pm, setting, inp, dtype)
        out["fused_a_rel_err"] = rel_err(f_ak, f_pf)
        out["fused_vs_unfused_rel_err_adapterkit"] = rel_err(f_ak, y_ak)
        ak.switch(akm, "b")
        pm.unmerge_adapter()
        pm.set_adapter("b")
        pm.merge_adapter()
        s_ak, s_pf = forward(akm, setting, inp, dtype), forward(pm, setting, inp, dtype)
        out["switched_b_rel_err"] = rel_err(s_ak, s_pf)
        out["b_differs_from_a_rel"] = rel_err(s_ak, f_ak)
        ak.unfuse(akm)
        pm.unmerge_adapter()
        pm.set_adapter("a")
        ak.activate(akm, "a")
    for key in ("unfused_rel_err", "fused_a_rel_err", "switched_b_rel_err", "fused_vs_unfused_rel_err_adapterkit"):
        assert out[key] < tol, f"{setting}/{dtype}: {key}={out[key]:.3g} exceeds {tol}"
    assert out["b_differs_from_a_rel"] > 1e-3
    assert_bit_identical(pair)
    out["adapterkit_unfuse_bit_identical"] = True
    return out


def assert_bit_identical(pair: Pair) -> None:
    now = base_weights(pair.akm)
    assert now.keys() == pair.original.keys()
    for k, v in pair.original.items():
        assert torch.equal(now[k], v), f"ak.unfuse did not restore {k} bit-for-bit"


def peft_drift(pair: Pair) -> dict[str, Any]:
    """How far peft's base weights moved from the originals after all merge/unmerge cycles."""
    now = base_weights(pair.pm)
    max_abs, changed, total = 0.0, 0, 0
    for k, v in pair.original.items():
        diff = (now[k].float() - v.float()).abs()
        max_abs = max(max_abs, float(diff.max()))
        changed += int((diff != 0).sum())
        total += diff.numel()
    return {"max_abs": max_abs, "changed_fraction": changed / total}


def peft_switch_steps(pm: Any, to: Callable[[], str]) -> list[Step]:
    holder = {}

    def unmerge() -> None:
        holder["n"] = to()
        pm.unmerge_adapter()

    return [
        Step("switch.unmerge", unmerge),
        Step("switch.set_adapter", lambda: pm.set_adapter(holder["n"])),
        Step("switch.merge", pm.merge_adapter),
    ]


def alternator() -> Callable[[], str]:
    state = {"cur": "a"}

    def nxt() -> str:
        state["cur"] = "b" if state["cur"] == "a" else "a"
        return state["cur"]

    return nxt


def bench_fusion(setting: str, base: nn.Module, inp: dict[str, torch.Tensor], p: Params, dtype: torch.dtype,
                 fuse_reps: tuple[int, int], switch_reps: tuple[int, int], tol: float, infer: bool,
                 tmp: Path) -> tuple[dict[str, Any], dict[str, Any], Pair]:
    import adapterkit as ak

    pair = make_pair(setting, base, p, dtype, tmp)
    plain = copy.deepcopy(base).to(dtype).eval()
    sanity = check_pair(setting, pair, plain, inp, dtype, tol)
    akm, pm = pair.akm, pair.pm
    res: dict[str, Any] = {}

    # fuse and unfuse, from an unfused state
    n, w = fuse_reps
    samples = rounds({
        AK: [Step("fuse", lambda: ak.fuse(akm, ["a"])), Step("unfuse", lambda: ak.unfuse(akm))],
        PEFT: [Step("fuse", lambda: pm.merge_adapter(["a"])), Step("unfuse", pm.unmerge_adapter)],
    }, n, w)
    res["fuse"] = metric(samples, "fuse", repeats=n, warmup=w, calls={AK: "ak.fuse(model, ['a'])", PEFT: "merge_adapter(['a'])"})
    res["unfuse"] = metric(samples, "unfuse", repeats=n, warmup=w, calls={AK: "ak.unfuse(model)", PEFT: "unmerge_adapter()"})
    assert_bit_identical(pair)

    # switch: fused a -> fused b -> fused a ..., each call does real work
    n, w = switch_reps
    with torch.no_grad():
        ak.fuse(akm, ["a"])
        pm.merge_adapter(["a"])
    ak_to, peft_to = alternator(), alternator()
    samples = rounds({
        AK: [Step("switch", lambda: ak.switch(akm, ak_to()))],
        PEFT: peft_switch_steps(pm, peft_to),
    }, n, w)
    parts = ("switch.unmerge", "switch.set_adapter", "switch.merge")
    samples[PEFT]["switch"] = [sum(t) for t in zip(*(samples[PEFT][k] for k in parts))]
    sw = metric(samples, "switch", repeats=n, warmup=w, calls={
        AK: "ak.switch(model, name)", PEFT: "unmerge_adapter(); set_adapter(name); merge_adapter()"})
    sw["peft_breakdown"] = {k: summary(samples[PEFT][k]) for k in parts}
    res["switch"] = sw
    with torch.no_grad():
        ak.unfuse(akm)
        pm.unmerge_adapter()
        pm.set_adapter("a")
        ak.activate(akm, "a")
    assert_bit_identical(pair)

    # adapterkit's switch against its own naive path (unfuse + fuse), for reference
    ak_to2 = alternator()
    with torch.no_grad():
        ak.fuse(akm, ["a"])
    naive = rounds({AK: [Step("unfuse+fuse", lambda: (ak.unfuse(akm), ak.fuse(akm, [ak_to2()])))]}, n, w)
    res["adapterkit_unfuse_then_fuse"] = {"unit": "s", "repeats": n, "warmup": w, AK: summary(naive[AK]["unfuse+fuse"])}
    with torch.no_grad():
        ak.unfuse(akm)
        ak.activate(akm, "a")
    assert_bit_identical(pair)

    if infer:
        res.update(bench_inference(setting, pair, plain, inp, p, dtype))
        assert_bit_identical(pair)
    sanity["peft_base_weight_drift_after_all_cycles"] = peft_drift(pair)
    sanity["adapterkit_bit_identical_after_all_cycles"] = True
    return res, sanity, pair


def bench_inference(setting: str, pair: Pair, plain: nn.Module, inp: dict[str, torch.Tensor], p: Params, dtype: torch.dtype) -> dict[str, Any]:
    import adapterkit as ak

    akm, pm = pair.akm, pair.pm
    n, w = p.infer
    seqs = {
        AK: [Step("fwd", lambda: forward(akm, setting, inp, dtype))],
        PEFT: [Step("fwd", lambda: forward(pm, setting, inp, dtype))],
        "base": [Step("fwd", lambda: forward(plain, setting, inp, dtype))],
    }
    with torch.no_grad():
        unfused = rounds(seqs, n, w)
        ak.fuse(akm, ["a"])
        pm.merge_adapter(["a"])
        fused = rounds(seqs, n, w)
        ak.unfuse(akm)
        pm.unmerge_adapter()
    res = {
        "infer_unfused": metric(unfused, "fwd", repeats=n, warmup=w, note="torch.no_grad forward, adapter 'a' active, not fused"),
        "infer_fused": metric(fused, "fwd", repeats=n, warmup=w, note="torch.no_grad forward, adapter 'a' fused"),
    }
    res["infer_base_reference"] = {"unit": "s", "note": "plain base model without adapters",
                                   "base": summary(unfused["base"]["fwd"] + fused["base"]["fwd"])}
    ratio = {"unit": "x", "note": "median unfused / median fused"}
    for lib in LIBS:
        ratio[lib] = {"median": res["infer_unfused"][lib]["median"] / res["infer_fused"][lib]["median"]}
    res["infer_unfused_over_fused"] = ratio
    return res


def bench_load(setting: str, base: nn.Module, pair: Pair, p: Params, tmp: Path) -> dict[str, Any]:
    """Time loading adapter "a": adapterkit from its own format (base-weight fingerprint checked),
    peft from its format; cold = first load into a freshly copied model, warm = repeated loads
    into the same model."""
    import adapterkit as ak
    from adapterkit.state import get_state

    ak_dir = tmp / "ak_a"
    ak.save(pair.akm, ak_dir, "a", format="adapterkit")
    peft_dir = pair.peft_dirs["a"]
    ref = {path: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for path, layer in get_state(pair.akm).layers("a")}

    def check_ak(m: nn.Module) -> None:
        for path, layer in get_state(m).layers("a"):
            assert torch.equal(layer.lora_A, ref[path][0]) and torch.equal(layer.lora_B, ref[path][1])

    def check_peft(pm: Any) -> None:
        for path, (a, b) in ref.items():
            module = pm.base_model.model.get_submodule(path)
            assert torch.equal(module.lora_A["a"].weight, a) and torch.equal(module.lora_B["a"].weight, b)

    holder: dict[str, Any] = {}

    def fresh_ak() -> None:
        holder.pop(AK, None)
        gc.collect()
        m = copy.deepcopy(base)
        ak.attach(m, ak_config(setting, p, True), "b")
        holder[AK] = m

    def fresh_peft() -> None:
        holder.pop(PEFT, None)
        gc.collect()
        holder[PEFT] = peft_attach(copy.deepcopy(base), setting, p, True, "b")

    cold = rounds({
        AK: [Step(None, fresh_ak), Step("load", lambda: ak.load(holder[AK], ak_dir, "a")), Step(None, lambda: check_ak(holder[AK]))],
        PEFT: [Step(None, fresh_peft), Step("load", lambda: holder[PEFT].load_adapter(str(peft_dir), "a")),
               Step(None, lambda: check_peft(holder[PEFT]))],
    }, p.load_cold, 0)

    # warm: the same models again (adapterkit's weight digests are cached per tensor now)
    fresh_ak_peftdir = copy.deepcopy(base)
    ak.attach(fresh_ak_peftdir, ak_config(setting, p, True), "b")
    ak.load(fresh_ak_peftdir, peft_dir, "a")
    fresh_ak_nofp = copy.deepcopy(base)
    ak.attach(fresh_ak_nofp, ak_config(setting, p, True), "b")
    ak.load(fresh_ak_nofp, ak_dir, "a", ignore_fingerprint=True)
    n, w = p.load_warm
    warm = rounds({
        AK: [Step(None, lambda: ak.detach(holder[AK], "a")), Step("load", lambda: ak.load(holder[AK], ak_dir, "a"))],
        PEFT: [Step(None, lambda: holder[PEFT].delete_adapter("a")), Step("load", lambda: holder[PEFT].load_adapter(str(peft_dir), "a"))],
        "adapterkit_from_peft_dir": [Step(None, lambda: ak.detach(fresh_ak_peftdir, "a")),
                                     Step("load", lambda: ak.load(fresh_ak_peftdir, peft_dir, "a"))],
        "adapterkit_ignore_fingerprint": [Step(None, lambda: ak.detach(fresh_ak_nofp, "a")),
                                          Step("load", lambda: ak.load(fresh_ak_nofp, ak_dir, "a", ignore_fingerprint=True))],
    }, n, w)
    check_ak(holder[AK])
    check_ak(fresh_ak_peftdir)
    check_ak(fresh_ak_nofp)
    del fresh_ak_peftdir, fresh_ak_nofp
    check_peft(holder[PEFT])

    # warm again, but after a fuse/unfuse cycle of the other adapter "b" (untimed) before each load
    def ak_cycle() -> None:
        ak.detach(holder[AK], "a")
        ak.fuse(holder[AK], ["b"])
        ak.unfuse(holder[AK])

    def peft_cycle() -> None:
        holder[PEFT].delete_adapter("a")
        holder[PEFT].merge_adapter(["b"])
        holder[PEFT].unmerge_adapter()

    cycled = rounds({
        AK: [Step(None, ak_cycle), Step("load", lambda: ak.load(holder[AK], ak_dir, "a"))],
        PEFT: [Step(None, peft_cycle), Step("load", lambda: holder[PEFT].load_adapter(str(peft_dir), "a"))],
    }, n, w)
    check_ak(holder[AK])
    check_peft(holder[PEFT])

    # warm again, while adapter "b" is fused (e.g. a server that keeps one adapter fused)
    with torch.no_grad():
        ak.fuse(holder[AK], ["b"])
        holder[PEFT].merge_adapter(["b"])
    fused_b = rounds({
        AK: [Step(None, lambda: ak.detach(holder[AK], "a")), Step("load", lambda: ak.load(holder[AK], ak_dir, "a"))],
        PEFT: [Step(None, lambda: holder[PEFT].delete_adapter("a")),
               Step("load", lambda: holder[PEFT].load_adapter(str(peft_dir), "a"))],
    }, n, w)
    check_ak(holder[AK])
    check_peft(holder[PEFT])
    holder.clear()
    calls = {AK: "ak.load(model, <adapterkit dir>, 'a')", PEFT: "model.load_adapter(<peft dir>, 'a')"}
    return {
        "load_cold": metric(cold, "load", repeats=p.load_cold, warmup=0, calls=calls,
                            note="first load into a freshly copied base model that already has adapter 'b'; "
                                 "adapterkit hashes the targeted base weights on every verified load (fingerprint check)"),
        "load_warm": metric(warm, "load", repeats=n, warmup=w, calls=calls,
                            note="detach/delete_adapter between repeats (untimed), same model every repeat"),
        "load_after_fuse_cycle": metric(cycled, "load", repeats=n, warmup=w, calls=calls,
                                        note="like load_warm, but adapter 'b' was fused and unfused (untimed) before each load"),
        "load_while_fused": metric(fused_b, "load", repeats=n, warmup=w, calls=calls,
                                   note="like load_warm, but while adapter 'b' is fused into the base weights"),
        "load_warm_adapterkit_ignore_fingerprint": {
            "unit": "s", "repeats": n, "warmup": w, AK: summary(warm["adapterkit_ignore_fingerprint"]["load"]),
            "note": "ak.load(model, <adapterkit dir>, 'a', ignore_fingerprint=True): no base-weight hash"},
        "load_warm_adapterkit_from_peft_dir": {
            "unit": "s", "repeats": n, "warmup": w, AK: summary(warm["adapterkit_from_peft_dir"]["load"]),
            "note": "ak.load of the directory peft saved (no adapterkit fingerprint in it, so no hash check)"},
    }


# --------------------------------------------------------------------------------------------
# report


def git_info() -> dict[str, Any]:
    """The adapterkit commit measured, and whether src/ had uncommitted changes."""
    root = HERE.parent

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [l for l in git("status", "--porcelain", "--", "src").splitlines() if l.strip()]
    return {"commit": git("rev-parse", "HEAD"), "subject": git("log", "-1", "--format=%s"),
            "src_last_commit": git("log", "-1", "--format=%H", "--", "src"),
            "src_last_subject": git("log", "-1", "--format=%s", "--", "src"),
            "src_uncommitted_changes": dirty}


def versions() -> dict[str, str]:
    import peft
    import transformers

    import adapterkit

    return {"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
            "adapterkit": adapterkit.__version__, "python": sys.version.split()[0]}


ROWS = [
    ("attach", "attach (ak.attach vs get_peft_model)", "ms"),
    ("train_step", "train step (fwd+bwd+AdamW)", "ms"),
    ("rss_train", "peak RSS during attach+training, above base model", "MiB"),
    ("rss_fuse", "peak RSS during fuse a, switch b, switch a (above model+adapters)", "MiB"),
    ("rss_fuse_held", "RSS still held while fused (after the switches)", "MiB"),
    ("fuse", "fuse a (ak.fuse vs merge_adapter)", "ms"),
    ("unfuse", "unfuse (ak.unfuse vs unmerge_adapter)", "ms"),
    ("switch", "**switch fused a → fused b**", "ms"),
    ("adapterkit_unfuse_then_fuse", "adapterkit unfuse + fuse (reference for switch)", "ms"),
    ("load_cold", "adapter load, cold (fresh model)", "ms"),
    ("load_warm", "adapter load, warm", "ms"),
    ("load_after_fuse_cycle", "adapter load after a fuse/unfuse cycle of another adapter", "ms"),
    ("load_while_fused", "adapter load while another adapter is fused", "ms"),
    ("load_warm_adapterkit_ignore_fingerprint", "ak.load(..., ignore_fingerprint=True), warm", "ms"),
    ("load_warm_adapterkit_from_peft_dir", "ak.load of the peft-saved dir (holds no fingerprint), warm", "ms"),
    ("infer_unfused", "inference forward, unfused", "ms"),
    ("infer_fused", "inference forward, fused", "ms"),
    ("infer_unfused_over_fused", "inference unfused / fused", "x"),
]


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "ms":
        v = value * 1e3
        return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.1f}"
    if unit == "MiB":
        return f"{value / 2**20:.1f}"
    return f"{value:.3f}"


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    hw, ver = meta["hardware"], meta["versions"]
    lines = [
        f"# LoRA benchmark: adapterkit vs peft{' (QUICK smoke run)' if meta['params']['quick'] else ''}",
        "",
        f"- machine: {hw['cpu_model']}, {hw['usable_cores']} usable cores ({hw['logical_cores']} logical), "
        f"{hw['ram_total_gib']} GiB RAM, no GPU; torch threads: {meta['torch_threads']}",
        f"- versions: adapterkit {ver['adapterkit']}, peft {ver['peft']}, torch {ver['torch']}, "
        f"transformers {ver['transformers']}, Python {ver['python']}",
        f"- adapterkit source: HEAD {meta['adapterkit_git']['commit'][:10]}; src/ last changed in "
        f"{meta['adapterkit_git'].get('src_last_commit', '')[:10]} ({meta['adapterkit_git'].get('src_last_subject', '')})"
        + (f", with uncommitted changes in {', '.join(l.split()[-1] for l in meta['adapterkit_git']['src_uncommitted_changes'])}"
           if meta["adapterkit_git"]["src_uncommitted_changes"] else ""),
        f"- date: {meta['date']}; total run time {meta['wall_s']:.0f} s; "
        "medians over timed repeats after warm-up (repeat counts and raw samples in lora_bench.json)",
        "- ratio = peft median / adapterkit median (> 1: adapterkit faster or smaller)",
    ]
    busy = {k: v["other_processes_cores"] for k, v in meta.get("contention", {}).items() if v.get("timing_section")}
    if busy:
        worst = max(busy, key=busy.get)
        retried = sum(v.get("attempt", 1) - 1 for v in meta["contention"].values() if isinstance(v, dict))
        lines.append(f"- contention check: other processes kept at most {busy[worst]:.2f} cores busy during a timing "
                     f"section ({worst}); {retried} section re-run(s) because of contention; per-section values in "
                     "lora_bench.json" + (
                         " — **the numbers of that section are distorted**" if busy[worst] > QUIET else ""))
    sw = report["results"].get("stack_fp32", {}).get("switch")
    if sw:
        a_ms, p_ms = sw[AK]["median"] * 1e3, sw[PEFT]["median"] * 1e3
        ratio = p_ms / a_ms
        lines.append(f"- **key number** — switch fused a → fused b on the fp32 Linear stack: adapterkit {a_ms:.1f} ms, "
                     f"peft (unmerge + set_adapter + merge) {p_ms:.1f} ms: **{ratio:.1f}× faster** "
                     + (f"(project goal ≥ 4×: {'met' if ratio >= 4 else 'NOT met'})"
                        if (meta["params"]["stack_width"], meta["params"]["stack_r"]) == (4096, 32)
                        else "(the ≥ 4× goal is stated for 4096×4096 at r=32; this stack is smaller)"))
    lines.append("")
    for key, title in meta["settings"].items():
        res = report["results"].get(key)
        if not res:
            continue
        lines += [f"## {title}", "", "| metric | adapterkit median | peft median | ratio peft/adapterkit | repeats |",
                  "|---|---:|---:|---:|---:|"]
        for mkey, label, unit in ROWS:
            m = res.get(mkey)
            if m is None:
                continue
            a = m.get(AK, {}).get("median") if AK in m else None
            b = m.get(PEFT, {}).get("median") if PEFT in m else None
            ratio = f"{b / a:.2f}×" if a and b else "—"
            reps = m.get("repeats", m.get("runs", ""))
            label_u = f"{label} [{unit}]"
            lines.append(f"| {label_u} | {fmt(a, unit)} | {fmt(b, unit)} | {ratio} | {reps} |")
        if "infer_base_reference" in res:
            lines.append("")
            lines.append(f"Plain base model forward (no adapters): {fmt(res['infer_base_reference']['base']['median'], 'ms')} ms.")
        if "switch" in res and "peft_breakdown" in res["switch"]:
            bd = res["switch"]["peft_breakdown"]
            lines.append("peft switch breakdown (medians): " + ", ".join(
                f"{k.split('.', 1)[1]} {fmt(v['median'], 'ms')} ms" for k, v in bd.items()) + ".")
        lines.append("")
    lines += ["## Sanity checks (asserted)", ""]
    for key, s in report["sanity"].items():
        lines.append(f"- {key}: " + json.dumps(s, sort_keys=True))
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fast smoke run: small stack, few repeats")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 variant of the stack")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--only", choices=["minilm", "stack"], help="run one model setting only")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--no-wait", action="store_true",
                        help="start at once even if other processes keep the CPUs busy (default: wait up to 10 min)")
    parser.add_argument("--retries", type=int, default=2,
                        help="re-run a timing section (after waiting for quiet) when other processes were busy during it")
    parser.add_argument("--_rss-worker", dest="rss_worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_worker:
        print(RESULT_TAG + json.dumps(rss_worker(json.loads(args.rss_worker))), flush=True)
        return

    quiet_warnings()
    import adapterkit  # noqa: F401
    import peft  # noqa: F401

    p = Params.quick_params() if args.quick else Params()
    p.bf16 = p.bf16 and not args.no_bf16
    p.rss = p.rss and not args.no_rss
    started = time.perf_counter()
    stack_name = f"{p.stack_layers}× Linear {p.stack_width}×{p.stack_width}"
    settings = {
        "minilm": f"MiniLM-L6 (BertModel), LoRA r={p.mini_r} alpha={p.mini_alpha:g} on query/value, batch {p.mini_batch}×{p.mini_seq} tokens, fp32",
        "stack_fp32": f"{stack_name} (fp32, no bias), LoRA r={p.stack_r} alpha={p.stack_alpha:g} on every layer, input {p.stack_batch}×{p.stack_width}",
        "stack_bf16": f"{stack_name} in bf16 (LoRA factors fp32 in both libraries), fuse/unfuse/switch only",
    }
    report: dict[str, Any] = {
        "meta": {
            "date": now_iso(), "hardware": hardware(), "versions": versions(), "adapterkit_git": git_info(),
            "torch_threads": torch.get_num_threads(),
            "env": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS")},
            "params": dataclasses.asdict(p), "settings": settings,
            "method": "time.perf_counter around each call with the GC disabled; libraries alternated round by round; "
                      "warm-up rounds dropped; medians reported; peak RSS measured in a fresh subprocess per library "
                      "(psutil sampling every 2 ms + ru_maxrss) minus the RSS right after the base model is built",
        },
        "results": {},
        "sanity": {},
    }

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    contention: dict[str, Any] = {}
    report["meta"]["contention"] = contention
    if not args.no_wait:
        contention["start"] = wait_until_quiet(QUIET, log=log)

    def measure(name: str, fn: Callable[[], Any], retry: bool = True) -> Any:
        """Run one section; if other processes were busy meanwhile (the timings would be
        distorted), wait for a quiet machine and run it again (``--retries`` times at most)."""
        for attempt in range(1 + (args.retries if retry else 0)):
            log(name + (f" (retry {attempt})" if attempt else ""))
            watch = CpuWatch()
            out = fn()
            stats = watch.stop()
            stats["attempt"] = attempt + 1
            stats["timing_section"] = retry
            contention[name] = stats
            busy = stats["other_processes_cores"]
            if busy <= QUIET or not retry:
                break
            log(f"  other processes kept {busy:.2f} cores busy during {name}")
            if attempt < args.retries:
                wait_until_quiet(QUIET, log=log)
        return out

    with tempfile.TemporaryDirectory(prefix="lora_bench_") as tmpdir:
        tmp = Path(tmpdir)
        for setting in ("minilm", "stack"):
            if args.only and args.only != setting:
                continue
            key = "minilm" if setting == "minilm" else "stack_fp32"
            base = build_base(setting, p)
            inp = make_input(setting, p, base)
            res: dict[str, Any] = {}
            sanity: dict[str, Any] = {}
            res["attach"] = measure(f"{key}: attach", lambda: bench_attach(setting, base, p, random_b_for_train(setting)))
            res["train_step"] = measure(f"{key}: train step", lambda: bench_train(setting, base, inp, p, sanity))
            gc.collect()
            fusion_reps = (p.fuse_mini, p.switch_mini) if setting == "minilm" else (p.fuse_stack, p.switch_stack)
            fres, fsan, pair = measure(f"{key}: fuse / unfuse / switch / inference", lambda: bench_fusion(
                setting, base, inp, p, torch.float32, *fusion_reps, tol=1e-4, infer=True, tmp=tmp / f"{key}_peft"))
            res.update(fres)
            sanity.update(fsan)
            res.update(measure(f"{key}: adapter load", lambda: bench_load(setting, base, pair, p, tmp / f"{key}_load")))
            del pair
            gc.collect()
            if p.rss:  # memory, not time: no retries
                res["rss_train"] = measure(f"{key}: peak RSS subprocesses (train)",
                                           lambda: bench_rss(setting, "train", p, p.rss_runs), retry=False)
                if setting == "stack":
                    fuse_rss = measure(f"{key}: peak RSS subprocesses (fuse/switch)",
                                       lambda: bench_rss(setting, "fuse", p, p.rss_runs), retry=False)
                    res["rss_fuse"] = fuse_rss
                    held = {"unit": "bytes", "runs": fuse_rss["runs"]}
                    for lib in LIBS:
                        held[lib] = {"median": fuse_rss[lib]["held_after"]}
                    res["rss_fuse_held"] = held
            report["results"][key] = res
            report["sanity"][key] = sanity
            if setting == "stack" and p.bf16:
                bres, bsan, pair = measure("stack_bf16: fuse / unfuse / switch", lambda: bench_fusion(
                    setting, base, inp, p, torch.bfloat16, p.fuse_bf16, p.switch_bf16, tol=3e-2, infer=False,
                    tmp=tmp / "stack_bf16_peft"))
                del pair
                report["results"]["stack_bf16"] = bres
                report["sanity"]["stack_bf16"] = bsan
            del base
            gc.collect()

    report["meta"]["wall_s"] = time.perf_counter() - started
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "lora_bench.quick" if p.quick else "lora_bench"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    md = markdown(report)
    (args.out_dir / f"{stem}.md").write_text(md, encoding="utf-8")
    print(md)
    log(f"wrote {args.out_dir / (stem + '.json')} and {stem}.md")


if __name__ == "__main__":
    main()
