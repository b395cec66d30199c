"""What a `[RET]` query asks for after images: an earlier one again, or a new scene (`model/ret_context.py`)."""
import torch
import torch.nn.functional as F

from conftest import tiny_config
from model.generate import GenerationSettings, Retrieved, stream_reply
from model.grounded import Example, GroundedLM
from model.prompt import Turn
from model.ret_context import padded_earlier
from test_generate import RecordingSearch


def saved_and_grown(tiny_lm_dir, tiny_clip_dir, tmp_path) -> tuple[GroundedLM, GroundedLM]:
    """A checkpoint without the module, and the same loaded with a new one."""
    start = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    start.save_pretrained(tmp_path / "start")
    return start, GroundedLM.from_pretrained(tmp_path / "start", quantize="none", device="cpu", ret_context=True)


def points_at_the_first(model: GroundedLM) -> None:
    """Set the module to choose the first earlier image whatever is asked."""
    module = model.ret_context
    with torch.no_grad():
        module.none.bias.fill_(-100.0)
        module.ask.weight.zero_()
        module.ask.bias.fill_(1.0)
        module.order.zero_()
        module.order[0] = 1.0
        module.from_end.zero_()


def test_a_new_module_leaves_every_query_as_it_was(tiny_lm_dir, tiny_clip_dir, tmp_path):
    start, grown = saved_and_grown(tiny_lm_dir, tiny_clip_dir, tmp_path)
    hidden, before = torch.randn(4, start.config.lm_dim), torch.randn(4, start.config.lm_dim)
    earlier, present = padded_earlier([F.normalize(torch.randn(n, 8), dim=-1) for n in (0, 1, 2, 3)], "cpu")
    with torch.no_grad():
        assert torch.allclose(grown.ret_query(hidden, before, earlier, present), start.ret_query(hidden), atol=1e-6)


def test_the_choice_learns_which_earlier_image_a_request_names_and_the_query_is_that_image(
        tiny_lm_dir, tiny_clip_dir, tmp_path):
    """The state before `[RET]` says which picture ("the second one", or none) along a direction per choice, beside
    one feature a hundred times larger than the rest, as an LM's last layer has; rows hold two or three earlier
    images. Standardised and trained alone, the module names the right one; a pointing query is that image's
    vector."""
    _, model = saved_and_grown(tiny_lm_dir, tiny_clip_dir, tmp_path)
    module = model.ret_context
    generator = torch.Generator().manual_seed(0)
    dim = model.config.lm_dim
    says = torch.randn(4, dim, generator=generator)  # none, first, second, third

    def batch(n: int) -> tuple[torch.Tensor, ...]:
        counts = torch.randint(2, 4, (n,), generator=generator)
        named = (torch.rand(n, generator=generator) * (counts + 1)).long() - 1                # -1: none
        before = torch.randn(n, dim, generator=generator) + 2 * says[named + 1]
        before[:, 0] = 100 * torch.randn(n, generator=generator)
        images = [F.normalize(torch.randn(int(c), 8, generator=generator), dim=-1) for c in counts]
        return before, *padded_earlier(images, "cpu"), named

    def accuracy(before, earlier, present, named) -> float:
        with torch.no_grad():
            return (module.choices(before, present).argmax(1) - 1 == named).float().mean().item()

    test = batch(256)
    assert accuracy(*test) < 0.4, "a new module points nowhere"
    module.standardise(batch(512)[0])
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(200):
        before, _, present, named = batch(64)
        loss = F.cross_entropy(module.choices(before, present), named + 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert accuracy(*test) > 0.9
    before, earlier, present, named = test
    with torch.no_grad():
        queries = model.ret_query(torch.randn(256, dim), before, earlier, present)
        chosen = module.choices(before, present).argmax(1) - 1
    pointing = chosen >= 0
    assert torch.allclose(queries[pointing], earlier[pointing, chosen[pointing]], atol=1e-6)


def test_a_request_with_no_image_before_it_keeps_its_query_and_one_at_a_time_agrees(
        tiny_lm_dir, tiny_clip_dir, tmp_path):
    start, model = saved_and_grown(tiny_lm_dir, tiny_clip_dir, tmp_path)
    points_at_the_first(model)
    hidden, before = torch.randn(2, model.config.lm_dim), torch.randn(2, model.config.lm_dim)
    images = [torch.zeros(0, 8), F.normalize(torch.randn(2, 8), dim=-1)]
    earlier, present = padded_earlier(images, "cpu")
    with torch.no_grad():
        batched = model.ret_query(hidden, before, earlier, present)
        assert torch.allclose(batched[0], start.ret_query(hidden[0]))
        assert torch.allclose(batched[1], images[1][0]), "the second row points at its first image"
        assert torch.allclose(model.ret_query(hidden[1], before[1], images[1]), batched[1])
        assert torch.allclose(model.ret_query(hidden[0], before[0], images[0]), batched[0])


def test_the_app_points_at_an_image_of_the_conversation(tiny_lm_dir, tiny_clip_dir, tmp_path, colour_images):
    _, model = saved_and_grown(tiny_lm_dir, tiny_clip_dir, tmp_path)
    points_at_the_first(model)
    red, green, _ = colour_images
    turns = [Turn("user", [red, "describe it"]), Turn("assistant", ["A red one."]),
             Turn("user", [green, "and this?"]), Turn("assistant", ["A green one."]),
             Turn("user", ["show me another like the first one"])]
    search = RecordingSearch()
    events = list(stream_reply(model, turns, GenerationSettings(max_new_tokens=4, ret_scale_factor=1e6,
                                                                max_images=1), search))
    assert isinstance(events[0], Retrieved)
    assert torch.allclose(search.queries[0], model.embed_images([red])[0], atol=1e-5)
    search = RecordingSearch()
    list(stream_reply(model, turns[-1:], GenerationSettings(max_new_tokens=4, ret_scale_factor=1e6, max_images=1),
                      search))
    prompt = model.embed_conversation(turns[-1:])
    hidden, _ = model.hidden_states(torch.cat([prompt, model.embed_ids(torch.tensor([[model.ret_id]]))], 1))
    assert torch.allclose(search.queries[0], model.ret_query(hidden[0, -1]), atol=1e-5), "no image: as before"


def test_joint_training_fits_the_query_of_requests_after_images(tiny_lm_dir, tiny_clip_dir, tmp_path,
                                                                 colour_images):
    _, model = saved_and_grown(tiny_lm_dir, tiny_clip_dir, tmp_path)
    red, green, blue = colour_images
    alone = [Example([Turn("user", ["show me a red one"]), Turn("assistant", ["[RET]"])], [red]),
             Example([Turn("user", ["show me a green one"]), Turn("assistant", ["[RET]"])], [green])]
    after = Example([Turn("user", [blue, "describe it"]), Turn("assistant", ["A blue one."]),
                     Turn("user", ["now a red one"]), Turn("assistant", ["[RET]"])], [red])
    for batch, reads in ((alone, False), (alone + [after], True)):
        model.zero_grad()
        model(batch).loss.backward()
        grad = model.ret_context.query.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == reads
