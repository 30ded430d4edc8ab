"""``mpirt prepare images`` (a folder per class of PNG/JPEG files) and ``prepare cifar`` (CIFAR-10/100 as
downloaded): pixels into the data-set format as uint8, shape (H, W, 3).

Images are streamed: the file list is read first (names only: it gives the labels, hence the exact split
sizes), then files are decoded, in an order shuffled by ``--seed`` (see :func:`prepare_images`), a block
at a time by a few threads (Pillow releases the GIL while it decodes and resizes) and appended to the
writer, so memory stays flat in the number of images.

``--size HxW``: every image is scaled, keeping its aspect ratio, until it covers HxW, then the centre
HxW is cut out ("resize then centre crop": nothing is stretched, the borders of the longer side go).
Without ``--size`` the first image's size is used. Pixels stay bytes on disk (4x smaller than float32);
the models scale them (``mpirt.train.vision``). Per-channel mean and standard deviation of the training
split (pixels in [0, 1]) are stored as ``pixel_mean``/``pixel_std`` for ``--normalize``. Each row's
source file is kept in ``row_source`` (indexed by ``row_index``), for reports that show images.
"""

import concurrent.futures as cf
import os
import pickle

import h5py
import numpy as np

from mpirt.atomic import atomic_path
from mpirt.data.dense import _split_rows
from mpirt.data.format import DENSE, SPLITS
from mpirt.errors import DataError, UsageError

EXTENSIONS = (".png", ".jpg", ".jpeg")
BLOCK = 256  # images decoded per block (256 x 32x32x3 is 786 KB; 256 x 224x224x3 is 38 MB)


def parse_size(text):
    """``"32x32"`` -> (32, 32)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size {text!r}: give HxW, e.g. 32x32") from None
    if not (1 <= h <= 4096 and 1 <= w <= 4096):
        raise UsageError(f"--size {text!r}: height and width must be between 1 and 4096")
    return h, w


def list_images(root):
    """(class names, [(path, class id)]) of ``root``'s class folders, sorted by name."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"{root}: not a directory (prepare images takes a folder with one sub-folder per class)")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    files = []
    for c, name in enumerate(classes):
        d = os.path.join(root, name)
        files += [(os.path.join(d, f), c) for f in sorted(os.listdir(d)) if f.lower().endswith(EXTENSIONS)]
    if len(classes) < 2:
        raise DataError(f"{root}: {len(classes)} class folder(s); need at least 2 sub-folders of images")
    if not files:
        raise DataError(f"{root}: no .png/.jpg/.jpeg files in its class folders")
    return classes, files


