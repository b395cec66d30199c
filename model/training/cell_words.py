"""Region tokens that read as words: an auxiliary loss for a model with several tokens per region cell.

One token per cell (the demo before cell words) reached the frozen LM as a near-identical "object here" vector, and
the LM took what it said from the pooled CLS feature, so objects swapped colours and shapes (README, "Why several
objects failed").
A single token pulled towards four words at once was no word to it either. Here a cell has one token per word of
its object, in the order a description says them (size, colour, shape, place), and each is pulled towards that
word's row of the LM's own embedding table; a cell with no object says "empty" four times. The targets come from
the shapes world's scenes, which know which object lies in which cell; the tokens that reach the LM stay
continuous, so where the encoder is unsure a token is a blend of the words it might be, as the loss's optimum is.
"""
from __future__ import annotations

import random

import torch

from model.grounded import GroundedLM
from model.world import shapes

SLOTS = ("size", "colour", "shape", "position")
"""What each of a cell's tokens says, in the order the demo's descriptions say it."""
EMPTY = "empty"


def word_row(model: GroundedLM, word: str) -> torch.Tensor:
    """The LM's input embedding of a word as it reads after a space (lm_dim,): the mean of its tokens' rows."""
    table = model.lm.get_input_embeddings().weight
    ids = model.tokenizer.encode(" " + word, add_special_tokens=False)
    return table[ids].float().mean(0)


def cell_of(position: str, grid: int) -> int:
    """The cell (row by row from the top left) that holds an object at `position`."""
    x, y = shapes.centre_of(position)
    return min(int(y * grid), grid - 1) * grid + min(int(x * grid), grid - 1)


def cell_word_targets(model: GroundedLM, scenes: list[shapes.Scene]) -> torch.Tensor:
    """Scenes -> the word rows each cell's tokens should be (N, grid^2, len(SLOTS), lm_dim)."""
    grid = model.config.region_grid
    empty = word_row(model, EMPTY)
    targets = empty.expand(len(scenes), grid * grid, len(SLOTS), -1).clone()
    for n, scene in enumerate(scenes):
        for obj in scene.objects:
            targets[n, cell_of(obj.position, grid)] = torch.stack([word_row(model, getattr(obj, slot))
                                                                   for slot in SLOTS])
    return targets


def cell_word_loss(model: GroundedLM, step: int, n: int, holdout: bool, seed: int) -> torch.Tensor:
    """Mean squared distance between the region tokens of n training scenes (drawn from `step`) and their words,
    in units of the table's mean squared row norm."""
    if model.config.tokens_per_cell != len(SLOTS) or not model.config.region_grid:
        raise ValueError(f"cell words need {len(SLOTS)} tokens per region cell ({', '.join(SLOTS)}), "
                         f"the model has {model.config.tokens_per_cell} on a grid of {model.config.region_grid}")
    rng = random.Random(f"cell-words:{seed}:{step}")
    samples = [shapes.sample("train", rng.randrange(1_000_000), model.visual.image_size[0], holdout)
               for _ in range(n)]
    features = model.visual_features([s.image for s in samples])
    grid_cells = model.config.region_grid ** 2
    tokens = model.visual_tokens(features)[:, -grid_cells * len(SLOTS):].float()      # (n, grid^2 * slots, lm_dim)
    targets = cell_word_targets(model, [s.scene for s in samples]).flatten(1, 2)
    scale = model.lm.get_input_embeddings().weight.float().pow(2).sum(-1).mean()
    return (tokens - targets).pow(2).sum(-1).mean() / scale


WORDS = {"size": shapes.SIZES, "colour": tuple(shapes.COLOURS), "shape": shapes.SHAPES, "position": shapes.POSITIONS}
"""Each slot's words, among which `nearest_words` chooses."""


@torch.no_grad()
def nearest_words(model: GroundedLM, split: str = "val", n: int = 100, holdout: bool = True) -> dict[str, float]:
    """How often an occupied cell's token of each slot lies nearest its object's word among that slot's words, on
    n scenes of `split`."""
    rows = {slot: torch.stack([word_row(model, w) for w in words]) for slot, words in WORDS.items()}
    grid, hits, objects = model.config.region_grid, dict.fromkeys(SLOTS, 0), 0
    samples = [shapes.sample(split, i, model.visual.image_size[0], holdout) for i in range(n)]
    tokens = model.visual_tokens(model.visual_features([s.image for s in samples]))[:, -grid * grid * len(SLOTS):]
    tokens = tokens.float().unflatten(1, (grid * grid, len(SLOTS)))                    # (n, grid^2, slots, lm_dim)
    for sample, cells in zip(samples, tokens):
        for obj in sample.scene.objects:
            cell = cells[cell_of(obj.position, grid)]
            for j, slot in enumerate(SLOTS):
                nearest = int((rows[slot] - cell[j]).pow(2).sum(-1).argmin())
                hits[slot] += WORDS[slot][nearest] == getattr(obj, slot)
            objects += 1
    return {slot: hits[slot] / objects for slot in SLOTS}
