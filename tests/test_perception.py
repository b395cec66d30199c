"""LMEye's interactive perception: where the request tokens go, the two passes, what trains, what is shown."""
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import tiny_config
from model.generate import GenerationSettings, Looked, Text, stream_reply
from model.grounded import Example, GroundedLM, question_positions
from model.perception import heat_map
from model.prompt import Look, Turn, count_tokens, render, render_with_target
from model.training import evaluate_questions, fit_word_decisions, train_look_gate, train_looking
from model.training.evaluate import greedy_replies

K = 3


@pytest.fixture(scope="module")
def looking_model(tiny_lm_dir, tiny_clip_dir):
    """A tiny model with a request module whose output layer is no longer zero (as after training)."""
    torch.manual_seed(1)
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=2, request_tokens=K),
                       quantize="none", device="cpu")
    with torch.no_grad():
        for p in model.perception.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def some_requests(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n requests of 4 positions (the first of one row padding) and their mask."""
    mask = torch.ones(n, 4, dtype=torch.bool)
    mask[0, 0] = False
    return torch.randn(n, 4, 32), mask


def looks(segments) -> list[Image.Image]:
    return [s.image for s in segments if isinstance(s, Look)]


def test_request_positions_end_the_turn_that_asks_about_images(looking_model, colour_images):
    red, green, blue = colour_images
    tokenizer = looking_model.tokenizer
    two = render([Turn("user", [red, green, "which is warmer?"])], tokenizer, "chat", look=True)
    assert looks(two) == [red, green], "each image of the turn gets its own request"
    assert isinstance(two[-2], Look) and not isinstance(two[-1], Look), "after the text, before the reply"
    follow_up = [Turn("user", [red, "describe the image."]), Turn("assistant", ["red."]),
                 Turn("user", [blue, "and this?"]), Turn("assistant", ["blue."]), Turn("user", ["what colour?"])]
    assert looks(render(follow_up, tokenizer, "chat", look=True)) == [blue], "a follow-up looks at the latest image"
    assert looks(render([Turn("user", ["hello there"])], tokenizer, "chat", look=True)) == []
    assert looks(render(follow_up, tokenizer, "chat")) == [], "nothing looks unless asked"
    prompt, target = render_with_target(follow_up + [Turn("assistant", ["blue."])], tokenizer, "chat", look=True)
    assert looks(prompt) == [blue] and looks(target) == []
    assert count_tokens(two, 6, K) == count_tokens(render([Turn("user", [red, green, "which is warmer?"])],
                                                          tokenizer, "chat"), 6) + 2 * K


def tokens_and_images(segments) -> list:
    """A rendered prompt as its tokens and images in order, its request positions left out."""
    return [x for s in segments if not isinstance(s, Look) for x in (s if isinstance(s, list) else [s])]


@pytest.mark.parametrize("prompt_format", ["chat", "qa"])
def test_a_requests_question_is_the_turns_own_text_and_marking_it_changes_no_token(looking_model, colour_images,
                                                                                   prompt_format):
    red, green, _ = colour_images
    tokenizer = looking_model.tokenizer
    after_a_question = [Turn("user", [red, "where is it?"]), Turn("assistant", ["on the left."]),
                        Turn("user", ["what colour is it?"])]
    with_image = [Turn("user", ["compare", green, "which is warmer?"])]
    line = "Q: " if prompt_format == "qa" else ""  # FROMAGe's dialogue marks the line, not the words after "Q: "
    for turns, question in ((after_a_question, line + "what colour is it?"), (with_image, "which is warmer?")):
        looking = render(turns, tokenizer, prompt_format, look=True)
        first = next(i for i, s in enumerate(looking) if isinstance(s, Look))
        assert looking[first - 1] == tokenizer(question, add_special_tokens=False).input_ids
        assert question_positions(looking[:first]) == len(looking[first - 1]) + 1, "its words and the request row"
        assert tokens_and_images(looking) == tokens_and_images(render(turns, tokenizer, prompt_format))


def test_a_request_that_finds_one_of_the_images_tokens_reads_that_token_itself(tiny_lm_dir, tiny_clip_dir,
                                                                              colour_images):
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=2, request_tokens=K), quantize="none",
                       device="cpu")
    perception, found = model.perception, 3      # two CLS tokens, then one token per cell: the second cell's
    with torch.no_grad():                                              # every query's key lies on that token alone
        perception.read_query.weight.zero_()
        perception.read_query.bias.fill_(1.0)
        perception.token_position[found] = 100.0
    tokens, where = model.look(*some_requests(3), colour_images)
    image_tokens = model.visual_tokens(model.visual_features(colour_images))            # (3, T, 32)
    assert tokens.shape == (3, K, 32)
    expected = perception.request_rows + image_tokens[:, found:found + 1]              # the output starts at zero
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-4)
    cell = torch.zeros(4, 4)
    cell[:2, 2:] = 1                                                   # the second cell: top right of a 2 x 2 grid
    assert (where[:, cell.bool()].sum(1) > 0.45).all(), "the map shows the cell it read (and where patches drew it)"


def test_attention_over_the_patches_is_a_map_per_image(looking_model, colour_images):
    _, attention = looking_model.look(*some_requests(3), colour_images)
    assert attention.shape == (3, *looking_model.visual.grid_size)
    torch.testing.assert_close(attention.sum((1, 2)), torch.ones(3))
    assert not torch.allclose(attention[0], attention[2]), "each image gets its own map"


def test_prefill_reuses_the_prefix_and_equals_running_the_two_passes_whole(looking_model, colour_images):
    red, green, _ = colour_images
    segments = render([Turn("user", [red, green, "which is warmer?"])], looking_model.tokenizer, "chat", look=True)
    with torch.no_grad():
        last, cache, looked = looking_model.prefill(segments)
        first = next(i for i, s in enumerate(segments) if isinstance(s, Look))
        head = looking_model.embed_segments(segments[:first])
        probe = looking_model.perception.request_rows[:1]
        pass1, _ = looking_model.hidden_states(torch.cat([head, probe]).unsqueeze(0))
        request = pass1[:, -question_positions(segments[:first]):].expand(2, -1, -1)    # the question and the row
        tokens, attention = looking_model.look(request, torch.ones(request.shape[:2], dtype=torch.bool), [red, green])
        whole = torch.cat([head, looking_model.embed_segments(segments[first:], tokens)]).unsqueeze(0)
        reference, _ = looking_model.hidden_states(whole)
    torch.testing.assert_close(last, reference[0, -1])
    assert cache.get_seq_length() == whole.shape[1]
    assert [lk.image for lk in looked] == [red, green]
    torch.testing.assert_close(torch.stack([lk.attention for lk in looked]), attention)


def test_asking_again_reads_the_question_again_though_the_prompt_is_remembered(looking_model, colour_images):
    red = colour_images[0]
    segments = render([Turn("user", [red, "what colour is it?"])], looking_model.tokenizer, "chat", look=True)
    looking_model.prefixes.clear()
    with torch.no_grad():
        first_last, _, first_looked = looking_model.prefill(segments)
        again_last, _, again_looked = looking_model.prefill(segments)                      # a Retry: head remembered
    torch.testing.assert_close(again_last, first_last)
    torch.testing.assert_close(again_looked[0].attention, first_looked[0].attention)


def test_training_loss_equals_the_whole_sequence_and_trains_the_request_module(looking_model, colour_images):
    red, green, blue = colour_images
    examples = [Example([Turn("user", [red, "what colour is it?"]), Turn("assistant", ["red."])]),
                Example([Turn("user", [green, "describe the image."]), Turn("assistant", ["a green one."]),
                         Turn("user", ["what colour?"]), Turn("assistant", ["green."])]),
                Example([Turn("user", [blue, "describe the image."]), Turn("assistant", ["a blue square."])])]
    looking_model.zero_grad(set_to_none=True)
    out = looking_model(examples)
    out.loss.backward()
    grads = {n: p.grad for n, p in looking_model.named_parameters() if p.grad is not None}
    assert {"perception.output.weight", "perception.query.weight"} <= set(grads)
    assert "perception.request_rows" in grads, "pass 1's request row learns too"
    assert not any(n.startswith("lm.") for n in grads)
    looking_model.zero_grad(set_to_none=True)
    torch.testing.assert_close(out.caption_loss, loss_as_the_app_reads_them(looking_model, examples), rtol=1e-4,
                               atol=1e-5)


def loss_as_the_app_reads_them(model: GroundedLM, examples: list[Example]) -> torch.Tensor:
    """The examples' mean target cross-entropy, each prompt prefilled as the app does, then its target."""
    losses, counts = [], []
    with torch.no_grad():
        for example in examples:
            prompt, target = render_with_target(example.turns, model.tokenizer, "chat", look=True)
            last, cache, _ = model.prefill(prompt)
            target_ids = torch.tensor([t for s in target for t in s])
            target_embeds = model.embed_ids(target_ids).unsqueeze(0)
            hidden, _ = model.hidden_states(target_embeds, past_key_values=cache)
            predictors = torch.cat([last.unsqueeze(0), hidden[0, :-1]])
            losses.append(F.cross_entropy(model.logits(predictors), target_ids, reduction="sum"))
            counts.append(len(target_ids))
    return sum(losses) / sum(counts)


def test_word_decisions_compare_the_same_question_rows_in_training_as_in_the_app(tiny_lm_dir, tiny_clip_dir,
                                                                                   colour_images):
    torch.manual_seed(2)
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=2, tokens_per_cell=2, request_tokens=K,
                                   word_decisions=True), quantize="none", device="cpu")
    with torch.no_grad():
        for p in model.perception.parameters():
            p.add_(0.05 * torch.randn_like(p))
    red, green, _ = colour_images
    examples = [Example([Turn("user", [red, "is there a red circle?"]), Turn("assistant", ["yes."])]),
                Example([Turn("user", [green, "describe the image."]), Turn("assistant", ["a green one."]),
                         Turn("user", ["how many circles?"]), Turn("assistant", ["1."])])]
    out = model(examples)
    out.loss.backward()
    assert model.perception.words.decide[0].weight.grad is not None, "the decisions train with the module"
    torch.testing.assert_close(out.caption_loss, loss_as_the_app_reads_them(model, examples), rtol=1e-4, atol=1e-5)


