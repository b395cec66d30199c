"""What the grounded LM is trained on: chat conversations in exactly the form the app sends at inference
(`model.generate.stream_reply` with `Turn`s), so what is learnt is what is used.

`Conversations` (the mappings and `[RET]`, `train.py`'s default):
    captioning  user: [image, "Describe the image."]                assistant: "A small red circle on the left."
    retrieval   user: "Show me a picture of a small red circle ..."  assistant: "[RET]"
    history     (every `context_every`-th batch, CONTEXT_EVERY unless told) earlier image turns with their
                captions, then a new image or request, or "Show me another picture like the second one." -> "[RET]"
In the shapes world the model's own descriptions are the grammar's plain captions (one order and wording per
scene: nothing to guess but the scene), while requests keep the grammar's variety.

`QuestionConversations` (LMEye's stage 2: `train.py --questions`): questions about shapes-world scenes, mixed
with what the model already does, so that learning to look costs it nothing it could do before. A batch of 16 holds
    8  questions on an uploaded image       [image, "What colour is the shape on the left?"] -> "Red."
    2  the simple questions that compound questions decompose into (what IMMO's Observer is asked)
                                            [image, "Where is the red star?"]                -> "On the left."
    2  follow-ups about an earlier image    [image, "Describe the image."] -> caption, ["How many ...?"] -> "2."
    2  descriptions                         [image, "Describe the image."]                   -> the plain caption
    2  requests after a described image     [image, ...] -> caption, ["Show me ..."]         -> "[RET]"
Answers are short (`questions.reply_text`); only the reply is trained (the caption loss covers the last turn).
The simple questions are of each of `questions.SIMPLE_KINDS` alike, unless `ask_more` names kinds to ask twice as
often (`train.py --ask-more`: the kinds a module still gets wrong) or drills (`questions.DRILLS`) to ask as often
as those.

Both are pure functions of (seed, step): a resumed run sees exactly the batches an uninterrupted one would have.
"""
from __future__ import annotations

import random

from PIL import Image
from torch.utils.data import Dataset

from model.config import GroundedConfig
from model.grounded import Example
from model.prompt import REQUESTS, Turn, retrieval_request
from model.world import questions, shapes
from model.world.data import ShapesDataset

INSTRUCTIONS = ("Describe the image.", "What do you see?", "What is in this picture?",
                "What does this image show?", "Write a caption for this image.", "Describe this picture.")
CONTEXT_REQUESTS = ("Show me another picture like the {} one.", "Find another image like the {} one.",
                    "Can you show me one more like the {} picture?")
ORDINALS = ("first", "second", "third")
RET_TOKEN = GroundedConfig.ret_token
"""Training writes the default `[RET]`: the checkpoint's tokenizer gets it as a special token."""
CONTEXT_EVERY = 3
"""Every 3rd batch is multi-turn: long prompts in their own batches keep the others unpadded."""


def sentence(text: str) -> str:
    """First letter capitalised, ending in a full stop (unless it already ends a sentence)."""
    text = " ".join(text.split())
    if not text:
        raise ValueError("empty caption")
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def caption_turns(image: Image.Image, caption: str, rng: random.Random) -> list[Turn]:
    return [Turn("user", [image, rng.choice(INSTRUCTIONS)]), Turn("assistant", [sentence(caption)])]


def retrieval_turns(caption: str, rng: random.Random) -> list[Turn]:
    return retrieval_request(caption, RET_TOKEN, rng.choice(REQUESTS))


def context_request(ordinal: int, rng: random.Random) -> str:
    return rng.choice(CONTEXT_REQUESTS).format(ORDINALS[ordinal])


