"""The grounded LM: splicing images into the LM input, the [RET] rows, losses, and what may learn."""
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import tiny_config
from model.grounded import Example, GroundedLM
from model.prompt import Turn, render


def test_images_are_spliced_as_mapped_visual_tokens(tiny_model, colour_images):
    red, green, _ = colour_images
    turns = [Turn("user", [red, "describe the image."]), Turn("assistant", ["a red one"]),
             Turn("user", ["and", green, "this?"])]
    embeds = tiny_model.embed_conversation(turns)                      # (1, T, lm_dim)
    segments = render(turns, tiny_model.tokenizer, "chat")
    n = tiny_model.config.n_visual_tokens
    assert embeds.shape == (1, sum(n if isinstance(s, Image.Image) else len(s) for s in segments), 32)
    expected = tiny_model.visual_tokens(tiny_model.visual_features([red, green]))  # (2, n, lm_dim)
    position, found = 0, []
    for s in segments:
        if isinstance(s, Image.Image):
            found.append(embeds[0, position:position + n])
            position += n
        else:
            assert torch.equal(embeds[0, position:position + len(s)], tiny_model.lm.get_input_embeddings()(torch.tensor(s)))
            position += len(s)
    assert torch.allclose(torch.stack(found), expected)


def test_ret_token_has_its_own_input_row_and_output_logit(tiny_model):
    table = tiny_model.lm.get_input_embeddings()
    assert tiny_model.ret_id >= table.num_embeddings, "the frozen table is not resized"
    ids = torch.tensor([5, tiny_model.ret_id])
    embeds = tiny_model.embed_ids(ids)
    assert torch.equal(embeds[1], tiny_model.ret_embedding)
    hidden = torch.randn(3, 32)
    logits = tiny_model.logits(hidden)
    assert logits.shape == (3, tiny_model.ret_id + 1)
    assert torch.allclose(logits[:, tiny_model.ret_id], hidden @ tiny_model.ret_embedding)
    assert torch.allclose(logits[:, :tiny_model.vocab_size], tiny_model.lm.lm_head(hidden))


def test_untied_head_gets_a_separate_ret_output_row(tiny_untied_lm_dir, tiny_clip_dir):
    model = GroundedLM(tiny_config(tiny_untied_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    assert not model.tied and model.ret_output is not None
    hidden = torch.randn(2, 32)
    assert torch.allclose(model.logits(hidden)[:, model.ret_id], hidden @ model.ret_output)
    assert "ret_output" in model.trainable_state_dict()


def test_index_vectors_and_queries_are_unit_length(tiny_model, colour_images):
    vectors = tiny_model.embed_images(colour_images)
    assert vectors.shape == (3, 8)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(tiny_model.ret_query(torch.randn(4, 32)).norm(dim=-1), torch.ones(4), atol=1e-5)


def test_fingerprint_follows_the_image_mapping(tiny_lm_dir, tiny_clip_dir):
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    before = model.fingerprint
    assert model.fingerprint == before
    with torch.no_grad():
        model.image_mapping.bias.add_(1.0)
    assert model.fingerprint != before


def examples(images):
    return [Example([Turn("user", [im, "describe the image."]), Turn("assistant", [f"a {c} square [RET]"])], [im])
            for im, c in zip(images, ("red", "green", "blue"))]


def test_losses_match_their_definitions(tiny_lm_dir, tiny_clip_dir, colour_images):
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    out = model(examples(colour_images))
    assert out.caption_loss > 0 and out.ret_loss > 0
    assert torch.allclose(out.loss, out.caption_loss + out.ret_loss)
    with torch.no_grad():  # a zero temperature-scale makes every pairing equally likely: InfoNCE = log(batch)
        model.logit_scale.fill_(-30.0)
    assert math.isclose(model(examples(colour_images)).ret_loss.item(), math.log(3), rel_tol=1e-4)
    with pytest.raises(ValueError, match="ret_images"):
        model([Example(examples(colour_images)[0].turns, [])])


def test_a_training_step_moves_only_the_small_layers(tiny_lm_dir, tiny_clip_dir, colour_images):
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("lm.", "visual."))}
    trainable_before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for n, p in model.named_parameters() if n in trainable_before}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(5):
        out = model(examples(colour_images))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), f"frozen weight {k} changed"
    changed = [k for k, v in model.trainable_state_dict().items() if not torch.equal(v, trainable_before[k])]
    assert set(changed) == set(trainable_before)
