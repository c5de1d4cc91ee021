"""``adapterkit rank train|eval|sort`` end to end on the real EfficientNet-Lite0 + MiniLM pair and a
small quality task built from scikit-learn's two bundled photographs."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

from adapterkit.cli.main import main
from adapterkit.zoo import photos
from adapterkit.zoo.rank_quality import QualityConfig
from adapterkit.zoo.rank_tasks import build_rank_task

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--epochs", "2", "--batch-size", "6", "--width", "16", "--heads", "2", "--fusion-layers", "1",
         "--encoder-layers", "0", "--prompt-tokens", "4", "--relation-tokens", "2", "--pool", "2", "--project-dim", "32"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Six crops of the two real sklearn photos as reference photos, 4 degraded variants each."""
    root = tmp_path_factory.mktemp("rank")
    items = []
    for k, (name, box) in enumerate([(n, b) for n in ("china.jpg", "flower.jpg")
                                     for b in ((0, 0, 300, 300), (150, 100, 450, 400), (300, 120, 600, 420))]):
        path = root / f"photo{k}.png"
        Image.fromarray(load_sample_image(name)).crop(box).save(path)
        items.append(photos.Photo(f"sklearn{k % 2}:{k}", path, f"sklearn{k % 2}", name, "CC-BY-2.0", "scikit-learn"))
    config = QualityConfig(size=96, variants=4, attributes=("blur", "dark"), holdout=(0.34, 0.34))
    task = build_rank_task("quality", root / "quality", photos.PhotoSet(tuple(items), ()), 0, config)
    assert {i.split for i in task.images} == {"train", "val", "test"}
    return root / "quality"


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(map(str, argv)))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_eval_and_sort_on_the_real_encoders(task_dir, tmp_path, capsys):
    cache, adapter = tmp_path / "cache", tmp_path / "adapter"
    code, out, err = _run(capsys, "rank", "train", "--task", task_dir, "--out", adapter, "--cache", cache, *SMALL)
    assert code == 0, err
    assert "validation" in out and (adapter / "rank.json").is_file()
    sidecar = json.loads((adapter / "rank.json").read_text())
    assert sidecar["cache"] == {"pool": 2, "project_dim": 32} and len(sidecar["instructions"]) == 2

    code, out, err = _run(capsys, "rank", "eval", adapter, "--task", task_dir, "--cache", cache, "--json",
                          tmp_path / "m.json")
    assert code == 0, err
    metrics = json.loads((tmp_path / "m.json").read_text())["all"]
    assert len(metrics) == 2 and all(set(m) == {"srcc", "plcc", "kendall", "pairwise", "mae"} for m in metrics.values())
    assert "mean" in out

    images = sorted(task_dir.rglob("*.png"))[:4]
    sheet = tmp_path / "sheet.png"
    code, out, err = _run(capsys, "rank", "sort", *images, "--adapter", adapter, "--cache", cache,
                          "--instruction", "Sort the images by how blurry they are.", "--sheet", sheet)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    # the CLI's order and scores are the library's, for this instruction and the adapter's cache settings
    import adapterkit as ak
    from adapterkit.apps.ranking import InstructionTokens, TokenCache, efficientnet_minilm, score_images

    encoders = efficientnet_minilm()
    ak.load(encoders, adapter, "rank")
    tokens = TokenCache(cache, encoders, pool=2, project_dim=32, progress=False)
    expected = score_images(encoders, "rank", tokens.image_tokens(images),
                            InstructionTokens(*tokens.text_tokens("Sort the images by how blurry they are.")))
    order = sorted(range(4), key=lambda k: expected[k].item())
    assert [r[2] for r in rows] == [str(images[k]) for k in order]
    assert [float(r[1]) for r in rows] == pytest.approx([expected[k].item() for k in order], abs=1e-3)
    with Image.open(sheet) as png:
        assert png.width > 4 * 100 and png.height > 100


def test_bad_input_is_refused_before_any_model_loads(task_dir, tmp_path, capsys):
    code, _, err = _run(capsys, "rank", "eval", tmp_path, "--task", task_dir)
    assert code == 2 and "rank.json" in err
    code, _, err = _run(capsys, "rank", "sort", tmp_path / "missing.png", "--adapter", tmp_path, "--instruction", "x")
    assert code == 2 and "missing.png" in err
    (tmp_path / "notes.png").write_text("not an image")
    code, _, err = _run(capsys, "rank", "sort", tmp_path / "notes.png", "--adapter", tmp_path, "--instruction", "x")
    assert code == 2 and "not a readable image" in err
    code, _, err = _run(capsys, "rank", "train", "--task", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert code == 2 and "task directory" in err
    code, _, err = _run(capsys, "rank", "train", "--task", task_dir, "--out", tmp_path / "o", "--width", "10",
                        "--heads", "3")
    assert code == 2 and "multiple of heads" in err
