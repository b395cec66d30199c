"""Stage 1 of training: the demo's small CLIP, from scratch on shapes-world pairs.

This encoder becomes the frozen visual encoder of the demo chat model, whose LM reads its pooled CLS
feature (post-ln_post, before the projection) through one linear map. So that feature has to carry every
object's shape, colour, size and position; the figures printed at the end measure exactly that.

Built from open_clip's own classes (`open_clip.CLIP` from a config dict, `open_clip.ClipLoss`, its bundled
SimpleTokenizer) and saved in open_clip's `local-dir:` format, which is how the app loads it:

    python -m model.training.train_clip --out assets/demo/clip
    open_clip.create_model_and_transforms("local-dir:assets/demo/clip")

Scenes are rendered once into a uint8 tensor cache (in worker processes); batches index into it, so data
loading costs nothing next to the model. The cache takes 49 KB a scene (400,000 scenes: 20 GB of host
memory, then of GPU memory); on a smaller machine pass a smaller --train-size. Batches hold distinct object
sets only: two images with the same objects would be false negatives for the contrastive loss.

The defaults are the recipe of the bundled assets/demo/clip: 6 minutes on one H100 (about 19,000 images/s);
a shared 2-core CPU manages about 6 images/s, too slow for anything but tests.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import multiprocessing as mp
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from model.world import shapes
from model.lm import default_device
from model.training.optimization import param_groups, schedule_step
from model.visual import pre_projection_features
from model.training.plots import plt, save_figure, plot_batches

MODEL_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 128, "patch_size": 16, "width": 192, "layers": 6, "head_width": 64},
    # The vocabulary is fixed by the bundled SimpleTokenizer (49408 rows): a narrow text tower keeps the
    # saved folder small, and the shapes-world language needs little more.
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 4},
}
PREPROCESS_CFG = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                  "resize_mode": "shortest"}
TOKENIZER_MODEL = "ViT-B-32"  # a built-in config with no HF tokenizer: open_clip's bundled SimpleTokenizer
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


# --- data -----------------------------------------------------------------------------------------

@dataclass
class Cache:
    """Pre-rendered scenes: pixels (N, H, W, 3) uint8, tokens (N, context) int64, scene keys (N,)."""
    pixels: torch.Tensor
    tokens: torch.Tensor
    keys: torch.Tensor
    captions: list[str]
    scenes: list[shapes.Scene]

    def to(self, device: torch.device) -> "Cache":
        return Cache(self.pixels.to(device), self.tokens.to(device), self.keys.to(device), self.captions,
                     self.scenes)


def scene_key(scene: shapes.Scene) -> int:
    """An integer that is equal for scenes with the same object set (background ignored)."""
    key = 0
    for obj in scene.objects:  # canonical order
        code = (((shapes.POSITIONS.index(obj.position) * len(shapes.SHAPES) + shapes.SHAPES.index(obj.shape))
                 * len(shapes.COLOURS) + list(shapes.COLOURS).index(obj.colour)) * len(shapes.SIZES)
                + shapes.SIZES.index(obj.size))
        key = key * 1000 + code + 1  # codes < 560, so objects never collide
    return key


@functools.lru_cache(maxsize=None)
def tokenizer_for(context_length: int):
    """open_clip's bundled SimpleTokenizer: what `open_clip.get_tokenizer("local-dir:<out>")` gives."""
    return open_clip.get_tokenizer(TOKENIZER_MODEL, context_length=context_length)


def _render_chunk(job: tuple[str, int, int, int, bool, int]):
    """Render and tokenise items start..stop of a split (runs in a worker process)."""
    split, start, stop, image_size, holdout, context_length = job
    items = [shapes.sample(split, i, image_size, holdout) for i in range(start, stop)]
    pixels = np.stack([np.asarray(s.image) for s in items])  # (n, H, W, 3)
    captions = [s.caption for s in items]
    return start, pixels, tokenizer_for(context_length)(captions), captions, [s.scene for s in items]


