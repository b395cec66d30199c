"""Checkpoint folders as files: write and read the small trained layers, resolve presets, import FROMAGe's
weights.

A checkpoint is `grounded_config.json` + `mappings.safetensors` (trainable weights only); the frozen
LM and encoder are named by the config and loaded from their own sources. This module knows the files,
not the model: `GroundedLM.from_pretrained` / `save_pretrained` build on it (arrows point down).
"""
from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from model.config import CONFIG_NAME, WEIGHTS_NAME, GroundedConfig
from model.files import replace_folder
from model.lm import cache_dir
from model.visual import LOCAL_DIR

ASSETS = Path(__file__).resolve().parent.parent / "assets"
FROMAGE_URL = "https://github.com/kohjingyu/fromage/raw/main/fromage_model/"
PRESETS = {
    "demo": ASSETS / "demo",
    "demo-esper": ASSETS / "demo-esper",  # the demo's encoder, its input mappings aligned by ESPER alone: no [RET]
    "fromage": FROMAGE_URL,
    "fromage-vis4": FROMAGE_URL + "fromage_vis4/",
}
DOWNLOAD_TIMEOUT_S = 10


def versions() -> dict[str, str]:
    import open_clip
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "open_clip": open_clip.__version__}


def write_checkpoint(folder: str | Path, config: GroundedConfig, weights: dict[str, torch.Tensor],
                     metadata: dict[str, str], also: Callable[[Path], None] | None = None) -> None:
    """Write the checkpoint atomically: a reader sees the old folder or the new one, never half. `also(staging)`
    writes a module's own files into it (the Reasoner's adapter)."""
    config.versions = {**config.versions, **versions()}

    def fill(staging: Path) -> None:
        config.save(staging)
        save_file({k: v.float().cpu().contiguous() for k, v in weights.items()}, staging / WEIGHTS_NAME,
                  metadata=metadata)
        if also is not None:
            also(staging)

    replace_folder(folder, fill)


def resolve(folder_or_preset: str | Path) -> Path:
    """A checkpoint folder for a folder path or a preset name (downloading official weights once)."""
    name = str(folder_or_preset)
    if name not in PRESETS:
        folder = Path(name)
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{folder} is not a checkpoint folder ({CONFIG_NAME} missing) "
                                    f"and not a preset ({', '.join(PRESETS)})")
        return folder
    source = PRESETS[name]
    if isinstance(source, Path):
        return resolve(source)
    target = cache_dir() / name
    if not (target / CONFIG_NAME).is_file():
        raw = cache_dir() / f"{name}-official"
        for file in ("model_args.json", "pretrained_ckpt.pth.tar"):
            download(source + file, raw / file)
        import_fromage(raw / "pretrained_ckpt.pth.tar", raw / "model_args.json", target)
    return target


def download(url: str, path: Path) -> None:
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    try:
        # Not torch.hub.download_url_to_file: it has no timeout, so a machine without a network would hang
        # instead of failing fast with the advice below.
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm.wrapattr(out, "write", total=size, desc=f"downloading {path.name}", unit="B",
                               unit_scale=True, unit_divisor=1024) as tracked:
                shutil.copyfileobj(response, tracked, length=1 << 20)
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"could not download {url} ({error}). This machine cannot reach it: use the "
                           f"'demo' preset, or copy the official files into a folder and import them "
                           f"with `python -m model.checkpoint import-fromage`.") from error
    partial.rename(path)


def read_checkpoint(folder_or_preset: str | Path) -> tuple[GroundedConfig, dict[str, torch.Tensor]]:
    """The config and the trained weights of a checkpoint folder or preset. An encoder shipped inside the
    folder (`local-dir:` relative to it) is named by its absolute path, so the checkpoint loads from anywhere."""
    folder = resolve(folder_or_preset)
    config = GroundedConfig.load(folder)
    local = config.visual.removeprefix(LOCAL_DIR)
    if config.visual.startswith(LOCAL_DIR) and not Path(local).is_absolute() and (folder / local).is_dir():
        config.visual = f"{LOCAL_DIR}{(folder / local).resolve()}"
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{folder}: {WEIGHTS_NAME} is missing")
    return config, load_file(weights_path)


def import_fromage(ckpt_path: str | Path, model_args_path: str | Path, out: str | Path) -> Path:
    """Convert FROMAGe's `pretrained_ckpt.pth.tar` + `model_args.json` into a checkpoint folder."""
    args = json.loads(Path(model_args_path).read_text())
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    n_visual_tokens = int(args.get("n_visual_tokens", 1))
    ret_row = state["ret_input_embeddings.weight"].reshape(-1)
    lm_dim = ret_row.numel()
    weights = {
        "input_mapping.weight": state["model.visual_embeddings.weight"],
        "input_mapping.bias": state["model.visual_embeddings.bias"],
        "image_mapping.weight": state["model.visual_fc.weight"],
        "image_mapping.bias": state["model.visual_fc.bias"],
        "ret_mapping.weight": state["model.text_hidden_fcs.0.0.weight"],
        "ret_mapping.bias": state["model.text_hidden_fcs.0.0.bias"],
        "ret_embedding": ret_row,
        "logit_scale": state["model.logit_scale"].reshape(()),
    }
    visual_dim = weights["input_mapping.weight"].shape[1]
    if weights["input_mapping.weight"].shape[0] != n_visual_tokens * lm_dim:
        raise ValueError(f"{ckpt_path}: visual_embeddings is {tuple(weights['input_mapping.weight'].shape)}, "
                         f"expected ({n_visual_tokens} * {lm_dim}, {visual_dim}) for n_visual_tokens={n_visual_tokens}")
    config = GroundedConfig(lm=args.get("opt_version", "facebook/opt-6.7b"), visual="ViT-L-14",
                            visual_pretrained="openai", n_visual_tokens=n_visual_tokens, region_grid=0, projector="linear",
                            emb_dim=weights["image_mapping.weight"].shape[0], prompt_format="qa",
                            lm_dim=lm_dim, visual_dim=visual_dim, versions={"imported_from": "fromage"})
    write_checkpoint(out, config, weights, {})  # whole or absent: resolve() takes a config for a finished import
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fromage = commands.add_parser("import-fromage", help="convert official FROMAGe weights into a checkpoint folder")
    fromage.add_argument("ckpt", type=Path, help="pretrained_ckpt.pth.tar")
    fromage.add_argument("model_args", type=Path, help="model_args.json")
    fromage.add_argument("out", type=Path, help="checkpoint folder to write")
    args = parser.parse_args(argv)
    print(import_fromage(args.ckpt, args.model_args, args.out))


if __name__ == "__main__":
    main()
