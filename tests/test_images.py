"""Image workloads: ``prepare images`` and ``prepare cifar`` on real files the tests make (PNG and JPEG
through Pillow; CIFAR batch files in the downloaded formats), deterministic augmentation, ResNet and
VGG under real mpiexec (N ranks and a kill give the model of 1 rank), reports and classify."""

import os
import pickle

import h5py
import numpy as np
import pytest
from PIL import Image

from harness import run_cli

CLASSES = ("cat", "dog", "ship")


def make_folder(root, per_class=30, size=(24, 28)):
    """Class folders of PNG and JPEG files whose dominant colour is the class (learnable)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        os.makedirs(root / name)
        for i in range(per_class):
            a = rng.integers(0, 80, (*size, 3), dtype=np.uint8)
            a[..., c] += 150
            Image.fromarray(a).save(root / name / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def pics(tmp_path_factory):
    d = tmp_path_factory.mktemp("pics")
    make_folder(d / "pics")
    out = d / "pics.h5"
    run_cli("prepare", "images", d / "pics", out, "--size", "16x16").check()
    return out


@pytest.mark.cli
def test_prepare_images_stores_uint8_pixels_classes_sources_and_checksums(tmp_path, pics):
    with h5py.File(pics) as f:
        assert f["train/X"].dtype == np.uint8 and f["train/X"].shape[1:] == (16, 16, 3)
        assert [c.decode() for c in f["class_names"][()]] == list(CLASSES)
        n = sum(int(f[s].attrs["n_rows"]) for s in ("train", "val", "test"))
        assert n == 90
        sources = [s.decode() for s in f["row_source"][()]]
        assert sources[0] == "cat/000.jpg" and sources[-1] == "ship/029.png"
        # every row's pixels are its source file's, resized: the class colour dominates
        X, y, ri = f["train/X"][()], f["train/y"][()], f["train/row_index"][()]
        assert (X.reshape(len(X), -1, 3).mean(1).argmax(1) == y).all()
        # stored shuffled (training batches are drawn from blocks of consecutive rows), each row
        # still numbered by its file's place in the sorted list
        assert len(set(y[:8].tolist())) > 1 and sorted(ri.tolist()) != ri.tolist()
        assert all(sources[i].startswith(CLASSES[c]) for i, c in zip(ri, y))
        mean = f.attrs["pixel_mean"]
        assert mean.shape == (3,) and 0 < mean.min() < mean.max() < 1
    res = run_cli("inspect", pics).check()
    assert "(16, 16, 3)" in res.stdout and "checksums" in res.stdout


@pytest.mark.cli
def test_size_scales_to_cover_then_crops_the_centre(tmp_path):
    # 20 x 40 image: the first and last 4 columns red and blue, green between. --size 10x10 scales it to
    # 10 x 20 (covering 10x10, not stretched) and cuts out the middle 10 columns: all green, the red and
    # blue borders cropped off (a stretch to 10x10 would keep them).
    root = tmp_path / "in"
    for name in CLASSES[:2]:
        os.makedirs(root / name)
        for i in range(5):
            a = np.zeros((20, 40, 3), np.uint8)
            a[:, :4, 0], a[:, 4:36, 1], a[:, 36:, 2] = 255, 255, 255
            Image.fromarray(a).save(root / name / f"{i}.png")
    run_cli("prepare", "images", root, tmp_path / "o.h5", "--size", "10x10", "--val-fraction", "0",
            "--test-fraction", "0").check()
    with h5py.File(tmp_path / "o.h5") as f:
        X = f["train/X"][()]
    assert X.shape == (10, 10, 10, 3)
    assert (X[..., 1] == 255).all() and (X[..., 0] == 0).all() and (X[..., 2] == 0).all()


@pytest.mark.cli
def test_a_truncated_image_is_one_line_or_skipped_and_counted(tmp_path):
    root = make_folder(tmp_path / "in", per_class=4)
    bad = root / "dog" / "001.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.h5"
    res = run_cli("prepare", "images", root, out, "--size", "8x8")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "dog/001.png" in res.stderr and "--skip-bad" in res.stderr
    assert not out.exists() and not list(tmp_path.glob("o.h5*"))
    res = run_cli("prepare", "images", root, out, "--size", "8x8", "--skip-bad").check()
    assert "1 bad images skipped" in res.stdout
    with h5py.File(out) as f:
        assert sum(int(f[s].attrs["n_rows"]) for s in ("train", "val", "test")) == 11


@pytest.mark.cli
@pytest.mark.parametrize("args, words", [
    (["--size", "16"], "HxW"),
    (["--size", "0x5"], "between 1 and 4096"),
])
def test_bad_size_is_one_line(tmp_path, pics, args, words):
    root = make_folder(tmp_path / "in", per_class=2)
    res = run_cli("prepare", "images", root, tmp_path / "o.h5", *args)
    assert res.returncode == 2 and words in res.stderr and "Traceback" not in res.stderr


def cifar_arrays(n, n_classes, seed):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    X = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
    return X, y


def write_cifar10_python(d, n_per_batch=20):
    """The layout of cifar-10-batches-py: pickled dicts with bytes keys (protocol 2, as the originals)."""
    os.makedirs(d)
    names = [f"c{i}".encode() for i in range(10)]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": n_per_batch}, f, protocol=2)
    batches = {}
    for k, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                              "test_batch"]):
        X, y = cifar_arrays(n_per_batch, 10, k)
        batches[name] = (X, y)
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": y.tolist(), b"data": X,
                         b"filenames": [f"{i}.png".encode() for i in range(n_per_batch)]}, f, protocol=2)
    return batches


@pytest.mark.cli
def test_prepare_cifar10_python_version(tmp_path):
    batches = write_cifar10_python(tmp_path / "cifar-10-batches-py")
    out = tmp_path / "c.h5"
    res = run_cli("prepare", "cifar", tmp_path / "cifar-10-batches-py", out).check()
    assert "90 train, 10 val, 20 test rows, 10 classes" in res.stdout
    with h5py.File(out) as f:
        assert [c.decode() for c in f["class_names"][()]] == [f"c{i}" for i in range(10)]
        X, y, ri = f["test/X"][()], f["test/y"][()], f["test/row_index"][()]
    tX, ty = batches["test_batch"]
    assert (ri == np.arange(100, 120)).all() and (y == ty).all()
    # a CIFAR row is 1024 red, 1024 green, 1024 blue bytes, row-major: pixel (r, c) of channel k
    assert (X == tX.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)).all()


@pytest.mark.cli
def test_prepare_cifar100_python_and_cifar10_binary(tmp_path):
    d = tmp_path / "cifar-100-python"
    os.makedirs(d)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"g{i}".encode() for i in range(20)]}, f, protocol=2)
    for name, n in (("train", 300), ("test", 100)):
        X, y = cifar_arrays(n, 100, len(name))
        with open(d / name, "wb") as f:
            pickle.dump({b"data": X, b"fine_labels": y.tolist(), b"coarse_labels": (y // 5).tolist()}, f, protocol=2)
    res = run_cli("prepare", "cifar", d, tmp_path / "c100.h5").check()
    assert "100 test rows, 100 classes" in res.stdout

    b = tmp_path / "cifar-10-batches-bin"
    os.makedirs(b)
    (b / "batches.meta.txt").write_text("\n".join(f"k{i}" for i in range(10)) + "\n\n")
    for k, name in enumerate(["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin",
                              "data_batch_5.bin", "test_batch.bin"]):
        X, y = cifar_arrays(20, 10, k)
        np.concatenate([y[:, None].astype(np.uint8), X], axis=1).tofile(b / name)
    run_cli("prepare", "cifar", b, tmp_path / "c10b.h5").check()
    with h5py.File(tmp_path / "c10b.h5") as f:
        X, y = f["test/X"][()], f["test/y"][()]
    tX, ty = cifar_arrays(20, 10, 5)
    assert (y == ty).all() and (X == tX.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)).all()


@pytest.mark.cli
def test_a_pickle_that_names_other_code_is_refused(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    write_cifar10_python(d, n_per_batch=2)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(d / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0, 1]}, f, protocol=2)
    res = run_cli("prepare", "cifar", d, tmp_path / "c.h5")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "data_batch_3" in res.stderr and "refused global" in res.stderr
    assert not marker.exists() and not (tmp_path / "c.h5").exists()


def test_augmentation_depends_on_seed_epoch_and_row_only():
    from mpirt.train.augment import augment

    rng = np.random.default_rng(1)
    X = rng.integers(0, 256, (50, 12, 10, 3), dtype=np.uint8)
    rows = np.arange(1000, 1050)
    whole = augment(X, 7, 2, rows)
    assert whole.dtype == np.uint8 and whole.shape == X.shape
    # any split of the batch, in any order, gives each row the same image
    perm = rng.permutation(50)
    parts = np.concatenate([augment(X[perm[:17]], 7, 2, rows[perm[:17]]), augment(X[perm[17:]], 7, 2, rows[perm[17:]])])
    assert np.array_equal(parts, whole[perm])
    assert not np.array_equal(augment(X, 7, 3, rows), whole)  # another epoch, other crops
    assert not np.array_equal(augment(X, 8, 2, rows), whole)  # another seed
    # each output is a crop of the zero-padded image, flipped or not
    padded = np.pad(X, ((0, 0), (4, 4), (4, 4), (0, 0)))
    flips = 0
    for i in range(50):
        found = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)
                 if np.array_equal((padded[i, dy:dy + 12, dx:dx + 10])[:, ::-1 if f else 1], whole[i])]
        assert found, i
        flips += found[0][2]
    assert 10 < flips < 40


def train(tmp_path, data, n, *extra, model="resnet", faults=(), name="run", timeout=300):
    run_dir = tmp_path / name
    run_dir.mkdir()
    # VGG (no residuals) diverges at ResNet's rate on 72 rows; each gets a rate it learns these colours with
    lr = "0.05" if model == "resnet" else "0.002"
    args = ["launch", "-n", str(n), "--", "mpirt", "train", "--data", data, "--model", model, "--epochs", "3",
            "--global-batch", "24", "--lr", lr, "--seed", "2", "--no-progress", "--checkpoint-dir",
            run_dir / "ckpt", "--events", run_dir / "events.jsonl", *extra]
    for f in faults:
        args += ["--inject-fault", f]
    return run_cli(*args, timeout=timeout).check(), run_dir


def final_params(run_dir):
    from mpirt.checkpoint import CheckpointDir

    return CheckpointDir(run_dir / "ckpt").load_latest().params


@pytest.mark.mpi
@pytest.mark.cli
def test_resnet_with_augmentation_on_3_ranks_with_a_kill_is_bit_identical_to_1_rank(tmp_path, pics):
    # --exact: any difference in what a rank's rows look like (crop, flip) would change the bits.
    sizes = ["--depth", "10", "--width", "8", "--exact", "--micro-batch", "4"]
    _, one = train(tmp_path, pics, 1, *sizes, name="one")
    res, three = train(tmp_path, pics, 3, *sizes, faults=["kill:member=1:step=4"], name="three")
    assert "2 view(s)" in res.stdout
    a, b = final_params(one), final_params(three)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    from mpirt.checkpoint import CheckpointDir

    ckpt = CheckpointDir(one / "ckpt").load_latest()
    spec = ckpt.spec
    assert spec["name"] == "resnet" and spec["depth"] == 10 and len(spec["mean"]) == 3  # --normalize by default
    with open(one / "ckpt" / "run.json") as f:
        assert '"augment": {' in f.read()


@pytest.mark.mpi
@pytest.mark.cli
def test_vgg_learns_the_colours_and_an_ensemble_classifies_with_class_names(tmp_path, pics):
    res, vgg = train(tmp_path, pics, 2, "--depth", "11", "--width", "8", "--epochs", "8", "--report",
                     tmp_path / "rep", model="vgg", name="vgg")
    acc = float(res.stdout.split("test accuracy ")[-1].split("%")[0])
    assert acc >= 90.0, res.stdout
    assert (tmp_path / "rep" / "misclassified.png").stat().st_size > 0
    import json

    with open(tmp_path / "rep" / "report.json") as f:
        report = json.load(f)
    assert [c["class"] for c in report["test"]["per_class"]] == list(CLASSES)
    _, rn = train(tmp_path, pics, 1, "--depth", "10", "--width", "8", "--epochs", "8", name="rn")
    out = tmp_path / "pred.h5"
    res = run_cli("launch", "-n", "2", "--", "mpirt", "classify", "--data", pics, "--checkpoint", vgg / "ckpt",
                  "--checkpoint", rn / "ckpt", "--out", out, timeout=300).check()
    with h5py.File(out) as f:
        top, y = f["top_k"][:, 0], f["y"][()]
        assert [c.decode() for c in f["class_names"][()]] == list(CLASSES)
    assert len(y) > 0 and np.mean(top == y) >= 0.9, res.stdout  # the two models' probabilities, merged


@pytest.mark.cli
def test_image_models_refuse_text_and_a_wrong_depth(tmp_path, pics):
    res = run_cli("train", "--data", pics, "--model", "resnet", "--depth", "12", "--no-progress")
    assert res.returncode == 2 and "resnet comes in depths 10, 18, 34" in res.stderr
    text = tmp_path / "t.h5"
    run_cli("prepare", "synth-text", text, "--rows", "200", "--features", "256").check()
    res = run_cli("train", "--data", text, "--model", "vgg", "--no-progress")
    assert res.returncode == 2 and "needs dense features" in res.stderr and "Traceback" not in res.stderr
