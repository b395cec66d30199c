"""Evaluation: recall on hand-made scores, captions scored by attribute, batched decoding and [RET] queries
that agree with the app's own decoding, and the command end to end on a tiny checkpoint."""
import json
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from conftest import tiny_config
from model.training.evaluate import (caption_scores, greedy_replies, main, names, recall_at_k, reply_logits,
                                     reply_positions, ret_queries, same_scene, text_only_nll)
from model.generate import GenerationSettings, Retrieved, Text, stream_reply
from model.grounded import GroundedLM
from model.prompt import Turn, render, render_with_target
from model.world.shapes import SHAPES, Scene, SceneObject


def test_recall_at_k_on_hand_made_scores():
    scores = torch.tensor([[0.9, 0.1, 0.5],   # own item first
                           [0.2, 0.3, 0.8],   # one item above its own
                           [0.7, 0.6, 0.1]])  # two above
    own = torch.eye(3, dtype=torch.bool)
    assert recall_at_k(scores, own, (1, 2, 3)) == pytest.approx({"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0})
    # Several relevant items: the best-scoring one counts, and relevant items never push each other down.
    relevant = own.clone()
    relevant[2, 0] = relevant[1, 2] = True
    assert recall_at_k(scores, relevant, (1,)) == {"R@1": 1.0}
    with pytest.raises(ValueError, match="at least one relevant"):
        recall_at_k(scores, torch.zeros(3, 3, dtype=torch.bool))


def test_a_wrong_colour_is_wrong_for_colour_and_scene_only():
    truth = Scene((SceneObject("circle", "red", "small", "left"),), "grey")
    assert caption_scores([truth], ["A small red circle on the left."])["1"]["exact"] == 1.0
    scores = caption_scores([truth], ["There is a little BLUE circle to the left!"])["1"]
    assert scores == {"n": 1, "exact": 0.0, "count": 1.0, "shape": 1.0, "colour": 0.0, "size": 1.0, "position": 1.0,
                      "shape_colour": 0.0, "first_named": 0.0, "objects_named": 1.0}


def test_a_description_that_goes_on_is_still_read_for_what_it_names_first():
    truth = Scene((SceneObject("triangle", "white", "small", "left"),), "grey")
    looping = "The image is a white triangle with an image of a white triangle and a red star."
    scores = caption_scores([truth], [looping])["1"]
    assert scores["first_named"] == 1.0 and scores["objects_named"] == 3.0
    assert scores["shape_colour"] == 0.0, "it names more objects than the scene holds"
    wrong_first = caption_scores([truth], ["A red star next to a white triangle."])["1"]
    assert wrong_first["first_named"] == 0.0 and wrong_first["objects_named"] == 2.0


def test_caption_scores_are_grouped_by_number_of_objects():
    one = Scene((SceneObject("star", "green", "large", "top"),), "beige")
    two = Scene((SceneObject("square", "black", "small", "right"), SceneObject("cross", "white", "large", "centre")),
                "grey")
    result = caption_scores([one, two, two], [
        "A big green star at the top.",
        "A small black square on the right and a large white cross in the middle.",  # other words, same scene
        "A small black square on the right.",                                        # one object missed
    ])
    assert result["1"]["n"] == 1 and result["1"]["exact"] == 1.0
    assert result["2"]["n"] == 2 and result["2"]["exact"] == 0.5 and result["2"]["count"] == 0.5
    assert result["2"]["shape"] == pytest.approx(0.75)  # the missed cross scores 0 on shape
    assert result["all"]["n"] == 3 and result["all"]["exact"] == pytest.approx(2 / 3)
    assert "3" not in result
    nothing = caption_scores([one], ["I cannot tell."])["1"]
    assert nothing["exact"] == nothing["shape"] == nothing["count"] == 0.0


def test_a_caption_naming_the_background_only_matches_that_background():
    red = (SceneObject("circle", "red", "small", "left"),)
    scenes = [Scene(red, "grey"), Scene(red, "beige"), Scene((SceneObject("circle", "blue", "small", "left"),), "grey")]
    relevant = same_scene(scenes[:1] * 2, scenes, ["A small red circle on the left.",
                                                   "A small red circle on the left on a grey background."])
    assert relevant.tolist() == [[True, True, False], [True, False, False]]


@dataclass(frozen=True)
class Hit:
    id: int


@pytest.fixture(scope="module")
def eager_ret_model(tiny_lm_dir, tiny_clip_dir):
    """A tiny model whose [RET] row points along a prompt's last hidden state: its replies emit [RET] at once
    (the shared tiny model's never do)."""
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    hidden, _ = model.hidden_states(model.embed_conversation([Turn("user", [Image.new("RGB", (40, 40), "red"),
                                                                           "describe it"])]))
    with torch.no_grad():
        model.ret_embedding.copy_(hidden[0, -1] / hidden[0, -1].norm())
    return model


def conversations(images):
    red, green, blue = images
    return [[Turn("user", [red, "describe it"])],
            [Turn("user", ["what colour is the sky?"])],
            [Turn("user", [green, "describe the image."]), Turn("assistant", ["a green one"]),
             Turn("user", [blue, "and this one? show me a picture of a red circle"])]]


def test_batched_greedy_replies_match_the_apps_decoding(tiny_model, eager_ret_model, colour_images):
    convs, endings = conversations(colour_images), set()
    for model in (tiny_model, eager_ret_model):
        replies = greedy_replies(model, convs, max_new_tokens=10, batch_size=3, queries=True)
        for turns, reply in zip(convs, replies):
            queries = []
            events = list(stream_reply(model, turns, GenerationSettings(max_new_tokens=10, max_images=1),
                                       search=lambda q, exclude, queries=queries: queries.append(q) or [Hit(0)]))
            before = events[:next((i for i, e in enumerate(events) if isinstance(e, Retrieved)), len(events))]
            expected = "".join(e.delta for e in before if isinstance(e, Text))
            # stream_reply holds back a trailing half character; the batched reply keeps it as U+FFFD.
            assert reply.text.rstrip("\ufffd") == expected
            assert reply.ret == bool(queries)
            if reply.ret:  # the query is the hidden state where [RET] is the input, as in the app
                assert torch.allclose(reply.query, queries[0], atol=1e-5)
            endings.add(reply.ret)
    assert endings == {True, False}, "replies with and without [RET] are both exercised"


@pytest.fixture
def late_ret_model(tiny_lm_dir, tiny_clip_dir):
    """A tiny model whose [RET] row points along the hidden state after a reply's first token and is orthogonal to
    the opening's: greedy decoding opens a description, then retrieves. -> (model, the conversation)"""
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    turns = [Turn("user", [Image.new("RGB", (40, 40), "red"), "describe it"])]
    prompt = model.embed_conversation(turns)
    hidden, _ = model.hidden_states(prompt)
    opening = hidden[0, -1]
    first = model.embed_ids(torch.tensor([[int(model.logits(opening).argmax())]]))
    after, _ = model.hidden_states(torch.cat([prompt, first], 1))
    row = after[0, -1] - (after[0, -1] @ opening) / (opening @ opening) * opening
    with torch.no_grad():
        model.ret_embedding.copy_(1e3 * row / row.norm() ** 2)
    assert model.logits(opening).argmax() != model.ret_id and model.logits(after[0, -1]).argmax() == model.ret_id
    return model, turns


def test_a_checkpoint_whose_ret_opens_replies_never_retrieves_inside_one(late_ret_model):
    model, turns = late_ret_model
    assert greedy_replies(model, [turns], max_new_tokens=6)[0].ret, "left free, it retrieves after a word"
    model.config.ret_opens_reply = True
    reply = greedy_replies(model, [turns], max_new_tokens=6)[0]
    events = list(stream_reply(model, turns, GenerationSettings(max_new_tokens=6), search=lambda q, exclude: [Hit(0)]))
    assert not reply.ret and not any(isinstance(e, Retrieved) for e in events)
    assert reply.text == "".join(e.delta for e in events if isinstance(e, Text)), "the app decodes the same"


def test_a_reply_without_ret_gets_one_forced_at_its_end(tiny_model, colour_images):
    model, convs = tiny_model, conversations(colour_images)
    for turns, reply in zip(convs, greedy_replies(model, convs, max_new_tokens=10, queries=True)):
        assert not reply.ret
        ids = model.tokenizer(reply.text, add_special_tokens=False).input_ids
        sequence = torch.cat([model.embed_conversation(turns),
                              model.embed_ids(torch.tensor([ids + [model.ret_id]]))], 1)
        hidden, _ = model.hidden_states(sequence)
        assert torch.allclose(reply.query, model.ret_query(hidden[0, -1]), atol=1e-5)


def test_teacher_forced_queries_do_not_depend_on_the_batch(tiny_model, colour_images):
    red, green, _ = colour_images
    convs = [[Turn("user", ["show me a red square"]), Turn("assistant", ["[RET]"])],
             [Turn("user", [green, "describe it"]), Turn("assistant", ["A green one."]),
              Turn("user", ["find a much longer description of a picture of a red one"]),
              Turn("assistant", ["A red one. [RET] Here it is."])]]
    batched, _ = ret_queries(tiny_model, convs, batch_size=2)
    assert batched.shape == (2, 8)
    for turns, query in zip(convs, batched):
        prompt, target = render_with_target(turns, tiny_model.tokenizer, "chat")
        embeds = torch.cat([tiny_model.embed_segments(prompt), tiny_model.embed_segments(target)]).unsqueeze(0)
        ids = [t for s in target for t in s]
        at = len(tiny_model.embed_segments(prompt)) + ids.index(tiny_model.ret_id)
        hidden, _ = tiny_model.hidden_states(embeds[:, :at + 1])
        assert torch.allclose(query, tiny_model.ret_query(hidden[0, -1]), atol=1e-5)
    with pytest.raises(ValueError, match=r"holds no \[RET\]"):
        ret_queries(tiny_model, [[Turn("user", ["hi"]), Turn("assistant", ["hello"])]])


def test_every_token_of_a_reply_gets_the_state_where_it_is_predicted(tiny_model, colour_images):
    red, green, _ = colour_images
    convs = [[Turn("user", [red, "describe it"]), Turn("assistant", ["A red one."])],
             [Turn("user", [green, "and this one?"]), Turn("assistant", ["A green one, on the left of a red one."])]]
    states, ids, reply = reply_positions(tiny_model, convs, batch_size=2)
    for i, turns in enumerate(convs):
        prompt, target = render_with_target(turns, tiny_model.tokenizer, "chat")
        opened = len(tiny_model.embed_segments(prompt))
        target_ids = [t for s in target for t in s]
        hidden, _ = tiny_model.hidden_states(
            torch.cat([tiny_model.embed_segments(prompt), tiny_model.embed_segments(target)]).unsqueeze(0))
        assert ids[reply == i].tolist() == target_ids
        assert torch.allclose(states[reply == i], hidden[0, opened - 1:opened - 1 + len(target_ids)], atol=1e-5)


def test_requests_after_one_history_read_it_once_and_each_gets_its_own_query(tiny_model, colour_images,
                                                                            monkeypatch):
    red, green, _ = colour_images
    history = [Turn("user", [red, "describe it"]), Turn("assistant", ["A red one."]),
               Turn("user", [green, "and this?"]), Turn("assistant", ["A green one."])]
    requests = [[Turn("user", [text]), Turn("assistant", ["[RET]"])]
                for text in ("show me a blue one", "another like the first one", "a red square, please")]
    alone = torch.cat([ret_queries(tiny_model, [history + r])[0] for r in requests])
    widths, forward = [], tiny_model.hidden_states

    def counted(inputs, *args, **kwargs):
        widths.append(tuple(inputs.shape[:2]))                                              # (rows, positions)
        return forward(inputs, *args, **kwargs)

    monkeypatch.setattr(tiny_model, "hidden_states", counted)
    together, _ = ret_queries(tiny_model, [history + r for r in requests], batch_size=3)
    assert torch.allclose(together, alone, atol=1e-5)
    assert [w[0] for w in widths] == [1, 3], "the history read once, then the three requests together"
    lengths = [sum(len(tiny_model.embed_segments(part)) for part in render_with_target(history + r,
                                                                                      tiny_model.tokenizer, "chat"))
               for r in requests]
    assert widths[0][1] + widths[1][1] == max(lengths), "no position of the history read twice"


def test_a_reply_opening_with_ret_is_scored_as_decoding_would_go(tiny_model, eager_ret_model, colour_images):
    """The teacher-forced query of "[RET]" is the app's query, and `emitted` says whether greedy decoding
    would have opened the reply with [RET] itself."""
    prompts = conversations(colour_images)
    for model in (tiny_model, eager_ret_model):
        queries, emitted = ret_queries(model, [p + [Turn("assistant", ["[RET]"])] for p in prompts])
        replies = greedy_replies(model, prompts, max_new_tokens=4, queries=True)
        assert emitted.tolist() == [r.ret and r.text == "" for r in replies]
        for query, reply, was_emitted in zip(queries, replies, emitted):
            if was_emitted:
                assert torch.allclose(query, reply.query, atol=1e-5)
    assert not ret_queries(tiny_model, [prompts[0] + [Turn("assistant", ["[RET]"])]])[1].any()
    assert ret_queries(eager_ret_model, [prompts[0] + [Turn("assistant", ["[RET]"])]])[1].all()


def test_the_command_writes_json_a_plot_and_a_table(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "eval" / "result.json"
    main(["--checkpoint", str(tmp_path / "ckpt"), "--split", "test", "--gallery", "12", "--limit", "4",
          "--contexts", "3", "--device", "cpu", "--quantize", "none", "--batch-size", "6", "--max-new-tokens", "6",
          "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["splits"]) == {"test", "holdout"}
    test = result["splits"]["test"]
    assert test["captioning"]["all"]["n"] == 4
    assert test["captioning"]["all"]["exact"] == 0.0, "an untrained model describes no scene exactly"
    assert test["retrieval"]["gallery"] == 12
    for key in ("text_to_image", "text_to_image_own", "image_to_text", "image_to_text_own"):
        assert set(test["retrieval"][key]) == {"R@1", "R@5", "R@10"}
    assert result["context"]["gallery"] == 9 and set(result["context"]) >= {"with_context", "without_context", "new_request", "new_image"}
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "exact scene" in printed and "text -> image" in printed and "a request for a new scene after three images" in printed
    assert "[RET] emitted when asked for a picture" in printed


def test_text_only_nll_is_the_lms_own_loss_on_the_reply_after_the_bare_instruction(tiny_lm_dir, tiny_clip_dir):
    describer = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, retrieves=False), quantize="none")  # no [RET] mass
    instructions, texts = ["Describe the image.", "What do you see?"], ["a red circle", "the quick brown fox jumps"]
    nll = text_only_nll(describer, instructions, texts)
    for instruction, text, got in zip(instructions, texts, nll):
        prompt = render([Turn("user", [instruction])], describer.tokenizer, "chat")[0]
        reply = describer.tokenizer.encode(text, add_special_tokens=False)
        logits = describer.lm(torch.tensor([prompt + reply])).logits[0, len(prompt) - 1:-1]
        assert got == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor(reply)).item(), abs=1e-4)


def test_compare_describes_the_same_images_with_each_checkpoint_under_one_judge(tiny_model, tiny_clip_dir, tmp_path,
                                                                                capsys):
    tiny_model.save_pretrained(tmp_path / "a")
    other = GroundedLM(tiny_config(tiny_model.config.lm, tiny_clip_dir, retrieves=False), quantize="none")
    other.save_pretrained(tmp_path / "b")
    out = tmp_path / "compare.json"
    main(["--compare", f"first={tmp_path / 'a'}", "--compare", f"second={tmp_path / 'b'}", "--limit", "4",
          "--device", "cpu", "--max-new-tokens", "6", "--out", str(out)])
    result = json.loads(out.read_text())
    first, second = result["models"]["first"], result["models"]["second"]
    assert [e["truth"] for e in first["examples"]] == [e["truth"] for e in second["examples"]]
    assert result["judge"] == f"local-dir:{tiny_clip_dir}"
    for model in (first, second):
        assert -1 <= model["clip_score"] <= 1 and model["all"]["n"] == 4
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for model in (first, second):
        assert set(model["slots"]) == {"shape", "colour"}
        assert all(v is None or 0 <= v <= 1 for v in model["slots"].values())
    printed = capsys.readouterr().out
    assert "| one object: shape and colour both right |" in printed and "| degenerate descriptions |" in printed
    assert '| one object: says the shape after "The shape is a" |' in printed
    assert "| one object: the first object named has its shape and colour |" in printed
    assert "| one object: objects named per description |" in printed
    with pytest.raises(SystemExit, match="NAME=CHECKPOINT"):
        main(["--compare", str(tmp_path / "a")])


def test_a_slot_is_filled_by_a_token_that_begins_the_right_word_and_no_other():
    assert names(" hex", "hexagon", SHAPES) and names("Star", "star", SHAPES)
    assert not names(" s", "star", SHAPES), "begins square too"
    assert not names(" circle", "star", SHAPES) and not names(" ", "star", SHAPES)


def test_a_checkpoint_that_does_not_retrieve_is_evaluated_on_describing_alone(tiny_lm_dir, tiny_clip_dir, tmp_path,
                                                                             capsys):
    GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, retrieves=False), quantize="none").save_pretrained(tmp_path / "c")
    out = tmp_path / "result.json"
    result = main(["--checkpoint", str(tmp_path / "c"), "--gallery", "6", "--limit", "3", "--contexts", "3",
                   "--device", "cpu", "--max-new-tokens", "4", "--out", str(out)])
    assert result["splits"]["test"]["retrieval"] is None and "context" not in result
    assert result["splits"]["test"]["captioning"]["ret_emitted"] == 0
    assert "text -> image" not in capsys.readouterr().out and out.with_suffix(".png").is_file()


def test_reply_logits_with_the_opening_run_once_equal_the_rows_run_whole(tiny_model, colour_images):
    prompts = [render([Turn("user", [image, text])], tiny_model.tokenizer, "chat")
               for image, text in zip(colour_images, ("Describe the image.", "What do you see?", "Hi"))]
    prefix = tiny_model.shared_prefix(prompts)
    assert prefix, "the chat template's header opens every prompt"
    replies = [torch.tensor(ids) for ids in ([5, 6, 7], [8], [9, 10])]
    with torch.no_grad():
        whole = reply_logits(tiny_model, [tiny_model.embed_segments(p) for p in prompts], replies)
        rest = [[p[0][len(prefix):], *p[1:]] for p in prompts]
        shared = reply_logits(tiny_model, [tiny_model.embed_segments(p) for p in rest], replies, prefix)
    for a, b in zip(whole, shared):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
