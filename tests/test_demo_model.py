"""The bundled demo (assets/demo) on its shipped weights: it loads offline from any working directory,
describes pictures of one and two objects, answers a request for a picture by emitting `[RET]` whose query
finds that picture (alone, through the decoding the app uses, and after three described images), finds another
picture like the one a request names among those described, and flags a photograph as unlike what it was trained
on. SmolLM2 in 4 bits on the CPU.

The thresholds are the counts the shipped weights get on these fixed samples, less a margin, in line with the
rates `python -m model.training.evaluate --checkpoint demo` measured on 200 test images."""
import random
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open

from model.checkpoint import ASSETS
from model.config import WEIGHTS_NAME
from model.generate import GenerationSettings, Retrieved, Text, stream_reply
from model.grounded import GroundedLM
from model.images import load_image
from model.prompt import Turn, request_phrase, retrieval_request
from model.training.conversations import CONTEXT_REQUESTS, ORDINALS
from model.training.evaluate import context_conversations, greedy_replies, ret_queries, same_scene
from model.training.familiarity import skimage_photographs
from model.world import shapes

DEMO = ASSETS / "demo"
# On these fixed samples the shipped weights get: two objects 9 and 9 of 10; requests 20 of 20; after history 20 and 19
# of 20, another like the k-th 20 of 20; through the app 5 of 5; the Reasoner 9 and 8 of 9 (README: known weaknesses).
TWO_OBJECTS_RIGHT = 7
AFTER_HISTORY_RET = 18
AFTER_HISTORY_RIGHT = 16
REFER_BACK_RIGHT = 18  # of 20
REQUESTS_RIGHT = 18  # of 20
APP_REQUESTS_RIGHT = 4  # of 5
REASONER_STEPS = 8  # of 9
REASONER_CONCLUDES = 7  # of 9


@pytest.fixture(scope="module")
def demo():
    model = GroundedLM.from_pretrained("demo", device="cpu")
    assert model.config.quantize == "4bit", "the demo loads as it was trained: 4-bit"
    return model


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
    assert sum(right) >= REQUESTS_RIGHT, list(zip([s.caption for s in requests], right))

    def search(query, exclude):
        scores = vectors @ query
        return [Hit(int(i), float(scores[i])) for i in scores.argsort(descending=True) if int(i) not in exclude]

    through_the_app = []  # the first five requests as a user types them, decoded as the app decodes
    for asked in requests[:5]:
        text, retrieved = reply(demo, [Turn("user", [f"Find an image of {request_phrase(asked.caption)}."])], search)
        through_the_app.append(retrieved is not None and items[retrieved.hits[0].id].scene.objects
                               == asked.scene.objects)
    assert sum(through_the_app) >= APP_REQUESTS_RIGHT, through_the_app


def test_the_demo_reads_its_cells_and_describes_scenes_of_two_objects(demo):
    """Ten two-object test scenes, described greedily in one batch, then again with the encoder's pooled CLS feature
    zeroed: what the demo says then comes from its cell words (README: cell words). Not looking first: the request
    module reads the image's tokens from the encoder, the CLS tokens among them."""
    scenes = [s for s in (shapes.sample("test", i, demo.visual.image_size[0]) for i in range(100, 200))
              if len(s.scene.objects) == 2][:10]
    conversations = [[Turn("user", [s.image, "Describe the image."])] for s in scenes]
    features = demo.visual_features
    cls_zeroed = lambda images: features(images).index_fill(1, torch.tensor([0]), 0)  # noqa: E731
    try:
        for label, tampered in (("own", features), ("cls zeroed", cls_zeroed)):
            demo.visual_features = tampered
            replies = greedy_replies(demo, conversations, look=False)
            right = [not r.ret and getattr(shapes.parse_caption(r.text), "objects", None) == s.scene.objects
                     for s, r in zip(scenes, replies)]
            assert sum(right) >= TWO_OBJECTS_RIGHT, (label, [(s.caption, r.text) for s, r in zip(scenes, replies)])
    finally:
        del demo.visual_features


