"""Question answering on the shapes world, scored exactly: accuracy by kind, on a split and on the hold-out.

    python -m model.training.evaluate_questions --checkpoint demo                       # one checkpoint
    python -m model.training.evaluate_questions --checkpoint runs/a --label "with request" \
        --checkpoint runs/b --label "without" --out docs/lmeye_ablation.json            # rows side by side

Each question is asked as the app asks it (`[image, question]`, greedy, a model with a request module looks
first) and its reply read back with `questions.reply_answer`. Questions are `questions.question(split, i)` from
QUESTION_OFFSET on, away from what evaluate.py draws, those of the kind asked (a kind or a drill, as `--kinds
binding`), and the same for every row: the test split without the hold-out pairs, which are asked about on the
hold-out split (a clean test for rows whose training never saw them; `holdout_pairs_seen_in_training` says
which). Writes a JSON, a bar plot beside it and, for models that look, a picture of where they looked
(`<out>_looked_<label>.png`); prints a table.
"""
from __future__ import annotations

import argparse
import itertools
import re
import time
from pathlib import Path

import torch

from model.checkpoint import resolve
from model.grounded import GroundedLM
from model.lm import QUANTIZE_CHOICES
from model.perception import heat_map
from model.generate import GenerationSettings, Looked, Text, stream_reply
from model.prompt import Turn
from model.training.evaluate import greedy_replies, load, report
from model.world import questions, shapes
from model.training.plots import plt, save_figure

QUESTION_OFFSET = 700_000
SPLITS = ("test", "holdout")


def first_questions(split: str, kind: str, n: int, image_size: int) -> list[tuple[shapes.Sample, questions.Question]]:
    """The first `n` questions of `kind` the evaluation asks on `split`: a scene that cannot carry the kind (one
    object, for a comparison) is passed over, not asked the fallback's attribute question."""
    drawn = (questions.question(split, QUESTION_OFFSET + i, image_size, True, (kind,)) for i in itertools.count())
    return list(itertools.islice((a for a in drawn if a[1].kind == kind), n))


def accuracy(model: GroundedLM, split: str, kinds: tuple[str, ...], per_kind: int, batch_size: int) -> dict:
    """{kind: {"accuracy", "n", "examples", "mistakes"}} for `per_kind` questions of each kind: the first five
    asked, and every one answered wrong (what the model gets wrong is what to look at next)."""
    image_size = model.visual.image_size[0]
    result = {}
    for kind in kinds:
        asked = first_questions(split, kind, per_kind, image_size)
        replies = greedy_replies(model, [[Turn("user", [s.image, q.text])] for s, q in asked], max_new_tokens=12,
                                 batch_size=batch_size, desc=f"{kind} ({split})")
        answered = [{"question": q.text, "answer": q.answer, "reply": r.text} for (_, q), r in zip(asked, replies)]
        right = [questions.is_right(r.text, q) for (_, q), r in zip(asked, replies)]
        result[kind] = {"accuracy": sum(right) / len(right), "n": len(right), "examples": answered[:5],
                        "mistakes": [a for a, ok in zip(answered, right) if not ok]}
    return result


@torch.no_grad()
def looked_figure(model: GroundedLM, path: Path, n: int = 6) -> None:
    """n test questions: the image with where the request looked, the question and the reply."""
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.3))
    for i, ax in enumerate(axes):
        sample, q = questions.question("test", QUESTION_OFFSET + i, model.visual.image_size[0], True,
                                       ("attribute", "location"))
        turns = [Turn("user", [sample.image, q.text])]
        events = list(stream_reply(model, turns, GenerationSettings(max_new_tokens=12)))  # greedy, as the app
        looked = next(e for e in events if isinstance(e, Looked))
        reply = "".join(e.delta for e in events if isinstance(e, Text))
        ax.imshow(heat_map(sample.image, looked.attention))
        ax.set_title(f"{q.text}\n-> {reply}", fontsize=7)
        ax.set_axis_off()
    save_figure(fig, path, dpi=90)


def table(rows: dict[str, dict]) -> str:
    kinds = list(next(iter(rows.values()))["splits"][SPLITS[0]])
    head = " | ".join(f"{k} ({s})" for s in SPLITS for k in kinds)
    lines = [f"| question accuracy (%) | {head} |", "|---" * (1 + len(SPLITS) * len(kinds)) + "|"]
    for label, row in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * row['splits'][s][k]['accuracy']:.1f}"
                                                  for s in SPLITS for k in kinds) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(SPLITS), figsize=(6.5 * len(SPLITS), 3.8), sharey=True)
    for ax, split in zip(axes, SPLITS):
        kinds = list(next(iter(rows.values()))["splits"][split])
        width = 0.8 / len(rows)
        for j, (label, row) in enumerate(rows.items()):
            ax.bar([i + j * width for i in range(len(kinds))], [row["splits"][split][k]["accuracy"] for k in kinds],
                   width, label=label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(kinds))], kinds)
        ax.set(ylim=(0, 1.05), title=f"question accuracy, {split} split")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, not over them
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, help="folder or preset; repeat for rows")
    p.add_argument("--label", action="append", default=None, help="a row's name in the table (one per --checkpoint)")
    p.add_argument("--kinds", nargs="+", choices=tuple(questions.ASKERS), default=list(questions.SIMPLE_KINDS))
    p.add_argument("--per-kind", type=int, default=200, help="questions of each kind, per split")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None, help="default: as the checkpoint was trained")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON to write (default: <first checkpoint>/eval_questions.json); plots go beside it")
    args = p.parse_args(argv)
    labels = args.label or args.checkpoint
    if len(labels) != len(args.checkpoint) or args.per_kind < 1:
        raise SystemExit("give one --label per --checkpoint (or none), and a positive --per-kind")
    out = args.out or resolve(args.checkpoint[0]) / "eval_questions.json"
    out.parent.mkdir(parents=True, exist_ok=True)  # before the first figure goes there
    rows = {}
    for checkpoint, label in zip(args.checkpoint, labels):
        t0 = time.time()
        model, kept_out = load(checkpoint, args.device, args.quantize)
        rows[label] = {"checkpoint": checkpoint, "request_tokens": model.config.request_tokens,
                       "region_grid": model.config.region_grid, "holdout_pairs_seen_in_training": not kept_out,
                       "splits": {split: accuracy(model, split, tuple(args.kinds), args.per_kind, args.batch_size)
                                  for split in SPLITS}}
        if model.perception is not None:
            looked_figure(model, out.with_name(f"{out.stem}_looked_{re.sub(r'[^a-z0-9]+', '-', label.lower())}.png"))
        rows[label]["seconds"] = round(time.time() - t0, 1)
        print(f"{label}: {rows[label]['seconds']:.0f}s", flush=True)
    report(rows, out, plot, table)
    return rows


if __name__ == "__main__":
    main()
