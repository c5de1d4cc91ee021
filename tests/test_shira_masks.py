"""SHiRA masks: budgets, the five rules, callables, per-layer/per-adapter seeds, non-overlap, calibration.

Every rule is checked against a brute-force oracle on continuous random data (no ties).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.methods.shira import masks
from adapterkit.core.state import get_state
from conftest import assert_unchanged, snapshot

SHAPES = {"0": (64, 48), "2": (64, 64), "4": (48, 64)}  # out × in of the model below


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 48))


def batches(n: int = 3, seed: int = 7) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 48, generator=g) for _ in range(n)]


def square_loss(model, x):
    return model(x).pow(2).mean()


def layers(model, name: str) -> dict:
    return dict(get_state(model).layers(name))


def indices(model, name: str) -> dict[str, torch.Tensor]:
    return {path: layer.indices.clone() for path, layer in layers(model, name).items()}


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Brute force: sorted flat positions of the k largest scores."""
    return torch.argsort(scores.flatten(), descending=True)[:k].sort().values


def dense(idx: torch.Tensor, shape) -> torch.Tensor:
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    mask[idx] = True
    return mask.view(shape)


# -- budgets and exact counts ---------------------------------------------------------------

BUDGETS = {
    "density": (dict(density=0.05), lambda m, n: round(0.05 * m * n)),
    "r": (dict(r=2), lambda m, n: 2 * (m + n)),
    "full": (dict(density=1.0), lambda m, n: m * n),
}


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("rule", ["rand", "wm", "grad", "snip"])
def test_mask_has_exactly_k_sorted_unique_entries(rule, budget):
    """rand/wm/grad/snip train exactly K = round(p·m·n) or r(m+n) entries per layer, as sorted flat int64."""
    extra, k_of = BUDGETS[budget]
    model = net()
    options = dict(calibration=batches(), loss_fn=square_loss) if rule in ("grad", "snip") else {}
    ak.attach(model, ak.ShiraConfig(mask=rule, target_modules=list(SHAPES), **extra), "a", **options)
    for path, layer in layers(model, "a").items():
        k = k_of(*SHAPES[path])
        assert layer.nnz == k == layer.indices.numel() == layer.values.numel()
        assert layer.indices.dtype == torch.int64 and layer.values.dtype == torch.float32
        assert bool((layer.indices[1:] > layer.indices[:-1]).all())
        assert 0 <= int(layer.indices[0]) and int(layer.indices[-1]) < SHAPES[path][0] * SHAPES[path][1]
        assert layer.values.requires_grad and not layer.values.detach().any()  # starts as the base model
    assert ak.trainable_parameters(model)[0] == sum(k_of(*s) for s in SHAPES.values())


def test_wm_picks_the_k_largest_magnitudes():
    """wm = brute-force top-K of |W| on continuous random weights."""
    model = net()
    weights = {p: model.get_submodule(p).weight.detach().clone() for p in SHAPES}
    ak.attach(model, ak.ShiraConfig(density=0.03, mask="wm", target_modules=list(SHAPES)), "a")
    for path, idx in indices(model, "a").items():
        expected = top(weights[path].abs(), round(0.03 * weights[path].numel()))
        assert torch.equal(idx, expected), path


