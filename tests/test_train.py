"""Stage-2 training: conversations in the app's own form, losses that fall, checkpoints that load, resume."""
import json
import math
import random
import shutil
from collections import Counter

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import Subset

from conftest import make_sensitive_lm, tiny_config
from model.config import CONFIG_NAME, WEIGHTS_NAME, GroundedConfig
from model.grounded import GroundedLM
from model.lm import compute_dtype_for
from model.prompt import REQUESTS, render_with_target, request_phrase
from model.training.conversations import CONTEXT_EVERY, INSTRUCTIONS, Conversations, QuestionConversations, sentence
from model.training.train import (LATER_OPTIONS, STATE_FORMAT, STATE_NAME, TRAINABLE, holdout_kept_out, load_state,
                                  main, optimizer_for, parse_args, read_state, run_options, validate)
from model.world import questions, shapes
from model.world.questions import reply_answer
from model.world.data import ShapesDataset, TsvCaptionDataset

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")


@pytest.fixture(scope="module")
def seeing_lm_dir(tiny_lm_dir, tmp_path_factory):
    """The tiny LM with weights ~N(0, 0.1): the [RET] vector of a hidden state that depends on the caption."""
    return make_sensitive_lm(tiny_lm_dir, tmp_path_factory.mktemp("seeing_lm"), 0.1)


