"""Fit a request module's word decisions (`perception.WordDecisions`) on the answers themselves, before question
training carries them through the LM.

Trained only through the LM, decisions per cell never engage (docs/lmeye.md, "Decisions per cell"): the yes or no of
a few drill questions in a batch is too weak a signal for a new part. Here they learn from existence and binding
answers (whether any cell holds what is asked: binary cross-entropy) and count answers (how many do: squared
error), on the question's input rows and the image's region tokens, as pass 1 gives them: no LM forward, so a fit
on 4,500 questions takes about a minute here. Only the decisions' own weights change, and the tally that carries them into
the request tokens stays at zero: the checkpoint answers as before until question training teaches the LM to read it.

    python -m model.training.fit_word_decisions --init runs/lmeye-q6 --out runs/lmeye-words
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.checkpoint import resolve
from model.grounded import GroundedLM
from model.prompt import Turn, render
from model.training.plots import plot_fit
from model.training.train import CURVE_NAME, add_stage_options, conclude, stage_summary
from model.training.train_clip import resolve_device
from model.world import questions

KINDS = ("existence", "binding", "count")


@torch.no_grad()
def inputs(model: GroundedLM, split: str, n: int, holdout: bool, batch: int = 64) -> dict:
    """n questions of each of KINDS from `split` (scenes that cannot carry a kind skipped) -> each question's region
    tokens by cell (N, C, S, lm_dim), input rows at its request positions (N, Q, lm_dim) and their mask, its kind and
    answer (N,): 1 or 0 for yes or no, the number for a count."""
    asked = []
    for kind in KINDS:
        for i in range(n):
            sample, q = questions.question(split, i, model.visual.image_size[0], holdout, (kind,))
            if q.kind == kind:
                asked.append((sample.image, q))
    cells, words, masks = [], [], []
    for start in tqdm(range(0, len(asked), batch), desc=f"{split} questions", unit="batch"):
        chunk = asked[start:start + batch]
        tokens = model.visual_tokens(model.features_of(model.encoded([image for image, _ in chunk])))
        cells.append(model.perception.cells_of(tokens).float())
        rows, mask = model.question_rows([render([Turn("user", [image, q.text])], model.tokenizer,
                                                 model.config.prompt_format, look=True) for image, q in chunk])
        words.append(rows.float())
        masks.append(mask)
    mask = torch.cat(masks)
    mask[:, -1] = False                                                                 # the request row: not a word
    answers = [float(q.answer) if q.kind == "count" else {"yes": 1.0, "no": 0.0}[q.answer] for _, q in asked]
    return {"cells": torch.cat(cells), "words": torch.cat(words), "mask": mask, "kinds": [q.kind for _, q in asked],
            "answers": torch.tensor(answers)}


def losses(model: GroundedLM, data: dict, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fit's loss on questions `index`, and whether each was answered right (B,)."""
    held = model.perception.words.held(data["cells"][index], data["words"][index], data["mask"][index])  # (B, C)
    count = held.sum(-1)
    anything = (1 - (1 - held).prod(-1)).clamp(1e-6, 1 - 1e-6)
    is_count = torch.tensor([data["kinds"][i] == "count" for i in index.tolist()], device=held.device)
    answers = data["answers"][index].to(held.device)
    loss = torch.where(is_count, (count - answers) ** 2, F.binary_cross_entropy(anything, answers.clamp(0, 1),
                                                                                reduction="none")).mean()
    right = torch.where(is_count, count.round() == answers, (anything > 0.5).float() == answers)
    return loss, right


def fit(args: argparse.Namespace) -> dict:
    """Fit the decisions of `--init`'s request module (new ones, or its own again) and write the checkpoint to
    `--out` with the fit's curve and summary; returns the summary."""
    init = resolve(args.init)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model = GroundedLM.from_pretrained(init, device=device, word_decisions=True)
    t_start = time.time()
    data = {split: inputs(model, split, n, args.holdout) for split, n in (("train", args.questions),
                                                                          ("val", args.val_questions))}
    cache_seconds = time.time() - t_start
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [p for name, p in model.perception.words.named_parameters() if not name.startswith("tally")]
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(trained, lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    history = {"step": [], "loss": [], "val_loss": [], "val": []}
    val = data["val"]
    for step in (bar := tqdm(range(args.steps), desc="word decisions", unit="step", dynamic_ncols=True)):
        index = torch.randint(len(data["train"]["kinds"]), (args.batch_size,), generator=generator)
        loss, _ = losses(model, data["train"], index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % args.val_every == 0 or step + 1 == args.steps:
            with torch.no_grad():
                val_loss, right = losses(model, val, torch.arange(len(val["kinds"])))
            history["step"].append(step + 1)
            history["loss"].append(loss.item())
            history["val_loss"].append(val_loss.item())
            history["val"].append({kind: right[[k == kind for k in val["kinds"]]].float().mean().item()
                                   for kind in KINDS})
            tqdm.write(f"step {step + 1}  loss {loss.item():.4f}  val {val_loss.item():.4f}  " +
                       "  ".join(f"{k} {100 * v:.1f}" for k, v in history["val"][-1].items()))
    run_dir = Path(args.run_dir or Path("runs") / Path(args.out).name)
    run_dir.mkdir(parents=True, exist_ok=True)
    plot_fit(history, run_dir / CURVE_NAME, ("train (a batch)", "loss", "word decisions"),
             ("answered right (the decisions alone)", "validation, by kind"))
    summary = stage_summary(args, init, questions={k: len(v["kinds"]) for k, v in data.items()},
                            cache_seconds=round(cache_seconds, 1), seconds=round(time.time() - t_start, 1),
                            history=history, val=history["val"][-1])
    conclude(model, run_dir, Path(args.out), summary, args)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init", required=True, help="a checkpoint with a request module and cells of several tokens")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--run-dir", help="curve and working files (default: runs/<name of --out>)")
    p.add_argument("--questions", type=int, default=1500, help="training questions of each kind")
    p.add_argument("--val-questions", type=int, default=200, help="validation questions of each kind")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--val-every", type=int, default=500)
    add_stage_options(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    fit(parse_args())