def known_gradient_setup(seed: int = 3):
    """One linear layer fed the identity: the loss Σ y⊙C has ∂L/∂W = Cᵀ for each batch's C."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(40, 24))
    cs = [torch.randn(40, 24), torch.randn(40, 24)]
    calibration = [(torch.eye(40), c) for c in cs]
    return model, calibration, [c.t() for c in cs]


def loss_with_known_gradient(model, batch):
    x, c = batch
    return (model(x) * c).sum()


ORACLES = {
    ("grad", "sum"): lambda w, g1, g2: (g1 + g2).abs(),
    ("grad", "abs"): lambda w, g1, g2: g1.abs() + g2.abs(),
    ("snip", "sum"): lambda w, g1, g2: (w * (g1 + g2)).abs(),
    ("snip", "abs"): lambda w, g1, g2: (w * (g1.abs() + g2.abs())).abs(),
}


@pytest.mark.parametrize("rule, accumulate", ORACLES)
def test_grad_and_snip_rank_a_known_gradient(rule, accumulate):
    """grad = top-K |G|, snip = top-K |W⊙G|, with G summed over batches ("sum") or Σ|G_b| ("abs")."""
    model, calibration, (g1, g2) = known_gradient_setup()
    weight = model[0].weight.detach().clone()
    config = ak.ShiraConfig(density=0.05, mask=rule, grad_accumulate=accumulate, target_modules=["0"])
    ak.attach(model, config, "a", calibration=calibration, loss_fn=loss_with_known_gradient)
    expected = top(ORACLES[rule, accumulate](weight, g1, g2), round(0.05 * weight.numel()))
    assert torch.equal(model[0].layer("a").indices, expected)
    others = [top(f(weight, g1, g2), expected.numel()) for key, f in ORACLES.items() if key != (rule, accumulate)]
    assert all(not torch.equal(expected, o) for o in others)  # the four rules really differ here


def test_grad_mask_recovers_a_teachers_sparse_support():
    """Spec §9.7: teacher W* = W0 + ΔW* (2% support, 128×128), X ~ N(0, I), MSE; Grad recall > 0.8 at 4k samples."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(128, 128, generator=g) / 128**0.5)
    k = round(0.02 * 128 * 128)
    support = torch.randperm(128 * 128, generator=g)[:k].sort().values
    teacher = model[0].weight.detach().clone()
    teacher.view(-1)[support] += torch.randn(k, generator=g)
    xs = [torch.randn(512, 128, generator=g) for _ in range(8)]
    calibration = [(x, x @ teacher.t()) for x in xs]
    mse = lambda m, batch: nn.functional.mse_loss(m(batch[0]), batch[1])  # noqa: E731
    ak.attach(model, ak.ShiraConfig(density=0.02, mask="grad", target_modules=["0"]), "grad",
              calibration=calibration, loss_fn=mse)
    ak.attach(model, ak.ShiraConfig(density=0.02, mask="wm", target_modules=["0"]), "wm")
    recall = {name: torch.isin(model[0].layer(name).indices, support).float().mean().item() for name in ("grad", "wm")}
    assert recall["grad"] > 0.8
    assert recall["wm"] < 0.2  # magnitude of W0 knows nothing about the task (chance ≈ 0.02)


# -- struct ---------------------------------------------------------------------------------