def test_after_three_described_images_a_request_retrieves_the_scene_asked_for(demo, gallery):
    """Twenty conversations of three described images, then a request for a scene of the gallery: the reply
    opens with [RET], and its query ranks first a picture of that scene."""
    items, vectors = gallery
    history, _, _ = context_conversations("test", 20, demo.visual.image_size[0])
    asked = items[20:40]
    requests = [retrieval_request(s.caption, demo.config.ret_token)[:1] for s in asked]
    replies = greedy_replies(demo, [h + r for h, r in zip(history, requests)], queries=True)
    relevant = same_scene([s.scene for s in asked], [s.scene for s in items], [s.caption for s in items])
    best = (torch.stack([r.query for r in replies]) @ vectors.T).argmax(1)
    assert sum(r.ret for r in replies) >= AFTER_HISTORY_RET, [r.text for r in replies if not r.ret]
    right = sum(bool(r.ret and relevant[i, best[i]]) for i, r in enumerate(replies))
    assert right >= AFTER_HISTORY_RIGHT, (sum(r.ret for r in replies), right)


def test_after_three_described_images_another_like_one_of_them_finds_that_scene(demo):
    """Twenty conversations of three described images, then "Show me another picture like the second one" (first,
    second and third in turn): the query ranks first a new picture of the scene named, among new pictures of all
    sixty scenes."""
    size = demo.visual.image_size[0]
    history, named, scenes = context_conversations("test", 20, size)
    drawn = [s for conversation in scenes for s in conversation]
    pictures = demo.embed_images([shapes.render(s, random.Random(f"another:{i}"), size) for i, s in enumerate(drawn)])
    requests = [[Turn("user", [CONTEXT_REQUESTS[0].format(ORDINALS[k])])] for k in named]
    replies = greedy_replies(demo, [h + r for h, r in zip(history, requests)], queries=True)
    best = (torch.stack([r.query for r in replies]) @ pictures.T).argmax(1)
    right = sum(bool(r.ret and drawn[b].objects == scenes[c][k].objects)
                for c, (r, b, k) in enumerate(zip(replies, best.tolist(), named)))
    assert right >= REFER_BACK_RIGHT, (sum(r.ret for r in replies), right)


def test_a_photograph_is_flagged_as_unlike_the_training_images_and_scenes_are_not(demo, gallery):
    items, _ = gallery
    photographs = skimage_photographs()
    assert len(photographs) >= 10, "scikit-image's sample photographs (requirements-dev.txt)"
    flagged = demo.unfamiliar([load_image(p) for p in photographs])
    assert sum(flagged) >= 0.95 * len(photographs), [p.name for p, f in zip(photographs, flagged) if not f]
    assert sum(demo.unfamiliar([s.image for s in items])) <= 1, "test scenes are the training kind (1 in 1,000 flagged)"


def test_a_long_description_of_a_photograph_does_not_retrieve(demo):
    """Two photographs whose long descriptions opened `[RET]` mid-reply (README: the retrieval stage): the demo's
    `[RET]` opens a reply or never comes."""
    photographs = [p for p in skimage_photographs() if p.name in ("coffee.png", "hubble_deep_field.jpg")]
    assert len(photographs) == 2
    for photograph in photographs:
        events = list(stream_reply(demo, [Turn("user", [load_image(photograph), "Describe the image."])],
                                   GenerationSettings(), search=lambda query, exclude: [Hit(0)]))
        assert not any(isinstance(e, Retrieved) for e in events), photograph.name
        assert events[-1].stats["new_tokens"] > 20, "it described the photograph at length"


def test_the_demos_reasoner_questions_its_observer_and_concludes_what_the_answers_imply(demo):
    """The shipped Reasoner on fixed test questions, three of each compound kind: a well-formed monologue each,
    mostly the steps of the question asked in order, and mostly the final answer the Observer's answers imply
    (or, where they do not say, one that says it is a guess). Whether that answer is right is the Observer's
    part (README: IMMO)."""
    from model.monologue import Monologue, think
    from model.training.evaluate_questions import first_questions
    from model.training.monologue import GUESS, conclusion
    from model.world import questions

    stepped, concluded = [], []
    for kind in questions.COMPOUND_KINDS:
        for sample, q in first_questions("test", kind, 3, demo.visual.image_size[0]):
            record = Monologue()
            list(think(demo, [Turn("user", [sample.image, q.text])], record=record))
            assert record.fallback is None, record.lines
            stepped.append((record.asked == [s for s, _ in q.steps], record.lines))
            implied, reason = conclusion(q, record.answers)
            said_guess = GUESS in record.answer
            concluded.append((said_guess if reason == GUESS else record.answer.startswith(implied) and not said_guess,
                              record.lines, implied, reason))
    assert sum(right for right, _ in stepped) >= REASONER_STEPS, [lines for right, lines in stepped if not right]
    assert sum(right for right, *_ in concluded) >= REASONER_CONCLUDES, [c for c in concluded if not c[0]]
