"""ESPER: align images to the frozen LM by reinforcement learning from CLIP similarity, with no captions.

    python -m model.training.esper --out runs/esper-shapes              # the shapes world's images, no captions
    python -m model.training.esper --out runs/mine --images photos/     # a folder of images of your own
    python -m model.training.esper --out runs/esper-shapes --resume     # continue after an interruption
    python -m model.training.esper --out runs/esper-more --init runs/esper-shapes   # go further, a later session

The policy is the input mapping (CLIP features -> the LM input tokens of an image, region tokens included);
the LM, CLIP and every other weight stay frozen. One step:

    prompts    B images, each with an instruction ("Describe the image.") and an opening of the reply ("The
               image shows"), both drawn at random
    rollouts   G replies per image of exactly `length` tokens, sampled at `temperature` with EOS and `[RET]`
               masked and no token trigram repeated                                   ids (B * G, length)
    reward     the judge's cosine(image, opening + reply), standardised by the mean and spread the untrained
               policy scores (measured in the warm-up), minus the reply's share of repeated trigrams (of words
               and marks: a loop of lines holding only "*" repeats too) and minus how far its NLL under the
               text-only LM exceeds `unlikely_nll`                                    (B, G)
    loss       RLOO: a reply's advantage is its reward minus the mean of the other G - 1 of its image; the
               policy gradient of the sampled tokens' log-probabilities, plus `kl` times the per-token KL from
               the policy to the text-only LM (the same prompt without the image) over the whole vocabulary
    warm-up    the first `warmup_steps` steps train the KL term alone and measure the reward's scale

With `--candidates K` the reply's first token is summed over rather than sampled (`candidates_loss`): the
policy's K likeliest first tokens, each continued greedily, are all scored, and the loss is the exact expected
reward over them. For openings that end where the image's words go ("I see a bright"), it finds the colour the
judge rewards every step, where a few samples mostly miss it: the first stage of a curriculum that a sampled
run (`--init` its checkpoint) continues towards free descriptions. With `--candidate-positions P` the same sum
is taken at each of the reply's first P positions, after the policy's greedy tokens before it: the word after
the colour (the shape) learns too. `--candidates-target optimum` trains towards the objective's optimum over
the candidates rather than up its gradient (an unlikely right word learns as fast as a likely one), and
`--whole-words` judges a one-token reply as the word it begins (" hex" as " hexagon"). With `--may-end`, EOS is a
candidate after the first position and a reply it ends is judged as it stands: a description learns where to
stop, where going on would add words that name nothing or name things twice; with `--sentence-end` the end offered
is a full stop and EOS together, as a sentence ends (a bare EOS mid-sentence is text the LM finds very unlikely). With
`--proposals M` each image's M words that the judge proposes are candidates too (`words.WordProposals`): words the
LM would rarely say where they go (" hex" after "The image is a dark orange") can be learnt. With `--place P`
(repeated) the greedy reply's first sentence may end at its full stop or go on with each place phrase P and end
after it, all judged and learnt as whole phrases (`place_loss`): where the object is.

The judge reads each reply's words once (`degeneracy.each_word_once`): CLIP scores a loop above the sentence it
repeats, so a loop must gain nothing from it. With `--first-sentence` it reads only up to the reply's first
sentence's end, and a candidate's greedy continuation is decoded as the app decodes it, loops included (and with
`--may-end` ending where the policy says EOS), so that going on past a good sentence costs its repetition, a loop of
word-less lines as a loop of words, and ending there pays. A CLIP also scores a thing named twice
("a triangle with a white triangle") above the same thing named once; `--repeat-cost` charges each word naming
something that the judge reads again, and `--after-cost` each word naming something after the first sentence,
which the judge does not read and a user does.

The judge decides what can be learnt: the demo's own CLIP read only the shapes world's grammar and scores words
outside it at random, so for ESPER's open vocabulary `model.training.train_judge` first teaches its text tower
that such words name nothing (`--judge local-dir:runs/judge`).

The mapping starts quiet (`quiet_start`): every image token is the LM's newline token plus a small image-dependent
part, so the first prefix barely disturbs the LM (ESPER scaled its mapper's input down likewise).

Nothing here reads a caption: images come from `ShapesImages` (scenes drawn, never described) or `ImageFolder`.
Why not trl: its GRPO/RLOO/PPO trainers optimise a causal LM's own weights from text prompts; here the policy
is a mapping whose output is spliced into the LM's input embeddings, which they cannot feed. The loop is
small; the optimiser, schedule and resumable state are the supervised trainer's.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm
from transformers import DynamicCache, NoRepeatNGramLogitsProcessor

from model.checkpoint import read_checkpoint, resolve
from model.config import PROJECTORS, GroundedConfig
from model.grounded import GroundedLM
from model.lm import COMPUTE_DTYPES, QUANTIZE_CHOICES, compute_dtype_name, dequantized
from model.prompt import Segment, Turn, render
from model.training.clip_judge import ClipJudge, Judge
from model.training.conversations import INSTRUCTIONS
from model.training.degeneracy import (UNLIKELY_NLL, each_word_once, first_sentence, is_degenerate,
                                       named_after_first_sentence, repeated_words, repetition)
from model.training.evaluate import greedy_replies, padded, reply_logits
from model.training.optimization import param_groups, schedule_step
from model.training.plots import plot_batches, plt, save_figure
from model.training.train import (CURVE_NAME, DEMO, SUMMARY_NAME, TRAIN_SCENES, VAL_SCENES, conclude, load_state,
                                  mean_tail, per_step, run_folders, save_state)
from model.training.train_clip import resolve_device
from model.training.words import WordProposals, offer, whole_words
from model.world.data import ImageFolder, ShapesImages

CANDIDATES_TARGETS = ("expected", "optimum")
OPENINGS = ("", "The image shows a", "I see a", "There is a", "A picture of a")
"""How a sampled reply may begin (ESPER's sentence openings): the judge scores the opening and the reply."""
POLICY = ("input_mapping.", "region_mapping.", "region_positions")
NEG = -1e4
"""Logit of a masked token: finite, so the KL's 0 * log 0 terms stay 0."""
SAMPLES_NAME = "samples.txt"
UNTRAINED_NAME = "untrained"
SAMPLES_FIGURE = "samples.png"
RESUME_KEYS = ("lm", "visual", "visual_pretrained", "n_visual_tokens", "region_grid", "projector", "images",
               "holdout", "init", "judge", "quantize", "batch_size", "group", "length", "temperature", "lr", "kl",
               "warmup_steps", "unlikely_nll", "quiet", "instruction", "opening", "seed", "candidates",
               "candidate_positions", "candidates_target", "whole_words", "may_end", "sentence_end", "first_sentence",
               "repeat_cost", "after_cost", "proposals", "place")


def quiet_start(model: GroundedLM, scale: float) -> None:
    """Each image token starts as the LM's own newline token plus `scale` times the mapping's output: a token
    that barely disturbs the LM (measured on SmolLM2, KL to the text-only LM per reply token: 0.019 from a
    newline, 0.088 from zeros, 0.34 from the mean embedding), still telling images apart."""
    newline = model.tokenizer.encode("\n", add_special_tokens=False)[-1]
    centre = model.lm.get_input_embeddings().weight.detach().float()[newline]               # (lm_dim,)
    with torch.no_grad():
        for mapping, n_tokens in ((model.input_mapping, model.config.n_visual_tokens),
                                  (model.region_mapping, model.config.tokens_per_cell)):
            if mapping is None:
                continue
            last = mapping if isinstance(mapping, nn.Linear) else mapping[-1]
            last.weight.mul_(scale)
            last.bias.copy_(centre.repeat(n_tokens))


def masked(logits: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """Logits (..., V') with the `banned` ids (EOS, `[RET]`) and any -inf column at NEG."""
    return logits.index_fill(-1, banned, NEG).clamp(min=NEG)


@dataclass
class Prompts:
    """B prompts, each for one image: with the image (the policy's) and without it (the text-only LM's)."""
    openings: list[str]
    with_image: list[list[Segment]]
    text_only: list[list[Segment]]


def make_prompts(model: GroundedLM, images: list[Image.Image], rng: random.Random, instructions: list[str],
                 openings_to_draw: list[str]) -> Prompts:
    """Each image with a random instruction and opening, rendered as the app renders a chat turn."""
    tokenizer, fmt = model.tokenizer, model.config.prompt_format
    openings, with_image, text_only = [], [], []
    for image in images:
        instruction, opening = rng.choice(instructions), rng.choice(openings_to_draw)
        opened = [tokenizer.encode(opening, add_special_tokens=False)] if opening else []
        openings.append(opening)
        with_image.append(render([Turn("user", [image, instruction])], tokenizer, fmt) + opened)
        text_only.append(render([Turn("user", [instruction])], tokenizer, fmt) + opened)
    return Prompts(openings, with_image, text_only)


@torch.no_grad()
def sample_replies(model: GroundedLM, rows: list[torch.Tensor], prefix: list[int], repeats: int, length: int,
                   temperature: float, banned: torch.Tensor, generator: torch.Generator | None,
                   forced: torch.Tensor | None = None) -> torch.Tensor:
    """Prompts as the token ids they all open with and embeddings of the rest (T_i, lm_dim) -> `repeats` replies
    per prompt of exactly `length` tokens (N * repeats, length): each prompt read once (the opening once for
    all), its KV cache repeated, then one forward per token for every reply. Sampled at `temperature`, with no
    token trigram said twice (a sample should explore, not loop); greedy at 0, as the app decodes, loops included,
    so that a candidate's continuation is judged as a user would read it. `forced` (N * repeats, F): the replies'
    first F tokens, given where >= 0 rather than chosen."""
    n = len(rows)
    hidden, cache, mask, positions = read_prompts(model, rows, prefix)
    if length > 1:  # the cache serves the second token on: a reply of one token needs no copies of it
        cache.batch_repeat_interleave(repeats)
    mask, positions = mask.repeat_interleave(repeats, 0), positions[:, -1:].repeat_interleave(repeats, 0)
    hidden = hidden[:, -1].repeat_interleave(repeats, 0)                                    # (N * repeats, lm_dim)
    no_repeat = NoRepeatNGramLogitsProcessor(3)
    ids = torch.zeros(n * repeats, 0, dtype=torch.long, device=model.device)
    for step in range(length):
        logits = masked(model.logits(hidden), banned)                                      # (N * repeats, V')
        token = (logits.argmax(-1, keepdim=True) if temperature == 0 else
                 torch.multinomial((no_repeat(ids, logits) / temperature).softmax(-1), 1, generator=generator))
        if forced is not None and step < forced.shape[1]:
            token = torch.where(forced[:, step:step + 1] >= 0, forced[:, step:step + 1], token)
        ids = torch.cat([ids, token], 1)
        if step == length - 1:
            break
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
        positions = positions + 1
        out = model.lm.base_model(inputs_embeds=model.embed_ids(token), attention_mask=mask, position_ids=positions,
                                  past_key_values=cache, use_cache=True)
        cache, hidden = out.past_key_values, out.last_hidden_state[:, -1]
    return ids


def read_prompts(model: GroundedLM, rows: list[torch.Tensor], prefix: list[int]
                 ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor]:
    """Rows of embeddings (T_i, lm_dim) after the token ids `prefix` they all open with (read once for all),
    left-padded so that they end together, in one forward: their hidden states (N, T, lm_dim), the KV cache, the
    attention mask (N, P + T) and their position ids (N, T), which skip the padding."""
    n = len(rows)
    inputs, mask = padded(rows, "left")                                                     # (N, T, lm_dim), (N, T)
    cache = model.run_prefix(prefix, n)[1] if prefix else DynamicCache()
    mask = torch.cat([mask.new_ones(n, len(prefix)), mask], 1)                              # (N, P + T)
    positions = (mask.cumsum(1) - 1).clamp(min=0)[:, len(prefix):]
    hidden, cache = model.hidden_states(inputs, mask, cache, positions)
    return hidden, cache, mask, positions


@dataclass
class StepResult:
    loss: torch.Tensor
    clip: torch.Tensor
    """(N,) the judge's cosine for each reply scored."""
    weights: torch.Tensor
    """(N,) each reply's share in its image's expectation under the policy: 1/G for samples, its probability among
    the K for candidates (so curves report what the policy expects, not what the candidates average)."""
    reward: torch.Tensor
    kl: float
    nll: torch.Tensor
    """(N,) each reply's NLL per token under the text-only LM (candidates: its first token's)."""
    texts: list[str]
    place_best: float | None = None
    """`--place`: the policy's share, among the end and the place phrases, of the one the judge prefers."""

    def expected(self, values: torch.Tensor | list[float]) -> float:
        """The batch's mean of a per-reply quantity (N,) under the policy."""
        return float((self.weights * torch.as_tensor(values, dtype=self.weights.dtype)).sum() / self.weights.sum())


@dataclass
class Rollouts:
    """A batch's prompts as the policy and the text-only LM read them, after their shared opening `prefix`."""
    prompts: Prompts
    prefix: list[int]
    policy: list[torch.Tensor]
    """B rows of embeddings (T_i, lm_dim), with gradient to the mapping."""
    text_only: list[torch.Tensor]
    banned: torch.Tensor
    """Token ids a reply never has: EOS and `[RET]`."""


def prepare(model: GroundedLM, images: list[Image.Image], rng: random.Random, args: argparse.Namespace) -> Rollouts:
    prompts = make_prompts(model, images, rng, args.instruction or list(INSTRUCTIONS), args.opening or list(OPENINGS))
    banned = torch.tensor(sorted(model.eos_ids | {model.ret_id}), device=model.device)
    model.visual_features(images)  # one batched CLIP pass; embedding the prompts finds them cached
    # the system prompt and the user's header open every prompt: their keys and values are computed once
    prefix = model.shared_prefix(prompts.with_image + prompts.text_only)

    def rest(prompt: list[Segment]) -> list[Segment]:
        if not prefix:
            return prompt
        return ([prompt[0][len(prefix):]] if len(prompt[0]) > len(prefix) else []) + prompt[1:]
    with torch.no_grad():
        text_only = [model.embed_segments(rest(prompt)) for prompt in prompts.text_only]
    return Rollouts(prompts, prefix, [model.embed_segments(rest(prompt)) for prompt in prompts.with_image], text_only,
                    banned)


def texts_of(model: GroundedLM, openings: list[str], ids: torch.Tensor) -> list[str]:
    """What the judge reads: each reply (N * R, L) after its prompt's opening (N of them, R replies each), up to
    its end (a candidate EOS, `--may-end`)."""
    repeats = len(ids) // len(openings)
    ended = [next((i for i, t in enumerate(reply) if t in model.eos_ids), len(reply)) for reply in ids.tolist()]
    return [opening + model.tokenizer.decode(reply[:end], skip_special_tokens=True)
            for opening, reply, end in zip([o for o in openings for _ in range(repeats)], ids, ended)]


def read_by_judge(text: str, first_sentence_only: bool) -> str:
    """The part of a reply the judge reads: all of it, or with `first_sentence_only` up to its first sentence's
    end."""
    return first_sentence(text) if first_sentence_only else text


def judged(judge: Judge, seen: torch.Tensor, texts: list[str], first_sentence_only: bool) -> torch.Tensor:
    """The judge's cosine (N * R,) of each reply with its image (the judge's embeddings of N images (N, D), R
    replies each, in order), each word read once: a loop gains nothing from the judge."""
    embeddings = seen.repeat_interleave(len(texts) // len(seen), 0)
    return judge.similarity(embeddings, [each_word_once(read_by_judge(t, first_sentence_only)) for t in texts])


def shaped_reward(clip: torch.Tensor, texts: list[str], nll: torch.Tensor, baseline: tuple[float, float],
                  args: argparse.Namespace) -> torch.Tensor:
    """The judge's cosines (N,) standardised by the untrained policy's (mean, spread), less each reply's
    repeated-trigram share, how far its NLL under the text-only LM exceeds `unlikely_nll`, `repeat_cost` for
    each word naming something that the judge reads again (`degeneracy.repeated_words`), and `after_cost` for each
    word naming something after the first sentence (`degeneracy.named_after_first_sentence`)."""
    penalty = torch.tensor([repetition(t) + args.repeat_cost * repeated_words(read_by_judge(t, args.first_sentence))
                            + args.after_cost * named_after_first_sentence(t) for t in texts], device=clip.device)
    return (clip - baseline[0]) / baseline[1] - penalty - (nll - args.unlikely_nll).clamp(min=0)


def esper_loss(model: GroundedLM, judge: Judge, images: list[Image.Image], rng: random.Random,
               generator: torch.Generator, args: argparse.Namespace, baseline: tuple[float, float] | None
               ) -> StepResult:
    """One batch of rollouts and its loss (settings from the command line's `args`); `baseline` (mean, std of
    the untrained policy's cosine) None in the warm-up, where only the KL term trains."""
    group, length, temperature = args.group, args.length, args.temperature
    batch = prepare(model, images, rng, args)
    ids = sample_replies(model, [row.detach() for row in batch.policy], batch.prefix, group, length, temperature,
                         batch.banned, generator)                                           # (B * G, L)
    texts = texts_of(model, batch.prompts.openings, ids)

    def each(rows: list[torch.Tensor]) -> list[torch.Tensor]:
        return [row for row in rows for _ in range(group)]
    logits = masked(torch.stack(reply_logits(model, each(batch.policy), list(ids), batch.prefix)), batch.banned)
    with torch.no_grad():                                                                   # (B * G, L, V')
        ref_logp = masked(torch.stack(reply_logits(model, each(batch.text_only), list(ids), batch.prefix)),
                          batch.banned).log_softmax(-1)
        nll = -ref_logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1).mean(1)                   # (B * G,)
        clip = judged(judge, judge.image_embeddings(images), texts, args.first_sentence)   # (B * G,)
    logp = logits.log_softmax(-1)
    kl = (logp.exp() * (logp - ref_logp)).sum(-1).mean()                                    # per token
    loss = args.kl * kl
    reward = torch.zeros_like(clip)
    if baseline is not None:
        reward = shaped_reward(clip, texts, nll, baseline, args)
        grouped = reward.view(-1, group)                                                    # (B, G)
        advantage = grouped - (grouped.sum(1, keepdim=True) - grouped) / (group - 1)       # leave one out
        sampled = (logits / temperature).log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (B * G, L)
        loss = loss - (advantage.flatten() * sampled.sum(1)).mean() / length
    return StepResult(loss, clip, torch.full_like(clip, 1 / group), reward, kl.item(), nll, texts)


def candidates_loss(model: GroundedLM, judge: Judge, images: list[Image.Image], rng: random.Random,
                    generator: torch.Generator, args: argparse.Namespace, baseline: tuple[float, float] | None,
                    proposals: WordProposals | None = None) -> StepResult:
    """ESPER's objective with a reply's tokens summed over instead of sampled, at each of its first P positions
    (`--candidate-positions`): at position j, after the policy's greedy tokens before it, the policy's K most
    likely tokens each continue greedily to `length` tokens and are all scored, and the loss is minus the
    expected reward over them, sum_k p_k (r_k - b) with b their probability-weighted mean reward, averaged over
    the P positions. Exact where sampling is noisy: when the LM rarely says the words the judge rewards (a colour
    after "I see a bright"), G samples mostly miss them, while the top K hold them every step; a later position
    learns the word after the one the policy now says (the shape after the colour). Only these P tokens train;
    the KL term is exact at them.

    The expectation's gradient for a token is its probability times its advantage, so a right word the LM finds
    unlikely (" star" at 0.1% after "The shape is a") barely moves. `--candidates-target optimum` asks instead
    for the distribution that maximises expected reward less `kl` times the KL to the text-only LM, restricted to
    the K candidates: q_k ~ p_ref(k) exp(r_k / kl), exact since every candidate is scored; the loss is the
    cross-entropy from q to the policy among the K (its mass outside them, which no reward speaks for, is left
    alone), whose gradient for a token (p_k - q_k, p renormalised over the K) does not shrink with its probability
    (with `kl` 0, q is the best candidate alone).

    `--may-end`: after the first position, EOS is always a candidate (in place of the K-th likeliest token where it
    is not among the K), its reply judged as it stands; the policy's greedy tokens before a position are still the
    ones it says when it goes on, and a candidate's continuation may end where the policy ends it, as the app's
    reply does (with EOS masked there, every continuation ran to `length`: after "The image is a white star." a
    loop, whatever the policy had learnt of the end). `--sentence-end`: the end offered is a full stop and EOS
    together (EOS alone where the greedy text before already ends in one), and any full stop among the candidates
    ends its reply so: after "The image is a black circle" the text-only LM's EOS has NLL 17.7 (charged as
    unlikely), a full stop 5.2 and EOS after it 2.3, so a bare end is a description cut short and the sentence's end
    is how one stops (its NLL charged is the full stop's, as a candidate's is its first token's). It also trains one
    position more (`trained_positions`): the one after the greedy reply's first full stop, where the description
    ends or goes on.

    `--proposals M` (`proposals`): at every position each image's M words that the judge proposes
    (`words.WordProposals`) are candidates too, in place of the policy's M least likely (the end, where one is
    offered, stays): a word the LM would rarely say there (" hex" after "The image is a dark orange") is scored and
    learnt where the judge prefers it."""
    k, eos, stop = args.candidates, model.tokenizer.eos_token_id, full_stop(model)
    batch = prepare(model, images, rng, args)
    greedy = sample_replies(model, [row.detach() for row in batch.policy], batch.prefix, 1,
                            args.length if args.sentence_end or args.place else args.candidate_positions, 0.0,
                            batch.banned, None)
    at = trained_positions(greedy, args.candidate_positions, stop if args.sentence_end else None)  # (B, P')
    ret_only = batch.banned[batch.banned == model.ret_id]  # banned where a reply may end: `[RET]`, not EOS

    def candidate_logp(rows: list[torch.Tensor]) -> torch.Tensor:
        """(B, P', V') log-probabilities at the positions trained; with `--may-end` EOS is a candidate after the
        first."""
        logits = torch.stack(reply_logits(model, rows, list(greedy[:, :at.max() + 1]), batch.prefix))
        logits = logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))
        if not args.may_end:
            return masked(logits, batch.banned).log_softmax(-1)
        return torch.cat([masked(logits[:, :1], batch.banned),
                          masked(logits[:, 1:], ret_only)], 1).log_softmax(-1)
    logp = candidate_logp(batch.policy)
    with torch.no_grad():
        ref_logp = candidate_logp(batch.text_only)
    kl = (logp.exp() * (logp - ref_logp)).sum(-1).mean()
    top = logp.detach().topk(k, -1).indices                                                 # (B, P', K)
    if args.may_end:  # the end is a candidate after the first position, in place of the K-th where it is not one
        end = torch.full_like(at[:, 1:], eos)                                               # (B, P' - 1)
        if args.sentence_end:
            end = torch.where(greedy.gather(1, at[:, 1:] - 1) == stop, end, stop)
        later = top[:, 1:]
        later[..., -1] = torch.where((later == end[..., None]).any(-1), later[..., -1], end)
    with torch.no_grad():
        seen = judge.image_embeddings(images)                    # (B, D): once a step, for the proposals and the reward
    if proposals is not None:
        top = offer(top, proposals.propose(seen, args.proposals), k - 1 if args.may_end else k)
    if args.length == 1:  # one-token replies are the candidates themselves
        ids = top.reshape(-1, 1)                                                            # (B * K, 1)
    else:  # each candidate after the greedy tokens before its position; a full stop ends its reply
        said = torch.nn.functional.pad(greedy, (0, 1), value=-1)[:, None, None]             # (B, 1, 1, F)
        column = torch.arange(said.shape[-1], device=model.device)                          # (F,)
        position = at[..., None, None]                                                      # (B, P', 1, 1)
        forced = torch.where(column < position, said, -1)                                  # (B, P', 1, F)
        forced = torch.where(column == position, top[..., None], forced)                   # (B, P', K, F)
        if args.sentence_end:
            forced = torch.where((column == position + 1) & (position > 0) & (top[..., None] == stop), eos, forced)
        ids = sample_replies(model, [row.detach() for row in batch.policy], batch.prefix, at.shape[1] * k, args.length,
                             0.0, ret_only if args.may_end else batch.banned, None, forced=forced.flatten(0, 2))
        # (B * P' * K, L): with --may-end a continuation ends where the policy ends it, as the app's reply does
    texts = ([opening + word for b, opening in enumerate(batch.prompts.openings)
              for word in whole_words(model, opening, top[b, 0].tolist())] if args.whole_words else
             texts_of(model, batch.prompts.openings, ids))
    with torch.no_grad():
        clip = judged(judge, seen, texts, args.first_sentence)                             # (B * P' * K,)
        nll = -ref_logp.gather(-1, top).flatten()                                           # (B * P' * K,)
    weights = logp.detach().gather(-1, top).softmax(-1)                                    # (B, P', K)
    loss = args.kl * kl
    reward = torch.zeros_like(clip)
    if baseline is not None:
        reward = shaped_reward(clip, texts, nll, baseline, args)
        loss = candidates_objective(logp.gather(-1, top), ref_logp.gather(-1, top), reward.view(-1, at.shape[1], k),
                                    loss, args)
    placed = None
    if args.place:  # one position more, weighed as each of the P' is
        place, placed = place_loss(model, judge, batch, greedy, seen, args, baseline)
        loss = (loss * at.shape[1] + place) / (at.shape[1] + 1)
    return StepResult(loss, clip, weights.flatten(), reward, kl.item(), nll, texts, placed)