def struct_oracle(rows: int, cols: int, k: int) -> tuple[torch.Tensor, int]:
    """The spec's rule: k_rows = ⌊(K − d)/C⌋ rows i with i mod f = 0, f = max(1, ⌊R/k_rows⌋), plus the diagonal."""
    d = min(rows, cols)
    k_rows = (k - d) // cols
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    chosen = list(range(0, rows, max(1, rows // k_rows)))[:k_rows] if k_rows else []
    mask[chosen] = True
    mask[torch.arange(d), torch.arange(d)] = True
    return mask, k_rows * cols + d - sum(1 for i in chosen if i < d)


@pytest.mark.parametrize("axis", ["rows", "cols"])
@pytest.mark.parametrize("shape, r", [((64, 64), 2), ((96, 48), 3), ((48, 96), 1)])
def test_struct_is_every_fth_line_plus_the_diagonal(shape, r, axis):
    """struct: full rows (cols mode: columns) at a fixed stride plus the diagonal, nnz ≤ K, high rank."""
    out_f, in_f = shape
    model = nn.Sequential(nn.Linear(in_f, out_f))
    ak.attach(model, ak.ShiraConfig(r=r, mask="struct", struct_axis=axis, target_modules=["0"]), "s")
    layer = model[0].layer("s")
    k = r * (out_f + in_f)
    if axis == "rows":
        expected, count = struct_oracle(out_f, in_f, k)
    else:
        transposed, count = struct_oracle(in_f, out_f, k)
        expected = transposed.t()
    mask = dense(layer.indices, shape)
    assert torch.equal(mask, expected)
    assert layer.nnz == count <= k and layer.budget == k
    assert (expected.all(1).sum() if axis == "rows" else expected.all(0).sum()) >= 1  # at least one full line
    values = torch.zeros(shape)
    values[mask] = torch.randn(int(mask.sum()), generator=torch.Generator().manual_seed(0))
    assert torch.linalg.matrix_rank(values) == min(shape)  # "high rank": full rank on random values
    if shape[0] == shape[1]:
        full = int(expected.all(1).sum() if axis == "rows" else expected.all(0).sum())
        assert torch.linalg.matrix_rank(mask.float()) == shape[0] - full + 1  # the 0/1 pattern itself


def test_struct_refuses_a_budget_smaller_than_the_diagonal():
    """K = 41 < d = 64: the diagonal alone exceeds the budget → ConfigError, model untouched."""
    model = nn.Sequential(nn.Linear(64, 64))
    before = snapshot(model)
    with pytest.raises(ak.ConfigError, match="diagonal"):
        ak.attach(model, ak.ShiraConfig(density=0.01, mask="struct", target_modules=["0"]), "s")
    assert_unchanged(model, before)


# -- callables ------------------------------------------------------------------------------


def test_callable_mask_is_used_with_generator_and_gradient():
    """A callable gets (weight, budget, generator=, gradient=) and its bool mask becomes the support."""
    seen = []

    def lower_left(weight, budget, *, generator, gradient):
        seen.append((weight.shape, budget, type(generator), None if gradient is None else gradient.shape))
        mask = torch.zeros_like(weight, dtype=torch.bool)
        mask.view(-1)[torch.randperm(weight.numel(), generator=generator)[: budget // 2]] = True
        return mask

    model = net()
    ak.attach(model, ak.ShiraConfig(r=1, mask=lower_left, target_modules=["0", "2"]), "a")
    ak.attach(model, ak.ShiraConfig(r=1, mask=lower_left, target_modules=["4"]), "b", calibration=batches(),
              loss_fn=square_loss)
    ak.attach(model, ak.ShiraConfig(r=1, mask=lower_left, target_modules=["0"]), "c")
    assert seen == [((64, 48), 112, torch.Generator, None), ((64, 64), 128, torch.Generator, None),
                    ((48, 64), 112, torch.Generator, (48, 64)), ((64, 48), 112, torch.Generator, None)]
    assert [layer.nnz for layer in layers(model, "a").values()] == [56, 64]  # fewer than K is allowed
    assert layers(model, "a")["0"].mask_rule.startswith("custom:") and not layers(model, "a")["0"].regenerable
    assert not torch.equal(model[0].layer("a").indices, model[0].layer("c").indices)  # per-adapter generator seed
    assert ak.config_of(model, "a").to_dict()["mask"] == layers(model, "a")["0"].mask_rule


BAD_CALLABLES = {
    "wrong-shape": lambda w, k, **kw: torch.ones(3, 3, dtype=torch.bool),
    "transposed": lambda w, k, **kw: torch.eye(*w.shape, dtype=torch.bool).t(),
    "float-mask": lambda w, k, **kw: torch.eye(*w.shape),
    "too-many": lambda w, k, **kw: torch.ones_like(w, dtype=torch.bool),
    "none-selected": lambda w, k, **kw: torch.zeros_like(w, dtype=torch.bool),
    "not-a-tensor": lambda w, k, **kw: (w.abs() > 1).numpy(),
    "a-list": lambda w, k, **kw: [[True]],
}


@pytest.mark.parametrize("fn", BAD_CALLABLES.values(), ids=BAD_CALLABLES)
@pytest.mark.parametrize("calibrated", [False, True])
def test_bad_callable_mask_raises_config_error_and_leaves_model_unchanged(fn, calibrated):
    """Wrong shape / dtype / count / type from a mask function → ConfigError; calibration side effects undone."""
    model = net().train()
    ak.attach(model, ak.ShiraConfig(r=1, target_modules=["4"]), "resident")
    before = snapshot(model)
    options = dict(calibration=batches(), loss_fn=square_loss) if calibrated else {}
    with pytest.raises(ak.ConfigError):
        ak.attach(model, ak.ShiraConfig(r=1, mask=fn, target_modules=["0", "2"]), "bad", **options)
    assert_unchanged(model, before)
    assert model.training and all(p.grad is None for p in model.parameters())


# -- bad configs ----------------------------------------------------------------------------

BAD_CONFIGS = {
    "density-zero": dict(density=0.0),
    "density-negative": dict(density=-0.1),
    "density-above-one": dict(density=1.5),
    "density-nan": dict(density=float("nan")),
    "density-string": dict(density="0.1"),
    "density-bool": dict(density=True),
    "r-zero": dict(r=0),
    "r-negative": dict(r=-2),
    "r-float": dict(r=2.5),
    "r-bool": dict(r=True),
    "both-density-and-r": dict(density=0.1, r=2),
    "unknown-mask": dict(mask="magnitude"),
    "mask-none": dict(mask=None),
    "bad-struct-axis": dict(mask="struct", struct_axis="diag"),
    "bad-accumulate": dict(mask="grad", grad_accumulate="mean"),
    "struct-with-avoid": dict(mask="struct", avoid=("a",)),
}


@pytest.mark.parametrize("kwargs", BAD_CONFIGS.values(), ids=BAD_CONFIGS)
def test_invalid_config_values_raise_config_error(kwargs):
    """Each invalid ShiraConfig value is refused when the config is built."""
    with pytest.raises(ak.ConfigError):
        ak.ShiraConfig(target_modules=["0"], **kwargs)


BAD_ATTACHES = {
    "r-too-large": (dict(r=28), {}, "only"),  # 28·(64+48) = 3136 > 64·48 = 3072
    "grad-without-calibration": (dict(mask="grad"), {}, "calibration"),
    "snip-without-calibration": (dict(mask="snip"), {}, "calibration"),
    "calibration-for-rand": (dict(mask="rand"), dict(calibration=batches(), loss_fn=square_loss), "calibration"),
    "custom-name-without-function": (dict(mask="custom:lost"), {}, "custom"),
    "empty-calibration": (dict(mask="grad"), dict(calibration=[], loss_fn=square_loss), "no batches"),
    "avoid-a-lora": (dict(avoid=("lora",)), {}, "SHiRA"),
}


@pytest.mark.parametrize("extra, options, needle", BAD_ATTACHES.values(), ids=BAD_ATTACHES)
def test_bad_attach_raises_config_error_and_leaves_model_unchanged(extra, options, needle):
    """Requests that only fail against the model (budget vs layer size, missing calibration, …) change nothing."""
    model = net()
    ak.attach(model, ak.LoRAConfig(r=2, target_modules=["4"], init="random"), "lora")
    before = snapshot(model)
    with pytest.raises(ak.ConfigError, match=needle):
        ak.attach(model, ak.ShiraConfig(target_modules=["0", "2"], **extra), "bad", **options)
    assert_unchanged(model, before)


@pytest.mark.parametrize("r, fits", [(6, True), (7, False)])
def test_r_budget_must_fit_the_layer(r, fits):
    """r(m+n) ≤ m·n: on a 12×12 layer r=6 gives K = 144 = m·n (every entry), r=7 would need 168."""
    model = nn.Sequential(nn.Linear(12, 12))
    before = snapshot(model)
    if fits:
        ak.attach(model, ak.ShiraConfig(r=r, target_modules=["0"]), "a")
        assert model[0].layer("a").nnz == 144
    else:
        with pytest.raises(ak.ConfigError, match="168"):
            ak.attach(model, ak.ShiraConfig(r=r, target_modules=["0"]), "a")
        assert_unchanged(model, before)


# -- calibration side effects ---------------------------------------------------------------


def test_calibration_leaves_model_unchanged_and_writes_no_grad():
    """Gradients come from autograd.grad: no .grad, same tensors, flags and train/eval mode."""
    model = nn.Sequential(nn.Linear(48, 64), nn.Dropout(0.5), nn.Linear(64, 48)).train()
    model[2].weight.requires_grad_(False)
    before = snapshot(model)
    targets = {"0": model[0], "2": model[2]}
    grads = masks.calibration_gradients(model, targets, batches(), square_loss, "sum")
    assert_unchanged(model, before)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert set(grads) == {"0", "2"} and all(g.abs().sum() > 0 for g in grads.values())
    again = masks.calibration_gradients(model, targets, batches(), square_loss, "sum")
    assert all(torch.equal(grads[p], again[p]) for p in grads)  # eval mode: dropout off, deterministic
    weights = {p: m.weight.detach().clone() for p, m in targets.items()}
    ak.attach(model, ak.ShiraConfig(density=0.02, mask="snip", target_modules=["0", "2"]), "a",
              calibration=batches(), loss_fn=square_loss)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(model.get_submodule(p).weight, w) for p, w in weights.items())


def test_calibration_batches_are_passed_as_keyword_arguments(tiny_bert, token_ids):
    """Without loss_fn, mapping batches go to model(**batch) and the model's own loss is used."""
    calibration = [dict(input_ids=token_ids, labels=torch.tensor([0, 1, 2]))]
    ak.attach(tiny_bert, ak.ShiraConfig(density=0.05, mask="grad", target_modules=["query"]), "a",
              calibration=calibration)
    assert all(layer.nnz == round(0.05 * 32 * 32) for layer in layers(tiny_bert, "a").values())
