"""Familiarity: an image unlike the training images is flagged, the chat says so, and the reply goes on."""
import torch
from PIL import Image

from conftest import tiny_config
from model.familiarity import FAMILIARITY_NAME, Familiarity
from model.generate import Done, GenerationSettings, Notice, Text, stream_reply
from model.grounded import GroundedLM
from model.prompt import Turn


def gaussian(n: int, patches: int = 4, dim: int = 16, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    """(n, patches, dim) features of n images."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.1, 2.0, dim)  # anisotropic: Mahalanobis, not Euclidean, distance matters
    return torch.randn(n, patches, dim, generator=generator) * scales + shift


def test_far_features_are_unfamiliar_and_the_training_kind_is_not():
    familiarity = Familiarity.fit(gaussian(2000), gaussian(500, seed=1), "blobs")
    assert familiarity.unfamiliar(gaussian(1000, seed=2)).float().mean() <= 0.01
    assert familiarity.unfamiliar(gaussian(100, seed=3, shift=3.0)).all()
    # a step along the direction training never varied in is further than a larger step along a varied one
    narrow, wide = torch.zeros(1, 1, 16), torch.zeros(1, 1, 16)
    narrow[0, 0, 0], wide[0, 0, -1] = 1.0, 3.0
    assert familiarity.distance(narrow) > familiarity.distance(wide)


def test_it_travels_with_the_checkpoint(tiny_lm_dir, tiny_clip_dir, colour_images, tmp_path):
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    assert model.unfamiliar(colour_images) == [False] * 3, "a checkpoint without one flags nothing"
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / FAMILIARITY_NAME).exists()
    assert GroundedLM.from_pretrained(tmp_path / "plain", device="cpu").familiarity is None

    patches = model.visual.encode(colour_images)[1]                                         # (3, P, D)
    model.familiarity = Familiarity.fit(patches.repeat(50, 1, 1) + 0.01 * gaussian(150, *patches.shape[1:]),
                                        patches, "three colours")
    model.save_pretrained(tmp_path / "ckpt")
    loaded = GroundedLM.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert loaded.familiarity.threshold == model.familiarity.threshold
    assert loaded.familiarity.trained_on == "three colours"
    assert torch.equal(loaded.familiarity.whiten, model.familiarity.whiten)


def test_an_unfamiliar_upload_gets_a_note_and_still_a_reply(tiny_lm_dir, tiny_clip_dir, colour_images):
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    red, green, _ = colour_images
    patches = model.visual.encode([red])[1]                                                 # (1, P, D)
    model.familiarity = Familiarity.fit(patches + 0.01 * gaussian(200, *patches.shape[1:]),
                                        patches + 0.01 * gaussian(50, *patches.shape[1:], seed=1), "red squares")
    odd = Image.effect_mandelbrot((40, 40), (-2, -1.5, 1, 1.5), 50).convert("RGB")
    assert model.unfamiliar([red, odd]) == [False, True]

    settings = GenerationSettings(max_new_tokens=5)
    events = list(stream_reply(model, [Turn("user", [red, odd, "describe these"])], settings))
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert notices == ["Image 2 of 2 looks unlike the images this model was trained on (red squares): "
                       "what it says about it will not be reliable."]
    assert any(isinstance(e, Text) for e in events) and isinstance(events[-1], Done)

    later = [Turn("user", [odd, "describe it"]), Turn("assistant", ["something"]), Turn("user", ["and now?"])]
    assert not any(isinstance(e, Notice) for e in stream_reply(model, later, settings)), \
        "an image is flagged in the turn it arrives, not again in every later reply"
