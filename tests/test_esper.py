"""ESPER: images aligned to the LM by RL from a similarity judge, with no caption anywhere on the path."""
import json
import random

import pytest
import torch
from PIL import Image

from conftest import make_sensitive_lm, png_bytes, tiny_config
from model.config import GroundedConfig
from model.grounded import GroundedLM
from model.lm import SMOLLM2
from model.prompt import Turn, render
from model.training import esper
from model.training.clip_judge import ClipJudge
from model.training.degeneracy import (each_word_once, first_sentence, is_degenerate, named_after_first_sentence,
                                       repeated_words, repetition)
from model.training.evaluate import reply_logits
from model.training.train import STATE_NAME, read_state
from model.training.words import PROPOSAL_OPENING, WordProposals, offer, saved_words_path, whole_words
from model.world import shapes
from model.world.data import ImageFolder


@pytest.fixture(scope="module")
def sensitive_lm_dir(tiny_lm_dir, tmp_path_factory):
    return make_sensitive_lm(tiny_lm_dir, tmp_path_factory.mktemp("sensitive_lm"), 0.3)


@pytest.fixture(scope="module")
def red_and_blue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("red_and_blue")
    for i in range(24):
        Image.new("RGB", (32, 32), "red" if i % 2 == 0 else "blue").save(folder / f"{i:02d}.png")
    return folder


class LetterJudge:
    """A toy judge whose right answer is known: replies to red images should be full of 'e', to blue ones of 'o'."""
    source = "letters"

    def image_embeddings(self, images):
        return torch.tensor([[1.0 if im.getpixel((0, 0))[0] > 128 else -1.0] for im in images])

    def text_embeddings(self, texts):
        return torch.tensor([[letter_score(t)] for t in texts])

    def similarity(self, image_embeddings, texts):
        return (image_embeddings * self.text_embeddings(texts)).sum(-1)


def letter_score(text: str) -> float:
    return (text.count("e") - text.count("o")) / max(len(text), 1)


def esper_args(lm_dir, clip_dir, tmp_path, *extra):
    """A tiny ESPER run's options, computing in fp32 on every CPU: the toy tasks' margins were measured in fp32, and
    in bf16 (the default where a CPU has AVX512-BF16) the tiny random LM's small probabilities move enough to miss
    them."""
    return esper.parse_args(["--out", str(tmp_path / "out"), "--run-dir", str(tmp_path / "run"), "--lm", str(lm_dir),
                             "--visual", f"local-dir:{clip_dir}", "--n-visual-tokens", "2", "--region-grid", "0",
                             "--projector", "linear", "--quantize", "none", "--compute-dtype", "float32",
                             "--device", "cpu", *extra])


@torch.no_grad()
def expected_letter_score(model: GroundedLM, image: Image.Image, position: int = 0) -> float:
    """The judge's expected score of the reply's token at `position` to `image`, after the greedy tokens before
    it, exactly: over the whole vocabulary."""
    banned = torch.tensor(sorted(model.eos_ids | {model.ret_id}))
    prompt = model.embed_segments(render([Turn("user", [image, "Describe the image."])], model.tokenizer, "chat"))
    for _ in range(position):
        hidden, _ = model.hidden_states(prompt.unsqueeze(0))
        token = esper.masked(model.logits(hidden[0, -1]), banned).argmax(-1, keepdim=True)
        prompt = torch.cat([prompt, model.embed_ids(token)])
    hidden, _ = model.hidden_states(prompt.unsqueeze(0))
    probs = (esper.masked(model.logits(hidden[0, -1]), banned) / 0.7).softmax(-1)
    scores = torch.tensor([letter_score(model.tokenizer.decode([i])) if i < len(model.tokenizer) else 0.0
                           for i in range(len(probs))])
    return (probs * scores).sum().item()


@pytest.mark.parametrize("estimator", [("--group", "16"), ("--candidates", "16"),
                                       ("--candidates", "16", "--candidates-target", "optimum", "--kl", "1")],
                         ids=["sampled", "candidates", "candidates-optimum"])
def test_esper_steps_teach_the_mapping_what_each_image_should_make_the_lm_say(sensitive_lm_dir, tiny_clip_dir,
                                                                             red_and_blue, tmp_path, estimator):
    """Sampled replies (RLOO), or the policy's 16 likeliest first tokens summed over (up the expected reward's
    gradient, or towards the objective's optimum over them): each way, 60 steps."""
    args = esper_args(sensitive_lm_dir, tiny_clip_dir, tmp_path, "--images", str(red_and_blue), "--steps", "60",
                      "--warmup-steps", "2", "--batch-size", "4", "--length", "1", "--lr", "0.05", "--kl", "0",
                      "--quiet", "1", "--unlikely-nll", "100", "--opening", "", "--val-every", "60", *estimator)
    torch.manual_seed(args.seed)
    before, _ = esper.build_model(args, torch.device("cpu"))
    summary = esper.train(args, judge=LetterJudge())
    after = GroundedLM.from_pretrained(tmp_path / "out")
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
    # red wants 'e' (the score up), blue wants 'o' (the score down): only a mapping that tells them apart does both
    assert expected_letter_score(after, red) > expected_letter_score(before, red) + 0.05
    assert expected_letter_score(after, blue) < expected_letter_score(before, blue)
    assert summary["captions_seen"] == 0 and summary["finished"]


