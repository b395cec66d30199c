"""LMEye's look gate: whether a turn without an image of its own asks about the conversation's latest image.

A text-only turn after images asks about the latest one ("How many squares are there?") or for something else,
such as a picture ("Show me a picture of a small red star.", "Show me another picture like the first one."). A
request module without a gate looks at the latest image in both, and before a request for a picture its request
tokens stand where the frozen retrieval mappings, fitted on conversations without them, read `[RET]`'s state:
after three described images the module without a gate (docs/lmeye.md) retrieved the right new scene first 47% of
the time against 70 without a module, and "another like the k-th" 13% against 100. The gate is a logistic probe on
the request row's pass-1 state, which has read the whole turn (`Perception.asks_about_image`); where it says the
turn does not ask about the image, pass 2 reads the prompt without request tokens, as a model without the module
would.

It is fitted here on shapes-world conversations: one to three described images, then a question about the
latest (look) or a request for a picture, new or like one of them (do not look), half and half. Pass 1's states
are computed once; the request module and everything else stay as they are, so the gate goes onto a checkpoint
in place (its summary and curve under their own names beside the question training's), and must be fitted
again after the module's request row trains.

    python -m model.training.train_look_gate --init runs/lmeye-w3 --out runs/lmeye-w3
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.checkpoint import resolve
from model.config import GroundedConfig
from model.grounded import GroundedLM
from model.prompt import Turn, render
from model.training.conversations import ORDINALS, caption_turns, context_request, retrieval_turns
from model.training.plots import plot_fit
from model.training.train import TRAIN_SCENES, VAL_SCENES, add_stage_options, export, stage_summary
from model.training.train_clip import resolve_device
from model.world import questions, shapes

SUMMARY_NAME = "look_gate.json"
CURVE_NAME = "look_gate.png"
KINDS = ("question", "new picture", "another like")
"""What the last turn asks: about the latest image (the gate should look), for a new picture, for another like
an earlier one (it should not). Questions are half of the conversations, each kind of request a quarter."""
SCENES = {"train": TRAIN_SCENES, "val": VAL_SCENES, "test": VAL_SCENES}
"""The scenes each split's conversations draw from (the test split's for the checkpoint's test)."""


