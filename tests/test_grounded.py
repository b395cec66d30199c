"""The grounded LM: splicing images into the LM input, the [RET] rows, losses, and what may learn."""
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import tiny_config
from model.grounded import Example, GroundedLM
from model.prompt import Turn, count_tokens, render, render_with_target, retrieval_request


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


def test_region_tokens_follow_the_cls_tokens_one_per_cell(tiny_lm_dir, tiny_clip_dir, colour_images):
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=2), quantize="none", device="cpu")
    assert model.config.tokens_per_image == 2 + 4
    pooled, patches = model.visual.encode(colour_images[:2])
    tokens = model.visual_tokens(model.visual_features(colour_images[:2]))   # (2, 6, lm_dim)
    assert tokens.shape == (2, 6, 32)
    torch.testing.assert_close(tokens[:, :2], model.input_mapping(pooled).view(2, 2, 32))
    torch.testing.assert_close(tokens[:, 2:], model.region_mapping(model.visual.regions(patches, 2)))
    turns = [Turn("user", [colour_images[0], "describe the image."])]
    segments = render(turns, model.tokenizer, "chat")
    assert model.embed_conversation(turns).shape[1] == count_tokens(segments, 6)
    assert {"region_mapping.weight", "region_mapping.bias"} <= set(model.trainable_state_dict())


def test_several_tokens_per_cell_follow_cell_by_cell_each_with_its_place(tiny_lm_dir, tiny_clip_dir, colour_images):
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=2, tokens_per_cell=3), quantize="none",
                       device="cpu")
    assert model.config.tokens_per_image == 2 + 4 * 3
    with torch.no_grad():
        model.region_positions.normal_()
    _, patches = model.visual.encode(colour_images[:2])
    tokens = model.visual_tokens(model.visual_features(colour_images[:2]))      # (2, 14, lm_dim)
    cells = model.region_mapping(model.visual.regions(patches, 2)).view(2, 4, 3, 32) + model.region_positions
    torch.testing.assert_close(tokens[:, 2:], cells.flatten(1, 2))
    turns = [Turn("user", [colour_images[0], "describe the image."])]
    assert model.embed_conversation(turns).shape[1] == count_tokens(render(turns, model.tokenizer, "chat"), 14)


def test_a_cell_read_as_its_patches_is_mapped_from_them_side_by_side(tiny_lm_dir, tiny_clip_dir, colour_images,
                                                                     tmp_path):
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=2, cell_patches=2), quantize="none",
                       device="cpu")
    assert model.config.tokens_per_image == 2 + 4, "as many LM positions as a cell read as its mean"
    _, patches = model.visual.encode(colour_images[:2])
    features = model.visual_features(colour_images[:2])                               # (2, 1 + 4 * 4, visual_dim)
    assert features.shape == (2, 1 + 16, 32)
    tokens = model.visual_tokens(features)                                             # (2, 6, lm_dim)
    read = model.visual.regions(patches, 2, per_cell=2).view(2, 4, 4 * 32)            # (2, cells, 4 patches x D)
    torch.testing.assert_close(tokens[:, 2:], model.region_mapping(read))

    model.save_pretrained(tmp_path / "patches")
    assert GroundedLM.from_pretrained(tmp_path / "patches", quantize="none", device="cpu").config.cell_patches == 2
    mean = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=2), quantize="none", device="cpu")
    mean.save_pretrained(tmp_path / "mean")
    reread = GroundedLM.from_pretrained(tmp_path / "mean", quantize="none", device="cpu", cell_patches=2)
    assert reread.region_mapping.in_features == 4 * 32, "a new region mapping, for the patches"
    assert torch.equal(reread.input_mapping.weight, mean.input_mapping.weight), "the rest is the checkpoint's"


def test_cls_dropout_blanks_the_pooled_feature_in_training_only(tiny_lm_dir, tiny_clip_dir, colour_images):
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=2), quantize="none", device="cpu")
    features = model.visual_features(colour_images)
    model.cls_dropout = 1.0
    model.train()
    dropped = model.visual_tokens(features)
    torch.testing.assert_close(dropped[:, :2], model.input_mapping(torch.zeros(3, 32)).view(3, 2, 32))
    assert torch.equal(dropped[:, 2:], model.region_mapping(features[:, 1:])), "the cells are left alone"
    model.eval()
    torch.testing.assert_close(model.visual_tokens(features)[:, :2], model.input_mapping(features[:, 0]).view(3, 2, 32))


