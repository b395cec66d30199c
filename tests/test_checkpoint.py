"""Checkpoint folders: round trip, refusal of mismatches, presets offline, FROMAGe import."""
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from model.checkpoint import ASSETS, import_fromage, resolve
from model.config import CONFIG_NAME, WEIGHTS_NAME, GroundedConfig
from model.generate import GenerationSettings, Text, stream_reply
from model.grounded import GroundedLM
from model.prompt import Turn


@pytest.fixture(scope="module")
def trained(tiny_lm_dir, tiny_clip_dir):
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_state_dict().values():
            p.add_(torch.randn_like(p))
    return model


def test_round_trip_keeps_weights_config_and_replies(trained, tmp_path):
    trained.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    stored = load_file(tmp_path / "ckpt" / WEIGHTS_NAME)
    assert not any(k.startswith(("lm.", "visual.")) for k in stored), "only the small layers are stored"
    loaded = GroundedLM.from_pretrained(tmp_path / "ckpt", quantize="none", device="cpu")
    for k, v in trained.trainable_state_dict().items():
        assert torch.equal(loaded.trainable_state_dict()[k], v)
    assert loaded.config.lm_dim == 32 and loaded.fingerprint == trained.fingerprint
    turns = [Turn("user", ["hello"])]

    def reply(model: GroundedLM) -> list[Text]:
        return [e for e in stream_reply(model, turns, GenerationSettings(max_new_tokens=6)) if isinstance(e, Text)]

    assert reply(loaded) == reply(trained)


def test_saving_over_an_existing_checkpoint_replaces_it(trained, tmp_path):
    trained.save_pretrained(tmp_path / "ckpt")
    trained.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_checkpoint_for_another_lm_is_refused_naming_both(trained, tmp_path):
    trained.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    config["lm_dim"] = 4096
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lm_dim=4096.*tiny_lm.*has 32"):
        GroundedLM.from_pretrained(tmp_path / "ckpt", quantize="none", device="cpu")


def test_weights_of_the_wrong_shape_are_refused(trained, tmp_path, tiny_lm_dir, tiny_clip_dir):
    trained.save_pretrained(tmp_path / "ckpt")
    config = tiny_config(tiny_lm_dir, tiny_clip_dir)
    config.emb_dim = 16
    config.save(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"ret_mapping.weight: checkpoint \(8, 32\) vs model \(16, 32\)"):
        GroundedLM.from_pretrained(tmp_path / "ckpt", quantize="none", device="cpu")


def test_a_checkpoint_grows_region_tokens_to_be_fine_tuned(trained, tmp_path):
    trained.save_pretrained(tmp_path / "ckpt")
    grown = GroundedLM.from_pretrained(tmp_path / "ckpt", quantize="none", device="cpu", region_grid=2)
    assert grown.config.region_grid == 2 and grown.region_mapping is not None
    for name, value in trained.trainable_state_dict().items():
        assert torch.equal(grown.trainable_state_dict()[name], value), name
    grown.save_pretrained(tmp_path / "grown")
    assert GroundedLM.from_pretrained(tmp_path / "grown", quantize="none", device="cpu").config.region_grid == 2
    with pytest.raises(ValueError, match="unexpected region_mapping.weight"):
        GroundedLM.from_pretrained(tmp_path / "grown", quantize="none", device="cpu", region_grid=0)


def test_a_checkpoint_recut_to_several_tokens_per_cell_gets_a_new_region_mapping(tiny_lm_dir, tiny_clip_dir,
                                                                                  tmp_path):
    GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=2), quantize="none",
               device="cpu").save_pretrained(tmp_path / "ckpt")
    before = GroundedLM.from_pretrained(tmp_path / "ckpt", quantize="none", device="cpu").trainable_state_dict()
    recut = GroundedLM.from_pretrained(tmp_path / "ckpt", quantize="none", device="cpu", tokens_per_cell=4)
    assert recut.config.tokens_per_cell == 4 and recut.config.tokens_per_image == 2 + 4 * 4
    assert recut.region_mapping.weight.shape == (4 * 32, 32) and recut.region_positions.shape == (4, 4, 32)
    after = recut.trainable_state_dict()
    for name, value in before.items():
        if not name.startswith("region_mapping."):
            assert torch.equal(after[name], value), f"{name} is kept"
    recut.save_pretrained(tmp_path / "recut")
    assert GroundedLM.from_pretrained(tmp_path / "recut", quantize="none", device="cpu").config.tokens_per_cell == 4


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        GroundedLM.from_pretrained(tmp_path, quantize="none")
    GroundedConfig().save(tmp_path)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        GroundedLM.from_pretrained(tmp_path, quantize="none")


