"""Training the grounded LM's small layers: input, ret and image mappings, the `[RET]` row, and LMEye's request
module in its stage 2 (`--questions`). The frozen LM and the frozen CLIP stay as loaded; what the model is
trained on is in `conversations.py`.

Earlier turns are context without gradient (`GroundedLM.forward`), and a 4-bit LM is dequantised once
(`model.lm.dequantized`): with bf16 compute where the CPU has it, 4.3x the examples per second of before on an
AVX512-BF16 CPU, 2.0x in fp32 on an AVX2 one (README; bench/training.py). Dequantising is also what makes the
gradient right there: bitsandbytes' CPU kernel for AVX512-BF16 / AMX has no backward.

The reply to a request *starts* with `[RET]`; its hidden state (the query) has read the request and is
pulled towards the image by the contrastive loss, and the caption loss teaches when to emit it. FROMAGe
put `[RET]` after a caption the model writes first; with a frozen LM nothing trainable can steer text-only
replies, and greedy SmolLM2 never ends its echo of the request where `[RET]` was trained to follow
("A large white triangle near the top is a classic example of ..."), so `[RET]` never came. At the start
of the reply, training and decoding see the same context, and the app's image shows with its own caption.

    python -m model.training.train --out assets/demo                 # the shapes world (the demo bundle)
    python -m model.training.train --out runs/mine --tsv pairs.tsv    # image-caption pairs (CC3M-style TSV)
    python -m model.training.train --out assets/demo --resume         # continue after an interruption
    python -m model.training.train --init demo --out runs/tuned       # fine-tune a checkpoint (its weights are the start)
    python -m model.training.train --init demo --out assets/demo --questions --request-tokens 4 --trainable perception
                                                                      # LMEye's stage 2: learn to look, mappings frozen

Resumable state (weights, optimizer, step, history) lives in `--run-dir` as one safetensors file; the
checkpoint (grounded_config.json + mappings.safetensors) and the loss curves are written into `--out`
file by file, so other files there (the demo's clip/ folder) are left alone.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from model.checkpoint import resolve
from model.files import write_atomically
from model.config import CONFIG_NAME, PROJECTORS, WEIGHTS_NAME, GroundedConfig
from model.world.data import ShapesDataset, TsvCaptionDataset
from model.world.questions import DRILLS, SIMPLE_KINDS
from model.grounded import Example, GroundedLM
from model.lm import COMPUTE_DTYPES, QUANTIZE_CHOICES, compute_dtype_name, dequantized
from model.training.cell_words import cell_word_loss
from model.training.conversations import CONTEXT_EVERY, Conversations, QuestionConversations
from model.training.optimization import param_groups, schedule_step
from model.training.train_clip import resolve_device
from model.visual import LOCAL_DIR
from model.training.plots import plt, save_figure, plot_batches

DEMO = GroundedConfig()
"""The defaults of a fresh run: the demo's layout before cell words (`train_cells` gives its cells words)."""
TRAIN_SCENES = 1_000_000
VAL_SCENES = 100_000
"""Scenes validation conversations draw from (distinct within a batch); --val-size counts conversations."""
STATE_NAME = "state.safetensors"
STATE_FORMAT = "grounded-train-state/1"
CURVE_NAME = "training_curve.png"
SUMMARY_NAME = "training.json"
RESUME_KEYS = ("lm", "visual", "n_visual_tokens", "region_grid", "projector", "emb_dim", "batch_size", "lr", "warmup",
               "seed", "tsv", "holdout", "val_size", "init", "quantize", "questions", "request_tokens", "trainable",
               "tokens_per_cell", "cls_dropout", "cell_words", "context_every", "ask_more")
