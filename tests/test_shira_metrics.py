"""Adapter interference metrics (SHiRA paper §4.2): AWOR against its closed form, AWOM, Lemma 4.5, per-layer report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.core.state import get_state


def sparse_random(n: int, m: int, p: float, g: torch.Generator) -> torch.Tensor:
    """Exactly round(p·n·m) uniformly placed N(0, 1) entries."""
    k = round(p * n * m)
    out = torch.zeros(n * m)
    out[torch.randperm(n * m, generator=g)[:k]] = torch.randn(k, generator=g)
    return out.view(n, m)


def test_awor_of_independent_random_masks_matches_the_closed_form():
    """p = 1%, 256×256: mean AWOR over seeds within 0.01 of (1 − p²)^256 ≈ 0.9747."""
    g = torch.Generator().manual_seed(0)
    p, n = 0.01, 256
    values = [ak.metrics.awor(sparse_random(n, n, p, g), sparse_random(n, n, p, g)) for _ in range(5)]
    assert abs(sum(values) / len(values) - (1 - p**2) ** n) < 0.01
    assert all(0.95 < v < 1.0 for v in values)


def test_awor_is_zero_for_dense_low_rank_and_one_for_disjoint_rows():
    """A dense rank-8 product (LoRA-like) has no zero; adapters touching disjoint rows give an all-zero product."""
    g = torch.Generator().manual_seed(1)
    lora = lambda: torch.randn(256, 8, generator=g) @ torch.randn(8, 256, generator=g)  # noqa: E731
    assert ak.metrics.awor(lora(), lora()) == pytest.approx(0.0, abs=1e-4)
    a, b = torch.zeros(64, 32), torch.zeros(64, 32)
    a[:10], b[10:20] = torch.randn(10, 32, generator=g), torch.randn(10, 32, generator=g)
    assert ak.metrics.awor(a, b) == 1.0 and ak.metrics.awom(a, b) == 0.0


def test_awom_is_the_spectral_or_frobenius_norm_of_the_product():
    """A₁ᵀA₂ = diag(3, 4) by hand: spectral norm 4, Frobenius norm 5, AWOR = 2 zeros of 4."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, 4.0], [5.0, 5.0]])  # the third row meets a's zero row
    assert ak.metrics.awom(a, b) == pytest.approx(4.0)
    assert ak.metrics.awom(a, b, "fro") == pytest.approx(5.0)
    assert ak.metrics.awor(a, b) == 0.5
    with pytest.raises(ValueError):
        ak.metrics.awor(a, b[:, :1])