def render_cache(split: str, n: int, image_size: int, context_length: int, holdout: bool = False,
                 workers: int = 1) -> Cache:
    """Render the first n scenes of a split and tokenise their captions, in `workers` processes."""
    chunk = 1000
    jobs = [(split, a, min(a + chunk, n), image_size, holdout, context_length) for a in range(0, n, chunk)]
    pixels = torch.empty((n, image_size, image_size, 3), dtype=torch.uint8)
    tokens = torch.empty((n, context_length), dtype=torch.long)
    captions: list[str] = [""] * n
    scenes: list[shapes.Scene | None] = [None] * n
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(jobs) > 1:
            parts = stack.enter_context(mp.get_context("spawn").Pool(workers)).imap_unordered(_render_chunk, jobs)
        else:
            parts = map(_render_chunk, jobs)
        for start, chunk_pixels, chunk_tokens, chunk_captions, chunk_scenes in parts:
            stop = start + len(chunk_captions)
            pixels[start:stop] = torch.from_numpy(chunk_pixels)
            tokens[start:stop] = chunk_tokens
            captions[start:stop], scenes[start:stop] = chunk_captions, chunk_scenes
    return Cache(pixels, tokens, torch.tensor([scene_key(s) for s in scenes]), captions, scenes)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W), as open_clip's preprocessing does for an image already
    at the model's size (resize and crop are then no-ops)."""
    mean = torch.tensor(PREPROCESS_CFG["mean"], device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_CFG["std"], device=pixels.device).view(1, 3, 1, 1)
    return (pixels.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def distinct(index: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Keep the first item of each object set in `index` (B,) -> (B',), order preserved."""
    uniq, inverse = torch.unique(keys[index], return_inverse=True)
    positions = torch.arange(len(index), device=index.device)
    first = torch.full((len(uniq),), len(index), device=index.device).scatter_reduce(
        0, inverse, positions, reduce="amin")
    return index[first.sort().values]


# --- model ----------------------------------------------------------------------------------------

def build_model(model_cfg: dict) -> open_clip.CLIP:
    return open_clip.CLIP(**model_cfg)


def save(model: open_clip.CLIP, model_cfg: dict, out: Path) -> None:
    """open_clip's local-dir format. Weights in fp16 halve the folder; open_clip casts them on load."""
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": PREPROCESS_CFG},
                                              indent=2) + "\n")
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / WEIGHTS_NAME)


# --- evaluation -----------------------------------------------------------------------------------

@torch.no_grad()
def _encode(model: open_clip.CLIP, cache: Cache, device: torch.device, batch: int = 500):
    images, texts, pooled = [], [], []
    for a in range(0, len(cache.captions), batch):
        pixels = normalise(cache.pixels[a:a + batch].to(device))
        images.append(model.encode_image(pixels, normalize=True))
        texts.append(model.encode_text(cache.tokens[a:a + batch].to(device), normalize=True))
        pooled.append(pre_projection_features(model.visual, pixels)[0])
    return torch.cat(images), torch.cat(texts), torch.cat(pooled)


@torch.no_grad()
def retrieval(model: open_clip.CLIP, cache: Cache, device: torch.device) -> dict[str, float]:
    """Text->image over the cache as gallery. r1/r5: the caption's own image ranks within 1/5;
    objects_r1: the top image has exactly the caption's objects (jitter and background cannot be told
    from a caption, so equal-object images are indistinguishable and both count)."""
    image_emb, text_emb, _ = _encode(model, cache, device)
    sims = text_emb @ image_emb.T  # (N texts, N images)
    own = sims.diagonal().unsqueeze(1)
    rank = (sims > own).sum(1)  # images strictly better than the own one
    top = sims.argmax(1).cpu()
    objects_r1 = np.mean([cache.scenes[t].objects == cache.scenes[i].objects for i, t in enumerate(top.tolist())])
    return {"r1": (rank < 1).double().mean().item(), "r5": (rank < 5).double().mean().item(),
            "objects_r1": float(objects_r1)}


def one_object_cache(tokenizer, image_size: int, copies: int = 2) -> Cache:
    """Every single-object scene (shape x colour x size x position), `copies` renderings of each with
    different jitter and background, captioned in the grammar's plainest words."""
    items = []
    for shape in shapes.SHAPES:
        for colour in shapes.COLOURS:
            for size in shapes.SIZES:
                for position in shapes.POSITIONS:
                    obj = shapes.SceneObject(shape, colour, size, position)
                    for c in range(copies):
                        rng = random.Random(f"one-object:{shape}:{colour}:{size}:{position}:{c}")
                        scene = shapes.Scene((obj,), rng.choice(tuple(shapes.BACKGROUNDS)))
                        items.append((shapes.render(scene, rng, image_size), scene))
    captions = [shapes.plain_caption(s) for _, s in items]
    pixels = torch.from_numpy(np.stack([np.asarray(img) for img, _ in items]))
    scenes = [s for _, s in items]
    return Cache(pixels, tokenizer(captions), torch.tensor([scene_key(s) for s in scenes]), captions, scenes)


@torch.no_grad()
def one_object_separation(model: open_clip.CLIP, cache: Cache, device: torch.device) -> dict[str, float]:
    """Linear-probe-free checks on single-object scenes.

    zero_shot_*: each image against the captions of all 560 single-object scenes (exact and per attribute);
    nn_*: nearest other image by cosine of the pooled CLS feature: does it have the same attribute?
    """
    image_emb, text_emb, pooled = _encode(model, cache, device)
    objects = [s.objects[0] for s in cache.scenes]
    n_copies = len(objects) // len(set(objects))
    pred = (image_emb @ text_emb[::n_copies].T).argmax(1).cpu().tolist()  # classes: one caption per object
    classes = objects[::n_copies]
    pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
    sims = pooled @ pooled.T
    sims.fill_diagonal_(-2.0)
    nearest = sims.argmax(1).cpu().tolist()
    result = {"zero_shot_exact": float(np.mean([classes[p] == o for p, o in zip(pred, objects)])),
              "nn_exact": float(np.mean([objects[j] == o for j, o in zip(nearest, objects)]))}
    for field in ("shape", "colour", "size", "position"):
        result[f"zero_shot_{field}"] = float(np.mean([getattr(classes[p], field) == getattr(o, field)
                                                      for p, o in zip(pred, objects)]))
        result[f"nn_{field}"] = float(np.mean([getattr(objects[j], field) == getattr(o, field)
                                               for j, o in zip(nearest, objects)]))
    return result