def test_word_decisions_are_fitted_on_the_answers_and_nothing_else_of_the_checkpoint_changes(tiny_lm_dir,
                                                                                              tiny_clip_dir, tmp_path):
    looking = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=2, tokens_per_cell=2, request_tokens=K),
                         quantize="none", device="cpu")
    looking.save_pretrained(tmp_path / "looking")
    (tmp_path / "looking" / "training.json").write_text('{"holdout_kept_out": true}')
    summary = fit_word_decisions.fit(fit_word_decisions.parse_args([
        "--init", str(tmp_path / "looking"), "--out", str(tmp_path / "deciding"), "--questions", "12",
        "--val-questions", "4", "--steps", "60", "--val-every", "20", "--device", "cpu"]))
    assert set(summary["val"]) == set(fit_word_decisions.KINDS) and summary["holdout_kept_out"]
    assert summary["history"]["loss"][-1] < summary["history"]["loss"][0]
    assert (tmp_path / "deciding" / fit_word_decisions.CURVE_NAME).read_bytes()[:4] == b"\x89PNG"
    deciding = GroundedLM.from_pretrained(tmp_path / "deciding", quantize="none")
    assert deciding.config.word_decisions
    for name, value in looking.state_dict().items():  # the checkpoint is as it was: only the decisions are new
        assert torch.equal(deciding.state_dict()[name], value), name
    assert not deciding.perception.words.tally.weight.any(), "the tally waits for question training"
    with pytest.raises(SystemExit, match="before word decisions"):
        train_looking.pretrain(train_looking.parse_args(["--init", str(tmp_path / "deciding"), "--out",
                                                         str(tmp_path / "again")]))