def test_a_region_grid_finer_than_the_patches_is_refused(tiny_lm_dir, tiny_clip_dir):
    with pytest.raises(ValueError, match="region_grid=5 is finer than the 4x4 patches"):
        GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=5), quantize="none", device="cpu")


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
    assert torch.allclose(tiny_model.logits(hidden.bfloat16()), logits, atol=0.05), \
        "states in another dtype than the LM's (bf16 beside an fp32 LM, fp32 beside a bf16 one) are read all the same"


def test_untied_head_gets_a_separate_ret_output_row(tiny_untied_lm_dir, tiny_clip_dir):
    model = GroundedLM(tiny_config(tiny_untied_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    assert not model.tied and model.ret_output is not None
    hidden = torch.randn(2, 32)
    assert torch.allclose(model.logits(hidden)[:, model.ret_id], hidden @ model.ret_output)
    assert "ret_output" in model.trainable_state_dict()


def test_a_tied_head_can_give_ret_an_output_row_of_its_own_that_starts_as_its_row(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "one-row")
    model = GroundedLM.from_pretrained(tmp_path / "one-row", quantize="none", device="cpu", ret_output_row=True)
    assert model.tied and model.config.ret_output_row and torch.equal(model.ret_output, model.ret_embedding)
    hidden = torch.randn(2, 32)
    assert torch.allclose(model.logits(hidden), tiny_model.logits(hidden)), "nothing is emitted differently yet"
    with torch.no_grad():
        model.ret_output.add_(1.0)
    assert torch.allclose(model.logits(hidden)[:, model.ret_id], hidden @ model.ret_output)
    assert torch.equal(model.embed_ids(torch.tensor([model.ret_id]))[0], model.ret_embedding), "the input row stays"
    model.save_pretrained(tmp_path / "two-rows")
    again = GroundedLM.from_pretrained(tmp_path / "two-rows", quantize="none", device="cpu")
    assert again.config.ret_output_row and torch.equal(again.ret_output, model.ret_output)


def test_index_vectors_and_queries_are_unit_length(tiny_model, colour_images):
    vectors = tiny_model.embed_images(colour_images)
    assert vectors.shape == (3, 8)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(tiny_model.ret_query(torch.randn(4, 32)).norm(dim=-1), torch.ones(4), atol=1e-5)


def test_fingerprint_follows_the_image_mapping_and_nothing_else(tiny_lm_dir, tiny_clip_dir):
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    other = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    with torch.no_grad():
        other.image_mapping.load_state_dict(model.image_mapping.state_dict())
        other.input_mapping.weight.add_(1.0)  # what the LM reads changes; the index vectors do not
    assert other.fingerprint == model.fingerprint
    with torch.no_grad():
        other.image_mapping.bias.add_(1.0)
    assert other.fingerprint != model.fingerprint


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


def mixed_examples(images):
    """Captioning with [RET] after the caption, requests answered by [RET] alone, and a one-word request."""
    red, green, blue = images
    return [*examples([red])[:1],
            Example([Turn("user", ["show me a picture of a green triangle at the top"]), Turn("assistant", ["[RET]"])],
                    [green]),
            Example([Turn("user", ["show"]), Turn("assistant", ["[RET]"])], [blue])]


def reference_loss(model, batch):
    """The loss from each conversation run whole and alone: no padding, no shared prefix."""
    nll, count, queries = 0.0, 0, []
    for example in batch:
        prompt, target = render_with_target(example.turns, model.tokenizer, "chat")
        embeds = model.embed_segments(prompt + target)                                     # (T, lm_dim)
        n_prompt = len(model.embed_segments(prompt))
        labels = torch.tensor([-100] * n_prompt + [t for s in target for t in s])
        hidden, _ = model.hidden_states(embeds.unsqueeze(0))
        predicts = labels[1:] != -100
        nll = nll + F.cross_entropy(model.logits(hidden[0, :-1][predicts]), labels[1:][predicts], reduction="sum")
        count += int(predicts.sum())
        queries += [model.ret_query(hidden[0, at]) for at in (labels == model.ret_id).nonzero()[:, 0]]
    keys = F.normalize(model.image_mapping(model.visual_features([im for e in batch for im in e.ret_images])[:, 0]), dim=-1)
    scores = model.logit_scale.exp() * torch.stack(queries) @ keys.T
    target = torch.arange(len(queries))
    return nll / count + (F.cross_entropy(scores, target) + F.cross_entropy(scores.T, target)) / 2


def test_a_batch_shares_its_opening_tokens_without_changing_the_loss(tiny_model, colour_images):
    """Rows are padded and their common opening runs once, with no gradient; loss and gradients are those
    of each conversation run whole."""
    batch = mixed_examples(colour_images)
    prompts = [render_with_target(e.turns, tiny_model.tokenizer, "chat")[0] for e in batch]
    header = tiny_model.tokenizer("<|im_start|>user\n", add_special_tokens=False).input_ids
    assert tiny_model.shared_prefix(prompts) == header
    alone = prompts[2][0]
    assert tiny_model.shared_prefix([prompts[2], prompts[2]]) == alone[:-1], "the last prompt token stays in the rows"

    grads = []
    for loss in (tiny_model(batch).loss, reference_loss(tiny_model, batch)):
        tiny_model.zero_grad()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None})
        grads[-1]["loss"] = loss.detach()
    assert set(grads[0]) == set(grads[1])
    for name in grads[0]:  # fp32, summed in another order: the noise scales with the largest entry
        scale = max(1.0, grads[1][name].abs().max().item())
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5 * scale, rtol=1e-4), name