@pytest.fixture(scope="module")
def colour_tsv(tmp_path_factory):
    """Image-caption pairs in FROMAGe's TSV layout: plain squares of eight colours; the last two validate."""
    folder = tmp_path_factory.mktemp("pairs")
    rows = ["caption\timage"]
    for colour in COLOURS:
        Image.new("RGB", (32, 32), colour).save(folder / f"{colour}.png")
        rows.append(f"a {colour} square\t{colour}.png")
    (folder / "pairs.tsv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.tsv"


def args_for(lm_dir, clip_dir, tmp_path, *extra):
    return ["--out", str(tmp_path / "out"), "--run-dir", str(tmp_path / "run"), "--lm", str(lm_dir),
            "--visual", f"local-dir:{clip_dir}", "--n-visual-tokens", "2", "--region-grid", "2", "--emb-dim", "8",
            "--quantize", "none",
            "--device", "cpu", "--batch-size", "8", "--val-size", "8", *extra]


def test_captions_and_requests_are_written_as_a_user_would_read_them():
    assert sentence("a big red star  at the top") == "A big red star at the top."
    assert sentence("What is this?") == "What is this?"
    assert request_phrase("There are a big red star and a small blue circle.") == \
        "a big red star and a small blue circle"
    assert request_phrase("A picture of a little green cross in the middle.") == "a little green cross in the middle"
    assert request_phrase("NASA launches a rocket.") == "NASA launches a rocket"
    with pytest.raises(ValueError, match="empty caption"):
        sentence("  ")


def test_conversations_are_the_apps_own_prompts_half_captioning_half_retrieval(tiny_model):
    data = ShapesDataset("train", 1000, 32)
    batch = Conversations(data, seed=0).batch(0, 8)
    captioning, retrieval = batch[:4], batch[4:]
    for example in captioning:
        user, assistant = example.turns
        assert isinstance(user.parts[0], Image.Image) and user.parts[1] in INSTRUCTIONS
        assert assistant.text[0].isupper() and assistant.text.endswith(".") and "[RET]" not in assistant.text
        scene = shapes.parse_caption(assistant.text)
        assert assistant.text == shapes.plain_caption(scene), "one description per scene: the model's own"
        assert example.ret_images == []
    for example in retrieval:
        user, assistant = example.turns
        assert not user.images and any(user.text.startswith(r.split("{}")[0]) for r in REQUESTS)
        assert assistant.text == "[RET]" and len(example.ret_images) == 1
        # The reply opens with [RET], the tokenizer's special token, and the template closes it right after.
        _, target = render_with_target(example.turns, tiny_model.tokenizer, "chat")
        ids = [t for s in target for t in s]
        assert ids[0] == tiny_model.ret_id and tiny_model.tokenizer.decode(ids[1:]).startswith("<|im_end|>")
    described: dict[str, list[bytes]] = {}
    for image, caption in (data[i] for i in range(len(data))):
        described.setdefault(request_phrase(caption), []).append(image.tobytes())
    for example in retrieval:  # the image to retrieve is one the request describes
        text = example.turns[0].text
        prefix, suffix = next(r.split("{}") for r in REQUESTS if text.startswith(r.split("{}")[0])
                              and text.endswith(r.split("{}")[1]))
        assert example.ret_images[0].tobytes() in described[text[len(prefix):len(text) - len(suffix)]]


def test_every_few_batches_carry_history_and_refer_back_to_earlier_pictures():
    data = ShapesDataset("train", 1000, 32)
    conversations = Conversations(data, seed=0)
    batch = conversations.batch(CONTEXT_EVERY - 1, 16)
    assert all(len(e.turns) >= 6 and e.turns[0].images for e in batch), "two or more captioned images first"
    back = [e for e in batch if "like the" in e.turns[-2].text]
    assert back, "some requests refer to an earlier picture"
    for example in back:
        ordinal = ("first", "second", "third").index(example.turns[-2].text.split("like the ")[1].split()[0])
        earlier_image = example.turns[2 * ordinal].images[0]
        assert example.turns[-1].text == "[RET]"
        target = example.ret_images[0]  # another rendering of that scene: same size, other pixels, same caption
        assert target.size == earlier_image.size and target.tobytes() != earlier_image.tobytes()
    assert conversations.batch(5, 4)[0].turns[1].text == Conversations(data, seed=0).batch(5, 4)[0].turns[1].text
    assert conversations.batch(5, 4)[0].turns[1].text != conversations.batch(6, 4)[0].turns[1].text


def test_how_often_batches_carry_history_is_a_choice():
    data = ShapesDataset("train", 1000, 32)
    multi_turn = lambda c: [len(c.batch(step, 2)[0].turns) > 2 for step in range(6)]  # noqa: E731
    assert multi_turn(Conversations(data, seed=0)) == [step % CONTEXT_EVERY == CONTEXT_EVERY - 1 for step in range(6)]
    assert multi_turn(Conversations(data, seed=0, context_every=2)) == [False, True] * 3
    assert multi_turn(Conversations(data, seed=0, context_every=1)) == [True] * 6
    with pytest.raises(ValueError, match="context_every"):
        Conversations(data, seed=0, context_every=0)


def test_training_on_a_tsv_reduces_both_losses(seeing_lm_dir, tiny_clip_dir, colour_tsv, tmp_path):
    rows = Subset(TsvCaptionDataset(colour_tsv), range(len(COLOURS) - 2))  # what it trains on
    fit = [Conversations(rows, seed=7).batch(i, 8) for i in range(2)]
    torch.manual_seed(0)  # train() seeds the same way: `before` is the model it starts from
    start = GroundedLM(tiny_config(seeing_lm_dir, tiny_clip_dir, region_grid=2), quantize="none", device="cpu")
    before = validate(start, fit)
    summary = main(args_for(seeing_lm_dir, tiny_clip_dir, tmp_path, "--tsv", str(colour_tsv), "--val-size", "2",
                            "--steps", "80", "--lr", "1e-2", "--val-every", "40"))
    assert summary["finished"] and summary["options"]["tsv"] == str(colour_tsv)
    after = validate(GroundedLM.from_pretrained(tmp_path / "out", quantize="none", device="cpu"), fit)
    assert after["caption"] < before["caption"] - 0.3
    assert after["ret"] < before["ret"] - 0.5
    assert after["ret"] < math.log(4), "better than chance: [RET] tells the 4 images of a batch apart"


def test_the_checkpoint_lands_in_out_beside_its_encoder(tiny_lm_dir, tiny_clip_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(tiny_clip_dir, out / "clip")  # as the demo's encoder sits in assets/demo/clip
    encoder_files = {p.name: p.read_bytes() for p in (out / "clip").iterdir()}
    main(args_for(tiny_lm_dir, out / "clip", tmp_path, "--steps", "2", "--val-every", "1"))
    assert {p.name: p.read_bytes() for p in (out / "clip").iterdir()} == encoder_files
    assert {p.name for p in out.iterdir()} == {"clip", CONFIG_NAME, WEIGHTS_NAME, "training_curve.png", "training.json"}
    assert (out / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert GroundedConfig.load(out).visual == "local-dir:clip", "named relative to the checkpoint: it can move"
    assert GroundedConfig.load(out).ret_opens_reply, "its requests were answered by [RET] first, so it decodes so"
    monkeypatch.chdir(tmp_path.parent)
    loaded = GroundedLM.from_pretrained(out, quantize="none", device="cpu")
    tensors, meta = read_state(tmp_path / "run" / STATE_NAME)
    for name, value in loaded.trainable_state_dict().items():
        assert torch.equal(value, tensors[f"model.{name}"])
    assert meta["step"] == 2 and meta["history"]["val_step"] == [1, 2]
    printed = capsys.readouterr().out
    assert "step 2/2" in printed and "val caption" in printed and "summary" in printed


def test_an_interrupted_run_resumes_where_it_stopped(tiny_lm_dir, tiny_clip_dir, tmp_path):
    straight = main(args_for(tiny_lm_dir, tiny_clip_dir, tmp_path / "straight", "--steps", "3", "--val-every", "3"))
    assert straight["finished"]
    cut = args_for(tiny_lm_dir, tiny_clip_dir, tmp_path / "cut", "--steps", "3", "--val-every", "3")
    first = main(cut + ["--time-limit", "0"])  # stops, resumable, after its first step
    assert not first["finished"] and first["step"] == 1
    assert not (tmp_path / "cut" / "out").exists(), "no checkpoint is exported before training ends"
    state_path = tmp_path / "cut" / "run" / STATE_NAME
    tensors, meta = read_state(state_path)
    assert meta["step"] == 1 and meta["history"]["step"] == [1]

    # The optimizer's moments and step count come back exactly as saved.
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=2, projector="mlp"), quantize="none",
                       device="cpu")
    optimizer = optimizer_for(model, 1e-3)
    load_state(state_path, model.trainable_state_dict(), optimizer, run_options(parse_args(cut)))
    restored = optimizer.state_dict()["state"]
    assert restored and all(torch.equal(value, tensors[f"optim.{i}.{key}"])
                            for i, state in restored.items() for key, value in state.items())
    assert all(float(s["step"]) == 1 for s in restored.values())

    with pytest.raises(SystemExit, match="--resume"):
        main(cut)  # refuses to start over a saved run
    with pytest.raises(ValueError, match="batch_size: 8 then, 4 now"):
        main(cut + ["--resume", "--batch-size", "4"])
    assert main(cut + ["--resume", "--time-limit", "0"])["step"] == 2
    resumed = main(cut + ["--resume"])
    assert resumed["finished"] and resumed["step"] == 3
    assert read_state(state_path)[1]["history"]["step"] == [1, 2, 3]
    a = GroundedLM.from_pretrained(tmp_path / "straight" / "out", quantize="none", device="cpu").trainable_state_dict()
    b = GroundedLM.from_pretrained(tmp_path / "cut" / "out", quantize="none", device="cpu").trainable_state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), f"{name} differs from the uninterrupted run"


