"""IMMO, supervised: teach the Reasoner's adapter to question the Observer, then answer.

    python -m model.training.monologue --observer demo              # the demo's Reasoner, into assets/demo/reasoner
    python -m model.training.monologue --observer demo --resume     # after an interruption
    python -m model.training.monologue --observer runs/demo-observer --out runs/more --init demo  # train it further

Monologues are written by construction from shapes-world questions whose decomposition is known
(`questions.Question.steps`): the Reasoner asks the steps' questions in order (a simple question is its own one
step), the Observer's *real* answers go into the transcript (what the frozen grounded LM says, asked as `think`
asks it), and the final answer is what those answers imply (`questions.implied_answer`), with a reason made of
them: the Reasoner learns to trust and combine what it hears, the way it must in the app. Where the Observer's
answers do not say (its description leaves out the thing asked about), the monologue ends with the true answer
as a guess, and says so (counted). With `--described-questions`, more monologues, simple ones and ones that
compare what they heard, hear the scenes' true descriptions instead (`described`): finding the thing at a place,
checking things off, or comparing columns, rows or values, needs more examples than the Observer's pass can
afford. The loss is the Reasoner's tokens only: its questions and final lines; the prompt and the Observer's
answers are context, masked out.

The Observer's answers are computed once and kept in `<run-dir>/observed.json`; the adapter trains with the
supervised trainer's optimiser, schedule and resumable state. The adapter, its curve and summary go into
`<out>/reasoner/`, and `<out>`'s config gains `"reasoner": true`; the mappings are left as they are.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from PIL import Image
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from tqdm import tqdm

from model.checkpoint import resolve
from model.config import GroundedConfig
from model.files import replace_folder, write_atomically
from model.grounded import GroundedLM
from model.lm import COMPUTE_DTYPES, compute_dtype_name
from model.monologue import OBSERVER_LOOKS, OBSERVER_TOKENS, reasoner_prompt, transcript_pieces
from model.prompt import Turn
from model.reasoner import ADAPTER, FOLDER, WEIGHTS, reasoner_parameters, reasoner_weights, reasoning, save_reasoner
from model.training.evaluate import greedy_replies
from model.training.optimization import schedule_step
from model.training.plots import plot_batches, plt, save_figure
from model.training.train import CURVE_NAME, SUMMARY_NAME, load_state, mean_tail, per_step, save_state, state_file
from model.training.train_clip import resolve_device
from model.world import questions, shapes

OBSERVED_NAME = "observed.json"
RESUME_KEYS = ("observer", "init", "train_questions", "described_questions", "simple_share", "rank", "batch_size", "lr",
               "warmup", "seed", "compute_dtype")
VAL_OFFSET = 900_000


def asked(split: str, n: int, simple_share: float, seed: int, image_size: int, offset: int = 0
          ) -> list[tuple[int, questions.Question]]:
    """n (index, question) pairs of `split`: compound kinds, and a `simple_share` of simple ones (a monologue of
    one step, so that simple questions lose nothing by thinking first). Hold-out pairs are never named."""
    rng = random.Random(f"monologue:{split}:{seed}")
    items = []
    for i in range(offset, offset + n):
        kinds = questions.SIMPLE_KINDS if rng.random() < simple_share else questions.COMPOUND_KINDS
        items.append((i, questions.question(split, i, image_size, True, kinds)[1]))
    return items


DESCRIBED_MIX = (questions.SIMPLE_KINDS, ("relation",), ("compare", "count_where"))
"""Described monologues take these kinds in turn: simple questions, relations, comparisons and conditional counts.
The comparing kinds' conclusions compare what two steps heard (two places, a column or a row against another, or
two values), what a Reasoner learns only from many examples: a LoRA of its make, taught relations' reasons alone,
chose the right one for 37% of test relations before, 80% after 800 and 100% after 1,600; the observed monologues
hold about 780. Simple questions of all four kinds keep what the comparisons would take: a Reasoner given described
comparisons alone lost attribute questions (90 -> 70% on test: it named the description's first object, not the
one at the place asked), one given no described counts lost counting (100 -> 70%: it checked the one matching thing
off as "(not a square)" and answered 0). Relations have a third of their own (2,000 of 6,000 described, against
1,750 when the three comparing kinds shared two thirds): with 1,750 they were right on 65% of test relations, with
2,000 on 70%, and the shipped Reasoner, trained on about 2,300 of 3,000, on 80%."""
DESCRIBED_KINDS = tuple(kind for kinds in DESCRIBED_MIX for kind in kinds)


def described(n: int, image_size: int, offset: int) -> list[tuple[questions.Question, list[str]]]:
    """n training questions about the scenes from index `offset` on, of DESCRIBED_MIX's kinds in turn, each step (a
    simple question is its own one step) answered with the scene's plain description (`shapes.plain_caption`: what
    the Observer says of a scene it sees right). More questions and comparisons to learn from, at no cost of the
    Observer's: its own answers stay in the observed monologues, which teach the Reasoner to trust and combine what
    it really hears. Scenes that support none of the kinds asked, and counts of a colour the scene does not have
    (nothing to compare), are passed over."""
    items, index = [], offset
    while len(items) < n:
        kinds = DESCRIBED_MIX[len(items) % len(DESCRIBED_MIX)]
        sample, question = questions.question("train", index, image_size, True, kinds)
        index += 1
        if question.kind in kinds and (not question.steps or question.steps[-1][1] != "nowhere"):
            items.append((question, [shapes.plain_caption(sample.scene)] * len(steps_of(question))))
    return items


def steps_of(question: questions.Question) -> list[str]:
    """The questions the Reasoner asks the Observer: the steps of a compound question, a simple one itself."""
    return [q for q, _ in question.steps] or [question.text]


def observe_all(model: GroundedLM, split: str, items: list[tuple[int, questions.Question]], batch_size: int
                ) -> list[list[str]]:
    """The Observer's answers to every step of every (index, question) item of `split`, on the scene
    `questions.question` asked about."""
    image_size = model.visual.image_size[0]
    asked = [(shapes.sample(split, index, image_size, True).image, question) for index, question in items]
    return observer_answers(model, asked, batch_size, f"the Observer answers ({split})")


def observer_answers(model: GroundedLM, asked: list[tuple[Image.Image, questions.Question]], batch_size: int,
                     desc: str) -> list[list[str]]:
    """The Observer's greedy answers to every step of every (image, question), batched (as `think` asks: the image
    and the step's question alone, at most OBSERVER_TOKENS tokens, looking as OBSERVER_LOOKS says)."""
    convos, owners = [], []
    for n, (image, question) in enumerate(asked):
        for step in steps_of(question):
            convos.append([Turn("user", [image, step])])
            owners.append(n)
    replies = greedy_replies(model, convos, max_new_tokens=OBSERVER_TOKENS, batch_size=batch_size, desc=desc,
                             look=OBSERVER_LOOKS)
    answers: list[list[str]] = [[] for _ in asked]
    for n, reply in zip(owners, replies):
        answers[n].append(reply.text)
    return answers


