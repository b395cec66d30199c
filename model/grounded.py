"""The grounded LM: a frozen causal LM and a frozen CLIP visual encoder joined by small trained layers.

    image --CLIP--> pooled (visual_dim) --input_mapping--> n_visual_tokens x lm_dim   (spliced into the LM input)
          --CLIP--> patches pooled to region_grid^2 cells --region_mapping--> tokens_per_cell lm_dim tokens per cell (after them)
    (input and region mappings: a Linear, or an MLP when the config's projector is `mlp`)
    image --CLIP--> pooled (visual_dim) --image_mapping--> emb_dim, L2-normalised       (what the index stores)
    [RET] hidden state (lm_dim)          --ret_mapping---> emb_dim, L2-normalised       (the retrieval query)
    request hidden states + image ---------perception----> request_tokens x lm_dim     (LMEye, when configured)

`[RET]` gets its own trainable input row (and, when the LM's head is untied, its own output row);
the LM's embedding table and every other frozen weight stay bit-for-bit as loaded.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig
from PIL import Image
from torch import nn
from transformers import DynamicCache

from model.checkpoint import read_checkpoint, resolve, write_checkpoint
from model.config import GroundedConfig
from model.familiarity import Familiarity
from model.image_embedder import fingerprint, image_keys, image_vectors
from model.images import image_key
from model.lm import dequantized, load_lm
from model.perception import QUESTION_POSITIONS, Perception
from model.prefix_cache import PrefixCache
from model.reasoner import FOLDER as REASONER_FOLDER, add_reasoner, load_reasoner, reasoning, save_reasoner
from model.prompt import (Look, Segment, Turn, count_tokens, images_in, render, render_with_target,
                          retrieval_request)
from model.ret_context import RetContext, padded_earlier
from model.visual import VisualEncoder

FEATURE_CACHE_BYTES = 256 * 2 ** 20
"""Encoded images kept by pixel hash: ~5,000 of the demo encoder's, ~250 of ViT-L/14's."""
PREFIX_CACHE_BYTES = 256 * 2 ** 20
"""Prompts' keys and values kept for their conversations' next turns: ~5,800 prompt tokens of SmolLM2 in fp32 (a
one-image demo prompt is 86)."""


def question_positions(segments: list[Segment]) -> int:
    """How many of pass 1's last positions make a request: the last token run of `segments` (a prompt before its
    first `Look`), which is the question (`render` splits the runs where the text of a turn that looks starts, so a
    text-only follow-up's request holds its own words, not the turns before it; after an image, the text after
    it), and the request row, at most QUESTION_POSITIONS."""
    last = segments[-1] if segments else None
    return min(QUESTION_POSITIONS, 1 + (len(last) if isinstance(last, list) else 0))


def left_padded(rows: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Requests of different lengths (n_i, lm_dim), each its last `length` positions at most -> (B, length, lm_dim)
    with the request row last in every row, and the mask of real positions (B, length)."""
    out = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    mask = torch.zeros(len(rows), length, dtype=torch.bool, device=rows[0].device)
    for i, row in enumerate(rows):
        n = min(length, len(row))
        out[i, length - n:], mask[i, length - n:] = row[len(row) - n:], True
    return out, mask


@dataclass
class Example:
    """One training conversation: the last turn is the assistant's target.

    `ret_images` pairs each `[RET]` in the target, in order, with the image it should retrieve.
    """
    turns: list[Turn]
    ret_images: list[Image.Image] = field(default_factory=list)


@dataclass(frozen=True)
class Looked:
    """Where a request looked: `attention` (grid_h, grid_w) over `image`'s patches, summing to 1."""
    image: Image.Image
    attention: torch.Tensor


@dataclass(frozen=True)
class TrainingRow:
    """One conversation as `forward` runs it: the context (C, lm_dim) read without gradient, or None; the rest
    (R, lm_dim) with its labels (R,), -100 where nothing is predicted; the images its request tokens look at, and
    its `question_positions` (0 when it does not look)."""
    context: torch.Tensor | None
    rest: torch.Tensor
    labels: torch.Tensor
    looked: list[Image.Image]
    asked: int


@dataclass
class LossOutput:
    loss: torch.Tensor
    caption_loss: torch.Tensor
    ret_loss: torch.Tensor
    ret_accuracy: float
    """Share of [RET] vectors whose nearest image in the batch is their own (a cheap training signal)."""


