"""IMMO: the Reasoner's adapter on the shared LM, the monologue loop, its fallbacks and its trainer, on tiny models."""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors.torch import load_file

from conftest import teach_reasoner, tiny_config
from model.config import GroundedConfig
from model.generate import Done, GenerationSettings, Looked, Text, Thought, stream_reply
from model.grounded import GroundedLM
from model.monologue import FINAL, Monologue, _after_label, think
from model.prompt import Turn
from model.reasoner import FOLDER, WEIGHTS, reasoning
from model.serving import DecodeEngine
from model.training import monologue as trainer
from model.world import questions, shapes

QUESTION = "What colour is the shape?"


@pytest.fixture
def model(tiny_lm_dir, tiny_clip_dir) -> GroundedLM:
    return GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")


def perturbed(model: GroundedLM) -> GroundedLM:
    """A Reasoner whose adapter changes what the LM computes (a new one starts as the LM itself: B = 0)."""
    model.add_reasoner(rank=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def hidden(model: GroundedLM, reasoner: bool) -> torch.Tensor:
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        return model.hidden_states(model.embed_ids(ids), reasoner=reasoner)[0]


def events_of(model: GroundedLM, image: Image.Image, question: str = QUESTION, **kwargs) -> tuple[list, Monologue]:
    record = Monologue()
    events = list(think(model, [Turn("user", [image, question])], GenerationSettings(max_new_tokens=16),
                        record=record, **kwargs))
    return events, record


def test_the_adapter_is_on_only_in_the_calls_that_ask_for_it(model, tiny_model):
    before = hidden(model, False)
    perturbed(model)
    assert torch.equal(hidden(model, False), before), "the Observer computes exactly what it did without a Reasoner"
    assert not torch.allclose(hidden(model, True), before, atol=1e-3)
    with pytest.raises(ValueError, match="no Reasoner"):
        hidden(tiny_model, True)


def test_sessions_thinking_and_not_thinking_at_once_never_share_the_adapter_state(model):
    perturbed(model)
    expected = {True: hidden(model, True), False: hidden(model, False)}
    wrong, start = [], threading.Barrier(4)

    def session(reasoner: bool) -> None:
        start.wait()
        for _ in range(30):
            if not torch.equal(hidden(model, reasoner), expected[reasoner]):
                wrong.append(reasoner)

    threads = [threading.Thread(target=session, args=(flag,)) for flag in (True, False, True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_in_one_batch_each_row_has_the_adapter_or_not_as_it_asks(model):
    perturbed(model)
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9]])
    with torch.no_grad():
        mixed = model.hidden_states(model.embed_ids(ids), reasoner=[True, False])[0]
    torch.testing.assert_close(mixed[0], hidden(model, True)[0])
    torch.testing.assert_close(mixed[1], hidden(model, False)[0])


def test_a_checkpoint_keeps_its_reasoner_and_loads_it_back(model, tmp_path):
    perturbed(model)
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / FOLDER / WEIGHTS).is_file() and GroundedConfig.load(tmp_path / "ckpt").reasoner
    loaded = GroundedLM.from_pretrained(tmp_path / "ckpt", quantize="none", device="cpu")
    assert torch.equal(hidden(loaded, True), hidden(model, True))
    assert torch.equal(hidden(loaded, False), hidden(model, False))
    assert "lm.model.layers.0.self_attn.q_proj.lora_A.reasoner.weight" not in (tmp_path / "ckpt").joinpath(
        "mappings.safetensors").read_bytes().decode("latin-1"), "the adapter lives in reasoner/, not the mappings"


