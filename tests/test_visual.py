"""model/visual.py: the frozen open_clip ViT gives FROMAGe's feature, the pre-projection post-LN CLS token.

Uses the tiny random ViT from conftest (`tiny_clip_dir`, open_clip's local-dir format) and real open_clip.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from model.visual import VisualEncoder

IMAGES = [Image.new("RGB", (48, 40), (200, 30, 30)), Image.new("RGB", (32, 32), (20, 90, 220)),
          Image.radial_gradient("L").convert("RGB"), Image.linear_gradient("L").convert("RGB").rotate(30)]


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir: Path) -> VisualEncoder:
    return VisualEncoder.from_source(f"local-dir:{tiny_clip_dir}")


@pytest.fixture(scope="module")
def full_clip(tiny_clip_dir: Path):
    """The same folder through open_clip's own API: the reference our encoder must agree with."""
    model, transform = open_clip.create_model_from_pretrained(f"local-dir:{tiny_clip_dir}")
    return model.eval(), transform


def write_clip_dir(folder: Path, **vision_overrides) -> Path:
    """A tiny CLIP like conftest's, with `vision_overrides` in its vision config, in local-dir format."""
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8,
                       **vision_overrides},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    torch.manual_seed(1)
    state = open_clip.CLIP(**model_cfg).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "open_clip_model.safetensors")
    return folder