def load_image(path, size):
    """One image as uint8 (H, W, 3), scaled to cover ``size`` and centre-cropped (``size`` None: as is)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # decode now: a truncated file fails here, not later
        im = im.convert("RGB")
        if size is not None and im.size != (size[1], size[0]):
            h, w = size
            scale = max(w / im.width, h / im.height)
            rw, rh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
            im = im.resize((rw, rh), Image.Resampling.BILINEAR)
            left, top = (rw - w) // 2, (rh - h) // 2
            im = im.crop((left, top, left + w, top + h))
        return np.asarray(im, dtype=np.uint8)


class PixelStats:
    """Per-channel sum and sum of squares of training pixels (float64: exact for any realistic count)."""

    def __init__(self):
        self.n, self.s, self.s2 = 0, 0.0, 0.0

    def add(self, X):
        x = X.reshape(-1, X.shape[-1]).astype(np.float64) / 255.0
        self.n += len(x)
        self.s = self.s + x.sum(0)
        self.s2 = self.s2 + (x * x).sum(0)

    def attrs(self):
        mean = self.s / max(self.n, 1)
        std = np.sqrt(np.maximum(self.s2 / max(self.n, 1) - mean * mean, 0.0))
        return {"pixel_mean": np.asarray(mean, np.float64), "pixel_std": np.maximum(std, 1e-6)}


def write_images(out_path, opts, shape, class_names, blocks, split_rows, source, sources=None, attrs=None):
    """Write uint8 image rows from ``blocks`` of (X (n, H, W, 3) uint8, y, row numbers) to ``out_path``.

    ``sources``: each row's source file (by row number), stored as ``row_source``.
    """
    from mpirt.data.writer import DatasetWriter

    shard_rows, max_shards = opts.plan(split_rows, exact=True)
    strat = opts.stratifier()
    stats = PixelStats()
    with atomic_path(out_path) as tmp:
        writer = DatasetWriter(tmp, DENSE, int(np.prod(shape)), shard_rows, feature_shape=shape,
                               attrs={"source": os.path.basename(str(source)), "pixels": "uint8 RGB (H, W, 3)",
                                      **(attrs or {})}, max_shards=max_shards, x_dtype="|u1")
        try:
            for X, y, rows, where in blocks(strat):
                for s, name in enumerate(SPLITS):
                    sel = np.flatnonzero(where == s)
                    if sel.size:
                        writer.append(name, y[sel], rows[sel], X=X[sel])
                        if name == "train":
                            stats.add(X[sel])
            for key, value in stats.attrs().items():
                writer.file.attrs[key] = value
            if sources is not None:
                writer.file.create_dataset("row_source", data=np.array(sources, dtype=h5py.string_dtype()),
                                           track_times=False)
            writer.finish(class_names)
        except BaseException:
            writer.abort()
            raise
    return writer.rows()


def prepare_images(in_dir, out_path, opts, size=None, skip_bad=False, workers=None):
    """Prepare a folder of class folders of images (see the module's doc)."""
    classes, files = list_images(in_dir)
    size = tuple(size) if size else None
    if size is None:
        try:
            size = load_image(files[0][0], None).shape[:2]
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for a bad file
            raise DataError(f"{files[0][0]}: unreadable image ({_why(exc)})") from None
    labels = np.array([c for _, c in files], dtype=np.int64)
    # Rows are stored in a shuffled order (seeded by --seed), not class by class: training draws its
    # batches from shuffled blocks of consecutive rows (mpirt.train.order), and blocks of one class
    # would make whole batches of one class. ``row_index`` stays the file's place in the sorted list.
    order = np.random.Generator(np.random.PCG64([opts.seed, 0x696D67])).permutation(len(files))
    split_rows = _split_rows(opts, [labels[order]], classes)
    root = os.fspath(in_dir)
    skipped = []

    def decode(item):
        try:
            return load_image(item[0], size)
        except Exception as exc:  # noqa: BLE001
            return f"{item[0]}: unreadable image ({_why(exc)})"

    def blocks(strat):
        with cf.ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1)) as pool:
            for a in range(0, len(files), BLOCK):
                part = order[a:a + BLOCK]
                good, rows = [], []
                for i, img in zip(part, pool.map(decode, (files[i] for i in part))):
                    if isinstance(img, str):
                        if not skip_bad:
                            raise DataError(img + " (--skip-bad skips such files)")
                        skipped.append(img)
                        continue
                    good.append(img)
                    rows.append(int(i))
                if good:
                    y = labels[rows]
                    yield np.stack(good), y, np.asarray(rows, np.int64), strat.assign(y, keys=classes)

    sources = [os.path.relpath(p, root) for p, _ in files]
    rows = write_images(out_path, opts, (*size, 3), classes, blocks, split_rows, in_dir, sources,
                        {"image_size": np.asarray(size, np.int64), "resize": "cover then centre crop"})
    if sum(rows.values()) == 0:
        raise DataError(f"{root}: no readable images ({len(skipped)} skipped)")
    return {"rows": rows, "skipped": len(skipped), "classes": classes}


def _why(exc):
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


# --- CIFAR ------------------------------------------------------------------------------------------

CIFAR10_PY = (["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"], "test_batch",
              "batches.meta", b"labels", b"label_names")
CIFAR100_PY = (["train"], "test", "meta", b"fine_labels", b"fine_label_names")
CIFAR10_BIN = (["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin",
                "data_batch_5.bin"], "test_batch.bin", "batches.meta.txt")
CIFAR100_BIN = (["train.bin"], "test.bin", "fine_label_names.txt")
PIXELS = 3 * 32 * 32


