"""Training throughput of `model.training.train` steps, side by side, in one run.

Each configuration trains the demo's model before cell words (SmolLM2-135M-Instruct, the demo CLIP, 4 CLS + 3 x 3 region tokens,
MLP projector) on the same shapes-world batches of 16: single-turn batches (half captioning, half requests
answered by `[RET]`) and multi-turn ones (two or three described images first), mixed as training mixes them
(one in `CONTEXT_EVERY` multi-turn). Each step is timed in its parts: building the batch (drawing and
rendering scenes), CLIP, the LM forward, backward, the optimizer. The first row is the baseline the ratios
are against: the trainer as it was (4-bit through bitsandbytes' kernels, every turn with gradient).

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
    Setup("4-bit (bnb kernels), fp32, earlier turns as context", "4bit", "float32", False, False),
    Setup("4-bit dequantised once, fp32 (what the demo trains with here)", "4bit", "float32", True, False),
    Setup("unquantised, fp32", "none", "float32", False, False),
    Setup("4-bit dequantised once, bf16", "4bit", "bfloat16", True, False),
    Setup("unquantised, bf16", "none", "bfloat16", False, False),
)


def build(setup: Setup) -> GroundedLM:
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


def measure(setup: Setup, n_single: int, n_multi: int) -> dict:
    model = build(setup)
    optimizer = optimizer_for(model, 1e-4)
    data = Conversations(ShapesDataset("train", 100_000, model.visual.image_size[0], holdout=True), seed=0)
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
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--single", type=int, default=4, help="single-turn batches timed per setup")
    parser.add_argument("--multi", type=int, default=2, help="multi-turn batches timed per setup")
    args = parser.parse_args()
    bf16 = native_bf16(torch.device("cpu"))
    setups = [s for s in SETUPS if s.compute_dtype == "float32" or bf16]
    results = [measure(s, args.single, args.multi) for s in setups]
    base = results[0]["examples_per_s"]
    for r in results:
        r["speedup"] = r["examples_per_s"] / base

    RESULTS.mkdir(exist_ok=True)
    out = {"device": "cpu", "threads": torch.get_num_threads(), "native_bf16": bf16, "batch_size": BATCH,
           "context_every": CONTEXT_EVERY, "single_batches": args.single, "multi_batches": args.multi,
           "results": results}
    (RESULTS / "training-cpu.json").write_text(json.dumps(out, indent=2))
    print(f"\nmodel.training.train steps of {BATCH} on this CPU ({torch.get_num_threads()} threads; native bf16: "
          f"{'yes' if bf16 else 'no, bf16 rows skipped'}); medians of {args.single} single-turn and {args.multi} "
          f"multi-turn batches; mixed = {CONTEXT_EVERY - 1} single + 1 multi")
    print("| setup | single-turn s/batch | multi-turn s/batch | mixed examples/s | vs before |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['setup']['name']} | {r['single']['total']:.2f} | {r['multi']['total']:.2f} | "
              f"{r['examples_per_s']:.2f} | {r['speedup']:.2f}x |")
    print("\nwhere a step's time goes (s; single-turn / multi-turn)")
    print("| setup | " + " | ".join(PARTS) + " |\n|---|" + "---|" * len(PARTS))
    for r in results:
        print(f"| {r['setup']['name']} | " + " | ".join(
            f"{r['single'][p]:.2f} / {r['multi'][p]:.2f}" for p in PARTS) + " |")


if __name__ == "__main__":
    main()
