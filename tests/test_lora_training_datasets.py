"""Datasets as people have them: DiffSynth-Studio's metadata.csv, kohya's N_name/ folders (repeats, the folder's
name as the caption of an image without a caption file), the flat a.png + a.txt folder, the Dataset node's repeats,
and the errors naming what is wrong (an image without a caption, a listed image that is not there)."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from letterpress.loaders.errors import LetterpressError
from letterpress.nodes import NODE_CLASS_MAPPINGS as N


def picture(path, size, colour):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def dataset(folder, repeats=1):
    return N["LetterpressTrainingDataset"]().run(folder, repeats=repeats)[0]


def test_diffsynth_metadata_csv(host):
    root = os.path.join(host.input_dir, "ds_csv")
    picture(os.path.join(root, "imgs", "a.png"), (32, 16), (255, 0, 0))
    picture(os.path.join(root, "b.jpg"), (16, 32), (0, 0, 255))
    picture(os.path.join(root, "unlisted.png"), (16, 16), (0, 255, 0))  # not in the csv: not trained
    write(os.path.join(root, "metadata.csv"), 'image,prompt,extra\nb.jpg,"a blue sign, tall",x\nimgs/a.png,red,y\n')
    ds = dataset("ds_csv")
    assert ds.captions == ["a blue sign, tall", "red"] and ds.repeats == [1, 1]
    assert ds.images[0].shape == (1, 32, 16, 3) and ds.images[1].shape == (1, 16, 32, 3)
    assert ds.images[1][0, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_kohya_folders_repeat_and_caption_by_the_folder_name(host):
    root = os.path.join(host.input_dir, "ds_kohya")
    picture(os.path.join(root, "10_lpstyle sign", "a.png"), (16, 16), (255, 0, 0))
    write(os.path.join(root, "10_lpstyle sign", "a.txt"), "a red lpstyle sign")
    picture(os.path.join(root, "10_lpstyle sign", "b.png"), (16, 16), (0, 255, 0))
    picture(os.path.join(root, "3_other", "c.png"), (16, 16), (0, 0, 255))
    write(os.path.join(root, "3_other", "c.caption"), "a blue sign")
    picture(os.path.join(root, "stray.png"), (16, 16), (9, 9, 9))  # outside the N_name folders: kohya ignores it
    ds = dataset("ds_kohya")
    assert ds.captions == ["a red lpstyle sign", "lpstyle sign", "a blue sign"]
    assert ds.repeats == [10, 10, 3]
    assert dataset("ds_kohya", repeats=2).repeats == [20, 20, 6]


def test_flat_folder_names_every_image_without_a_caption(host):
    root = os.path.join(host.input_dir, "ds_flat")
    for name in ("a", "b", "c"):
        picture(os.path.join(root, f"{name}.png"), (16, 16), (1, 2, 3))
    write(os.path.join(root, "a.txt"), "captioned")
    with pytest.raises(LetterpressError, match=r"2 image\(s\) in .*ds_flat have no caption: b.png, c.png\. Put each "
                                               r"image's caption in a .txt file of the same name"):
        dataset("ds_flat")
    write(os.path.join(root, "b.txt"), "")
    write(os.path.join(root, "c.txt"), "third")
    ds = dataset("ds_flat")
    assert ds.captions == ["captioned", "", "third"] and ds.repeats == [1, 1, 1]


def test_metadata_errors_name_the_problem(host):
    root = os.path.join(host.input_dir, "ds_bad")
    picture(os.path.join(root, "a.png"), (16, 16), (1, 2, 3))
    write(os.path.join(root, "metadata.csv"), "file_name,text\na.png,x\n")
    with pytest.raises(LetterpressError, match=r"needs the columns image and prompt .* it has file_name, text"):
        dataset("ds_bad")
    write(os.path.join(root, "metadata.csv"), "image,prompt\na.png,x\nmissing.png,y\n")
    with pytest.raises(LetterpressError, match=r"lists images that are not in .*ds_bad: missing.png"):
        dataset("ds_bad")
    write(os.path.join(root, "metadata.csv"), "image,prompt\na.png\n")
    with pytest.raises(LetterpressError, match=r"1 image\(s\) in .*ds_bad have no caption: a.png. Give each row"):
        dataset("ds_bad")


def test_images_batch_takes_repeats_too():
    ds = N["LetterpressTrainingDataset"]().run("unused", torch.rand(2, 8, 8, 3), "one\ntwo", 4)[0]
    assert ds.captions == ["one", "two"] and ds.repeats == [4, 4]
