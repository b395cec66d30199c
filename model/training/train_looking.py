"""The stage before LMEye's question training (`train.py --questions`): a request module whose tokens say the answer.

Trained on the answer loss alone, a new request module learns slowly: 400 steps of 16 on the cell-words demo (110
min) answered attributes 53% and existence near chance (README). The frozen LM copies words it reads from its input
(the cell words show it), so here each of the k request tokens is pulled towards the LM's own embedding row of the
answer word (" red", " yes", " 2", " left"), as `cell_words.py` pulls region tokens towards their object's words.
The LM, the encoder and the mappings are frozen and the request rows stay as they are, so a question's request (the
LM's pass 1) and its image's encoder output (whence the patches and the image's own tokens) do not change while the
module trains: they are computed once, kept in the run folder, and the module trains on them alone, thousands of
steps in minutes. Questions are the simple kinds and the
steps compound questions decompose into (what IMMO's Observer is asked), from the train split; half of each batch
meets another cached image that answers it (`other_scenes`), since a module trained on 4,000 fixed pairs learns
them by heart. Validation reports how often the tokens lie nearest the right answer among the words of its type, by
kind. The frozen LM does not yet read these tokens as the answer (the demo's mappings taught it to describe what it
sees): `train.py --questions --trainable perception --init <out>` then teaches it through the LM.

    python -m model.training.train_looking --init demo --out runs/looking --request-tokens 4
"""
from __future__ import annotations

import argparse
import hashlib
import random
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from model.checkpoint import WEIGHTS_NAME, resolve
from model.grounded import GroundedLM
from model.prompt import Turn, render
from model.training.cell_words import WORDS, word_row
from model.training.optimization import param_groups, schedule_step
from model.training.plots import plot_fit
from model.training.train import CURVE_NAME, add_stage_options, conclude, stage_summary
from model.training.train_clip import resolve_device
from model.world import questions, shapes

CACHE_NAME = "looking_cache.{split}.safetensors"
COMPOUND_EVERY = 4
"""One compound question's steps for every four simple questions, as `QuestionConversations` mixes them."""
ANSWER_WORDS = {**WORDS, "yes/no": ("yes", "no"), "number": ("0", "1", "2", "3")}
"""Each answer type's words, among which `answered` chooses."""
VOCABULARY = {word for words in ANSWER_WORDS.values() for word in words}
KINDS = (*questions.SIMPLE_KINDS, "step")