def test_earlier_turns_are_context_computed_without_gradient(tiny_model, colour_images):
    """Multi-turn rows of different lengths, split where the last user turn's image starts (or at the reply): the
    loss is that of each conversation run whole; earlier images are not trained through it."""
    red, green, blue = colour_images
    history = [Turn("user", [red, "describe the image."]), Turn("assistant", ["a red square."]),
               Turn("user", [green, "and this one?"]), Turn("assistant", ["a green square."])]
    batch = [Example(history + [Turn("user", ["show me a blue one"]), Turn("assistant", ["[RET]"])], [blue]),
             Example(history[:2] + [Turn("user", [blue, "describe it"]), Turn("assistant", ["a blue square."])]),
             *mixed_examples(colour_images)[1:]]
    assert torch.allclose(tiny_model(batch).loss, reference_loss(tiny_model, batch), atol=1e-5)
    assert torch.allclose(tiny_model(batch, context_grad=True).loss, reference_loss(tiny_model, batch), atol=1e-5)

    grads = []
    for context_grad in (False, True):
        tiny_model.zero_grad()
        tiny_model(batch[:1], context_grad=context_grad).loss.backward()  # its images are all in earlier turns
        grads.append(tiny_model.input_mapping.weight.grad)
    tiny_model.zero_grad()
    assert grads[0] is None, "earlier turns' images are context, not trained through a later reply"
    assert grads[1].abs().sum() > 0, "with context_grad they are"


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


def test_a_text_query_is_the_ret_state_of_a_request_answered_by_ret(tiny_model):
    """What gallery search sends the index: the query of the reply "[RET]" to "Show me a picture of ...",
    as teacher-forced evaluation (and greedy decoding, when it opens the reply with [RET]) computes it."""
    from model.training.evaluate import ret_queries
    request = retrieval_request("A large red circle.", tiny_model.config.ret_token)
    assert request[0].text == "Show me a picture of a large red circle." and request[1].text == "[RET]"
    query = tiny_model.text_query("A large red circle.")
    assert query.shape == (8,) and torch.allclose(query, ret_queries(tiny_model, [request])[0][0], atol=1e-5)
    assert not torch.allclose(query, tiny_model.text_query("a small blue square"), atol=1e-3)