def test_candidates_at_two_positions_teach_the_second_token_too(sensitive_lm_dir, tiny_clip_dir, red_and_blue,
                                                                 tmp_path):
    """The judge scores two-token replies; summing over the candidates at both positions trains the token after
    the policy's greedy first one, which summing at the first position alone leaves to chance."""
    second = {}
    for positions in (1, 2):
        args = esper_args(sensitive_lm_dir, tiny_clip_dir, tmp_path / str(positions), "--images", str(red_and_blue),
                          "--steps", "40", "--warmup-steps", "2", "--batch-size", "4", "--candidates", "16",
                          "--candidate-positions", str(positions), "--length", "2", "--lr", "0.05", "--kl", "0",
                          "--quiet", "1", "--unlikely-nll", "100", "--opening", "", "--val-every", "40")
        torch.manual_seed(args.seed)
        before, _ = esper.build_model(args, torch.device("cpu"))
        esper.train(args, judge=LetterJudge())
        after = GroundedLM.from_pretrained(tmp_path / str(positions) / "out")
        red = Image.new("RGB", (32, 32), "red")
        second[positions] = expected_letter_score(after, red, 1) - expected_letter_score(before, red, 1)
    assert second[2] > second[1] + 0.07, second  # measured: +0.28 against +0.15


class LengthJudge(LetterJudge):
    """A toy judge that wants replies to red images short and to blue ones long."""
    source = "length"

    def similarity(self, image_embeddings, texts):
        return -image_embeddings[:, 0] * torch.tensor([len(t) / 20 for t in texts])


@torch.no_grad()
def second_token_probability(model: GroundedLM, image: Image.Image, *tokens: int) -> float:
    """The probability that the reply to `image` says one of `tokens` (EOS by default: it ends) at its second
    token, after its greedy first."""
    prompt = model.embed_segments(render([Turn("user", [image, "Describe the image."])], model.tokenizer, "chat"))
    banned = torch.tensor(sorted(model.eos_ids | {model.ret_id}))
    hidden, _ = model.hidden_states(prompt.unsqueeze(0))
    first = esper.masked(model.logits(hidden[0, -1]), banned).argmax(-1, keepdim=True)
    hidden, _ = model.hidden_states(torch.cat([prompt, model.embed_ids(first)]).unsqueeze(0))
    probs = esper.masked(model.logits(hidden[0, -1]), torch.tensor([model.ret_id])).softmax(-1)
    return probs[sorted(tokens or model.eos_ids)].sum().item()


def test_with_may_end_a_reply_learns_where_to_stop(sensitive_lm_dir, tiny_clip_dir, red_and_blue, tmp_path):
    """EOS among the candidates after the first position, and a reply it ends judged as it stands: a judge that
    wants red images' replies short and blue ones' long makes the end likelier there for red images, 80 steps.
    Replies of 4 tokens: a candidate goes on as the app decodes, and this toy LM's plain greedy continuation can
    run into one-character byte tokens, so at 6 tokens the policy made red replies short by such first tokens
    rather than by ending (x0.015)."""
    args = esper_args(sensitive_lm_dir, tiny_clip_dir, tmp_path, "--images", str(red_and_blue), "--steps", "80",
                      "--warmup-steps", "2", "--batch-size", "4", "--candidates", "16", "--candidate-positions", "2",
                      "--may-end", "--candidates-target", "optimum", "--length", "4", "--lr", "0.05", "--kl", "0.05",
                      "--quiet", "1", "--unlikely-nll", "100", "--opening", "", "--instruction", "Describe the image.",
                      "--val-every", "80")
    torch.manual_seed(args.seed)
    before, _ = esper.build_model(args, torch.device("cpu"))
    esper.train(args, judge=LengthJudge())
    after = GroundedLM.from_pretrained(tmp_path / "out")
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
    rise = {name: second_token_probability(after, image) / second_token_probability(before, image)
            for name, image in (("red", red), ("blue", blue))}
    assert rise["red"] > 5 and rise["blue"] < 2, rise  # measured: x7.6 and x0.78


class RecordingJudge(LetterJudge):
    """The toy judge, keeping every text it is asked to score."""

    def __init__(self):
        self.texts: list[str] = []

    def similarity(self, image_embeddings, texts):
        self.texts += texts
        return super().similarity(image_embeddings, texts)


@torch.no_grad()
def test_with_sentence_end_the_end_offered_is_a_full_stop_and_the_end_together(sensitive_lm_dir, tiny_clip_dir,
                                                                              tmp_path):
    """After the first position, one candidate is the greedy text so far with a full stop, ended there (the bare
    end where it already stops); without `--sentence-end` the end offered is EOS alone, the text cut short."""
    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    k, positions = 4, 3
    for sentence_end in (False, True):
        args = esper_args(sensitive_lm_dir, tiny_clip_dir, tmp_path, "--candidates", str(k), "--candidate-positions",
                          str(positions), "--may-end", "--length", "6", "--opening", "",
                          "--instruction", "Describe the image.", *(["--sentence-end"] if sentence_end else []))
        model, _ = esper.build_model(args, torch.device("cpu"))
        batch = esper.prepare(model, images, random.Random(0), args)
        greedy = esper.sample_replies(model, batch.policy, batch.prefix, 1, 6, 0.0, batch.banned, None)
        judge = RecordingJudge()
        esper.candidates_loss(model, judge, images, random.Random(0), None, args, (0.0, 1.0))
        stop = esper.full_stop(model)
        at = esper.trained_positions(greedy, positions, stop if sentence_end else None).tolist()
        for b, said in enumerate(greedy.tolist()):
            for j, position in enumerate(at[b][1:], 1):
                ended = said[:position] + ([stop] if sentence_end and said[position - 1] != stop else [])
                offered = judge.texts[(b * len(at[b]) + j) * k:(b * len(at[b]) + j + 1) * k]
                assert model.tokenizer.decode(ended, skip_special_tokens=True) in offered