def test_a_missing_or_mismatched_reasoner_is_refused_with_what_is_wrong(model, tiny_lm_dir, tiny_clip_dir, tmp_path):
    perturbed(model)
    model.save_pretrained(tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / FOLDER / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"] = 8  # the weights are rank 4
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not fit this LM.*lora_A"):
        GroundedLM.from_pretrained(tmp_path / "ckpt", quantize="none", device="cpu")
    (tmp_path / "ckpt" / FOLDER / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="Reasoner's adapter"):
        GroundedLM.from_pretrained(tmp_path / "ckpt", quantize="none", device="cpu")


def test_a_taught_reasoner_questions_the_observer_then_answers_in_the_reply(model, colour_images):
    heard = teach_reasoner(model, colour_images[0], QUESTION, "Red.", "The Observer said so.")
    events, record = events_of(model, colour_images[0])
    thoughts = [e for e in events if isinstance(e, Thought)]
    lines: dict[int, tuple[str, str]] = {}
    for t in thoughts:
        lines[t.line] = (t.role, lines.get(t.line, (t.role, ""))[1] + t.delta)
    assert list(lines.values()) == [("Reasoner", f"Q1: {QUESTION}"), ("Observer", f"A1: {heard}"),
                                    ("Reasoner", "Reason: The Observer said so.")], "the reason before the answer"
    reply = "".join(e.delta for e in events if isinstance(e, Text))
    assert reply == "Red. The Observer said so.", "the final answer and its reason stream as the reply, unlabelled"
    assert events.index(thoughts[-1]) < events.index(next(e for e in events if isinstance(e, Text)))
    done = events[-1]
    assert isinstance(done, Done) and done.stats["rounds"] == 1 and done.stats["fallback"] is None
    assert record.lines[-2:] == [("Reasoner", "Reason: The Observer said so."), ("Reasoner", "Final answer: Red.")]


def test_the_observer_answers_without_looking_on_a_model_that_can_look(tiny_lm_dir, tiny_clip_dir, colour_images):
    """The Reasoner reads the answers it was trained on (`OBSERVER_LOOKS`): the demo's, an Observer's that did not
    look, and it misread the looking one's (README: IMMO)."""
    looking = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=2, request_tokens=2), quantize="none",
                         device="cpu")
    image, looks = colour_images[0], []
    looking.perception.register_forward_hook(lambda *_: looks.append(1))
    reply = list(stream_reply(looking, [Turn("user", [image, QUESTION])], GenerationSettings(max_new_tokens=2)))
    assert len(looks) == 1 and isinstance(reply[0], Looked), "this model's replies look first"
    teach_reasoner(looking, image, QUESTION, "Red.", "The Observer said so.")
    looks.clear()
    _, record = events_of(looking, image)
    assert record.lines[1][0] == "Observer" and not looks, "its Observer's answer does not"


def test_a_malformed_monologue_falls_back_to_the_observer_and_says_so(model, colour_images):
    model.add_reasoner(rank=4)  # untrained: the tiny LM's babble is no monologue
    events, record = events_of(model, colour_images[1])
    assert record.fallback is not None
    note = [e for e in events if isinstance(e, Thought)][-1]
    assert note.role == "Reasoner" and "went wrong" in note.delta and "Observer answers the question directly" in note.delta
    direct = "".join(e.delta for e in stream_reply(model, [Turn("user", [colour_images[1], QUESTION])],
                                                   GenerationSettings(max_new_tokens=16)) if isinstance(e, Text))
    assert "".join(e.delta for e in events if isinstance(e, Text)) == direct
    assert events[-1].stats["fallback"] == record.fallback


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "batched"])
def test_stop_ends_the_monologue_where_it_is(model, colour_images, batched):
    teach_reasoner(model, colour_images[0], QUESTION, "Red.", "The Observer said so.")
    cancel = threading.Event()
    seen = []
    engine = DecodeEngine(model) if batched else None
    try:
        for event in think(model, [Turn("user", [colour_images[0], QUESTION])], cancel=cancel, engine=engine):
            seen.append(event)
            if isinstance(event, Thought) and event.role == "Observer":
                cancel.set()
    finally:
        if engine is not None:
            engine.close()
    assert not any(isinstance(e, (Text, Done)) for e in seen), "no answer after Stop"