def candidates_objective(logp: torch.Tensor, ref_logp: torch.Tensor, reward: torch.Tensor, kl_term: torch.Tensor,
                         args: argparse.Namespace) -> torch.Tensor:
    """The loss over candidates that are all scored: their log-probabilities under the policy and the text-only
    LM and their rewards (..., K). `--candidates-target expected`: minus the expected reward over them, with the
    `kl_term` beside it; `optimum`: the cross-entropy towards p_ref * exp(reward / kl) over them, which holds the
    KL already."""
    if args.candidates_target == "expected":
        p = logp.exp()
        weights = p.detach() / p.detach().sum(-1, keepdim=True)
        return kl_term - (p * (reward - (weights * reward).sum(-1, keepdim=True))).sum(-1).mean()
    target = ((ref_logp + reward / args.kl).softmax(-1) if args.kl > 0 else
              torch.nn.functional.one_hot(reward.argmax(-1), reward.shape[-1]).to(reward.dtype))  # (..., K)
    return -(target * logp.log_softmax(-1)).sum(-1).mean()


def place_loss(model: GroundedLM, judge: Judge, batch: Rollouts, greedy: torch.Tensor, seen: torch.Tensor,
               args: argparse.Namespace, baseline: tuple[float, float] | None) -> tuple[torch.Tensor, float]:
    """`--place`: where each greedy reply's first sentence ends (`where_the_place_goes`), the sentence may end
    there or go on with one of the place phrases and end after it: "The image is a white triangle." against "The
    image is a white triangle at the top." and the rest. All C = 1 + places are judged; each is one candidate whose
    log-probability is its tokens' (the phrase and the full stop), and the loss over them is
    `candidates_objective`'s (B, C), weighed in the step as one trained position more. Why whole phrases: a place
    judged where the object is named already is worth a little (the shipped judge: right place 0.126, none 0.109, a
    wrong one 0.074), and judged alone in a slot it is worth less than the object named there instead, so a slot for
    the place taught the object; and the policy's own greedy continuation after " at" names the right place too
    seldom for " at" to beat the full stop. Returns the loss (0 in the warm-up) and the policy's share, among the C,
    of the one the judge prefers (the batch's mean)."""
    stop, said = full_stop(model), greedy.tolist()
    places = [model.tokenizer.encode(" " + place, add_special_tokens=False) for place in args.place]
    ends = [where_the_place_goes(reply, stop, places) for reply in said]                   # (B,)
    options = [[stop]] + [place + [stop] for place in places]
    c = len(options)
    ret_only = batch.banned[batch.banned == model.ret_id]
    logp = option_logprobs(model, batch.policy, batch.prefix, greedy, ends, options, ret_only)  # (B, C)
    with torch.no_grad():
        ref = option_logprobs(model, batch.text_only, batch.prefix, greedy, ends, options, ret_only)
        nll = (-ref / torch.tensor([len(o) for o in options], device=model.device)).flatten()  # (B * C,) per token
        texts = [opening + model.tokenizer.decode(reply[:end] + option, skip_special_tokens=True)
                 for opening, reply, end in zip(batch.prompts.openings, said, ends) for option in options]
        clip = judged(judge, seen, texts, args.first_sentence)                             # (B * C,)
        reward = (shaped_reward(clip, texts, nll, baseline, args) if baseline is not None else clip).view(-1, c)
    loss = (candidates_objective(logp, ref, reward, torch.zeros(()), args) if baseline is not None
            else torch.zeros(()))
    best = logp.detach().softmax(-1).gather(-1, reward.argmax(-1, keepdim=True))           # (B, 1)
    return loss, best.mean().item()


