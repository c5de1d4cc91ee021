"""Seeded file fuzzer: ≥ 1,000 mutations of valid adapter directories, each loaded with a time bound.

Artefacts: an adapterkit LoRA, a SHiRA with a Rice-coded ``wm`` mask, a 2-bit LoRA, a saved Stack
(``composition.json`` + two members) and a PEFT-format LoRA. Mutations: bytes flipped, set,
inserted or deleted in the safetensors length field, header and body, truncation; JSON fields
changed in type or value (huge numbers, NaN, ±Inf), deleted or added, raw JSON bytes damaged;
and "re-sealed" edits of stored tensors (index streams, codes, dtypes, shapes, keys) whose digest
is recomputed, i.e. consistent hostile files that the digest cannot catch.

Every load must raise an ``ak.AdapterError`` and leave the model unchanged, or load. Loads of
raw byte damage must give tensors identical to the original's (an unused byte was hit); JSON edits
may change the config but never the tensors; re-sealed files may load whatever they consistently
describe. Run with ``-s`` to see the counts and time.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import signal
import struct
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import adapterkit as ak
from adapterkit.core.state import get_state
from adapterkit.io.safefiles import tensors_digest
from conftest import assert_unchanged, snapshot

SEED = 20240521
PER_ARTEFACT = 220  # 5 artefacts: 1,100 mutations
TIME_BOUND_S = 5.0
CONFIG = "adapter_config.json"
ODD_VALUES = [None, True, False, "x", "", [], {}, 0, -1, 1, 2**31, 2**63, 10**30, -(10**30), 1.5, 1e308,
              float("nan"), float("inf"), -float("inf"), [1, 2], {"a": 1}, "../../etc", "a\x00b"]


class Hang(BaseException):
    """Raised by the alarm: a load ran past TIME_BOUND_S (BaseException: nothing may swallow it)."""


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def randomised(model: nn.Module, name: str) -> None:
    with torch.no_grad():
        for param in ak.adapter_parameters(model, name):
            param.add_(torch.randn_like(param) * 0.1)


def make_artefacts(root: Path) -> dict[str, Path]:
    base = base_model()
    out = {}
    specs = {
        "lora": (ak.LoRAConfig(r=2, target_modules=["0", "2"], init="random"), "adapterkit"),
        "shira-wm": (ak.ShiraConfig(density=0.1, mask="wm", target_modules=["0", "2"]), "adapterkit"),
        "lora-2bit": (ak.LoRAConfig(r=2, target_modules=["0", "2"], init="random", bits=2), "adapterkit"),
        "peft-lora": (ak.LoRAConfig(r=2, target_modules=["0", "2"], init="random"), "peft"),
    }
    for kind, (config, fmt) in specs.items():
        model = ak.attach(copy.deepcopy(base), config, "a")
        randomised(model, "a")
        out[kind] = ak.save(model, root / kind, "a", format=fmt)
    model = ak.attach(copy.deepcopy(base), ak.LoRAConfig(r=2, target_modules=["0"], init="random"), "a")
    ak.attach(model, ak.BottleneckConfig(bottleneck=4, target_modules=["2"]), "b")
    randomised(model, "a")
    randomised(model, "b")
    out["stack"] = ak.save(model, root / "stack", ak.Stack("a", "b"))
    return out


def target_model() -> nn.Module:
    """The model loads go into: it already carries an adapter, which a failed load must not disturb."""
    return ak.attach(base_model(), ak.LoRAConfig(r=2, target_modules=["4"], init="random"), "resident")


def loaded_state(model: nn.Module) -> list:
    """Name, config and every tensor of each adapter loaded beside ``resident``."""
    state = get_state(model)
    return [(name, ak.config_of(model, name), [(path, layer.tensors()) for path, layer in state.layers(name)])
            for name in ak.adapters(model) if name != "resident"]


def same_tensors(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for (_, _, layers_a), (_, _, layers_b) in zip(a, b):
        if [p for p, _ in layers_a] != [p for p, _ in layers_b]:
            return False
        for (_, ta), (_, tb) in zip(layers_a, layers_b):
            if ta.keys() != tb.keys() or not all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta):
                return False
    return True


# -- mutations ----------------------------------------------------------------------------------


def files_of(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def mutate_bytes(path: Path, rng: random.Random) -> str:
    raw = bytearray(path.read_bytes())
    if path.suffix == ".safetensors":
        header_end = 8 + struct.unpack("<Q", bytes(raw[:8]))[0]
        region = rng.choice(["length", "header", "header", "body", "body"])
        lo, hi = {"length": (0, 8), "header": (8, header_end), "body": (header_end, len(raw))}[region]
    else:
        region, lo, hi = "json-bytes", 0, len(raw)
    if hi <= lo:
        lo, hi = 0, len(raw)
    i = rng.randrange(lo, hi)
    op = rng.choice(["flip", "flip", "set", "insert", "delete", "truncate"])
    if op == "flip":
        raw[i] ^= 1 << rng.randrange(8)
    elif op == "set":
        raw[i] = rng.randrange(256)
    elif op == "insert":
        raw.insert(i, rng.randrange(256))
    elif op == "delete":
        del raw[i]
    else:
        del raw[i:]
    path.write_bytes(bytes(raw))
    return f"{region}-{op}"


def json_nodes(value, trail=()):
    yield trail
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from json_nodes(child, trail + (key,))


def odd_value(old, rng: random.Random):
    if isinstance(old, (int, float)) and not isinstance(old, bool) and rng.random() < 0.4:
        return rng.choice([old + 1, old - 1, -old, old * 1000, old * 10**20, old / 3])
    return copy.deepcopy(rng.choice(ODD_VALUES))


def mutate_json_value(data, rng: random.Random) -> str:
    trail = rng.choice(list(json_nodes(data))[1:])
    parent = data
    for key in trail[:-1]:
        parent = parent[key]
    key = trail[-1]
    op = rng.choice(["replace", "replace", "delete", "add"])
    if op == "delete":
        del parent[key]
    elif op == "add" and isinstance(parent[key], dict):
        parent[key][rng.choice(["extra", "r", "bits", "modules", "stack"])] = odd_value(None, rng)
    else:
        op = "replace"
        parent[key] = odd_value(parent[key], rng)
    return f"json-{op}"


def mutate_json_file(path: Path, rng: random.Random) -> str:
    data = json.loads(path.read_text())
    kind = mutate_json_value(data, rng)
    path.write_text(json.dumps(data))
    return kind


def mutate_peft_metadata(path: Path, rng: random.Random) -> str:
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    key = rng.choice(sorted(metadata))
    if key == "adapterkit_fingerprint" and rng.random() < 0.7:
        fingerprint = json.loads(metadata[key])
        mutate_json_value(fingerprint, rng)
        metadata[key] = json.dumps(fingerprint)
    elif rng.random() < 0.3:
        del metadata[key]
    else:
        metadata[key] = str(odd_value(metadata[key], rng))
    save_file(tensors, path, metadata=metadata)
    return "header-metadata"


def reseal(directory: Path, weights: Path, tensors: dict, metadata: dict) -> None:
    """Write ``tensors`` with a digest that matches them: a consistent (hostile) file."""
    if "adapterkit_tensors_sha256" in metadata:
        metadata["adapterkit_tensors_sha256"] = tensors_digest(tensors)
    save_file(tensors, weights, metadata=metadata)
    config = directory / CONFIG
    data = json.loads(config.read_text())
    if "tensors_sha256" in data:
        data["tensors_sha256"] = tensors_digest(tensors)
        config.write_text(json.dumps(data))


def mutate_tensors_resealed(weights: Path, rng: random.Random) -> str:
    tensors = load_file(weights)
    with safe_open(str(weights), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    streams = [k for k in tensors if "index_" in k or k.endswith((".codes", ".quant_stats"))]
    key = rng.choice(streams if streams and rng.random() < 0.7 else sorted(tensors))
    tensor = tensors[key]
    op = rng.choice(["value", "value", "dtype", "shorten", "lengthen", "drop", "add"])
    if op == "value" and tensor.numel():
        flat = tensor.reshape(-1).clone()
        i = rng.randrange(flat.numel())
        if flat.is_floating_point():
            flat[i] = rng.choice([0.0, -1.0, 1e30, 3.0])
        else:
            limits = torch.iinfo(flat.dtype)
            flat[i] = min(max(rng.choice([0, 1, -1, 255, 2**31 - 1, -(2**40), 41, 64, 7]), limits.min), limits.max)
        tensors[key] = flat.view(tensor.shape)
    elif op == "dtype":
        tensors[key] = tensor.to(rng.choice([torch.int32, torch.int64, torch.uint8, torch.float16, torch.float32]))
    elif op == "shorten" and tensor.numel():
        tensors[key] = tensor.reshape(-1)[: rng.randrange(tensor.numel())].clone()
    elif op == "lengthen":
        tensors[key] = torch.cat([tensor.reshape(-1), tensor.reshape(-1)[:3]]).clone()
    elif op == "drop":
        del tensors[key]
    else:
        op = "add"
        tensors[key + "_extra"] = torch.zeros(3)
    reseal(weights.parent, weights, tensors, metadata)
    return f"resealed-{op}"


def mutate(directory: Path, rng: random.Random) -> str:
    path = rng.choice(files_of(directory))
    if path.suffix == ".json":
        return mutate_json_file(path, rng) if rng.random() < 0.7 else mutate_bytes(path, rng)
    roll = rng.random()
    if roll < 0.25:
        return mutate_tensors_resealed(path, rng)
    if roll < 0.35 and path.name == "adapter_model.safetensors":
        return mutate_peft_metadata(path, rng)
    return mutate_bytes(path, rng)


# -- the run ------------------------------------------------------------------------------------


def bounded_load(model: nn.Module, directory: Path) -> float:
    def alarm(*_):
        raise Hang(f"ak.load ran past {TIME_BOUND_S} s on {directory}")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_BOUND_S)
    start = time.perf_counter()
    try:
        ak.load(model, directory)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return time.perf_counter() - start


def test_file_fuzzer_only_adapter_errors_and_never_damaged_tensors(tmp_path):
    warnings.simplefilter("ignore")  # unknown-key warnings of mutated configs
    rng = random.Random(SEED)
    artefacts = make_artefacts(tmp_path / "valid")
    outcomes: Counter = Counter()
    problems: list[str] = []
    slowest = 0.0
    start = time.perf_counter()
    for kind, original in artefacts.items():
        reference = target_model()
        ak.load(reference, original)
        expected = loaded_state(reference)
        model = target_model()
        for i in range(PER_ARTEFACT):
            work = tmp_path / "work" / f"{kind}-{i}"
            shutil.copytree(original, work)
            how = mutate(work, rng)
            before = snapshot(model)
            label = f"{kind} #{i} {how}"
            try:
                slowest = max(slowest, bounded_load(model, work))
            except ak.AdapterError:
                outcomes["refused"] += 1
                try:
                    assert_unchanged(model, before)
                except AssertionError as exc:
                    problems.append(f"{label}: model changed after a refused load ({exc})")
                    model = target_model()
            except Hang as exc:
                problems.append(f"{label}: {exc}")
                model = target_model()
            except Exception as exc:  # noqa: BLE001 - the point: anything but an AdapterError is a finding
                problems.append(f"{label}: {type(exc).__name__}: {exc}")
                model = target_model()
            else:
                got = loaded_state(model)
                if same_tensors(got, expected):
                    same_config = [(n, c) for n, c, _ in got] == [(n, c) for n, c, _ in expected]
                    outcomes["loaded-identical" if same_config else "loaded-config-changed"] += 1
                elif how.startswith("resealed"):
                    outcomes["loaded-resealed-different"] += 1
                else:
                    problems.append(f"{label}: loaded tensors that differ from the original's")
                model = target_model()
            shutil.rmtree(work)
    elapsed = time.perf_counter() - start
    total = sum(outcomes.values()) + len(problems)
    print(f"\nfile fuzzer: {total} mutations in {elapsed:.1f} s (slowest load {slowest * 1000:.0f} ms): "
          f"{dict(outcomes)}; problems: {len(problems)}")
    for problem in problems[:20]:
        print("  ", problem)
    assert total >= 1000
    assert problems == []
    assert outcomes["refused"] > total // 2  # the mutations really damage files
