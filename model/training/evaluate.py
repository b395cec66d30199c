"""Measure a grounded checkpoint exactly, on the shapes world: captions read back into attributes, and
retrieval through `[RET]`, with the prompts the app uses.

    python -m model.training.evaluate --checkpoint assets/demo --split test            # full: 1,000 images
    python -m model.training.evaluate --checkpoint assets/demo --split test --limit 200  # fewer captions (CPU)

- captioning: greedy reply to `[image, "Describe the image."]` (instructions rotate), parsed with
  `shapes.parse_caption`; exact scene and per-attribute accuracy, by number of objects.
- text -> image: the `[RET]` hidden state of the conversation "Show me a picture of <caption>" -> "[RET]"
  (the training format) against the gallery's image vectors; image -> text the other way round. A hit is
  an image of the scene the caption describes (same objects, and background when the caption names one):
  images the caption cannot tell apart all count. `own` counts only the caption's own image. Also: how
  often greedy decoding emits that `[RET]` itself (what the app needs to show a picture at all).
- context (in the spirit of FROMAGe's VIST test): three earlier turns, each an image and its caption,
  then "Show me another picture like the second one." (first/second/third rotate); the reply is
  generated greedily and its `[RET]` (forced at the end if the model did not emit one) queries a gallery
  of new renderings of every scene in the conversations. With and without the three earlier turns.
- the compositional hold-out split (scenes with a hold-out (shape, colour) pair) reported separately.

Writes `eval_<split>.json` and `eval_<split>.png` (into the checkpoint folder unless --out says otherwise)
and prints a table.
"""
from __future__ import annotations

import argparse
import json
import random
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
from PIL import Image
from tqdm import tqdm
from transformers import DynamicCache

from model.world import shapes
from model.checkpoint import resolve
from model.world.data import ShapesDataset
from model.grounded import GroundedLM
from model.lm import QUANTIZE_CHOICES
from model.prefix_cache import common_length
from model.prompt import REQUESTS, Turn, images_in, render, render_with_target, retrieval_request
from model.training.clip_judge import ClipJudge
from model.training.conversations import CONTEXT_REQUESTS, INSTRUCTIONS, ORDINALS, caption_turns
from model.training.degeneracy import is_degenerate
from model.training.train import SUMMARY_NAME, checkpoint_kept_holdout_out
from model.training.train_clip import resolve_device
from model.training.plots import plt, save_figure

FIELDS = ("exact", "count", "shape", "colour", "size", "position", "shape_colour")
READ_FIELDS = ("first_named", "objects_named")
"""Read from the text in its own order (`read_in_order`), besides `shapes.score_scene`'s FIELDS."""
KS = (1, 5, 10)
CONTEXT_OFFSET = 500_000
"""Context conversations take their scenes from this index of the split on, away from the gallery's."""


@dataclass
class Reply:
    text: str
    ret: bool
    """The model emitted `[RET]` itself (the reply's text ends there)."""
    query: torch.Tensor | None = None
    """(emb_dim,) the `[RET]` query, when asked for: at the emitted `[RET]`, or forced where the reply ended."""


# --- batched decoding and [RET] queries -----------------------------------------------------------

def _warm_features(model: GroundedLM, conversations: list[list[Turn]]) -> None:
    """One CLIP pass for a batch's images; embedding the conversations then finds them cached."""
    images = [im for turns in conversations for im in images_in(turns)]
    if images:
        model.visual_features(images)


@torch.no_grad()
def greedy_replies(model: GroundedLM, conversations: list[list[Turn]], max_new_tokens: int = 48,
                   batch_size: int = 32, queries: bool = False, desc: str | None = None,
                   look: bool = True) -> list[Reply]:
    """Greedy replies, many conversations at once: left-padded inputs_embeds, attention mask, KV cache; with
    `desc`, a progress bar of the batches under that name. A model with a request module looks first, as the app
    asks, unless `look` is False.

    A reply ends at EOS or `[RET]`. With `queries`, `[RET]` is then fed as the next input (forced in place
    of EOS or after the last token) and the hidden state of that step is the reply's retrieval query, as
    `model.generate.stream_reply` does.
    """
    replies = []
    starts = range(0, len(conversations), batch_size)
    for start in starts if desc is None else tqdm(starts, desc=desc, unit="batch", dynamic_ncols=True):
        replies += _greedy_batch(model, conversations[start:start + batch_size], max_new_tokens, queries, look)
    return replies