def test_disjoint_struct_adapters_satisfy_lemma_4_5():
    """A_i = I + S_i with disjoint full rows: A₁ᵀA₂ = I + S₂ + S₁ᵀ, density ≤ density(A₁) + density(A₂)."""
    g = torch.Generator().manual_seed(3)
    n = 128
    s1, s2 = torch.zeros(n, n), torch.zeros(n, n)
    s1[0::16] = torch.randn(n // 16, n, generator=g)
    s2[8::16] = torch.randn(n // 16, n, generator=g)
    for s in (s1, s2):
        s.fill_diagonal_(0)  # keep the diagonal in I only
    a1, a2 = torch.eye(n) + s1, torch.eye(n) + s2
    product = a1.t() @ a2
    torch.testing.assert_close(product, torch.eye(n) + s2 + s1.t())
    density = lambda t: torch.count_nonzero(t).item() / t.numel()  # noqa: E731
    assert 1 - ak.metrics.awor(a1, a2) == pytest.approx(density(product))
    assert density(product) <= density(a1) + density(a2)


def test_orthogonality_reports_each_shared_layer_and_the_means():
    """ak.metrics.orthogonality gives AWOR/AWOM per layer both adapters adapt (from their dense ΔW) and the means."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    ak.attach(model, ak.ShiraConfig(density=0.05, target_modules=["0", "2", "4"]), "a")
    ak.attach(model, ak.ShiraConfig(density=0.05, mask="wm", target_modules=["2", "4"]), "b")
    ak.attach(model, ak.ShiraConfig(density=0.05, mask="wm", avoid=("b",), target_modules=["2", "4"]), "c")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in ("a", "b", "c"):
            for param in ak.adapter_parameters(model, name):
                param.copy_(torch.randn(param.shape, generator=g))
    report = ak.metrics.orthogonality(model, "a", "b")
    assert set(report.layers) == {"2", "4"}
    for path, metrics in report.layers.items():
        da, db = (torch.zeros(64 * 64).index_add(0, l.indices, l.values.detach()).view(64, 64)
                  for l in (model.get_submodule(path).layer(n) for n in ("a", "b")))
        assert metrics.awor == pytest.approx(ak.metrics.awor(da, db))
        assert metrics.awom_spectral == pytest.approx(ak.metrics.awom(da, db), rel=1e-5)
        assert metrics.awom_fro == pytest.approx(ak.metrics.awom(da, db, "fro"), rel=1e-5)
        assert abs(metrics.awor - (1 - 0.05**2) ** 64) < 0.03
    # Remark 1: at this sparsity, non-overlapping masks are not much more orthogonal than overlapping ones
    overlap, disjoint = ak.metrics.orthogonality(model, "b", "b").awor, ak.metrics.orthogonality(model, "b", "c").awor
    expected = (1 - 0.05**2) ** 64
    assert abs(overlap - expected) < 0.03 and abs(disjoint - expected) < 0.03
    with pytest.raises(ak.AdapterNotFoundError):
        ak.metrics.orthogonality(model, "a", "nope")


def test_orthogonality_of_hand_set_deltas_per_layer_and_averaged():
    """Rank-1 LoRAs (scale 1) set by hand. Layer 0: ΔW_a = [[1,0],[0,0]], ΔW_b = [[3,4],[0,0]], so
    ΔW_aᵀΔW_b = [[3,4],[0,0]]: AWOR 1/2, both norms 5. Layer 1: ΔW_b = [[0,0],[0,2]] meets a's zero
    row: the product is zero (AWOR 1, norms 0). Means: 3/4 and 5/2."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    factors = {"a": {"0": ([1.0, 0.0], [1.0, 0.0]), "1": ([1.0, 0.0], [1.0, 0.0])},  # module: (B column, A row)
               "b": {"0": ([1.0, 0.0], [3.0, 4.0]), "1": ([0.0, 1.0], [0.0, 2.0])}}
    for name, layers in factors.items():
        ak.attach(model, ak.LoRAConfig(r=1, alpha=1.0, target_modules=["0", "1"]), name)
        for path, (column, row) in layers.items():
            layer = model.get_submodule(path).layer(name)
            with torch.no_grad():
                layer.lora_B.copy_(torch.tensor(column).view(2, 1))
                layer.lora_A.copy_(torch.tensor(row).view(1, 2))
    report = ak.metrics.orthogonality(model, "a", "b")
    assert report.layers["0"].awor == 0.5 and report.layers["1"].awor == 1.0
    assert report.layers["0"].awom_spectral == pytest.approx(5.0) and report.layers["0"].awom_fro == pytest.approx(5.0)
    assert report.layers["1"].awom_spectral == 0.0 and report.layers["1"].awom_fro == 0.0
    assert report.awor == 0.75
    assert report.awom_spectral == pytest.approx(2.5) and report.awom_fro == pytest.approx(2.5)


def test_orthogonality_of_adapters_without_a_shared_layer_raises():
    """Two adapters on different layers have nothing to compare."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    ak.attach(model, ak.ShiraConfig(density=0.25, target_modules=["0"]), "a")
    ak.attach(model, ak.ShiraConfig(density=0.25, target_modules=["1"]), "b")
    with pytest.raises(ValueError, match="share no"):
        ak.metrics.orthogonality(model, "a", "b")
    assert len(list(get_state(model).layers("a"))) == 1