class Conversations:
    """Training conversations drawn from (image, caption) pairs, a pure function of (seed, step).

    A resumed run therefore sees exactly the batches an uninterrupted one would have seen.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, context_every: int = CONTEXT_EVERY):
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        if context_every < 1:
            raise ValueError(f"context_every must be >= 1, got {context_every}")
        self.dataset, self.seed, self.context_every = dataset, seed, context_every

    def description(self, index: int, caption: str) -> str:
        """What the model says when asked to describe item `index`: the shapes world's plain caption (one order
        and wording per scene), else the dataset's caption."""
        if not isinstance(self.dataset, ShapesDataset):
            return caption
        return shapes.plain_caption(self.dataset.sample(index).scene)

    def another_view(self, index: int, image: Image.Image) -> Image.Image:
        """Another picture of the same thing: a new rendering for the shapes world, else the image itself."""
        if not isinstance(self.dataset, ShapesDataset):
            return image
        scene = self.dataset.sample(index).scene
        return shapes.render(scene, random.Random(f"another:{self.dataset.split}:{index}"), self.dataset.image_size)

    def batch(self, step: int, size: int, multi_turn: bool | None = None) -> list[Example]:
        """`size` conversations, the second half retrieval; multi-turn every `context_every`-th step unless
        `multi_turn` says otherwise. No item appears twice in a batch while the dataset has enough: a
        repeated image would be its own negative in the contrastive loss."""
        rng = random.Random(f"{self.seed}:{step}")
        every = self.context_every
        multi_turn = step % every == every - 1 if multi_turn is None else multi_turn
        used: set[int] = set()

        def draw() -> tuple[int, Image.Image, str, str]:
            """An unused item: (index, image, its caption for requests, the model's description of it)."""
            index = rng.randrange(len(self.dataset))
            while index in used and len(used) < len(self.dataset):
                index = rng.randrange(len(self.dataset))
            used.add(index)
            image, caption = self.dataset[index]
            return index, image, caption, self.description(index, caption)

        examples = []
        for i in range(size):
            retrieval = i >= size // 2  # half and half
            if not multi_turn:
                index, image, caption, description = draw()
                examples.append(Example(retrieval_turns(caption, rng), [image]) if retrieval
                                else Example(caption_turns(image, description, rng)))
                continue
            history = [draw() for _ in range(rng.randint(2, len(ORDINALS)))]
            turns = [t for _, image, _, description in history for t in caption_turns(image, description, rng)]
            if retrieval and rng.random() < 0.5:  # refer back to an earlier picture
                k = rng.randrange(len(history))
                index, image, _, _ = history[k]
                turns += [Turn("user", [context_request(k, rng)]), Turn("assistant", [RET_TOKEN])]
                examples.append(Example(turns, [self.another_view(index, image)]))
            elif retrieval:
                index, image, caption, _ = draw()
                examples.append(Example(turns + retrieval_turns(caption, rng), [image]))
            else:
                index, image, _, description = draw()
                examples.append(Example(turns + caption_turns(image, description, rng)))
        return examples


class QuestionConversations:
    """Stage-2 conversations about the scenes of one split of the shapes world (see the module's docstring)."""

    def __init__(self, split: str, scenes: int, image_size: int, holdout: bool, seed: int = 0,
                 ask_more: tuple[str, ...] = ()):
        allowed = questions.SIMPLE_KINDS + questions.DRILLS
        if not set(ask_more) <= set(allowed):
            raise ValueError(f"ask_more names simple kinds or drills ({', '.join(allowed)}), got {ask_more}")
        self.split, self.scenes, self.image_size, self.holdout, self.seed = split, scenes, image_size, holdout, seed
        drills = tuple(name for name in ask_more if name in questions.DRILLS)  # twice, as a kind named is asked
        self.simple_kinds = questions.SIMPLE_KINDS + tuple(ask_more) + drills  # `questions.ask` draws one of the list

    def batch(self, step: int, size: int) -> list[Example]:
        if size < 8:
            raise ValueError("a question batch holds at least 8 conversations (two requests among them)")
        rng = random.Random(f"questions:{self.split}:{self.seed}:{step}")
        used: set[int] = set()

        def index() -> int:
            i = rng.randrange(self.scenes)
            while i in used:
                i = rng.randrange(self.scenes)
            used.add(i)
            return i

        def asked(kinds: tuple[str, ...]) -> tuple[shapes.Sample, questions.Question]:
            return questions.question(self.split, index(), self.image_size, self.holdout, kinds)

        def described(sample: shapes.Sample) -> list[Turn]:
            return caption_turns(sample.image, shapes.plain_caption(sample.scene), rng)

        def scene() -> shapes.Sample:
            return shapes.sample(self.split, index(), self.image_size, self.holdout)

        def answered(parts: list, answer: str) -> list[Turn]:
            return [Turn("user", parts), Turn("assistant", [questions.reply_text(answer)])]

        share = size // 8
        examples = []
        for _ in range(size - 4 * share):
            sample, q = asked(self.simple_kinds)
            examples.append(Example(answered([sample.image, q.text], q.answer)))
        for _ in range(share):
            sample, q = asked(questions.COMPOUND_KINDS)
            while not q.steps:  # a scene of one object, or of objects that cannot be named apart
                sample, q = asked(questions.COMPOUND_KINDS)
            text, answer = rng.choice(q.steps)
            examples.append(Example(answered([sample.image, text], answer)))
        for _ in range(share):
            sample, q = asked(self.simple_kinds)
            examples.append(Example(described(sample) + answered([q.text], q.answer)))
        for _ in range(share):
            examples.append(Example(described(scene())))
        for _ in range(share):
            wanted = scene()
            examples.append(Example(described(scene()) + retrieval_turns(wanted.caption, rng), [wanted.image]))
        return examples