def padded(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of embeddings (T_i, lm_dim) -> one batch (B, T, lm_dim) padded with zeros on `side`, and its
    attention mask (B, T): 1 where a row has a token."""
    ones = [torch.ones(len(row), dtype=torch.long, device=row.device) for row in rows]
    return (pad_sequence(rows, batch_first=True, padding_side=side),
            pad_sequence(ones, batch_first=True, padding_side=side))


def reply_logits(model: GroundedLM, prompts: list[torch.Tensor], replies: list[torch.Tensor],
                 prefix: list[int] | None = None) -> list[torch.Tensor]:
    """Prompts as embeddings (P_i, lm_dim) and reply ids (L_i,) -> the logits that predict each reply token
    (L_i, V'), all rows in one forward (with gradient, when the prompts carry one). `prefix`: token ids that
    every prompt opens with and that `prompts` leave out, run once for all rows (`GroundedLM.run_prefix`)."""
    rows = [torch.cat([prompt, model.embed_ids(reply)]) for prompt, reply in zip(prompts, replies)]
    inputs, mask = padded(rows, "right")                                                    # (N, P + L, lm_dim)
    cache, opened = (model.run_prefix(prefix, len(rows))[1], len(prefix)) if prefix else (None, 0)
    positions = torch.arange(opened, opened + inputs.shape[1], device=model.device).expand(len(rows), -1)
    hidden, _ = model.hidden_states(inputs, torch.cat([mask.new_ones(len(rows), opened), mask], 1), cache, positions)
    return [model.logits(hidden[i, len(p) - 1:len(p) - 1 + len(r)]) for i, (p, r) in enumerate(zip(prompts, replies))]


@torch.no_grad()
def text_only_nll(model: GroundedLM, instructions: list[str], texts: list[str], batch_size: int = 32) -> list[float]:
    """Each reply's mean NLL per token under the LM without the image (the user's instruction alone): how
    unlikely the words are as text, whatever the image."""
    tokenizer, fmt, nll = model.tokenizer, model.config.prompt_format, []
    for start in range(0, len(texts), batch_size):
        pairs = list(zip(instructions, texts))[start:start + batch_size]
        prompts = [model.embed_segments(render([Turn("user", [instruction])], tokenizer, fmt)) for instruction, _ in pairs]
        replies = [torch.tensor(tokenizer.encode(text, add_special_tokens=False) or [tokenizer.eos_token_id],
                                device=model.device) for _, text in pairs]
        nll += [torch.nn.functional.cross_entropy(logits, reply).item()
                for logits, reply in zip(reply_logits(model, prompts, replies), replies)]
    return nll


def _greedy_batch(model: GroundedLM, conversations: list[list[Turn]], max_new_tokens: int,
                  queries: bool, look: bool) -> list[Reply]:
    tokenizer, fmt = model.tokenizer, model.config.prompt_format
    _warm_features(model, conversations)
    look = look and model.perception is not None
    rows = [model.embed_prompt(render(turns, tokenizer, fmt, look))[0] for turns in conversations]  # each (T_i, lm_dim)
    batch = len(rows)
    inputs, mask = padded(rows, "left")                                           # (B, T, lm_dim), (B, T)
    positions = (mask.cumsum(1) - 1).clamp(min=0)                                           # (B, T)

    cache = DynamicCache()
    ids: list[list[int]] = [[] for _ in range(batch)]
    ret = [False] * batch
    query: list[torch.Tensor | None] = [None] * batch
    state = ["running"] * batch  # running -> (awaiting [RET]'s hidden state ->) done
    previous = None  # the last step's states (B, lm_dim), where this step's input was predicted
    step = 0
    while True:
        out = model.lm.base_model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions,
                                  past_key_values=cache, use_cache=True)
        hidden = out.last_hidden_state[:, -1]                                               # (B, lm_dim)
        logits = model.logits(hidden)                                                       # (B, V')
        if step and model.config.ret_opens_reply:  # as the app decodes: [RET] opens a reply or never comes
            logits[:, model.ret_id] = float("-inf")
        tokens = logits.argmax(-1).tolist()                                                 # (B,)
        for i in range(batch):
            if state[i] == "awaiting":
                query[i] = model.ret_query(hidden[i], previous[i], model.earlier(images_in(conversations[i])))
                state[i] = "done"
            elif state[i] == "running":
                if step < max_new_tokens and tokens[i] not in model.eos_ids and tokens[i] != model.ret_id:
                    ids[i].append(tokens[i])
                    continue
                ret[i] = step < max_new_tokens and tokens[i] == model.ret_id
                state[i] = "awaiting" if queries else "done"
                tokens[i] = model.ret_id  # the next input: emitted, or forced where the reply ended
        if all(s == "done" for s in state):
            break
        previous = hidden
        step += 1
        inputs = model.embed_ids(torch.tensor(tokens, device=model.device)).unsqueeze(1)    # (B, 1, lm_dim)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
        positions = positions[:, -1:] + 1
    return [Reply(tokenizer.decode(ids[i], skip_special_tokens=True), ret[i], query[i]) for i in range(batch)]


@torch.no_grad()
def shared_opening(model: GroundedLM, rows: list[torch.Tensor], limit: int) -> tuple[int, DynamicCache | None]:
    """Rows of input embeddings (T_i, lm_dim) -> how many leading positions all of them share (at most `limit`)
    and a KV cache of those positions read once, repeated for every row (None when they share none)."""
    n = min(limit, *(common_length(rows[0], row) for row in rows))
    if n <= 0:
        return 0, None
    _, cache = model.hidden_states(rows[0][:n].unsqueeze(0), past_key_values=DynamicCache())
    cache.batch_repeat_interleave(len(rows))
    return n, cache


@torch.no_grad()
def _teacher_forced(model: GroundedLM, conversations: list[list[Turn]], batch_size: int, desc: str | None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[list[int]]]]:
    """Each batch of conversations read whole, its last (assistant, text) turn as the input: the last-layer hidden
    states (B, T, lm_dim), where each reply starts in them (B,), and each reply's token ids. What every row opens
    with (the system prompt; a history several replies follow) is read once, so T counts from there."""
    starts = range(0, len(conversations), batch_size)
    for start in starts if desc is None else tqdm(starts, desc=desc, unit="batch", dynamic_ncols=True):
        chunk = conversations[start:start + batch_size]
        _warm_features(model, chunk)
        rows, reply_at, targets = [], [], []
        for turns in chunk:
            prompt, target = render_with_target(turns, model.tokenizer, model.config.prompt_format)
            if any(isinstance(s, Image.Image) for s in target):
                raise ValueError("the assistant turn must be text")
            prompt_embeds = model.embed_segments(prompt)
            rows.append(torch.cat([prompt_embeds, model.embed_segments(target)]))
            reply_at.append(len(prompt_embeds))
            targets.append([t for s in target for t in s])
        opened, cache = shared_opening(model, rows, min(reply_at) - 1)
        inputs, mask = padded([row[opened:] for row in rows], "right")            # (B, T, lm_dim), (B, T)
        positions = torch.arange(opened, opened + inputs.shape[1], device=model.device).expand(len(rows), -1)
        hidden, _ = model.hidden_states(inputs, torch.cat([mask.new_ones(len(rows), opened), mask], 1), cache,
                                        positions)                                          # (B, T, lm_dim)
        yield hidden, torch.tensor(reply_at, device=model.device) - opened, targets


def reply_states(model: GroundedLM, conversations: list[list[Turn]], batch_size: int = 32, desc: str | None = None,
                 token: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced, at the first `token` of each conversation's last (assistant) turn, or at its first token
    whatever it is: the LM's hidden state where that token is predicted (N, lm_dim), where it is the input
    (N, lm_dim), and its id (N,). With `desc`, a progress bar."""
    before, at, ids = [], [], []
    for hidden, reply_at, targets in _teacher_forced(model, conversations, batch_size, desc):
        if token is not None and (missing := [t for t in targets if token not in t]):
            raise ValueError(f"the assistant turn {model.tokenizer.decode(missing[0])!r} holds no "
                             f"{model.tokenizer.decode([token])}")
        index = [0 if token is None else t.index(token) for t in targets]
        rows_at = torch.arange(len(targets), device=model.device)
        token_at = reply_at + torch.tensor(index, device=model.device)
        before.append(hidden[rows_at, token_at - 1].float())
        at.append(hidden[rows_at, token_at].float())
        ids += [t[i] for t, i in zip(targets, index)]
    return torch.cat(before), torch.cat(at), torch.tensor(ids)                   # (N, lm_dim), (N, lm_dim), (N,)


def reply_positions(model: GroundedLM, conversations: list[list[Turn]], batch_size: int = 32,
                    desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced, at every token of each conversation's last (assistant) turn: the LM's hidden state where
    it is predicted (M, lm_dim), its id (M,) and which conversation it is in (M,). With `desc`, a progress bar."""
    states, ids, reply = [], [], []
    done = 0
    for hidden, reply_at, targets in _teacher_forced(model, conversations, batch_size, desc):
        for row, (start, target) in enumerate(zip(reply_at.tolist(), targets)):
            states.append(hidden[row, start - 1:start - 1 + len(target)].float())          # (len, lm_dim)
            ids += target
            reply += [done + row] * len(target)
        done += len(targets)
    return torch.cat(states), torch.tensor(ids), torch.tensor(reply)             # (M, lm_dim), (M,), (M,)


def ret_queries(model: GroundedLM, conversations: list[list[Turn]],
                batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Conversations each ending with an assistant turn holding `[RET]` -> the retrieval queries (N, emb_dim), read
    where its first `[RET]` is the input, and (N,) bool: greedy decoding would have emitted that `[RET]` itself,
    given the text before it."""
    before, hidden, _ = reply_states(model, conversations, batch_size, token=model.ret_id)
    with torch.no_grad():
        emitted = (model.logits(before).argmax(-1) == model.ret_id).cpu()
        return model.conversation_queries(hidden, before, conversations), emitted


# --- metrics --------------------------------------------------------------------------------------

def recall_at_k(scores: torch.Tensor, relevant: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """scores (Q, G), relevant (Q, G) bool -> {"R@k": share of queries with a relevant item in the top k}.

    The rank of a query is the number of irrelevant items that score strictly above its best relevant one.
    """
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and relevant {tuple(relevant.shape)} differ in shape")
    if not relevant.any(1).all():
        raise ValueError("every query needs at least one relevant item")
    best = scores.masked_fill(~relevant, float("-inf")).max(1, keepdim=True).values         # (Q, 1)
    rank = ((scores > best) & ~relevant).sum(1)                                             # (Q,)
    return {f"R@{k}": (rank < k).float().mean().item() for k in ks}


def same_scene(described: list[shapes.Scene], shown: list[shapes.Scene], captions: list[str]) -> torch.Tensor:
    """(len(described), len(shown)) bool: shown image j is what caption i describes (objects, and the
    background when the caption names one)."""
    names_background = [shapes.parse_caption(c) is not None and shapes.parse_caption(c).background is not None
                        for c in captions]
    return torch.tensor([[d.objects == s.objects and (not named or d.background == s.background) for s in shown]
                         for d, named in zip(described, names_background)])


def read_in_order(truth: shapes.Scene, text: str) -> dict[str, float]:
    """first_named: the first object the text names is one of the scene's, in shape and colour (a description
    that goes on too long, as ESPER's may, can still begin right); objects_named: how many objects it names."""
    named = shapes.described_objects(text)
    first = bool(named) and (named[0].shape, named[0].colour) in {(o.shape, o.colour) for o in truth.objects}
    return {"first_named": float(first), "objects_named": float(len(named))}


def caption_scores(truths: list[shapes.Scene], texts: list[str]) -> dict[str, dict[str, float]]:
    """Mean `shapes.score_scene` fields and READ_FIELDS, by number of objects ("1", "2", "3") and over all
    ("all")."""
    rows = [(len(t.objects), {**shapes.score_scene(t, shapes.parse_caption(text)), **read_in_order(t, text)})
            for t, text in zip(truths, texts)]
    groups = {str(n): [s for m, s in rows if m == n] for n in range(1, shapes.MAX_OBJECTS + 1)}
    groups["all"] = [s for _, s in rows]
    return {name: {"n": len(scores), **{f: sum(s[f] for s in scores) / len(scores) for f in FIELDS + READ_FIELDS}}
            for name, scores in groups.items() if scores}


# --- the evaluations ------------------------------------------------------------------------------

def load(checkpoint: str, device: str, quantize: str | None) -> tuple[GroundedLM, bool]:
    """The model as evaluation runs it (4-bit dequantised once: what the 4-bit weights compute on a batch,
    without per-call dequantising) and whether it never saw the hold-out pairs."""
    folder = resolve(checkpoint)
    return (GroundedLM.from_pretrained(folder, quantize=quantize, device=resolve_device(device), dequantize=True),
            checkpoint_kept_holdout_out(folder))


def captioning(model: GroundedLM, items: list[shapes.Sample], batch_size: int, max_new_tokens: int,
               judge: ClipJudge | None = None) -> dict:
    """Greedy descriptions scored against their scenes; with a `judge`, also their CLIP score and how many
    are degenerate (`degeneracy.is_degenerate`)."""
    instructions = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(len(items))]
    conversations = [[Turn("user", [s.image, instruction])] for s, instruction in zip(items, instructions)]
    replies = greedy_replies(model, conversations, max_new_tokens, batch_size, desc="descriptions")
    texts = [r.text for r in replies]
    result = caption_scores([s.scene for s in items], texts)
    result["ret_emitted"] = sum(r.ret for r in replies) / len(replies)
    if judge is not None:
        scores = torch.cat([judge.similarity(judge.image_embeddings([s.image for s in items[i:i + batch_size]]),
                                             texts[i:i + batch_size]) for i in range(0, len(items), batch_size)])
        nll = text_only_nll(model, instructions, texts, batch_size)
        result["clip_score"] = scores.mean().item()
        result["degenerate"] = sum(map(is_degenerate, texts, nll)) / len(texts)
    result["examples"] = [{"truth": s.caption, "reply": r.text} for s, r in zip(items[:10], replies)]
    return result


def retrieval(model: GroundedLM, items: list[shapes.Sample], batch_size: int) -> dict:
    """Text -> image and image -> text over `items` as both gallery and queries."""
    conversations = [retrieval_request(s.caption, model.config.ret_token, REQUESTS[i % len(REQUESTS)])
                     for i, s in enumerate(items)]
    queries, emitted = ret_queries(model, conversations, batch_size)                        # (N, emb_dim), (N,)
    images = model.embed_images([s.image for s in items])                                   # (N, emb_dim)
    scores = (queries @ images.T).cpu()                                                     # (N texts, N images)
    scenes, captions = [s.scene for s in items], [s.caption for s in items]
    relevant = same_scene(scenes, scenes, captions)                                         # (N, N)
    own = torch.eye(len(items), dtype=torch.bool)
    return {"gallery": len(items), "ret_emitted": emitted.float().mean().item(),
            "text_to_image": recall_at_k(scores, relevant), "text_to_image_own": recall_at_k(scores, own),
            "image_to_text": recall_at_k(scores.T, relevant.T), "image_to_text_own": recall_at_k(scores.T, own)}


def context_conversations(split: str, n: int, image_size: int,
                          holdout: bool = False) -> tuple[list[list[Turn]], list[int], list]:
    """n conversations of three images described as the model describes them (instructions rotate), and the
    index of the one asked for."""
    conversations, targets, scenes = [], [], []
    for c in range(n):
        rng = random.Random(f"eval-context:{c}")
        items = [shapes.sample(split, CONTEXT_OFFSET + len(ORDINALS) * c + j, image_size, holdout)
                 for j in range(len(ORDINALS))]
        turns = [t for s in items for t in caption_turns(s.image, shapes.plain_caption(s.scene), rng)]
        conversations.append(turns)
        targets.append(c % len(ORDINALS))
        scenes.append([s.scene for s in items])
    return conversations, targets, scenes


def contextual(model: GroundedLM, split: str, n: int, image_size: int, batch_size: int, max_new_tokens: int,
               items: list[shapes.Sample], holdout: bool = False) -> dict:
    """Turns after three described images: 'another picture like the second one' (with and without the
    history), a request for a new scene (ranked over the gallery `items`), and a new image to describe."""
    history, targets, scenes = context_conversations(split, n, image_size, holdout)
    gallery_scenes = [s for conversation in scenes for s in conversation]                  # (3n,)
    gallery = [shapes.render(s, random.Random(f"eval-another:{i}"), image_size) for i, s in enumerate(gallery_scenes)]
    images = model.embed_images(gallery)                                                    # (3n, emb_dim)
    wanted = [scenes[c][k] for c, k in enumerate(targets)]
    relevant = torch.tensor([[w.objects == g.objects and w.background == g.background for g in gallery_scenes]
                             for w in wanted])                                              # (n, 3n)
    result = {"conversations": n, "gallery": len(gallery)}
    for name, with_history in (("with_context", True), ("without_context", False)):
        requests = [Turn("user", [CONTEXT_REQUESTS[0].format(ORDINALS[k])]) for k in targets]
        conversations = [(h if with_history else []) + [r] for h, r in zip(history, requests)]
        replies = greedy_replies(model, conversations, max_new_tokens, batch_size, queries=True,
                                 desc=f"another like it ({name.replace('_', ' ')})")
        scores = (torch.stack([r.query for r in replies]) @ images.T).cpu()
        result[name] = {**recall_at_k(scores, relevant, (1, 5)),
                        "ret_emitted": sum(r.ret for r in replies) / n,
                        "examples": [r.text for r in replies[:5]]}

    new = [items[c % len(items)] for c in range(n)]
    requests = [retrieval_request(s.caption, model.config.ret_token, REQUESTS[c % len(REQUESTS)])[:1]
                for c, s in enumerate(new)]
    replies = greedy_replies(model, [h + r for h, r in zip(history, requests)], max_new_tokens, batch_size,
                             queries=True, desc="requests after history")
    scores = (torch.stack([r.query for r in replies]) @ model.embed_images([s.image for s in items]).T).cpu()
    relevant = same_scene([s.scene for s in new], [s.scene for s in items], [s.caption for s in items])
    first = scores.argmax(1)
    result["new_request"] = {"gallery": len(items), "ret_emitted": sum(r.ret for r in replies) / n,
                             "right_first_when_emitted": sum(bool(r.ret and relevant[i, first[i]])
                                                             for i, r in enumerate(replies)) / n,
                             **recall_at_k(scores, relevant, (1, 5)), "examples": [r.text for r in replies[:5]]}
    describe = [h + [Turn("user", [s.image, INSTRUCTIONS[c % len(INSTRUCTIONS)]])] for c, (h, s) in
                enumerate(zip(history, new))]
    replies = greedy_replies(model, describe, max_new_tokens, batch_size, desc="descriptions after history")
    result["new_image"] = {**caption_scores([s.scene for s in new], [r.text for r in replies]),
                           "ret_emitted": sum(r.ret for r in replies) / n,
                           "examples": [{"truth": s.caption, "reply": r.text} for s, r in zip(new[:5], replies)]}
    return result


def evaluate(model: GroundedLM, split: str, gallery: int, limit: int, contexts: int, batch_size: int,
             max_new_tokens: int = 48, holdout_trained: bool = False, log=print) -> dict:
    """All the measurements, as one JSON-ready dict. `holdout_trained`: the model never saw the hold-out
    pairs, so the main split is drawn without them too (as in training)."""
    image_size = model.visual.image_size[0]
    result: dict = {"split": split, "holdout_pairs_seen_in_training": not holdout_trained, "splits": {}}
    galleries = {}
    for name in dict.fromkeys((split, "holdout")):
        t0 = time.time()
        data = ShapesDataset(name, gallery, image_size, holdout=holdout_trained)
        items = galleries[name] = [data.sample(i) for i in range(gallery)]
        section = {"captioning": captioning(model, items[:limit], batch_size, max_new_tokens) if limit else None}
        log(f"{name}: captioned {min(limit, gallery)} images in {time.time() - t0:.0f}s")
        t0 = time.time()
        section["retrieval"] = retrieval(model, items, batch_size) if model.config.retrieves else None
        log(f"{name}: retrieval over a gallery of {gallery} in {time.time() - t0:.0f}s" if model.config.retrieves
            else f"{name}: no retrieval (the checkpoint does not retrieve)")
        result["splits"][name] = section
    if contexts and model.config.retrieves:
        t0 = time.time()
        result["context"] = contextual(model, split, contexts, image_size, batch_size, max_new_tokens,
                                       galleries[split], holdout_trained)
        log(f"context: {contexts} conversations in {time.time() - t0:.0f}s")
    return result


# --- report ---------------------------------------------------------------------------------------

def _pct(x: float | None) -> str:
    return "    -" if x is None else f"{100 * x:5.1f}"


def table(result: dict) -> str:
    """The figures as plain-text tables (also valid markdown)."""
    lines = []
    for name, section in result["splits"].items():
        cap = section["captioning"]
        if cap:
            groups = [g for g in ("1", "2", "3", "all") if g in cap]
            head = " | ".join(f"{g} obj. (n={cap[g]['n']})" if g != "all" else f"all (n={cap[g]['n']})" for g in groups)
            lines += [f"| captioning, {name} (%) | {head} |", "|---" * (len(groups) + 1) + "|"]
            for field in FIELDS:
                label = "exact scene" if field == "exact" else field
                lines.append(f"| {label} | " + " | ".join(_pct(cap[g][field]) for g in groups) + " |")
            lines.append(f"| [RET] emitted when asked to describe | {_pct(cap['ret_emitted'])} |"
                         + " |" * (len(groups) - 1))
            lines.append("")
        ret = section["retrieval"]
        if not ret:
            continue
        lines += [f"| retrieval, {name}, gallery {ret['gallery']} (%) | R@1 | R@5 | R@10 |", "|---|---|---|---|"]
        for key, label in (("text_to_image", "text -> image"),
                           ("text_to_image_own", "text -> image, own image only"),
                           ("image_to_text", "image -> text"),
                           ("image_to_text_own", "image -> text, own caption only")):
            lines.append(f"| {label} | " + " | ".join(_pct(ret[key][f"R@{k}"]) for k in KS) + " |")
        lines.append(f"| [RET] emitted when asked for a picture | {_pct(ret['ret_emitted'])} | | |")
        lines.append("")
    if "context" in result:
        ctx = result["context"]
        lines += [f"| context, {ctx['conversations']} conversations, gallery {ctx['gallery']} (%) | R@1 | R@5 | "
                  "[RET] emitted |", "|---|---|---|---|"]
        for key, label in (("with_context", "'another picture like the k-th one', after three images"),
                           ("without_context", "the same request without the history"),
                           ("new_request", f"a request for a new scene after three images (gallery "
                                           f"{ctx['new_request']['gallery']})")):
            c = ctx[key]
            lines.append(f"| {label} | {_pct(c['R@1'])} | {_pct(c['R@5'])} | {_pct(c['ret_emitted'])} |")
        lines.append(f"| ... [RET] emitted and the right scene first | {_pct(ctx['new_request']['right_first_when_emitted'])} "
                     f"| | |")
        new = ctx["new_image"]
        lines.append(f"| a new image to describe after three: exact scene / [RET] emitted | {_pct(new['all']['exact'])} "
                     f"| | {_pct(new['ret_emitted'])} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    sections = list(result["splits"].items())
    fig, axes = plt.subplots(1, len(sections) + 1, figsize=(5.5 * (len(sections) + 1), 4))
    for ax, (name, section) in zip(axes, sections):
        cap = section["captioning"]
        if not cap:
            ax.set_axis_off()
            continue
        groups = [g for g in ("1", "2", "3", "all") if g in cap]
        width = 0.8 / len(FIELDS)
        for j, field in enumerate(FIELDS):
            ax.bar([i + j * width for i in range(len(groups))], [cap[g][field] for g in groups], width, label=field)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))],
                      [f"{g} object{'s' if g != '1' else ''}" if g != "all" else "all" for g in groups])
        ax.set(ylim=(0, 1.05), title=f"captioning accuracy ({name})")
        ax.legend(fontsize=7, loc="lower left")
    ax = axes[-1]
    bars = {f"{name}\nt->i": s["retrieval"]["text_to_image"] for name, s in sections if s["retrieval"]}
    bars.update({f"{name}\ni->t": s["retrieval"]["image_to_text"] for name, s in sections if s["retrieval"]})
    if "context" in result:
        bars["context\nwith"] = result["context"]["with_context"]
        bars["context\nwithout"] = result["context"]["without_context"]
        bars["new request\nafter 3"] = result["context"]["new_request"]
    if not bars:  # a checkpoint that does not retrieve
        ax.set_axis_off()
        save_figure(fig, path)
        return
    for j, k in enumerate((1, 5)):
        ax.bar([i + j * 0.4 for i in range(len(bars))], [b[f"R@{k}"] for b in bars.values()], 0.4, label=f"R@{k}")
    ax.set_xticks([i + 0.2 for i in range(len(bars))], list(bars), fontsize=7)
    ax.set(ylim=(0, 1.05), title="retrieval through [RET]")
    ax.legend()
    save_figure(fig, path)