def trained_positions(greedy: torch.Tensor, positions: int, stop: int | None) -> torch.Tensor:
    """The reply positions (B, P') whose candidates train, given the policy's greedy replies (B, L): the first
    `positions`, and with a full stop's token `stop` one more: the position after the greedy reply's first full
    stop where it lies beyond them, else the next. That is where a description ends or goes on: SmolLM2 decoding
    greedily went on after "The image is a white star." with a loop of lines holding only "*", a position the
    first 8 do not reach for a sentence of 8 tokens, so the end after it never learnt."""
    first = torch.arange(positions, device=greedy.device).expand(len(greedy), -1)          # (B, P)
    if stop is None:
        return first
    said = greedy[:, :-1] == stop                                                           # (B, L - 1)
    after = said.int().argmax(1) + 1                                                        # (B,)
    late = said.any(1) & (after > positions)
    return torch.cat([first, torch.where(late, after, positions)[:, None]], 1)             # (B, P + 1)


def where_the_place_goes(reply: list[int], stop: int, places: list[list[int]]) -> int:
    """The position in a greedy reply where a place may end its first sentence: its first full stop (its end where
    it has none), or the start of the place phrase the sentence already ends with, which the options then replace
    (so that places are chosen, never stacked: "a white triangle on the left at the top.")."""
    end = reply.index(stop) if stop in reply else len(reply)
    said = next((place for place in places if reply[max(0, end - len(place)):end] == place), [])
    return end - len(said)