"""Options a resumed run must share with the run it continues: they shape the weights or the data order."""
LATER_OPTIONS = {"questions": False, "request_tokens": 0, "trainable": "all", "candidates": 0, "tokens_per_cell": 1,
                 "cls_dropout": 0.0, "cell_words": 0.0, "context_every": CONTEXT_EVERY, "described_questions": 0,
                 "candidate_positions": 1, "first_sentence": False, "repeat_cost": 0.0, "after_cost": 0.0,
                 "sentence_end": False, "proposals": 0, "place": None, "ask_more": []}
"""Options added after state files were first written: a state without them comes from a run that had these."""
TRAINABLE = {"all": ("input_mapping.", "region_mapping.", "region_positions", "ret_mapping.", "image_mapping.",
                     "ret_embedding", "ret_output", "logit_scale", "perception."),
             "perception": ("perception.",),
             "input": ("input_mapping.", "region_mapping.", "region_positions")}
"""What trains: every small layer; LMEye's stage 2 (the request module, the mappings frozen); or the input
mappings alone (stage 2's ablation: the same budget spent on what the model already has)."""

def datasets(args: argparse.Namespace, image_size: int) -> tuple[Dataset, Dataset]:
    """(train, val): the shapes world's own splits, or a TSV whose last `val_size` rows are held out."""
    if args.tsv is None:
        return (ShapesDataset("train", TRAIN_SCENES, image_size, args.holdout),
                ShapesDataset("val", VAL_SCENES, image_size, args.holdout))
    pairs = TsvCaptionDataset(args.tsv)
    if len(pairs) <= args.val_size:
        raise ValueError(f"{args.tsv} has {len(pairs)} usable rows: need more than --val-size {args.val_size}")
    cut = len(pairs) - args.val_size
    return Subset(pairs, range(cut)), Subset(pairs, range(cut, len(pairs)))


# --- resumable state ------------------------------------------------------------------------------

def run_options(args: argparse.Namespace) -> dict:
    return {key: getattr(args, key) for key in RESUME_KEYS + ("steps",)}


def save_state(path: Path, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, step: int,
               history: dict, options: dict, seconds: float) -> None:
    """Trainable weights, optimizer moments, step and history in one safetensors file: never half of one run
    and half of another."""
    tensors = {f"model.{k}": v.float().cpu().contiguous() for k, v in weights.items()}
    optim = optimizer.state_dict()
    for index, state in optim["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    metadata = {"format": STATE_FORMAT, "step": str(step), "seconds": str(seconds), "history": json.dumps(history),
                "param_groups": json.dumps(optim["param_groups"]), "options": json.dumps(options)}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a state file and its metadata (step, seconds, history, param_groups, options) decoded."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a training state written by model/training/train.py ({STATE_FORMAT})")
    decoded = {"step": int(metadata["step"]), "seconds": float(metadata["seconds"])}
    decoded.update({k: json.loads(metadata[k]) for k in ("history", "param_groups", "options")})
    return load_file(path), decoded


def load_state(path: Path, expected: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, options: dict
               ) -> tuple[dict[str, torch.Tensor], dict]:
    """Restore the optimizer from `path`; returns the trainable weights (their names and shapes those of
    `expected`) and its metadata. Refuses a run started differently."""
    tensors, meta = read_state(path)
    saved = {**LATER_OPTIONS, **meta["options"]}
    differ = {k: (saved.get(k), v) for k, v in options.items() if k != "steps" and saved.get(k) != v}
    if differ:
        listed = ", ".join(f"{k}: {old!r} then, {new!r} now" for k, (old, new) in differ.items())
        raise ValueError(f"{path} was written by a run with other options ({listed}). Resume with the same "
                         f"options, or start afresh with another --run-dir.")
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    if set(weights) != set(expected) or any(weights[k].shape != v.shape for k, v in expected.items()):
        raise ValueError(f"{path} holds weights of other names or shapes than this model's")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return weights, meta


# --- training -------------------------------------------------------------------------------------

def new_history() -> dict[str, list]:
    return {"step": [], "caption": [], "ret": [], "ret_acc": [], "lr": [],
            "val_step": [], "val_caption": [], "val_ret": [], "val_ret_acc": []}


