"""The stage before captioning with cell words (`cell_words.py`): a checkpoint's region mapping is replaced by one
of four tokens per cell (one that has four already keeps its own and trains it further), trained on the cell-word
loss alone (no LM forward: 4 steps of 16 scenes a second on this repo's CPU), so that the LM meets cells that
already read as words when `train.py --cell-words` starts teaching it to describe from them. `--cell-patches N`
gives the new mapping each cell as N x N pooled patches side by side rather than their mean, which loses shape.

    python -m model.training.train_cells --init runs/base --out runs/cells --steps 2000   # runs/base: one token per cell
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from model.checkpoint import resolve
from model.grounded import GroundedLM
from model.training.cell_words import SLOTS, cell_word_loss, nearest_words
from model.training.optimization import param_groups, schedule_step
from model.training.plots import plot_batches, plt, save_figure
from model.training.train import CURVE_NAME, add_stage_options, conclude, stage_summary
from model.training.train_clip import resolve_device


def pretrain(args: argparse.Namespace) -> dict:
    """A new region mapping of four tokens per cell on `--init`'s checkpoint, trained on the loss alone."""
    init = resolve(args.init)
    model = GroundedLM.from_pretrained(init, device=resolve_device(args.device), tokens_per_cell=len(SLOTS),
                                       cell_patches=args.cell_patches)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("region_mapping.", "region_positions")))
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=args.lr)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    run_dir = Path(args.run_dir or Path("runs") / Path(args.out).name)
    run_dir.mkdir(parents=True, exist_ok=True)
    losses, t_start = [], time.time()
    for step in (bar := tqdm(range(args.steps), desc="cell words", unit="step", dynamic_ncols=True)):
        schedule_step(optimizer, step, args.steps, max(1, args.steps // 20), args.lr)
        loss = cell_word_loss(model, step, args.batch_size, args.holdout, args.seed)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    nearest = nearest_words(model)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    plot_batches(ax, list(range(1, len(losses) + 1)), losses)
    ax.set(xlabel="step", ylabel="loss", yscale="log",
           title="cell words: " + ", ".join(f"{slot} {100 * v:.0f}%" for slot, v in nearest.items()))
    ax.legend()
    save_figure(fig, run_dir / CURVE_NAME)
    summary = stage_summary(args, init, seconds=round(time.time() - t_start, 1),
                            loss=sum(losses[-50:]) / len(losses[-50:]), nearest_word_val=nearest)
    conclude(model, run_dir, Path(args.out), summary, args)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init", required=True, help="checkpoint (folder or preset) whose region mapping is replaced "
                                                 "(kept and trained further if it has four tokens per cell already)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--run-dir", help="curve and working files (default: runs/<name of --out>)")
    p.add_argument("--cell-patches", type=int, default=None,
                   help="read each cell as N x N pooled patches (a new region mapping; default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16, help="scenes a step")
    p.add_argument("--lr", type=float, default=1e-3)
    add_stage_options(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    pretrain(parse_args())