def test_a_monologue_in_the_batched_decoder_is_the_monologue_alone_beside_another_reply(model, colour_images):
    teach_reasoner(model, colour_images[0], QUESTION, "Red.", "The Observer said so.")
    other = [Turn("user", ["tell me a long story"])]
    settings = GenerationSettings(max_new_tokens=300)
    alone = events_of(model, colour_images[0])
    other_alone = [e for e in stream_reply(model, other, settings) if isinstance(e, Text)]
    rows_named = []  # what each forward of a LoRA layer asked of its rows
    layer = next(m for m in model.lm.modules() if isinstance(m, LoraLayer))
    layer.register_forward_pre_hook(lambda _, args, kwargs: rows_named.append(kwargs.get("adapter_names")),
                                    with_kwargs=True)
    engine = DecodeEngine(model, max_batch=4)
    try:
        beside = engine.submit(other, settings)  # decoding in the batch while the monologue's lines join it
        batched = events_of(model, colour_images[0], engine=engine)
        other_batched = [e for e in beside if isinstance(e, Text)]
    finally:
        engine.close()
    assert [e for e in batched[0] if not isinstance(e, Done)] == [e for e in alone[0] if not isinstance(e, Done)]
    assert batched[1] == alone[1] and batched[1].rounds == 1
    assert other_batched == other_alone
    assert any(names and {"reasoner", "__base__"} <= set(names) for names in rows_named), \
        "the Reasoner's rows and the other reply's shared forwards, each with its own adapter"


def test_thinking_needs_a_reasoner_and_an_image(model, colour_images):
    with pytest.raises(ValueError, match="no Reasoner"):
        list(think(model, [Turn("user", [colour_images[0], QUESTION])]))
    model.add_reasoner(rank=4)
    with pytest.raises(ValueError, match="no question about an image"):
        list(think(model, [Turn("user", [QUESTION])]))
    with pytest.raises(ValueError, match="no question about an image"):
        list(think(model, [Turn("user", [colour_images[0]])]))


def test_the_answer_line_loses_its_label_however_the_tokens_split_it():
    assert "".join(_after_label(iter(["Fin", "al ans", "wer:", " No", "."]), FINAL)) == "No."
    assert "".join(_after_label(iter([" Five", "."]), FINAL)) == "Five.", "text that merely starts like the label"
    assert "".join(_after_label(iter(["Yes", "."]), FINAL)) == "Yes.", "the label already fed by the loop"


def test_a_training_row_learns_the_reasoners_lines_and_only_reads_the_observers(model):
    ids, labels = trainer.monologue_row(model, "Are the star and the square the same colour?",
                                        [("What colour is the star?", "A red star."),
                                         ("What colour is the square?", "Blue.")], "No.", "The star is red.")
    learnt = model.tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
    read = model.tokenizer.decode([i for i, label in zip(ids, labels) if label == -100])
    assert learnt == ("Q1: What colour is the star?\nQ2: What colour is the square?\nReason: The star is red.\n"
                      " No." + model.tokenizer.eos_token), "the reason first, then the answer after the loop's cue"
    assert "A1: A red star.\nA2: Blue.\n" in read and read.endswith("Final answer:")
    assert "Question: Are the star" in read


def test_the_training_losses_are_the_lms_own_on_the_reasoners_tokens_of_a_padded_batch(model):
    from model.training.monologue_rl import token_logprobs
    perturbed(model)
    rows = [trainer.monologue_row(model, "Is there a star?", [("Is there a star?", "Yes, a red star.")], "Yes.",
                                  "The Observer named a red star."),
            trainer.monologue_row(model, "How many?", [("How many objects are there?", "Two.")], "2", "Two.")]
    ids, labels, mask = trainer.padded_rows(model, rows)
    with torch.no_grad(), reasoning():
        out = model.lm(input_ids=ids, attention_mask=mask, labels=labels)
    targets, learnt = labels[:, 1:], labels[:, 1:] != -100
    expected = out.logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        assert torch.allclose(trainer.batch_loss(model, rows), out.loss, atol=1e-5), "supervised"
        logprobs, own = token_logprobs(model, rows)
    assert torch.equal(own.bool(), learnt) and not logprobs[~learnt].any()
    assert torch.allclose(logprobs[learnt], expected[learnt], atol=1e-5), "reinforcement"


