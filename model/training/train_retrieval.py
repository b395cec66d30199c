"""The retrieval stage: `[RET]`'s query mapping and the image mapping trained alone, in large contrastive batches.

Joint training (`train.py`) meets 8 requests a step (half of 16 conversations), so each query learns against 7 other
images: too few to tell apart scenes that share most of their objects (the demo after it ranked the right scene first
for 70% of 1,000 test requests; after this stage, 90%). Everything before the two mappings is frozen here (the LM,
the `[RET]` input row, the encoder and the input mappings), so what they read is computed once: the LM's hidden
state where `[RET]` is the input for `--queries` requests and the encoder's pooled feature of the image each should
find. First, `[RET]` gets an output row of its own (`GroundedConfig.ret_output_row`), fitted on the hidden states
where those requests open, and at every token of a quarter as many descriptions: when to retrieve, learnt where
it goes wrong (a model whose image tokens read like words continued describing after described images; fitted on
descriptions' openings alone, it opened `[RET]` inside a long description of a photograph) without moving any
query.
A share of the requests follows two or three described images, where the history pulls the query towards the
earlier pictures; eight requests follow each history (a new scene, or another like an earlier one), which is read
once for all eight (on this CPU 0.35 s a request, against 0.17 s for a request alone). The cache is kept in the run
folder and reused by a later run with the same inputs; a step on it is a few milliseconds, so `--batch-size` can be
hundreds: every other image in the batch is a negative, except another picture of the same scene.

With `--ret-context` only a module for requests after images trains (`model/ret_context.py`): which earlier image a
request names, if any, and the query of a request for a new scene. The mappings, the `[RET]` rows and so the
gallery's index stay as they were, and requests alone are answered as before; no description is read.

    python -m model.training.train_retrieval --init demo --out runs/retrieval
    python -m model.training.train_retrieval --init demo --out runs/pointing --ret-context --after-history 1 \
        --queries 16000
"""
from __future__ import annotations

import argparse
import hashlib
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from model.checkpoint import resolve
from model.config import WEIGHTS_NAME, GroundedConfig
from model.grounded import GroundedLM
from model.prompt import Turn, images_in
from model.ret_context import padded_earlier
from model.training.conversations import ORDINALS, RET_TOKEN, caption_turns, context_request, retrieval_turns
from model.training.evaluate import recall_at_k, reply_positions, reply_states
from model.training.optimization import param_groups, schedule_step
from model.training.plots import plot_batches, plt, save_figure
from model.training.train import CURVE_NAME, add_stage_options, conclude, stage_summary
from model.training.train_clip import resolve_device
from model.world import shapes

TRAINED = ("ret_mapping.", "image_mapping.", "logit_scale")
TRAINED_CONTEXT = ("ret_context.",)
KINDS = ("alone", "new after history", "refer-back")
PER_HISTORY = 8  # requests after one history: reply_states reads the history once for all of them
CACHE_NAME = "retrieval_cache.{split}.safetensors"
EMISSION_STEPS = 500  # full-batch steps of the [RET] output row: one vector, tens of thousands of states
DESCRIBED_EVERY = 4  # one description, never to hold [RET], for every four requests that open with it