def test_fine_tuning_starts_from_a_checkpoint_and_keeps_its_shape(tiny_lm_dir, tiny_clip_dir, tmp_path):
    main(args_for(tiny_lm_dir, tiny_clip_dir, tmp_path / "first", "--steps", "2", "--val-every", "2",
                  "--region-grid", "0", "--no-holdout"))
    first = GroundedLM.from_pretrained(tmp_path / "first" / "out", quantize="none", device="cpu")
    # lr 0: nothing moves, so the result is exactly where fine-tuning started; --emb-dim is the checkpoint's,
    # and --region-grid 2 gives it region tokens
    summary = main(args_for(tiny_lm_dir, tiny_clip_dir, tmp_path / "tuned", "--init", str(tmp_path / "first" / "out"),
                            "--lr", "0", "--steps", "1", "--val-every", "1", "--emb-dim", "16", "--holdout"))
    assert summary["options"]["emb_dim"] == 8 and summary["options"]["init"] == str(tmp_path / "first" / "out")
    assert summary["options"]["region_grid"] == 2
    assert summary["options"]["holdout"] and not summary["holdout_kept_out"], "its start saw the hold-out pairs"
    tuned = GroundedLM.from_pretrained(tmp_path / "tuned" / "out", quantize="none", device="cpu")
    after = tuned.trainable_state_dict()
    assert all(torch.equal(value, after[name]) for name, value in first.trainable_state_dict().items())
    assert tuned.config.region_grid == 2 and tuned.config.projector == first.config.projector == "mlp"
    assert "region_mapping.0.weight" in after, "the new region mapping is an MLP, as the checkpoint's CLS mapping"