SLOTS = (("shape", "The shape is a", shapes.SHAPES), ("colour", "I see a bright", tuple(shapes.COLOURS)))
"""Reply openings whose next word names a one-object scene's shape or colour, if the model says it: ESPER's
candidates stages train such slots (`--opening`), so the next word there is what they can teach first."""


def names(piece: str, truth: str, words: tuple[str, ...]) -> bool:
    """Whether a decoded token names `truth` among `words`: it begins it (" hex" for "hexagon") and no other."""
    piece = piece.strip().lower()
    return bool(piece) and truth.startswith(piece) and not any(w.startswith(piece) for w in words if w != truth)


@torch.no_grad()
def slot_accuracy(model: GroundedLM, items: list[shapes.Sample], batch_size: int) -> dict[str, float | None]:
    """For each of SLOTS, the share of the one-object scenes in `items` whose greedy next token (over the whole
    vocabulary) after [image, "Describe the image."] and the reply's opening names the object's shape or colour."""
    ones = [s for s in items if len(s.scene.objects) == 1]
    tokenizer, fmt, look = model.tokenizer, model.config.prompt_format, model.perception is not None
    result = {}
    for field, opening, words in SLOTS:
        opened = tokenizer.encode(opening, add_special_tokens=False)
        right = 0
        for start in range(0, len(ones), batch_size):
            batch = ones[start:start + batch_size]
            turns = [[Turn("user", [s.image, INSTRUCTIONS[0]])] for s in batch]
            _warm_features(model, turns)
            rows = [model.embed_prompt(render(t, tokenizer, fmt, look) + [opened])[0] for t in turns]
            inputs, mask = padded(rows, "left")                                      # (B, T, lm_dim), (B, T)
            hidden, _ = model.hidden_states(inputs, mask, None, (mask.cumsum(1) - 1).clamp(min=0))
            said = model.logits(hidden[:, -1]).argmax(-1).tolist()                               # (B,)
            right += sum(names(tokenizer.decode([token]), getattr(s.scene.objects[0], field), words)
                         for s, token in zip(batch, said))
        result[field] = right / len(ones) if ones else None
    return result


