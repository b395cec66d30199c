"""The batched decoder against solo decoding, on a checkpoint in its serving dtype, in one process.

Eight different conversations (text, and uploads of shapes-world scenes) are answered greedily twice: each
alone through `stream_reply`, then all at once through `model.serving.DecodeEngine` with 1, 2, 4 and 8 rows.
Reports how many replies are the same token for token as the solo ones (a batch's padded matrices round
differently from a single row's, so a near-tie can flip), and the tokens per second of all replies together
for each batch size, against solo decoding one after the other.

    python -m bench.batching [--checkpoint demo] [--new-tokens 32]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from model.generate import GenerationSettings, Text, stream_reply
from model.grounded import GroundedLM
from model.prompt import Turn
from model.serving import DecodeEngine
from model.world import shapes

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

    start = time.perf_counter()
    solo = [reply_of(list(stream_reply(model, chat, settings))) for chat in chats]
    solo_s = time.perf_counter() - start
    tokens = sum(n for _, n in solo)
    rows = [{"decoding": "solo, one after another", "seconds": solo_s, "tokens_per_s": tokens / solo_s,
             "same": None}]
    for max_batch in (1, 2, 4, 8):
        engine = DecodeEngine(model, max_batch=max_batch, max_waiting=len(chats))
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
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"batching-{args.device}.json").write_text(json.dumps(
        {"checkpoint": args.checkpoint, "quantize": model.config.quantize, "compute_dtype": model.config.compute_dtype,
         "new_tokens": args.new_tokens, "conversations": len(chats), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
