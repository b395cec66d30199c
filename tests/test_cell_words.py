"""Region tokens that read as words: each cell's tokens pulled towards the words of the object in it."""
import pytest
import torch

from conftest import tiny_config
from model.grounded import GroundedLM
from model.training.cell_words import EMPTY, SLOTS, cell_of, cell_word_loss, cell_word_targets, word_row
from model.training.train_cells import parse_args, pretrain
from model.world.shapes import Scene, SceneObject


@pytest.fixture
def worded(tiny_lm_dir, tiny_clip_dir):
    return GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=3, tokens_per_cell=len(SLOTS)),
                      quantize="none", device="cpu")


def test_the_five_places_fall_in_the_cells_of_a_three_by_three_grid():
    assert [cell_of(p, 3) for p in ("top", "left", "centre", "right", "bottom")] == [1, 3, 4, 5, 7]


def test_an_objects_cell_says_its_words_in_order_and_every_other_cell_says_empty(worded):
    scene = Scene((SceneObject("circle", "red", "small", "left"), SceneObject("star", "blue", "large", "top")))
    targets = cell_word_targets(worded, [scene])                               # (1, 9, 4, lm_dim)
    assert targets.shape == (1, 9, 4, 32)
    for cell, words in ((3, ("small", "red", "circle", "left")), (1, ("large", "blue", "star", "top"))):
        for slot, word in enumerate(words):
            assert torch.equal(targets[0, cell, slot], word_row(worded, word))
    for cell in (0, 2, 4, 5, 6, 7, 8):
        assert all(torch.equal(targets[0, cell, slot], word_row(worded, EMPTY)) for slot in range(4))


def test_a_word_of_several_tokens_is_the_mean_of_their_rows(worded):
    ids = worded.tokenizer.encode(" hexagon", add_special_tokens=False)
    assert len(ids) > 1
    table = worded.lm.get_input_embeddings().weight
    torch.testing.assert_close(word_row(worded, "hexagon"), table[ids].mean(0))


def test_training_the_region_mapping_on_the_loss_lowers_it(worded):
    optimizer = torch.optim.Adam([*worded.region_mapping.parameters(), worded.region_positions], lr=1e-2)
    losses = []
    for step in range(12):
        loss = cell_word_loss(worded, step % 3, 8, holdout=True, seed=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_a_model_without_a_token_per_word_is_refused(tiny_lm_dir, tiny_clip_dir):
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=3), quantize="none", device="cpu")
    with pytest.raises(ValueError, match="cell words need 4 tokens per region cell"):
        cell_word_loss(model, 0, 2, holdout=True, seed=0)


def test_the_stage_alone_recuts_a_checkpoint_and_trains_only_its_cells(tiny_lm_dir, tiny_clip_dir, tmp_path):
    start = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=3), quantize="none", device="cpu")
    start.save_pretrained(tmp_path / "start")
    summary = pretrain(parse_args(["--init", str(tmp_path / "start"), "--out", str(tmp_path / "cells"), "--run-dir",
                                   str(tmp_path / "run"), "--steps", "3", "--batch-size", "4", "--device", "cpu"]))
    assert set(summary["nearest_word_val"]) == set(SLOTS) and not summary["holdout_kept_out"], "its start says nothing"
    cells = GroundedLM.from_pretrained(tmp_path / "cells", quantize="none", device="cpu")
    assert cells.config.tokens_per_cell == len(SLOTS)
    before, after = start.trainable_state_dict(), cells.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("region_mapping."))
    assert after["region_positions"].abs().sum() > 0, "the places learnt"

    pretrain(parse_args(["--init", str(tmp_path / "cells"), "--out", str(tmp_path / "patches"), "--run-dir",
                         str(tmp_path / "run2"), "--cell-patches", "2", "--steps", "2", "--batch-size", "4",
                         "--device", "cpu"]))
    patches = GroundedLM.from_pretrained(tmp_path / "patches", quantize="none", device="cpu")
    assert patches.config.cell_patches == 2 and patches.region_mapping.in_features == 4 * patches.visual.visual_dim
    assert torch.equal(patches.trainable_state_dict()["input_mapping.weight"], after["input_mapping.weight"])
