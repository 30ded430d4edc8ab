"""``mpirt classify``: batch prediction over shards, with an ensemble of checkpoints.

A shard job on the task farm: each shard's predictions are committed once, so the output is
identical with or without failures. Several checkpoints form an ensemble: their softmax
probabilities are averaged, and the top-k of the mean comes from :func:`mpirt.kernels.predict_topk`
(on ``log(mean)``, whose softmax is the mean itself).

Output (one HDF5 file, written under a temporary name and renamed): ``row_index`` (n,) int64, the
rows' places in the original input, ascending; ``top_k`` (n, k) int64 classes, most likely first;
``prob`` (n, k) float32; ``y`` (n,) int64 when the data set has labels. Attributes: ``class_names``,
``split``, ``checkpoints`` (paths), ``checkpoint_sha256``, ``accuracy`` (top-1, when labelled),
``data_sha256`` (the data set's digest) and ``checkpoint_data_sha256`` (what each model was trained on).
"""

import hashlib

import h5py
import numpy as np

from mpirt.atomic import atomic_path
from mpirt.data.integrity import dataset_digest, hashing_params
from mpirt.errors import CheckpointError
from mpirt.jobs.shardjob import ShardJob, file_digest
from mpirt.outputs import h5_writing, mark
from mpirt.secure.h5 import File
from mpirt.secure.sign import provenance, sign_file


def check_compatible(ckpt, dataset):
    """Raise CheckpointError unless ``ckpt``'s model reads ``dataset``'s features and classes."""
    spec = ckpt.spec
    if spec.get("name") in ("mf", "twotower") or dataset.feature_kind == "ratings":
        raise CheckpointError(f"{ckpt.path}: classify takes classification models and data sets; "
                              f"'{spec.get('name')}' on {dataset.feature_kind} data is not one (recommenders "
                              f"report RMSE and recall@k at the end of 'mpirt train')")
    if int(spec["n_features"]) != dataset.n_features or int(spec["n_classes"]) != dataset.n_classes:
        raise CheckpointError(
            f"{ckpt.path}: model for {spec['n_features']} features and {spec['n_classes']} classes cannot "
            f"classify {dataset.path} ({dataset.n_features} features, {dataset.n_classes} classes)")
    names = ckpt.meta.get("class_names")
    if names is not None and list(names) != list(dataset.class_names):
        raise CheckpointError(f"{ckpt.path}: trained on classes {_names(names)}, but {dataset.path} has "
                              f"{_names(dataset.class_names)}")
    is_text = dataset.feature_kind != "dense"
    if (spec["name"] == "fasttext") != is_text:
        raise CheckpointError(f"{ckpt.path}: a '{spec['name']}' model cannot read {dataset.feature_kind} features")
    trained = ckpt.meta.get("features")  # None in checkpoints of older mpirt versions: nothing to compare
    here = hashing_params(dataset)
    if trained is not None and here is not None and trained != here:
        diff = ", ".join(f"{k} {trained.get(k)!r} (data: {here.get(k)!r})" for k in sorted(here)
                         if trained.get(k) != here.get(k))
        raise CheckpointError(f"{ckpt.path}: trained on tokens hashed with {diff}: its token ids mean other "
                              f"words in {dataset.path}; prepare the data with the same hashing")
    check_params(ckpt)


def _names(names, most=10):
    from mpirt.log import escape

    names = list(names)
    return "[" + ", ".join(escape(n) for n in names[:most]) + (", ..." if len(names) > most else "") + "]"


def check_params(ckpt):
    """The checkpoint's parameters are exactly those its spec's model has, and the model is within
    the size cap: checked on shapes (torch's meta device) before any model is allocated."""
    from mpirt.errors import UsageError
    from mpirt.train.models import check_size, param_shapes

    try:
        check_size(ckpt.spec, f"{ckpt.path}: model")
        shapes = param_shapes(ckpt.spec)
    except UsageError as exc:
        raise CheckpointError(str(exc)) from None
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{ckpt.path}: invalid model spec {ckpt.spec} ({exc})") from None
    have = {k: tuple(v.shape) for k, v in ckpt.params.items()}
    if have != shapes:
        bad = sorted(k for k in have.keys() | shapes.keys() if have.get(k) != shapes.get(k))
        raise CheckpointError(f"{ckpt.path}: parameters do not fit its model spec: {', '.join(bad[:3])}")