def test_fine_tuning_computes_in_the_devices_dtype_whatever_the_checkpoint_was_trained_in(tiny_lm_dir, tiny_clip_dir,
                                                                                         tmp_path):
    GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu").save_pretrained(tmp_path / "start")
    assert GroundedConfig.load(tmp_path / "start").compute_dtype == "float32"
    device_dtype = str(compute_dtype_for(torch.device("cpu"))).removeprefix("torch.")  # bf16 where native
    for told, expected in ((None, device_dtype), ("float32", "float32")):
        extra = ("--compute-dtype", told) if told else ()
        summary = main(args_for(tiny_lm_dir, tiny_clip_dir, tmp_path / f"{told}", "--init", str(tmp_path / "start"),
                                "--steps", "1", "--val-every", "1", *extra))
        assert summary["compute_dtype"] == expected
        assert GroundedConfig.load(tmp_path / f"{told}" / "out").compute_dtype == expected, "the app loads it so"


def test_fine_tuning_a_checkpoint_keeps_the_reasoner_it_carries(tiny_lm_dir, tiny_clip_dir, tmp_path):
    start = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=2), quantize="none", device="cpu")
    start.add_reasoner(rank=2)
    start.save_pretrained(tmp_path / "start")
    main(args_for(tiny_lm_dir, tiny_clip_dir, tmp_path / "tuned", "--init", str(tmp_path / "start"), "--steps", "1",
                  "--val-every", "1"))
    tuned = GroundedLM.from_pretrained(tmp_path / "tuned" / "out", quantize="none", device="cpu")
    assert tuned.reasoner is not None
    adapter = "reasoner/adapter_model.safetensors"
    before, after = (load_file(folder / adapter) for folder in (tmp_path / "start", tmp_path / "tuned" / "out"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_weight_matrices_decay_and_position_tables_embeddings_and_biases_do_not(tiny_lm_dir, tiny_clip_dir):
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=2, request_tokens=2), quantize="none",
                       device="cpu")
    model.lm.requires_grad_(False)
    names = {id(p): name for name, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in group["params"]} for group in optimizer_for(model, 1e-3).param_groups)
    assert {"input_mapping.weight", "region_mapping.weight", "ret_mapping.weight"} <= decay
    assert {"perception.patch_position", "ret_embedding", "logit_scale", "region_mapping.bias"} <= no_decay


