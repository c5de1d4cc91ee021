"""Sparse-delta linear algebra for SHiRA training, in plain PyTorch.

The adapter is ``S`` with values ``v`` at flat indices ``(row, col)`` of an ``out × in`` weight.
Measured on this project's 2-core CPU (T = 1,000 tokens):

* weight gradient ``∂L/∂v[j] = Σ_t g[t, row_j] · x[t, col_j]``, a sampled dense-dense product,
  with ``torch.sparse.sampled_addmm`` on the mask's CSR pattern: it never builds an ``out × in``
  gradient, and in the training benchmark (bench/results/shira_train.md, "what-if" rows) it cut
  the MiniLM all-linear step by 20% against chunked gathers of the transposed activations, which
  in turn beat the dense ``gᵀx`` GEMM + gather by 1.2–2.4× (4096×4096, T = 1,000: 82 vs 197 ms).
  (The gather variant is gone; :func:`scatter_product` still gathers for the multi-adapter path.)
* forward when SHiRA is the module's only active delta: ``F.linear(x, W + S)`` with ``W + S``
  written into a reused work buffer (a memory copy, far cheaper than the GEMM) and rebuilt in
  backward instead of kept, so no dense copy outlives the layer's own computation;
* forward beside other deltas: ``x Sᵀ`` by chunked gather and ``index_add``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.workspace import Workspace

BLOCK = 1 << 19  # gathered values per chunk (2 MiB of fp32): stays in cache, few Python iterations


def _chunk(tokens: int) -> int:
    return max(256, min(16384, BLOCK // max(1, tokens)))


def csr_pattern(indices: Tensor, shape: tuple[int, int]) -> Tensor:
    """The mask as a CSR tensor (zero values) for :func:`torch.sparse.sampled_addmm`.

    Sorted flat indices are already in CSR order, so the sampled values line up with ``indices``.
    """
    rows, cols = _split(indices, shape[1])
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=indices.device)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    with warnings.catch_warnings():  # "CSR support is in beta": the pattern is built right here
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, torch.zeros(indices.numel(), device=indices.device),
                                       size=shape, check_invariants=False)


def sampled_grad(grad: Tensor, x: Tensor, pattern: Tensor) -> Tensor:
    """``(gᵀ x)`` at the mask entries, in fp32, for 2-D ``grad`` (T × out) and ``x`` (T × in).

    Both operands are laid out token-contiguous (``gᵀ`` row-major, ``x`` column-major), so every
    sampled dot product reads contiguous memory: 0.76 ms instead of 5.5 ms for a 1536×384
    weight at T = 1,024, copies included below 2 ms.
    """
    g_t = grad.t().float().contiguous()
    x_t = x.t().float().contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse.sampled_addmm(pattern, g_t, x_t.t(), beta=0.0).values()


def scatter_product(src_t: Tensor, values: Tensor, take: Tensor, put: Tensor, size: int) -> Tensor:
    """``out[put[j]] += values[j] · src_t[take[j]]`` (features × tokens), i.e. a sparse matmul."""
    out = torch.zeros(size, src_t.shape[1], dtype=src_t.dtype, device=src_t.device)
    chunk = _chunk(src_t.shape[1])
    for start in range(0, values.numel(), chunk):
        stop = start + chunk
        out.index_add_(0, put[start:stop], src_t.index_select(0, take[start:stop]) * values[start:stop, None])
    return out


def effective_weight(weight: Tensor, values: Tensor, indices: Tensor, scale: float, workspace: Workspace | None) -> Tensor:
    """``W + scale · S`` in the workspace's reused buffer (valid until this thread's next call)."""
    buffer = (torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if workspace is None
              else workspace.buffer(weight.shape, weight.dtype, weight.device))
    buffer.copy_(weight)
    buffer.view(-1).index_add_(0, indices, (values.detach() * scale).to(weight.dtype))
    return buffer


def _split(indices: Tensor, in_features: int) -> tuple[Tensor, Tensor]:
    return indices // in_features, indices % in_features


class SparseLinear(torch.autograd.Function):
    """``y = x (W + s·S)ᵀ + b``: gradients for ``x`` and ``v`` only (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor, scale: float,
                pattern: Tensor, workspace: Workspace | None) -> Tensor:
        ctx.save_for_backward(x, values, weight, indices)
        ctx.scale, ctx.pattern, ctx.workspace = scale, pattern, workspace
        return F.linear(x, effective_weight(weight, values, indices, scale, workspace), bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, values, weight, indices = ctx.saved_tensors
        grad_x = grad_v = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ effective_weight(weight, values, indices, ctx.scale, ctx.workspace)
        if ctx.needs_input_grad[1]:
            g2, x2 = grad.reshape(-1, weight.shape[0]), x.reshape(-1, weight.shape[1])
            grad_v = sampled_grad(g2, x2, ctx.pattern) * ctx.scale
        if ctx.needs_input_grad[2]:  # only when someone unfreezes the base weight
            grad_w = grad.reshape(-1, weight.shape[0]).t() @ x.reshape(-1, weight.shape[1])
        if ctx.needs_input_grad[3]:
            grad_b = grad.reshape(-1, weight.shape[0]).sum(0)
        return grad_x, grad_v, grad_w, grad_b, None, None, None, None


class SparseDelta(torch.autograd.Function):
    """``y = s · x Sᵀ`` (the delta alone, used beside other active adapters)."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, indices: Tensor, shape: tuple[int, int], scale: float,
                pattern: Tensor) -> Tensor:
        out_features, in_features = shape
        rows, cols = _split(indices, in_features)
        x_t = x.reshape(-1, in_features).t().to(values.dtype).contiguous()
        y_t = scatter_product(x_t, values.detach() * scale, cols, rows, out_features)
        ctx.save_for_backward(x_t, values, rows, cols)
        ctx.scale, ctx.in_features, ctx.x_shape, ctx.pattern = scale, in_features, x.shape, pattern
        return y_t.t().reshape(*x.shape[:-1], out_features).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_t, values, rows, cols = ctx.saved_tensors
        g_t = grad.reshape(-1, grad.shape[-1]).t().to(values.dtype).contiguous()
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            gx_t = scatter_product(g_t, values.detach() * ctx.scale, rows, cols, ctx.in_features)
            grad_x = gx_t.t().reshape(ctx.x_shape).to(grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_v = sampled_grad(g_t.t(), x_t.t(), ctx.pattern) * ctx.scale
        return grad_x, grad_v, None, None, None, None