def test_the_reply_shows_where_it_looked_first_unless_switched_off(looking_model, colour_images):
    red = colour_images[0]
    turns = [Turn("user", [red, "what colour is it?"])]
    events = list(stream_reply(looking_model, turns, GenerationSettings(max_new_tokens=3)))
    assert isinstance(events[0], Looked) and events[0].image is red
    assert not any(isinstance(e, Looked) for e in events[1:])
    off = list(stream_reply(looking_model, turns, GenerationSettings(max_new_tokens=3, look=False)))
    assert not any(isinstance(e, Looked) for e in off)
    text_only = list(stream_reply(looking_model, [Turn("user", ["hello there"])], GenerationSettings(max_new_tokens=3)))
    assert not any(isinstance(e, Looked) for e in text_only), "no image in the conversation: nothing to ask"


@pytest.fixture(scope="module")
def gated_model(tiny_lm_dir, tiny_clip_dir):
    """A tiny model with a request module and a look gate whose decision is its bias alone (set per test)."""
    torch.manual_seed(1)
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=2, request_tokens=K, look_gate=True),
                       quantize="none", device="cpu")
    with torch.no_grad():
        model.perception.output.weight.normal_(std=0.05)
        model.perception.gate[1].weight.zero_()
    return model


def gate_says(model: GroundedLM, looks: bool) -> None:
    with torch.no_grad():
        model.perception.gate[1].bias.fill_(10.0 if looks else -10.0)