def test_a_4bit_run_trains_only_the_small_layers_on_the_dequantised_lm(tiny_lm_dir, tiny_clip_dir, tmp_path):
    runs = {q: main(args_for(tiny_lm_dir, tiny_clip_dir, tmp_path / q, "--steps", "1", "--val-every", "1",
                             "--quantize", q)) for q in ("none", "4bit")}  # the last --quantize counts
    assert runs["4bit"]["trained_parameters"] == runs["none"]["trained_parameters"], "the LM stays frozen"
    tuned = GroundedLM.from_pretrained(tmp_path / "4bit" / "out", device="cpu")
    assert tuned.config.quantize == "4bit", "the checkpoint loads as it was trained"


def test_the_hold_out_counts_as_unseen_only_if_no_run_behind_a_checkpoint_saw_it():
    assert holdout_kept_out({"options": {"holdout": True, "init": None}})
    assert not holdout_kept_out({"options": {"holdout": False, "init": None}})
    assert not holdout_kept_out({"options": {"holdout": True, "init": "assets/demo"}}), "its start is unknown"
    assert holdout_kept_out({"options": {"holdout": True, "init": "runs/a"}, "holdout_kept_out": True})


def test_resume_without_a_saved_state_says_so(tiny_lm_dir, tiny_clip_dir, tmp_path):
    with pytest.raises(SystemExit, match="no state.safetensors"):
        main(args_for(tiny_lm_dir, tiny_clip_dir, tmp_path, "--resume"))
    with pytest.raises(ValueError, match="at least 4"):
        main(args_for(tiny_lm_dir, tiny_clip_dir, tmp_path, "--batch-size", "2"))


def test_question_batches_ask_about_images_and_keep_describing_and_retrieving():
    batch = QuestionConversations("train", 1000, 32, holdout=True, seed=0).batch(3, 16)
    asked = [e for e in batch if len(e.turns) == 2 and e.turns[0].images and not e.ret_images]
    assert len(asked) == 10 + 2, "8 questions and 2 steps of compound ones, 2 descriptions"
    answers = [e.turns[-1].text for e in batch[:8]]
    assert all(any(reply_answer(a, t) for t in ("yes/no", "number", "colour", "shape", "size", "position"))
               and a.count(" ") < 3 for a in answers), f"short answers that read back: {answers}"
    follow_ups = [e for e in batch if len(e.turns) == 4 and not e.turns[2].images and not e.ret_images]
    assert len(follow_ups) == 2, "follow-ups ask, in words only, about the image described before"
    requests = [e for e in batch if e.ret_images]
    assert len(requests) == 2 and all(e.turns[-1].text == "[RET]" and e.turns[0].images for e in requests)
    again = QuestionConversations("train", 1000, 32, holdout=True, seed=0).batch(3, 16)
    assert [e.turns[-1].text for e in again] == [e.turns[-1].text for e in batch]


def test_asking_more_of_some_kinds_asks_them_twice_as_often_and_names_only_simple_kinds_or_drills():
    rng = random.Random(0)
    scenes = [shapes.sample("train", i, 32).scene for i in range(600)]
    kinds = Counter(questions.ask(scene, rng, questions.SIMPLE_KINDS + ("existence", "count")).kind
                    for scene in scenes for _ in range(4))
    assert kinds["existence"] > 1.6 * kinds["attribute"] and kinds["count"] > 1.6 * kinds["location"], kinds
    plain = QuestionConversations("train", 1000, 32, holdout=True, seed=0).batch(3, 16)
    more = QuestionConversations("train", 1000, 32, holdout=True, seed=0, ask_more=("existence", "count")).batch(3, 16)
    assert [len(e.turns) for e in more] == [len(e.turns) for e in plain], "the same mix of conversations"
    drilled = QuestionConversations("train", 1000, 32, holdout=True, ask_more=("binding",)).simple_kinds
    assert drilled.count("binding") == 2 and drilled.count("existence") == 1, "a drill as often as a kind named"
    with pytest.raises(ValueError, match="simple kinds or drills"):
        QuestionConversations("train", 1000, 32, holdout=True, ask_more=("compare",))


