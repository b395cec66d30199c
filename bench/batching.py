"""The batched decoder against solo decoding, on a checkpoint in its serving dtype, in one process.

Eight different conversations (text, and uploads of shapes-world scenes) are answered greedily twice: each
alone through `stream_reply`, then all at once through `model.serving.DecodeEngine` with 1, 2, 4 and 8 rows.
Reports how many replies are the same token for token as the solo ones (a batch's padded matrices round
differently from a single row's, so a near-tie can flip), and the tokens per second of all replies together
for each batch size, against solo decoding one after the other. Every pass reads its prompts whole
(`GroundedLM.prefixes` emptied first). For a checkpoint with IMMO's Reasoner, four compound questions are also
thought about (`model.monologue.think`) one after another alone, then all at once through the engine (the
Reasoner's lines and the Observer's answers as rows of one batch): the monologues that are the same line for
line, and the seconds each way.

    python -m bench.batching [--checkpoint demo] [--new-tokens 32]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from model.generate import GenerationSettings, Text, stream_reply
from model.grounded import GroundedLM
from model.monologue import Monologue, think
from model.prompt import Turn
from model.serving import DecodeEngine
from model.training.evaluate_questions import QUESTION_OFFSET
from model.world import questions, shapes

RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS = ("Describe the image.", "What is in this picture?", "What colour is the shape on the left?",
             "How many objects are there?")
REQUESTS = ("Show me a picture of a large red circle.", "Can you find a small blue square on the left?",
            "Write a short story about a green triangle.", "What is a hexagon?")


def conversations() -> list[list[Turn]]:
    uploads = [[Turn("user", [shapes.sample("test", i, image_size=128).image, q])] for i, q in enumerate(QUESTIONS)]
    return uploads + [[Turn("user", [text])] for text in REQUESTS]


def reply_of(events: list) -> tuple[str, int]:
    return "".join(e.delta for e in events if isinstance(e, Text)), events[-1].stats["new_tokens"]


def monologue_of(model: GroundedLM, turns: list[Turn], engine: DecodeEngine | None) -> list[tuple[str, str]]:
    record = Monologue()
    list(think(model, turns, GenerationSettings(max_new_tokens=32), record=record, engine=engine))
    return record.lines


def thinking(model: GroundedLM, n: int = 4) -> dict:
    """n compound test questions thought about alone one after another, then at once through the engine."""
    asked = [questions.question("test", QUESTION_OFFSET + i, 128, kinds=questions.COMPOUND_KINDS) for i in range(n)]
    chats = [[Turn("user", [sample.image, q.text])] for sample, q in asked]
    model.prefixes.clear()
    start = time.perf_counter()
    alone = [monologue_of(model, chat, None) for chat in chats]
    alone_s = time.perf_counter() - start
    model.prefixes.clear()
    engine = DecodeEngine(model, max_batch=2 * n)
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as sessions:
        batched = list(sessions.map(lambda chat: monologue_of(model, chat, engine), chats))
    batched_s = time.perf_counter() - start
    engine.close()
    return {"questions": n, "alone_s": alone_s, "batched_s": batched_s,
            "same": sum(a == b for a, b in zip(alone, batched)),
            "differing": [(a, b) for a, b in zip(alone, batched) if a != b]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    model = GroundedLM.from_pretrained(args.checkpoint, device=args.device)
    chats = conversations()
    settings = GenerationSettings(max_new_tokens=args.new_tokens)
    list(stream_reply(model, chats[0], GenerationSettings(max_new_tokens=2)))  # warm-up

    model.prefixes.clear()
    start = time.perf_counter()
    solo = [reply_of(list(stream_reply(model, chat, settings))) for chat in chats]
    solo_s = time.perf_counter() - start
    tokens = sum(n for _, n in solo)
    rows = [{"decoding": "solo, one after another", "seconds": solo_s, "tokens_per_s": tokens / solo_s,
             "same": None}]
    for max_batch in (1, 2, 4, 8):
        engine = DecodeEngine(model, max_batch=max_batch, max_waiting=len(chats))
        model.prefixes.clear()
        start = time.perf_counter()
        streams = [engine.submit(chat, settings) for chat in chats]
        batched = [reply_of(list(stream)) for stream in streams]
        seconds = time.perf_counter() - start
        engine.close()
        same = sum(b == s for b, s in zip(batched, solo))
        rows.append({"decoding": f"batched, {max_batch} rows", "seconds": seconds,
                     "tokens_per_s": sum(n for _, n in batched) / seconds, "same": same,
                     "differing": [(s[0], b[0]) for b, s in zip(batched, solo) if b != s]})

    print(f"{args.checkpoint} ({model.config.quantize}, compute {model.config.compute_dtype}, {args.device}), "
          f"{len(chats)} conversations, {args.new_tokens} new tokens greedy, {os.cpu_count()} CPUs")
    print("| decoding | seconds | tokens/s, all replies | vs solo | replies equal to solo |\n|---|---|---|---|---|")
    for row in rows:
        same = "" if row["same"] is None else f"{row['same']} of {len(chats)}"
        print(f"| {row['decoding']} | {row['seconds']:.1f} | {row['tokens_per_s']:.1f} "
              f"| {row['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x | {same} |")
    thought = thinking(model) if model.reasoner is not None else None
    if thought:
        print(f"\n{thought['questions']} compound questions thought about: alone one after another "
              f"{thought['alone_s']:.1f} s, at once through the engine {thought['batched_s']:.1f} s "
              f"({thought['alone_s'] / thought['batched_s']:.2f}x); the same monologue line for line: "
              f"{thought['same']} of {thought['questions']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"batching-{args.device}.json").write_text(json.dumps(
        {"checkpoint": args.checkpoint, "quantize": model.config.quantize, "compute_dtype": model.config.compute_dtype,
         "new_tokens": args.new_tokens, "conversations": len(chats), "rows": rows, "thinking": thought},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
