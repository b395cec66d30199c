"""Stage-1 CLIP training: the pieces, a few real steps on a tiny config, and the app's way of loading it."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY_CLIP_CFG
from model.world import shapes
from model.training import train_clip as tc
from model.training.optimization import lr_at
from model.visual import pre_projection_features


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    args = tc.parse_args(["--out", str(out), "--steps", "40", "--batch-size", "32", "--lr", "2e-3",
                          "--train-size", "64", "--val-size", "32", "--eval-every", "20", "--test-size", "200",
                          "--device", "cpu", "--workers", "1"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: on a busy 2-core machine two threads wait on each other
    try:
        return out, tc.train(args, model_cfg=TINY_CLIP_CFG)
    finally:
        torch.set_num_threads(threads)


def test_every_grammar_caption_fits_the_context_untruncated():
    tokenizer = open_clip.get_tokenizer(tc.TOKENIZER_MODEL)  # 77 tokens: room to see any overflow
    captions = [shapes.generate(seed).caption for seed in range(3000)]
    lengths = (tokenizer(captions) != 0).sum(1)  # with start and end tokens
    assert lengths.max().item() <= tc.MODEL_CFG["text_cfg"]["context_length"]


def test_scene_key_is_equal_exactly_for_equal_object_sets():
    scenes = [shapes.generate(seed).scene for seed in range(2000)]
    keys = [tc.scene_key(s) for s in scenes]
    for i in range(0, 2000, 7):
        for j in range(i + 1, 2000, 13):
            assert (keys[i] == keys[j]) == (scenes[i].objects == scenes[j].objects)


def test_distinct_keeps_the_first_of_each_object_set_in_order():
    keys = torch.tensor([5, 7, 5, 9, 7, 1])
    index = torch.tensor([0, 1, 2, 3, 4, 5])
    assert tc.distinct(index, keys).tolist() == [0, 1, 3, 5]
    assert tc.distinct(torch.tensor([3, 2, 0]), keys).tolist() == [3, 2]


def test_learning_rate_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01


def test_cache_matches_the_app_preprocessing_and_pooled_feature_is_pre_projection(trained):
    out, _ = trained
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    cache = tc.render_cache("test", 4, 32, 32)
    app_pixels = torch.stack([preprocess(shapes.sample("test", i, 32).image) for i in range(4)])
    assert torch.allclose(tc.normalise(cache.pixels), app_pixels, atol=1e-6)
    with torch.no_grad():
        pooled, _ = pre_projection_features(model.visual, app_pixels)  # (4, width)
        assert pooled.shape == (4, TINY_CLIP_CFG["vision_cfg"]["width"])
        assert torch.allclose(pooled @ model.visual.proj, model.encode_image(app_pixels), atol=1e-5)
    assert torch.equal(cache.tokens, open_clip.get_tokenizer(f"local-dir:{out}")(cache.captions))


def test_a_few_steps_reduce_the_loss(trained):
    _, metrics = trained
    assert metrics["final_loss"] < metrics["initial_loss"] - 0.5, metrics


def test_saved_folder_loads_through_open_clip_local_dir(trained):
    out, metrics = trained
    assert {p.name for p in out.iterdir()} == {tc.CONFIG_NAME, tc.WEIGHTS_NAME, "training_curve.png",
                                               "train_metrics.json"}
    config = json.loads((out / tc.CONFIG_NAME).read_text())
    assert config["model_cfg"] == TINY_CLIP_CFG and config["preprocess_cfg"]["mean"] == [0.5, 0.5, 0.5]
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    saved = load_file(out / tc.WEIGHTS_NAME)
    state = model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(state[k].half(), saved[k]) for k in saved), "weights were not loaded"
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    assert isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer) and tokenizer.context_length == 32
    with torch.no_grad():
        image = preprocess(Image.new("RGB", (50, 40), "red")).unsqueeze(0)
        assert model.encode_image(image).shape == (1, TINY_CLIP_CFG["embed_dim"])
    assert json.loads((out / "train_metrics.json").read_text()) == metrics
    assert Image.open(out / "training_curve.png").size[0] > 100


def test_the_retrieval_figures_rank_the_scenes_forty_steps_learned_far_above_chance(trained):
    out, metrics = trained
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    seen = tc.render_cache("train", 64, 32, 32, holdout=True)  # its 64 training scenes (unseen ones: chance)
    assert tc.retrieval(model, seen, torch.device("cpu"))["r5"] >= 3 * 5 / 64
    assert {"test_r5", "holdout_r5", "one_object_zero_shot_exact", "one_object_nn_shape"} <= set(metrics)


def test_one_object_cache_holds_every_single_object_scene_twice():
    cache = tc.one_object_cache(tc.tokenizer_for(32), image_size=16)
    objects = [s.objects[0] for s in cache.scenes]
    assert len(set(objects)) == len(shapes.SHAPES) * len(shapes.COLOURS) * len(shapes.SIZES) * len(shapes.POSITIONS)
    assert len(objects) == 2 * len(set(objects)) and cache.pixels.shape[1:] == (16, 16, 3)
    assert all(shapes.parse_caption(c).objects == s.objects for c, s in zip(cache.captions, cache.scenes))


def test_device_choice():
    assert tc.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert tc.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(SystemExit, match="no CUDA"):
            tc.resolve_device("cuda")


def test_bundled_demo_clip_tells_scenes_apart():
    """The shipped encoder (assets/demo/clip), loaded as the app loads it, finds each caption's objects."""
    folder = Path(__file__).resolve().parent.parent / "assets" / "demo" / "clip"
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    cache = tc.render_cache("test", 60, model.visual.image_size[0], 32, holdout=True)
    assert tc.retrieval(model, cache, torch.device("cpu"))["objects_r1"] >= 0.95
