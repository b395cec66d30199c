"""Training throughput of `model.training.train` steps, side by side, in one run, and whether each computes the
right gradient.

Each configuration trains the demo's model before cell words (SmolLM2-135M-Instruct, the demo CLIP, 4 CLS + 3 x 3
region tokens, MLP projector) on the same shapes-world batches of 16: single-turn batches (half captioning, half
requests answered by `[RET]`) and multi-turn ones (two or three described images first), mixed as training mixes
them (one in `CONTEXT_EVERY` multi-turn). Each step is timed in its parts: building the batch (drawing and
rendering scenes), CLIP, the LM forward, backward, the optimizer.

Speed is worth nothing if the step computes another gradient. Every setup starts from the same weights and takes
the gradient of one fixed batch, reported as its cosine to the exact one of the same LM (`EXACT`: fp32, 4-bit
dequantised or unquantised). bitsandbytes' kernels are exact where they dequantise at each call (an AVX2 CPU); on a
CPU with AVX512-BF16 or AMX, a layer's first call without gradient repacks its weights for an inference kernel that
has no backward, and from then on the gradient skips the LM's linear layers (cosine about 0.3). The ratios are
against the first `before` row whose gradient is right: the trainer as it was (4-bit, fp32, every turn with
gradient).

    python -m bench.training [--single 4] [--multi 2]

bf16 rows run only where the CPU computes bf16 natively (AMX / AVX512-BF16; elsewhere it is emulated and
far slower than fp32). Writes bench/results/training-<device>.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model.config import GroundedConfig
from model.grounded import GroundedLM
from model.lm import dequantized, native_bf16
from model.training.conversations import CONTEXT_EVERY, Conversations
from model.training.train import images_of, optimizer_for
from model.world.data import ShapesDataset

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("batch", "clip", "forward", "backward", "optimizer")
BATCH = 16


@dataclass(frozen=True)
class Setup:
    name: str
    quantize: str
    compute_dtype: str
    dequantize_once: bool
    context_grad: bool


SETUPS = (
    Setup("before: 4-bit (bnb kernels), fp32, every turn with gradient", "4bit", "float32", False, True),
    Setup("before, dequantised once: 4-bit, fp32, every turn with gradient", "4bit", "float32", True, True),
    Setup("4-bit (bnb kernels), fp32, earlier turns as context", "4bit", "float32", False, False),
    Setup("4-bit dequantised once, fp32, earlier turns as context", "4bit", "float32", True, False),
    Setup("unquantised, fp32, earlier turns as context", "none", "float32", False, False),
    Setup("4-bit (bnb kernels), bf16, earlier turns as context", "4bit", "bfloat16", False, False),
    Setup("4-bit dequantised once, bf16, earlier turns as context", "4bit", "bfloat16", True, False),
    Setup("unquantised, bf16, earlier turns as context", "none", "bfloat16", False, False),
)
EXACT = {"4bit": SETUPS[1], "none": SETUPS[4]}  # fp32; dequantised, the 4-bit LM's function with torch's backward
RIGHT_GRADIENT = 0.8  # cosine to EXACT: bf16 rounding gives ~0.93 on fresh mappings, skipping the LM's layers ~0.3


def build(setup: Setup) -> GroundedLM:
    """The model as `setup` trains it, with the same initial weights for every setup."""
    torch.manual_seed(0)
    clip = Path(__file__).resolve().parent.parent / "assets" / "demo" / "clip"
    config = GroundedConfig(visual=f"local-dir:{clip}")  # the demo's layout, its encoder found from anywhere
    model = GroundedLM(config, quantize=setup.quantize, device="cpu", compute_dtype=setup.compute_dtype)
    if setup.dequantize_once:
        model.lm = dequantized(model.lm)
    return model


def timed_step(model: GroundedLM, optimizer: torch.optim.Optimizer, data: Conversations, step: int,
               multi_turn: bool, context_grad: bool) -> dict[str, float]:
    """One training step, as model/training/train.py takes it, in timed parts (seconds)."""
    times, t = {}, time.perf_counter()

    def lap(part: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[part], t = now - t, now

    examples = data.batch(step, BATCH, multi_turn=multi_turn)
    lap("batch")
    model.visual_features(images_of(examples))
    lap("clip")
    result = model(examples, context_grad=context_grad)
    lap("forward")
    optimizer.zero_grad(set_to_none=True)
    result.loss.backward()
    lap("backward")
    optimizer.step()
    lap("optimizer")
    return times


def gradient(model: GroundedLM, data: Conversations, context_grad: bool) -> torch.Tensor:
    """The trainable weights' gradient on one fixed single-turn batch (whose context holds nothing trainable, so
    every setup's gradient is the same function), flattened, fp32. Taken twice, the second kept, so that whatever a
    kernel does at its first call (bitsandbytes' repacking) is in place, as in training."""
    examples = data.batch(10_000, BATCH, multi_turn=False)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        model(examples, context_grad=context_grad).loss.backward()
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return grads


def measure(setup: Setup, n_single: int, n_multi: int) -> tuple[dict, torch.Tensor]:
    """The setup's timed steps, and its gradient on the fixed batch (before any step changed the weights)."""
    model = build(setup)
    optimizer = optimizer_for(model, 1e-4)
    data = Conversations(ShapesDataset("train", 100_000, model.visual.image_size[0], holdout=True), seed=0)
    grads = gradient(model, data, setup.context_grad)
    timed_step(model, optimizer, data, 0, False, setup.context_grad)  # warm-up
    steps = {"single": [], "multi": []}
    kinds = [("single", False)] * n_single + [("multi", True)] * n_multi
    for i, (kind, multi_turn) in enumerate(tqdm(kinds, desc=setup.name[:40], unit="step", leave=False)):
        steps[kind].append(timed_step(model, optimizer, data, 1 + i, multi_turn, setup.context_grad))
    del model, optimizer
    gc.collect()
    result = {"setup": setup.__dict__}
    for kind, rows in steps.items():
        result[kind] = {part: statistics.median(r[part] for r in rows) for part in PARTS}
        result[kind]["total"] = statistics.median(sum(r.values()) for r in rows)
    mixed_seconds = (CONTEXT_EVERY - 1) * result["single"]["total"] + result["multi"]["total"]
    result["examples_per_s"] = BATCH * CONTEXT_EVERY / mixed_seconds
    return result, grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--single", type=int, default=4, help="single-turn batches timed per setup")
    parser.add_argument("--multi", type=int, default=2, help="multi-turn batches timed per setup")
    args = parser.parse_args()
    bf16 = native_bf16(torch.device("cpu"))
    setups = [s for s in SETUPS if s.compute_dtype == "float32" or bf16]
    measured = [measure(s, args.single, args.multi) for s in setups]
    exact = {quantize: measured[setups.index(setup)][1] for quantize, setup in EXACT.items()}
    results = [result for result, _ in measured]
    for result, grads in measured:
        reference = exact[result["setup"]["quantize"]]
        result["gradient_cosine"] = torch.nn.functional.cosine_similarity(grads, reference, dim=0).item()
        result["gradient_right"] = result["gradient_cosine"] >= RIGHT_GRADIENT
    baseline = next(r for r in results if r["setup"]["name"].startswith("before") and r["gradient_right"])
    for r in results:
        r["speedup"] = r["examples_per_s"] / baseline["examples_per_s"]

    RESULTS.mkdir(exist_ok=True)
    out = {"device": "cpu", "threads": torch.get_num_threads(), "native_bf16": bf16, "batch_size": BATCH,
           "context_every": CONTEXT_EVERY, "single_batches": args.single, "multi_batches": args.multi,
           "baseline": baseline["setup"]["name"], "results": results}
    (RESULTS / "training-cpu.json").write_text(json.dumps(out, indent=2))
    print(f"\nmodel.training.train steps of {BATCH} on this CPU ({torch.get_num_threads()} threads; native bf16: "
          f"{'yes' if bf16 else 'no, bf16 rows skipped'}); medians of {args.single} single-turn and {args.multi} "
          f"multi-turn batches; mixed = {CONTEXT_EVERY - 1} single + 1 multi; ratios against \"{baseline['setup']['name']}\"")
    print("| setup | single-turn s/batch | multi-turn s/batch | mixed examples/s | vs before | gradient vs exact "
          "(cosine) |\n|---|---|---|---|---|---|")
    for r in results:
        verdict = "" if r["gradient_right"] else " (wrong: not a training step)"
        print(f"| {r['setup']['name']} | {r['single']['total']:.2f} | {r['multi']['total']:.2f} | "
              f"{r['examples_per_s']:.2f} | {r['speedup']:.2f}x | {r['gradient_cosine']:.3f}{verdict} |")
    print("\nwhere a step's time goes (s; single-turn / multi-turn)")
    print("| setup | " + " | ".join(PARTS) + " |\n|---|" + "---|" * len(PARTS))
    for r in results:
        print(f"| {r['setup']['name']} | " + " | ".join(
            f"{r['single'][p]:.2f} / {r['multi'][p]:.2f}" for p in PARTS) + " |")


if __name__ == "__main__":
    main()
