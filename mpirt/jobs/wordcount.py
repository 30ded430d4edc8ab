"""``mpirt wordcount``: hashed-token frequencies per class, a map over shards with an exact reduce.

Counts are integers summed in shard order, so the output is bit-identical
whatever the number of ranks and whatever failed on the way.
"""

import hashlib

import h5py
import numpy as np

from mpirt.atomic import atomic_path
from mpirt.errors import DataError
from mpirt.data.integrity import dataset_digest
from mpirt.jobs.shardjob import ShardJob
from mpirt.outputs import h5_writing, mark
from mpirt.secure.h5 import File
from mpirt.secure.sign import provenance, sign_file

MAX_CELLS = 1 << 30  # class x bucket counters (8 GiB of int64) the reduce may hold


class WordCount(ShardJob):
    def __init__(self, data_path, out_path, split="train", spawn_argv=()):
        from mpirt.data.reader import open_dataset

        self.dataset = open_dataset(data_path)
        if self.dataset.feature_kind != "hashed_tokens":
            raise DataError(f"{data_path}: wordcount needs a text data set (hashed tokens), "
                            f"not '{self.dataset.feature_kind}'")
        self.split_name = split
        self.split = self.dataset.split(split)
        shards = np.asarray(self.split.shards)
        self.shard_sizes = [int(b - a) for a, b in shards]
        self.n_features = int(self.dataset.n_features)
        self.n_classes = int(self.dataset.n_classes)
        cells = self.n_classes * self.n_features
        if cells > MAX_CELLS:  # the reduce holds one int64 per (class, bucket): refuse before allocating it
            raise DataError(f"{data_path}: counts for {self.n_classes} classes x {self.n_features} hash buckets "
                            f"would need {8 * cells / 2**30:.0f} GiB (at most {8 * MAX_CELLS >> 30} GiB): "
                            f"prepare the data with fewer --hash-bits")
        self.out_path = out_path
        self.spawn_argv = list(spawn_argv)

    def identity(self):
        return {"job": "wordcount", "data": dataset_digest(self.dataset), "split": self.split_name}

    def map(self, shard):
        batch = self.split.read_shard(shard)
        lengths = np.diff(np.asarray(batch.offsets, dtype=np.int64))
        classes = np.repeat(np.asarray(batch.y, dtype=np.int64), lengths)
        keys = classes * self.n_features + np.asarray(batch.ids, dtype=np.int64)
        uniq, counts = np.unique(keys, return_counts=True)
        return uniq, counts.astype(np.int64), int(lengths.size)

    def write_part(self, path, shard, result):
        keys, counts, rows = result
        with h5_writing(path, track_order=False) as f:
            f.create_dataset("keys", data=keys, track_times=False)
            f.create_dataset("counts", data=counts, track_times=False)
            f.attrs["shard"] = shard
            f.attrs["rows"] = rows

    def reduce(self, paths):
        total = np.zeros(self.n_classes * self.n_features, dtype=np.int64)
        rows = 0
        for path in paths:
            with File(path, "r") as f:
                np.add.at(total, f["keys"][()], f["counts"][()])
                rows += int(f.attrs["rows"])
        counts = total.reshape(self.n_classes, self.n_features)
        digest = hashlib.sha256(counts.tobytes()).hexdigest()
        with atomic_path(self.out_path) as tmp:
            with h5_writing(tmp, content="wordcount") as f:
                mark(f, "wordcount")
                f.create_dataset("counts", data=counts, compression="gzip", shuffle=True, track_times=False)
                f.create_dataset("class_names", data=list(self.dataset.class_names),  # no 64 KiB attribute cap
                                 dtype=h5py.string_dtype(), track_times=False)
                f.attrs["split"] = self.split_name
                f.attrs["rows"] = rows
                f.attrs["tokens"] = int(counts.sum())
                f.attrs["sha256"] = digest
                for k, v in provenance(self.dataset, dataset_digest(self.dataset)).items():
                    f.attrs[k] = v
                sign_file(f, "wordcount")
        return {"rows": rows, "tokens": int(counts.sum()), "sha256": digest, "out": self.out_path}