def test_stage_two_trains_the_request_module_alone_and_its_ablation_the_input_mappings(tiny_lm_dir, tiny_clip_dir,
                                                                                        tmp_path):
    main(args_for(tiny_lm_dir, tiny_clip_dir, tmp_path / "first", "--steps", "1", "--val-every", "1"))
    start = GroundedLM.from_pretrained(tmp_path / "first" / "out", quantize="none", device="cpu").trainable_state_dict()
    for trainable, extra in (("perception", ("--request-tokens", "2")), ("input", ())):
        summary = main(args_for(tiny_lm_dir, tiny_clip_dir, tmp_path / trainable, "--init",
                                str(tmp_path / "first" / "out"), "--questions", "--trainable", trainable,
                                "--steps", "2", "--val-every", "2", *extra))
        after = GroundedLM.from_pretrained(tmp_path / trainable / "out", quantize="none", device="cpu")
        weights = after.trainable_state_dict()
        changed = {name for name, value in start.items() if not torch.equal(value, weights[name])}
        if trainable == "perception":
            assert changed == set() and after.config.request_tokens == 2, "the mappings stay frozen"
            assert weights["perception.output.weight"].abs().sum() > 0, "the request module learnt"
        else:
            assert after.perception is None
            assert changed and all(name.startswith(("input_mapping.", "region_mapping.")) for name in changed)
        assert summary["trained_parameters"] == sum(
            v.numel() for k, v in weights.items() if k.startswith(TRAINABLE[trainable]))


def test_a_run_with_cell_words_trains_a_token_per_word_of_each_cell_and_records_that_loss(tiny_lm_dir, tiny_clip_dir,
                                                                                          tmp_path):
    summary = main(args_for(tiny_lm_dir, tiny_clip_dir, tmp_path, "--region-grid", "3", "--tokens-per-cell", "4",
                            "--cell-words", "1", "--cls-dropout", "0.5", "--steps", "3", "--val-every", "3"))
    assert summary["options"] | {"tokens_per_cell": 4, "cell_words": 1.0, "cls_dropout": 0.5} == summary["options"]
    history = read_state(tmp_path / "run" / STATE_NAME)[1]["history"]
    assert len(history["cell_words"]) == 3 and all(v > 0 for v in history["cell_words"])
    model = GroundedLM.from_pretrained(tmp_path / "out", quantize="none", device="cpu")
    assert model.config.tokens_per_cell == 4 and model.config.tokens_per_image == 2 + 9 * 4
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--tsv", "pairs.tsv", "--cell-words", "1"])


def test_validation_sees_every_cls_feature_whatever_the_training_dropout(tiny_lm_dir, tiny_clip_dir):
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=2), quantize="none", device="cpu")
    batches = [Conversations(ShapesDataset("val", 8, 32), 0).batch(0, 4)]
    plain = validate(model, batches)
    model.cls_dropout = 1.0
    assert validate(model, batches) == plain and model.training, "validation leaves the model training"


def test_a_state_saved_before_an_option_existed_resumes_as_the_run_that_wrote_it(tiny_lm_dir, tiny_clip_dir,
                                                                                  tmp_path):
    cut = args_for(tiny_lm_dir, tiny_clip_dir, tmp_path, "--steps", "2", "--val-every", "2")
    main(cut + ["--time-limit", "0"])
    state_path = tmp_path / "run" / STATE_NAME
    tensors, meta = read_state(state_path)
    options = {k: v for k, v in meta["options"].items() if k not in LATER_OPTIONS}  # as older code wrote it
    save_file(tensors, state_path, metadata={"format": STATE_FORMAT, "step": str(meta["step"]),
                                             "seconds": str(meta["seconds"]), "history": json.dumps(meta["history"]),
                                             "param_groups": json.dumps(meta["param_groups"]),
                                             "options": json.dumps(options)})
    assert main(cut + ["--resume"])["step"] == 2
    with pytest.raises(ValueError, match="questions: False then, True now"):
        main(cut + ["--resume", "--questions"])