def trainer_options(model: GroundedLM, observer: Path, run: Path) -> list[str]:
    """A tiny run's options, its run folder holding what the Observer answered, as a first run would keep it: here,
    the truth (a tiny Observer says nothing readable, and every monologue would end in a guess)."""
    image_size = model.visual.image_size[0]
    observed = {split: [[a for _, a in q.steps] or [q.answer] for _, q in trainer.asked(split, n, 0.3, 0, image_size, offset)]
                for split, n, offset in (("train", 6, 0), ("val", 2, trainer.VAL_OFFSET))}
    run.mkdir()
    (run / trainer.OBSERVED_NAME).write_text(json.dumps(observed))
    return ["--observer", str(observer), "--run-dir", str(run), "--train-questions", "6", "--described-questions", "2",
            "--val-size", "2", "--batch-size", "2", "--val-every", "1", "--device", "cpu"]


def test_the_trainer_gives_a_checkpoint_a_reasoner_from_the_observers_answers_and_resumes(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    options = trainer_options(model, tmp_path / "ckpt", tmp_path / "run")
    stopped = trainer.main(options + ["--steps", "3", "--time-limit", "0"])
    assert not stopped["finished"] and not (tmp_path / "ckpt" / FOLDER).exists()
    with pytest.raises(ValueError, match="described_questions: 2 then, 0 now"):
        trainer.main(options + ["--steps", "3", "--resume", "--described-questions", "0"])
    summary = trainer.main(options + ["--steps", "3", "--resume"])
    assert summary["finished"] and summary["step"] == 3 and summary["train_monologues"] == 6 + 2
    assert GroundedConfig.load(tmp_path / "ckpt").reasoner
    assert json.loads((tmp_path / "ckpt" / FOLDER / "training.json").read_text())["step"] == 3
    assert GroundedLM.from_pretrained(tmp_path / "ckpt", quantize="none", device="cpu").reasoner is not None
    with pytest.raises(SystemExit, match="has a Reasoner already"):
        trainer.main(options + ["--run-dir", str(tmp_path / "again"), "--steps", "1"])


def test_a_reasoner_trained_further_starts_from_the_one_it_names(model, tmp_path):
    model.save_pretrained(tmp_path / "observer")
    shutil.copytree(tmp_path / "observer", tmp_path / "first")
    trainer.main(trainer_options(model, tmp_path / "observer", tmp_path / "run1") + ["--out", str(tmp_path / "first"),
                                                                                    "--steps", "2", "--lr", "1e-2"])
    first = load_file(tmp_path / "first" / FOLDER / WEIGHTS)
    assert any(name.endswith("lora_B.weight") and weights.abs().max() > 0 for name, weights in first.items())
    shutil.copytree(tmp_path / "observer", tmp_path / "further")
    options = trainer_options(model, tmp_path / "observer", tmp_path / "run2") + ["--out", str(tmp_path / "further"),
                                                                                  "--init", str(tmp_path / "first")]
    with pytest.raises(SystemExit, match="has rank 16; train it further with --rank 16"):
        trainer.main(options + ["--rank", "8"])
    with pytest.raises(SystemExit, match="has no Reasoner to start from"):
        trainer.main(options[:-1] + [str(tmp_path / "observer")])
    trainer.main(options + ["--steps", "1", "--lr", "0"])  # a step that moves nothing: it exports where it started
    further = load_file(tmp_path / "further" / FOLDER / WEIGHTS)
    assert further.keys() == first.keys() and all(torch.equal(further[k], first[k]) for k in first)


def test_true_answers_and_true_descriptions_imply_the_true_answer_of_every_kind_of_question():
    checked = 0
    for kind in questions.KINDS:
        for i in range(100):
            sample, q = questions.question("train", i, 32, True, (kind,))
            if q.kind != kind:
                continue
            described = shapes.plain_caption(sample.scene)
            assert questions.implied_answer(q, [a for _, a in q.steps] or [q.answer])[0] == q.answer, q
            assert questions.implied_answer(q, [described] * max(1, len(q.steps)))[0] == q.answer, (q, described)
            checked += 1
    assert checked > 550


def test_described_monologues_ask_simple_questions_relations_and_comparisons_of_new_scenes_and_hear_the_truth():
    items = trainer.described(90, 32, offset=6)
    kinds = [q.kind for q, _ in items]
    assert set(kinds) == set(trainer.DESCRIBED_KINDS)
    assert sum(k in questions.SIMPLE_KINDS for k in kinds) == 30, "a third are simple"
    assert kinds.count("relation") == 30, "a third are relations"
    compared = [q for q, _ in items if q.steps]
    assert all(q.steps[-1][1] != "nowhere" for q in compared), "a count of a colour the scene lacks compares nothing"
    observed_scenes = {shapes.plain_caption(questions.question("train", i, 32, True)[0].scene) for i in range(6)}
    for q, heard in items:
        assert len(heard) == max(1, len(q.steps)) and heard[0] not in observed_scenes
        answer, reason = trainer.conclusion(q, heard)
        assert answer == questions.reply_text(q.answer)
        if q.kind in ("attribute", "location"):
            assert reason.startswith("The Observer said") and answer.rstrip(".").lower() in reason
        elif q.kind in ("existence", "count"):
            assert reason.startswith("The Observer named")
        elif q.kind == "compare":
            assert "the same" in reason
        else:
            assert "column" in reason or "row" in reason


def test_where_the_observer_does_not_say_the_monologue_concludes_with_a_guess():
    q = next(q for i in range(20) if (q := questions.question("train", i, 32, True, ("compare",))[1]).kind == "compare")
    assert trainer.conclusion(q, ["I cannot tell.", "A large red circle."]) == (questions.reply_text(q.answer),
                                                                                trainer.GUESS)
    said = trainer.conclusion(q, [a for _, a in q.steps])
    assert said[0] == questions.reply_text(q.answer) and said[1] != trainer.GUESS


def test_a_described_scene_is_read_object_by_object():
    described = "A large red cross at the top, a small green star at the bottom and a large yellow star in the centre."
    assert questions.read_step("What colour is the cross?", described, "colour") == ["red"]
    assert questions.read_step("Is the green star small or large?", described, "size") == ["small"]
    assert questions.read_step("Where are the yellow things?", described, "position") == ["centre"]
    assert questions.read_step("Where is the circle?", "On the left.", "position") == ["left"]
    assert questions.read_step("What colour is the circle?", "I cannot tell.", "colour") is None
    assert questions.read_step("Where are the blue things?", described, "position") == [], "none, as described"
    assert questions.read_step("Where are the blue things?", "I do not know.", "position") is None


def test_a_step_the_observer_did_not_answer_is_read_from_a_description_heard_for_another():
    steps = ("Is the cross small or large?", "Is the star small or large?")
    described = "A small red cross on the left and a large blue star on the right."
    assert questions.read_heard(steps[1], [described, "Is the star small or large?"], 1, "size") == ["large"]
    assert questions.read_heard(steps[0], [described, "Large."], 0, "size") == ["small"], "its own reply first"
    assert questions.read_heard(steps[1], ["Small.", "I cannot tell."], 1, "size") is None, \
        "a direct answer belongs to its own step"
    same = questions.Question("Are the cross and the star the same size?", "no", "compare",
                              ((steps[0], "small"), (steps[1], "large")), "same")
    assert questions.implied_answer(same, [described, "Is the star small or large?"]) == (
        "no", "the cross is small and the star is large, so the cross and the star are not the same size.")


def test_reinforcement_scores_sampled_monologues_and_puts_the_adapter_back_with_its_record(model, tmp_path):
    from model.training import monologue_rl
    perturbed(model)
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / FOLDER / "training.json").write_text(json.dumps({"step": 7}))  # the supervised run's
    options = ["--checkpoint", str(tmp_path / "ckpt"), "--run-dir", str(tmp_path / "run"), "--steps", "2",
               "--questions-per-step", "1", "--group", "2", "--pool", "4", "--save-every", "1", "--device", "cpu"]
    stopped = monologue_rl.main(options + ["--time-limit", "0"])
    assert not stopped["finished"] and stopped["step"] == 1
    before = load_file(tmp_path / "ckpt" / FOLDER / WEIGHTS)
    summary = monologue_rl.main(options + ["--resume"])
    assert summary["finished"] and summary["step"] == 2 and 0 <= summary["fallback_last_10"] <= 1
    record = json.loads((tmp_path / "ckpt" / FOLDER / "training.json").read_text())
    assert record["step"] == 7 and record["rl"]["step"] == 2
    assert summary["mixed_last_10"] == 0 and summary["steps_learnt"] == 0, "a perturbed tiny Reasoner is never right"
    after = load_file(tmp_path / "ckpt" / FOLDER / WEIGHTS)
    assert all(torch.equal(before[k], after[k]) for k in before), "no question taught anything: the adapter is as it was"
    state = load_file(tmp_path / "run" / "state.safetensors")
    assert not any(k.startswith("optim.") for k in state), "nor did the optimizer take a step (no moments kept)"
    assert (tmp_path / "run" / "training_curve.png").is_file()


