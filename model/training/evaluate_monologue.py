"""IMMO, scored as the paper compared: the Observer alone, a Reasoner reading a caption, the monologue.

    python -m model.training.evaluate_monologue --checkpoint demo --per-kind 40 --out docs/immo_eval.json

Rows, on the same questions (`questions.question(split, QUESTION_OFFSET + i)` of each kind, the test split without
the hold-out pairs and the hold-out split, compound and simple kinds):
    observer   the grounded LM answers the question about the image directly (adapter off), as the app does
    hybrid     the Reasoner reads the Observer's description of the image instead of questioning it: one round
               ("Describe the image." and its answer), then the final answer
    immo       `model.monologue.think`, as the app runs it: questions, answers, final answer, with fallbacks
Each reply is read back with `questions.reply_answer`. The monologue row adds its fallback rate (a malformed
monologue answered by the Observer directly), the rounds it used and its seconds per question. Writes a JSON, a
bar plot beside it, and prints a table.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm import tqdm

from model.grounded import GroundedLM
from model.lm import QUANTIZE_CHOICES
from model.monologue import FINAL, Monologue, Reasoner, answer_line, heard, question_line, \
    reasoner_prompt, think
from model.generate import GenerationSettings
from model.prompt import Turn
from model.training.evaluate import greedy_replies, load, report
from model.training.evaluate_questions import QUESTION_OFFSET, SPLITS
from model.training.plots import plt, save_figure
from model.world import questions

ROWS = ("observer", "hybrid", "immo")
LABELS = {"observer": "(a) Observer alone", "hybrid": "(b) Reasoner reads a caption", "immo": "(c) IMMO monologue"}
DESCRIBE = "Describe the image."
ANSWER_TOKENS = 48


def hybrid_answer(model: GroundedLM, question: str, caption: str) -> str:
    """The Reasoner's final answer after one round whose answer is the Observer's caption."""
    reasoner = Reasoner(model, reasoner_prompt(model, question), GenerationSettings(max_new_tokens=ANSWER_TOKENS))
    reasoner.feed(question_line(1, DESCRIBE) + answer_line(1, heard(caption)) + FINAL)
    return "".join(piece for piece in reasoner.line(None) if isinstance(piece, str))


def of_kind(split: str, kind: str, n: int, image_size: int) -> list[tuple]:
    """The first n (sample, question) pairs of `kind` from QUESTION_OFFSET on: a scene that cannot carry the kind
    (a comparison needs two objects that can be named apart) is passed over, not asked something simpler."""
    found, index = [], QUESTION_OFFSET
    while len(found) < n:
        sample, q = questions.question(split, index, image_size, True, (kind,))
        if q.kind == kind:
            found.append((sample, q))
        index += 1
    return found


def score(model: GroundedLM, split: str, kinds: tuple[str, ...], per_kind: int, batch_size: int, max_rounds: int
          ) -> dict[str, dict]:
    """{row: {kind: {"accuracy", "n", ...}}} on `per_kind` questions of each kind of `split`."""
    image_size = model.visual.image_size[0]
    asked = [(kind, sample, q) for kind in kinds for sample, q in of_kind(split, kind, per_kind, image_size)]
    direct = greedy_replies(model, [[Turn("user", [s.image, q.text])] for _, s, q in asked],
                            max_new_tokens=ANSWER_TOKENS, batch_size=batch_size, desc=f"the Observer alone ({split})")
    captions = greedy_replies(model, [[Turn("user", [s.image, DESCRIBE])] for _, s, q in asked],
                              max_new_tokens=ANSWER_TOKENS, batch_size=batch_size, desc=f"captions ({split})")
    replies = {"observer": [r.text for r in direct], "hybrid": [], "immo": []}
    monologues, seconds = [], []
    for (_, sample, q), caption in tqdm(list(zip(asked, captions)), desc=f"monologues ({split})", unit="q"):
        replies["hybrid"].append(hybrid_answer(model, q.text, caption.text))
        record, t0 = Monologue(), time.perf_counter()
        for _ in think(model, [Turn("user", [sample.image, q.text])], GenerationSettings(max_new_tokens=ANSWER_TOKENS),
                       max_rounds=max_rounds, record=record):
            pass
        seconds.append(time.perf_counter() - t0)
        replies["immo"].append(record.answer)
        monologues.append(record)
    result: dict[str, dict] = {row: {} for row in ROWS}
    for kind in kinds:
        picked = [i for i, (k, _, _) in enumerate(asked) if k == kind]
        for row in ROWS:
            right = [questions.is_right(replies[row][i], asked[i][2]) for i in picked]
            result[row][kind] = {"accuracy": sum(right) / len(right), "n": len(right),
                                 "examples": [{"question": asked[i][2].text, "answer": asked[i][2].answer,
                                               "reply": replies[row][i]} for i in picked[:3]]}
        result["immo"][kind].update({
            "fallback_rate": sum(monologues[i].fallback is not None for i in picked) / len(picked),
            "mean_rounds": sum(monologues[i].rounds for i in picked) / len(picked),
            "seconds_per_question": sum(seconds[i] for i in picked) / len(picked),
            "monologues": [monologues[i].lines for i in picked[:3]],
            "fallbacks": [monologues[i].fallback for i in picked if monologues[i].fallback][:5]})
    return result


def mean_over(result: dict, row: str, kinds: tuple[str, ...], key: str = "accuracy") -> float:
    return sum(result[row][k][key] for k in kinds) / len(kinds)


def table(result: dict) -> str:
    splits = list(result["splits"])
    head = " | ".join(f"{group} ({split})" for split in splits for group in ("compound", "simple"))
    lines = [f"| accuracy (%) | {head} |", "|---" * (1 + 2 * len(splits)) + "|"]
    for row in ROWS:
        cells = [f"{100 * mean_over(result['splits'][s], row, kinds):.1f}" for s in splits
                 for kinds in (questions.COMPOUND_KINDS, questions.SIMPLE_KINDS)]
        lines.append(f"| {LABELS[row]} | " + " | ".join(cells) + " |")
    for key, label in (("fallback_rate", "monologue fallbacks (%)"), ("mean_rounds", "rounds used"),
                       ("seconds_per_question", "seconds per question")):
        scale = 100 if key == "fallback_rate" else 1
        cells = [f"{scale * mean_over(result['splits'][s], 'immo', kinds, key):.2f}" for s in splits
                 for kinds in (questions.COMPOUND_KINDS, questions.SIMPLE_KINDS)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    splits = list(result["splits"])
    fig, axes = plt.subplots(1, len(splits), figsize=(7 * len(splits), 3.8), sharey=True)
    kinds = list(questions.COMPOUND_KINDS + questions.SIMPLE_KINDS)
    width = 0.8 / len(ROWS)
    for ax, split in zip(axes, splits):
        for j, row in enumerate(ROWS):
            ax.bar([i + j * width for i in range(len(kinds))],
                   [result["splits"][split][row][k]["accuracy"] for k in kinds], width, label=LABELS[row])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(kinds))], kinds, fontsize=8)
        ax.axvline(len(questions.COMPOUND_KINDS) - 0.5 + 0.4 - width / 2, color="grey", lw=0.8, ls="--")
        ax.set(ylim=(0, 1.05), title=f"question accuracy, {split} split (compound | simple)")
    axes[0].legend(fontsize=7, loc="upper right")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="demo", help="folder or preset with a Reasoner")
    p.add_argument("--per-kind", type=int, default=40, help="questions of each kind, per split")
    p.add_argument("--max-rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None, help="default: as the checkpoint was trained")
    p.add_argument("--out", type=Path, default=Path("runs/immo_eval.json"))
    args = p.parse_args(argv)
    if args.per_kind < 1:
        raise SystemExit("--per-kind must be positive")
    model, _ = load(args.checkpoint, args.device, args.quantize)
    if model.reasoner is None:
        raise SystemExit(f"{args.checkpoint} has no Reasoner: train one with python -m model.training.monologue")
    t0 = time.time()
    result = {"checkpoint": args.checkpoint, "per_kind": args.per_kind, "max_rounds": args.max_rounds,
              "splits": {split: score(model, split, questions.KINDS, args.per_kind, args.batch_size, args.max_rounds)
                         for split in SPLITS}}
    result["seconds"] = round(time.time() - t0, 1)
    report(result, args.out, plot, table)
    return result


if __name__ == "__main__":
    main()
