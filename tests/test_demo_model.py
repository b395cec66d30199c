"""The bundled demo (assets/demo) on its shipped weights: it loads offline, sees, and retrieves — through
the same decoding the app uses (`stream_reply`), SmolLM2 in 4 bits on the CPU."""
import os
from dataclasses import dataclass

import pytest
from safetensors import safe_open

from model import shapes
from model.checkpoint import ASSETS
from model.config import WEIGHTS_NAME
from model.generate import GenerationSettings, Retrieved, Text, stream_reply
from model.grounded import GroundedLM
from model.prompt import Turn
from model.train import request_phrase

DEMO = ASSETS / "demo"
pytestmark = pytest.mark.skipif(
    not (DEMO / WEIGHTS_NAME).is_file(),
    reason=f"{DEMO / WEIGHTS_NAME} does not exist yet: train it with `python -m model.train --out assets/demo`")


@pytest.fixture(scope="module")
def demo():
    cwd = os.getcwd()
    os.chdir(ASSETS.parent)  # the config names its encoder `local-dir:assets/demo/clip`, from the repository root
    try:
        yield GroundedLM.from_pretrained("demo", quantize="4bit", device="cpu")
    finally:
        os.chdir(cwd)


@dataclass(frozen=True)
class Hit:
    id: int
    score: float


@pytest.fixture(scope="module")
def gallery(demo):
    """The first 100 test scenes, indexed with the demo's image mapping."""
    items = [shapes.sample("test", i, demo.visual.image_size[0]) for i in range(100)]
    return items, demo.embed_images([s.image for s in items])


def reply(model, turns, search):
    events = list(stream_reply(model, turns, GenerationSettings(max_new_tokens=48), search=search))
    return "".join(e.delta for e in events if isinstance(e, Text)), [e for e in events if isinstance(e, Retrieved)]


def test_the_demo_is_the_offline_bundle(demo):
    assert demo.config.lm == "smollm2-135m-instruct" and demo.visual.source == "local-dir:assets/demo/clip"
    with safe_open(DEMO / WEIGHTS_NAME, "pt") as f:
        assert f.metadata()["fingerprint"] == demo.fingerprint, "the shipped weights are the ones loaded"


def test_the_demo_describes_test_images_exactly(demo, gallery):
    items, _ = gallery
    one_object = [s for s in items if len(s.scene.objects) == 1][:5]
    never = lambda query, exclude: pytest.fail("asked to describe a picture, the model retrieved one")  # noqa: E731
    replies = [reply(demo, [Turn("user", [s.image, "Describe the image."])], never)[0] for s in one_object]
    right = [shapes.parse_caption(text) is not None and shapes.parse_caption(text).objects == s.scene.objects
             for text, s in zip(replies, one_object)]
    assert sum(right) >= 4, list(zip([s.caption for s in one_object], replies))


def test_the_demo_retrieves_the_described_picture(demo, gallery):
    items, vectors = gallery

    def search(query, exclude):
        scores = vectors @ query
        return [Hit(int(i), float(scores[i])) for i in scores.argsort(descending=True) if int(i) not in exclude]

    requests = items[:5]
    outcomes = []
    for s in requests:
        text, retrieved = reply(demo, [Turn("user", [f"Show me a picture of {request_phrase(s.caption)}."])], search)
        right = bool(retrieved) and items[retrieved[0].hits[0].id].scene.objects == s.scene.objects
        outcomes.append((s.caption, text, right))
    assert sum(right for *_, right in outcomes) >= 4, outcomes