@torch.no_grad()
@pytest.mark.parametrize("may_end", [False, True], ids=["always-goes-on", "may-end"])
def test_with_may_end_a_candidate_goes_on_until_the_policy_ends_it(sensitive_lm_dir, tiny_clip_dir, tmp_path,
                                                                  monkeypatch, may_end):
    """A candidate's greedy continuation ends where the policy says EOS, as the app's reply would (the greedy tokens
    before a position never end): an LM that says EOS wherever it may ends each candidate right after its token;
    without `--may-end` no reply ends."""
    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    args = esper_args(sensitive_lm_dir, tiny_clip_dir, tmp_path, "--candidates", "4", "--candidate-positions", "3",
                      "--length", "6", "--opening", "", "--instruction", "Describe the image.",
                      *(["--may-end"] if may_end else []))
    model, _ = esper.build_model(args, torch.device("cpu"))
    logits, eos = model.logits, model.tokenizer.eos_token_id
    monkeypatch.setattr(model, "logits", lambda hidden: logits(hidden).index_add(
        -1, torch.tensor([eos]), torch.full((*hidden.shape[:-1], 1), 100.0)))
    replies, texts_of = [], esper.texts_of
    monkeypatch.setattr(esper, "texts_of", lambda model, openings, ids: replies.append(ids) or
                        texts_of(model, openings, ids))
    esper.candidates_loss(model, RecordingJudge(), images, random.Random(0), None, args, (0.0, 1.0))
    ids = replies[0].view(len(images), 3, 4, 6)                                             # (B, P, K, L)
    if may_end:
        assert all((ids[:, j, :, j + 1] == eos).all() for j in range(3))
        assert not (ids[:, 1:, :, 0] == eos).any()  # the greedy tokens before
    else:
        assert not (ids == eos).any()


def test_with_sentence_end_the_position_after_the_first_full_stop_trains_too():
    """Beyond the first P positions, the one after the greedy reply's first full stop (where a description ends or
    goes on, which SmolLM2's 8-token sentences put out of reach of 8 positions), else the next."""
    stop = 9
    greedy = torch.tensor([[1, 2, 3, 4, 9, 5, 9, 6],    # first full stop at 4: position 5 trains
                           [1, 9, 2, 3, 4, 5, 6, 7],    # at 1, within the first 3: the next, 3
                           [1, 2, 3, 4, 5, 6, 7, 8],    # none: the next
                           [1, 2, 3, 4, 5, 6, 7, 9]])   # at the last token, nothing after it: the next
    assert esper.trained_positions(greedy, 3, stop).tolist() == [[0, 1, 2, 5], [0, 1, 2, 3], [0, 1, 2, 3],
                                                                  [0, 1, 2, 3]]
    assert esper.trained_positions(greedy, 3, None).tolist() == [[0, 1, 2]] * 4


def test_with_sentence_end_a_reply_learns_to_stop_with_a_full_stop(sensitive_lm_dir, tiny_clip_dir, red_and_blue,
                                                                  tmp_path):
    """The judge that wants red images' replies short and blue ones' long: with the full stop and the end offered
    together, red images' second token becomes the full stop, blue ones' does not, 80 steps."""
    args = esper_args(sensitive_lm_dir, tiny_clip_dir, tmp_path, "--images", str(red_and_blue), "--steps", "80",
                      "--warmup-steps", "2", "--batch-size", "4", "--candidates", "16", "--candidate-positions", "2",
                      "--may-end", "--sentence-end", "--candidates-target", "optimum", "--length", "4", "--lr", "0.05",
                      "--kl", "0.05", "--quiet", "1", "--unlikely-nll", "100", "--opening", "",
                      "--instruction", "Describe the image.", "--val-every", "80")
    torch.manual_seed(args.seed)
    before, _ = esper.build_model(args, torch.device("cpu"))
    esper.train(args, judge=LengthJudge())
    after = GroundedLM.from_pretrained(tmp_path / "out")
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
    stop = esper.full_stop(after)
    said = {name: (second_token_probability(before, image, stop), second_token_probability(after, image, stop))
            for name, image in (("red", red), ("blue", blue))}
    assert said["red"][1] > max(0.2, 5 * said["red"][0]) and said["blue"][1] < 0.01, said
    # measured: red 1.1% -> 40%, blue 0.05% -> 0.11%; with the bare end offered, red's fell x0.05