class _CifarUnpickler(pickle.Unpickler):
    """The CIFAR batch files are pickles; a pickle can run any code it names. Only what those files hold
    (dicts, lists, bytes, numpy arrays) may be built, so a planted file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def _unpickle(path):
    try:
        with open(path, "rb") as f:
            doc = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"{path}: not a CIFAR python batch file ({_why(exc)})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: not a CIFAR python batch file (a {type(doc).__name__}, not a dict)")
    return doc


def _py_batch(path, label_key):
    doc = _unpickle(path)
    try:
        X = np.asarray(doc[b"data"], dtype=np.uint8)
        y = np.asarray(doc[label_key], dtype=np.int64)
    except KeyError as exc:
        raise DataError(f"{path}: no {exc.args[0]!r} entry (not a CIFAR python batch file?)") from None
    if X.ndim != 2 or X.shape[1] != PIXELS or len(y) != len(X):
        raise DataError(f"{path}: data {X.shape} and {len(y)} labels; CIFAR rows are {PIXELS} bytes, one label each")
    return X, y


def _bin_batch(path, label_bytes):
    raw = np.fromfile(path, dtype=np.uint8)
    rec = label_bytes + PIXELS
    if raw.size == 0 or raw.size % rec:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of CIFAR records of {rec} bytes")
    raw = raw.reshape(-1, rec)
    return raw[:, label_bytes:], raw[:, label_bytes - 1].astype(np.int64)


def _cifar_layout(root):
    """Which CIFAR release ``root`` holds: (kind, train files, test file, names file)."""
    for kind, layout in (("cifar10-python", CIFAR10_PY), ("cifar100-python", CIFAR100_PY),
                         ("cifar10-binary", CIFAR10_BIN), ("cifar100-binary", CIFAR100_BIN)):
        train, test, meta = layout[:3]
        if all(os.path.isfile(os.path.join(root, f)) for f in (*train, test, meta)):
            return kind, layout
    raise DataError(f"{root}: no CIFAR-10 or CIFAR-100 batch files (python version: data_batch_1..5, "
                    f"test_batch, batches.meta; or train, test, meta; or the binary version's .bin files)")


def prepare_cifar(in_dir, out_path, opts):
    """CIFAR-10/100 (python or binary version, as downloaded and unpacked): the test batch is the test
    split; ``--val-fraction`` of the training batches (stratified) is the validation split."""
    from mpirt.data.prepare import Options

    root = os.fspath(in_dir)
    if not os.path.isdir(root):
        raise DataError(f"{root}: not a directory (give the unpacked cifar-10-batches-py or cifar-100-python folder)")
    kind, layout = _cifar_layout(root)
    train_files, test_file, meta = layout[:3]
    if kind.endswith("python"):
        names = _unpickle(os.path.join(root, meta)).get(layout[4])
        if not isinstance(names, list):
            raise DataError(f"{os.path.join(root, meta)}: no {layout[4].decode()} list")
        names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]

        def read(f):
            return _py_batch(os.path.join(root, f), layout[3])
    else:
        with open(os.path.join(root, meta), encoding="utf-8", errors="replace") as f:
            names = [line.strip() for line in f if line.strip()]
        label_bytes = 1 if kind.startswith("cifar10-") else 2

        def read(f):
            return _bin_batch(os.path.join(root, f), label_bytes)
    batches = [(f, read(f)) for f in (*train_files, test_file)]  # 60,000 x 3 KB: 184 MB at most
    for f, (_, y) in batches:
        if len(y) and (y.min() < 0 or y.max() >= len(names)):
            raise DataError(f"{os.path.join(root, f)}: label {int(y.max())} but {len(names)} class names")
    n_train = sum(len(y) for f, (_, y) in batches[:-1])
    # The training batches split into train and val by the stratifier; the test batch is the test split.
    train_opts = Options(opts.shards, opts.shard_rows, opts.val_fraction, 0.0, opts.seed)
    y_train = np.concatenate([y for _, (_, y) in batches[:-1]])
    split_rows = _split_rows(train_opts, [y_train], names)
    split_rows["test"] = len(batches[-1][1][1])

    def blocks(strat):  # train_opts' stratifier: no test share, the test batch is the test split
        start = 0
        for i, (f, (X, y)) in enumerate(batches):
            # CIFAR rows are 1024 red, 1024 green, 1024 blue bytes: to (32, 32, 3).
            X = X.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            rows = np.arange(start, start + len(y), dtype=np.int64)
            where = strat.assign(y, keys=names) if i < len(batches) - 1 else np.full(len(y), 2)
            yield np.ascontiguousarray(X), y, rows, where
            start += len(y)

    # The shard plan reads only --shards/--shard-rows, the same in train_opts.
    rows = write_images(out_path, train_opts, (32, 32, 3), names, blocks, split_rows, root,
                        attrs={"cifar": kind, "train_rows_in_files": n_train})
    return {"rows": rows, "skipped": 0, "classes": names}
