"""Photos, cut-outs and the two image-ordering tasks of issue 13, on small generated stand-in images
(no network, no Debian packages)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from adapterkit.errors import ConfigError, DataNotFoundError
from adapterkit.zoo import debian, photos, rank_tasks
from adapterkit.zoo.rank_counting import CountingConfig, paste_cutouts
from adapterkit.zoo.rank_quality import QualityConfig, degrade

#: saturated stand-in cut-out colours, far from the greyish stand-in photos
COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 210, 20), "yellow": (230, 230, 10),
           "magenta": (220, 20, 220)}
QUALITY = QualityConfig(size=96, variants=3)
COUNTING = CountingConfig(size=96, images=40, heldout_categories=2, categories_per_image=(1, 2), cutout_side=(96, 112),
                          max_total=16, unseen_share=(0.2, 0.6))  # crowded: some cut-outs find no place


def _texture(seed: int, shape=(180, 240)) -> np.ndarray:
    """A greyish photo stand-in: smooth random field plus sharp-edged rectangles, slightly tinted."""
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.normal(0, 1, shape), 6)
    base = 90 + 60 * base / np.abs(base).max()
    for _ in range(8):
        y, x = rng.integers(0, shape[0] - 30), rng.integers(0, shape[1] - 30)
        base[y:y + rng.integers(8, 30), x:x + rng.integers(8, 30)] += rng.choice([-50, 50])
    tint = rng.uniform(-8, 8, size=3)
    return np.clip(base[..., None] + tint, 0, 255).astype(np.uint8)


def _stamp(colour, shape: str, size=(40, 30)) -> Image.Image:
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2 <= 0.8 if shape == "disc" else \
        (yy > 3) & (yy < h - 3) & (xx > 3) & (xx < w - 3)
    rgba = np.zeros((h + 10, w + 10, 4), np.uint8)  # transparent margin, as in the real stamps
    rgba[5:h + 5, 5:w + 5, :3] = colour
    rgba[5:h + 5, 5:w + 5, 3] = 255 * inside
    return Image.fromarray(rgba)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> photos.PhotoSet:
    root = tmp_path_factory.mktemp("photos")
    items = []
    for i in range(8):
        path = root / f"photo{i}.png"
        Image.fromarray(_texture(i)).save(path)
        items.append(photos.Photo(f"pkg{i % 2}:photo{i}", path, f"pkg{i % 2}", f"data/photo{i}.png", "CC0-1.0",
                                  f"author {i}"))
    cutouts = []
    for category, colour in COLOURS.items():
        for shape in ("disc", "box"):
            path = root / f"{category}-{shape}.png"
            _stamp(colour, shape).save(path)
            cutouts.append(photos.Cutout(f"stamps:{category}/{shape}", path, category, "stamps", f"{category}/{shape}",
                                         "GPL-2", "stamp author"))
    return photos.PhotoSet(tuple(items), tuple(cutouts))


@pytest.fixture(scope="module")
def built(stand_in, tmp_path_factory):
    root = tmp_path_factory.mktemp("rank")
    return {name: rank_tasks.rank_task(name, root=root / name, config=config, photos=stand_in)
            for name, config in (("quality", QUALITY), ("counting", COUNTING))}


def _files(task: rank_tasks.RankTask) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in [task.root / "manifest.json", *task.paths]}


def test_builds_are_deterministic(stand_in, built, tmp_path):
    for name, config in (("quality", QUALITY), ("counting", COUNTING)):
        again = rank_tasks.build_rank_task(name, tmp_path / name, stand_in, 0, config)
        assert _files(again) == _files(built[name])
        other = rank_tasks.build_rank_task(name, tmp_path / f"{name}-1", stand_in, 1, config)
        assert [p.read_bytes() for p in other.paths] != [p.read_bytes() for p in again.paths]


def test_images_and_targets(built):
    quality, counting = built["quality"], built["counting"]
    assert len(quality) == 8 * QUALITY.variants and len(counting) == COUNTING.images
    for task in (quality, counting):
        for image in task.images:
            with Image.open(image.path) as im:
                assert im.size == (96, 96) and im.mode == "RGB"
            assert set(image.targets) == {i.text for i in task.instructions}
    assert [i.attribute for i in quality.instructions] == list(QualityConfig().attributes)
    assert quality.instruction("blur").text == "Sort the images by how blurry they are."
    assert counting.instruction("red").text == "Sort the images by the number of reds."
    levels = np.array([quality.targets(i) for i in quality.instructions])
    assert set(levels.ravel()) <= {0, 1, 2, 3, 4} and levels.std(axis=1).min() > 0
    # one image ranks differently under different instructions: the attributes' levels are not all equal
    assert any(len(set(column)) > 1 for column in levels.T)
    assert set(counting.licences) == {s for image in counting.images for s in image.sources}
    assert counting.licences["stamps:red/disc"]["licence"] == "GPL-2"


def test_splits_are_disjoint_by_reference_and_background(built):
    for task in built.values():
        groups = {s: rank_tasks.groups(task.split(s).images) for s in rank_tasks.SPLITS}
        assert all(groups.values())
        assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
        assert not groups["val"] & groups["test"]
    # the two tasks share one photo split: no background of a test image is a training reference
    for split in rank_tasks.SPLITS:
        counting_groups = rank_tasks.groups(built["counting"].split(split).images)
        assert counting_groups <= rank_tasks.groups(built["quality"].split(split).images)


def test_heldout_categories_are_never_seen_in_training(built):
    task = built["counting"]
    assert len(task.heldout) == 2 and set(task.heldout) < set(COLOURS)
    test = task.split("test", "heldout")
    assert {i.attribute for i in test.instructions} == set(task.heldout)
    for split in ("train", "val"):
        part = task.split(split, "heldout")
        assert part.images and not {i.attribute for i in part.instructions} & set(task.heldout)
        for image in part.images:  # the full targets: no held-out cut-out in any training image
            full = next(i for i in task.images if i.path == image.path)
            assert all(full.targets[task.instruction(c).text] == 0 for c in task.heldout)
            assert not any(s.split(":")[1].split("/")[0] in task.heldout for s in image.sources[1:])
    assert max(max(test.targets(i)) for i in test.instructions) > 0


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64)


def test_degradations_are_monotone():
    clean = Image.fromarray(_texture(42, (128, 128)))
    def series(attribute):
        return [degrade(clean, {attribute: level}, np.random.default_rng(0)) for level in range(5)]

    sharpness = [ndimage.laplace(_grey(im)).var() for im in series("blur")]
    noise = [(_grey(im) - _grey(clean)).std() for im in series("noise")]
    luminance = [_grey(im).mean() for im in series("dark")]
    contrast = [_grey(im).std() for im in series("contrast")]
    jpeg = [((np.asarray(im, float) - np.asarray(clean, float)) ** 2).mean() for im in series("jpeg")]
    assert all(a > b for a, b in zip(sharpness, sharpness[1:]))
    assert noise[0] == 0 and all(a < b for a, b in zip(noise, noise[1:]))
    assert all(a > b for a, b in zip(luminance, luminance[1:]))
    assert all(a > b for a, b in zip(contrast, contrast[1:]))
    assert jpeg[0] == 0 and all(a < b for a, b in zip(jpeg, jpeg[1:]))


def _components(image: np.ndarray, colour) -> int:
    close = (np.abs(image.astype(int) - np.array(colour)).max(axis=-1) < 40)
    labels, n = ndimage.label(close)
    return int(sum(np.bincount(labels.ravel())[1:] >= 6))  # ignore anti-aliasing specks


def test_counts_equal_the_pasted_cutouts(built):
    task = built["counting"]
    positives = 0
    for image in task.images:
        pixels = np.asarray(Image.open(image.path).convert("RGB"))
        for category, colour in COLOURS.items():
            count = image.targets[task.instruction(category).text]
            assert _components(pixels, colour) == count, (image.path.name, category)
            positives += count > 0
    assert positives > len(task.images)  # most images hold several categories' cut-outs


def test_paste_reports_only_what_fits(stand_in):
    background = Image.new("RGB", (64, 64), (128, 128, 128))
    stamp = Image.open(stand_in.cutouts[0].path).convert("RGBA")
    image, placed = paste_cutouts(background, [("red", "r", stamp)] * 30, np.random.default_rng(0), (20, 24))
    assert 0 < len(placed) < 30
    assert _components(np.asarray(image), COLOURS["red"]) == len(placed)


def test_manifest_round_trip_and_idempotence(stand_in, built, monkeypatch):
    for name, task in built.items():
        assert rank_tasks.read_rank_task(task.root) == task

    def refuse(*args, **kwargs):
        raise AssertionError("an up-to-date build must not be rebuilt")

    monkeypatch.setattr(rank_tasks, "build_rank_task", refuse)
    loaded = rank_tasks.rank_task("quality", root=built["quality"].root, config=QUALITY, photos=stand_in)
    assert loaded == built["quality"]
    with pytest.raises(AssertionError, match="must not be rebuilt"):  # another seed is another build
        rank_tasks.rank_task("quality", root=built["quality"].root, seed=3, config=QUALITY, photos=stand_in)
    monkeypatch.setattr(rank_tasks, "BUILDER_VERSION", rank_tasks.BUILDER_VERSION + 1)
    with pytest.raises(AssertionError, match="must not be rebuilt"):
        rank_tasks.rank_task("quality", root=built["quality"].root, config=QUALITY, photos=stand_in)


def test_bad_requests_raise_config_errors(built, stand_in, tmp_path):
    with pytest.raises(ConfigError, match="size"):
        rank_tasks.rank_task("quality", root=tmp_path, config=QualityConfig(size=8), photos=stand_in)
    with pytest.raises(ConfigError, match="levels"):
        QualityConfig(levels=1).validate()
    with pytest.raises(ConfigError, match="level of blur"):
        degrade(Image.new("RGB", (8, 8)), {"blur": 5}, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="unknown degradation"):
        degrade(Image.new("RGB", (8, 8)), {"fog": 1}, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="cutout_side"):
        CountingConfig(size=96, cutout_side=(30, 120)).validate()
    with pytest.raises(ConfigError, match="unknown ranking task"):
        rank_tasks.rank_task("age", root=tmp_path, photos=stand_in)
    with pytest.raises(ConfigError, match="held-out"):
        rank_tasks.rank_task("counting", root=tmp_path, photos=stand_in, config=CountingConfig(heldout_categories=4))
    with pytest.raises(ConfigError, match="unknown split"):
        built["quality"].split("dev")
    with pytest.raises(ConfigError, match="no held-out"):
        built["quality"].split("test", "heldout")
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_stamp_categories_follow_the_path_words():
    category = photos.stamp_category
    assert category("animals/mammals/bovines/ram.png") == "sheep"
    assert category("animals/mammals/bovines/sheep_lamb.png") == "sheep"
    assert category("food/fruit/sliced_orange.png") == "orange"
    assert category("symbols/money/us/coins/001penny.png") == "coin"
    assert category("vehicles/auto/sportscar2.png") == "car"
    assert category("food/fruit/cartoon/apple.png") is None  # drawings
    assert category("vehicles/emergency/sedan_police_mirror.png") is None  # flipped duplicate
    assert category("animals/mammals/aquatic/sea_lion.png") is None
    assert category("animals/mammals/giraffe.png") is None


def test_dep5_last_matching_paragraph_wins():
    text = ("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
            "Files: *\nCopyright: 2020 Everyone\nLicense: GPL-2+\n\n"
            "Files: 16.04/a_by_X.jpg\n       16.04/b_*.jpg\nCopyright: X, 2018\nLicense: CC-BY-4.0\n\n"
            "License: CC-BY-4.0\n Attribution 4.0 International\n")
    paragraphs = debian.files_paragraphs(text)
    assert [p.licence for p in paragraphs] == ["GPL-2+", "CC-BY-4.0"]
    assert debian.licence_of(paragraphs, "16.04/b_by_Y.jpg").copyright == "X, 2018"
    assert debian.licence_of(paragraphs, "16.04/c.jpg").licence == "GPL-2+"


def _fake_tree(tree):
    lomiri = tree / "lomiri-wallpapers-16.04"
    (lomiri / "usr/share/backgrounds").mkdir(parents=True)
    Image.fromarray(_texture(1, (600, 800))).save(lomiri / "usr/share/backgrounds/Bridge_by_Sander_Klootwijk.jpg")
    (lomiri / "usr/share/doc/lomiri-wallpapers-16.04").mkdir(parents=True)
    (lomiri / "usr/share/doc/lomiri-wallpapers-16.04/copyright").write_text(
        "Files: *\nCopyright: 2018 Dalton\nLicense: Expat\n\n"
        "Files: 16.04/Bridge_by_Sander_Klootwijk.jpg\nCopyright: 2018. Sander Klootwijk\nLicense: CC-BY-SA-4.0\n")
    opencv = tree / "opencv-doc/usr/share/doc/opencv-doc/examples/data"
    opencv.mkdir(parents=True)
    Image.fromarray(_texture(2, (300, 300))[..., 0]).save(opencv / "apple.jpg")  # greyscale
    Image.fromarray(_texture(3, (100, 120))).save(opencv / "baboon.jpg")  # too small
    kite = tree / "plasma-workspace-wallpapers/usr/share/wallpapers/Kite"
    (kite / "contents/images").mkdir(parents=True)
    Image.fromarray(_texture(4, (400, 640))).save(kite / "contents/images/640x400.png")
    Image.fromarray(_texture(5, (640, 400))).save(kite / "contents/images/400x640.png")  # portrait: not used
    (kite / "metadata.json").write_text(json.dumps({"KPlugin": {"License": "LGPLv3", "Authors": [{"Name": "R S"}]}}))
    stamps = tree / "tuxpaint-stamps-default/usr/share/tuxpaint/stamps"
    for relative in ("animals/bovines/sheep.png", "animals/bovines/ram.png", "animals/bovines/sheep_lamb.png",
                     "animals/bovines/cow.png", "animals/cartoon/sheep.png"):
        (stamps / relative).parent.mkdir(parents=True, exist_ok=True)
        _stamp((200, 200, 200), "disc").save(stamps / relative)


def test_curation_records_licences_and_loads_offline(tmp_path):
    _fake_tree(tmp_path / "tree")
    curated = photos.curate(tmp_path / "tree", tmp_path / "out", {"mate-backgrounds": "1.26"})
    assert [p.id for p in curated.photos] == ["lomiri:Bridge_by_Sander_Klootwijk", "plasma:Kite"]
    bridge, kite = curated.photos
    assert (bridge.licence, bridge.attribution) == ("CC-BY-SA-4.0", "2018. Sander Klootwijk")
    assert (kite.licence, kite.attribution) == ("LGPLv3", "R S")
    assert kite.source_path.endswith("Kite/contents/images/640x400.png")
    assert Image.open(bridge.path).size == (683, photos.REFERENCE_SIDE)  # downscaled
    assert Image.open(kite.path).size == (640, 400)  # never upscaled
    assert {c.id.rsplit("/", 1)[1] for c in curated.cutouts} == {"sheep", "ram", "sheep_lamb"}  # cow: 1 stamp
    left, top, right, bottom = _stamp((0, 0, 0), "disc").getchannel("A").getbbox()
    assert Image.open(curated.cutouts[0].path).size == (right - left, bottom - top) != (40, 50)  # alpha box
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert {s["path"]: s["reason"].split(" ")[0] for s in manifest["skipped_photos"]}["apple.jpg"] == "greyscale"
    assert any(s["path"] == "baboon.jpg" and "small" in s["reason"] for s in manifest["skipped_photos"])
    assert photos.load_photos(tmp_path / "out") == curated


def test_fetch_is_idempotent(tmp_path, monkeypatch):
    _fake_tree(tmp_path / "tree")
    photos.curate(tmp_path / "tree", tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("a complete curation must not run anything")

    monkeypatch.setattr(subprocess, "run", refuse)
    assert photos.fetch_photos(tmp_path, progress=False) == tmp_path


def test_missing_apt_get_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    with pytest.raises(DataNotFoundError, match="apt-get not found.*adapterkit fetch-data rank"):
        photos.fetch_photos(tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(DataNotFoundError, match="adapterkit fetch-data rank"):
        photos.load_photos(tmp_path / "cache")


def test_failed_download_names_the_command(tmp_path, monkeypatch):
    class Failed:
        returncode, stderr, stdout = 100, "E: Unable to locate package mate-backgrounds\n", ""

    monkeypatch.setattr(debian.shutil, "which", lambda tool: "/usr/bin/" + tool)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(DataNotFoundError, match=r"Unable to locate.*apt-get update && adapterkit fetch-data rank"):
        photos.fetch_photos(tmp_path, progress=False)
