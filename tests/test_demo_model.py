"""The bundled demo (assets/demo) on its shipped weights: it loads offline from any working directory,
describes pictures, and answers a request for a picture by emitting `[RET]` whose query finds that
picture, through the decoding the app uses (`stream_reply`). SmolLM2 in 4 bits on the CPU."""
from dataclasses import dataclass

import pytest
from safetensors import safe_open

from model.world import shapes
from model.checkpoint import ASSETS
from model.config import WEIGHTS_NAME
from model.training.evaluate import ret_queries
from model.generate import GenerationSettings, Retrieved, Text, stream_reply
from model.grounded import GroundedLM
from model.prompt import Turn, request_phrase, retrieval_request

DEMO = ASSETS / "demo"
pytestmark = pytest.mark.skipif(
    not (DEMO / WEIGHTS_NAME).is_file(),
    reason=f"{DEMO / WEIGHTS_NAME} does not exist yet: train it with `python -m model.training.train --out assets/demo`")


@pytest.fixture(scope="module")
def demo():
    return GroundedLM.from_pretrained("demo", quantize="4bit", device="cpu")


@pytest.fixture(scope="module")
def gallery(demo):
    """The first 100 test scenes, indexed with the demo's image mapping."""
    items = [shapes.sample("test", i, demo.visual.image_size[0]) for i in range(100)]
    return items, demo.embed_images([s.image for s in items])


def reply(model, turns, search):
    """The reply's text up to its first retrieval (where decoding stops), and that retrieval if any."""
    text = ""
    for event in stream_reply(model, turns, GenerationSettings(max_new_tokens=40), search=search):
        if isinstance(event, Retrieved):
            return text, event
        text += event.delta if isinstance(event, Text) else ""
    return text, None


def test_the_demo_is_the_offline_bundle(demo):
    assert demo.config.lm == "smollm2-135m-instruct" and demo.visual.source == f"local-dir:{(DEMO / 'clip').resolve()}"
    with safe_open(DEMO / WEIGHTS_NAME, "pt") as f:
        assert f.metadata()["fingerprint"] == demo.fingerprint, "the shipped weights are the ones loaded"


def test_the_demo_describes_test_images_exactly(demo, gallery):
    items, _ = gallery
    one_object = [s for s in items if len(s.scene.objects) == 1][:5]
    outcomes = []
    for s in one_object:  # a retrieval while describing counts as a wrong answer
        text, retrieved = reply(demo, [Turn("user", [s.image, "Describe the image."])], lambda query, exclude: [])
        parsed = shapes.parse_caption(text)
        outcomes.append((s.caption, text, retrieved is None and parsed is not None and
                         parsed.objects == s.scene.objects))
    assert sum(right for *_, right in outcomes) >= 4, outcomes


@dataclass(frozen=True)
class Hit:
    id: int
    score: float


def test_the_demo_answers_requests_with_the_described_picture(demo, gallery):
    """20 requests, teacher-forced in one batch: does greedy decoding open the reply with [RET], and does its
    query rank first a picture with the requested objects? Then one request through the app's decoding."""
    items, vectors = gallery
    requests = items[:20]
    queries, emitted = ret_queries(demo, [retrieval_request(s.caption, demo.config.ret_token) for s in requests])
    best = (queries @ vectors.T).argmax(1)                                               # (20,)
    right = [items[int(b)].scene.objects == s.scene.objects for b, s in zip(best, requests)]
    assert emitted.sum() >= 18, [s.caption for s, e in zip(requests, emitted) if not e]
    assert sum(right) >= 16, list(zip([s.caption for s in requests], right))

    def search(query, exclude):
        scores = vectors @ query
        return [Hit(int(i), float(scores[i])) for i in scores.argsort(descending=True) if int(i) not in exclude]

    asked = next(s for s, e, r in zip(requests, emitted, right) if e and r)
    text, retrieved = reply(demo, [Turn("user", [f"Find an image of {request_phrase(asked.caption)}."])], search)
    assert retrieved is not None, f"no [RET] in the reply {text!r}"
    assert items[retrieved.hits[0].id].scene.objects == asked.scene.objects