GUESS = "The Observer did not say; this is a guess."


def conclusion(question: questions.Question, observed: list[str]) -> tuple[str, str]:
    """(final answer as said, reason): what the Observer's answers imply, or, where they do not say, the true
    answer as a guess (so the Reasoner learns to guess the likelier answer rather than to make one up)."""
    implied = questions.implied_answer(question, observed)
    if implied is None:
        return questions.reply_text(question.answer), GUESS
    return questions.reply_text(implied[0]), implied[1][0].upper() + implied[1][1:]


def example(model: GroundedLM, question: questions.Question, observed: list[str]) -> tuple[list[int], list[int]]:
    """One training row: token ids and labels (-100 outside the Reasoner's own pieces)."""
    return monologue_row(model, question.text, list(zip(steps_of(question), observed)), *conclusion(question, observed))


def monologue_row(model: GroundedLM, question: str, steps: list[tuple[str, str]], answer: str, reason: str
                  ) -> tuple[list[int], list[int]]:
    """The token ids of a monologue about `question` ((asked, Observer's answer) steps, then the answer and its
    reason) and their labels: the Reasoner's own tokens, -100 elsewhere."""
    return pieces_row(model, question, transcript_pieces(steps, answer, reason, model.tokenizer.eos_token))


def pieces_row(model: GroundedLM, question: str, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """The Reasoner's prompt for `question` and the transcript's (text, learnt) pieces, tokenised one by one as
    `think` feeds them: token ids, and labels that are the ids where learnt, -100 elsewhere."""
    ids = reasoner_prompt(model, question)
    labels = [-100] * len(ids)
    for text, learnt in pieces:
        piece = model.tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if learnt else [-100] * len(piece)
    return ids, labels


def padded_rows(model: GroundedLM, rows: list[tuple[list[int], list[int]]]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of (ids, labels), right-padded -> ids, labels (-100 in the padding) and attention mask, each (N, T)."""
    width = max(len(ids) for ids, _ in rows)
    pad = model.tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows], device=model.device)
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows], device=model.device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows], device=model.device)
    return ids, labels, mask


def learnt_logits(model: GroundedLM, rows: list[tuple[list[int], list[int]]]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Reasoner's (adapter on) fp32 logits (K, V) at the K tokens it learns, those tokens (K,), and where they
    are among each row's next tokens (N, T-1). The vocabulary's logits at these tokens only (a fifth of a
    monologue's): the same values as the LM's own, a third less time a training step on a CPU."""
    ids, labels, mask = padded_rows(model, rows)
    with reasoning():
        hidden = model.lm.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, T, D)
    targets = labels[:, 1:]
    learnt = targets != -100
    return model.lm.lm_head(hidden[:, :-1][learnt]).float(), targets[learnt], learnt


def batch_loss(model: GroundedLM, rows: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Mean cross-entropy of the Reasoner's tokens."""
    logits, targets, _ = learnt_logits(model, rows)
    return torch.nn.functional.cross_entropy(logits, targets)


def plot_curves(history: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    plot_batches(ax, history["step"], history["loss"])
    ax.plot(history["val_step"], history["val_loss"], marker="o", color="tab:orange", label="validation")
    ax.set(xlabel="step", title="Reasoner: cross-entropy of its own tokens")
    ax.legend()
    save_figure(fig, path)


def prepared(model: GroundedLM, run_dir: Path, args: argparse.Namespace) -> dict:
    """Training and validation rows, with the Observer's answers computed once and kept in the run folder."""
    path = run_dir / OBSERVED_NAME
    image_size = model.visual.image_size[0]
    sets = {"train": asked("train", args.train_questions, args.simple_share, args.seed, image_size),
            "val": asked("val", args.val_size, args.simple_share, args.seed, image_size, VAL_OFFSET)}
    if path.is_file():
        observed = json.loads(path.read_text())
    else:
        t0 = time.time()
        observed = {split: observe_all(model, split, items, args.observe_batch) for split, items in sets.items()}
        print(f"asked the Observer {sum(len(steps_of(q)) for items in sets.values() for _, q in items)} questions "
              f"in {time.time() - t0:.0f} s", flush=True)
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(observed)))
    rows = {}
    for split, items in sets.items():
        rows[split] = [example(model, q, seen) for (_, q), seen in zip(items, observed[split])]
        rows[f"{split}_guessed"] = sum(conclusion(q, seen)[1] == GUESS for (_, q), seen in zip(items, observed[split]))
    rows["train"] += [example(model, q, seen) for q, seen in described(args.described_questions, image_size,
                                                                      args.train_questions)]
    return rows


def train(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    out_dir = Path(args.out) if args.out else resolve(args.observer)
    GroundedConfig.load(out_dir)  # the checkpoint the Reasoner joins must be there before hours of training
    init = starting_reasoner(args.init, args.rank) if args.init else None
    run_dir = Path(args.run_dir or Path("runs") / f"monologue-{out_dir.name}")
    state_path = state_file(run_dir, args.resume)
    torch.manual_seed(args.seed)
    # the device's dtype unless told, as `train.py` trains: the Observer's answers and the adapter's steps in it
    args.compute_dtype = compute_dtype_name(device, args.compute_dtype)
    model = GroundedLM.from_pretrained(resolve(args.observer), device=device, dequantize=True,
                                       compute_dtype=args.compute_dtype)
    if model.reasoner is not None:
        raise SystemExit(f"{args.observer} has a Reasoner already; give the checkpoint it observes with")
    rows = prepared(model, run_dir, args)
    model.add_reasoner(args.rank)
    if init is not None:
        set_peft_model_state_dict(model.lm, reasoner_weights(model.lm, init), adapter_name=ADAPTER)
    params = reasoner_parameters(model.lm)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    options = {key: getattr(args, key) for key in RESUME_KEYS}
    history = {"step": [], "loss": [], "lr": [], "val_step": [], "val_loss": []}
    start, seconds_before = 0, 0.0
    if args.resume:
        weights, meta = load_state(state_path, get_peft_model_state_dict(model.lm, adapter_name=ADAPTER), optimizer,
                                   options)
        set_peft_model_state_dict(model.lm, weights, adapter_name=ADAPTER)
        history, start, seconds_before = meta["history"], meta["step"], meta["seconds"]
    print(f"{len(rows['train'])} training monologues ({args.described_questions} of them hear the scene's true "
          f"description; {rows['train_guessed']} conclude with a guess: the Observer's answers did not say), "
          f"{len(rows['val'])} for validation; {sum(p.numel() for p in params):,} adapter "
          f"parameters; {args.steps} steps of {args.batch_size}", flush=True)
    rng = random.Random(args.seed)
    order = [i for _ in range(args.steps * args.batch_size // max(1, len(rows["train"])) + 1)
             for i in rng.sample(range(len(rows["train"])), len(rows["train"]))]
    t_start, steps_here, stopped_early = time.time(), 0, False
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="reasoner", unit="step",
               dynamic_ncols=True)
    for step in bar:
        lr = schedule_step(optimizer, step, args.steps, args.warmup, args.lr)
        batch = [rows["train"][i] for i in order[step * args.batch_size:(step + 1) * args.batch_size]]
        model.lm.train()
        loss = batch_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        model.lm.eval()
        done, steps_here = step + 1, steps_here + 1
        history["step"].append(done)
        history["loss"].append(loss.item())
        history["lr"].append(lr)
        elapsed = time.time() - t_start
        bar.set_postfix(loss=f"{loss.item():.3f}", ex_s=f"{steps_here * args.batch_size / elapsed:.1f}")
        out_of_time = args.time_limit is not None and elapsed >= args.time_limit * 60
        if done % args.val_every == 0 or done == args.steps or out_of_time:
            with torch.no_grad():
                val = [batch_loss(model, rows["val"][i:i + args.batch_size]).item()
                       for i in range(0, len(rows["val"]), args.batch_size)]
            history["val_step"].append(done)
            history["val_loss"].append(sum(val) / len(val))
            bar.write(f"step {done}/{args.steps}  train {mean_tail(history['loss'], args.val_every):.3f}  "
                      f"val {history['val_loss'][-1]:.3f}  lr {lr:.2e}  {elapsed / steps_here:.2f} s/step")
            save_state(state_path, get_peft_model_state_dict(model.lm, adapter_name=ADAPTER), optimizer, done,
                       history, options, seconds_before + time.time() - t_start)
            plot_curves(history, run_dir / CURVE_NAME)
        if out_of_time and done < args.steps:
            stopped_early = True
            break
    bar.close()
    seconds = seconds_before + time.time() - t_start
    summary = {"finished": not stopped_early, "step": history["step"][-1] if history["step"] else 0,
               "options": options, "device": str(device), "train_monologues": len(rows["train"]),
               "concluded_with_a_guess": rows["train_guessed"], "seconds": round(seconds, 1),
               "seconds_per_step": per_step(seconds, history["step"]),
               "train_loss": mean_tail(history["loss"]),
               "val_loss": history["val_loss"][-1] if history["val_loss"] else None}
    conclude(model, run_dir, out_dir, summary, summary, args.steps)
    return summary


def starting_reasoner(checkpoint: str, rank: int) -> Path:
    """The folder of the Reasoner `--init` names, checked before the Observer's pass: it is there, and of `rank`."""
    folder = resolve(checkpoint) / FOLDER
    if not (folder / WEIGHTS).is_file():
        raise SystemExit(f"{checkpoint} has no Reasoner to start from ({FOLDER}/{WEIGHTS} missing)")
    saved = LoraConfig.from_pretrained(str(folder)).r
    if saved != rank:
        raise SystemExit(f"{checkpoint}'s Reasoner has rank {saved}; train it further with --rank {saved}")
    return folder


def conclude(model: GroundedLM, run_dir: Path, out: Path, summary: dict, record: dict, steps: int) -> None:
    """Export the adapter of a finished run, `record` as its training.json, or say how to continue a run its time
    limit stopped."""
    if summary["finished"]:
        export(model, run_dir, out, record)
        print(f"saved the Reasoner to {out / FOLDER}", flush=True)
    else:
        print(f"stopped at step {summary['step']} of {steps}; continue with the same command and --resume",
              flush=True)
    print("summary " + json.dumps(summary), flush=True)


def export(model: GroundedLM, run_dir: Path, out: Path, summary: dict) -> None:
    """The adapter, its curve and summary into `<out>/reasoner/`, then `"reasoner": true` in `<out>`'s config (in
    that order: a config never names a Reasoner that is not there)."""
    def fill(staging: Path) -> None:
        save_reasoner(model.lm, model.reasoner, staging)
        (staging / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        (staging / CURVE_NAME).write_bytes((run_dir / CURVE_NAME).read_bytes())

    replace_folder(out / FOLDER, fill)
    config = GroundedConfig.load(out)
    config.reasoner = True
    config.save(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--observer", default="demo", help="the grounded checkpoint that sees the images (no Reasoner yet)")
    p.add_argument("--out", default=None, help="the checkpoint folder that gets the Reasoner (default: the "
                   "observer's own; another must be a copy of it)")
    p.add_argument("--run-dir", help="resumable state, the Observer's answers, curves (default: runs/monologue-<out>)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --run-dir")
    p.add_argument("--init", help="start from this checkpoint's Reasoner (folder or preset) instead of a new adapter")
    p.add_argument("--train-questions", type=int, default=2000)
    p.add_argument("--described-questions", type=int, default=0,
                   help=f"more training monologues, of {', '.join(DESCRIBED_KINDS)} questions, in which the "
                   "Observer's answers are the scenes' true descriptions (no Observer pass)")
    p.add_argument("--simple-share", type=float, default=0.3, help="share of simple (one-step) questions")
    p.add_argument("--val-size", type=int, default=64)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (IMMO: 16)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--observe-batch", type=int, default=32, help="batch of the Observer's greedy answers")
    p.add_argument("--time-limit", type=float, default=None, help="minutes; save and stop after")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default=None,
                   help="the LM's compute dtype (default: bf16 where native, else fp32, whatever the Observer's is)")
    args = p.parse_args(argv)
    if args.described_questions < 0:
        raise SystemExit("--described-questions must not be negative")
    if min(args.train_questions, args.val_size, args.steps, args.batch_size, args.val_every, args.rank) < 1:
        raise SystemExit("--train-questions, --val-size, --steps, --batch-size, --val-every and --rank must be positive")
    return args


def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