def test_the_defaults_are_the_demos_and_an_older_file_keeps_its_meaning(tmp_path):
    fresh, demo = GroundedConfig(), GroundedConfig.load(ASSETS / "demo")
    layout = ("lm", "n_visual_tokens", "region_grid", "projector", "emb_dim", "prompt_format")
    assert [getattr(fresh, key) for key in layout] == [getattr(demo, key) for key in layout]
    assert (ASSETS.parent / fresh.visual.removeprefix("local-dir:")).resolve() == ASSETS / "demo" / "clip"
    # written before the encoder, region and projector keys existed: FROMAGe's layout, as it meant then
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"lm": "facebook/opt-6.7b", "prompt_format": "qa"}))
    older = GroundedConfig.load(tmp_path)
    assert (older.visual, older.visual_pretrained, older.n_visual_tokens, older.region_grid, older.projector) == (
        "ViT-L-14", "openai", 1, 0, "linear")
    fresh.save(tmp_path)
    assert GroundedConfig.load(tmp_path) == fresh


def test_official_presets_fail_fast_without_a_network(tmp_path, monkeypatch):
    monkeypatch.setenv("GROUNDED_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="could not download.*demo"):
        resolve("fromage")


def fromage_files(folder, lm_dim=32, visual_dim=32, n=2, emb=8):
    """Files with FROMAGe's keys and layout, at tiny sizes."""
    torch.manual_seed(0)
    state = {
        "model.logit_scale": torch.tensor(2.5),
        "model.visual_embeddings.weight": torch.randn(lm_dim * n, visual_dim),
        "model.visual_embeddings.bias": torch.randn(lm_dim * n),
        "model.visual_fc.weight": torch.randn(emb, visual_dim),
        "model.visual_fc.bias": torch.randn(emb),
        "model.text_hidden_fcs.0.0.weight": torch.randn(emb, lm_dim),
        "model.text_hidden_fcs.0.0.bias": torch.randn(emb),
        "ret_input_embeddings.weight": torch.randn(1, lm_dim),
    }
    torch.save({"state_dict": {"module." + k if k.startswith("model.") else k: v for k, v in state.items()}},
               folder / "pretrained_ckpt.pth.tar")
    (folder / "model_args.json").write_text(json.dumps({
        "opt_version": "facebook/opt-6.7b", "visual_encoder": "openai/clip-vit-large-patch14",
        "n_visual_tokens": n, "shared_emb_dim": emb, "text_emb_layers": [-1], "retrieval_token_idx": 50266}))
    return state


def test_fromage_weights_import_into_our_format(tmp_path, tiny_lm_dir, tiny_clip_dir):
    state = fromage_files(tmp_path)
    out = import_fromage(tmp_path / "pretrained_ckpt.pth.tar", tmp_path / "model_args.json", tmp_path / "ckpt")
    config = GroundedConfig.load(out)
    assert (config.lm, config.visual, config.visual_pretrained) == ("facebook/opt-6.7b", "ViT-L-14", "openai")
    assert (config.n_visual_tokens, config.emb_dim, config.prompt_format, config.lm_dim) == (2, 8, "qa", 32)
    # Point the frozen parts at the tiny models (same sizes) and load through the normal path.
    config.lm, config.visual, config.visual_pretrained = str(tiny_lm_dir), f"local-dir:{tiny_clip_dir}", None
    config.save(out)
    model = GroundedLM.from_pretrained(out, quantize="none", device="cpu")
    assert torch.equal(model.input_mapping.weight, state["model.visual_embeddings.weight"])
    assert torch.equal(model.image_mapping.bias, state["model.visual_fc.bias"])
    assert torch.equal(model.ret_mapping.weight, state["model.text_hidden_fcs.0.0.weight"])
    assert torch.equal(model.ret_embedding, state["ret_input_embeddings.weight"][0])
    assert model.logit_scale.item() == 2.5


def test_fromage_import_refuses_pickled_code(tmp_path):
    fromage_files(tmp_path)

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"state_dict": Payload()}, tmp_path / "pretrained_ckpt.pth.tar")
    with pytest.raises(pickle.UnpicklingError):
        import_fromage(tmp_path / "pretrained_ckpt.pth.tar", tmp_path / "model_args.json", tmp_path / "ckpt")


def test_an_interrupted_fromage_import_is_not_taken_for_a_finished_one(tmp_path, monkeypatch):
    fromage_files(tmp_path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("model.checkpoint.save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        import_fromage(tmp_path / "pretrained_ckpt.pth.tar", tmp_path / "model_args.json", tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        resolve(tmp_path / "ckpt")


def test_an_encoder_shipped_inside_the_checkpoint_loads_from_any_working_directory(trained, tmp_path, monkeypatch,
                                                                                     tiny_clip_dir):
    import shutil
    trained.save_pretrained(tmp_path / "ckpt")
    shutil.copytree(tiny_clip_dir, tmp_path / "ckpt" / "clip")
    config = GroundedConfig.load(tmp_path / "ckpt")
    config.visual = "local-dir:clip"
    config.save(tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path.parent)
    model = GroundedLM.from_pretrained(tmp_path / "ckpt", quantize="none", device="cpu")
    assert model.visual.source == f"local-dir:{(tmp_path / 'ckpt' / 'clip').resolve()}"
    assert model.fingerprint == trained.fingerprint