def conversation(split: str, index: int, image_size: int, holdout: bool, seed: int = 0) -> tuple[list[Turn], str]:
    """Conversation `index` of `split`, ending in a user's turn without an image, and what that turn asks (one of
    KINDS): a pure function of the arguments."""
    rng = random.Random(f"look-gate:{split}:{seed}:{index}")

    def scene() -> shapes.Sample:
        return shapes.sample(split, rng.randrange(SCENES[split]), image_size, holdout)

    history = [scene() for _ in range(rng.randint(1, len(ORDINALS)))]
    turns = [t for s in history for t in caption_turns(s.image, shapes.plain_caption(s.scene), rng)]
    kind = KINDS[0] if index % 2 == 0 else KINDS[1 + index // 2 % 2]
    if kind == "question":
        text = questions.ask(history[-1].scene, rng, questions.SIMPLE_KINDS, holdout).text
    elif kind == "new picture":
        text = retrieval_turns(scene().caption, rng)[0].text
    else:
        text = context_request(rng.randrange(len(history)), rng)
    return turns + [Turn("user", [text])], kind


def row_states(model: GroundedLM, items: list[tuple[list[Turn], str]], batch: int, desc: str) -> torch.Tensor:
    """The request row's pass-1 state of each conversation (N, lm_dim), in fp32 on the model's device."""
    states = []
    for start in tqdm(range(0, len(items), batch), desc=desc, unit="batch", dynamic_ncols=True):
        prompts = [render(turns, model.tokenizer, model.config.prompt_format, look=True)
                   for turns, _ in items[start:start + batch]]
        request, _ = model.requests(prompts)                                              # (B, Q, lm_dim)
        states.append(request[:, -1].float())                                             # the row is the last
    return torch.cat(states)


def accuracy(model: GroundedLM, states: torch.Tensor, kinds: list[str]) -> dict[str, float]:
    """By kind (and "all"): how often the gate decides as it should (look for a question, not for a request)."""
    with torch.no_grad():
        looks = model.perception.asks_about_image(states).cpu() > 0
    right = looks == torch.tensor([kind == "question" for kind in kinds])
    by_kind = {k: right[[i for i, kind in enumerate(kinds) if kind == k]].float().mean().item() for k in KINDS}
    return {**by_kind, "all": right.float().mean().item()}


def fit(args: argparse.Namespace) -> dict:
    """A look gate on `--init`'s request module, fitted on cached pass-1 states; the checkpoint with it
    written to `--out`."""
    checkpoint = resolve(args.init)
    if not GroundedConfig.load(checkpoint).request_tokens:
        raise SystemExit(f"{args.init} has no request module: there is nothing to gate")
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model = GroundedLM.from_pretrained(checkpoint, device=device, look_gate=True)  # a new gate, or its own again
    gate = model.perception.gate
    image_size = model.visual.image_size[0]
    t_start = time.time()
    data = {split: [conversation(split, i, image_size, args.holdout, args.seed) for i in range(n)]
            for split, n in (("train", args.conversations), ("val", args.val_conversations))}
    states = {split: row_states(model, items, args.cache_batch, f"pass 1 ({split})") for split, items in data.items()}
    kinds = {split: [kind for _, kind in items] for split, items in data.items()}
    targets = {split: torch.tensor([float(kind == "question") for kind in k], device=device)
               for split, k in kinds.items()}
    cache_seconds = time.time() - t_start
    for p in model.parameters():
        p.requires_grad_(False)
    for p in gate.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(gate.parameters(), lr=args.lr, weight_decay=0.01)
    history = {"step": [], "loss": [], "val_loss": [], "val": []}
    t_fit = time.time()
    for step in (bar := tqdm(range(args.steps), desc="look gate", unit="step", dynamic_ncols=True)):
        loss = F.binary_cross_entropy_with_logits(model.perception.asks_about_image(states["train"]),
                                                  targets["train"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.val_every == 0 or step + 1 == args.steps:
            with torch.no_grad():
                val_loss = F.binary_cross_entropy_with_logits(model.perception.asks_about_image(states["val"]),
                                                              targets["val"]).item()
            history["step"].append(step + 1)
            history["loss"].append(loss.item())
            history["val_loss"].append(val_loss)
            history["val"].append(accuracy(model, states["val"], kinds["val"]))
            tqdm.write(f"step {step + 1}  loss {loss.item():.4f}  val {val_loss:.4f}  " +
                       "  ".join(f"{k} {100 * v:.1f}" for k, v in history["val"][-1].items()))
    run_dir = Path(args.run_dir or Path("runs") / f"{Path(args.out).name}-look-gate")
    run_dir.mkdir(parents=True, exist_ok=True)
    plot_fit(history, run_dir / CURVE_NAME, ("train", "binary cross-entropy", "the look gate"),
             ("decides as it should", "validation, by what is asked"))
    summary = stage_summary(args, checkpoint, conversations={k: len(v) for k, v in data.items()},
                            cache_seconds=round(cache_seconds, 1), fit_seconds=round(time.time() - t_fit, 1),
                            history=history, train=accuracy(model, states["train"], kinds["train"]),
                            val=history["val"][-1])
    export(model, run_dir, Path(args.out), summary, SUMMARY_NAME, CURVE_NAME)
    print(f"saved the checkpoint with its look gate to {args.out} ({SUMMARY_NAME}, {CURVE_NAME})", flush=True)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init", required=True, help="a checkpoint with a request module (folder or preset)")
    p.add_argument("--out", required=True, help="checkpoint folder to write (may be --init: the gate goes on "
                                                "it, and the rest stays as it is)")
    p.add_argument("--run-dir", help="the curve and the checkpoint as written (default: runs/<name of --out>-look-gate)")
    p.add_argument("--conversations", type=int, default=1600, help="training conversations")
    p.add_argument("--val-conversations", type=int, default=400)
    p.add_argument("--steps", type=int, default=300, help="full-batch steps on the cached states")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--val-every", type=int, default=25)
    p.add_argument("--cache-batch", type=int, default=16, help="conversations a forward in pass 1")
    add_stage_options(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    fit(parse_args())
