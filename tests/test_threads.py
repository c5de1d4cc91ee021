"""Concurrent forwards: every model owns its scratch buffers, one set per thread.

SHiRA's solo forward builds ``W + S`` in a reused work buffer (and rebuilds it in backward), and
bf16 fusing accumulates ``W + ΔW`` in an fp32 one. Threads running their own models, or sharing
one model, must each get exactly the single-thread result (``torch.equal``). A buffer shared by
threads or models makes these tests fail: one thread's ``W + S`` is overwritten by another's
between the write and the matmul.
"""

from __future__ import annotations

import copy
import gc
import io
import threading
import weakref
from typing import Callable

import pytest
import torch
from conftest import randomise
from torch import nn

import adapterkit as ak
from adapterkit.core.state import get_state

FORWARDS = 200
THREADS = 4


# Python threads supply the concurrency; intra-op pools in every thread only oversubscribe the cores
pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int, kind: str) -> nn.Module:
    """A two-layer MLP with a random adapter: SHiRA (unfused, solo forward) or bf16 LoRA."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(192, 256), nn.ReLU(), nn.Linear(256, 192)).eval()
    if kind == "shira":
        ak.attach(model, ak.ShiraConfig(density=0.05, target_modules=["0", "2"], seed=seed), "s")
    else:
        model.to(torch.bfloat16)
        ak.attach(model, ak.LoRAConfig(r=4, target_modules=["0", "2"]), "s")
    randomise(model, "s", seed=seed, scale=0.05)
    return model


def inputs(seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return [torch.randn(16, 192, generator=g).to(dtype) for _ in range(4)]


def forwards(model: nn.Module, xs: list[torch.Tensor], count: int = FORWARDS) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(xs[i % len(xs)]) for i in range(count)]


def fuse_cycles(model: nn.Module, xs: list[torch.Tensor], count: int = FORWARDS // 4) -> list[torch.Tensor]:
    """fuse → forward → unfuse → forward; the base weights after each unfuse are part of the result."""
    out = []
    with torch.no_grad():
        for i in range(count):
            ak.fuse(model)
            out.append(model(xs[i % len(xs)]))
            ak.unfuse(model)
            out.extend([model(xs[i % len(xs)]), model[0].weight.clone(), model[2].weight.clone()])
    return out


def backwards(model: nn.Module, xs: list[torch.Tensor], count: int = FORWARDS // 4) -> list[torch.Tensor]:
    out = []
    params = list(ak.adapter_parameters(model, "s"))
    for i in range(count):
        x = xs[i % len(xs)].clone().requires_grad_(True)
        y = model(x)
        grads = torch.autograd.grad((y * y).sum(), [x, *params])
        out.extend([y.detach(), *grads])
    return out


def run_together(jobs: list[Callable[[], list[torch.Tensor]]]) -> list[list[torch.Tensor]]:
    """Run every job in its own thread, all released at once; re-raise the first error."""
    results: list = [None] * len(jobs)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def work(i: int) -> None:
        try:
            barrier.wait()
            results[i] = jobs[i]()
        except BaseException as error:  # noqa: BLE001 - reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def assert_all_equal(got: list[list[torch.Tensor]], expected: list[list[torch.Tensor]]) -> None:
    for job, (outs, refs) in enumerate(zip(got, expected)):
        assert len(outs) == len(refs)
        wrong = [i for i, (a, b) in enumerate(zip(outs, refs)) if not torch.equal(a, b)]
        assert not wrong, f"job {job}: {len(wrong)} of {len(refs)} results differ from the single-thread run"


def test_threads_each_running_their_own_shira_model_get_the_single_thread_outputs():
    models = [make_model(seed, "shira") for seed in range(THREADS)]
    xs = [inputs(seed) for seed in range(THREADS)]
    expected = [forwards(m, x) for m, x in zip(models, xs)]
    got = run_together([lambda m=m, x=x: forwards(m, x) for m, x in zip(models, xs)])
    assert_all_equal(got, expected)
    assert len({id(get_state(m).workspace) for m in models}) == THREADS  # one workspace per model


def test_threads_sharing_one_model_get_the_single_thread_outputs():
    model = make_model(0, "shira")
    xs = [inputs(seed) for seed in range(THREADS)]
    expected = [forwards(model, x) for x in xs]
    got = run_together([lambda x=x: forwards(model, x) for x in xs])
    assert_all_equal(got, expected)


def test_shira_backward_in_threads_gives_the_single_thread_gradients():
    models = [make_model(seed, "shira").train() for seed in range(THREADS)]
    xs = [inputs(seed) for seed in range(THREADS)]
    expected = [backwards(m, x) for m, x in zip(models, xs)]
    shared = make_model(9, "shira").train()  # two more threads train one shared model
    shared_x = [inputs(9), inputs(10)]
    expected += [backwards(shared, x) for x in shared_x]
    jobs = [lambda m=m, x=x: backwards(m, x) for m, x in zip(models, xs)]
    jobs += [lambda x=x: backwards(shared, x) for x in shared_x]
    assert_all_equal(run_together(jobs), expected)


def test_bf16_fuse_unfuse_cycles_and_shira_forwards_in_threads():
    """bf16 LoRA fusing accumulates in the fp32 scratch while SHiRA models write W + S into theirs."""
    loras = [make_model(seed, "lora") for seed in range(2)]
    shiras = [make_model(seed + 2, "shira") for seed in range(2)]
    lora_x = [inputs(seed, torch.bfloat16) for seed in range(2)]
    shira_x = [inputs(seed + 2) for seed in range(2)]
    originals = [(m[0].weight.clone(), m[2].weight.clone()) for m in loras]
    expected = [fuse_cycles(m, x) for m, x in zip(loras, lora_x)] + [forwards(m, x) for m, x in zip(shiras, shira_x)]
    for model, (w0, w2) in zip(loras, originals):  # the reference run itself restored the weights exactly
        assert torch.equal(model[0].weight, w0) and torch.equal(model[2].weight, w2)
    fused, unfused = expected[0][0], expected[0][1]
    assert fused.dtype == unfused.dtype == torch.bfloat16
    jobs = [lambda m=m, x=x: fuse_cycles(m, x) for m, x in zip(loras, lora_x)]
    jobs += [lambda m=m, x=x: forwards(m, x) for m, x in zip(shiras, shira_x)]
    assert_all_equal(run_together(jobs), expected)


def test_a_deep_copy_and_an_unpickled_model_get_a_workspace_of_their_own():
    model = make_model(0, "shira")
    x = inputs(0)[0]
    with torch.no_grad():
        reference = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        original, copied = get_state(model), get_state(clone)
        assert copied.workspace is not original.workspace
        # every layer and host of the copy shares the copy's workspace, none the original's
        hosts = list(copied.wrappers.values())
        assert hosts and all(h.workspace is copied.workspace for h in hosts)
        assert all(layer.workspace is copied.workspace for h in hosts for layer in h.adapters.values())
        assert copied.workspace.nbytes == 0  # starts empty
        with torch.no_grad():
            assert torch.equal(clone(x), reference)
        got = run_together([lambda: forwards(clone, [x], 50), lambda: forwards(model, [x], 50)])
        assert all(torch.equal(y, reference) for outs in got for y in outs)


def test_the_workspace_and_its_buffers_are_freed_with_the_model():
    model = make_model(0, "shira")
    x = inputs(0)[0]
    results = run_together([lambda: forwards(model, [x], 3)])  # a buffer in another thread, too
    assert len(results[0]) == 3
    with torch.no_grad():
        model(x)
    workspace = get_state(model).workspace
    assert workspace.nbytes > 0
    storages = [weakref.ref(b.untyped_storage()) for b in workspace._local.buffers.values()]
    refs = weakref.ref(workspace), weakref.ref(model)
    del model, workspace
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert storages and all(ref() is None for ref in storages)  # the buffer memory itself is gone