def test_reinforcement_learns_only_from_questions_whose_monologues_earned_different_rewards():
    from model.training.monologue_rl import advantages
    advantage, mixed = advantages(torch.tensor([[1., 0., 1., 1.], [1., 1., 1., 1.], [0., 0., 0., 0.]]))
    assert mixed.tolist() == [True, False, False]
    assert torch.allclose(advantage[0], torch.tensor([1 / 3, -1., 1 / 3, 1 / 3])), "reward minus the others' mean"
    assert not advantage[1:].any(), "all right or all wrong: nothing to learn"


def test_a_steps_rollouts_decoded_at_once_are_the_rollouts_decoded_one_after_another(model, colour_images):
    from model.training.monologue_rl import rollouts
    teach_reasoner(model, colour_images[0], QUESTION, "Red.", "The Observer said so.")
    batch = [("train", i, questions.question("train", i, 64, kinds=questions.COMPOUND_KINDS)[1]) for i in range(2)]
    alone = rollouts(model, batch, group=2, temperature=0.7, seed=3)
    engine = DecodeEngine(model, max_batch=4)
    try:
        at_once = rollouts(model, batch, group=2, temperature=0.7, seed=3, engine=engine)
    finally:
        engine.close()
    assert [r.lines for r in at_once[0]] == [r.lines for r in alone[0]] and at_once[1] == alone[1]
    assert len({tuple(r.lines) for r in alone[0]}) > 1, "sampled: the monologues differ"


