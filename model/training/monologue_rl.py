"""IMMO, reinforcement: the Reasoner's adapter learns from whether its final answer is right.

    python -m model.training.monologue_rl --checkpoint runs/demo-immo --steps 30      # after the supervised run
    python -m model.training.monologue_rl --checkpoint runs/demo-immo --steps 30 --resume

One step:
    rollouts   B shapes-world questions (compound, and a `--simple-share` of simple ones), G monologues each,
               run as the app runs them (`model.monologue.think`), all B x G at once through the batched decoder
               (`model/serving.py`): the Reasoner samples at `--temperature`, the Observer (adapter off) answers
               greedily, a malformed monologue falls back (and counts)
    reward     1 when the final answer is right, else 0; a fallback earns 0 (its answer is not the Reasoner's)
    loss       RLOO: each monologue's advantage is its reward minus the mean of the other G - 1 of its question,
               times the log-probability of the Reasoner's own tokens (mean per token); plus `--kl` times the
               per-token KL (k3 estimate) to the supervised adapter the run started from. The Observer's
               answers and the prompt are context, masked out of both (the released IMMO code left them out of
               the context instead). Only the questions whose G monologues earned different rewards are
               scored: a group all right or all wrong has no advantage, and a Reasoner right nine times in ten
               leaves most groups so (DAPO filters its batches likewise). A step with no such group changes nothing
The monologue's text is tokenised again piece by piece as the supervised trainer does (`monologue_row`), so the
policy is scored on exactly the rows it was trained on. Why not trl: its GRPO/RLOO trainers generate completions
with the policy alone; here a completion is a dialogue whose other half comes from the Observer, the same LM with
the adapter off, mid-sequence. Resumable; curves of reward, accuracy, fallback rate and KL. The adapter goes back
into the checkpoint's `reasoner/` at the end (its `training.json` gains an `rl` entry).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from tqdm import tqdm

from model.checkpoint import resolve
from model.generate import GenerationSettings
from model.grounded import GroundedLM
from model.monologue import Monologue, think
from model.prompt import Turn
from model.reasoner import ADAPTER, FOLDER, adapter_weights, reasoner_parameters
from model.serving import DecodeEngine
from model.training.monologue import asked, conclude, learnt_logits, pieces_row
from model.training.optimization import schedule_step
from model.training.plots import plot_batches, plt, save_figure
from model.training.train import CURVE_NAME, SUMMARY_NAME, load_state, mean_tail, save_state, state_file
from model.training.train_clip import resolve_device
from model.world import questions, shapes

RESUME_KEYS = ("checkpoint", "questions_per_step", "group", "temperature", "kl", "lr", "simple_share", "seed")


def row_of(model: GroundedLM, question: str, record: Monologue) -> tuple[list[int], list[int]]:
    """A sampled monologue as a training row, line by line as it was written: the Reasoner's lines learnt, the
    Observer's read; the last line closes the turn."""
    lines = [(f"{text}\n", role == "Reasoner") for role, text in record.lines]
    if lines:
        lines[-1] = (lines[-1][0][:-1] + model.tokenizer.eos_token, lines[-1][1])
    return pieces_row(model, question, lines)