def projector(kind: str, in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """CLIP features -> LM input tokens: one Linear (FROMAGe), or Linear-GELU-Linear (LLaVA-1.5's MLP)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


class GroundedLM(nn.Module):
    def __init__(self, config: GroundedConfig, quantize: str | None = None, device: torch.device | str | None = None,
                 compute_dtype: str | None = None):
        """`quantize` and `compute_dtype` default to the config's: a checkpoint loads as it was trained."""
        super().__init__()
        self.config = config
        quantize = quantize or config.quantize or "4bit"
        self.lm, self.tokenizer = load_lm(config.lm, quantize, device, config.ret_token,
                                          compute_dtype or config.compute_dtype)
        config.quantize, config.compute_dtype = quantize, str(self.lm.dtype).removeprefix("torch.")
        embeddings = self.lm.get_input_embeddings()
        self.device = embeddings.weight.device
        self.visual = VisualEncoder.from_source(config.visual, config.visual_pretrained, self.device)
        lm_dim, visual_dim = embeddings.embedding_dim, self.visual.visual_dim
        for name, expected, actual, source in (("lm_dim", config.lm_dim, lm_dim, config.lm),
                                               ("visual_dim", config.visual_dim, visual_dim, self.visual.source)):
            if expected is not None and expected != actual:
                raise ValueError(f"checkpoint expects {name}={expected} but {source} has {actual}: "
                                 f"the checkpoint was trained with a different model than its config names")
        config.lm_dim, config.visual_dim = lm_dim, visual_dim
        if config.region_grid > min(self.visual.grid_size):
            raise ValueError(f"region_grid={config.region_grid} is finer than the {self.visual.grid_size[0]}x"
                             f"{self.visual.grid_size[1]} patches of {self.visual.source}")

        self.ret_id: int = self.tokenizer.convert_tokens_to_ids(config.ret_token)
        configured = self.lm.generation_config.eos_token_id
        self.eos_ids: frozenset[int] = frozenset({self.tokenizer.eos_token_id,
                                                  *(configured if isinstance(configured, list) else [configured])})
        """Tokens that end a reply: the tokenizer's EOS and the LM's generation config's."""
        self.vocab_size: int = self.lm.get_output_embeddings().out_features
        self.tied = self.lm.get_output_embeddings().weight is embeddings.weight
        n = config.n_visual_tokens
        self.input_mapping = projector(config.projector, visual_dim, lm_dim, n * lm_dim)  # (B, visual_dim) -> (B, n * lm_dim)
        k = config.tokens_per_cell
        read = config.cell_patches ** 2 * visual_dim  # a cell's pooled patches side by side
        self.region_mapping = (projector(config.projector, read, lm_dim, k * lm_dim)  # per cell, shared
                               if config.region_grid else None)
        # With several tokens per cell, a learnt vector per cell and token says where the cell is, which the
        # shared mapping cannot.
        self.region_positions = (nn.Parameter(torch.zeros(config.region_grid ** 2, k, lm_dim))
                                 if config.region_grid and k > 1 else None)
        self.ret_mapping = nn.Linear(lm_dim, config.emb_dim)
        self.image_mapping = nn.Linear(visual_dim, config.emb_dim)
        # [RET] starts as the mean embedding row: a plausible token the LM has never seen.
        self.ret_embedding = nn.Parameter(embeddings.weight.detach().float().mean(0).clone())
        self.ret_output = None if self.tied and not config.ret_output_row else nn.Parameter(
            self.lm.get_output_embeddings().weight.detach().float().mean(0).clone())
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.ret_context = RetContext(lm_dim, config.emb_dim) if config.ret_context else None
        if self.ret_context is not None:  # it starts as the query it refines
            self.ret_context.query.load_state_dict(self.ret_mapping.state_dict())
        self.perception = (Perception(config.request_tokens, lm_dim, visual_dim, self.visual.n_patches,
                                      config.token_groups, embeddings.weight.detach().float().mean(0),
                                      config.look_gate, config.tokens_per_cell if config.word_decisions else 0)
                           if config.request_tokens else None)
        for module in (self.input_mapping, self.region_mapping, self.ret_mapping, self.image_mapping, self.perception,
                       self.ret_context):
            if module is not None:
                module.to(self.device)
        self.ret_embedding.data = self.ret_embedding.data.to(self.device)
        if self.region_positions is not None:
            self.region_positions.data = self.region_positions.data.to(self.device)
        if self.ret_output is not None:
            self.ret_output.data = self.ret_output.data.to(self.device)
        self.logit_scale.data = self.logit_scale.data.to(self.device)
        self.familiarity: Familiarity | None = None
        """Which images are like the training images (`familiarity.safetensors` in the checkpoint), if known."""
        self.reasoner: LoraConfig | None = None
        """IMMO's Reasoner adapter on `lm` (`model/reasoner.py`), if the checkpoint has one or `add_reasoner` made one."""
        self.cls_dropout = 0.0
        """In training only: the share of images whose pooled CLS feature is zeroed, so that only their region
        tokens can say what is where (`train.py --cls-dropout`)."""
        self._encoded: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._encoded_lock = threading.Lock()  # sessions share one model
        self.prefixes = PrefixCache(PREFIX_CACHE_BYTES)
        """The KV caches of recent prompts, for the next turn of their conversations (`prefill`)."""

    # ---- checkpoints --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder_or_preset: str | Path, quantize: str | None = None,
                        device: torch.device | str | None = None, region_grid: int | None = None,
                        compute_dtype: str | None = None, request_tokens: int | None = None,
                        dequantize: bool = False, tokens_per_cell: int | None = None,
                        cell_patches: int | None = None, ret_output_row: bool = False,
                        ret_context: bool = False, look_gate: bool = False, word_decisions: bool = False
                        ) -> "GroundedLM":
        """A checkpoint folder or preset, loaded as it was trained unless `quantize` / `compute_dtype` say
        otherwise; `dequantize` dequantises a 4-bit LM once (`lm.dequantized`: for batches), before the Reasoner's
        adapter goes on it. `region_grid` replaces the checkpoint's, to fine-tune it with another grid; a checkpoint
        without region tokens then gets a new, untrained region mapping (the shared per-cell mapping fits
        any grid). `request_tokens` likewise gives a checkpoint without one a new, untrained request module, and a
        new `tokens_per_cell` or `cell_patches` a new, untrained region mapping. `ret_output_row` gives `[RET]` an
        output row of its own, a copy of its row (so nothing is emitted differently until it is fitted), and
        `ret_context` a new module through which queries point at earlier images (none does until it is trained), and
        `look_gate` a request module without one a new, untrained look gate (`train_look_gate.py` fits it), and
        `word_decisions` one without them new, unfitted decisions (`fit_word_decisions.py` fits them)."""
        folder = resolve(folder_or_preset)
        config, weights = read_checkpoint(folder)
        recut = tokens_per_cell is not None and tokens_per_cell != config.tokens_per_cell
        reread = cell_patches is not None and cell_patches != config.cell_patches
        grown = tuple(prefix for prefix, new in (("region_mapping.",
                                                  config.region_grid == 0 and region_grid or recut or reread),
                                                 ("region_positions", recut),
                                                 ("perception.", config.request_tokens == 0 and request_tokens),
                                                 ("ret_output", ret_output_row and not config.ret_output_row),
                                                 ("ret_context.", ret_context and not config.ret_context),
                                                 ("perception.gate.", look_gate and not config.look_gate),
                                                 ("perception.words.", word_decisions and not config.word_decisions))
                      if new)  # modules the checkpoint lacks (or has in another shape) and gets, untrained
        if recut or reread:
            weights = {k: v for k, v in weights.items() if not k.startswith(grown)}
            config.tokens_per_cell = tokens_per_cell or config.tokens_per_cell
            config.cell_patches = cell_patches or config.cell_patches
        if region_grid is not None:
            config.region_grid = region_grid
        if request_tokens is not None and config.request_tokens and request_tokens != config.request_tokens:
            raise ValueError(f"{folder_or_preset} has a request module of {config.request_tokens} tokens, "
                             f"not {request_tokens}")
        config.request_tokens = request_tokens or config.request_tokens
        config.ret_output_row = ret_output_row or config.ret_output_row
        config.ret_context = ret_context or config.ret_context
        config.look_gate = look_gate or config.look_gate
        config.word_decisions = word_decisions or config.word_decisions
        config.__post_init__()  # what was added must fit what the checkpoint has
        model = cls(config, quantize, device, compute_dtype)
        expected = model.trainable_state_dict()
        problems = [f"missing {k}" for k in expected if k not in weights and not k.startswith(grown)]
        problems += [f"unexpected {k}" for k in weights if k not in expected]
        problems += [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
                     for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
        if problems:
            raise ValueError(f"the checkpoint {folder_or_preset} does not match the model its config describes "
                             f"(LM {config.lm}, encoder {model.visual.source}): " + "; ".join(problems))
        model.load_state_dict(weights, strict=False)
        if "ret_output" in grown and "ret_output" not in weights:
            model.ret_output.data.copy_(model.ret_embedding.data)
        if "ret_context." in grown:
            model.ret_context.query.load_state_dict(model.ret_mapping.state_dict())
        model.familiarity = Familiarity.load(folder, model.device)
        if dequantize and model.config.quantize == "4bit":
            model.lm = dequantized(model.lm)
        if config.reasoner:
            model.reasoner = load_reasoner(model.lm, folder / REASONER_FOLDER)
        return model

    def add_reasoner(self, rank: int = 16) -> None:
        """A new, untrained Reasoner adapter (it starts as the LM itself), to train (`model/training/monologue.py`)."""
        if self.reasoner is not None:
            raise ValueError("this model has a Reasoner already")
        self.reasoner = add_reasoner(self.lm, rank)
        self.config.reasoner = True

    def save_pretrained(self, folder: str | Path) -> None:
        reasoner = None if self.reasoner is None else lambda staging: save_reasoner(self.lm, self.reasoner,
                                                                                     staging / REASONER_FOLDER)
        write_checkpoint(folder, self.config, self.trainable_state_dict(), {"fingerprint": self.fingerprint}, reasoner)
        if self.familiarity is not None:
            self.familiarity.save(folder)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint stores: the mappings, the [RET] rows, the logit scale, the request module and
        the `[RET]` context module (with the statistics it standardises by)."""
        return {name: p.detach() for name, p in [*self.named_parameters(), *self.named_buffers()]
                if not name.startswith(("lm.", "visual."))}

    @property
    def fingerprint(self) -> str:
        """What makes index vectors (`model/image_embedder.py`): an index fits this model when it matches."""
        return fingerprint(self.visual, self.image_mapping)

    # ---- images ---------------------------------------------------------------------------------
    def encoded(self, images: list[Image.Image]) -> torch.Tensor:
        """The encoder's output (N, 1 + n_patches, visual_dim): the pooled CLS feature, then every patch.
        Cached by pixel hash (the encoder is frozen), up to FEATURE_CACHE_BYTES."""
        keys = [image_key(im) for im in images]
        with self._encoded_lock:
            found = {k: self._encoded[k] for k in keys if k in self._encoded}
        missing = {k: im for k, im in zip(keys, images) if k not in found}
        if missing:
            pooled, patches = self.visual.encode(list(missing.values()))
            found.update(zip(missing, torch.cat([pooled.unsqueeze(1), patches], 1)))       # (M, 1 + P, D)
        with self._encoded_lock:
            for k in keys:
                self._encoded[k] = found[k]
                self._encoded.move_to_end(k)
            entry_bytes = found[keys[0]].nbytes if keys else 1
            while len(self._encoded) > max(len(keys), FEATURE_CACHE_BYTES // entry_bytes):
                self._encoded.popitem(last=False)
        if not keys:
            return torch.zeros(0, 1 + self.visual.n_patches, self.visual.visual_dim, device=self.device)
        return torch.stack([found[k] for k in keys]).float()

    def visual_features(self, images: list[Image.Image]) -> torch.Tensor:
        """What the mappings read (N, 1 + region_grid^2 * cell_patches^2, visual_dim): the pooled CLS feature, then
        the region cells (each as `cell_patches`^2 pooled patches)."""
        return self.features_of(self.encoded(images))

    def features_of(self, encoded: torch.Tensor) -> torch.Tensor:
        """The encoder's output (N, 1 + n_patches, visual_dim) -> what the mappings read (`visual_features`)."""
        if not self.config.region_grid:
            return encoded[:, :1]
        cells = self.visual.regions(encoded[:, 1:], self.config.region_grid, self.config.cell_patches)
        return torch.cat([encoded[:, :1], cells], 1)

    @torch.no_grad()
    def unfamiliar(self, images: list[Image.Image]) -> list[bool]:
        """Which images are unlike those the checkpoint was trained on (none, when it does not know)."""
        if self.familiarity is None or not images:
            return [False] * len(images)
        return self.familiarity.unfamiliar(self.encoded(images)[:, 1:]).tolist()

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Index vectors (N, emb_dim), L2-normalised."""
        return image_vectors(self.visual, self.image_mapping, images)

    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(N, 1 + region_grid^2 * cell_patches^2, visual_dim) -> (N, tokens_per_image, lm_dim), in the LM's dtype."""
        n, dtype = self.config.n_visual_tokens, self.lm.get_input_embeddings().weight.dtype
        pooled = features[:, 0]                                                            # (N, visual_dim)
        if self.training and self.cls_dropout:
            pooled = pooled * (torch.rand(len(pooled), 1, device=pooled.device) >= self.cls_dropout)
        tokens = self.input_mapping(pooled).view(features.shape[0], n, -1)                # (N, n, lm_dim)
        if self.region_mapping is not None:
            cells = features[:, 1:].reshape(features.shape[0], self.config.region_grid ** 2, -1)  # (N, grid^2, c^2 D)
            cells = self.region_mapping(cells).unflatten(-1, (self.config.tokens_per_cell, -1))
            if self.region_positions is not None:                                          # (N, grid^2, k, lm_dim)
                cells = cells + self.region_positions
            tokens = torch.cat([tokens, cells.flatten(1, 2)], 1)                          # (N, n + grid^2 * k, lm_dim)
        return tokens.to(dtype)

    # ---- text -----------------------------------------------------------------------------------
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (...,) -> embeddings (..., lm_dim); `[RET]` takes its trainable row."""
        table = self.lm.get_input_embeddings()
        is_ret = ids == self.ret_id
        embeds = table(ids.masked_fill(is_ret, 0))
        return torch.where(is_ret.unsqueeze(-1), self.ret_embedding.to(embeds.dtype), embeds)

    def embed_segments(self, segments: list[Segment], look_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Rendered prompt -> inputs_embeds (T, lm_dim): token runs embedded, images spliced in, and each `Look`
        replaced by the next of `look_tokens` (L, request_tokens, lm_dim) (`look`)."""
        images = [s for s in segments if isinstance(s, Image.Image)]
        n_looks = sum(isinstance(s, Look) for s in segments)
        if n_looks != (0 if look_tokens is None else len(look_tokens)):
            raise ValueError(f"{n_looks} request positions in the prompt but "
                             f"{0 if look_tokens is None else len(look_tokens)} looks")
        tokens = iter(self.visual_tokens(self.visual_features(images))) if images else iter(())
        looks = iter(look_tokens.to(self.lm.get_input_embeddings().weight.dtype) if n_looks else ())
        parts = [next(tokens) if isinstance(s, Image.Image) else next(looks) if isinstance(s, Look)
                 else self.embed_ids(torch.tensor(s, dtype=torch.long, device=self.device)) for s in segments]
        return torch.cat(parts)

    def embed_conversation(self, turns: list[Turn]) -> torch.Tensor:
        """A conversation, ready for the assistant's reply -> inputs_embeds (1, T, lm_dim)."""
        return self.embed_segments(render(turns, self.tokenizer, self.config.prompt_format)).unsqueeze(0)

    # ---- looking (LMEye) -------------------------------------------------------------------------
    def look(self, requests: torch.Tensor, request_mask: torch.Tensor, images: list[Image.Image],
             question_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Requests (L, Q, lm_dim) with their mask (L, Q), one per image (`requests`), and the input rows at their
        positions (L, Q, lm_dim; for word decisions) -> request tokens (L, request_tokens, lm_dim) and where each
        looked (L, grid_h, grid_w)."""
        return self.look_at(requests, request_mask, self.encoded(images), question_rows)

    def look_at(self, requests: torch.Tensor, request_mask: torch.Tensor, encoded: torch.Tensor,
                question_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`look` on the images' encoder output (L, 1 + n_patches, visual_dim). Where it looked sums to 1: the
        attention over the patches, plus what the read of the image tokens took from each region cell spread
        over that cell's patches (the CLS tokens' share over all of them)."""
        image_tokens = self.visual_tokens(self.features_of(encoded))                       # (L, T, lm_dim)
        tokens, on_patches, on_tokens = self.perception(requests, request_mask, encoded[:, 1:], image_tokens,
                                                        question_rows)                     # (L, P), (L, T)
        rows, cols = self.visual.grid_size
        n = self.config.n_visual_tokens
        where = on_patches + on_tokens[:, :n].sum(1, keepdim=True) / (rows * cols)          # (L, P)
        if self.config.region_grid:
            grid = self.config.region_grid
            cells = on_tokens[:, n:].unflatten(1, (grid * grid, -1)).sum(-1)                 # (L, grid^2)
            ids = torch.arange(grid * grid, dtype=torch.float, device=cells.device).view(1, 1, grid, grid)
            owner = F.interpolate(ids, size=(rows, cols), mode="nearest").long().flatten()  # (P,): each patch's cell
            where = where + cells[:, owner] / torch.bincount(owner, minlength=grid * grid)[owner]
        return tokens, (where / where.sum(1, keepdim=True)).view(-1, rows, cols)

    def _before_look(self, segments: list[Segment]) -> tuple[int | None, torch.Tensor]:
        """A rendered prompt -> where its first `Look` is (None: no request) and the embedded prompt before it
        (T0, lm_dim): all of it, without a request."""
        first = next((i for i, s in enumerate(segments) if isinstance(s, Look)), None)
        if first is not None and self.perception is None:
            raise ValueError("the prompt has request positions but this checkpoint has no request module")
        return first, self.embed_segments(segments[:first])

    def _pass_one(self, segments: list[Segment], first: int, head: torch.Tensor, cache: DynamicCache | None
                  ) -> tuple[torch.Tensor, list[Looked]]:
        """Pass 1 over the prompt before its first `Look`, head (T0, lm_dim), and the first request row (into
        `cache` when given, which may already hold head's first positions, and is cut back to head after):
        -> the embedded rest of the prompt, the request tokens (L, request_tokens, lm_dim) in place of its `Look`s,
        and where each request looked; or the rest without them, looking nowhere, where the look gate finds that a
        turn without an image of its own does not ask about the earlier one. The cache must leave the question's
        positions (`question_positions`) to run here: they are the request."""
        probe = self.perception.request_rows[:1].to(head.dtype)                             # (1, lm_dim)
        known = 0 if cache is None else cache.get_seq_length()
        hidden, _ = self.hidden_states(torch.cat([head[known:], probe]).unsqueeze(0), past_key_values=cache)
        if cache is not None:
            cache.crop(-1)  # the request row's place: pass 2 puts the request tokens there
        looks = [s for s in segments[first:] if isinstance(s, Look)]
        if (self.perception.gate is not None and all(s.earlier for s in looks)
                and self.perception.asks_about_image(hidden[:, -1]).item() <= 0):
            return self.embed_segments([s for s in segments[first:] if not isinstance(s, Look)]), []
        asked = question_positions(segments[:first])
        request = hidden[:, -asked:]                                                        # (1, Q, lm_dim)
        rows = torch.cat([head, probe])[-asked:].unsqueeze(0)                               # (1, Q, lm_dim)
        mask = torch.ones(request.shape[:2], dtype=torch.bool, device=self.device)
        tokens, attention = self.look(request.expand(len(looks), -1, -1), mask.expand(len(looks), -1),
                                      [s.image for s in looks], rows.expand(len(looks), -1, -1))
        return self.embed_segments(segments[first:], tokens), [Looked(s.image, a) for s, a in zip(looks, attention)]

    def _request_input(self, prompt: list[Segment]) -> tuple[torch.Tensor, int]:
        """A prompt that looks -> pass 1's input, its positions before the first `Look` and the first request row
        (T + 1, lm_dim), and how many of the last of them are the request's (`question_positions`)."""
        first, head = self._before_look(prompt)                                             # (T, lm_dim)
        if first is None:
            raise ValueError("a prompt without request positions: render it with look=True")
        return torch.cat([head, self.perception.request_rows[:1].to(head.dtype)]), question_positions(prompt[:first])

    @torch.no_grad()
    def question_rows(self, prompts: list[list[Segment]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The input rows at each prompt's request positions, those `requests` runs the LM over (the request row's
        last), left-padded to QUESTION_POSITIONS (B, Q, lm_dim), and their mask (B, Q): what word decisions compare
        the image's cells with."""
        return left_padded([rows[-asked:] for rows, asked in map(self._request_input, prompts)], QUESTION_POSITIONS)

    @torch.no_grad()
    def requests(self, prompts: list[list[Segment]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 1 of prompts that look, as one batch: each prompt's request, the hidden states of its question and
        of the first request row after its prompt before the first `Look` (`question_positions`), left-padded to
        QUESTION_POSITIONS (B, Q, lm_dim), and their mask (B, Q) (the prompts run right-padded: causal attention
        keeps a row's positions its own)."""
        heads, asked = zip(*map(self._request_input, prompts))
        lengths = [len(h) for h in heads]
        inputs = torch.zeros(len(heads), max(lengths), heads[0].shape[-1], dtype=heads[0].dtype, device=self.device)
        mask = torch.zeros(inputs.shape[:2], dtype=torch.long, device=self.device)       # (B, T)
        for i, head in enumerate(heads):
            inputs[i, :len(head)], mask[i, :len(head)] = head, 1
        hidden, _ = self.hidden_states(inputs, mask)                                        # (B, T, lm_dim)
        return left_padded([hidden[i, n - a:n] for i, (n, a) in enumerate(zip(lengths, asked))], QUESTION_POSITIONS)

    def prefill(self, segments: list[Segment]) -> tuple[torch.Tensor, DynamicCache, list[Looked]]:
        """Run a rendered prompt into a new KV cache -> the last hidden state (lm_dim,), the cache and where it
        looked.

        The prompt's first positions come from `prefixes` when an earlier prompt started the same way (the
        conversation so far); the prompt before any request is remembered there for the next turn. With
        `Look`s (a model with a request module, `render(..., look=True)`): pass 1 runs the prompt up to them
        and the first request row; the hidden states of the question and that row are the request. The cache is cut
        back to the prompt before the request, and pass 2 runs only the request tokens and what follows (what follows
        alone where the look gate finds that the turn does not ask about the earlier image).
        """
        first, head = self._before_look(segments)                                          # head: (T0, lm_dim)
        # the last position always runs (its hidden state picks the first token); with a request, the question's
        known, cache = self.prefixes.reuse(head, limit=len(head) - (1 if first is None else
                                                                    question_positions(segments[:first]) - 1))
        if first is None:
            hidden, cache = self.hidden_states(head[known:].unsqueeze(0), past_key_values=cache)
            self.prefixes.add(head, cache)
            return hidden[0, -1], cache, []
        rest, looked = self._pass_one(segments, first, head, cache)
        self.prefixes.add(head, cache)
        hidden, cache = self.hidden_states(rest.unsqueeze(0), past_key_values=cache)
        return hidden[0, -1], cache, looked

    def embed_prompt(self, segments: list[Segment]) -> tuple[torch.Tensor, list[Looked]]:
        """A rendered prompt -> its inputs_embeds (T, lm_dim), request tokens included (pass 1 is run here and
        its cache dropped: for batched decoding, which runs every row whole), and where it looked."""
        first, head = self._before_look(segments)
        if first is None:
            return head, []
        rest, looked = self._pass_one(segments, first, head, None)
        return torch.cat([head, rest]), looked

    # ---- the LM ---------------------------------------------------------------------------------
    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      past_key_values=None, position_ids: torch.Tensor | None = None,
                      reasoner: bool | list[bool] = False) -> tuple[torch.Tensor, object]:
        """(B, T, lm_dim) -> last-layer hidden states (B, T, lm_dim) and the updated KV cache; `reasoner`: with the
        Reasoner's adapter on, for this call only (a list: for the rows that are True)."""
        if (any(reasoner) if isinstance(reasoner, list) else reasoner) and self.reasoner is None:
            raise ValueError("this checkpoint has no Reasoner (IMMO's adapter)")
        with reasoning(reasoner):
            out = self.lm.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                     past_key_values=past_key_values, use_cache=past_key_values is not None,
                                     position_ids=position_ids)
        return out.last_hidden_state, out.past_key_values

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., lm_dim) -> (..., V') float32 logits, with `[RET]`'s logit at `ret_id` (V' = max(V, ret_id + 1));
        -inf there for a model that does not retrieve (`config.retrieves`). `hidden` may be in another float dtype
        than the LM computes in (states kept in fp32 by evaluation, an LM in bf16)."""
        head = self.lm.get_output_embeddings()
        logits = head(hidden.to(head.weight.dtype)).float()
        ret_row = self.ret_embedding if self.ret_output is None else self.ret_output
        ret_logit = hidden.float() @ ret_row.float()
        if not self.config.retrieves:
            ret_logit = torch.full_like(ret_logit, float("-inf"))
        width = max(self.vocab_size, self.ret_id + 1)
        if width > self.vocab_size:
            logits = F.pad(logits, (0, width - self.vocab_size), value=float("-inf"))
        return torch.cat([logits[..., :self.ret_id], ret_logit.unsqueeze(-1), logits[..., self.ret_id + 1:]], -1)

    def ret_query(self, hidden: torch.Tensor, before: torch.Tensor | None = None, earlier: torch.Tensor | None = None,
                  present: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden state where `[RET]` is the input (B, lm_dim) -> query (B, emb_dim), L2-normalised. A model with
        `ret_context` also reads, for rows whose conversation has images before the request, the state where
        `[RET]` is predicted, before (B, lm_dim), and those images' index vectors, earlier (B, N, emb_dim), in
        order, where present (B, N) says (`ret_context.padded_earlier`). One query: hidden and before (lm_dim,),
        earlier (N, emb_dim)."""
        if hidden.dim() == 1:
            if earlier is None:
                return self.ret_query(hidden.unsqueeze(0))[0]
            return self.ret_query(hidden.unsqueeze(0), before.unsqueeze(0), earlier.unsqueeze(0),
                                  torch.ones(1, len(earlier), dtype=torch.bool, device=earlier.device))[0]
        query = F.normalize(self.ret_mapping(hidden.float()), dim=-1)                      # (B, emb_dim)
        if self.ret_context is None or earlier is None or not earlier.shape[1]:
            return query
        after_images = present.any(1, keepdim=True)                                         # (B, 1)
        return torch.where(after_images, self.ret_context(hidden, before, earlier.float(), present), query)

    def conversation_queries(self, hidden: torch.Tensor, before: torch.Tensor, conversations: list[list[Turn]]
                             ) -> torch.Tensor:
        """The queries (B, emb_dim) of B requests, one in each conversation: `ret_query` of hidden (B, lm_dim) where
        `[RET]` is the input and, for a model with `ret_context`, before (B, lm_dim) where it is predicted and the
        images each conversation shows before its request."""
        if self.ret_context is None:
            return self.ret_query(hidden)
        earlier = padded_earlier([self.earlier(images_in(turns)) for turns in conversations], self.device)
        return self.ret_query(hidden, before, *earlier)

    def earlier(self, images: list[Image.Image]) -> torch.Tensor | None:
        """The index vectors (N, emb_dim) of a conversation's images, for `ret_query`; None for a model whose
        queries do not read them."""
        if self.ret_context is None:
            return None
        return self.image_keys(self.encoded(images)[:, 0])

    def image_keys(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled CLS features (N, visual_dim) -> what queries are matched against (N, emb_dim), L2-normalised."""
        return image_keys(self.image_mapping, pooled)

    @torch.no_grad()
    def text_query(self, description: str) -> torch.Tensor:
        """The retrieval query (emb_dim,) for a description, asked as training taught: a request for a
        picture answered by `[RET]`, whose hidden state is the query (what decoding uses)."""
        prompt, target = render_with_target(retrieval_request(description, self.config.ret_token),
                                            self.tokenizer, self.config.prompt_format)
        ids = [t for segment in target for t in segment]
        segments = prompt + [ids[:ids.index(self.ret_id) + 1]]
        hidden, _ = self.hidden_states(self.embed_segments(segments).unsqueeze(0))          # (1, T, lm_dim)
        return self.ret_query(hidden[0, -1])

    # ---- training -------------------------------------------------------------------------------
    def shared_prefix(self, prompts: list[list[Segment]]) -> list[int]:
        """The token ids every prompt opens with (the system prompt and the user's header), before any image
        or `[RET]` and short of each prompt's last token. The frozen LM's keys and values there are the same
        for every row and need no gradient, so training computes them once per batch (about half the tokens
        of a short conversation) instead of once per row."""
        heads = [p[0] if p and not isinstance(p[0], Image.Image) else [] for p in prompts]
        # the last prompt token's logit predicts the reply's first token: it stays in the rows
        limit = min(count_tokens(p, self.config.tokens_per_image) for p in prompts) - 1
        common: list[int] = []
        for column in zip(*heads):
            if len(common) == limit or len(set(column)) > 1 or column[0] == self.ret_id:
                break
            common.append(column[0])
        return common

    @torch.no_grad()
    def run_prefix(self, prefix: list[int], n_rows: int) -> tuple[torch.Tensor, DynamicCache]:
        """Token ids every row opens with, run once: the last hidden state (lm_dim,) and a KV cache holding their
        keys and values for each of `n_rows` rows (the frozen LM's, so no gradient is lost)."""
        hidden, cache = self.hidden_states(self.embed_ids(torch.tensor(prefix, device=self.device)).unsqueeze(0),
                                           past_key_values=DynamicCache())
        cache.batch_repeat_interleave(n_rows)                                               # P keys per row
        return hidden[0, -1], cache

    def _run_rows(self, rows: list[TrainingRow], prefix: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows after the shared `prefix` -> the rest's hidden states (B, R, lm_dim), the hidden state just before
        each rest (B, lm_dim) and the labels (B, R), right-padded with -100. Position ids skip the padding, so every
        row sees the positions it would have alone. Rows that look (all of them or none) get their request tokens
        between context and rest, as `prefill` does: a request row after the context (pass 1; the request is its
        state and the context's last, the question's), then the request tokens and the rest (pass 2)."""
        n_rows, n_prefix, lm_dim, dtype = len(rows), len(prefix), rows[0].rest.shape[-1], rows[0].rest.dtype
        context_lengths = [0 if row.context is None else len(row.context) for row in rows]
        look_lengths = [len(row.looked) * self.config.request_tokens for row in rows]
        rest_lengths = [n + len(row.rest) for n, row in zip(look_lengths, rows)]
        n_context, n_rest = max(context_lengths), max(rest_lengths)
        mask = torch.zeros(n_rows, n_prefix + n_context + n_rest, dtype=torch.long, device=self.device)
        mask[:, :n_prefix] = 1
        for i, (c, r) in enumerate(zip(context_lengths, rest_lengths)):
            mask[i, n_prefix:n_prefix + c] = 1
            mask[i, n_prefix + n_context:n_prefix + n_context + r] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)                                      # (B, P + C + R)

        before = torch.zeros(n_rows, lm_dim, dtype=dtype, device=self.device)
        questions = [torch.zeros(0, lm_dim, dtype=dtype, device=self.device)] * n_rows  # (Q_i - 1, lm_dim) each
        words = list(questions)                                                              # their input rows
        cache = None
        with torch.no_grad():
            if prefix:
                before[:], cache = self.run_prefix(prefix, n_rows)
            if n_context:
                inputs = torch.zeros(n_rows, n_context, lm_dim, dtype=dtype, device=self.device)  # (B, C, lm_dim)
                for i, row in enumerate(rows):
                    if row.context is not None:
                        inputs[i, :len(row.context)] = row.context
                hidden, cache = self.hidden_states(inputs, mask[:, :n_prefix + n_context],
                                                   cache if cache is not None else DynamicCache(),
                                                   positions[:, n_prefix:n_prefix + n_context])
                for i, (c, row) in enumerate(zip(context_lengths, rows)):
                    if c:
                        before[i] = hidden[i, c - 1]
                    if row.looked:
                        questions[i] = hidden[i, max(0, c - row.asked + 1):c]
                        words[i] = row.context[max(0, c - row.asked + 1):c]
        inputs = torch.zeros(n_rows, n_rest, lm_dim, dtype=dtype, device=self.device)      # (B, R, lm_dim)
        labels = torch.full((n_rows, n_rest), -100, dtype=torch.long, device=self.device)
        if any(look_lengths):
            end = n_prefix + n_context
            probe = self.perception.request_rows[:1].to(dtype).expand(n_rows, 1, lm_dim)   # (B, 1, lm_dim)
            hidden, cache = self.hidden_states(probe, mask[:, :end + 1], cache if cache is not None else DynamicCache(),
                                               positions[:, end:end + 1])
            cache.crop(-1)
            looks = [(i, image) for i, row in enumerate(rows) for image in row.looked]
            request, request_mask = left_padded([torch.cat([questions[i], hidden[i, :1]]) for i, _ in looks],
                                                QUESTION_POSITIONS)                         # (L, Q, lm_dim)
            question_rows, _ = left_padded([torch.cat([words[i], probe[i]]) for i, _ in looks], QUESTION_POSITIONS)
            tokens, _ = self.look(request, request_mask, [image for _, image in looks],
                                  question_rows)                                            # (L, k, lm_dim)
            for i in range(n_rows):
                inputs[i, :look_lengths[i]] = tokens[[j for j, (owner, _) in enumerate(looks) if owner == i]].flatten(0, 1)
        for i, row in enumerate(rows):
            n = look_lengths[i]
            inputs[i, n:n + len(row.rest)], labels[i, n:n + len(row.labels)] = row.rest, row.labels
            if not n_prefix and not context_lengths[i]:
                labels[i, 0] = -100  # nothing before a row's first token predicts it
        hidden, _ = self.hidden_states(inputs, mask, cache, positions[:, n_prefix + n_context:])  # (B, R, lm_dim)
        return hidden, before, labels

    def forward(self, examples: list[Example], context_grad: bool = False) -> LossOutput:
        """Caption cross-entropy on the assistant targets + symmetric InfoNCE between [RET] and images.

        Each conversation runs in three parts, the KV cache growing from one to the next; only the last pays
        for a backward pass:
            opening   the tokens every row opens with (`shared_prefix`): once, no gradient;
            context   the prompt up to the last user turn's image, or all of it when that turn has none, or up
                      to the request tokens in a model that looks: no gradient (earlier turns and their images
                      are context here, trained where they are last);
            rest      from there to the end of the target (after the request, for rows that look): with gradient.
        Rows whose last user turn has an image (a long rest), rows whose has none (a long context, a short
        rest) and rows that look (one turn, or a longer conversation) run as sub-batches, so none pads to
        another's length. A conversation with no
        image or `[RET]` before its last user turn gets exactly the loss and gradients of the conversation run
        whole.
        `context_grad=True` runs every row whole, with gradient, in one batch (slower; bench/training.py's baseline).
        """
        rendered = [render_with_target(e.turns, self.tokenizer, self.config.prompt_format, self.perception is not None)
                    for e in examples]
        prefix = self.shared_prefix([prompt for prompt, _ in rendered])
        rows: list[TrainingRow] = []
        for example, (prompt, target) in zip(examples, rendered):
            if prefix:  # the shared opening runs once per sub-batch
                rest = prompt[0][len(prefix):]
                prompt = [rest, *prompt[1:]] if rest else prompt[1:]
            images_at = [i for i, s in enumerate(prompt) if isinstance(s, Image.Image)]
            looked = [s.image for s in prompt if isinstance(s, Look)]
            if looked:  # the context runs up to the request tokens, which `_run_rows` puts in
                cut = next(i for i, s in enumerate(prompt) if isinstance(s, Look))
                prompt = prompt[:cut] + prompt[cut + len(looked):]
            else:
                cut = 0 if context_grad else images_at[-1] if example.turns[-2].images else len(prompt)
            with torch.no_grad():
                context = self.embed_segments(prompt[:cut]) if cut else None
            rest_embeds = self.embed_segments(prompt[cut:] + target)
            target_labels = torch.cat([
                torch.full((self.config.tokens_per_image,), -100) if isinstance(s, Image.Image)
                else torch.tensor(s) for s in target]).to(self.device)
            rest_labels = torch.cat([torch.full((len(rest_embeds) - len(target_labels),), -100, device=self.device),
                                     target_labels])
            rows.append(TrainingRow(context, rest_embeds, rest_labels, looked,
                                    question_positions(prompt[:cut]) if looked else 0))
        predictors, label_ids, ret_hidden, ret_before = [], [], {}, {}
        looking = [i for i, row in enumerate(rows) if row.looked]
        groups = ([list(range(len(examples)))] if context_grad and not looking else
                  [[i for i in looking if len(examples[i].turns) == 2],
                   [i for i in looking if len(examples[i].turns) > 2],
                   [i for i, e in enumerate(examples) if e.turns[-2].images and not rows[i].looked],
                   [i for i, e in enumerate(examples) if not e.turns[-2].images and not rows[i].looked]])
        for group in groups:
            if group:
                hidden, before, labels = self._run_rows([rows[i] for i in group], prefix)  # (G, R, lm_dim) ...
                predicts = labels != -100                                                   # (G, R)
                predicting = torch.cat([before.unsqueeze(1), hidden[:, :-1]], 1)            # (G, R, lm_dim)
                predictors.append(predicting[predicts])
                label_ids.append(labels[predicts])
                for g, position in (labels == self.ret_id).nonzero().tolist():
                    ret_hidden[group[g], position] = hidden[g, position]
                    ret_before[group[g], position] = predicting[g, position]
        # Logits only where a target token is predicted: the vocabulary head is the LM's widest layer.
        logits = self.logits(torch.cat(predictors))                                         # (targets, V')
        caption_loss = F.cross_entropy(logits, torch.cat(label_ids))

        ret_images = [im for e in examples for im in e.ret_images]
        if len(ret_hidden) != len(ret_images):
            raise ValueError(f"{len(ret_hidden)} [RET] tokens in the targets but {len(ret_images)} ret_images")
        if not ret_images:
            zero = caption_loss.new_zeros(())
            return LossOutput(caption_loss, caption_loss.detach(), zero, 0.0)
        asked = sorted(ret_hidden)  # (example, position): in order
        queries = self.conversation_queries(torch.stack([ret_hidden[k] for k in asked]),    # (R, emb_dim)
                                            torch.stack([ret_before[k] for k in asked]),
                                            [examples[i].turns for i, _ in asked])
        keys = self.image_keys(self.visual_features(ret_images)[:, 0])                     # (R, emb_dim)
        scores = self.logit_scale.exp().clamp(max=100) * queries @ keys.T                                # (R, R)
        target = torch.arange(len(keys), device=self.device)
        ret_loss = (F.cross_entropy(scores, target) + F.cross_entropy(scores.T, target)) / 2
        accuracy = (scores.argmax(1) == target).float().mean().item()
        return LossOutput(caption_loss + ret_loss, caption_loss.detach(), ret_loss.detach(), accuracy)