def requests(split: str, n: int, image_size: int, holdout: bool, after_history: float, seed: int
             ) -> tuple[list[list[Turn]], list[Image.Image], list[tuple], list[int], list[int]]:
    """n conversations ending in a request answered by `[RET]`, the image each should find, that image's objects
    (two images of the same objects are the same answer), each request's kind (an index of `KINDS`) and the earlier
    image it names (its place in the conversation; -1: none). A share `after_history` comes after two or three
    described images, `PER_HISTORY` requests after each history, each asking for a new scene or for "another
    picture like the second one" (found as another rendering of that scene); the rest are a request alone, and come
    first. A pure function of its arguments."""
    rng = random.Random(f"retrieval:{split}:{seed}")
    start, stop = shapes.SPLITS[split]

    def draw() -> shapes.Sample:
        return shapes.sample(split, rng.randrange(stop - start), image_size, holdout)

    n_after = round(n * after_history)
    conversations, wanted, kinds, named = [], [], [], []
    for _ in range(n - n_after):
        wanted.append(draw())
        conversations.append(retrieval_turns(wanted[-1].caption, rng))
        kinds.append(KINDS.index("alone"))
        named.append(-1)
    for first in range(0, n_after, PER_HISTORY):
        history, turns = described_history(draw, rng)
        for i in range(first, min(n_after, first + PER_HISTORY)):
            if rng.random() < 0.5:
                k = rng.randrange(len(history))
                scene = history[k].scene
                wanted.append(shapes.Sample(shapes.render(scene, random.Random(f"another:{split}:{seed}:{i}"),
                                                          image_size), history[k].caption, scene))
                conversations.append(turns + [Turn("user", [context_request(k, rng)]), Turn("assistant", [RET_TOKEN])])
                kinds.append(KINDS.index("refer-back"))
                named.append(k)
            else:
                wanted.append(draw())
                conversations.append(turns + retrieval_turns(wanted[-1].caption, rng))
                kinds.append(KINDS.index("new after history"))
                named.append(-1)
    return conversations, [w.image for w in wanted], [w.scene.objects for w in wanted], kinds, named


def described_history(draw: Callable[[], shapes.Sample], rng: random.Random
                      ) -> tuple[list[shapes.Sample], list[Turn]]:
    """Two or three drawn scenes and the turns that describe them, as the model describes them."""
    history = [draw() for _ in range(rng.randint(2, len(ORDINALS)))]
    return history, [t for h in history for t in caption_turns(h.image, shapes.plain_caption(h.scene), rng)]


def descriptions(split: str, n: int, image_size: int, holdout: bool, after_history: float, seed: int
                 ) -> list[list[Turn]]:
    """n conversations ending in a new image described, where a reply must not open with `[RET]`: a share
    `after_history` after two or three described images (`PER_HISTORY` after each history), the rest alone, first.
    A pure function of its arguments."""
    rng = random.Random(f"descriptions:{split}:{seed}")
    start, stop = shapes.SPLITS[split]

    def draw() -> shapes.Sample:
        return shapes.sample(split, rng.randrange(stop - start), image_size, holdout)

    n_after = round(n * after_history)
    conversations = []
    for _ in range(n - n_after):
        new = draw()
        conversations.append(caption_turns(new.image, shapes.plain_caption(new.scene), rng))
    for first in range(0, n_after, PER_HISTORY):
        _, turns = described_history(draw, rng)
        for _ in range(first, min(n_after, first + PER_HISTORY)):
            new = draw()
            conversations.append(turns + caption_turns(new.image, shapes.plain_caption(new.scene), rng))
    return conversations


def parts(conversations: list[list[Turn]], n_alone: int, cache_batch: int) -> list[tuple[list, int, str]]:
    """Conversations whose first `n_alone` stand alone and the rest follow a history `PER_HISTORY` at a time (as
    `requests` and `descriptions` draw them), as (conversations, batch size, label) to read: those after a history
    one history's conversations a batch, so that each history is read once."""
    return [(rows, batch, what) for rows, batch, what in ((conversations[:n_alone], cache_batch, "alone"),
                                                          (conversations[n_alone:], PER_HISTORY, "after history"))
            if rows]


