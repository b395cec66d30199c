"""Fit a checkpoint's familiarity (`model/familiarity.py`): which images are like the ones it was trained on.

    python -m model.training.familiarity --checkpoint assets/demo              # the shapes world
    python -m model.training.familiarity --checkpoint runs/mine --images photos/

Patch features of training images give the mean and covariance; other images of the same kind set the threshold
(the shapes world's validation split, or a fifth of `--images`). Then it measures what the chat will do:
the share of the shapes world's test split flagged, and of real photographs (the sample photographs inside
the scikit-image wheel, where it is installed, or `--photos FOLDER`). Writes `familiarity.safetensors` into
the checkpoint folder, with those figures in its metadata.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from model.checkpoint import resolve
from model.familiarity import FAMILIARITY_NAME, Familiarity
from model.grounded import GroundedLM
from model.images import ImageError, load_image
from model.training.train_clip import resolve_device
from model.world.data import ShapesDataset

SKIMAGE_PHOTOGRAPHS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png",
                       "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
                       "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")
"""The photographs among scikit-image's sample images (not its charts, drawings, text or binary masks)."""
BATCH = 64


def skimage_photographs() -> list[Path]:
    """Paths of scikit-image's sample photographs, or [] without scikit-image."""
    try:
        import skimage.data
    except ImportError:
        return []
    folder = Path(skimage.data.__file__).parent
    return [folder / name for name in SKIMAGE_PHOTOGRAPHS if (folder / name).is_file()]


def folder_images(folder: Path) -> tuple[list[Image.Image], list[str]]:
    """Every decodable image under `folder` (recursive), and what was skipped with why."""
    images, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            images.append(load_image(path))
        except ImageError as error:
            skipped.append(f"{path}: {error}")
    return images, skipped


@torch.no_grad()
def patch_features(model: GroundedLM, images: list[Image.Image], desc: str) -> torch.Tensor:
    """(N, patches, visual_dim) encoder patch features, in batches, with progress."""
    out = []
    for start in tqdm(range(0, len(images), BATCH), desc=desc, unit="batch"):
        out.append(model.visual.encode(images[start:start + BATCH])[1].float().cpu())
    return torch.cat(out)


def shapes_images(split: str, count: int, image_size: int) -> list[Image.Image]:
    data = ShapesDataset(split, count, image_size)
    return [data[i][0] for i in range(count)]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (or preset) to write it into")
    p.add_argument("--images", type=Path, help="the training images (default: the shapes world)")
    p.add_argument("--count", type=int, default=2000, help="shapes-world training scenes to fit on")
    p.add_argument("--photos", type=Path, help="photographs to measure on (default: scikit-image's samples)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = p.parse_args(argv)
    folder = resolve(args.checkpoint)
    model = GroundedLM.from_pretrained(folder, device=resolve_device(args.device))
    size = model.visual.image_size[0]
    if args.images is None:
        trained_on = "the shapes world's scenes"
        train = patch_features(model, shapes_images("train", args.count, size), "train scenes")
        calibration = patch_features(model, shapes_images("val", max(1, args.count // 4), size), "val scenes")
    else:
        images, skipped = folder_images(args.images)
        for line in skipped:
            print(f"skipped {line}")
        if len(images) < 10:
            raise SystemExit(f"{args.images} has {len(images)} usable images: need at least 10")
        trained_on = f"the images in {args.images.name}"
        features = patch_features(model, images, args.images.name)
        cut = len(features) - max(2, len(features) // 5)
        train, calibration = features[:cut], features[cut:]
    familiarity = Familiarity.fit(train, calibration, trained_on)

    report: dict[str, object] = {"threshold": familiarity.threshold, "fit_images": len(train)}
    test = patch_features(model, shapes_images("test", 1000, size), "test scenes")
    report["flagged_test_scenes"] = familiarity.unfamiliar(test).float().mean().item()
    photos = sorted(p for p in args.photos.rglob("*") if p.is_file()) if args.photos else skimage_photographs()
    if photos:
        images = [load_image(path) for path in photos]
        flagged = familiarity.unfamiliar(patch_features(model, images, "photographs"))
        report["flagged_photographs"] = flagged.float().mean().item()
        report["photographs_not_flagged"] = [path.name for path, f in zip(photos, flagged) if not f]
    familiarity.save(folder, report)
    print(f"wrote {folder / FAMILIARITY_NAME}")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
