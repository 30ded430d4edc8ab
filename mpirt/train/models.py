"""The models ``mpirt train`` builds, from a spec that checkpoints store.

A spec is a plain dict (JSON in checkpoints): ``{"name": ..., "n_features": ..., "n_classes": ...}``
plus the model's own sizes. ``build(spec)`` gives the same ``nn.Module`` (same parameter names and
shapes) on any rank and in ``mpirt classify``; initial values come from the torch seed, so every
rank that seeds alike starts alike. Models take a :class:`mpirt.data.reader.Batch` through
:func:`inputs` and return logits; none uses dropout, so a step's gradient depends on its samples only.

Imports torch: command modules import this inside their handlers, never at CLI start-up.
"""

import numpy as np
import torch
from torch import nn

from mpirt.config import MAX_PARAMS as MAX_PARAMS_ENV
from mpirt.train.bagrows import bag_mean

MODELS = ("linear", "mlp", "fasttext", "cnn", "resnet", "vgg")
DENSE_MODELS = ("linear", "mlp", "cnn", "resnet", "vgg")
IMAGE_MODELS = ("resnet", "vgg")  # mpirt.train.vision

# Defaults a user may override with --hidden / --embed-dim / --channels / --depth / --width.
DEFAULTS = {"linear": {}, "mlp": {"hidden": 128}, "fasttext": {"embed_dim": 64}, "cnn": {"channels": 16},
            "resnet": {"depth": 18, "width": 64}, "vgg": {"depth": 11, "width": 64}}


def spec_for(name, dataset, normalize=False, **sizes):
    """The spec of model ``name`` for an open :class:`mpirt.data.reader.Dataset`.

    ``normalize``: image models standardise each channel by the training split's pixel mean and
    standard deviation (stored by ``prepare images``/``cifar``), which the spec then carries.

    Raises:
        UsageError: an unknown model, or one that does not fit the data set's features.
    """
    from mpirt.errors import UsageError

    if name not in MODELS:
        raise UsageError(f"unknown model '{name}' (choose from {', '.join(MODELS)})")
    if dataset.feature_kind == "ratings":
        raise UsageError(f"{dataset.path} holds ratings (prepare ratings), which the classification models "
                         f"({', '.join(MODELS)}) cannot train on")
    text = dataset.feature_kind != "dense"
    if text and name != "fasttext":
        raise UsageError(f"model '{name}' needs dense features; {dataset.path} holds hashed tokens: use fasttext")
    if not text and name == "fasttext":
        raise UsageError(f"model 'fasttext' needs hashed tokens; {dataset.path} is dense: use linear, mlp or cnn")
    shape = list(dataset.feature_shape or ())
    if name == "cnn" and len(shape) != 2:
        raise UsageError(f"model 'cnn' needs 2-d images; {dataset.path} rows have shape {tuple(shape)}")
    if name in IMAGE_MODELS and not (len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3))):
        raise UsageError(f"model '{name}' needs images (H, W) or (H, W, 3); {dataset.path} rows have shape "
                         f"{tuple(shape)}")
    spec = {"name": name, "n_features": dataset.n_features, "n_classes": dataset.n_classes,
            "feature_shape": shape, **DEFAULTS[name]}
    spec.update({k: int(v) for k, v in sizes.items() if v is not None and k in DEFAULTS[name]})
    if name in IMAGE_MODELS:
        from mpirt.train.vision import DEPTHS

        if spec["depth"] not in DEPTHS[name]:
            raise UsageError(f"--depth {spec['depth']}: {name} comes in depths {', '.join(map(str, DEPTHS[name]))}")
        if normalize:
            stats = dataset.pixel_stats()
            if stats is None:
                raise UsageError(f"--normalize: {dataset.path} has no pixel statistics (made by 'mpirt prepare "
                                 f"images' or 'cifar')")
            spec["mean"], spec["std"] = stats
    elif normalize:
        raise UsageError(f"--normalize is for the image models ({', '.join(IMAGE_MODELS)})")
    check_size(spec, f"{dataset.path}: model '{name}'")
    return spec