def test_a_sampled_monologue_is_scored_on_the_lines_the_reasoner_wrote_and_not_the_observers(model):
    from model.training.monologue_rl import row_of
    record = Monologue(lines=[("Reasoner", "Q1: What colour is the star?"), ("Observer", "A1: A red star."),
                              ("Reasoner", "Reason: The star is red."), ("Reasoner", "Final answer: Red.")])
    ids, labels = row_of(model, "What colour is the star?", record)
    learnt = model.tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
    assert learnt == ("Q1: What colour is the star?\nReason: The star is red.\nFinal answer: Red."
                      + model.tokenizer.eos_token)


def test_the_evaluation_sets_a_reinforced_reasoner_beside_the_supervised_one_on_the_same_questions(model, tmp_path):
    from model.training import evaluate_monologue
    perturbed(model)
    model.save_pretrained(tmp_path / "supervised")
    (tmp_path / "supervised" / FOLDER / "training.json").write_text(json.dumps({"step": 7}))
    with torch.no_grad():  # reinforcement moved the adapter
        for name, p in model.lm.named_parameters():
            if "lora_A" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "reinforced")
    (tmp_path / "reinforced" / FOLDER / "training.json").write_text(json.dumps({"step": 7, "rl": {"step": 2}}))
    options = ["--per-kind", "1", "--batch-size", "1", "--max-rounds", "1", "--device", "cpu"]  # one at a time: a
    # near-uniform tiny LM can break a tie differently in a batch of another make-up

    def evaluated(checkpoint: str, *more: str) -> dict:
        return evaluate_monologue.main(options + ["--checkpoint", str(tmp_path / checkpoint), *more,
                                                  "--out", str(tmp_path / f"{checkpoint}.json")])

    with pytest.raises(SystemExit, match="was not"):
        evaluated("supervised", "--supervised", str(tmp_path / "supervised"))
    both = evaluated("reinforced", "--supervised", str(tmp_path / "supervised"))
    assert list(both["labels"].values()) == ["(a) Observer alone", "(b) Reasoner reads a caption",
                                             "(c) IMMO monologue (supervised)", "(d) IMMO monologue (supervised + RL)",
                                             "(e) the Observer's answers to the known steps, read exactly, no guess"]
    alone = evaluated("supervised")
    assert alone["labels"]["immo"] == "(c) IMMO monologue (supervised)"
    for split, rows in both["splits"].items():
        for kind in questions.KINDS:
            assert rows["supervised"][kind]["monologues"] == alone["splits"][split]["immo"][kind]["monologues"]
            assert rows["observer"][kind] == alone["splits"][split]["observer"][kind]
            assert rows["exact"][kind] == alone["splits"][split]["exact"][kind], "no Reasoner in the exact reading"
            immo = rows["immo"][kind]
            assert 0 <= immo["misread_rate"] <= 1
            assert len(immo["wrong"]) == round(immo["n"] * (1 - immo["accuracy"])), "every wrong monologue, to read"
    assert any(rows["immo"][k]["monologues"] != rows["supervised"][k]["monologues"]
               for rows in both["splits"].values() for k in questions.KINDS), "two Reasoners, two monologues"
    assert (tmp_path / "reinforced.json").is_file() and (tmp_path / "reinforced.png").is_file()


def test_a_misread_is_a_conclusion_against_what_the_known_steps_answers_imply():
    from model.training.evaluate_monologue import misread
    same = questions.Question("Are the star and the square the same colour?", "no", "compare",
                              (("What colour is the star?", "red"), ("What colour is the square?", "blue")), "same")

    def concluded(asked: list[str], heard: list[str], answer: str) -> Monologue:
        lines = [line for n, (q, a) in enumerate(zip(asked, heard), 1)
                 for line in (("Reasoner", f"Q{n}: {q}"), ("Observer", f"A{n}: {a}"))]
        return Monologue(lines + [("Reasoner", f"Final answer: {answer}")], len(asked), answer)

    known = ["What colour is the star?", "What colour is the square?"]
    assert misread(concluded(known, ["Red.", "Red."], "No. The star is red and the square is red."), same)
    assert not misread(concluded(known, ["Red.", "Red."], "Yes."), same), "the Observer was wrong, not the Reasoner"
    assert not misread(concluded(known, ["Red.", "A large square."], "No."), same), "the Observer did not say"
    assert not misread(concluded(known[:1], ["Red."], "No."), same), "it asked something else"