def option_logprobs(model: GroundedLM, rows: list[torch.Tensor], prefix: list[int], greedy: torch.Tensor,
                    ends: list[int], options: list[list[int]], banned: torch.Tensor) -> torch.Tensor:
    """(B, C) the log-probability of each option's tokens (C of them) after each prompt (B rows of embeddings after
    the shared `prefix`) and its greedy reply's first `ends[b]` tokens, with `banned` ids masked: each prompt and
    sentence read once, its KV cache repeated for the C options (as `reply_logits` on every pair would give, at
    about a sixth of the cost for six options)."""
    c = len(options)
    option_ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(o, device=model.device) for o in options],
                                                 batch_first=True)                          # (C, T)
    option_mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(o), dtype=torch.long, device=model.device)
                                                   for o in options], batch_first=True)     # (C, T)
    sentences = [torch.cat([row, model.embed_ids(greedy[b, :end])]) for b, (row, end) in enumerate(zip(rows, ends))]
    hidden, cache, mask, positions = read_prompts(model, sentences, prefix)                 # (B, S, lm_dim), ...
    cache.batch_repeat_interleave(c)
    ids, kept = option_ids.repeat(len(rows), 1), option_mask.repeat(len(rows), 1)          # (B * C, T)
    mask = torch.cat([mask.repeat_interleave(c, 0), kept], 1)
    positions = positions[:, -1:].repeat_interleave(c, 0) + 1 + torch.arange(ids.shape[1], device=model.device)
    after, _ = model.hidden_states(model.embed_ids(ids), mask, cache, positions)            # (B * C, T, lm_dim)
    before = torch.cat([hidden[:, -1:].repeat_interleave(c, 0), after[:, :-1]], 1)         # predicts each token
    logp = masked(model.logits(before), banned).log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    return (logp * kept).sum(-1).view(len(rows), c)