def token_logprobs(model: GroundedLM, rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (N, T-1) of each row's next tokens under the adapter, 0 but at the Reasoner's own, and
    the mask of those."""
    logits, targets, learnt = learnt_logits(model, rows)
    own = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)                  # (K,)
    return torch.zeros(learnt.shape, device=own.device).masked_scatter(learnt, own), learnt.float()


def rollouts(model: GroundedLM, batch: list[tuple[str, int, questions.Question]], group: int, temperature: float,
             seed: int, engine: DecodeEngine | None = None) -> tuple[list[Monologue], list[float]]:
    """`group` monologues for each question, and their rewards; with `engine`, all of them at once in its batch
    (each monologue's sampling has its own seed, so they are the monologues written one after another)."""
    image_size = model.visual.image_size[0]
    images = [shapes.sample(split, index, image_size, True).image for split, index, _ in batch]

    def monologue(k: int) -> Monologue:
        n, record = k // group, Monologue()
        settings = GenerationSettings(max_new_tokens=48, temperature=temperature, seed=seed + k)
        for _ in think(model, [Turn("user", [images[n], batch[n][2].text])], settings, record=record, engine=engine):
            pass
        return record

    if engine is None:
        records = [monologue(k) for k in range(len(batch) * group)]
    else:
        with ThreadPoolExecutor(len(batch) * group) as sessions:
            records = list(sessions.map(monologue, range(len(batch) * group)))
    rewards = [float(r.fallback is None and questions.is_right(r.answer, batch[k // group][2]))
               for k, r in enumerate(records)]
    return records, rewards


def advantages(reward: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO's advantages (B, G) of a step's rewards (B, G), and which questions (B,) they can teach: those whose
    monologues did not all earn the same reward (the others' advantages are all 0)."""
    group = reward.shape[1]
    others = (reward.sum(1, keepdim=True) - reward) / (group - 1)
    return reward - others, reward.amax(1) > reward.amin(1)


def plot_curves(history: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    plot_batches(axes[0], history["step"], history["reward"])
    axes[0].set(xlabel="step", ylim=(-0.02, 1.02), title="reward: final answer right")
    plot_batches(axes[1], history["step"], history["mixed"], color="tab:purple")
    axes[1].set(xlabel="step", ylim=(-0.02, 1.02), title="questions learnt from (rewards differ)")
    plot_batches(axes[2], history["step"], history["fallback"], color="tab:red")
    axes[2].set(xlabel="step", ylim=(-0.02, 1.02), title="fallback rate (malformed monologues)")
    plot_batches(axes[3], history["learnt_step"], history["kl"], color="tab:green")
    axes[3].set(xlabel="step", title="KL to the supervised Reasoner (per token)")
    save_figure(fig, path)


def train(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    folder = resolve(args.checkpoint)
    run_dir = Path(args.run_dir or Path("runs") / f"monologue-rl-{folder.name}")
    state_path = state_file(run_dir, args.resume)
    torch.manual_seed(args.seed)
    model = GroundedLM.from_pretrained(folder, device=device, dequantize=True)
    if model.reasoner is None:
        raise SystemExit(f"{args.checkpoint} has no Reasoner: train one first (python -m model.training.monologue)")
    reference = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model.lm, adapter_name=ADAPTER).items()}
    for p in reasoner_parameters(model.lm):
        p.requires_grad_(True)
    params = reasoner_parameters(model.lm)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    options = {key: getattr(args, key) for key in RESUME_KEYS}
    history = {"step": [], "reward": [], "mixed": [], "fallback": [], "learnt_step": [], "kl": [], "loss": []}
    start, seconds_before = 0, 0.0
    if args.resume:
        weights, meta = load_state(state_path, reference, optimizer, options)
        set_peft_model_state_dict(model.lm, weights, adapter_name=ADAPTER)
        history, start, seconds_before = meta["history"], meta["step"], meta["seconds"]
    image_size = model.visual.image_size[0]
    rng = random.Random(f"monologue-rl:{args.seed}")
    pool = [("train", i, q) for i, q in asked("train", args.pool, args.simple_share, args.seed + 1, image_size,
                                              offset=500_000)]
    order = [rng.sample(pool, args.questions_per_step) for _ in range(args.steps)]
    t_start, steps_here, stopped_early = time.time(), 0, False
    engine = DecodeEngine(model, max_batch=args.questions_per_step * args.group)  # the rollouts' rows
    with contextlib.closing(engine):
        bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="reasoner RL", unit="step",
                   dynamic_ncols=True)
        for step in bar:
            schedule_step(optimizer, step, args.steps, 0, args.lr)
            batch = order[step]
            with torch.no_grad():
                records, rewards = rollouts(model, batch, args.group, args.temperature, args.seed + 1000 * step, engine)
            reward = torch.tensor(rewards, device=model.device).view(len(batch), args.group)          # (B, G)
            advantage, mixed = advantages(reward)
            done, steps_here = step + 1, steps_here + 1
            for key, value in (("step", done), ("reward", sum(rewards) / len(rewards)),
                               ("mixed", mixed.float().mean().item()),
                               ("fallback", sum(r.fallback is not None for r in records) / len(records))):
                history[key].append(value)
            if mixed.any():
                learnt = [k for k in range(len(records)) if mixed[k // args.group]]                   # N rows
                rows = [row_of(model, batch[k // args.group][2].text, records[k]) for k in learnt]
                with torch.no_grad(), adapter_weights(model.lm, reference):
                    reference_logprobs, _ = token_logprobs(model, rows)
                logprobs, mask = token_logprobs(model, rows)                                          # (N, T-1)
                tokens = mask.sum(1).clamp(min=1)
                log_ratio = reference_logprobs - logprobs
                kl = ((log_ratio.exp() - log_ratio - 1) * mask).sum(1) / tokens                       # k3, per token
                policy = -(advantage.flatten()[learnt] * (logprobs * mask).sum(1) / tokens)
                loss = (policy + args.kl * kl).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                for key, value in (("learnt_step", done), ("kl", kl.mean().item()), ("loss", loss.item())):
                    history[key].append(value)
            elapsed = time.time() - t_start
            bar.set_postfix(reward=f"{history['reward'][-1]:.2f}", mixed=f"{history['mixed'][-1]:.2f}",
                            q_s=f"{steps_here * len(batch) / elapsed:.2f}")
            out_of_time = args.time_limit is not None and elapsed >= args.time_limit * 60
            if done % args.save_every == 0 or done == args.steps or out_of_time:
                save_state(state_path, get_peft_model_state_dict(model.lm, adapter_name=ADAPTER), optimizer, done,
                           history, options, seconds_before + time.time() - t_start)
                plot_curves(history, run_dir / CURVE_NAME)
            if out_of_time and done < args.steps:
                stopped_early = True
                break
        bar.close()
    summary = {"finished": not stopped_early, "step": history["step"][-1] if history["step"] else 0,
               "options": options, "device": str(device), "seconds": round(seconds_before + time.time() - t_start, 1),
               "reward_last_10": mean_tail(history["reward"], 10), "fallback_last_10": mean_tail(history["fallback"], 10),
               "mixed_last_10": mean_tail(history["mixed"], 10), "steps_learnt": len(history["learnt_step"]),
               "kl_last_10": mean_tail(history["kl"], 10)}
    record = ({**json.loads((folder / FOLDER / SUMMARY_NAME).read_text()), "rl": summary} if summary["finished"]
              else summary)  # the supervised run's record, with this one's
    conclude(model, run_dir, folder, summary, record, args.steps)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint with a (supervised) Reasoner; updated in place")
    p.add_argument("--run-dir", help="resumable state and curves (default: runs/monologue-rl-<checkpoint>)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--questions-per-step", type=int, default=4)
    p.add_argument("--group", type=int, default=4, help="monologues per question (RLOO's group)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--kl", type=float, default=0.1, help="weight of the per-token KL to the supervised Reasoner")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--simple-share", type=float, default=0.2)
    p.add_argument("--pool", type=int, default=2000, help="training questions drawn from")
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--time-limit", type=float, default=None, help="minutes; save and stop after")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = p.parse_args(argv)
    if min(args.steps, args.questions_per_step, args.save_every, args.pool) < 1 or args.group < 2:
        raise SystemExit("--steps, --questions-per-step, --save-every and --pool must be positive, --group at least 2")
    return args


def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