class Classify(ShardJob):
    def __init__(self, data_path, checkpoints, out_path, *, split="test", top_k=1, key=None, device="cpu",
                 batch_rows=8192, spawn_argv=(), verify=True):
        from mpirt.checkpoint import load
        from mpirt.data.reader import open_dataset

        self.dataset = open_dataset(data_path)
        self.split_name = split
        self.split = self.dataset.split(split)
        self.ckpts = [load(p, key=key, verify=verify) for p in checkpoints]
        self.data_sha256 = dataset_digest(self.dataset)
        for c in self.ckpts:
            check_compatible(c, self.dataset)
        self.top_k = min(int(top_k), self.dataset.n_classes)
        self.device, self.batch_rows = device, batch_rows
        self.shard_sizes = [int(b - a) for a, b in self.split.shards]
        self.out_path = out_path
        self.spawn_argv = list(spawn_argv)
        self._models = None

    def identity(self):
        # Everything that changes a shard's predictions; the device too (float results may differ).
        return {"job": "classify", "data": dataset_digest(self.dataset), "split": self.split_name,
                "checkpoints": [file_digest(c.path) for c in self.ckpts], "top_k": self.top_k,
                "device": self.device}

    def models(self):
        if self._models is None:
            import torch

            from mpirt.train import models

            self._models = []
            for c in self.ckpts:
                m = models.build(c.spec)
                m.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in c.params.items()})
                self._models.append(m.to(self.device).eval())
        return self._models

    def map(self, shard):
        import torch

        batch = self.split.read_shard(shard)
        tops, probs = [], []
        # One intra-op thread on the CPU: how a matmul splits over threads changes the bits of its sums
        # (measured: 2 of 539 probabilities differed between 1 and 2 threads), and the count a rank
        # gets depends on its binding, so results would depend on how the job was launched.
        threads = torch.get_num_threads()
        if str(self.device).split(":")[0] == "cpu":
            torch.set_num_threads(1)
        try:
            return self._predict(torch, batch, tops, probs)
        finally:
            torch.set_num_threads(threads)

    def _predict(self, torch, batch, tops, probs):
        import mpirt.kernels as K
        from mpirt.train import models
        from mpirt.train.source import batches

        with torch.no_grad():
            for piece in batches(batch, self.batch_rows):
                mean = None
                for spec, m in zip((c.spec for c in self.ckpts), self.models()):
                    p = torch.softmax(m(*models.inputs(spec["name"], piece, self.device)).float(), dim=1)
                    mean = p if mean is None else mean + p
                mean /= len(self.ckpts)
                top, prob = K.predict_topk(torch.log(mean), self.top_k)
                tops.append(np.asarray(K.convert(top, "numpy")))
                probs.append(np.asarray(K.convert(prob, "numpy")))
        k = self.top_k
        return (batch.row_index, np.concatenate(tops).reshape(-1, k) if tops else np.zeros((0, k), np.int64),
                np.concatenate(probs).reshape(-1, k) if probs else np.zeros((0, k), np.float32), batch.y)

    def write_part(self, path, shard, result):
        row_index, top, prob, y = result
        with h5_writing(path) as f:
            f["row_index"], f["top_k"], f["prob"], f["y"] = row_index, top, prob, y
            f.attrs["shard"] = shard

    def reduce(self, paths):
        parts = {name: [] for name in ("row_index", "top_k", "prob", "y")}
        for path in paths:
            with File(path, "r") as f:
                for name in parts:
                    parts[name].append(f[name][()])
        out = {name: np.concatenate(v) if v else None for name, v in parts.items()}
        n = len(out["row_index"]) if out["row_index"] is not None else 0
        if n == 0:
            out = {"row_index": np.zeros(0, np.int64), "top_k": np.zeros((0, self.top_k), np.int64),
                   "prob": np.zeros((0, self.top_k), np.float32), "y": np.zeros(0, np.int64)}
        order = np.argsort(out["row_index"], kind="stable")  # input order
        out = {k: v[order] for k, v in out.items()}
        accuracy = float(np.mean(out["top_k"][:, 0] == out["y"])) if n else None
        digest = hashlib.sha256(out["row_index"].tobytes() + out["top_k"].tobytes() + out["prob"].tobytes())
        with atomic_path(self.out_path) as tmp:
            with h5_writing(tmp, content="predictions") as f:
                mark(f, "predictions")
                for name, value in out.items():
                    f.create_dataset(name, data=value, track_times=False)
                f.create_dataset("class_names", data=list(self.dataset.class_names),  # no 64 KiB attribute cap
                                 dtype=h5py.string_dtype(), track_times=False)
                f.attrs["split"] = self.split_name
                f.attrs["checkpoints"] = [c.path for c in self.ckpts]
                f.attrs["checkpoint_signed"] = [bool(c.signed) for c in self.ckpts]
                f.attrs["sha256"] = digest.hexdigest()
                for k, v in provenance(self.dataset, self.data_sha256).items():
                    f.attrs[k] = v
                f.attrs["checkpoint_data_sha256"] = [str(c.meta.get("data_sha256")) for c in self.ckpts]
                f.attrs["checkpoint_sha256"] = [c.digest for c in self.ckpts]
                f.attrs["checkpoint_verified_by"] = [", ".join(c.vouched) or "nobody" for c in self.ckpts]
                if accuracy is not None:
                    f.attrs["accuracy"] = accuracy
                sign_file(f, "predictions")
        return {"rows": n, "accuracy": accuracy, "sha256": digest.hexdigest(), "out": self.out_path,
                "models": len(self.ckpts)}