def test_a_turn_without_its_own_image_looks_only_where_the_gate_says_it_asks_about_the_earlier_one(gated_model,
                                                                                                   colour_images):
    red, green, _ = colour_images
    tokenizer = gated_model.tokenizer
    follow_up = [Turn("user", [red, "describe the image."]), Turn("assistant", ["red."]),
                 Turn("user", ["show me a picture of a green one."])]
    with_image = [Turn("user", [green, "show me a picture of a green one."])]
    gate_says(gated_model, False)
    gated_model.prefixes.clear()
    with torch.no_grad():
        last, cache, looked = gated_model.prefill(render(follow_up, tokenizer, "chat", look=True))
        unlooked = gated_model.embed_segments(render(follow_up, tokenizer, "chat"))
        reference, _ = gated_model.hidden_states(unlooked.unsqueeze(0))
        batched, batched_looked = gated_model.embed_prompt(render(follow_up, tokenizer, "chat", look=True))
        _, _, own_looked = gated_model.prefill(render(with_image, tokenizer, "chat", look=True))
    assert looked == [] and batched_looked == [], "declined: nowhere looked"
    torch.testing.assert_close(last, reference[0, -1])  # the prompt read is the one without request tokens
    assert cache.get_seq_length() == len(unlooked)
    torch.testing.assert_close(batched, unlooked)
    assert [lk.image for lk in own_looked] == [green], "a turn with its own image always looks"
    events = list(stream_reply(gated_model, follow_up, GenerationSettings(max_new_tokens=3)))
    assert not any(isinstance(e, Looked) for e in events)
    assert events[-1].stats["prompt_tokens"] == count_tokens(render(follow_up, tokenizer, "chat"),
                                                                 gated_model.config.tokens_per_image)

    gate_says(gated_model, True)
    events = list(stream_reply(gated_model, follow_up, GenerationSettings(max_new_tokens=3)))
    assert isinstance(events[0], Looked) and events[0].image is red


def test_the_look_gate_is_fitted_on_questions_and_requests_and_goes_onto_the_checkpoint(tiny_lm_dir, tiny_clip_dir,
                                                                                        tmp_path, colour_images):
    looking = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=2, request_tokens=K),
                         quantize="none", device="cpu")
    looking.save_pretrained(tmp_path / "looking")
    (tmp_path / "looking" / "training.json").write_text("{}")  # the question training's summary: kept
    summary = train_look_gate.fit(train_look_gate.parse_args([
        "--init", str(tmp_path / "looking"), "--out", str(tmp_path / "looking"), "--run-dir",
        str(tmp_path / "run"), "--conversations", "16", "--val-conversations", "8", "--steps", "40",
        "--val-every", "20", "--cache-batch", "8", "--device", "cpu"]))
    history = summary["history"]
    assert history["loss"][-1] < history["loss"][0]
    assert set(summary["val"]) == {*train_look_gate.KINDS, "all"}
    gated = GroundedLM.from_pretrained(tmp_path / "looking", quantize="none")
    assert gated.config.look_gate and (tmp_path / "looking" / "training.json").read_text() == "{}"
    assert (tmp_path / "looking" / train_look_gate.CURVE_NAME).read_bytes()[:4] == b"\x89PNG"
    for name, value in looking.perception.state_dict().items():  # the module is as it was: only the gate is new
        assert torch.equal(gated.perception.state_dict()[name], value)
    # the decisions fitted are the app's: a conversation looks in `prefill` exactly where the gate's state says
    for index in range(4):
        turns, kind = train_look_gate.conversation("train", index, 32, True)
        assert not turns[-1].images and turns[-2].role == "assistant"
        assert (kind == "question") == (index % 2 == 0)
        segments = render(turns, gated.tokenizer, "chat", look=True)
        state = train_look_gate.row_states(gated, [(turns, kind)], 1, "test")
        with torch.no_grad():
            _, _, looked = gated.prefill(segments)
        assert bool(looked) == bool(gated.perception.asks_about_image(state).item() > 0)
    assert train_look_gate.conversation("val", 3, 32, True)[0][-1].text == \
        train_look_gate.conversation("val", 3, 32, True)[0][-1].text