def asked(split: str, n: int, image_size: int, holdout: bool) -> list[tuple[shapes.Sample, str, str, str]]:
    """n simple questions of `split` and the steps of n // COMPOUND_EVERY compound ones that one word answers
    (not "Where are the red things?"): (sample, question, answer, kind) each, a pure function of the arguments."""
    items = []
    for i in range(n):
        sample, q = questions.question(split, i, image_size, holdout, questions.SIMPLE_KINDS)
        items.append((sample, q.text, q.answer, q.kind))
    for i in range(n // COMPOUND_EVERY):
        sample, q = questions.question(split, n + i, image_size, holdout, questions.COMPOUND_KINDS)
        items += [(sample, text, answer, "step") for text, answer in q.steps if answer in VOCABULARY]
    return items


def other_scenes(items: list[tuple[shapes.Sample, str, str, str]], rows: list[int], share: float,
                 rng: random.Random) -> tuple[list[int], list[str]]:
    """For `share` of the rows, another cached image whose scene answers the row's question in one word, and that
    answer: (the image each row looks at, its answer). The request, made by the LM having read the row's own
    image, then meets another's patches, so that the module learns to find the answer there; and each cached
    request meets every cached image."""
    images, answers = [], []
    for i in rows:
        _, text, answer, kind = items[i]
        j = rng.randrange(len(items)) if rng.random() < share else i
        other = None if j == i else questions.answer_on(text, simple_kind(kind, answer), answer_type(answer),
                                                        items[j][0].scene)
        images.append(j if other in VOCABULARY else i)
        answers.append(other if other in VOCABULARY else answer)
    return images, answers


def answer_type(answer: str) -> str:
    """"yes/no", "number", or the attribute a canonical answer names."""
    return questions.Question("", answer, "").answer_type


def simple_kind(kind: str, answer: str) -> str:
    """The simple kind a question is; a compound question's step asks a place (location) or an attribute."""
    return kind if kind != "step" else "location" if answer in shapes.POSITIONS else "attribute"


def cached_inputs(model: GroundedLM, run_dir: Path, split: str, n: int, args: argparse.Namespace
                  ) -> dict:
    """{"request": (N, Q, lm_dim) and "request_mask": (N, Q) (`GroundedLM.requests`), "encoded": (N, 1 + P,
    visual_dim) the encoder's output, "kind": (N,) an index of KINDS}, and "answers" and "items" (`asked(split, n)`,
    whose questions they are); the tensors from the run folder when a run with the same inputs made them. The
    requests are kept in bf16 (half the size; the module normalises them first)."""
    path = run_dir / CACHE_NAME.format(split=split)
    init = resolve(args.init)
    inputs = {"format": "3", "init": str(init.resolve()), "n": str(n), "holdout": str(args.holdout),
              "weights": hashlib.sha256((init / WEIGHTS_NAME).read_bytes()).hexdigest(),
              "request_tokens": str(model.config.request_tokens)}
    items = asked(split, n, model.visual.image_size[0], args.holdout)
    answers = [answer for _, _, answer, _ in items]
    if path.is_file():
        with safe_open(path, "pt") as f:
            if f.metadata() == inputs:
                return {**load_file(path), "answers": answers, "items": items}
    requests, masks, encoded = [], [], []
    for start in tqdm(range(0, len(items), args.cache_batch), desc=f"requests ({split})", unit="batch",
                      dynamic_ncols=True):
        batch = items[start:start + args.cache_batch]
        prompts = [render([Turn("user", [sample.image, text])], model.tokenizer, model.config.prompt_format,
                          look=True)
                   for sample, text, _, _ in batch]
        request, mask = model.requests(prompts)
        requests.append(request.to(torch.bfloat16).cpu())
        masks.append(mask.cpu())
        with torch.no_grad():
            encoded.append(model.encoded([sample.image for sample, _, _, _ in batch]).float().cpu())
    cache = {"request": torch.cat(requests), "request_mask": torch.cat(masks), "encoded": torch.cat(encoded),
             "kind": torch.tensor([KINDS.index(kind) for _, _, _, kind in items])}
    run_dir.mkdir(parents=True, exist_ok=True)
    save_file(cache, path, metadata=inputs)
    return {**cache, "answers": answers, "items": items}


def word_rows(model: GroundedLM) -> dict[str, torch.Tensor]:
    """Every answer word's embedding row (lm_dim,)."""
    return {word: word_row(model, word).detach() for word in VOCABULARY}


def answer_rows(model: GroundedLM, answers: list[str]) -> torch.Tensor:
    """The embedding row each answer's tokens should be (N, lm_dim)."""
    rows = word_rows(model)
    return torch.stack([rows[a] for a in answers])


def looking_loss(model: GroundedLM, request: torch.Tensor, request_mask: torch.Tensor, encoded: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of every request token to its answer's row, in units of the table's mean squared row
    norm (as the cell-word loss)."""
    tokens, _ = model.look_at(request, request_mask, encoded)                              # (B, k, lm_dim)
    scale = model.lm.get_input_embeddings().weight.float().pow(2).sum(-1).mean()
    return (tokens - targets.unsqueeze(1)).pow(2).sum(-1).mean() / scale


@torch.no_grad()
def answered(model: GroundedLM, cache: dict, batch: int = 512) -> dict[str, float]:
    """By kind (and "all"): how often the request tokens' mean lies nearest the right answer among the words of
    its type."""
    words = word_rows(model)
    rows = {t: torch.stack([words[w] for w in type_words]) for t, type_words in ANSWER_WORDS.items()}
    right = []
    for start in range(0, len(cache["answers"]), batch):
        tokens, _ = model.look_at(cache["request"][start:start + batch], cache["request_mask"][start:start + batch],
                                  cache["encoded"][start:start + batch])
        for token, answer in zip(tokens.mean(1), cache["answers"][start:start + batch]):
            said = answer_type(answer)
            right.append(ANSWER_WORDS[said][int((rows[said] - token).pow(2).sum(-1).argmin())] == answer)
    right = torch.tensor(right)
    by_kind = {k: right[cache["kind"] == i].float().mean().item() for i, k in enumerate(KINDS)
               if (cache["kind"] == i).any()}
    return {**by_kind, "all": right.float().mean().item()}


def pretrain(args: argparse.Namespace) -> dict:
    """A request module on `--init`'s checkpoint (its own, or a new one of `--request-tokens`) trained on the loss
    alone, on cached requests."""
    init = resolve(args.init)
    device = resolve_device(args.device)
    model = GroundedLM.from_pretrained(init, device=device, request_tokens=args.request_tokens)
    if model.config.word_decisions:
        raise SystemExit("this stage comes before word decisions: train the module here, then fit them "
                         "(model.training.fit_word_decisions)")
    run_dir = Path(args.run_dir or Path("runs") / Path(args.out).name)
    t_start = time.time()
    train = cached_inputs(model, run_dir, "train", args.questions, args)
    val = cached_inputs(model, run_dir, "val", args.val_questions, args)
    cache_seconds = time.time() - t_start
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("perception.") and name != "perception.request_rows")
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=args.lr)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    rows_of = word_rows(model)
    val_targets = answer_rows(model, val["answers"])
    generator, rng = torch.Generator().manual_seed(args.seed), random.Random(args.seed)
    order = torch.randperm(len(train["answers"]), generator=generator)
    history = {"step": [], "loss": [], "val_loss": [], "val": []}
    losses, t_fit = [], time.time()
    for step in (bar := tqdm(range(args.steps), desc="looking", unit="step", dynamic_ncols=True)):
        schedule_step(optimizer, step, args.steps, max(1, args.steps // 20), args.lr)
        if len(order) < args.batch_size:
            order = torch.cat([order, torch.randperm(len(train["answers"]), generator=generator)])
        rows, order = order[:args.batch_size], order[args.batch_size:]
        images, answers = other_scenes(train["items"], rows.tolist(), args.other_scenes, rng)
        loss = looking_loss(model, train["request"][rows].to(device), train["request_mask"][rows].to(device),
                            train["encoded"][images].to(device), torch.stack([rows_of[a] for a in answers]).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % args.val_every == 0 or step + 1 == args.steps:
            with torch.no_grad():
                val_loss = looking_loss(model, val["request"].to(device), val["request_mask"].to(device),
                                        val["encoded"].to(device), val_targets.to(device)).item()
            history["step"].append(step + 1)
            history["loss"].append(sum(losses[-args.val_every:]) / len(losses[-args.val_every:]))
            history["val_loss"].append(val_loss)
            history["val"].append(answered(model, {k: v.to(device) if torch.is_tensor(v) else v
                                                   for k, v in val.items()}))
            tqdm.write(f"step {step + 1}  loss {history['loss'][-1]:.4f}  val {val_loss:.4f}  " +
                       "  ".join(f"{k} {100 * v:.1f}" for k, v in history["val"][-1].items()))
    run_dir.mkdir(parents=True, exist_ok=True)
    plot_fit(history, run_dir / CURVE_NAME, ("train (mean of the steps between)", "loss",
                                             "request tokens to the answer's word"),
             ("nearest word is the answer", "validation, by kind"))
    summary = stage_summary(args, init, questions={"train": len(train["answers"]), "val": len(val_targets)},
                            cache_seconds=round(cache_seconds, 1), fit_seconds=round(time.time() - t_fit, 1),
                            history=history, answered_val=history["val"][-1])
    conclude(model, run_dir, Path(args.out), summary, args)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init", required=True, help="checkpoint (folder or preset); its request module is trained "
                                                 "further, or a new one of --request-tokens is made")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--run-dir", help="the cache and the curve (default: runs/<name of --out>)")
    p.add_argument("--request-tokens", type=int, default=None, help="for a checkpoint without a request module")
    p.add_argument("--questions", type=int, default=12000, help="simple training questions (and a quarter as many "
                                                                "compound ones' steps)")
    p.add_argument("--val-questions", type=int, default=400)
    p.add_argument("--other-scenes", type=float, default=0.5,
                   help="share of a batch whose question meets another cached image (its answer read from that "
                        "image's scene)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--cache-batch", type=int, default=32, help="questions a forward while caching")
    add_stage_options(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    pretrain(parse_args())
