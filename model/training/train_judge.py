"""ESPER's judge: a CLIP whose text tower has learnt that a word outside its captions' grammar names nothing.

The demo's CLIP (`train_clip`) read nothing but the shapes world's grammar, so a word it never read ("polygon",
"dog") keeps the random embedding it started with, and over an LM's open vocabulary some such word lands near any
image. Measured on the demo's CLIP (`open_vocabulary` below): in ESPER's slot "The shape is a ...", a one-object
scene's own shape word scores above every other shape word and 500 other words for 35% of the scenes; in "I see
a bright ...", its colour for 44%. ESPER can learn no more than its judge prefers: its shape slot had reached 32%.

So this fine-tunes the text tower, on the training scenes, with texts of two kinds: the captions (random words
inserted in half of them: what matters is whether the image's words are there, not what else the text says),
and partial texts, some of one object's attributes in a frame of random words ("seldom this is a red star"),
each with hard negatives where an outside word stands in for its shape, colour or size ("... a red polygon":
NegCLIP's hard negatives, Yuksekgonul et al. 2023, with words from the tokenizer's vocabulary). The loss is
CLIP's, with the targets spread over every text that names something in the image (a partial text names every
image holding such an object; a negative names none), plus a ranking (`--fuller`): a partial text scores above
the same text with one of its attributes left out, for its image. Without it the spread targets made a text
naming the colour alone as right as one naming colour and shape, and ESPER's descriptions need the second to win
(`fuller_first`: 43% of one-object scenes without the ranking, 87.5% with it). A second ranking (`--order`) puts
the same text above its words in another order, the shape first and the rest after it ("a star of red", "a star
small red"): CLIP reads a bag of words (NegCLIP's word-order negatives again), and ESPER's descriptions had found
that "a cross of purple" scores as "a purple cross" (`in_order_first`). A third (`--absent`) puts the same text
above it with a thing the scene does not hold added ("a red star with a cross"): a description that names a second
thing where there is one should lose, and the judge before it let it win for 18% of one-object scenes
(`alone_first`; 0% after). A fourth (`--stand-in`) puts the same text above it with the background's word standing
in for one of its attributes at any place ("a red star" above "a dark red" on dark grey): the background is named
in the captions, so "dark" names something there, and ESPER's descriptions had found "The image is a dark
purple." for a purple hexagon on dark grey, which the judge made with `--absent` ranked above "... a purple
hexagon." for 20 of 37 such scenes (`object_first`). And `--described` frames a share of the partial texts as
a description begins, as sentences ("The image is a red star."): the judge had read only frames of random words,
and in ESPER's own it took half the large hexagons for circles (`shape_first`). A fifth (`--stacked`) puts the
same text above it with a shape the scene does not hold beside its shape ("a red square star", "a red star
square"): such a text names neither one object nor two. ESPER's descriptions under the judge made with
`--described` had found "The image is a small yellow square star.", and that judge ranked "The image is a <colour>
<shape>." above every such text for 32% of one-object scenes, the one before it for 43% (`single_shape_first`).
`--described` also cost `--fuller` its reading in sentences, which `fuller_first` (without the full stop) does not
show: "The image is a <colour> <shape>." above both "... <colour>." and "... <shape>." for 99% of one-object
scenes under the judge made without it, 82% with it and `--stacked` (`fuller_sentence_first`), and ESPER's
descriptions learnt to stop at the colour ("The image is a black."); the same with `--fuller 3`: 93%.
The image tower stays frozen (its embeddings are computed once), so the image side of the demo's CLIP is
untouched:

    python -m model.training.train_judge --clip assets/demo/clip --out runs/judge
    python -m model.training.esper --judge local-dir:runs/judge ...

The judge is trained on captions, as ESPER's CLIP was; the policy ESPER trains with it still reads none.
Words are split in two by a hash: frames and negatives draw from one part, the evaluation from the other, so the
figures (`open_vocabulary`) are on words the judge never saw.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import open_clip
import torch
from tqdm import tqdm

from model.training.evaluate import SLOTS
from model.training.optimization import param_groups, schedule_step
from model.training.plots import plot_batches, plt, save_figure
from model.training.train_clip import (CONFIG_NAME, distinct, normalise, one_object_cache, one_object_separation,
                                       render_cache, resolve_device, save, tokenizer_for)
from model.world import shapes

TEXT_TOWER = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def outside_words(tokenizer, grammar: set[str]) -> tuple[list[str], list[str]]:
    """The tokenizer's whole words (alphabetic, 3+ letters) outside the captions' grammar, split by a hash into
    the negatives' words and the evaluation's (one in ten)."""
    words = sorted(w[:-len("</w>")] for w in tokenizer.encoder if w.endswith("</w>"))
    words = [w for w in words if w.isalpha() and len(w) >= 3 and w not in grammar]
    held = [w for w in words if zlib.crc32(w.encode()) % 10 == 0]
    return [w for w in words if zlib.crc32(w.encode()) % 10 != 0], held


FRAME_WORDS = ("the", "is", "a", "it", "this", "of", "with", "and", "in", "i", "see")
"""Words a partial text's frame may hold besides outside words (ESPER's openings are made of such)."""
DESCRIPTION_FRAMES = ("The image is", "The image shows", "The image of", "I see", "There is", "A picture of",
                      "The shape is")
"""How a description may begin before its "a" (ESPER's openings, `esper.OPENINGS` and the README's stage's): the
frames the judge scores ESPER's replies in."""
PARTS = (("shape",), ("colour",), ("colour", "shape"), ("size", "colour", "shape"), ("shape", "position"),
         ("colour", "shape", "position"), ("size", "colour", "shape", "position"))
"""Which of an object's attributes a partial text names."""


def insert_words(caption: str, words: list[str], rng: random.Random) -> str:
    """The caption with `words` inserted at random places: still the same image's text."""
    tokens = caption.split(" ")
    for word in words:
        tokens.insert(rng.randrange(len(tokens) + 1), word)
    return " ".join(tokens)


ORDER_JOINERS = ("", "of", "with", "in")
"""What may join a shape put first to the words that belong before it ("a star of red", "a star red")."""
ADDED_JOINERS = ("with a", "and a", "beside a")
"""What may join a thing added after a text ("a red star with a cross")."""


def absent_shape(scene: shapes.Scene, rng: random.Random) -> str:
    """A shape none of `scene`'s objects has."""
    return rng.choice([s for s in shapes.SHAPES if all(o.shape != s for o in scene.objects)])


def absent_thing(scene: shapes.Scene, rng: random.Random) -> str:
    """A thing `scene` does not hold, as a description adds it: a shape none of its objects has, a colour half the
    time ("with a cross", "and a blue circle")."""
    shape = absent_shape(scene, rng)
    colour = [rng.choice(tuple(shapes.COLOURS))] if rng.random() < 0.5 else []
    return " ".join([rng.choice(ADDED_JOINERS), *colour, shape])


class PartialText(NamedTuple):
    text: str
    named: dict[str, str] | None
    """The attributes it names; None for a negative, which names nothing."""
    fewer: str | None
    """The same text with one named attribute left out: it should score below `text`."""
    reordered: str | None
    """The same words with the shape first and its size and colour after it: it should score below `text`."""
    added: str | None
    """The same text with a thing its scene does not hold added after it: it should score below `text`."""
    stood_in: str | None
    """The same text with a word naming something else in the image standing in for one named attribute ("a dark
    red" for "a red star" on dark grey), at any place among the rest: it should score below `text`."""
    stacked: str | None
    """The same text with a shape its scene does not hold just before or after its shape ("a red square star"): it
    should score below `text`."""


def partial_text(obj: shapes.SceneObject, outside: list[str], rng: random.Random, swap: bool,
                 absent: str | None = None, stand_in: str | None = None, described: bool = False,
                 stacked: str | None = None) -> PartialText:
    """Some of one object's attributes in a frame of random words ("seldom this is a red star on the left"), what
    it names (those attributes, or None when `swap` put an outside word in place of its shape, colour or size: it
    then names nothing), the same text with one of the named attributes left out ("seldom this is a star on the
    left"; None for a negative or a text naming one attribute), the same words in another order ("seldom this
    is a star of red on the left"; None for a negative or a text without the shape and a word before it), and the
    same text with `absent`, a thing the object's scene does not hold, added ("... on the left with a cross"; None
    for a negative or without `absent`), and the text that left one out with `stand_in`, a word naming something
    else in the image, among the rest ("seldom this is a dark star on the left"; None for a negative, a text naming
    one attribute, or without `stand_in`), and the text with `stacked`, another shape, just before or after its shape
    ("seldom this is a red cross star on the left"; None for a negative, a text without the shape, or without
    `stacked`). With `described`, the frame is how a description begins and every text is a sentence ("The image
    is a red star on the left.")."""
    fields = rng.choice(PARTS)
    said = {"size": rng.choice(shapes.SIZE_WORDS[obj.size]), "colour": obj.colour, "shape": obj.shape,
            "position": rng.choice(shapes.POSITION_PHRASES[obj.position])}
    words = [said[f] for f in fields]
    if swap:
        words[rng.randrange(len(words) - ("position" in fields))] = rng.choice(outside)
    frame = (rng.choice(DESCRIPTION_FRAMES).split(" ") if described else
             [rng.choice(outside) if rng.random() < 0.5 else rng.choice(FRAME_WORDS) for _ in range(rng.randint(0, 3))])
    end = "." if described else ""
    left_out = rng.randrange(len(words))
    rest = words[:left_out] + words[left_out + 1:]
    fewer = stood_in = None
    if not swap and rest:
        fewer = " ".join(frame + ["a", *rest]) + end
        if stand_in is not None:
            place = rng.randrange(len(rest) + 1)
            stood_in = " ".join(frame + ["a", *rest[:place], stand_in, *rest[place:]]) + end
    before_shape = [said[f] for f in fields if f in ("size", "colour")]
    reordered = None
    if not swap and "shape" in fields and before_shape:
        joiner = [j for j in [rng.choice(ORDER_JOINERS)] if j]
        after = [said["position"]] if "position" in fields else []
        reordered = " ".join(frame + ["a", obj.shape, *joiner, *before_shape, *after]) + end
    stacked_text = None
    if not swap and "shape" in fields and stacked is not None:
        place = fields.index("shape") + rng.randrange(2)
        stacked_text = " ".join(frame + ["a", *words[:place], stacked, *words[place:]]) + end
    text = " ".join(frame + ["a", *words])
    return PartialText(text + end, None if swap else {f: getattr(obj, f) for f in fields}, fewer, reordered,
                       None if swap or absent is None else f"{text} {absent}{end}", stood_in, stacked_text)


def names_object(scene: shapes.Scene, named: dict[str, str] | None) -> bool:
    return named is not None and any(all(getattr(o, f) == v for f, v in named.items()) for o in scene.objects)


@torch.no_grad()
def image_embeddings(model: open_clip.CLIP, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> (N, embed_dim), L2-normalised, 256 at a time."""
    return torch.cat([model.encode_image(normalise(pixels[a:a + 256].to(device)), normalize=True)
                      for a in range(0, len(pixels), 256)])


@torch.no_grad()
def open_vocabulary(model: open_clip.CLIP, tokenizer, words: list[str], device: torch.device,
                    scenes: list[shapes.Scene], images: torch.Tensor) -> dict[str, float]:
    """For each of ESPER's slot openings (SLOTS), the share of one-object `scenes` (their image embeddings (N, D))
    whose own word after it scores above every other word of its kind and every one of `words` ("The shape is a
    star" against "... a square", "... a polygon")."""
    result = {}
    for field, opening, own in SLOTS:
        texts = [f"{opening} {w}" for w in (*own, *words)]
        text = torch.cat([model.encode_text(tokenizer(texts[a:a + 1024]).to(device), normalize=True)
                          for a in range(0, len(texts), 1024)])
        best = (images @ text.T).argmax(1).tolist()
        result[field] = sum(b < len(own) and own[b] == getattr(s.objects[0], field)
                            for b, s in zip(best, scenes)) / len(scenes)
    return result


@torch.no_grad()
def preferred(model: open_clip.CLIP, tokenizer, device: torch.device, scenes: list[shapes.Scene],
              images: torch.Tensor, best: str, *others: str) -> float:
    """The share of one-object `scenes` (their image embeddings (N, D)) for which "The image is a " + `best`
    scores above "The image is a " + each of `others`, each a format of the object's attributes ("{colour}
    {shape}"), of `{others}`, the shapes it does not have (`{others[0]}`: the next in `shapes.SHAPES`, and on), and
    of `{background}`, the word that names the scene's background alone ("dark" for dark grey)."""
    objects = [scene.objects[0] for scene in scenes]

    def scores(said: str) -> torch.Tensor:                                                  # (N,)
        texts = ["The image is a " + said.format(colour=o.colour, shape=o.shape, others=other_shapes(o.shape),
                                                 background=background_word(scene))
                 for scene, o in zip(scenes, objects)]
        return (images * model.encode_text(tokenizer(texts).to(device), normalize=True)).sum(-1)
    top = scores(best)
    return torch.stack([top > scores(other) for other in others]).all(0).float().mean().item()


def fuller_first(model: open_clip.CLIP, tokenizer, device: torch.device, scenes: list[shapes.Scene],
                 images: torch.Tensor) -> float:
    """Whether naming both is worth more than naming either, which ESPER's descriptions need: "The image is a
    <colour> <shape>" above both "... <colour>" and "... <shape>" (the demo's CLIP: 90% of scenes; the first judge,
    trained without the ranking: 43%)."""
    return preferred(model, tokenizer, device, scenes, images, "{colour} {shape}", "{colour}", "{shape}")


def fuller_sentence_first(model: open_clip.CLIP, tokenizer, device: torch.device, scenes: list[shapes.Scene],
                          images: torch.Tensor) -> float:
    """`fuller_first` as ESPER's descriptions end, with the full stop: "The image is a <colour> <shape>." above
    both "... <colour>." and "... <shape>." (the judges made with `--described` ranked it lower than without the
    stop, and the policy learnt "The image is a black.")."""
    return preferred(model, tokenizer, device, scenes, images, "{colour} {shape}.", "{colour}.", "{shape}.")


def in_order_first(model: open_clip.CLIP, tokenizer, device: torch.device, scenes: list[shapes.Scene],
                   images: torch.Tensor) -> float:
    """Whether the words' order counts: "The image is a <colour> <shape>" above "... <shape> of <colour>", the
    order ESPER's descriptions drifted to when the judge could not tell them apart."""
    return preferred(model, tokenizer, device, scenes, images, "{colour} {shape}", "{shape} of {colour}")


def alone_first(model: open_clip.CLIP, tokenizer, device: torch.device, scenes: list[shapes.Scene],
                images: torch.Tensor) -> float:
    """Whether naming a thing that is not there costs: "The image is a <colour> <shape>." above both "... with a
    <other shape>." and "... with a <other shape> on it.", the second things ESPER's descriptions of one object
    add (as sentences: without the full stop, the judge before `--absent` ranked the first right for 99%)."""
    return preferred(model, tokenizer, device, scenes, images, "{colour} {shape}.", "{colour} {shape} with a {others[0]}.",
                     "{colour} {shape} with a {others[0]} on it.")


def object_first(model: open_clip.CLIP, tokenizer, device: torch.device, scenes: list[shapes.Scene],
                 images: torch.Tensor) -> float:
    """Whether the background's word cannot stand in for the object's shape or colour: "The image is a <colour>
    <shape>." above "... a <background> <colour>." and "... a <background> <shape>." (ESPER's descriptions had
    found "The image is a dark purple." for a purple hexagon on dark grey)."""
    return preferred(model, tokenizer, device, scenes, images, "{colour} {shape}.", "{background} {colour}.",
                     "{background} {shape}.")


def shape_first(model: open_clip.CLIP, tokenizer, device: torch.device, scenes: list[shapes.Scene],
                images: torch.Tensor) -> float:
    """Whether the judge reads the shape in ESPER's frame: "The image is a <colour> <shape>." above the same with
    each other shape. The judges' limit: the one made with `--stand-in` ranks a circle's own text first for 72% of
    circles and a hexagon's for 71%, each mostly taken for the other (docs/esper.md)."""
    return preferred(model, tokenizer, device, scenes, images, "{colour} {shape}.",
                     *(f"{{colour}} {{others[{k}]}}." for k in range(len(shapes.SHAPES) - 1)))


def single_shape_first(model: open_clip.CLIP, tokenizer, device: torch.device, scenes: list[shapes.Scene],
                       images: torch.Tensor) -> float:
    """Whether two shape words side by side cost: "The image is a <colour> <shape>." above the same with each other
    shape just before and just after its shape ("... a yellow square star.", "... a yellow star square."), which
    ESPER's descriptions found under a judge that let them win."""
    others = range(len(shapes.SHAPES) - 1)
    return preferred(model, tokenizer, device, scenes, images, "{colour} {shape}.",
                     *(f"{{colour}} {{others[{k}]}} {{shape}}." for k in others),
                     *(f"{{colour}} {{shape}} {{others[{k}]}}." for k in others))


FIGURES = (("fuller", fuller_first), ("fuller", fuller_sentence_first), ("order", in_order_first),
           ("absent", alone_first), ("stand_in", object_first), ("described", shape_first),
           ("stacked", single_shape_first))
"""Each option that trains a judge for a reading and the figure of that reading, measured before and after."""


def figures(model: open_clip.CLIP, tokenizer, device: torch.device, scenes: list[shapes.Scene],
            images: torch.Tensor) -> dict[str, float]:
    """Every figure of FIGURES, by its name ("fuller_first": ...)."""
    return {figure.__name__: figure(model, tokenizer, device, scenes, images) for _, figure in FIGURES}


def background_word(scene: shapes.Scene) -> str:
    """The word that names the scene's background alone: the first ("dark" of dark grey, "light" of light blue,
    whose "blue" is a colour too)."""
    return scene.background.split(" ")[0]


def other_shapes(shape: str) -> list[str]:
    """The shapes after `shape` in `shapes.SHAPES`, round to the one before it."""
    i = shapes.SHAPES.index(shape)
    return [shapes.SHAPES[(i + k) % len(shapes.SHAPES)] for k in range(1, len(shapes.SHAPES))]


def plot_curve(history: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    plot_batches(ax, history["step"], history["loss"])
    ax.set(xlabel="step", ylabel="contrastive loss with hard negatives", title="the judge's text tower")
    ax.legend()
    save_figure(fig, path)


def train(args: argparse.Namespace) -> dict:
    """Fine-tune the text tower of --clip, save the judge to --out with its figures before and after; returns
    them. 18 minutes on a 2-core CPU at the defaults, most of it the steps (1.7 s each)."""
    device = resolve_device(args.device)
    rng, t0 = random.Random(args.seed), time.time()
    torch.manual_seed(args.seed)
    model, _ = open_clip.create_model_from_pretrained(f"local-dir:{args.clip}", device=device)
    model_cfg = json.loads((Path(args.clip) / CONFIG_NAME).read_text())["model_cfg"]
    image_size, context_length = model.visual.image_size[0], model.context_length
    tokenizer = tokenizer_for(context_length)
    train_cache = render_cache("train", args.train_size, image_size, context_length, holdout=True,
                               workers=args.workers)
    grammar = {w for c in train_cache.captions for w in re.findall(r"[a-z]+", c.lower())}
    outside, held_words = outside_words(tokenizer, grammar)
    eval_words = random.Random(0).sample(held_words, min(args.eval_words, len(held_words)))
    model.eval()
    # the frozen image tower: every image is embedded once, the same before training and after
    one = one_object_cache(tokenizer, image_size, copies=1)
    one_scenes, one_images = one.scenes, image_embeddings(model, one.pixels, device)
    before = open_vocabulary(model, tokenizer, eval_words, device, one_scenes, one_images)
    figures_before = figures(model, tokenizer, device, one_scenes, one_images)
    images = image_embeddings(model, train_cache.pixels, device)
    print(f"judge: {args.train_size} scenes rendered and embedded in {time.time() - t0:.0f}s; "
          f"{len(outside)} outside words for frames and negatives, {len(eval_words)} others to evaluate on; "
          f"before: {before}, " + ", ".join(f"{name.replace('_', ' ')} {value:.3f}"
                                            for name, value in figures_before.items()), flush=True)

    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(TEXT_TOWER))
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    history: dict[str, list] = {"step": [], "loss": []}
    scale = model.logit_scale.exp().detach()
    bar = tqdm(range(args.steps), desc="judge", unit="step", dynamic_ncols=True)
    for step in bar:
        schedule_step(optimizer, step, args.steps, max(1, args.steps // 20), args.lr)
        index = distinct(torch.randint(args.train_size, (args.batch_size,)), train_cache.keys)
        scenes = [train_cache.scenes[i] for i in index.tolist()]
        texts = [insert_words(train_cache.captions[i], rng.sample(outside, rng.randint(1, 2)), rng)
                 if rng.random() < args.insert else train_cache.captions[i] for i in index.tolist()]
        named = []
        below: dict[str, tuple[list[tuple[int, int]], list[str]]] = {"fewer": ([], []), "reordered": ([], []),
                                                                     "added": ([], []), "stood_in": ([], []),
                                                                     "stacked": ([], [])}
        for row, scene in enumerate(scenes):  # below: for each ranking, (image's row, index in texts) and the text
            for swap in [False] + [True] * args.negatives:  # that should score below that text for that image
                obj = rng.choice(scene.objects)
                # the absent thing, the stand-in's place, the description's frame and the stacked shape are drawn
                # only where used, so the judges before them are made draw for draw
                partial = partial_text(obj, outside, rng, swap, absent_thing(scene, rng) if args.absent else None,
                                       background_word(scene) if args.stand_in else None,
                                       bool(args.described) and rng.random() < args.described,
                                       absent_shape(scene, rng) if args.stacked else None)
                for kind, (ranked, lesser) in below.items():
                    if getattr(partial, kind) is not None:
                        ranked.append((row, len(texts)))
                        lesser.append(getattr(partial, kind))
                texts.append(partial.text)
                named.append(partial.named)
        # a whole caption names its own scene alone (the batch's object sets are distinct); a partial text, every
        # scene holding such an object                                                       (B, B + B * (1 + M))
        match = torch.cat([torch.eye(len(scenes)), torch.tensor([[names_object(scene, n) for n in named]
                                                                 for scene in scenes], dtype=torch.float)], 1).to(device)
        model.train()
        text = model.encode_text(tokenizer(texts).to(device), normalize=True)                  # (T, D)
        logits = scale * images[index.to(device)] @ text.T                                     # (B, T)
        named_any = match.sum(0) > 0
        # each image against every text, each naming text against every image; the targets spread evenly over
        # what matches (a partial text names every image holding such an object); a negative names none
        loss = (-(match / match.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
                - (match[:, named_any] / match[:, named_any].sum(0) * logits[:, named_any].log_softmax(0)).sum(0).mean()
                ) / 2
        # a text naming one more of its object's attributes ranks above the text without it, its words in their
        # order above the shape first, it alone above it with an absent thing added, above it with the
        # background's word standing in for an attribute, and above it with another shape beside its shape, for
        # that image (logistic, at CLIP's scale)
        for (ranked, lesser), weight in ((below["fewer"], args.fuller), (below["reordered"], args.order),
                                         (below["added"], args.absent), (below["stood_in"], args.stand_in),
                                         (below["stacked"], args.stacked)):
            if ranked and weight:
                rows, columns = map(list, zip(*ranked))
                lesser_text = model.encode_text(tokenizer(lesser).to(device), normalize=True)  # (F, D)
                gap = logits[rows, columns] - scale * (images[index.to(device)[rows]] * lesser_text).sum(-1)
                loss = loss + weight * torch.nn.functional.softplus(-gap).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history["step"].append(step)
        history["loss"].append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()

    out = Path(args.out)
    save(model, model_cfg, out)
    plot_curve(history, out / "training_curve.png")
    model.eval()
    metrics = {"clip": str(args.clip), "steps": args.steps, "batch_size": args.batch_size, "negatives": args.negatives,
               "seconds": round(time.time() - t0, 1), "eval_words": len(eval_words),
               "open_vocabulary_before": before,
               "open_vocabulary": open_vocabulary(model, tokenizer, eval_words, device, one_scenes, one_images),
               "one_object": one_object_separation(model, one_object_cache(tokenizer, image_size), device)}
    figures_after = figures(model, tokenizer, device, one_scenes, one_images)
    for option, figure in FIGURES:  # each option's weight beside its figure, before and after
        name = figure.__name__
        metrics.update({option: getattr(args, option), f"{name}_before": figures_before[name],
                        name: figures_after[name]})
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clip", required=True, help="the CLIP to start from (an open_clip local-dir folder)")
    p.add_argument("--out", required=True, help="where the judge goes (open_clip local-dir format)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--negatives", type=int, default=3, help="hard negatives per partial text")
    p.add_argument("--fuller", type=float, default=1.0, help="weight of the ranking of a text above the same text "
                   "naming one attribute fewer (0: off, the first judge's recipe)")
    p.add_argument("--order", type=float, default=0.0, help="weight of the ranking of a text above its words with "
                   "the shape first (\"a star of red\"; 0: off, the judges before it)")
    p.add_argument("--absent", type=float, default=0.0, help="weight of the ranking of a text above it with a thing "
                   "its scene does not hold added (\"a red star with a cross\"; 0: off, the judges before it)")
    p.add_argument("--stand-in", type=float, default=0.0, help="weight of the ranking of a text above it with the "
                   "background's word standing in for one of its attributes, at any place (\"a red star\" above "
                   "\"a dark red\" on dark grey; 0: off, the judges before it)")
    p.add_argument("--described", type=float, default=0.0, help="share of partial texts framed as a description "
                   "begins, as sentences (\"The image is a red star.\"; 0: none, the judges before it)")
    p.add_argument("--stacked", type=float, default=0.0, help="weight of the ranking of a text above it with a shape "
                   "its scene does not hold beside its shape (\"a red square star\"; 0: off, the judges before it)")
    p.add_argument("--insert", type=float, default=0.5, help="share of positives with random words inserted")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--train-size", type=int, default=20_000, help="train scenes rendered")
    p.add_argument("--eval-words", type=int, default=500, help="held-out words the open-vocabulary test tries")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--workers", type=int, default=2, help="render processes")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(train(parse_args(argv)), indent=2))


if __name__ == "__main__":
    main()