def openings(model: GroundedLM, conversations: list[list[Turn]], n_alone: int, cache_batch: int, desc: str,
             token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`reply_states` at the first `token` of each reply, read in `parts`: where the token is predicted
    (N, lm_dim), and where it is the input (N, lm_dim). `desc` opens the progress bars' labels."""
    before, at, _ = zip(*(reply_states(model, rows, batch, f"{desc}, {what})", token)
                          for rows, batch, what in parts(conversations, n_alone, cache_batch)))
    return torch.cat(before).cpu(), torch.cat(at).cpu()


def positions(model: GroundedLM, conversations: list[list[Turn]], n_alone: int, cache_batch: int, desc: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`reply_positions` of each reply, read in `parts`: the state where each of its tokens is predicted
    (M, lm_dim), that token (M,) and which conversation it is in (M,)."""
    states, ids, reply, done = [], [], [], 0
    for rows, batch, what in parts(conversations, n_alone, cache_batch):
        part = reply_positions(model, rows, batch, f"{desc}, {what})")
        states.append(part[0].cpu())
        ids.append(part[1])
        reply.append(part[2] + done)
        done += len(rows)
    return torch.cat(states), torch.cat(ids), torch.cat(reply)


def cached_inputs(model: GroundedLM, run_dir: Path, split: str, args: argparse.Namespace, n: int
                  ) -> dict[str, torch.Tensor]:
    """What the stage reads for `n` requests of `split`: {"hidden": (n, lm_dim) where `[RET]` is the input,
    "before": (n, lm_dim) where it is predicted, "pooled": (n, visual_dim), "scene": (n,) an id shared by the
    images of one scene, "kind": (n,) an index of `KINDS`, "earlier": (n, H, visual_dim) the pooled features of
    the images described before each request (H at most 3), "present": (n, H) where a request has one, "named":
    (n,) the earlier image a request names (-1: none)}, and, for the `[RET]` row's fit (not with `--ret-context`),
    for n // DESCRIBED_EVERY descriptions, at each of their M tokens: "described": (M, lm_dim) where it is
    predicted, "word": (M,) the token, "described_reply": (M,) which description it is in and "described_kind":
    (M,) 0 alone, 1 after history; from the run folder when a run with the same inputs made them."""
    path = run_dir / CACHE_NAME.format(split=split)
    init = resolve(args.init)
    weights = hashlib.sha256((init / WEIGHTS_NAME).read_bytes()).hexdigest()
    inputs = {"format": "5", "init": str(init.resolve()), "weights": weights, "n": str(n),
              "per_history": str(PER_HISTORY), "after_history": str(args.after_history), "holdout": str(args.holdout),
              "seed": str(args.seed), "descriptions": str(not args.ret_context)}
    if path.is_file():
        with safe_open(path, "pt") as f:
            if f.metadata() == inputs:
                return load_file(path)
    conversations, images, scenes, kinds, named = requests(split, n, model.visual.image_size[0], args.holdout,
                                                    args.after_history, args.seed)
    before, hidden = openings(model, conversations, kinds.count(KINDS.index("alone")), args.cache_batch,
                              f"[RET] states ({split}", model.ret_id)
    pooled = torch.cat([model.encoded(images[i:i + 256])[:, 0] for i in range(0, n, 256)])
    ids = {scene: i for i, scene in enumerate(dict.fromkeys(scenes))}
    earlier = [model.encoded(images_in(turns))[:, 0].cpu() for turns in conversations]   # each (H_i, visual_dim)
    earlier, present = padded_earlier(earlier, "cpu")
    cache = {"hidden": hidden, "before": before, "pooled": pooled.cpu(),
             "scene": torch.tensor([ids[s] for s in scenes]), "kind": torch.tensor(kinds),
             "earlier": earlier, "present": present, "named": torch.tensor(named)}
    if args.ret_context:  # the [RET] row is not fitted: no descriptions to read
        save_file(cache, path, metadata=inputs)
        return cache
    m = n // DESCRIBED_EVERY
    described = descriptions(split, m, model.visual.image_size[0], args.holdout, args.after_history, args.seed)
    alone_m = m - round(m * args.after_history)
    states, words, reply = positions(model, described, alone_m, args.cache_batch, f"descriptions ({split}")
    cache |= {"described": states, "word": words, "described_reply": reply,
              "described_kind": (reply >= alone_m).long()}
    save_file(cache, path, metadata=inputs)
    return cache


@torch.no_grad()
def vocabulary_side(model: GroundedLM, states: torch.Tensor, words: torch.Tensor | None = None, chunk: int = 1024
                    ) -> dict[str, torch.Tensor]:
    """What the vocabulary says at states (N, lm_dim) of replies, `[RET]` left out: its logits'
    logsumexp and max (N,), and with `words` (N,) the logit of each. Fixed while only `[RET]`'s output row
    trains, so read once."""
    out: dict[str, list[torch.Tensor]] = {"lse": [], "top": [], "word": []}
    for start in range(0, len(states), chunk):
        logits = model.logits(states[start:start + chunk])                                 # (C, V')
        logits[:, model.ret_id] = float("-inf")
        out["lse"].append(logits.logsumexp(-1))
        out["top"].append(logits.max(-1).values)
        if words is not None:
            out["word"].append(logits.gather(1, words[start:start + chunk, None].to(logits.device))[:, 0])
    return {k: torch.cat(v) for k, v in out.items() if v}


def opening(model: GroundedLM, cache: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The cache's states for the emission fit: where requests open, every position of the descriptions, and
    their vocabulary side."""
    asked, described = vocabulary_side(model, cache["before"]), vocabulary_side(model, cache["described"],
                                                                                 cache["word"])
    return {"asked": cache["before"], "asked_lse": asked["lse"], "asked_top": asked["top"], "kind": cache["kind"],
            "described": cache["described"], "described_lse": described["lse"], "described_top": described["top"],
            "described_word": described["word"], "described_kind": cache["described_kind"],
            "described_reply": cache["described_reply"]}


def emission_loss(row: torch.Tensor, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy over the vocabulary and `[RET]` (whose logit is `row` . state): a request opens with `[RET]`,
    and a description says each of its words, never `[RET]`. Requests and descriptions weigh the same."""
    asked = data["asked"] @ row
    described = data["described"] @ row
    return ((torch.logaddexp(data["asked_lse"], asked) - asked).mean()
            + (torch.logaddexp(data["described_lse"], described) - data["described_word"]).mean())


@torch.no_grad()
def emission(row: torch.Tensor, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """How often greedy decoding would emit `[RET]`: where requests open, by kind (wanted), and anywhere in a
    description given its words so far, by kind of description (not wanted)."""
    asked = data["asked"] @ row > data["asked_top"]
    at = (data["described"] @ row > data["described_top"]).float()                       # (M,)
    reply = data["described_reply"]
    described = torch.zeros(int(reply.max()) + 1, device=at.device).scatter_reduce(0, reply, at, "amax")
    kind = torch.zeros_like(described).scatter_reduce(0, reply, data["described_kind"].float(), "amax")
    rates = {f"[RET] {k}": asked[data["kind"] == i].float().mean().item()
             for i, k in enumerate(KINDS) if (data["kind"] == i).any()}
    rates |= {f"[RET] describing {k}": described[kind == i].mean().item()
              for i, k in enumerate(("alone", "after history")) if (kind == i).any()}
    return rates


def fit_emission(model: GroundedLM, train: dict[str, torch.Tensor], val: dict[str, torch.Tensor], lr: float
                 ) -> dict[str, dict[str, float]]:
    """`[RET]`'s output row alone, full batch on the cached states: when a reply retrieves. The input row, and
    with it every query, stays as it was. -> validation emission rates before and after."""
    row = model.ret_output
    train, val = opening(model, train), opening(model, val)
    before = emission(row, val)
    optimizer = torch.optim.Adam([row], lr=lr)
    for step in tqdm(range(EMISSION_STEPS), desc="[RET] output row", unit="step", dynamic_ncols=True):
        schedule_step(optimizer, step, EMISSION_STEPS, EMISSION_STEPS // 20, lr)
        loss = emission_loss(row, train)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {"before": before, "after": emission(row, val)}


def queries(model: GroundedLM, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """The `[RET]` queries (B, emb_dim) of cached requests, as decoding makes them (a model with `ret_context`
    reads the state before `[RET]` and the images described before)."""
    return model.ret_query(data["hidden"], data["before"], model.image_keys(data["earlier"]), data["present"])


def contrastive_loss(model: GroundedLM, asked: torch.Tensor, wanted: torch.Tensor, scene: torch.Tensor
                     ) -> torch.Tensor:
    """Symmetric InfoNCE between requests' queries (B, emb_dim) and the keys of the images they ask for (B, emb_dim),
    as joint training's: each query's own image is its answer. `scene` (B,) says which rows show the same scene:
    another row's picture of the scene asked for is left out rather than counted as wrong."""
    scores = model.logit_scale.exp().clamp(max=100) * asked @ wanted.T                    # (B, B)
    own = torch.eye(len(scene), dtype=torch.bool, device=scores.device)
    scores = scores.masked_fill((scene[:, None] == scene[None, :]) & ~own, float("-inf"))
    target = torch.arange(len(scene), device=scores.device)
    return (F.cross_entropy(scores, target) + F.cross_entropy(scores.T, target)) / 2


def mapping_loss(model: GroundedLM, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """The two mappings' loss on a batch of cached requests."""
    return contrastive_loss(model, queries(model, data), model.image_keys(data["pooled"]), data["scene"])


def context_loss(model: GroundedLM, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """`ret_context`'s loss on a batch of cached requests: cross-entropy of its choice against the earlier image
    each request names (or none), and the contrastive loss of its query on the requests for a new scene after
    described images."""
    module = model.ret_context
    choice = F.cross_entropy(module.choices(data["before"], data["present"]), data["named"] + 1)
    new = (data["named"] < 0) & data["present"].any(1)
    if new.sum() < 2:
        return choice
    asked = F.normalize(module.query(data["hidden"][new]), dim=-1)
    return choice + contrastive_loss(model, asked, model.image_keys(data["pooled"][new]), data["scene"][new])


@torch.no_grad()
def recall(model: GroundedLM, cache: dict[str, torch.Tensor]) -> dict[str, float]:
    """Text -> image recall over the cache's own images (an image of the scene asked for is a hit): R@1 and R@5
    of all requests, and R@1 of each kind; for a model with `ret_context`, how often it points at the image a
    request after described images names, or at none when it names none."""
    scores = queries(model, cache) @ model.image_keys(cache["pooled"]).T
    relevant = cache["scene"][:, None] == cache["scene"][None, :]
    result = recall_at_k(scores, relevant, (1, 5))
    for k, kind in enumerate(KINDS):
        if (rows := cache["kind"] == k).any():
            result[f"R@1 {kind}"] = recall_at_k(scores[rows], relevant[rows], (1,))["R@1"]
    after = cache["present"].any(1)
    if model.ret_context is not None and after.any():
        chosen = model.ret_context.choices(cache["before"][after], cache["present"][after]).argmax(1) - 1
        result["pointed right"] = (chosen == cache["named"][after]).float().mean().item()
    return result


def plot(history: dict[str, list], emitted: dict[str, dict[str, float]] | None, loss_name: str, path: Path) -> None:
    """The curves; with `emitted` (the `[RET]` row was fitted), when replies open with `[RET]` first."""
    fig, axes = plt.subplots(1, 3 if emitted else 2, figsize=(15 if emitted else 12, 3.8))
    loss_ax, recall_ax = axes[-2:]
    if emitted:
        emission_ax = axes[0]
        names = list(emitted["after"])
        at = torch.arange(len(names)).float()
        for shift, when in ((-0.2, "before"), (0.2, "after")):
            bars = emission_ax.bar(at + shift, [emitted[when][k] for k in names], width=0.4, label=f"{when} the fit")
            emission_ax.bar_label(bars, fmt="%.2f", fontsize=7)
        emission_ax.set_xticks(at, [k.removeprefix("[RET] ").replace(" ", "\n", 1) for k in names], fontsize=8)
        emission_ax.set(title="validation: replies opening with [RET]", ylim=(0, 1.1))
        emission_ax.legend(fontsize=8)
    plot_batches(loss_ax, history["step"], history["loss"])
    loss_ax.set(xlabel="step", yscale="log")
    loss_ax.set_title(loss_name, fontsize=10)
    loss_ax.legend()
    recall_ax.plot(history["val_step"], history["val_R@1"], "o-", label="R@1")
    recall_ax.plot(history["val_step"], history["val_R@5"], "s-", label="R@5")
    for kind in KINDS:
        if f"val_R@1 {kind}" in history:
            recall_ax.plot(history["val_step"], history[f"val_R@1 {kind}"], ".--", label=f"R@1, {kind}")
    if "val_pointed right" in history:
        recall_ax.plot(history["val_step"], history["val_pointed right"], "k:", label="pointed at the image named\n"
                                                                                   "(or none), after images")
    recall_ax.set(title="validation: text -> image over its requests' images", xlabel="step", ylim=(0, 1.02))
    recall_ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    save_figure(fig, path)


def train_retrieval(args: argparse.Namespace) -> dict:
    init = resolve(args.init)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)  # a new module's first weights
    # 4-bit weights dequantised once: what they compute on a batch, without dequantising at every call
    model = GroundedLM.from_pretrained(init, device=device, dequantize=True, ret_output_row=True,
                                       ret_context=args.ret_context)
    model.config.ret_opens_reply = True  # the row is fitted where replies open, and never inside a description
    if not model.config.retrieves:
        raise SystemExit(f"{args.init} does not retrieve (its [RET] was never trained): nothing to map")
    model.eval()
    run_dir = Path(args.run_dir or Path("runs") / Path(args.out).name)
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    train = {k: v.to(device) for k, v in cached_inputs(model, run_dir, "train", args, args.queries).items()}
    val = {k: v.to(device) for k, v in cached_inputs(model, run_dir, "val", args, args.val_queries).items()}
    cache_seconds = time.time() - t_start
    emitted = None
    if not args.ret_context:
        for name, p in model.named_parameters():
            p.requires_grad_(name == "ret_output")
        emitted = fit_emission(model, train, val, args.lr)
        print("validation, share of replies opening with [RET], before -> after: "
              + ", ".join(f"{k} {emitted['before'][k]:.3f} -> {v:.3f}" for k, v in emitted["after"].items()))
    if args.ret_context and not GroundedConfig.load(init).ret_context:  # a new module: read as its requests are
        model.ret_context.standardise(train["before"][train["present"].any(1)])
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(TRAINED_CONTEXT if args.ret_context else TRAINED))
    loss_of = context_loss if args.ret_context else mapping_loss
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=args.lr)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    history: dict[str, list] = {"step": [], "loss": [], "val_step": [0], **{f"val_{k}": [v] for k, v in
                                                                              recall(model, val).items()}}
    generator = torch.Generator().manual_seed(args.seed)
    t_fit = time.time()
    for step in (bar := tqdm(range(args.steps), desc="retrieval mappings", unit="step", dynamic_ncols=True)):
        schedule_step(optimizer, step, args.steps, max(1, args.steps // 20), args.lr)
        rows = torch.randperm(len(train["scene"]), generator=generator)[:args.batch_size].to(device)
        loss = loss_of(model, {k: train[k][rows] for k in ("hidden", "before", "pooled", "scene", "earlier",
                                                              "present", "named")})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        history["step"].append(step + 1)
        history["loss"].append(loss.item())
        if (step + 1) % args.val_every == 0 or step + 1 == args.steps:
            history["val_step"].append(step + 1)
            for k, v in recall(model, val).items():
                history[f"val_{k}"].append(v)
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", val_R1=f"{history['val_R@1'][-1]:.3f}")
    plot(history, emitted, "the choice's cross-entropy + the new-scene query's contrastive loss"
         if args.ret_context else "contrastive loss ([RET] query vs image)", run_dir / CURVE_NAME)
    summary = stage_summary(args, init, cache_seconds=round(cache_seconds, 1),
                            fit_seconds=round(time.time() - t_fit, 1),
                            loss=sum(history["loss"][-50:]) / len(history["loss"][-50:]) if args.steps else None,
                            val_before={k[4:]: v[0] for k, v in history.items() if k.startswith("val_") and k != "val_step"},
                            val_after={k[4:]: v[-1] for k, v in history.items() if k.startswith("val_") and k != "val_step"},
                            **({"emission_before": emitted["before"], "emission_after": emitted["after"]}
                               if emitted else {}))
    conclude(model, run_dir, Path(args.out), summary, args)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init", required=True, help="checkpoint (folder or preset) whose two retrieval mappings train")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--run-dir", help="the cache and the curves (default: runs/<name of --out>)")
    p.add_argument("--queries", type=int, default=8000, help="training requests (shapes world, train split)")
    p.add_argument("--val-queries", type=int, default=800, help="validation requests (val split)")
    p.add_argument("--after-history", type=float, default=0.5,
                   help="the share of requests that come after two or three described images")
    p.add_argument("--cache-batch", type=int, default=32, help="conversations a forward while caching")
    p.add_argument("--steps", type=int, default=4000, help="of the two mappings; 0: only [RET]'s output row")
    p.add_argument("--batch-size", type=int, default=256, help="requests a step, each the others' negatives")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--ret-context", action="store_true",
                   help="train only queries' pointing at earlier images (a new module if the checkpoint has none)")
    add_stage_options(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    train_retrieval(parse_args())