def images_of(examples: list[Example]) -> list[Image.Image]:
    return [im for e in examples for t in e.turns for im in t.images] + [im for e in examples for im in e.ret_images]


@torch.no_grad()
def validate(model: GroundedLM, batches: list[list[Example]]) -> dict[str, float]:
    """Mean caption loss, contrastive loss and in-batch [RET] top-1 accuracy over fixed validation batches, in eval
    mode (every image with its CLS feature, whatever `--cls-dropout` says)."""
    training = model.training
    model.eval()
    try:
        outs = [model(batch) for batch in batches]
    finally:
        model.train(training)
    return {"caption": sum(o.caption_loss.item() for o in outs) / len(outs),
            "ret": sum(o.ret_loss.item() for o in outs) / len(outs),
            "ret_acc": sum(o.ret_accuracy for o in outs) / len(outs)}


def optimizer_for(model: GroundedLM, lr: float) -> torch.optim.AdamW:
    """AdamW over the trainable weights; decay on the matrices only (`param_groups`)."""
    return torch.optim.AdamW(param_groups(model, 0.01), lr=lr, betas=(0.9, 0.98))


def plot_curves(history: dict, path: Path) -> None:
    words = bool(history.get("cell_words"))
    fig, axes = plt.subplots(1, 3 + words, figsize=(14 + 4.5 * words, 3.8))
    for ax, key, title in ((axes[0], "caption", "caption loss"), (axes[1], "ret", "contrastive loss ([RET] vs image)")):
        plot_batches(ax, history["step"], history[key])
        ax.plot(history["val_step"], history[f"val_{key}"], marker="o", color="tab:orange", label="validation")
        ax.set(xlabel="step", title=title)
        ax.legend()
    axes[2].plot(history["val_step"], history["val_ret_acc"], marker="o", color="tab:orange")
    axes[2].set(xlabel="step", ylim=(0, 1.02), title="validation: [RET] finds its image in the batch")
    if words:
        plot_batches(axes[3], history["step"], history["cell_words"])
        axes[3].set(xlabel="step", title="cell words: region tokens vs their words")
        axes[3].legend()
    save_figure(fig, path)


def export(model: GroundedLM, run_dir: Path, out: Path, summary: dict, summary_name: str = SUMMARY_NAME,
           curve_name: str = CURVE_NAME) -> None:
    """The checkpoint into `out`, file by file (its mappings, and the Reasoner's adapter or the familiarity
    statistics it carries from `--init`), with the run's summary and curve under their names: whatever else `out`
    holds (the demo's clip/, an earlier stage's summary under another name) stays. An encoder folder inside `out`
    or beside it (`../demo/clip` for a run beside the demo) is named relative to it, so the two move together."""
    checkpoint = run_dir / "checkpoint"
    model.save_pretrained(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    config = GroundedConfig.load(checkpoint)
    encoder = Path(config.visual.removeprefix(LOCAL_DIR)).resolve()
    if config.visual.startswith(LOCAL_DIR) and encoder.is_relative_to(out.resolve().parent):
        config.visual = LOCAL_DIR + Path(os.path.relpath(encoder, out.resolve())).as_posix()
    copies = {out / path.relative_to(checkpoint): path for path in checkpoint.rglob("*")
              if path.is_file() and path.name != CONFIG_NAME}
    copies[out / curve_name] = run_dir / curve_name
    for target, source in copies.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, lambda tmp, source=source: shutil.copyfile(source, tmp))
    config.save(out)
    write_atomically(out / summary_name, lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))


def state_file(run_dir: Path, resume: bool) -> Path:
    """The run folder's state file, the folder made: a run starts where no state is, and resumes (`resume`) only
    where one is."""
    state_path = run_dir / STATE_NAME
    if state_path.exists() and not resume:
        raise SystemExit(f"{run_dir} already holds a training state (step {read_state(state_path)[1]['step']}): "
                         f"pass --resume to continue it, or another --run-dir to start afresh")
    if resume and not state_path.exists():
        raise SystemExit(f"--resume: there is no {STATE_NAME} in {run_dir} to resume from")
    run_dir.mkdir(parents=True, exist_ok=True)
    return state_path


