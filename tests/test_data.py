"""Datasets: shapes-world splits and FROMAGe-format TSV captions, both yielding (PIL RGB, caption)."""
from __future__ import annotations

import logging

import pytest
from PIL import Image

from model.world import shapes
from model.world.data import ShapesDataset, TsvCaptionDataset
from model.images import ImageError


def test_shapes_dataset_items_are_the_split_scenes():
    data = ShapesDataset("val", size=10, image_size=64)
    assert len(data) == 10
    image, caption = data[3]
    expected = shapes.sample("val", 3, image_size=64)
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 64)
    assert caption == expected.caption and image.tobytes() == expected.image.tobytes()
    assert data.sample(3).scene == expected.scene
    with pytest.raises(IndexError):
        data[10]


def test_shapes_dataset_splits_differ_and_holdout_option_applies():
    train, test = ShapesDataset("train", 50), ShapesDataset("test", 50)
    assert [train[i][1] for i in range(50)] != [test[i][1] for i in range(50)]
    held = set(shapes.HOLDOUT_PAIRS)
    kept_out = ShapesDataset("train", 500, image_size=16, holdout=True)
    assert not any({(o.shape, o.colour) for o in kept_out.sample(i).scene.objects} & held for i in range(500))


def test_shapes_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown split"):
        ShapesDataset("dev", 10)
    with pytest.raises(ValueError, match="size"):
        ShapesDataset("val", 0)
    with pytest.raises(ValueError, match="size"):
        ShapesDataset("val", 10**9)


@pytest.fixture
def tsv_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (20, 10), "red").save(images / "a.png")
    Image.new("L", (8, 8), 128).save(images / "b.jpg")
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows = [
        "caption\timage\textra",
        "a red picture\timages/a.png\tx",
        "a grey picture\timages/b.jpg\ty",
        "a missing picture\timages/missing.png\tz",  # bad row: file not found
        "\timages/a.png\tw",  # bad row: empty caption
        "a broken picture\timages/corrupt.jpg\tv",
    ]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_tsv_dataset_reads_rows_and_skips_bad_ones_with_a_logged_count(tsv_folder, caplog):
    with caplog.at_level(logging.WARNING):
        data = TsvCaptionDataset(tsv_folder / "train.tsv")
    assert len(data) == 3 and data.skipped == 2
    assert "skipped 2 of 5 rows" in caplog.text
    image, caption = data[0]
    assert caption == "a red picture" and image.mode == "RGB" and image.size == (20, 10)
    image, caption = data[1]
    assert caption == "a grey picture" and image.mode == "RGB" and image.getpixel((0, 0)) == (128, 128, 128)


def test_tsv_dataset_raises_a_clear_error_for_an_undecodable_image(tsv_folder):
    data = TsvCaptionDataset(tsv_folder / "train.tsv")
    with pytest.raises(ImageError, match=r"train\.tsv line 6: corrupt\.jpg"):
        data[2]


def test_tsv_dataset_image_root_and_header_checks(tsv_folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "list.tsv").write_text("image\tcaption\na.png\tfrom another root\n")
    data = TsvCaptionDataset(elsewhere / "list.tsv", image_root=tsv_folder / "images")
    assert len(data) == 1 and data[0][1] == "from another root"
    (elsewhere / "bad.tsv").write_text("text\tfile\nhello\ta.png\n")
    with pytest.raises(ValueError, match="'caption' and 'image'"):
        TsvCaptionDataset(elsewhere / "bad.tsv")
