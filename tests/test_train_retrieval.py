import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from model.grounded import GroundedLM
from model.training import train_retrieval
from model.training.train_retrieval import (KINDS, PER_HISTORY, TRAINED, contrastive_loss, descriptions, fit_emission,
                                           parse_args, requests)
from model.world import shapes


def test_requests_are_a_pure_function_and_each_ends_in_ret_with_the_image_it_should_find():
    first = requests("train", 40, 64, holdout=True, after_history=0.5, seed=0)
    again = requests("train", 40, 64, holdout=True, after_history=0.5, seed=0)
    conversations, images, scenes, kinds, named = first
    assert [[t.text for t in c] for c in conversations] == [[t.text for t in c] for c in again[0]]
    assert scenes == again[2] and kinds == again[3] and named == again[4] and len(images) == 40
    assert all(c[-1].role == "assistant" and c[-1].text == "[RET]" for c in conversations)
    after_history = [c for c, kind in zip(conversations, kinds) if KINDS[kind] != "alone"]
    assert len(after_history) == 20 and all(len(c) > 2 for c in after_history), "half come after described images"
    histories = [[t.text for t in c[:-2]] for c in after_history]
    assert histories[:PER_HISTORY] == [histories[0]] * PER_HISTORY != histories[PER_HISTORY], \
        "each history is followed by several requests"
    referring = [(c, s, k) for c, s, kind, k in zip(conversations, scenes, kinds, named) if KINDS[kind] == "refer-back"]
    assert referring, "some ask for another picture like an earlier one"
    assert all(k == -1 for kind, k in zip(kinds, named) if KINDS[kind] != "refer-back"), "the others name none"
    for c, scene, k in referring:
        ordinal = next(i for i, word in enumerate(("first", "second", "third")) if word in c[-2].text)
        described = [t.text for t in c if t.role == "assistant"][ordinal]
        assert k == ordinal, "the image named is the one at that place"
        assert shapes.parse_caption(described).objects == scene, "the answer is that scene, drawn anew"


def test_descriptions_end_in_a_new_image_described_alone_or_after_described_images():
    conversations = descriptions("train", 20, 64, holdout=True, after_history=0.5, seed=0)
    assert [[t.text for t in c] for c in conversations] == \
        [[t.text for t in c] for c in descriptions("train", 20, 64, holdout=True, after_history=0.5, seed=0)]
    assert all(c[-2].images and c[-1].role == "assistant" and "[RET]" not in c[-1].text for c in conversations)
    assert [len(c) for c in conversations[:10]] == [2] * 10 and all(len(c) >= 6 for c in conversations[10:])
    assert all(shapes.parse_caption(c[-1].text) for c in conversations), "described as the model describes"


def test_the_hold_out_pairs_stay_out_of_the_requests():
    _, _, scenes, _, _ = requests("train", 200, 64, holdout=True, after_history=0.2, seed=1)
    assert not any((o.shape, o.colour) in shapes.HOLDOUT_PAIRS for objects in scenes for o in objects)


def test_another_picture_of_the_same_scene_is_not_a_negative(tiny_model):
    queries = F.normalize(torch.randn(4, 8), dim=-1)
    keys = F.normalize(torch.randn(4, 8), dim=-1)
    one_scene = contrastive_loss(tiny_model, queries, keys, torch.zeros(4, dtype=torch.long))
    assert one_scene.item() == pytest.approx(0.0, abs=1e-6), "nothing to tell apart: every other row is left out"
    assert contrastive_loss(tiny_model, queries, keys, torch.arange(4)).item() > 0.1


def test_the_ret_output_row_learns_to_open_requests_and_to_stay_out_of_descriptions(tiny_lm_dir, tiny_clip_dir):
    """Openings where the LM's state says 'request' along one direction: the row finds it; its input row stays."""
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, ret_output_row=True), quantize="none", device="cpu")
    model.requires_grad_(False).ret_output.requires_grad_(True)
    input_row = model.ret_embedding.clone()
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(model.config.lm_dim, generator=generator)

    def openings(n: int) -> dict[str, torch.Tensor]:
        """n requests' openings, and n descriptions of three tokens each."""
        asked = torch.randn(n, model.config.lm_dim, generator=generator) + 2 * direction
        described = torch.randn(3 * n, model.config.lm_dim, generator=generator) - 2 * direction
        words = model.logits(described).argmax(-1).clamp(max=model.vocab_size - 1)
        reply = torch.arange(3 * n) // 3
        return {"before": asked, "kind": torch.arange(n) % len(KINDS), "described": described, "word": words,
                "described_reply": reply, "described_kind": reply % 2}

    rates = fit_emission(model, openings(96), openings(32), lr=3e-2)
    assert all(rate > 0.9 for k, rate in rates["after"].items() if "describing" not in k), rates
    assert all(rate < 0.1 for k, rate in rates["after"].items() if "describing" in k), rates
    assert rates["after"] != rates["before"] and torch.equal(model.ret_embedding, input_row)