def run_folders(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(checkpoint folder, run folder, state file) for `--out`, `--run-dir` and `--resume` (`state_file`)."""
    out_dir, run_dir = Path(args.out), Path(args.run_dir or Path("runs") / Path(args.out).name)
    return out_dir, run_dir, state_file(run_dir, args.resume)


def per_step(seconds: float, steps: list[int]) -> float | None:
    """A run's seconds per step, over every session it took: a run its time limit stopped and a later call only
    exports has one."""
    return round(seconds / steps[-1], 3) if steps else None


def conclude(model: GroundedLM, run_dir: Path, out_dir: Path, summary: dict, args: argparse.Namespace) -> None:
    """Export the checkpoint of a finished run, or say how to continue one its time limit stopped."""
    if summary["finished"]:
        export(model, run_dir, out_dir, summary)
        print(f"saved the checkpoint to {out_dir} ({WEIGHTS_NAME}, {CONFIG_NAME}, {CURVE_NAME}, {SUMMARY_NAME})",
              flush=True)
    else:
        print(f"stopped at step {summary['step']} of {args.steps} (--time-limit {args.time_limit} min); "
              f"continue with the same command and --resume", flush=True)
    print("summary " + json.dumps(summary), flush=True)


def holdout_kept_out(summary: dict) -> bool:
    """Whether a checkpoint's weights never saw the shapes world's hold-out pairs, from its training.json:
    trained with --holdout, and so was the checkpoint it was fine-tuned from (--init)."""
    options = summary.get("options", {})
    return summary.get("holdout_kept_out", bool(options.get("holdout")) and not options.get("init"))


def checkpoint_kept_holdout_out(folder: Path) -> bool:
    """`holdout_kept_out` of the checkpoint in `folder`; False when it has no training.json to say so."""
    summary = folder / SUMMARY_NAME
    return summary.is_file() and holdout_kept_out(json.loads(summary.read_text()))


def stage_summary(args: argparse.Namespace, init: Path, **figures) -> dict:
    """A finished run's summary for the stages that train a part of `--init`'s checkpoint on their own
    (`train_cells`, `train_retrieval`, `train_looking`): their options, whether the hold-out pairs stayed out of
    everything the weights saw, and the stage's figures."""
    return {"finished": True, "step": args.steps, "options": {**vars(args), "init": args.init},
            "holdout_kept_out": args.holdout and checkpoint_kept_holdout_out(init), **figures}


def add_stage_options(p: argparse.ArgumentParser) -> None:
    """What those stages share: the hold-out, the device and the seed."""
    p.add_argument("--holdout", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the hold-out (shape, colour) pairs out, as the other stages do")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)


def mean_tail(values: list[float], n: int = 50) -> float | None:
    return sum(values[-n:]) / len(values[-n:]) if values else None


def train(args: argparse.Namespace) -> dict:
    """Train (or resume), validate and save periodically, export the checkpoint; returns the summary."""
    if args.batch_size < (8 if args.questions else 4):
        raise ValueError("--batch-size must be at least 4 (8 with --questions): the contrastive loss needs two "
                         "retrievals or more in each batch")
    if args.steps < 1 or args.val_every < 1 or args.val_size < 1:
        raise ValueError("--steps, --val-every and --val-size must be positive")
    device = resolve_device(args.device)
    out_dir, run_dir, state_path = run_folders(args)

    torch.manual_seed(args.seed)
    # the device's dtype unless told, also for a checkpoint trained where bf16 is emulated: the result records it
    compute_dtype = compute_dtype_name(device, args.compute_dtype)
    kept_out = args.holdout
    if args.init:  # fine-tune: the checkpoint's model, and its weights to start from
        init_dir = resolve(args.init)
        kept_out = kept_out and checkpoint_kept_holdout_out(init_dir)
        model = GroundedLM.from_pretrained(init_dir, quantize=args.quantize, device=device,
                                           region_grid=args.region_grid, compute_dtype=compute_dtype,
                                           request_tokens=args.request_tokens, dequantize=args.quantize == "4bit",
                                           tokens_per_cell=args.tokens_per_cell)
        named = GroundedConfig.load(init_dir)  # as the checkpoint names them, not resolved paths
        args.lm, args.visual, args.visual_pretrained = named.lm, named.visual, named.visual_pretrained
        args.n_visual_tokens, args.emb_dim, args.projector = named.n_visual_tokens, named.emb_dim, named.projector
        args.region_grid, args.tokens_per_cell = model.config.region_grid, model.config.tokens_per_cell
    else:
        config = GroundedConfig(lm=args.lm, visual=args.visual, visual_pretrained=args.visual_pretrained,
                                n_visual_tokens=args.n_visual_tokens, region_grid=args.region_grid,
                                projector=args.projector, emb_dim=args.emb_dim, request_tokens=args.request_tokens,
                                tokens_per_cell=args.tokens_per_cell)
        model = GroundedLM(config, quantize=args.quantize, device=device, compute_dtype=compute_dtype)
        if args.quantize == "4bit":
            model.lm = dequantized(model.lm)
    # 4-bit is dequantised once (before a Reasoner's adapter goes on it): bench/training.py measures both
    model.config.ret_opens_reply = True  # what `retrieval_request` teaches: [RET] alone, first
    args.compute_dtype = model.config.compute_dtype  # what this device runs, recorded in the summary
    model.cls_dropout = args.cls_dropout
    args.request_tokens = model.config.request_tokens
    if args.trainable == "perception" and model.perception is None:
        raise SystemExit("--trainable perception: the model has no request module (give --request-tokens K)")
    for name, p in model.named_parameters():
        if not name.startswith(("lm.", "visual.")):
            p.requires_grad_(name.startswith(TRAINABLE[args.trainable]))
    n_val_batches = max(1, args.val_size // args.batch_size)
    if args.questions:
        image_size = model.visual.image_size[0]
        train_data = QuestionConversations("train", TRAIN_SCENES, image_size, args.holdout, args.seed,
                                           tuple(args.ask_more))
        val_data = QuestionConversations("val", VAL_SCENES, image_size, args.holdout, args.seed + 1)
        val_batches = [val_data.batch(i, args.batch_size) for i in range(n_val_batches)]
    else:
        train_set, val_set = datasets(args, model.visual.image_size[0])
        train_data = Conversations(train_set, args.seed, args.context_every)
        val_data = Conversations(val_set, args.seed + 1)
        val_batches = [val_data.batch(i, args.batch_size, multi_turn=i % 2 == 1)  # every other one multi-turn
                       for i in range(n_val_batches)]
    optimizer = optimizer_for(model, args.lr)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    options = run_options(args)
    history, start, seconds_before = new_history(), 0, 0.0
    if args.resume:
        weights, meta = load_state(state_path, model.trainable_state_dict(), optimizer, options)
        model.load_state_dict(weights, strict=False)
        history, start, seconds_before = meta["history"], meta["step"], meta["seconds"]
        print(f"resumed {run_dir} at step {start} of {args.steps}", flush=True)
    warmup = max(1, int(args.warmup * args.steps))
    n_trainable = sum(p.numel() for p in params)
    print(f"training {n_trainable:,} parameters on {device} (LM {args.lm}, {args.quantize}, {args.compute_dtype} "
          f"compute; visual {args.visual}); "
          f"data: {args.tsv or ('shapes-world questions' if args.questions else 'shapes world')}; "
          f"{args.steps} steps of {args.batch_size}", flush=True)

    t_start, stopped_early, steps_here = time.time(), False, 0
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train", unit="step",
               dynamic_ncols=True)
    for step in bar:
        lr = schedule_step(optimizer, step, args.steps, warmup, args.lr)
        examples = train_data.batch(step, args.batch_size)
        model.visual_features(images_of(examples))  # one batched CLIP pass; forward then finds them cached
        result = model(examples)
        loss = result.loss
        if args.cell_words:
            cell_words = cell_word_loss(model, step, args.batch_size, args.holdout, args.seed)
            loss = loss + args.cell_words * cell_words
            history.setdefault("cell_words", []).append(cell_words.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        done, steps_here = step + 1, steps_here + 1
        for key, value in (("step", done), ("caption", result.caption_loss.item()), ("ret", result.ret_loss.item()),
                           ("ret_acc", result.ret_accuracy), ("lr", lr)):
            history[key].append(value)
        elapsed = time.time() - t_start
        bar.set_postfix(caption=f"{history['caption'][-1]:.3f}", ret=f"{history['ret'][-1]:.3f}",
                        **({"words": f"{history['cell_words'][-1]:.3f}"} if args.cell_words else {}),
                        ex_s=f"{steps_here * args.batch_size / elapsed:.1f}")
        out_of_time = args.time_limit is not None and elapsed >= args.time_limit * 60
        if done % args.val_every == 0 or done == args.steps:
            val = validate(model, val_batches)
            for key in ("caption", "ret", "ret_acc"):
                history[f"val_{key}"].append(val[key])
            history["val_step"].append(done)
            bar.write(f"step {done}/{args.steps}  train caption {mean_tail(history['caption'], args.val_every):.3f} "
                      f"ret {mean_tail(history['ret'], args.val_every):.3f}  |  val caption {val['caption']:.3f} "
                      f"ret {val['ret']:.3f} [RET] acc {val['ret_acc']:.3f}  |  lr {lr:.2e}  "
                      f"{elapsed / steps_here:.2f} s/step")
        if done % args.val_every == 0 or done == args.steps or out_of_time:
            save_state(state_path, model.trainable_state_dict(), optimizer, done, history, options, seconds_before + time.time() - t_start)
            plot_curves(history, run_dir / CURVE_NAME)
        if out_of_time and done < args.steps:
            stopped_early = True
            break
    bar.close()
    seconds = seconds_before + time.time() - t_start
    summary = {
        "finished": not stopped_early, "step": history["step"][-1] if history["step"] else 0, "options": options,
        "holdout_kept_out": kept_out, "device": str(device), "quantize": args.quantize,
        "compute_dtype": args.compute_dtype, "trained_parameters": n_trainable, "seconds": round(seconds, 1),
        "seconds_per_step": per_step(seconds, history["step"]),
        "train_caption_loss": mean_tail(history["caption"]), "train_ret_loss": mean_tail(history["ret"]),
        "val_caption_loss": history["val_caption"][-1] if history["val_caption"] else None,
        "val_ret_loss": history["val_ret"][-1] if history["val_ret"] else None,
        "val_ret_acc": history["val_ret_acc"][-1] if history["val_ret_acc"] else None,
    }
    conclude(model, run_dir, out_dir, summary, args)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoint folder to write (assets/demo for the demo bundle)")
    p.add_argument("--run-dir", help="resumable state and curves (default: runs/<name of --out>)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --run-dir")
    p.add_argument("--tsv", help="train on image-caption pairs from this TSV (caption, image columns) "
                                 "instead of the shapes world; its last --val-size rows validate")
    p.add_argument("--holdout", action=argparse.BooleanOptionalAction, default=True,
                   help="shapes world: keep the hold-out (shape, colour) pairs out of training, as stage 1 does")
    p.add_argument("--init", help="fine-tune this checkpoint (folder or preset): its model and weights are the "
                                  "start, and its config replaces --lm, --visual, --n-visual-tokens, --emb-dim "
                                  "(and --region-grid unless given: a grid it lacks starts untrained)")
    p.add_argument("--questions", action="store_true",
                   help="LMEye's stage 2: shapes-world questions, mixed with descriptions and requests "
                        "(model/training/conversations.py)")
    p.add_argument("--ask-more", nargs="+", choices=SIMPLE_KINDS + DRILLS, default=[],
                   help="with --questions: simple kinds asked twice as often as the others in training (the kinds a "
                        "module still gets wrong), or drills asked as often as those (binding: is there an object of "
                        "this colour and shape, where one has the colour and another the shape); validation asks "
                        "every kind alike, as before")
    p.add_argument("--request-tokens", type=int, default=None,
                   help="LMEye's request tokens: a model (or --init checkpoint) without a request module gets one "
                        "of this many tokens, untrained")
    p.add_argument("--trainable", choices=tuple(TRAINABLE), default="all",
                   help="what trains: every small layer, the request module alone (LMEye's stage 2), or the input "
                        "mappings alone (its ablation)")
    p.add_argument("--tokens-per-cell", type=int, default=None,
                   help=f"LM tokens per region cell (default {DEMO.tokens_per_cell}, or the --init checkpoint's; "
                        f"another number than the checkpoint's starts a new region mapping)")
    p.add_argument("--cell-words", type=float, default=0.0,
                   help="weight of the loss that pulls each cell's 4 tokens towards the words of its object "
                        "(size, colour, shape, place; model/training/cell_words.py); shapes world only")
    p.add_argument("--cls-dropout", type=float, default=0.0,
                   help="the share of training images whose pooled CLS feature is zeroed, so that only their "
                        "region tokens can say what they show")
    p.add_argument("--context-every", type=int, default=CONTEXT_EVERY,
                   help="every N-th training batch is multi-turn (described images, then a request or another "
                        "image); 1: all of them, for a model whose requests after described images need the practice")
    p.add_argument("--lm", default=DEMO.lm)
    p.add_argument("--visual", default=DEMO.visual)
    p.add_argument("--visual-pretrained", default=DEMO.visual_pretrained, help="open_clip tag, for a named --visual model")
    p.add_argument("--n-visual-tokens", type=int, default=DEMO.n_visual_tokens)
    p.add_argument("--region-grid", type=int, default=None,
                   help=f"region tokens: patch features pooled to an N x N grid, one token per cell (0: none; "
                        f"default {DEMO.region_grid}, or the --init checkpoint's)")
    p.add_argument("--projector", choices=PROJECTORS, default=DEMO.projector,
                   help="CLIP features -> LM tokens: linear (FROMAGe) or mlp (LLaVA-1.5)")
    p.add_argument("--emb-dim", type=int, default=DEMO.emb_dim)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of --steps")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--val-every", type=int, default=100, help="validate and save a resumable state every N steps")
    p.add_argument("--val-size", type=int, default=64, help="validation conversations")
    p.add_argument("--time-limit", type=float, default=None,
                   help="minutes: stop at the first step after this, resumable (for jobs with a time cap)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="4bit")
    p.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default=None,
                   help="the LM's compute dtype (default: bfloat16 where the device runs it natively, else "
                        "float32, whatever the --init checkpoint was trained with)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.questions and args.tsv:
        p.error("--questions trains on the shapes world: leave out --tsv")
    if args.ask_more and not args.questions:
        p.error("--ask-more weighs the questions of --questions")
    if args.region_grid is None and args.init is None:
        args.region_grid = DEMO.region_grid
    if args.tokens_per_cell is None and args.init is None:
        args.tokens_per_cell = DEMO.tokens_per_cell
    if args.cell_words and args.tsv:
        p.error("--cell-words needs the shapes world's scenes: leave out --tsv")
    if args.request_tokens is None and args.init is None:
        args.request_tokens = 0
    return args


def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
