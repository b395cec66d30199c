"""One decode step of the batched decoder's shape, three ways, in one process: the engine's own (a `DynamicCache`,
eager), a `StaticCache` (eager), and the same forward through `torch.compile` (dynamic shapes).

B rows share a prompt of P random tokens; then each step feeds one token per row, as `model/serving.py` does
(`hidden_states` with an attention mask and position ids). Medians of the steps after the first four, measured
in two alternating rounds after compiling, each against the eager `DynamicCache` of the same round.

    python -m bench.decode_step [--checkpoint demo] [--rows 8] [--prompt 100] [--steps 24] [--device cuda]
                                [--quantize none]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import DynamicCache, StaticCache

from bench import synchronize
from model.grounded import GroundedLM

RESULTS = Path(__file__).resolve().parent / "results"


def step_ms(model: GroundedLM, forward: Callable, cache, rows: int, prompt: int, steps: int) -> tuple[float, float]:
    """(median ms of a step after the first four, ms of the first step) for one prefill and `steps` steps."""
    device = model.device
    ids = torch.randint(100, 5000, (rows, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones(rows, prompt, dtype=torch.long, device=device)
    times = []
    with torch.no_grad():
        forward(model.embed_ids(ids), mask, cache, torch.arange(prompt, device=device).expand(rows, -1))
        for step in range(steps):
            mask = torch.cat([mask, mask.new_ones(rows, 1)], 1)
            token = torch.randint(100, 5000, (rows, 1), device=device)
            synchronize(device)
            start = time.perf_counter()
            forward(model.embed_ids(token), mask, cache, torch.full((rows, 1), prompt + step, device=device))
            synchronize(device)
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times[4:]), times[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=100)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quantize", help="override the checkpoint's (4bit, 8bit, none)")
    args = parser.parse_args(argv)
    model = GroundedLM.from_pretrained(args.checkpoint, device=args.device, quantize=args.quantize)

    def eager(embeds, mask, cache, positions):
        return model.lm.base_model(inputs_embeds=embeds, attention_mask=mask, past_key_values=cache, use_cache=True,
                                   position_ids=positions)

    compiled = torch.compile(eager, dynamic=True)
    ways = {"DynamicCache, eager (the engine's)": (eager, DynamicCache),
            "StaticCache, eager": (eager, lambda: StaticCache(model.lm.config, max_cache_len=args.prompt + args.steps)),
            "DynamicCache, torch.compile": (compiled, DynamicCache)}
    start = time.perf_counter()
    _, first = step_ms(model, compiled, DynamicCache(), args.rows, args.prompt, args.steps)
    compile_s = time.perf_counter() - start
    print(f"torch.compile: {compile_s:.0f} s to compile and run once (first step {first / 1000:.0f} s)")
    ratios: dict[str, list[float]] = {name: [] for name in ways}
    rounds = []
    for round_ in range(2):
        measured = {name: step_ms(model, forward, cache(), args.rows, args.prompt, args.steps)[0]
                    for name, (forward, cache) in ways.items()}
        for name, ms in measured.items():
            ratios[name].append(ms / measured["DynamicCache, eager (the engine's)"])
        rounds.append(measured)
        print(f"round {round_ + 1}: " + ", ".join(f"{name} {ms:.0f} ms" for name, ms in measured.items()))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"decode_step-{args.device}-{model.config.quantize}.json").write_text(json.dumps(
        {**vars(args), "quantize": model.config.quantize, "compute_dtype": model.config.compute_dtype,
         "compile_s": compile_s, "step_ms": rounds, "ratios": ratios}, indent=2))
    print(f"\n{args.device}, {model.config.quantize} (compute {model.config.compute_dtype}), {args.rows} rows, "
          f"prompt {args.prompt}; a step vs the engine's, per round")
    print("| decode step | vs the engine's |\n|---|---|")
    for name, values in ratios.items():
        print(f"| {name} | {' / '.join(f'{v:.2f}x' for v in values)} |")


if __name__ == "__main__":
    main()