def max_params():
    """The parameter cap: ``$MPIRT_MAX_PARAMS``, else 2^30 (4 GiB of float32, about 16 GiB with
    gradients, Adam's state and the allreduce buffers, on every rank)."""
    import os

    from mpirt.errors import UsageError

    raw = os.environ.get(MAX_PARAMS_ENV, "").strip()
    if raw and not (raw.isdigit() and int(raw) > 0):
        raise UsageError(f"{MAX_PARAMS_ENV}={raw!r} is not a positive integer")
    return int(raw) if raw else 1 << 30


def param_shapes(spec):
    """{name: shape} of the model ``spec`` builds, without allocating it (torch's meta device)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build(spec).state_dict().items()}


def check_size(spec, what):
    """Refuse a spec whose model exceeds :func:`max_params` before anything is allocated (a data set
    hashed to 2^32 buckets made fastText ask for 1 TB; a crafted spec, any size).

    Raises:
        UsageError: one line with the size and what to change.
    """
    from mpirt.errors import UsageError

    n = sum(int(np.prod(s, dtype=object)) for s in param_shapes(spec).values())
    cap = max_params()
    if n > cap:
        hint = ("prepare the data with fewer --hash-bits, or give a smaller --embed-dim"
                if spec["name"] == "fasttext" else "give a smaller --width or --depth" if spec["name"] in IMAGE_MODELS
                else "use a smaller model or fewer features")
        raise UsageError(f"{what} would have {n:,} parameters ({4 * n / 2**30:.1f} GiB as float32), more than "
                         f"the cap of {cap:,} ({MAX_PARAMS_ENV} raises it): {hint}")


def build(spec):
    """A fresh ``nn.Module`` for ``spec`` (parameters drawn from torch's current RNG)."""
    name, n_in, n_out = spec["name"], int(spec["n_features"]), int(spec["n_classes"])
    if name == "linear":
        return Dense(nn.Linear(n_in, n_out))
    if name == "mlp":
        h = int(spec["hidden"])
        return Dense(nn.Sequential(nn.Linear(n_in, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, n_out)))
    if name == "fasttext":
        return FastText(n_in, int(spec["embed_dim"]), n_out)
    if name == "cnn":
        h, w = (int(x) for x in spec["feature_shape"])
        c, ph, pw = int(spec["channels"]), max(h // 2, 1), max(w // 2, 1)
        return Dense(nn.Sequential(
            nn.Unflatten(1, (1, h, w)),
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d((ph, pw)), nn.Flatten(),
            nn.Linear(2 * c * ph * pw, n_out),
        ))
    if name in IMAGE_MODELS:
        from mpirt.train import vision

        return vision.build(spec)
    raise ValueError(f"unknown model '{name}'")


class Dense(nn.Module):
    """Dense rows, flattened -> logits."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, X):
        return self.body(X.reshape(X.shape[0], -1))


class FastText(nn.Module):
    """Mean of hashed-token embeddings (EmbeddingBag), then a linear layer (Joulin et al. 2016)."""

    def __init__(self, n_buckets, dim, n_classes):
        super().__init__()
        self.embed = nn.EmbeddingBag(n_buckets, dim, mode="mean")
        self.fc = nn.Linear(dim, n_classes)
        nn.init.uniform_(self.embed.weight, -1.0 / dim, 1.0 / dim)

    def forward(self, ids, offsets):
        return self.fc(bag_mean(self.embed, ids, offsets[:-1]))


def inputs(model_name, batch, device="cpu"):
    """The forward arguments of ``model_name`` for a :class:`Batch`, as tensors on ``device``."""
    if model_name == "fasttext":
        ids = torch.from_numpy(batch.ids.astype("int64", copy=False)).to(device)
        offsets = torch.from_numpy(batch.offsets.astype("int64", copy=False)).to(device)
        return (ids, offsets)
    return (torch.from_numpy(batch.X).to(device),)
