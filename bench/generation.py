"""Streaming grounded generation vs plain `model.generate`, on SmolLM2, in one run.

Ours: `stream_reply` on a checkpoint (the demo unless told otherwise) with one image spliced into the prompt
(KV cache, [RET] logit, event stream).
Baseline: transformers' `generate` on the same LM with a text prompt of the same token length.
Reports decode tokens/s and time to first token for both and their ratios (medians over alternating repetitions, so
both see the same machine load); for a checkpoint with LMEye's request module, the same stream again looking at the
image first (its two passes share the prefix: target <= 1.15x the first token of the stream without it, on the same
model and prompt); then, once these have run, the same stream through the batched decoder (`model/serving.py`) as its
only row against the stream alone while the decoder's thread lives; and the memory of a process that loaded
the model with `--quantize none` vs `4bit` and generated a few tokens: resident in all, and what loading
the model added to what the imports took. For a checkpoint with IMMO's Reasoner: the time to the answer's first
token thinking first (`model.monologue.think`) against answering at once, on shapes-world compound questions,
with the rounds used; and the memory of the process with the adapter against the same checkpoint without it.
Every measurement reads its prompt whole (`GroundedLM.prefixes` emptied first), except the last: a
conversation's third turn, its first token with the turns before it remembered against read whole.

    python -m bench.generation [--checkpoint demo] [--device cpu|cuda] [--reps 5] [--new-tokens 48]
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from bench import synchronize
from model.generate import GenerationSettings, Text, stream_reply
from model.grounded import GroundedLM
from model.monologue import Monologue, think
from model.prompt import Turn, count_tokens, render
from model.serving import DecodeEngine
from model.training.evaluate_questions import QUESTION_OFFSET
from model.world import questions

RESULTS = Path(__file__).resolve().parent / "results"
QUESTION = "Write a long story about a red circle and a blue square who become friends."


class TokenClock(BaseStreamer):
    """Records when `generate` hands over each new token (the first `put` is the prompt)."""

    def __init__(self, start: float):
        self.start, self.times, self.prompt_seen = start, [], False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def build(checkpoint: str, quantize: str, device: str) -> GroundedLM:
    """A checkpoint as the app runs it (the demo's image takes 4 CLS + 9 x 4 cell-word tokens), loaded with `quantize`."""
    return GroundedLM.from_pretrained(checkpoint, quantize=quantize, device=device)


def ours(model: GroundedLM, turns: list[Turn], new_tokens: int, look: bool = False,
         engine: DecodeEngine | None = None) -> tuple[float, float, int]:
    """`stream_reply` decoding alone, or (`engine`) the same reply through the batched decoder, as its only row."""
    settings = GenerationSettings(max_new_tokens=new_tokens, look=look)
    model.prefixes.clear()
    events = engine.submit(turns, settings) if engine is not None else stream_reply(model, turns, settings)
    stats = [*events][-1].stats
    return stats["first_token_s"], stats["tokens_per_s"], stats["new_tokens"]


def baseline(model: GroundedLM, ids: torch.Tensor, new_tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    clock = TokenClock(start)
    model.lm.generate(ids, max_new_tokens=new_tokens, do_sample=False, streamer=clock,
                      pad_token_id=model.tokenizer.pad_token_id)
    synchronize(model.device)
    times = clock.times
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return times[0] - start, rate, len(times)


def first_answer_token_s(model: GroundedLM, turns: list[Turn], monologue: bool) -> tuple[float, int]:
    """Seconds to the first token of the answer (after the monologue, thinking first) and the rounds used."""
    model.prefixes.clear()
    start, first, record = time.perf_counter(), None, Monologue()
    events = (think(model, turns, GenerationSettings(max_new_tokens=32), record=record) if monologue
              else stream_reply(model, turns, GenerationSettings(max_new_tokens=32)))
    for event in events:
        if first is None and isinstance(event, Text):
            first = time.perf_counter() - start
    return first if first is not None else float("nan"), record.rounds


def next_turn(model: GroundedLM, image: Image.Image, reps: int) -> dict:
    """First token of a conversation's third turn: with its first two turns remembered (as after replying to
    them) against read whole; medians over alternating repetitions."""
    earlier = [Turn("user", [image, "What is in this picture?"]), Turn("assistant", ["A beige square."]),
               Turn("user", ["Is it a photograph?"])]
    third = earlier + [Turn("assistant", ["No, it is one flat colour."]), Turn("user", [QUESTION])]
    settings = GenerationSettings(max_new_tokens=2)
    times: dict[str, list[float]] = {"remembered": [], "read whole": []}
    for _ in range(reps + 1):  # the first round warms up
        for name in times:
            model.prefixes.clear()
            if name == "remembered":
                [*stream_reply(model, earlier, settings)]
            times[name].append([*stream_reply(model, third, settings)][-1].stats["first_token_s"])
    median = {name: statistics.median(t[1:]) for name, t in times.items()}
    return {"prompt_tokens": count_tokens(render(third, model.tokenizer, "chat"), model.config.tokens_per_image),
            "first_token_s": median, "ratio": median["remembered"] / median["read whole"]}


def thinking(model: GroundedLM, n: int) -> dict:
    """Thinking first against answering at once, on n compound questions (medians)."""
    image_size = model.visual.image_size[0]
    asked = [questions.question("test", QUESTION_OFFSET + i, image_size, True, questions.COMPOUND_KINDS)
             for i in range(n)]
    on = [first_answer_token_s(model, [Turn("user", [s.image, q.text])], True) for s, q in asked]
    off = [first_answer_token_s(model, [Turn("user", [s.image, q.text])], False) for s, q in asked]
    first_on, first_off = statistics.median(t for t, _ in on), statistics.median(t for t, _ in off)
    return {"questions": n, "first_answer_token_s": {"thinking": first_on, "answering": first_off},
            "ratio": first_on / first_off, "mean_rounds": sum(r for _, r in on) / n}


def without_reasoner(checkpoint: str) -> str:
    """A temporary copy of the checkpoint without its Reasoner (the same mappings and encoder: one the config names
    relative to the checkpoint, as a run's `../demo/clip` would be, by its absolute path)."""
    from model.checkpoint import read_checkpoint, resolve
    source = resolve(checkpoint)
    copy = Path(tempfile.mkdtemp(prefix="no-reasoner-")) / source.name
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("reasoner"))
    config, _ = read_checkpoint(source)
    config.reasoner = False
    config.save(copy)
    return str(copy)


def resident_mb(checkpoint: str, quantize: str, device: str) -> dict[str, float]:
    """Memory of a fresh process that loads the model and generates a few tokens (so the weights' pages are
    touched): resident in all, and what loading the model added to the process its imports made (on a GPU:
    allocated on the device)."""
    code = (f"from bench.generation import *; before = memory_mb({device!r}); m = build({checkpoint!r}, {quantize!r}, {device!r});"
            f"ours(m, [Turn('user', [Image.new('RGB', (64, 64)), 'Hi'])], 4); print(before, memory_mb({device!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = map(float, out.stdout.strip().splitlines()[-1].split())
    return {"process": after, "model": after - before}


def memory_mb(device: str) -> float:
    """Resident memory of this process now (on a GPU: allocated on the device), in MB."""
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    gc.collect()
    with open("/proc/self/status") as status:  # resident now, not the peak while weights were quantised
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="demo", help="preset or checkpoint folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quantize", default="4bit")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()

    model = build(args.checkpoint, args.quantize, args.device)
    looks = model.perception is not None
    image = Image.new("RGB", (128, 128), "beige")
    turns = [Turn("user", [image, QUESTION])]
    length = count_tokens(render(turns, model.tokenizer, "chat"), model.config.tokens_per_image)
    text_ids = [t for s in render([Turn("user", [QUESTION])], model.tokenizer, "chat") for t in s]
    filler = model.tokenizer(" picture" * (length - len(text_ids)), add_special_tokens=False).input_ids
    ids = torch.tensor([filler[:length - len(text_ids)] + text_ids], device=model.device)  # same length
    ours(model, turns, 4), ours(model, turns, 4, look=looks), baseline(model, ids, 4)  # warm-up
    # The solo rows before the batched decoder starts: while its thread lives, its OpenMP pool slows every call of
    # this thread on these 2-core CPUs (twice as slow, measured; README, "Many users at once").
    runs = {"ours": [], "baseline": []} | ({"looking": []} if looks else {})
    for _ in range(args.reps):
        runs["ours"].append(ours(model, turns, args.new_tokens))
        if looks:
            runs["looking"].append(ours(model, turns, args.new_tokens, look=True))
        runs["baseline"].append(baseline(model, ids, args.new_tokens))
    engine = DecodeEngine(model)
    ours(model, turns, 4, engine=engine)
    runs |= {"engine": [], "ours_beside_engine": []}
    for _ in range(args.reps):
        runs["engine"].append(ours(model, turns, args.new_tokens, engine=engine))
        runs["ours_beside_engine"].append(ours(model, turns, args.new_tokens))
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v),
               statistics.median(r[2] for r in v)) for k, v in runs.items()}
    memory = {q: resident_mb(args.checkpoint, q, args.device) for q in ("none", "4bit")}
    ratios = {k: memory["4bit"][k] / memory["none"][k] for k in ("process", "model")}
    result = {
        "checkpoint": args.checkpoint, "device": args.device, "quantize": args.quantize, "prompt_tokens": length,
        "reps": args.reps,
        **{k: {"first_token_s": m[0], "tokens_per_s": m[1], "new_tokens": m[2]} for k, m in med.items()},
        "decode_ratio": med["ours"][1] / med["baseline"][1],
        "first_token_ratio": med["ours"][0] / med["baseline"][0],
        "engine_decode_ratio": med["engine"][1] / med["ours_beside_engine"][1],
        "memory_mb": memory, "memory_ratio_4bit_vs_none": ratios, "next_turn": next_turn(model, image, args.reps),
    }
    if looks:
        result["looking_first_token_ratio"] = med["looking"][0] / med["ours"][0]
        result["looking_decode_ratio"] = med["looking"][1] / med["ours"][1]
    if model.reasoner is not None:
        plain = without_reasoner(args.checkpoint)
        result["thinking"] = thinking(model, args.reps)
        result["thinking"]["memory_mb"] = {"with adapter": memory[args.quantize]["process"] if args.quantize in memory
                                           else resident_mb(args.checkpoint, args.quantize, args.device)["process"],
                                           "without": resident_mb(plain, args.quantize, args.device)["process"]}
        shutil.rmtree(Path(plain).parent)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"generation-{args.device}.json").write_text(json.dumps(result, indent=2))
    print(f"\nSmolLM2-135M-Instruct ({args.quantize}, {args.device}), prompt {length} tokens, "
          f"{args.new_tokens} new tokens, median of {args.reps}")
    print("| | tokens/s | first token (s) |\n|---|---|---|")
    print(f"| grounded stream (1 image) | {med['ours'][1]:.1f} | {med['ours'][0]:.3f} |")
    print(f"| `model.generate` (text) | {med['baseline'][1]:.1f} | {med['baseline'][0]:.3f} |")
    print(f"| ratio (target) | {result['decode_ratio']:.2f} (>= 0.95) | {result['first_token_ratio']:.2f} (<= 1.2) |")
    if looks:
        print(f"| grounded stream, looking first (LMEye, {model.config.request_tokens} request tokens) | "
              f"{med['looking'][1]:.1f} | {med['looking'][0]:.3f} |")
        print(f"| looking / not (target) | {result['looking_decode_ratio']:.2f} (~1) | "
              f"{result['looking_first_token_ratio']:.2f} (<= 1.15) |")
    print(f"| the same stream through the batched decoder, alone | {med['engine'][1]:.1f} | {med['engine'][0]:.3f} |")
    print(f"| the stream decoded alone, the batched decoder's thread alive | {med['ours_beside_engine'][1]:.1f} | "
          f"{med['ours_beside_engine'][0]:.3f} |")
    print(f"| batched / solo, the same thread alive (target) | {result['engine_decode_ratio']:.2f} (>= 1) | |")
    if model.reasoner is not None:
        t = result["thinking"]
        print(f"| answering at once: first token of the answer (s) | | {t['first_answer_token_s']['answering']:.2f} |")
        print(f"| thinking first (IMMO, {t['mean_rounds']:.1f} rounds on average) | | "
              f"{t['first_answer_token_s']['thinking']:.2f} |")
        print(f"| thinking / not | | {t['ratio']:.1f} |")
        print(f"\nresident MB with the Reasoner's adapter {t['memory_mb']['with adapter']:.0f}, without "
              f"{t['memory_mb']['without']:.0f}")
    turn = result["next_turn"]
    print(f"\nthird turn ({turn['prompt_tokens']} prompt tokens), first token: earlier turns remembered "
          f"{turn['first_token_s']['remembered']:.3f} s, read whole {turn['first_token_s']['read whole']:.3f} s "
          f"({turn['ratio']:.2f}x)")
    peak = "GPU MB allocated" if args.device == "cuda" else "resident MB"
    print(f"\n| quantize | {peak}: process | loading the model added |\n|---|---|---|")
    for q in ("none", "4bit"):
        print(f"| {q} | {memory[q]['process']:.0f} | {memory[q]['model']:.0f} |")
    print(f"| 4bit / none | {ratios['process']:.2f} | {ratios['model']:.2f} |")


if __name__ == "__main__":
    main()