def full_stop(model: GroundedLM) -> int:
    """The LM's token for a sentence's full stop."""
    return model.tokenizer.convert_tokens_to_ids(".")


@torch.no_grad()
def describe(model: GroundedLM, judge: Judge, images: list[Image.Image], max_new_tokens: int = 32
             ) -> tuple[list[str], torch.Tensor]:
    """Greedy replies to "Describe the image." and the judge's cosine for each (N,): how the app would answer."""
    replies = greedy_replies(model, [[Turn("user", [im, INSTRUCTIONS[0]])] for im in images], max_new_tokens)
    texts = [r.text for r in replies]
    return texts, judge.similarity(judge.image_embeddings(images), texts)


def new_history() -> dict[str, list]:
    return {"step": [], "clip": [], "clip_spread": [], "reward": [], "kl": [], "degenerate": [], "repetition": [], "nll": [],
            "lr": [], "val_step": [], "val_clip": [], "val_repetition": [], "baseline": []}


def plot_curves(history: dict, path: Path, warmup_steps: int) -> None:
    panels = (("clip", "CLIP cosine(image, reply), policy's mean"), ("kl", "KL to the text-only LM, per token"),
              ("degenerate", "degenerate replies (policy's share)"), ("reward", "shaped reward (after warm-up)"))
    if history.get("place_best"):
        panels += (("place_best", "--place: policy's share of the judge's\nchoice among the end and the places"),)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8))
    for ax, (key, title) in zip(axes, panels):
        plot_batches(ax, history["step"], history[key])
        ax.axvline(warmup_steps, color="grey", linestyle=":", label="end of warm-up")
        ax.set(xlabel="step", title=title)
    axes[0].plot(history["val_step"], history["val_clip"], marker="o", color="tab:orange", label="greedy, validation")
    axes[2].plot(history["val_step"], history["val_repetition"], marker="o", color="tab:orange",
                 label="greedy repetition, validation")
    for ax in axes:
        ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_samples(images: list[Image.Image], texts: list[str], step: int, path: Path) -> None:
    """The validation images with the model's greedy descriptions, as of `step`."""
    fig, axes = plt.subplots(2, len(images) // 2, figsize=(2.6 * len(images) // 2, 6.2))
    for ax, image, text in zip(axes.flat, images, texts):
        ax.imshow(image)
        ax.set_axis_off()
        ax.set_title("\n".join(text[i:i + 28] for i in range(0, min(len(text), 84), 28)), fontsize=8)
    fig.suptitle(f"ESPER, step {step}: \"Describe the image.\" (greedy; no caption was ever seen)")
    save_figure(fig, path)


def build_model(args: argparse.Namespace, device: torch.device) -> tuple[GroundedLM, list[float] | None]:
    """The model to train, never retrieving, and the reward scale it inherits (None: to be measured). `--init`
    an ESPER checkpoint (no caption seen): continue from its mappings and, under the same judge, its untrained
    policy's reward scale, the way a later session goes further (under another judge the scale is measured
    again). Any other checkpoint lends only its LM, encoder and token layout: its mappings saw captions. Without
    `--init`: fresh quiet mappings."""
    if args.init:
        folder = resolve(args.init)
        named, _ = read_checkpoint(folder)
        args.lm, args.visual, args.visual_pretrained = named.lm, named.visual, named.visual_pretrained
        args.n_visual_tokens, args.region_grid, args.projector = (named.n_visual_tokens, named.region_grid,
                                                                  named.projector)
        summary = json.loads((folder / SUMMARY_NAME).read_text()) if (folder / SUMMARY_NAME).is_file() else {}
        if not named.retrieves and summary.get("captions_seen") == 0:
            model = GroundedLM.from_pretrained(folder, quantize=args.quantize, device=device,
                                               compute_dtype=compute_dtype_name(device, args.compute_dtype))
            same_judge = summary.get("options", {}).get("judge") == args.judge
            return model, summary.get("baseline") if same_judge else None
    config = GroundedConfig(lm=args.lm, visual=args.visual, visual_pretrained=args.visual_pretrained,
                            n_visual_tokens=args.n_visual_tokens, region_grid=args.region_grid,
                            projector=args.projector, retrieves=False)
    model = GroundedLM(config, quantize=args.quantize, device=device, compute_dtype=args.compute_dtype)
    quiet_start(model, args.quiet)
    return model, None


def image_source(args: argparse.Namespace, image_size: int) -> tuple[Dataset, Dataset]:
    """(train, validation) images: a folder's (its last 8 images validate) or the shapes world's splits."""
    if args.images is None:
        return (ShapesImages("train", TRAIN_SCENES, image_size, args.holdout),
                ShapesImages("val", VAL_SCENES, image_size, args.holdout))
    folder = ImageFolder(args.images)
    if folder.skipped:
        print(f"{args.images}: {len(folder)} images, {len(folder.skipped)} files skipped:", flush=True)
        for path, reason in folder.skipped[:10]:
            print(f"    {path}: {reason}", flush=True)
    if len(folder) < 16:
        raise SystemExit(f"{args.images} has {len(folder)} readable images: ESPER needs at least 16")
    return torch.utils.data.Subset(folder, range(len(folder) - 8)), torch.utils.data.Subset(
        folder, range(len(folder) - 8, len(folder)))


def train(args: argparse.Namespace, judge: Judge | None = None) -> dict:
    """Train (or resume), validate and save periodically, export the checkpoint; returns the summary. `judge`
    replaces the CLIP named by --judge or the checkpoint (a toy reward in tests)."""
    if args.group < 2 or args.batch_size < 1 or args.steps < 1 or args.length < 1:
        raise ValueError("--group must be at least 2 (the baseline leaves one out); --batch-size, --steps and "
                         "--length positive")
    device = resolve_device(args.device)
    out_dir, run_dir, state_path = run_folders(args)

    torch.manual_seed(args.seed)
    model, inherited_baseline = build_model(args, device)
    args.compute_dtype = model.config.compute_dtype
    for name, p in model.named_parameters():
        if not name.startswith(("lm.", "visual.")):
            p.requires_grad_(name.startswith(POLICY))
    if args.quantize == "4bit":
        model.lm = dequantized(model.lm)
    judge = judge or ClipJudge(*(args.judge, None) if args.judge else (model.config.visual,
                                                                       model.config.visual_pretrained), device=device)
    train_images, val_images = image_source(args, model.visual.image_size[0])
    val_set = [val_images[i] for i in range(min(8, len(val_images)))]
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=args.lr, betas=(0.9, 0.98))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    options = {key: getattr(args, key) for key in RESUME_KEYS + ("steps",)}
    history, start, seconds_before = new_history(), 0, 0.0
    history["baseline"] = inherited_baseline or []
    if args.resume:
        weights, meta = load_state(state_path, model.trainable_state_dict(), optimizer, options)
        model.load_state_dict(weights, strict=False)
        history, start, seconds_before = meta["history"], meta["step"], meta["seconds"]
        print(f"resumed {run_dir} at step {start} of {args.steps}", flush=True)
    else:  # the starting point, to compare against (`evaluate --compare untrained=<run-dir>/untrained ...`)
        model.save_pretrained(run_dir / UNTRAINED_NAME)
    proposals = WordProposals(model, judge) if args.proposals and start < args.steps else None  # once a run
    step_loss = partial(candidates_loss, proposals=proposals) if args.candidates else esper_loss
    n_trainable = sum(p.numel() for p in params)
    proposed = f" and {args.proposals} proposed by the judge" if args.proposals else ""
    replies = f"the {args.candidates - args.proposals} likeliest{proposed}" if args.candidates else str(args.group)
    print(f"ESPER: training {n_trainable:,} parameters on {device} (LM {args.lm}, {args.quantize}, "
          f"{args.compute_dtype} compute; visual {args.visual}; judge {judge.source}); images: "
          f"{args.images or 'shapes world (no captions)'}; {args.steps} steps of {args.batch_size} images x "
          f"{replies} replies of {args.length} tokens", flush=True)

    t_start, stopped_early, steps_here = time.time(), False, 0
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="esper", unit="step",
               dynamic_ncols=True)
    for step in bar:
        lr = schedule_step(optimizer, step, args.steps, args.warmup_steps, args.lr)
        rng = random.Random(f"esper:{args.seed}:{step}")
        generator = torch.Generator(device).manual_seed(rng.randrange(2 ** 63))
        images = [train_images[rng.randrange(len(train_images))] for _ in range(args.batch_size)]
        baseline = tuple(history["baseline"]) if history["baseline"] else None
        result = step_loss(model, judge, images, rng, generator, args, baseline)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()

        done, steps_here = step + 1, steps_here + 1
        expected = result.expected
        degenerate = [float(is_degenerate(t, n, args.unlikely_nll)) for t, n in zip(result.texts, result.nll.tolist())]
        for key, value in (("step", done), ("clip", expected(result.clip)), ("reward", expected(result.reward)),
                           ("kl", result.kl), ("degenerate", expected(degenerate)),
                           ("repetition", expected([repetition(t) for t in result.texts])),
                           ("nll", expected(result.nll)), ("lr", lr)):
            history[key].append(value)
        history["clip_spread"].append(result.clip.std().item())
        if result.place_best is not None:
            history.setdefault("place_best", []).append(result.place_best)
        if done == args.warmup_steps and not history["baseline"]:  # the untrained policy's scale: rewards are
            # standardised by it from now on
            history["baseline"] = [mean_tail(history["clip"], done), max(mean_tail(history["clip_spread"], done), 1e-3)]
        elapsed = time.time() - t_start
        bar.set_postfix(clip=f"{history['clip'][-1]:.3f}", kl=f"{result.kl:.3f}",
                        img_s=f"{steps_here * args.batch_size / elapsed:.2f}")
        out_of_time = args.time_limit is not None and elapsed >= args.time_limit * 60
        if done % args.val_every == 0 or done == args.steps:
            texts, scores = describe(model, judge, val_set)
            history["val_step"].append(done)
            history["val_clip"].append(scores.mean().item())
            history["val_repetition"].append(sum(map(repetition, texts)) / len(texts))
            with open(run_dir / SAMPLES_NAME, "a") as f:
                f.write(f"step {done}: greedy, validation images\n" +
                        "".join(f"  {s:.3f}  {t}\n" for s, t in zip(scores.tolist(), texts)))
                f.write(f"step {done}: sampled, this batch\n" +
                        "".join(f"  {c:.3f}  {t}\n" for c, t in zip(result.clip.tolist()[:8], result.texts[:8])))
            plot_samples(val_set, texts, done, run_dir / SAMPLES_FIGURE)
            bar.write(f"step {done}/{args.steps}  clip {mean_tail(history['clip'], args.val_every):.3f}  "
                      f"kl {mean_tail(history['kl'], args.val_every):.3f}  degenerate "
                      f"{mean_tail(history['degenerate'], args.val_every):.2f}  "
                      + (f"place {mean_tail(history['place_best'], args.val_every):.2f}  " if args.place else "")
                      + f"|  val clip {scores.mean():.3f}  "
                      f"e.g. {texts[0]!r}  |  {elapsed / steps_here:.2f} s/step")
        if done % args.val_every == 0 or done == args.steps or out_of_time:
            save_state(state_path, model.trainable_state_dict(), optimizer, done, history, options, seconds_before + time.time() - t_start)
            plot_curves(history, run_dir / CURVE_NAME, args.warmup_steps)
        if out_of_time and done < args.steps:
            stopped_early = True
            break
    bar.close()
    seconds = seconds_before + time.time() - t_start
    summary = {
        "finished": not stopped_early, "step": history["step"][-1] if history["step"] else 0, "options": options,
        "captions_seen": 0, "holdout_kept_out": args.images is None and args.holdout, "device": str(device),
        "quantize": args.quantize, "compute_dtype": args.compute_dtype, "trained_parameters": n_trainable,
        "seconds": round(seconds, 1), "seconds_per_step": per_step(seconds, history["step"]),
        "baseline": history["baseline"] or None,
        "train_clip": mean_tail(history["clip"]), "train_kl": mean_tail(history["kl"]),
        "train_degenerate": mean_tail(history["degenerate"]),
        "val_clip": history["val_clip"][-1] if history["val_clip"] else None,
    }
    conclude(model, run_dir, out_dir, summary, args)
    print(f"samples in {run_dir / SAMPLES_NAME}", flush=True)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--run-dir", help="resumable state, curves and samples (default: runs/<name of --out>)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --run-dir")
    p.add_argument("--images", help="a folder of images (recursive) to align to; default: the shapes world's "
                                    "training images, without their captions")
    p.add_argument("--holdout", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the shapes world's hold-out (shape, colour) pairs out of training")
    p.add_argument("--init", help="continue from this ESPER checkpoint (folder or preset: its mappings and reward "
                                  "scale); another checkpoint lends only its LM, encoder and token layout")
    p.add_argument("--judge", help="open_clip model (name or local-dir:) that scores the replies; default: the "
                                   "checkpoint's own encoder with its text tower")
    p.add_argument("--instruction", action="append", help="what the user asks with each image (repeat for "
                                                          "several; default: the demo's description requests)")
    p.add_argument("--opening", action="append", help="how a reply may begin (repeat for several; \"\" for none; "
                                                      f"default: {', '.join(map(repr, OPENINGS))})")
    p.add_argument("--lm", default=DEMO.lm)
    p.add_argument("--visual", default=DEMO.visual)
    p.add_argument("--visual-pretrained", default=DEMO.visual_pretrained, help="open_clip tag, for a named --visual model")
    p.add_argument("--n-visual-tokens", type=int, default=DEMO.n_visual_tokens)
    p.add_argument("--region-grid", type=int, default=0,
                   help="region tokens (N x N cells) besides the CLS tokens; default none: fewer weights to learn "
                        "from a reward alone, and the CLS feature names one object's shape and colour")
    p.add_argument("--projector", choices=PROJECTORS, default=DEMO.projector)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=8, help="images per step")
    p.add_argument("--group", type=int, default=4, help="replies sampled per image (the leave-one-out baseline)")
    p.add_argument("--length", type=int, default=12, help="tokens per sampled reply")
    p.add_argument("--candidates", type=int, default=0,
                   help="K > 0: sum over the policy's K most likely first tokens of a reply (each continued greedily) "
                        "instead of sampling --group replies; for openings that end where the image's words go")
    p.add_argument("--candidate-positions", type=int, default=1,
                   help="with --candidates: sum over the K likeliest tokens at each of the reply's first P positions, "
                        "after the policy's greedy tokens before it (the shape after the colour)")
    p.add_argument("--candidates-target", choices=CANDIDATES_TARGETS, default="expected",
                   help="with --candidates: what the loss asks of the K tokens: the expected reward over them (its "
                        "gradient for a token scales with the token's probability), or a cross-entropy towards the "
                        "KL-regularised optimum p_ref * exp(reward / kl) over them (an unlikely right word learns as "
                        "fast as a likely one)")
    p.add_argument("--whole-words", action="store_true",
                   help="with --candidates and --length 1: judge each candidate as the whole word it begins (\" hex\" "
                        "as \" hexagon\", completed by the text-only LM)")
    p.add_argument("--may-end", action="store_true",
                   help="with --candidates and --candidate-positions > 1: EOS is among the candidates after the first "
                        "position, and a reply it ends is judged as it stands: a description learns where to stop")
    p.add_argument("--sentence-end", action="store_true",
                   help="with --may-end: the end offered is a full stop and EOS together, and a full stop among the "
                        "candidates ends its reply: a description stops as a sentence does, not cut short; the "
                        "position after the greedy reply's first full stop trains too, where it ends or goes on")
    p.add_argument("--first-sentence", action="store_true",
                   help="the judge reads each reply up to its first sentence's end; what follows costs only its "
                        "repetition: a description gains by ending after one sentence (with --may-end, it can)")
    p.add_argument("--repeat-cost", type=float, default=0.0,
                   help="reward lost for each word naming something that the judge reads again (in the judge's "
                        "standardised units): a CLIP likes a thing named twice, a description of one thing names it once")
    p.add_argument("--after-cost", type=float, default=0.0,
                   help="reward lost for each word naming something after the reply's first sentence (in the judge's "
                        "standardised units): with --first-sentence the judge does not read it, a user does")
    p.add_argument("--proposals", type=int, default=0,
                   help="with --candidates: each image's M words the judge proposes are candidates too, at every "
                        "position, in place of the policy's M least likely: words the LM would rarely say there can be "
                        "learnt (the vocabulary is built once a run: 4 minutes for SmolLM2 on a 2-core CPU)")
    p.add_argument("--place", action="append",
                   help="with --candidates: a place phrase (\"at the top\"; repeat for each) that may end the greedy "
                        "reply's first sentence in place of its full stop; the end and every place are judged there "
                        "and learnt as whole phrases: a description learns to say where its object is")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--kl", type=float, default=0.15, help="weight of the per-token KL to the text-only LM")
    p.add_argument("--warmup-steps", type=int, default=20, help="steps that train only the KL and measure the "
                                                                "untrained policy's reward scale")
    p.add_argument("--unlikely-nll", type=float, default=UNLIKELY_NLL,
                   help="mean NLL per token under the text-only LM above which a reply is degenerate and loses reward")
    p.add_argument("--quiet", type=float, default=0.1, help="scale of the image-dependent part of the first prefix")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--val-every", type=int, default=25, help="describe the validation images, save a resumable "
                                                             "state and the curves every N steps")
    p.add_argument("--time-limit", type=float, default=None,
                   help="minutes: save and stop once this much time has passed (then --resume)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="4bit")
    p.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default=None,
                   help="the LM's compute dtype (default: bf16 where native, else fp32, whatever --init was trained with)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.warmup_steps >= args.steps:
        p.error("--warmup-steps must be fewer than --steps")
    if args.whole_words and not (args.candidates and args.length == 1):
        p.error("--whole-words needs --candidates and --length 1")
    if args.may_end and not (args.candidates and args.candidate_positions > 1):
        p.error("--may-end needs --candidates and --candidate-positions of 2 or more")
    if args.sentence_end and args.length <= args.candidate_positions:
        p.error("--sentence-end needs --length above --candidate-positions (the position after a sentence trains)")
    if args.sentence_end and not args.may_end:
        p.error("--sentence-end needs --may-end")
    if args.proposals and args.candidates <= args.proposals + args.may_end:
        p.error("--proposals M needs --candidates above M (above M + 1 with --may-end, whose last is the end)")
    if args.place and not args.candidates:
        p.error("--place needs --candidates")
    if not 1 <= args.candidate_positions <= args.length:
        p.error("--candidate-positions must be between 1 and --length")
    return args


def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