# --- training -------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return default_device()
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def plot_curve(history: dict, path: Path) -> None:
    fig, (ax_loss, ax_r1) = plt.subplots(1, 2, figsize=(10, 3.8))
    plot_batches(ax_loss, history["step"], history["loss"])
    ax_loss.set(xlabel="step", ylabel="contrastive loss", title="training loss")
    ax_loss.legend()
    ax_r1.plot(history["val_step"], history["val_r1"], marker="o", label="R@1 (own image)")
    ax_r1.plot(history["val_step"], history["val_objects_r1"], marker="o", label="R@1 (same objects)")
    ax_r1.set(xlabel="step", ylabel="text->image", ylim=(0, 1), title="validation retrieval")
    ax_r1.legend()
    save_figure(fig, path)


def train(args: argparse.Namespace, model_cfg: dict = MODEL_CFG) -> dict:
    """Train, evaluate, save to args.out; returns the final figures."""
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    image_size = model_cfg["vision_cfg"]["image_size"]
    context_length = model_cfg["text_cfg"]["context_length"]
    workers = args.workers or os.cpu_count() or 1

    t0 = time.time()
    val_cache = render_cache("val", args.val_size, image_size, context_length, args.holdout, workers)
    train_cache = render_cache("train", args.train_size, image_size, context_length, args.holdout,
                               workers).to(device)
    print(f"rendered {args.train_size} train + {args.val_size} val scenes in {time.time() - t0:.1f}s")

    model = build_model(model_cfg).to(device)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    warmup = max(1, int(args.warmup * args.steps))
    history = {"step": [], "loss": [], "val_step": [], "val_r1": [], "val_objects_r1": []}
    order = torch.randperm(args.train_size, device=device)
    cursor, seen, t_start = 0, 0, time.time()

    bar = tqdm(range(args.steps), desc="train clip", unit="step", dynamic_ncols=True)
    for step in bar:
        if cursor + args.batch_size > len(order):
            order, cursor = torch.randperm(args.train_size, device=device), 0
        index = distinct(order[cursor:cursor + args.batch_size], train_cache.keys)
        cursor += args.batch_size
        schedule_step(optimizer, step, args.steps, warmup, args.lr)
        model.train()
        with autocast:
            image_emb, text_emb, scale = model(normalise(train_cache.pixels[index]), train_cache.tokens[index])
            loss = loss_fn(image_emb, text_emb, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        seen += len(index)
        history["step"].append(step)
        history["loss"].append(loss.item())
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", img_s=f"{seen / (time.time() - t_start):.0f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            val = retrieval(model, val_cache, device)
            history["val_step"].append(step + 1)
            history["val_r1"].append(val["r1"])
            history["val_objects_r1"].append(val["objects_r1"])
            bar.write(f"step {step + 1}: loss {loss.item():.3f}  val R@1 {val['r1']:.3f}  "
                      f"objects R@1 {val['objects_r1']:.3f}  R@5 {val['r5']:.3f}  "
                      f"({seen / (time.time() - t_start):.0f} img/s)")
    bar.close()
    train_seconds = time.time() - t0
    del train_cache

    out = Path(args.out)
    save(model, model_cfg, out)
    plot_curve(history, out / "training_curve.png")
    metrics = evaluate(out, device, args.holdout, args.test_size)
    metrics.update(steps=args.steps, batch_size=args.batch_size, lr=args.lr, train_size=args.train_size,
                   holdout=args.holdout, device=str(device), seconds=round(train_seconds, 1),
                   initial_loss=float(np.mean(history["loss"][:10])),
                   final_loss=float(np.mean(history["loss"][-20:])))
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


@torch.no_grad()
def evaluate(folder: Path, device: torch.device, holdout: bool = False, n_test: int = 1000) -> dict:
    """Figures of a saved model, loaded the way the app loads it."""
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}", device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    image_size = model.visual.image_size[0]
    context_length = tokenizer.context_length
    metrics = {f"test_{k}": v for k, v in
               retrieval(model, render_cache("test", n_test, image_size, context_length, holdout), device).items()}
    if holdout:
        held = render_cache("holdout", n_test, image_size, context_length)
        metrics.update({f"holdout_{k}": v for k, v in retrieval(model, held, device).items()})
    metrics.update({f"one_object_{k}": v for k, v in
                    one_object_separation(model, one_object_cache(tokenizer, image_size), device).items()})
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (open_clip local-dir format)")
    p.add_argument("--steps", type=int, default=5500)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--train-size", type=int, default=400_000, help="distinct train scenes rendered")
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--test-size", type=int, default=1000, help="test gallery of the final figures")
    p.add_argument("--holdout", action=argparse.BooleanOptionalAction, default=True,
                   help="keep shapes.HOLDOUT_PAIRS out of training (and report the holdout split)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--workers", type=int, default=0, help="render processes (0: all cores)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(train(parse_args(argv)), indent=2))


if __name__ == "__main__":
    main()