def test_a_checkpoint_gains_a_request_module_and_keeps_it(tiny_lm_dir, tiny_clip_dir, tmp_path, colour_images):
    plain = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    plain.save_pretrained(tmp_path / "plain")
    plain = GroundedLM.from_pretrained(tmp_path / "plain", quantize="none")
    assert plain.perception is None and plain.config.request_tokens == 0
    grown = GroundedLM.from_pretrained(tmp_path / "plain", quantize="none", request_tokens=K)
    with torch.no_grad():
        grown.perception.output.weight.normal_()
    grown.save_pretrained(tmp_path / "grown")
    reloaded = GroundedLM.from_pretrained(tmp_path / "grown", quantize="none")
    assert reloaded.config.request_tokens == K
    for name, value in grown.perception.state_dict().items():
        assert torch.equal(reloaded.perception.state_dict()[name], value)
    with pytest.raises(ValueError, match="request module of 3 tokens, not 5"):
        GroundedLM.from_pretrained(tmp_path / "grown", quantize="none", request_tokens=5)


def test_batched_evaluation_looks_as_the_app_does(looking_model, colour_images):
    conversations = [[Turn("user", [image, text])] for image, text in
                     zip(colour_images, ("what colour is it?", "describe the image.", "is there a red circle?"))]
    batched = greedy_replies(looking_model, conversations, max_new_tokens=6)
    for turns, reply in zip(conversations, batched):
        streamed = "".join(e.delta for e in stream_reply(looking_model, turns, GenerationSettings(max_new_tokens=6))
                           if isinstance(e, Text))
        assert reply.text == streamed


def test_the_question_evaluation_writes_rows_plots_and_where_it_looked(looking_model, tmp_path, capsys):
    looking_model.save_pretrained(tmp_path / "looking")
    out = tmp_path / "not yet made" / "questions.json"
    rows = evaluate_questions.main(["--checkpoint", str(tmp_path / "looking"), "--label", "tiny", "--per-kind", "2",
                                    "--kinds", "attribute", "count", "--device", "cpu", "--quantize", "none",
                                    "--out", str(out)])
    assert set(rows["tiny"]["splits"]) == {"test", "holdout"}
    assert set(rows["tiny"]["splits"]["test"]) == {"attribute", "count"}
    for split in rows["tiny"]["splits"].values():
        for kind in split.values():  # every wrong answer is kept, and only those
            assert len(kind["mistakes"]) == round(kind["n"] * (1 - kind["accuracy"]))
    assert json.loads(out.read_text())["tiny"]["request_tokens"] == K
    for picture in (out.with_suffix(".png"), out.with_name("questions_looked_tiny.png")):
        assert picture.read_bytes()[:4] == b"\x89PNG"
    assert "| tiny |" in capsys.readouterr().out


def test_the_heat_map_is_the_square_the_encoder_saw_brightest_where_it_looked():
    attention = torch.zeros(4, 4)
    attention[0, 0] = 1.0                                    # all of it on the top-left patch
    picture = heat_map(Image.new("RGB", (300, 200), "grey"), attention, size=128)
    assert picture.size == (128, 128), "the centre square, as the encoder's preprocessing crops it"
    brightness = torch.tensor(list(picture.convert("L").getdata()), dtype=torch.float).view(128, 128)
    assert brightness[:16, :16].mean() > brightness[-32:, -32:].mean() + 30
