#!/usr/bin/env python
"""Trans-LoRA on real LMs: SmolLM2-135M-Instruct (source) -> Gemma-3-270M (target), 2 CPU cores.

Per task (250 real training examples, 5 seeds, 500 held-out test examples, exact match):
source base, source + LoRA, target base, target + LoRA on the real data (oracle), Trans-LoRA
(filtered synthetic inputs), and the ablations of the paper's Table 5: unfiltered synthetic inputs
(the first |D| distinct candidates of the same generator, before the discriminator), the 5 seeds only
(repeated to the same number of steps), and random text (VADER NYT editorial snippets) labelled by
the teacher. Then cross-method students on the same filtered set (LoRA -> SHiRA, DyLoRA, 1-bit
LoRA), a continuous transfer (SmolLM2 LoRA -> SmolLM2 SHiRA -> Gemma-3 LoRA, one discriminator),
MMD of filtered/unfiltered inputs to real ones in MiniLM embeddings, and generation speed.

Every cell is cached in bench/work/translora/cells.json the moment it finishes, so an interrupted run
resumes where it stopped; ``--cells`` / ``--tasks`` choose what runs (in priority order).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import adapterkit as ak  # noqa: E402
from adapterkit.apps import transfer as T  # noqa: E402
from adapterkit.apps.transfer.mmd import median_distance  # noqa: E402
from adapterkit.train.causal import Sampling, exact_match, generate, normalise_answer  # noqa: E402
from adapterkit.zoo.llm import load_lm  # noqa: E402
from adapterkit.zoo.lm_tasks import lm_task, random_texts  # noqa: E402
from _provenance import provenance  # noqa: E402
from _timing import hardware  # noqa: E402

WORK = ROOT / "bench" / "work" / "translora"
TASKS = ("vader_movies", "vader_tweets", "boolean_expressions", "dyck_languages")
MAIN = ("src_base", "src_lora", "tgt_base", "bundle", "translora", "oracle")
ABLATIONS = ("unfiltered", "seeds_only", "random", "mmd")
CROSS = ("cross_shira", "cross_dylora", "cross_lora1bit")
CONTINUOUS = ("cont_smol_shira", "cont_gemma")
STUDENTS: dict[str, Callable[[], ak.AdapterConfig]] = {
    "lora": lambda: ak.LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
    "shira": lambda: ak.ShiraConfig(r=8, target_modules=["q_proj", "v_proj"]),
    "dylora": lambda: ak.DyLoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
    "lora1bit": lambda: ak.LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"], bits=1),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cells_path = WORK / "cells.json"
        self.cells: dict[str, Any] = json.loads(self.cells_path.read_text()) if self.cells_path.is_file() else {}
        self.lms: dict[str, tuple[Any, Any]] = {}
        record = provenance()
        self.code = {k: record[k] for k in ("commit", "src_tree", "src_dirty")}

    def lm(self, name: str) -> tuple[Any, Any]:
        if name not in self.lms:
            self.lms[name] = load_lm(name)
        return self.lms[name]

    def cell(self, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if key not in self.cells:
            log(f"{key} ...")
            start = time.perf_counter()
            result = compute()
            result["seconds"] = round(time.perf_counter() - start, 1)
            result["provenance"] = self.code  # the code this process loaded, not git's state when the cell ends
            self.cells[key] = result
            WORK.mkdir(parents=True, exist_ok=True)
            tmp = self.cells_path.with_suffix(".partial")
            tmp.write_text(json.dumps(self.cells, indent=1))
            tmp.replace(self.cells_path)
            shown = {k: v for k, v in result.items() if k in ("accuracy", "se", "seconds", "acceptance_rate")}
            log(f"{key} done: {shown}")
        return self.cells[key]

    # -- building blocks ---------------------------------------------------------------------------
    def score(self, lm: str, task: Any, adapter: Path | None = None) -> dict[str, Any]:
        model, tok = self.lm(lm)
        name = ak.load(model, adapter, "scored") if adapter else None
        try:
            ak.activate(model, name)
            start = time.perf_counter()
            result = exact_match(model, tok, [task.prompt(e) for e in task.test], [e.target for e in task.test],
                                 batch_size=self.args.eval_batch)
            seconds = time.perf_counter() - start
        finally:
            if name:
                ak.detach(model, name)
        bits = [int(normalise_answer(p) == normalise_answer(e.target)) for e, p in zip(task.test, result.predictions)]
        return {"accuracy": result.accuracy, "se": result.standard_error, "correct": result.correct, "n": result.total,
                "eval_seconds": seconds, "correct_bits": "".join(map(str, bits)),
                "examples": [[e.input, e.target, p] for e, p in list(zip(task.test, result.predictions))[:5]]}

    def fit(self, lm: str, prompts: list[str], answers: list[str], method: str, out: Path, seed: int) -> dict[str, Any]:
        """The same path as a transfer's training stage (T.train_student): seeded initial values,
        gradient masks calibrated on the pairs, the model restored afterwards."""
        model, tok = self.lm(lm)
        losses = T.train_student(model, tok, STUDENTS[method](), "student", prompts, answers, out,
                                 epochs=self.args.epochs, seed=seed)
        return {"pairs": sum(bool(a.strip()) for a in answers), "first_loss": losses[0],
                "last_loss": sum(losses[-5:]) / len(losses[-5:])}

    def trained_and_scored(self, lm: str, task: Any, prompts: list[str], answers: list[str], method: str, out: Path,
                           seed: int) -> dict[str, Any]:
        fitted = self.fit(lm, prompts, answers, method, out, seed)
        return {**fitted, **self.score(lm, task, out)}

    def teacher(self, bundle: Any, adapter: Path | None = None) -> tuple[T.Teacher, T.Discriminator]:
        model, tok = self.lm("smollm2")
        for name in ("discriminator", "source"):
            if name in ak.adapters(model):
                ak.detach(model, name)
        return T.load_source(bundle, model, tok, adapter)

    # -- one task --------------------------------------------------------------------------------------
    def run_task(self, name: str, cells: list[str], seed: int) -> None:
        task = lm_task(name)
        work = WORK / name / f"seed{seed}"
        key = lambda cell: f"{name}/{cell}/seed{seed}"  # noqa: E731
        real_prompts = [task.prompt(e) for e in task.train]
        real_answers = [e.target for e in task.train]
        source_dir, bundle_dir, tl_dir = work / "source_lora", work / "bundle", work / "translora"
        for cell in cells:
            if cell == "src_base" and seed == 0:
                self.cell(key(cell), lambda: self.score("smollm2", task))
            elif cell == "tgt_base" and seed == 0:
                self.cell(key(cell), lambda: self.score("gemma3", task))
            elif cell == "src_lora":
                self.cell(key(cell), lambda: self.trained_and_scored("smollm2", task, real_prompts, real_answers, "lora",
                                                                     source_dir, seed))
            elif cell == "oracle":
                self.cell(key(cell), lambda: self.trained_and_scored("gemma3", task, real_prompts, real_answers, "lora",
                                                                     work / "oracle", seed))
            elif cell == "bundle":
                self.cell(key(cell), lambda: self.prepare(task, source_dir, bundle_dir, seed))
            elif cell == "translora":
                self.cell(key(cell), lambda: self.transfer(task, bundle_dir, tl_dir, seed))
            elif cell == "unfiltered":
                self.cell(key(cell), lambda: self.distil_from(task, bundle_dir, self.candidates(tl_dir, filtered=False),
                                                              work / "unfiltered", "lora", seed))
            elif cell == "random":
                self.cell(key(cell), lambda: self.distil_from(task, bundle_dir, list(random_texts(250, seed)),
                                                              work / "random", "lora", seed))
            elif cell == "seeds_only":
                bundle = T.load_bundle(bundle_dir)
                reps = 250 // len(bundle.seeds)
                self.cell(key(cell), lambda: self.trained_and_scored(
                    "gemma3", task, [task.prompt(s.input) for s in bundle.seeds] * reps,
                    [s.target for s in bundle.seeds] * reps, "lora", work / "seeds_only", seed))
            elif cell == "probe":
                self.cell(key(cell), lambda: self.probe(bundle_dir, seed))
            elif cell == "mmd":
                self.cell(key(cell), lambda: self.mmd(task, tl_dir))
            elif cell.startswith("cross_"):
                method = cell.removeprefix("cross_")
                self.cell(key(cell), lambda: self.distil_from(task, bundle_dir, self.candidates(tl_dir, filtered=True),
                                                              work / cell, method, seed,
                                                              answers=json.loads((tl_dir / "transfer" / "label.json").read_text())["answers"]))
            elif cell == "cont_smol_shira":
                self.cell(key(cell), lambda: self.smol_hop(task, bundle_dir, work / "cont_smol_shira", seed))
            elif cell == "cont_gemma":
                self.cell(key(cell), lambda: self.distil_from(task, bundle_dir, self.candidates(tl_dir, filtered=True),
                                                              work / "cont_gemma", "lora", seed,
                                                              teacher_adapter=work / "cont_smol_shira"))

    def rescore(self) -> None:
        """Score again the cells measured before per-example results were kept (a paired SE needs
        them); the accuracy must come out the same (greedy decoding is deterministic)."""
        adapters = {"src_base": ("smollm2", None), "tgt_base": ("gemma3", None), "src_lora": ("smollm2", "source_lora"),
                    "oracle": ("gemma3", "oracle"), "translora": ("gemma3", "translora")}
        for key, result in list(self.cells.items()):
            parts = key.split("/")
            if len(parts) != 3 or parts[1] not in adapters or "correct_bits" in result:
                continue
            lm, folder = adapters[parts[1]]
            log(f"rescore {key}")
            again = self.score(lm, lm_task(parts[0]), WORK / parts[0] / parts[2] / folder if folder else None)
            if again["correct"] != result["correct"]:
                raise SystemExit(f"{key}: rescoring gave {again['correct']} correct, the cell has {result['correct']}")
            result.update(correct_bits=again["correct_bits"], eval_seconds=again["eval_seconds"])
            self.cells_path.write_text(json.dumps(self.cells, indent=1))

    def prepare(self, task: Any, source_dir: Path, bundle_dir: Path, seed: int) -> dict[str, Any]:
        model, tok = self.lm("smollm2")
        longest = max(len(tok(s.input)["input_ids"]) for s in task.seeds)
        sampling = Sampling(max_new_tokens=min(200, 5 * (longest + 4)), do_sample=True, temperature=1.0, top_k=50)
        answer_tokens = max(len(tok(e.target)["input_ids"]) for e in task.train) + 4
        settings = T.PrepareSettings(seed=seed, candidate_sampling=sampling, answer_tokens=answer_tokens,
                                     epochs=self.args.disc_epochs)
        bundle = T.prepare(model, tok, source_dir, task, bundle_dir, STUDENTS["lora"](), source_model="smollm2",
                           settings=settings)
        return {"discriminator_holdout_accuracy": bundle.discriminator_accuracy,
                "candidate_max_new_tokens": sampling.max_new_tokens, "answer_tokens": answer_tokens}

    def transfer(self, task: Any, bundle_dir: Path, out: Path, seed: int, target: str = "gemma3",
                 method: str = "lora", teacher_adapter: Path | None = None) -> dict[str, Any]:
        bundle = T.load_bundle(bundle_dir)
        teacher, judge = self.teacher(bundle, teacher_adapter)
        model, tok = self.lm(target)
        settings = T.TransferSettings(seed=seed, epochs=self.args.epochs, generator_batch=self.args.gen_batch)
        outcome = T.Transfer(bundle, out, settings).run(teacher, judge, model, tok, STUDENTS[method]())
        stages = {s: json.loads((out / "transfer" / f"{s}.json").read_text())["seconds"] for s in ("sample", "label", "train")}
        scored = self.score(target, task, out)
        return {**scored, "acceptance_rate": outcome.sample.acceptance_rate, "calls": outcome.sample.calls,
                "judged": len(outcome.sample.candidates), "duplicates": outcome.sample.duplicates,
                "stage_seconds": {**stages, "eval": scored["eval_seconds"]}}

    def probe(self, bundle_dir: Path, seed: int, calls: int = 48) -> dict[str, Any]:
        """The acceptance rate of a transfer's sampling stage over ``calls`` generator calls, for tasks
        where reaching |D_syn| = 250 does not fit the CPU budget (the stage then stops on its budget)."""
        bundle = T.load_bundle(bundle_dir)
        _, judge = self.teacher(bundle)
        model, tok = self.lm("gemma3")
        generator = T.LMGenerator(model, tok, bundle.seed_prompt, bundle.candidate_sampling, self.args.gen_batch)
        verdicts: list[tuple[str, bool]] = []

        def accept(texts: list[str]) -> list[bool]:
            flags = judge.accept(texts)
            verdicts.extend(zip(texts, flags))
            return flags

        start = time.perf_counter()
        sampler = T.RejectionSampler(generator, accept, 250, max_calls=calls, exclude=[s.input for s in bundle.seeds])
        try:
            sampler.run(T.sample_stream(seed))
        except ak.errors.BudgetExceededError:
            pass
        accepted = [t for t, ok in verdicts if ok]
        return {"calls": calls, "judged": len(verdicts), "accepted": len(accepted),
                "acceptance_rate": len(accepted) / max(1, len(verdicts)), "sample_seconds": time.perf_counter() - start,
                "accepted_examples": accepted[:8], "rejected_examples": [t for t, ok in verdicts if not ok][:8]}

    def candidates(self, tl_dir: Path, filtered: bool) -> list[str]:
        sample = json.loads((tl_dir / "transfer" / "sample.json").read_text())
        return sample["accepted"] if filtered else sample["candidates"][:len(sample["accepted"])]

    def distil_from(self, task: Any, bundle_dir: Path, inputs: list[str], out: Path, method: str, seed: int,
                    answers: list[str] | None = None, teacher_adapter: Path | None = None) -> dict[str, Any]:
        bundle = T.load_bundle(bundle_dir)
        prompts = [bundle.prompt(x) for x in inputs]
        if answers is None:
            teacher, _ = self.teacher(bundle, teacher_adapter)
            answers = teacher.answers(prompts, Sampling(max_new_tokens=bundle.answer_tokens))
        return {"inputs": len(inputs), **self.trained_and_scored("gemma3", task, prompts, answers, method, out, seed)}

    def smol_hop(self, task: Any, bundle_dir: Path, out: Path, seed: int) -> dict[str, Any]:
        """SmolLM2 LoRA -> SmolLM2 SHiRA by Trans-LoRA (generator: SmolLM2 itself, same discriminator)."""
        return self.transfer(task, bundle_dir, out, seed, target="smollm2", method="shira")

    def mmd(self, task: Any, tl_dir: Path) -> dict[str, Any]:
        from sentence_transformers import SentenceTransformer

        from adapterkit.zoo.models import minilm_path

        encoder = SentenceTransformer(str(minilm_path()), device="cpu")
        embed = lambda texts: torch.tensor(encoder.encode(list(texts), batch_size=64))  # noqa: E731
        real = embed([e.input for e in task.test[:250]])
        filtered, unfiltered = embed(self.candidates(tl_dir, True)), embed(self.candidates(tl_dir, False))
        seeds = embed([e.input for e in task.train[5:]])  # the 245 real training inputs that are not seeds
        bandwidth = median_distance(torch.cat([real, filtered, unfiltered]))
        return {"filtered": T.mmd(filtered, real, bandwidth), "unfiltered": T.mmd(unfiltered, real, bandwidth),
                "real_train": T.mmd(seeds, real, bandwidth), "bandwidth": bandwidth}

    def speed(self) -> dict[str, Any]:
        """Tokens/s of batched KV-cache decoding (16 prompts x 64 forced new tokens) for both LMs."""
        task = lm_task("vader_movies")
        prompt = T.SeedPrompt(tuple(s.input for s in task.seeds)).build()
        result = {}
        for name in ("smollm2", "gemma3"):
            model, tok = self.lm(name)
            for label, sampling in (("sampled", Sampling(max_new_tokens=64, do_sample=True, top_k=50)),
                                    ("greedy", Sampling(max_new_tokens=64))):
                start = time.perf_counter()
                outs = generate(model, tok, [prompt] * 16, sampling, batch_size=16, template=False, seed=0, progress=False)
                seconds = time.perf_counter() - start
                tokens = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs)
                result[f"{name}/{label}"] = {"seconds": seconds, "new_tokens": tokens, "tokens_per_s": tokens / seconds}
        return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--cells", default=",".join(MAIN + ABLATIONS), help="cells in the order to run them")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--disc-epochs", type=int, default=1)
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--speed", action="store_true", help="measure generation speed (a cell of its own)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rescore", action="store_true", help="add per-example results to cells measured without them")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    bench.cells.setdefault("_meta", {"provenance": provenance(), "hardware": hardware(), "argv": argv, "runs": []})
    bench.cells["_meta"]["runs"].append({"argv": argv, "provenance": provenance(), "started": time.time()})
    if args.rescore:
        bench.rescore()
    if args.speed:
        bench.cell("speed", bench.speed)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.tasks.split(","):
            bench.run_task(name, args.cells.split(","), seed)
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