COMPARED = (("1", "shape_colour", "one object: shape and colour both right"),
            ("1", "first_named", "one object: the first object named has its shape and colour"),
            ("1", "exact", "one object: exact scene"),
            ("2", "shape_colour", "two objects: shape and colour named"), ("all", "colour", "colour, placed right"),
            ("all", "shape", "shape, placed right"))


def compare(checkpoints: dict[str, str], split: str, limit: int, batch_size: int, max_new_tokens: int, device: str,
            judge_source: str | None, log=print) -> dict:
    """Describing only, the same images for every checkpoint (the split's scenes without the hold-out pairs),
    scored by one judge (default: the first checkpoint's encoder with its text tower): how ESPER compares with the
    untrained mapping and the supervised demo; and whether each says a one-object scene's shape and colour
    after the openings of SLOTS. A checkpoint's training.json adds its CPU time and the captions it saw."""
    result: dict = {"split": split, "images": limit, "models": {}}
    judge = None
    for name, checkpoint in checkpoints.items():
        t0 = time.time()
        model, _ = load(checkpoint, device, None)
        if judge is None:
            judge = ClipJudge(*(judge_source, None) if judge_source else (model.config.visual,
                                                                           model.config.visual_pretrained),
                              device=model.device)
            result["judge"] = judge.source
        data = ShapesDataset(split, limit, model.visual.image_size[0], holdout=True)  # the same for every model
        items = [data.sample(i) for i in range(limit)]
        section = captioning(model, items, batch_size, max_new_tokens, judge)
        section["slots"] = slot_accuracy(model, items, batch_size)
        summary_path = resolve(checkpoint) / SUMMARY_NAME
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        section.update(checkpoint=checkpoint, training_seconds=summary.get("seconds"),
                       captions_seen=summary.get("captions_seen"))
        result["models"][name] = section
        log(f"{name}: described {limit} images in {time.time() - t0:.0f}s")
    return result