def test_the_optimum_target_moves_the_policy_further_than_the_expectation_in_the_same_steps(
        sensitive_lm_dir, tiny_clip_dir, red_and_blue, tmp_path):
    """The same objective (reward less the KL): the expected reward's gradient for a token scales with its
    probability, the cross-entropy towards the objective's optimum over the candidates does not, so with 256
    candidates, most of them unlikely, 15 steps raise the red images' expected score more (measured: +0.10
    against +0.03)."""
    gain = {}
    for target in ("expected", "optimum"):
        args = esper_args(sensitive_lm_dir, tiny_clip_dir, tmp_path / target, "--images", str(red_and_blue),
                          "--steps", "15", "--warmup-steps", "2", "--batch-size", "4", "--candidates", "256",
                          "--candidates-target", target, "--length", "1", "--lr", "0.05", "--kl", "1",
                          "--quiet", "1", "--unlikely-nll", "100", "--opening", "", "--val-every", "15")
        torch.manual_seed(args.seed)
        before, _ = esper.build_model(args, torch.device("cpu"))
        esper.train(args, judge=LetterJudge())
        after = GroundedLM.from_pretrained(tmp_path / target / "out")
        red = Image.new("RGB", (32, 32), "red")
        gain[target] = expected_letter_score(after, red) - expected_letter_score(before, red)
    assert gain["optimum"] > 2 * gain["expected"] > 0, gain


@torch.no_grad()
def test_a_candidate_goes_on_as_the_app_would_say_it_loops_and_all(tiny_lm_dir, tiny_clip_dir, tmp_path):
    """A candidate is judged with its greedy continuation, decoded as the app decodes (no trigram blocked, only
    EOS and `[RET]`), so that a continuation that loops is judged, and costs, as the loop a user would read."""
    model, _ = esper.build_model(esper_args(tiny_lm_dir, tiny_clip_dir, tmp_path), torch.device("cpu"))
    image = Image.new("RGB", (32, 32), "red")
    prompt = model.embed_segments(render([Turn("user", [image, "Describe the image."])], model.tokenizer, "chat"))
    banned = torch.tensor(sorted(model.eos_ids | {model.ret_id}))
    continued = esper.sample_replies(model, [prompt], [], 1, 24, 0.0, banned, None)[0].tolist()
    said: list[int] = []
    for _ in range(24):
        hidden, _ = model.hidden_states(torch.cat([prompt, model.embed_ids(torch.tensor(said, dtype=torch.long))])[None])
        said.append(esper.masked(model.logits(hidden[0, -1]), banned).argmax().item())
    assert continued == said
    trigrams = [tuple(said[i:i + 3]) for i in range(len(said) - 2)]
    assert len(set(trigrams)) < len(trigrams), "this toy LM loops within 24 tokens, as SmolLM2 does within 48"


def test_the_judge_embeds_a_text_once(tiny_clip_dir):
    """ESPER's candidates repeat from step to step: the judge's cache answers them, and gives what it computed."""
    judge = ClipJudge(f"local-dir:{tiny_clip_dir}")
    first = judge.text_embeddings(["a red square", "a blue circle"])
    calls = []
    judge.model.encode_text = lambda tokens, _encode=judge.model.encode_text: calls.append(len(tokens)) or _encode(tokens)
    again = judge.text_embeddings(["a blue circle", "a green star", "a red square", "a green star"])
    assert calls == [1]  # only the new text
    torch.testing.assert_close(again[[0, 2]], first[[1, 0]])
    torch.testing.assert_close(again[1], again[3])


def test_the_checkpoint_esper_writes_does_not_retrieve(tiny_lm_dir, tiny_clip_dir, red_and_blue, tmp_path):
    esper.main(["--out", str(tmp_path / "out"), "--run-dir", str(tmp_path / "run"), "--lm", str(tiny_lm_dir),
                "--visual", f"local-dir:{tiny_clip_dir}", "--n-visual-tokens", "2", "--region-grid", "0",
                "--quantize", "none", "--device", "cpu", "--images", str(red_and_blue), "--steps", "2",
                "--warmup-steps", "1", "--batch-size", "2", "--group", "2", "--length", "3"])
    assert GroundedConfig.load(tmp_path / "out").retrieves is False
    model = GroundedLM.from_pretrained(tmp_path / "out")
    hidden = torch.randn(5, model.config.lm_dim, dtype=model.lm.dtype)  # bf16 where the CPU computes in it
    assert torch.isneginf(model.logits(hidden)[:, model.ret_id]).all()  # `[RET]` can never be decoded
    assert (tmp_path / "run" / esper.SAMPLES_NAME).read_text().startswith("step 2: greedy")


def test_the_shapes_world_path_never_reads_a_caption(tiny_lm_dir, tiny_clip_dir, tmp_path, monkeypatch):
    def no_captions(*args, **kwargs):
        raise AssertionError("ESPER must not read a caption")
    for name in ("describe", "plain_caption", "generate", "sample"):
        monkeypatch.setattr(shapes, name, no_captions)
    summary = esper.train(esper_args(tiny_lm_dir, tiny_clip_dir, tmp_path, "--steps", "2", "--warmup-steps", "1",
                                     "--batch-size", "2", "--group", "2", "--length", "3"))
    assert summary["step"] == 2 and summary["holdout_kept_out"]


