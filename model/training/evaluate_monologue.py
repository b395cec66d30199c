"""IMMO, scored as the paper compared: the Observer alone, a Reasoner reading a caption, the monologue.

    python -m model.training.evaluate_monologue --checkpoint demo --per-kind 40 --out docs/immo_eval.json
    python -m model.training.evaluate_monologue --checkpoint runs/demo-rl --supervised demo   # (c) beside (d)

Rows, on the same questions (`questions.question(split, QUESTION_OFFSET + i)` of each kind, the test split without
the hold-out pairs and the hold-out split, compound and simple kinds):
    observer   the grounded LM answers the question about the image directly (adapter off), as the app does
               (looking first where the model has a request module)
    hybrid     the Reasoner reads the Observer's description of the image instead of questioning it: one round
               ("Describe the image." and its answer), then its reason and final answer
    immo       `model.monologue.think`, as the app runs it: questions, answers, final answer, with fallbacks;
               labelled (d) where the checkpoint's Reasoner was trained further by reinforcement
    supervised with `--supervised`, the same monologue with that checkpoint's Reasoner (the supervised one the
               reinforcement started from, swapped into the same LM): (c) beside (d) on the same questions
    exact      no Reasoner: the Observer asked the question's known steps (a simple question itself) as a monologue
               asks them (`monologue.OBSERVER_LOOKS`), its answers read exactly (`questions.implied_answer`); where
               they do not say, no answer (no guess). What a Reasoner that asks the right questions, never misreads
               and never guesses would score
Each reply is read back with `questions.reply_answer`. A monologue row adds its fallback rate (a malformed
monologue answered by the Observer directly), the rounds it used, and how often it misread the Observer (it asked
the known steps, the answers implied an answer, and it concluded another): the Reasoner's own errors, and every
monologue that concluded wrong (what to read before changing what the Reasoner learns). Monologues
and captions' readings decode `--batch-size` at a time through the app's batched decoder (greedy; a batch may
break a near tie otherwise than decoding alone would). Writes a JSON, a bar plot beside it, and prints a table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

from PIL import Image
from tqdm import tqdm

from model.checkpoint import resolve
from model.generate import GenerationSettings
from model.grounded import GroundedLM
from model.lm import QUANTIZE_CHOICES
from model.monologue import FINAL, REASON, Monologue, Reasoner, answer_line, heard, question_line, \
    reasoner_prompt, think
from model.prompt import Turn
from model.reasoner import FOLDER, adapter_weights, reasoner_weights
from model.serving import DecodeEngine
from model.training.evaluate import greedy_replies, load, report
from model.training.evaluate_questions import SPLITS, first_questions
from model.training.monologue import observer_answers, steps_of
from model.training.plots import plt, save_figure
from model.training.train import SUMMARY_NAME
from model.world import questions

LABELS = {"observer": "(a) Observer alone", "hybrid": "(b) Reasoner reads a caption",
          "supervised": "(c) IMMO monologue (supervised)",
          "exact": "(e) the Observer's answers to the known steps, read exactly, no guess"}
RL_LABEL = "(d) IMMO monologue (supervised + RL)"
DESCRIBE = "Describe the image."
ANSWER_TOKENS = 48
T = TypeVar("T")
R = TypeVar("R")


def at_once(engine: DecodeEngine, work: Callable[[T], R], items: list[T], desc: str) -> list[R]:
    """`work` on every item, as many at a time as the engine has rows: their decoding shares its batch."""
    with ThreadPoolExecutor(engine.max_batch) as sessions:
        return list(tqdm(sessions.map(work, items), total=len(items), desc=desc, unit="q"))


def hybrid_answer(model: GroundedLM, question: str, caption: str, engine: DecodeEngine) -> str:
    """The Reasoner's final answer after one round whose answer is the Observer's caption (and its reason, which
    comes first)."""
    reasoner = Reasoner(model, reasoner_prompt(model, question), GenerationSettings(max_new_tokens=ANSWER_TOKENS),
                        engine)
    reasoner.feed(question_line(1, DESCRIBE) + answer_line(1, heard(caption)) + REASON)
    for _ in reasoner.line(None):
        pass
    reasoner.feed(FINAL)
    return "".join(piece for piece in reasoner.line(None) if isinstance(piece, str))


def monologue(model: GroundedLM, image: Image.Image, question: str, max_rounds: int, engine: DecodeEngine
              ) -> Monologue:
    """The monologue the app runs on `question` about `image`, greedy."""
    record = Monologue()
    for _ in think(model, [Turn("user", [image, question])], GenerationSettings(max_new_tokens=ANSWER_TOKENS),
                   max_rounds=max_rounds, record=record, engine=engine):
        pass
    return record


def misread(record: Monologue, question: questions.Question) -> bool:
    """Whether a monologue asked the question's known steps, heard answers that imply an answer, and concluded
    another: an error of the Reasoner's, not of the Observer's."""
    if record.fallback or [q.lower() for q in record.asked] != [q.lower() for q in steps_of(question)]:
        return False
    implied = questions.implied_answer(question, record.answers)
    return implied is not None and questions.reply_answer(record.answer, question.answer_type) != implied[0]


def read_exactly(model: GroundedLM, asked: list[tuple], batch_size: int, split: str) -> list[str]:
    """The exact row's replies: what the Observer's greedy answers to each question's known steps imply, said as
    the model says an answer ("" where they do not say)."""
    heard_steps = observer_answers(model, [(sample.image, q) for _, sample, q in asked], batch_size,
                                   f"the known steps ({split})")
    implied = [questions.implied_answer(q, answers) for (_, _, q), answers in zip(asked, heard_steps)]
    return ["" if i is None else questions.reply_text(i[0]) for i in implied]


def score(model: GroundedLM, split: str, kinds: tuple[str, ...], per_kind: int, batch_size: int, max_rounds: int,
          supervised: dict | None = None) -> dict[str, dict]:
    """{row: {kind: {"accuracy", "n", ...}}} on `per_kind` questions of each kind of `split`; with `supervised`
    (adapter weights), the monologue again with those weights as the Reasoner."""
    image_size = model.visual.image_size[0]
    asked = [(kind, sample, q) for kind in kinds for sample, q in first_questions(split, kind, per_kind, image_size)]
    direct = greedy_replies(model, [[Turn("user", [s.image, q.text])] for _, s, q in asked],
                            max_new_tokens=ANSWER_TOKENS, batch_size=batch_size, desc=f"the Observer alone ({split})")
    captions = greedy_replies(model, [[Turn("user", [s.image, DESCRIBE])] for _, s, q in asked],
                              max_new_tokens=ANSWER_TOKENS, batch_size=batch_size, desc=f"captions ({split})")
    engine = DecodeEngine(model, max_batch=batch_size)
    with contextlib.closing(engine):
        replies = {"observer": [r.text for r in direct],
                   "hybrid": at_once(engine, lambda pair: hybrid_answer(model, pair[0][2].text, pair[1].text, engine),
                                     list(zip(asked, captions)), f"reading captions ({split})")}

        def monologues(row: str) -> list[Monologue]:
            return at_once(engine, lambda item: monologue(model, item[1].image, item[2].text, max_rounds, engine),
                           asked, f"monologues, {row} ({split})")

        records = {"immo": monologues("immo")}
        if supervised is not None:
            with adapter_weights(model.lm, supervised):
                records["supervised"] = monologues("supervised")
    replies.update({row: [r.answer for r in rows] for row, rows in records.items()})
    replies["exact"] = read_exactly(model, asked, batch_size, split)
    result: dict[str, dict] = {row: {} for row in replies}
    for kind in kinds:
        picked = [i for i, (k, _, _) in enumerate(asked) if k == kind]
        right = {row: [questions.is_right(replies[row][i], asked[i][2]) for i in picked] for row in replies}
        for row in replies:
            result[row][kind] = {"accuracy": sum(right[row]) / len(picked), "n": len(picked),
                                 "examples": [{"question": asked[i][2].text, "answer": asked[i][2].answer,
                                               "reply": replies[row][i]} for i in picked[:3]]}
        for row, rows in records.items():
            result[row][kind].update({
                "fallback_rate": sum(rows[i].fallback is not None for i in picked) / len(picked),
                "mean_rounds": sum(rows[i].rounds for i in picked) / len(picked),
                "misread_rate": sum(misread(rows[i], asked[i][2]) for i in picked) / len(picked),
                "monologues": [rows[i].lines for i in picked[:3]],
                "wrong": [{"question": asked[i][2].text, "answer": asked[i][2].answer, "lines": rows[i].lines}
                          for i, ok in zip(picked, right[row]) if not ok],
                "fallbacks": [rows[i].fallback for i in picked if rows[i].fallback][:5]})
    return result


def mean_over(result: dict, row: str, kinds: tuple[str, ...], key: str = "accuracy") -> float:
    return sum(result[row][k][key] for k in kinds) / len(kinds)


def table(result: dict) -> str:
    splits, labels = list(result["splits"]), result["labels"]
    head = " | ".join(f"{group} ({split})" for split in splits for group in ("compound", "simple"))
    lines = [f"| accuracy (%) | {head} |", "|---" * (1 + 2 * len(splits)) + "|"]
    groups = (questions.COMPOUND_KINDS, questions.SIMPLE_KINDS)
    for row, label in labels.items():
        cells = [f"{100 * mean_over(result['splits'][s], row, kinds):.1f}" for s in splits for kinds in groups]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for row in (row for row in labels if row in ("supervised", "immo")):
        for key, name, scale in (("fallback_rate", "fallbacks (%)", 100), ("mean_rounds", "rounds used", 1),
                                 ("misread_rate", "misread the Observer (%)", 100)):
            cells = [f"{scale * mean_over(result['splits'][s], row, kinds, key):.2f}" for s in splits
                     for kinds in groups]
            lines.append(f"| {labels[row][:3]} {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    splits, labels = list(result["splits"]), result["labels"]
    fig, axes = plt.subplots(1, len(splits), figsize=(7 * len(splits) + 3, 3.8), sharey=True)
    kinds = list(questions.COMPOUND_KINDS + questions.SIMPLE_KINDS)
    width = 0.8 / len(labels)
    for ax, split in zip(axes, splits):
        for j, (row, label) in enumerate(labels.items()):
            ax.bar([i + j * width for i in range(len(kinds))],
                   [result["splits"][split][row][k]["accuracy"] for k in kinds], width, label=label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(kinds))], kinds, fontsize=8)
        ax.axvline(len(questions.COMPOUND_KINDS) - 0.5 + 0.4 - width / 2, color="grey", lw=0.8, ls="--")
        ax.set(ylim=(0, 1.05), title=f"question accuracy, {split} split (compound | simple)")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, not on them
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="demo", help="folder or preset with a Reasoner")
    p.add_argument("--supervised", help="with a checkpoint whose Reasoner was trained by reinforcement: the folder or "
                   "preset holding the supervised Reasoner it started from, scored beside it")
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
    record = resolve(args.checkpoint) / FOLDER / SUMMARY_NAME
    reinforced = record.is_file() and "rl" in json.loads(record.read_text())
    if args.supervised and not reinforced:
        raise SystemExit(f"--supervised sets a Reasoner beside one trained further by reinforcement; the Reasoner "
                         f"of {args.checkpoint} was not (python -m model.training.monologue_rl)")
    supervised = reasoner_weights(model.lm, resolve(args.supervised) / FOLDER) if args.supervised else None
    labels = {**{row: LABELS[row] for row in ("observer", "hybrid") + (("supervised",) if supervised else ())},
              "immo": RL_LABEL if reinforced else LABELS["supervised"], "exact": LABELS["exact"]}
    t0 = time.time()
    result = {"checkpoint": args.checkpoint, "supervised": args.supervised, "per_kind": args.per_kind,
              "max_rounds": args.max_rounds, "labels": labels,
              "splits": {split: score(model, split, questions.KINDS, args.per_kind, args.batch_size, args.max_rounds,
                                      supervised) for split in SPLITS}}
    result["seconds"] = round(time.time() - t0, 1)
    report(result, args.out, plot, table)
    return result


if __name__ == "__main__":
    main()