def compare_table(result: dict) -> str:
    names = list(result["models"])
    lines = [f"| {result['split']} split, {result['images']} images (%) | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for group, field, label in COMPARED:
        lines.append(f"| {label} | " + " | ".join(_pct(m[group][field]) if group in m else "    -"
                                                 for m in result["models"].values()) + " |")
    for field, opening, _ in SLOTS:
        lines.append(f"| one object: says the {field} after \"{opening}\" | "
                     + " | ".join(_pct(m["slots"][field]) for m in result["models"].values()) + " |")
    lines.append("| one object: objects named per description | " + " | ".join(
        f"{m['1']['objects_named']:.2f}" if "1" in m else "-" for m in result["models"].values()) + " |")
    lines.append(f"| CLIP score ({result['judge']}) | " + " | ".join(f"{m['clip_score']:.3f}"
                                                                   for m in result["models"].values()) + " |")
    lines.append("| degenerate descriptions | " + " | ".join(_pct(m["degenerate"]) for m in result["models"].values())
                 + " |")
    lines.append("| training, CPU minutes | " + " | ".join(
        "-" if m["training_seconds"] is None else f"{m['training_seconds'] / 60:.0f}" for m in result["models"].values())
        + " |")
    return "\n".join(lines)


def plot_compare(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(13, 4))
    bars = [(label, [m[group][field] if group in m else 0 for m in result["models"].values()])
            for group, field, label in COMPARED]
    bars += [(f"says the {field} next", [m["slots"][field] or 0 for m in result["models"].values()])
             for field, _, _ in SLOTS]
    bars += [("CLIP score", [m["clip_score"] for m in result["models"].values()]),
             ("degenerate", [m["degenerate"] for m in result["models"].values()])]
    width = 0.8 / len(result["models"])
    for j, name in enumerate(result["models"]):
        ax.bar([i + j * width for i in range(len(bars))], [values[j] for _, values in bars], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(bars))], [textwrap.fill(label, 15) for label, _ in bars],
                  fontsize=7)
    ax.set(ylim=(0, 1.05), title=f"describing the {result['split']} split's images ({result['images']})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside the bars, never over them
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="demo", help="checkpoint folder or preset")
    p.add_argument("--split", choices=("test", "val", "holdout"), default="test")
    p.add_argument("--gallery", type=int, default=1000, help="images in the retrieval gallery (and captioned)")
    p.add_argument("--limit", type=int, default=None, help="caption only the first N gallery images (0: none)")
    p.add_argument("--contexts", type=int, default=200, help="context conversations (0: skip)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest reply generated")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None, help="default: as the checkpoint was trained")
    p.add_argument("--out", type=Path, default=None, help="JSON to write (default: <checkpoint>/eval_<split>.json, "
                                                          "with --compare runs/compare_<split>.json); the plot goes "
                                                          "beside it as .png")
    p.add_argument("--compare", action="append", metavar="NAME=CHECKPOINT",
                   help="describe the same images with each of these checkpoints (repeat) and compare them, with the "
                        "CLIP score and the share of degenerate descriptions (ESPER against the supervised demo)")
    p.add_argument("--judge", help="with --compare: the open_clip model that scores descriptions (default: the first "
                                   "checkpoint's encoder)")
    args = p.parse_args(argv)
    if min(args.gallery, args.batch_size, args.max_new_tokens) < 1 or min(args.limit or 0, args.contexts) < 0:
        raise SystemExit("--gallery, --batch-size and --max-new-tokens must be positive, --limit and --contexts "
                         "not negative")
    if args.compare:
        pairs = [item.partition("=") for item in args.compare]
        if any(not name or not sep or not checkpoint for name, sep, checkpoint in pairs):
            raise SystemExit("--compare takes NAME=CHECKPOINT")
        result = compare({name: checkpoint for name, _, checkpoint in pairs}, args.split, args.limit or 300,
                         args.batch_size, args.max_new_tokens, args.device, args.judge,
                         log=lambda m: print(m, flush=True))
        report(result, args.out or Path("runs") / f"compare_{args.split}.json", plot_compare, compare_table)
        return result
    folder = resolve(args.checkpoint)
    t0 = time.time()
    model, holdout_trained = load(args.checkpoint, args.device, args.quantize)
    print(f"loaded {args.checkpoint} ({folder}) on {model.device}, {model.config.quantize} with "
          f"{model.config.compute_dtype} compute, in {time.time() - t0:.0f}s",
          flush=True)
    limit = args.gallery if args.limit is None else min(args.limit, args.gallery)
    result = evaluate(model, args.split, args.gallery, limit, args.contexts, args.batch_size, args.max_new_tokens,
                      holdout_trained, log=lambda m: print(m, flush=True))
    result.update(checkpoint=str(args.checkpoint), device=str(model.device), quantize=model.config.quantize,
                  compute_dtype=model.config.compute_dtype,
                  seconds=round(time.time() - t0, 1))
    report(result, args.out or folder / f"eval_{args.split}.json", plot, table)
    return result


def report(result: dict, out: Path, plot_to, tabulate) -> None:
    """The figures as JSON at `out`, plotted beside it (`plot_to(result, path)`), and as a printed table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot_to(result, out.with_suffix(".png"))
    print(tabulate(result))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