def test_an_interrupted_run_resumes_at_its_saved_step(tiny_lm_dir, tiny_clip_dir, red_and_blue, tmp_path):
    options = ["--images", str(red_and_blue), "--steps", "4", "--warmup-steps", "1", "--batch-size", "2",
               "--group", "2", "--length", "3", "--val-every", "100"]
    stopped = esper.train(esper_args(tiny_lm_dir, tiny_clip_dir, tmp_path, *options, "--time-limit", "0"))
    assert stopped == {**stopped, "finished": False, "step": 1}
    assert not (tmp_path / "out").exists()  # nothing exported from half a run
    with pytest.raises(SystemExit, match="--resume"):
        esper.train(esper_args(tiny_lm_dir, tiny_clip_dir, tmp_path, *options))
    with pytest.raises(ValueError, match="other options"):
        esper.train(esper_args(tiny_lm_dir, tiny_clip_dir, tmp_path, *options, "--lr", "0.1", "--resume"))
    assert esper.train(esper_args(tiny_lm_dir, tiny_clip_dir, tmp_path, *options, "--resume", "--time-limit", "0")
                       )["step"] == 2
    exported = esper.train(esper_args(tiny_lm_dir, tiny_clip_dir, tmp_path, *options, "--steps", "2", "--resume"))
    assert exported["finished"] and exported["seconds_per_step"] > 0, "a call that only exports says what a step took"
    finished = esper.train(esper_args(tiny_lm_dir, tiny_clip_dir, tmp_path, *options, "--resume"))
    assert finished["finished"] and finished["step"] == 4
    _, meta = read_state(tmp_path / "run" / STATE_NAME)
    assert meta["history"]["step"] == [1, 2, 3, 4]
    assert len(meta["history"]["baseline"]) == 2  # the warm-up's scale, kept across the interruption
    assert json.loads((tmp_path / "out" / "training.json").read_text())["step"] == 4


def test_init_continues_an_esper_checkpoint_but_takes_only_the_layout_of_a_captioned_one(
        tiny_lm_dir, tiny_clip_dir, red_and_blue, tmp_path):
    options = ["--images", str(red_and_blue), "--steps", "2", "--warmup-steps", "1", "--batch-size", "2",
               "--group", "2", "--length", "3"]
    first = esper.train(esper_args(tiny_lm_dir, tiny_clip_dir, tmp_path / "first", *options))
    trained = GroundedLM.from_pretrained(tmp_path / "first" / "out")
    args = esper.parse_args(["--out", str(tmp_path / "next"), "--init", str(tmp_path / "first" / "out"),
                             "--quantize", "none", "--device", "cpu"])
    continued, baseline = esper.build_model(args, torch.device("cpu"))
    assert baseline == first["baseline"] and len(baseline) == 2  # no new warm-up: the same reward scale
    torch.testing.assert_close(continued.input_mapping.weight, trained.input_mapping.weight)

    captioned = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none")
    captioned.save_pretrained(tmp_path / "captioned")
    args = esper.parse_args(["--out", str(tmp_path / "next"), "--init", str(tmp_path / "captioned"),
                             "--quantize", "none", "--device", "cpu"])
    fresh, baseline = esper.build_model(args, torch.device("cpu"))
    assert baseline is None and not fresh.config.retrieves
    assert fresh.config.n_visual_tokens == 2  # its layout, not the defaults (4)
    assert not torch.allclose(fresh.input_mapping.weight, captioned.input_mapping.weight)


def test_quiet_start_barely_disturbs_the_real_lm(tiny_clip_dir, tmp_path):
    """On SmolLM2 the first prefix (its newline token plus a little of the image) changes the next-token
    distribution far less than a mapping as a supervised run starts it."""
    args = esper_args(SMOLLM2, tiny_clip_dir, tmp_path, "--length", "4")
    torch.manual_seed(0)
    quiet, _ = esper.build_model(args, torch.device("cpu"))
    plain = GroundedLM(tiny_config(SMOLLM2, tiny_clip_dir, retrieves=False), quantize="none")
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue", "white")]

    def kl(model: GroundedLM) -> float:
        with torch.no_grad():
            return esper.esper_loss(model, LetterJudge(), images, random.Random(0), torch.Generator().manual_seed(0),
                                    args, None).kl
    quiet_kl, plain_kl = kl(quiet), kl(plain)
    assert quiet_kl < 0.05 and quiet_kl < plain_kl / 4


def test_a_candidate_that_begins_a_word_is_judged_as_the_whole_word(tiny_clip_dir, tmp_path):
    """SmolLM2 has " hex" as one token: the judge should read the hexagon the policy means, not a hex."""
    model, _ = esper.build_model(esper_args(SMOLLM2, tiny_clip_dir, tmp_path), torch.device("cpu"))
    tokens = [model.tokenizer.encode(w, add_special_tokens=False)[0] for w in (" hex", " square", ",", " hex")]
    assert whole_words(model, "The shape is a", tokens) == [" hexagon", " square", ",", " hexagon"]
    with pytest.raises(SystemExit):
        esper_args(SMOLLM2, tiny_clip_dir, tmp_path, "--whole-words", "--candidates", "8", "--length", "2")