def test_the_stage_trains_the_two_mappings_alone_and_reuses_its_cache(tiny_lm_dir, tiny_clip_dir, tmp_path,
                                                                      monkeypatch):
    start = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    start.save_pretrained(tmp_path / "start")
    argv = ["--init", str(tmp_path / "start"), "--out", str(tmp_path / "out"), "--run-dir", str(tmp_path / "run"),
            "--queries", "48", "--val-queries", "16", "--steps", "300", "--batch-size", "16", "--val-every", "100",
            "--lr", "3e-2", "--device", "cpu"]
    summary = train_retrieval.train_retrieval(parse_args(argv))
    assert summary["loss"] < 2.0 and not summary["holdout_kept_out"], "its start says nothing of the hold-out"
    assert {f"R@1 {kind}" for kind in KINDS} <= set(summary["val_after"]), "recall of each kind of request"
    trained = GroundedLM.from_pretrained(tmp_path / "out", quantize="none", device="cpu")
    before, after = start.trainable_state_dict(), trained.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith(TRAINED))
    assert not torch.equal(before["image_mapping.weight"], after["image_mapping.weight"])
    assert not torch.equal(before["ret_mapping.weight"], after["ret_mapping.weight"])
    assert trained.fingerprint != start.fingerprint, "an index of the old mapping is refused"
    assert trained.config.ret_output_row and "ret_output" in after, "when to retrieve has a row of its own"
    assert trained.config.ret_opens_reply, "fitted where replies open: decoding offers [RET] nowhere else"
    assert {"[RET] alone", "[RET] describing alone"} <= set(summary["emission_after"])

    def no_lm(*args, **kwargs):
        raise AssertionError("the LM ran again: the cache was not reused")

    monkeypatch.setattr(train_retrieval, "reply_states", no_lm)
    monkeypatch.setattr(train_retrieval, "reply_positions", no_lm)
    train_retrieval.train_retrieval(parse_args([*argv[:3], str(tmp_path / "out2"), *argv[4:]]))
    train_retrieval.train_retrieval(parse_args([*argv[:3], str(tmp_path / "row"), *argv[4:], "--steps", "0"]))
    row_only = GroundedLM.from_pretrained(tmp_path / "row", quantize="none", device="cpu").trainable_state_dict()
    assert all(torch.equal(before[k], row_only[k]) for k in before if k != "ret_output"), "--steps 0: the row alone"
    assert not torch.equal(row_only["ret_output"], row_only["ret_embedding"]), "fitted from a copy of the input row"
    with pytest.raises(AssertionError, match="the LM ran again"):  # other inputs: computed afresh
        train_retrieval.train_retrieval(parse_args([*argv, "--seed", "1"]))


def test_pointing_at_earlier_images_trains_alone_and_leaves_the_index_and_requests_alone_as_they_were(
        tiny_lm_dir, tiny_clip_dir, tmp_path, monkeypatch):
    start = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    start.save_pretrained(tmp_path / "start")

    def no_descriptions(*args, **kwargs):
        raise AssertionError("descriptions were read: nothing here fits the [RET] row")

    monkeypatch.setattr(train_retrieval, "reply_positions", no_descriptions)
    summary = train_retrieval.train_retrieval(parse_args(
        ["--init", str(tmp_path / "start"), "--out", str(tmp_path / "out"), "--run-dir", str(tmp_path / "run"),
         "--ret-context", "--queries", "48", "--val-queries", "16", "--after-history", "0.5", "--steps", "100",
         "--batch-size", "16", "--val-every", "50", "--lr", "3e-2", "--device", "cpu"]))
    assert "emission_after" not in summary and "pointed right" in summary["val_after"]
    trained = GroundedLM.from_pretrained(tmp_path / "out", quantize="none", device="cpu")
    before, after = start.trainable_state_dict(), trained.trainable_state_dict()
    assert trained.config.ret_context and all(torch.equal(before[k], after[k]) for k in before)
    assert after["ret_context.scale"].ne(1).all(), "standardised by the statistics of its requests"
    assert not torch.equal(after["ret_context.query.weight"], after["ret_mapping.weight"]), "its query was fitted"
    assert trained.fingerprint == start.fingerprint, "the gallery's index still fits"
    hidden = torch.randn(3, start.config.lm_dim)
    assert torch.allclose(trained.ret_query(hidden), start.ret_query(hidden)), "a request alone is answered as before"
