"""The stage before question training: a request module whose tokens say the answer's word, trained on cached
requests."""
import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from model.grounded import GroundedLM, question_positions
from model.perception import QUESTION_POSITIONS
from model.prompt import Look, Turn, render
from model.training.cell_words import word_row
from model.training.train_looking import (CACHE_NAME, KINDS, answer_rows, answer_type, asked, looking_loss,
                                          other_scenes, parse_args, pretrain, simple_kind)
from model.world import questions
from model.world.questions import answer_on


@pytest.fixture
def looking(tiny_lm_dir, tiny_clip_dir):
    return GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, request_tokens=2), quantize="none", device="cpu")


def test_a_batch_of_prompts_gets_the_request_each_gets_alone(looking, colour_images):
    red, green, _ = colour_images
    prompts = [render([Turn("user", [image, text])], looking.tokenizer, "chat", look=True)
               for image, text in ((red, "what colour?"), (green, "is there a large blue star in the picture?"))]
    together, mask = looking.requests(prompts)
    assert together.shape == (2, QUESTION_POSITIONS, 32) and mask.shape == (2, QUESTION_POSITIONS)
    for prompt, request, real in zip(prompts, together, mask):
        first = next(i for i, s in enumerate(prompt) if isinstance(s, Look))
        head = torch.cat([looking.embed_segments(prompt[:first]), looking.perception.request_rows[:1]])
        with torch.no_grad():
            alone, _ = looking.hidden_states(head.unsqueeze(0))
        asked = question_positions(prompt[:first])
        assert asked == 1 + sum(len(s) for s in prompt[2:first]), "the question after the image, and the request row"
        assert real.sum() == asked and real[-asked:].all(), "left-padded: the request row last"
        torch.testing.assert_close(request[real], alone[0, -asked:], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="render it with look=True"):
        looking.requests([render([Turn("user", [red, "what colour?"])], looking.tokenizer, "chat")])


def test_questions_are_simple_ones_and_the_steps_of_compound_ones_drawn_the_same_every_time():
    items = asked("train", 8, 64, holdout=True)
    assert all(kind in questions.SIMPLE_KINDS for _, _, _, kind in items[:8]), "eight simple questions first"
    assert items[8:] and {kind for _, _, _, kind in items[8:]} == {"step"}, "then two compound ones' steps"
    again = asked("train", 8, 64, holdout=True)
    assert [(q, a) for _, q, a, _ in items] == [(q, a) for _, q, a, _ in again]


def test_a_share_of_the_questions_meets_other_images_with_the_answers_their_scenes_give():
    items = asked("train", 40, 64, holdout=True)
    rows = list(range(len(items)))
    images, answers = other_scenes(items, rows, 0.0, random.Random(0))
    assert images == rows and answers == [answer for _, _, answer, _ in items]
    images, answers = other_scenes(items, rows, 1.0, random.Random(0))
    moved = [(i, j, answer) for i, j, answer in zip(rows, images, answers) if j != i]
    assert len(moved) > len(rows) // 4, "many questions are answered by another scene of the batch"
    for i, j, answer in moved:
        _, text, _, kind = items[i]
        assert answer_on(text, simple_kind(kind, answer), answer_type(answer), items[j][0].scene) == answer


def test_every_request_token_is_pulled_to_the_answers_row_and_training_lowers_the_loss(looking, colour_images):
    targets = answer_rows(looking, ["red", "yes", "2"])
    torch.testing.assert_close(targets[1], word_row(looking, "yes"))
    request, encoded = torch.randn(3, 5, 32), looking.encoded(colour_images).detach()
    request_mask = torch.ones(3, 5, dtype=torch.bool)
    request_mask[0, :2] = False
    params = [p for n, p in looking.perception.named_parameters() if n != "request_rows"]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(30):
        loss = looking_loss(looking, request, request_mask, encoded, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_the_stage_trains_only_the_module_and_reuses_its_cache(tiny_lm_dir, tiny_clip_dir, tmp_path):
    start = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    start.save_pretrained(tmp_path / "start")
    argv = ["--init", str(tmp_path / "start"), "--out", str(tmp_path / "looking"), "--run-dir", str(tmp_path / "run"),
            "--request-tokens", "2", "--questions", "8", "--val-questions", "8", "--steps", "4", "--batch-size", "4",
            "--val-every", "2", "--device", "cpu"]
    summary = pretrain(parse_args(argv))
    assert set(summary["answered_val"]) <= {*KINDS, "all"} and "all" in summary["answered_val"]
    assert summary["questions"]["train"] > 8, "the compound questions' steps too"
    model = GroundedLM.from_pretrained(tmp_path / "looking", quantize="none", device="cpu")
    before, after = start.trainable_state_dict(), model.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "nothing but the module changed"
    assert model.config.request_tokens == 2 and after["perception.output.weight"].abs().sum() > 0
    cache = tmp_path / "run" / CACHE_NAME.format(split="train")
    made = load_file(cache)
    assert made["request"].shape == (summary["questions"]["train"], QUESTION_POSITIONS, 32)
    assert made["request_mask"][:, -1].all(), "every request ends with its request row"
    stamp = cache.stat().st_mtime_ns
    pretrain(parse_args(argv))
    assert cache.stat().st_mtime_ns == stamp, "the same inputs: the cache is read, not made again"