def test_a_folder_of_images_skips_and_reports_what_is_not_one(tmp_path):
    for i in range(3):
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / "sub" / f"{i}.png").write_bytes(png_bytes(Image.new("RGB", (8, 8), "red")))
    (tmp_path / "notes.txt").write_text("no image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    folder = ImageFolder(tmp_path)
    assert len(folder) == 3 and folder[0].size == (8, 8)
    assert [path for path, _ in folder.skipped] == ["broken.png", "notes.txt"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable image"):
        ImageFolder(tmp_path / "empty")


def test_degenerate_text_is_repetition_or_what_the_lm_would_not_write():
    assert repetition("a red circle on the left and a blue square on the right") == 0  # "on the" may recur
    assert repetition("red circle red circle red circle") == 0.5  # 2 of its 4 trigrams came before
    assert is_degenerate("red circle red circle red circle")
    assert is_degenerate("The image is a white star.\n\n* \n* \n* \n* \n* \n* \n*")  # a loop holds no word
    assert not is_degenerate("The image is a white star.\n\n* a white star")
    assert not is_degenerate("A large orange square on the left, a small blue square at the top and a large "
                             "orange square at the bottom.")  # two alike objects, said right
    assert is_degenerate("a red circle", nll=9.0) and not is_degenerate("a red circle", nll=4.5)


def test_the_judge_reads_each_word_once_so_a_loop_says_no_more_than_its_first_pass():
    assert each_word_once("The image is a white white white white") == "The image is a white"
    assert each_word_once("Hexagon, hexagon hexagon. A hexagon") == "Hexagon, A"
    assert each_word_once("a red star and a blue circle") == "a red star and blue circle"
    assert each_word_once(" e\n") == " e\n"  # a text that repeats nothing is read as it is, spaces and all


def test_with_first_sentence_the_judge_reads_up_to_the_first_sentence_end():
    assert first_sentence("The image is a red star. It is a red star. It is") == "The image is a red star"
    assert first_sentence("A red star\nA red star") == "A red star"
    assert first_sentence("Wow! A star") == "Wow" and first_sentence("no end yet") == "no end yet"
    assert first_sentence("A 1.5 cm star.") == "A 1.5 cm star", "a point inside a number ends nothing"


def test_a_thing_named_again_costs_where_words_that_name_nothing_do_not(tmp_path):
    assert repeated_words("The image is a white triangle with a dark background") == 0  # "a" names nothing
    assert repeated_words("The image is a triangle with a white triangle") == 1
    assert repeated_words("A triangle, a TRIANGLE and a white triangle") == 2
    args = esper_args("lm", "clip", tmp_path, "--first-sentence", "--repeat-cost", "0.5", "--unlikely-nll", "10")
    texts = ["The image is a white triangle. It is white.", "The image is a triangle with a white triangle."]
    reward = esper.shaped_reward(torch.tensor([0.09, 0.09]), texts, torch.tensor([2.0, 2.0]), (0.03, 0.03), args)
    assert reward.tolist() == pytest.approx([2.0, 1.5]), "what follows the first sentence names nothing twice"


def test_after_the_first_sentence_each_word_naming_something_costs(tmp_path):
    assert named_after_first_sentence("The image is a purple cross.") == 0
    assert named_after_first_sentence("The image is a purple cross. It is a symbol of the Bible.") == 2
    assert named_after_first_sentence("A purple cross with no end") == 0  # one sentence, however long
    args = esper_args("lm", "clip", tmp_path, "--first-sentence", "--after-cost", "0.25", "--unlikely-nll", "10")
    texts = ["The image is a purple cross.", "The image is a purple cross. It is a symbol of the Bible."]
    reward = esper.shaped_reward(torch.tensor([0.09, 0.09]), texts, torch.tensor([2.0, 2.0]), (0.03, 0.03), args)
    assert reward.tolist() == pytest.approx([2.0, 1.5]), "the judge reads both alike; the one that goes on pays"


class LettersAndAJudge(LetterJudge):
    """The letters as before, and a pull towards 'a' that every image shares: a word full of 'a' scores high against
    red and blue images alike."""

    def image_embeddings(self, images):
        return torch.cat([super().image_embeddings(images), torch.ones(len(images), 1)], 1)

    def text_embeddings(self, texts):
        return torch.tensor([[letter_score(t), 10 * t.count("a") / len(t)] for t in texts])


def test_the_judge_proposes_the_words_that_tell_an_image_apart_not_those_that_fit_any(tiny_lm_dir, tiny_clip_dir,
                                                                                      tmp_path):
    model, _ = esper.build_model(esper_args(tiny_lm_dir, tiny_clip_dir, tmp_path), torch.device("cpu"))
    judge = LettersAndAJudge()
    proposals = WordProposals(model, judge)
    word = dict(zip(proposals.tokens.tolist(), proposals.words))
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
    proposed = proposals.propose(judge.image_embeddings([red, blue, red, blue]), 2)           # (4, 2)
    score = {t: letter_score(f"The image is a{w}.") for t, w in word.items()}
    for_red, for_blue = proposed[::2].flatten().tolist(), proposed[1::2].flatten().tolist()
    assert min(score[t] for t in for_red) > max(score[t] for t in for_blue)
    a_richest = max(word, key=lambda t: judge.text_embeddings([f"The image is a{word[t]}."])[0, 1])
    assert a_richest not in for_red + for_blue  # it scores highest against every image: it tells none apart


def test_the_whole_words_are_completed_once_for_an_lm_and_read_back_by_the_next_run(tiny_lm_dir, tiny_untied_lm_dir,
                                                                                  tiny_clip_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GROUNDED_CACHE", str(tmp_path / "cache"))
    model, _ = esper.build_model(esper_args(tiny_lm_dir, tiny_clip_dir, tmp_path), torch.device("cpu"))
    first = WordProposals(model, LetterJudge())
    saved = saved_words_path(model)
    assert saved.is_file()
    again, _ = esper.build_model(esper_args(tiny_lm_dir, tiny_clip_dir, tmp_path), torch.device("cpu"))
    assert saved_words_path(again) == saved  # the same LM loaded again: the same file, for the same words
    assert whole_words(again, PROPOSAL_OPENING, first.tokens.tolist()) == first.words  # as completed anew
    kept = json.loads(saved.read_text())
    kept["words"][0] = " marked"  # what the next run reads is the saved list, not the words completed again
    saved.write_text(json.dumps(kept))
    assert WordProposals(again, LetterJudge()).words == kept["words"]
    other, _ = esper.build_model(esper_args(tiny_untied_lm_dir, tiny_clip_dir, tmp_path), torch.device("cpu"))
    assert saved_words_path(other) != saved  # another LM completes its own
    assert " marked" not in WordProposals(other, LetterJudge()).words


def test_a_proposal_takes_a_least_likely_slot_before_the_end_unless_it_is_a_candidate_already():
    top = torch.tensor([[[5, 6, 7, 8], [9, 5, 3, 2]]])  # one image, two positions, four candidates: the last the end
    assert offer(top, torch.tensor([[5]]), 3).tolist() == top.tolist()
    assert offer(top, torch.tensor([[4]]), 3).tolist() == [[[5, 6, 4, 8], [9, 5, 4, 2]]]
    assert offer(top, torch.tensor([[4, 7]]), 3).tolist() == [[[5, 4, 7, 8], [9, 4, 7, 2]]]


@torch.no_grad()
def opening_token_probability(model: GroundedLM, image: Image.Image, token: int) -> float:
    """The probability that the reply to `image`, after PROPOSAL_OPENING, goes on with `token`."""
    tokenizer = model.tokenizer
    prompt = model.embed_segments(render([Turn("user", [image, "Describe the image."])], tokenizer, "chat")
                                  + [tokenizer.encode(PROPOSAL_OPENING, add_special_tokens=False)])
    hidden, _ = model.hidden_states(prompt.unsqueeze(0))
    return model.logits(hidden[0, -1]).softmax(-1)[token].item()


def test_a_proposed_word_is_learnt_where_the_policy_would_not_offer_it(sensitive_lm_dir, tiny_clip_dir, red_and_blue,
                                                                       tmp_path):
    """Three candidates after the opening, each judged as the word it begins: the policy's three likeliest tokens,
    or its two and the judge's proposal. The word the judge proposes for red images becomes likely only where it
    is offered."""
    red = Image.new("RGB", (32, 32), "red")
    probability = {}
    for proposals in ("0", "1"):
        args = esper_args(sensitive_lm_dir, tiny_clip_dir, tmp_path / proposals, "--images", str(red_and_blue),
                          "--steps", "30", "--warmup-steps", "2", "--batch-size", "4", "--candidates", "3",
                          "--proposals", proposals, "--candidates-target", "optimum", "--length", "1", "--whole-words",
                          "--lr", "0.05", "--kl", "0.1", "--quiet", "1", "--unlikely-nll", "100", "--opening",
                          PROPOSAL_OPENING, "--val-every", "30")
        torch.manual_seed(args.seed)
        before, _ = esper.build_model(args, torch.device("cpu"))
        judge = LetterJudge()
        proposed = WordProposals(before, judge).propose(judge.image_embeddings([red, Image.new("RGB", (32, 32), "blue")]), 1)
        token = proposed[0, 0].item()
        esper.train(args, judge=judge)
        after = GroundedLM.from_pretrained(tmp_path / proposals / "out")
        probability[proposals] = (opening_token_probability(before, red, token),
                                  opening_token_probability(after, red, token))
    (offered_before, offered_after), (kept_before, kept_after) = probability["1"], probability["0"]
    assert offered_after > 3 * offered_before and kept_after < kept_before, probability  # measured: x4.7 and x0.11


@torch.no_grad()
def test_with_place_the_first_sentence_may_end_with_each_place_all_judged(sensitive_lm_dir, tiny_clip_dir, tmp_path):
    """Where the greedy reply's first sentence ends (its first full stop, or its last token), the judge reads it
    ended there and ended after each place phrase; the policy's share of the judge's choice is reported."""
    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    args = esper_args(sensitive_lm_dir, tiny_clip_dir, tmp_path, "--candidates", "4", "--length", "5", "--opening", "",
                      "--instruction", "Describe the image.", "--place", "over here", "--place", "too")
    model, _ = esper.build_model(args, torch.device("cpu"))
    batch = esper.prepare(model, images, random.Random(0), args)
    greedy = esper.sample_replies(model, batch.policy, batch.prefix, 1, 5, 0.0, batch.banned, None).tolist()
    judge = RecordingJudge()
    result = esper.candidates_loss(model, judge, images, random.Random(0), None, args, (0.0, 1.0))
    stop = esper.full_stop(model)
    for said in greedy:
        sentence = model.tokenizer.decode(said[:said.index(stop)] if stop in said else said, skip_special_tokens=True)
        assert {sentence + ".", sentence + " over here.", sentence + " too."} <= set(judge.texts)
    assert 0 < result.place_best < 1


@torch.no_grad()
def test_the_options_after_a_sentence_read_it_once_and_score_as_each_read_alone(sensitive_lm_dir, tiny_clip_dir,
                                                                             tmp_path):
    """Each prompt and greedy sentence is read once and its keys and values shared by the options after it: the
    log-probabilities are those of every (prompt, sentence + option) read on its own, with sentences of different
    lengths in one batch."""
    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "green")]
    args = esper_args(sensitive_lm_dir, tiny_clip_dir, tmp_path, "--candidates", "4", "--length", "5",
                      "--opening", "", "--opening", "I see a")
    model, _ = esper.build_model(args, torch.device("cpu"))
    batch = esper.prepare(model, images, random.Random(1), args)
    greedy = esper.sample_replies(model, batch.policy, batch.prefix, 1, 5, 0.0, batch.banned, None)
    ends, stop = [5, 2, 0], esper.full_stop(model)
    options = [[stop], model.tokenizer.encode(" on the left", add_special_tokens=False) + [stop], [7, stop]]
    shared = esper.option_logprobs(model, batch.policy, batch.prefix, greedy, ends, options, batch.banned)
    for b, end in enumerate(ends):
        for j, option in enumerate(options):
            reply = torch.tensor(greedy[b, :end].tolist() + option)
            alone = esper.masked(reply_logits(model, [batch.policy[b]], [reply], batch.prefix)[0][end:], batch.banned)
            expected = alone.log_softmax(-1).gather(-1, reply[end:, None]).sum()
            assert shared[b, j].item() == pytest.approx(expected.item(), abs=1e-3)


@torch.no_grad()
def place_log_odds(model: GroundedLM, image: Image.Image, length: int, place: str, other: str) -> float:
    """log p(`place` then a full stop) - log p(`other` then one), where the greedy reply to `image` (`length`
    tokens) ends its first sentence."""
    prompt = model.embed_segments(render([Turn("user", [image, "Describe the image."])], model.tokenizer, "chat"))
    banned = torch.tensor(sorted(model.eos_ids | {model.ret_id}))
    said = esper.sample_replies(model, [prompt], [], 1, length, 0.0, banned, None)[0].tolist()
    stop = esper.full_stop(model)
    end = said.index(stop) if stop in said else len(said)

    def logp(phrase: str) -> float:
        reply = torch.tensor(said[:end] + model.tokenizer.encode(" " + phrase, add_special_tokens=False) + [stop])
        logits = esper.masked(reply_logits(model, [prompt], [reply])[0][end:], torch.tensor([model.ret_id]))
        return logits.log_softmax(-1).gather(-1, reply[end:, None]).sum().item()
    return logp(place) - logp(other)


class PlaceJudge(LetterJudge):
    """A toy judge that reads only how a reply ends: red images' replies should end "here.", blue ones' "too."."""
    source = "place"

    def similarity(self, image_embeddings, texts):
        return image_embeddings[:, 0] * torch.tensor([float(t.endswith(" here.")) - t.endswith(" too.") for t in texts])


def test_with_place_each_image_learns_its_place_phrase(sensitive_lm_dir, tiny_clip_dir, red_and_blue, tmp_path):
    """With "here" and "too" offered as places, red images come to prefer "here" over "too" far more than blue ones
    do; the same steps without --place do not teach it."""
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
    learnt = {}
    for places in ((), ("--place", "here", "--place", "too")):
        run = tmp_path / str(len(places))
        args = esper_args(sensitive_lm_dir, tiny_clip_dir, run, "--images", str(red_and_blue), "--steps", "60",
                          "--warmup-steps", "2", "--batch-size", "4", "--candidates", "4", "--length", "3",
                          "--candidates-target", "optimum", "--lr", "0.05", "--kl", "0.05", "--quiet", "1",
                          "--unlikely-nll", "100", "--opening", "", "--instruction", "Describe the image.",
                          "--val-every", "60", *places)
        torch.manual_seed(args.seed)
        before, _ = esper.build_model(args, torch.device("cpu"))
        esper.train(args, judge=PlaceJudge())
        after = GroundedLM.from_pretrained(run / "out")
        learnt[len(places)] = [place_log_odds(model, red, 3, "here", "too") - place_log_odds(model, blue, 3, "here", "too")
                               for model in (before, after)]
    (control_before, control_after), (before, after) = learnt[0], learnt[4]
    assert after - before > max(15, 3 * (control_after - control_before)), learnt  # measured: +29.6 against +5.8


def test_a_place_goes_where_the_first_sentence_ends_or_replaces_the_place_it_ends_with():
    """At the first full stop (the reply's end without one), or where a place the sentence ends with begins, so that
    places are chosen and never stacked."""
    stop, places = 9, [[5, 6, 7], [8, 7]]
    assert esper.where_the_place_goes([1, 2, 3, 9, 4], stop, places) == 3          # "a white triangle." + place
    assert esper.where_the_place_goes([1, 2, 5, 6, 7, 9, 3], stop, places) == 2    # "a white ... on the left." replaced
    assert esper.where_the_place_goes([1, 8, 7, 9], stop, places) == 1
    assert esper.where_the_place_goes([1, 2, 3, 4], stop, places) == 4             # no full stop: after it all
    assert esper.where_the_place_goes([6, 7, 9], stop, places) == 2                # a phrase's tail is not a place