def hand_pooled(visual: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ViT tower run piece by piece: the post-LN CLS token and the post-LN patch tokens."""
    x = visual.conv1(pixels)  # (B, D, g, g)
    x = x.flatten(2).transpose(1, 2)  # (B, g*g, D)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding  # (B, 1 + g*g, D)
    x = visual.ln_post(visual.transformer(visual.ln_pre(x)))
    return x[:, 0], x[:, 1:]


def test_loads_from_a_local_folder(encoder: VisualEncoder, tiny_clip_dir: Path):
    assert encoder.source == f"local-dir:{tiny_clip_dir}"
    assert encoder.visual_dim == 32  # the transformer width, not the 16-d CLIP embedding
    assert encoder.image_size == (32, 32)
    assert encoder.n_patches == (32 // 8) ** 2
    assert encoder.device == torch.device("cpu")


def test_only_the_visual_tower_is_kept(encoder: VisualEncoder, full_clip):
    model, _ = full_clip
    assert {key.split(".")[0] for key in encoder.state_dict()} == {"visual"}
    assert sum(p.numel() for p in encoder.parameters()) == sum(p.numel() for p in model.visual.parameters())
    assert sum(p.numel() for p in encoder.parameters()) < sum(p.numel() for p in model.parameters()) / 2


def test_weights_come_from_the_folder(encoder: VisualEncoder, full_clip):
    model, _ = full_clip
    for name, tensor in model.visual.state_dict().items():
        torch.testing.assert_close(encoder.visual.state_dict()[name], tensor, rtol=0, atol=0)


def test_preprocess_is_open_clips_eval_transform(encoder: VisualEncoder, full_clip):
    _, transform = full_clip
    pixels = encoder.preprocess(IMAGES)
    assert pixels.shape == (len(IMAGES), 3, 32, 32)
    torch.testing.assert_close(pixels, torch.stack([transform(image) for image in IMAGES]))
    # The folder's preprocess_cfg (mean = std = 0.5) is used: white maps to exactly 1.
    assert torch.equal(encoder.preprocess([Image.new("RGB", (64, 64), (255, 255, 255))]), torch.ones(1, 3, 32, 32))


def test_shapes(encoder: VisualEncoder):
    pooled, patches = encoder(encoder.preprocess(IMAGES))
    assert pooled.shape == (len(IMAGES), encoder.visual_dim)
    assert patches.shape == (len(IMAGES), encoder.n_patches, encoder.visual_dim)


def test_pooled_is_the_post_layernorm_cls_token(encoder: VisualEncoder):
    pixels = encoder.preprocess(IMAGES)
    pooled, patches = encoder(pixels)
    with torch.no_grad():
        expected_pooled, expected_patches = hand_pooled(encoder.visual, pixels)
    torch.testing.assert_close(pooled, expected_pooled)
    torch.testing.assert_close(patches, expected_patches)
    assert not torch.allclose(pooled[0], pooled[1])  # different images, different features


def test_pooled_is_before_the_projection(encoder: VisualEncoder, full_clip):
    model, _ = full_clip
    pixels = encoder.preprocess(IMAGES)
    pooled, _ = encoder(pixels)
    with torch.no_grad():
        embedding = model.encode_image(pixels)  # (B, 16), open_clip's contrastive embedding
    assert pooled.shape[-1] != embedding.shape[-1]
    torch.testing.assert_close(pooled @ encoder.visual.proj, embedding)


def test_final_ln_after_pool_gives_the_same_kind_of_feature(tmp_path: Path):
    folder = write_clip_dir(tmp_path / "ln_after_pool", final_ln_after_pool=True)
    encoder = VisualEncoder.from_source(f"local-dir:{folder}")
    model, _ = open_clip.create_model_from_pretrained(f"local-dir:{folder}")
    assert model.visual.final_ln_after_pool
    pixels = encoder.preprocess(IMAGES)
    pooled, patches = encoder(pixels)
    with torch.no_grad():
        expected_pooled, expected_patches = hand_pooled(encoder.visual, pixels)
        torch.testing.assert_close(pooled @ encoder.visual.proj, model.eval().encode_image(pixels))
    torch.testing.assert_close(pooled, expected_pooled)
    torch.testing.assert_close(patches, expected_patches)


def test_encode_batches_and_returns_float32(encoder: VisualEncoder):
    pooled, patches = encoder.encode(IMAGES, batch_size=3)  # batches of 3 and 1
    expected_pooled, expected_patches = encoder(encoder.preprocess(IMAGES))
    assert pooled.dtype == patches.dtype == torch.float32
    assert not pooled.requires_grad
    torch.testing.assert_close(pooled, expected_pooled)
    torch.testing.assert_close(patches, expected_patches)


def test_regions_are_cell_means_of_the_patch_grid_row_by_row(encoder: VisualEncoder):
    rows, cols = encoder.grid_size                                             # 4 x 4 patches
    patches = torch.randn(2, rows * cols, encoder.visual_dim)
    cells = encoder.regions(patches, 2)
    assert cells.shape == (2, 4, encoder.visual_dim)
    grid = patches.view(2, rows, cols, -1)
    for index, (top, left) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        torch.testing.assert_close(cells[:, index], grid[:, top:top + 2, left:left + 2].mean((1, 2)))
    torch.testing.assert_close(encoder.regions(patches, rows), patches)  # one cell per patch: the patches


def test_a_cell_read_as_its_patches_keeps_them_side_by_side_in_its_place(encoder: VisualEncoder):
    rows, cols = encoder.grid_size                                             # 4 x 4 patches
    patches = torch.randn(2, rows * cols, encoder.visual_dim)
    cells = encoder.regions(patches, 2, per_cell=2).view(2, 4, 4, -1)         # (B, cell, patch of the cell, D)
    grid = patches.view(2, rows, cols, -1)
    for index, (top, left) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        torch.testing.assert_close(cells[:, index], grid[:, top:top + 2, left:left + 2].flatten(1, 2))
    torch.testing.assert_close(cells.mean(2), encoder.regions(patches, 2))  # their mean is the cell's mean


def test_encode_of_no_images_is_empty(encoder: VisualEncoder):
    pooled, patches = encoder.encode([])
    assert pooled.shape == (0, encoder.visual_dim) and patches.shape == (0, encoder.n_patches, encoder.visual_dim)


def test_frozen_and_stays_in_eval_mode(encoder: VisualEncoder):
    assert all(not p.requires_grad for p in encoder.parameters())
    assert not encoder.training and not any(m.training for m in encoder.modules())
    parent = torch.nn.Sequential(encoder)
    parent.train()
    assert not any(m.training for m in encoder.modules())


def test_forward_leaves_parameters_unchanged(encoder: VisualEncoder):
    before = {name: p.clone() for name, p in encoder.named_parameters()}
    pooled, patches = encoder(encoder.preprocess(IMAGES))
    assert not pooled.requires_grad and not patches.requires_grad  # nothing to backpropagate into
    for name, p in encoder.named_parameters():
        assert torch.equal(p, before[name]), name


def test_missing_folder_is_named(tmp_path: Path):
    missing = tmp_path / "no_such_clip"
    with pytest.raises(FileNotFoundError, match=re.escape(f"visual encoder folder not found: {missing}")):
        VisualEncoder.from_source(f"local-dir:{missing}")


@pytest.mark.parametrize("removed", ["open_clip_config.json", "open_clip_model.safetensors"])
def test_missing_file_in_folder_is_named(tmp_path: Path, removed: str):
    folder = write_clip_dir(tmp_path / "partial")
    (folder / removed).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{folder / removed} is missing")):
        VisualEncoder.from_source(f"local-dir:{folder}")


@pytest.mark.parametrize("name, pretrained", [("ViT-B-32", "openai"),
                                              ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None)])
def test_hub_weights_fail_fast_offline_with_advice(name: str, pretrained: str | None):
    with pytest.raises(RuntimeError) as error:
        VisualEncoder.from_source(name, pretrained)
    message = str(error.value)
    assert message.startswith(f"could not download the weights of open_clip model {name!r}")
    assert "HF_HUB_OFFLINE is set" in message
    assert "'local-dir:/path/to/folder'" in message and "open_clip_model.safetensors" in message


def test_unknown_names_and_tags_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Nope'"):
        VisualEncoder.from_source("ViT-Nope", "openai")
    with pytest.raises(ValueError, match=r"'ViT-B-32' needs pretrained weights: one of \[.*'openai'.*got 'nope'"):
        VisualEncoder.from_source("ViT-B-32", "nope")
    with pytest.raises(ValueError, match="needs pretrained weights"):
        VisualEncoder.from_source("ViT-B-32")
    with pytest.raises(ValueError, match="only applies to named open_clip models"):
        VisualEncoder.from_source(f"local-dir:{tmp_path}", "openai")


def test_non_vit_towers_are_not_implemented(tmp_path: Path):
    folder = write_clip_dir(tmp_path / "resnet", layers=[1, 1, 1, 1], width=8)
    with pytest.raises(NotImplementedError, match="only open_clip ViT towers are supported.*ModifiedResNet"):
        VisualEncoder.from_source(f"local-dir:{folder}")
