"""What ``mpirt train`` does for each model when no tuning flag is given: chosen by measurement so
that an untuned run gets close to a tuned one (bench/RESULTS.md, "defaults").

Measured on this project's 2-core machine, test accuracy of 1-rank runs with these defaults:
- digits (``mpirt prepare digits``, 1,437 train rows): cnn 99.4/99.4/98.9% (seeds 0/1/2), mlp
  98.3/98.3/97.8%, linear 98.3% (seed 0); with the old defaults (1 epoch) the cnn reached 80.3% and
  the mlp 73.0%;
- real text (2,243 man pages as HTML in 6 sections, ``prepare text``): fasttext 92.4/92.9/91.1%,
  where a scikit-learn logistic regression on the same hashed features reaches 93.3% (tf-idf, C=1)
  to 94.6% (C=10), and the old defaults 17.9%. Plain SGD needs a learning rate near 2 and 30
  epochs there (79.5% at lr 2, momentum 0); Adam's per-coordinate steps suit hashed sparse rows.

Image models (resnet, vgg; measured at ``--width 16`` on the generated shapes set, 1,200 PNG/JPEG files of
32x32, seeds 0-2, ``bench defaults``): with a constant rate the last epoch's accuracy swung between 33% and
100% with the seed; a cosine decay steadies it: resnet SGD lr 0.05 with 5% warmup 72.5/100/85.8%
(Adam 0.003: 66.7/100/72.5%), vgg Adam lr 0.001 67.5/89.2/93.3% (SGD 0.01 constant: 66.7/47.5/33.3%).
No real image set could be downloaded here; CIFAR-10 would be the next measurement.

For the other models the schedule stays constant by default: a decaying one's length is the run's, so a finished run
could not be resumed for more epochs (``--resume --epochs N``) on the same curve. A linear decay
gained little here (fasttext, Adam lr 0.05: 93.3/92.0/92.0%; cnn with cosine: 98.9/98.3/99.4%).
"""

_PLAIN = {"augment": False, "normalize": False}
_IMAGES = {"augment": True, "normalize": True}
DEFAULTS = {
    "linear": {"optimizer": "sgd", "lr": 0.1, "epochs": 10, "lr_schedule": "constant", "warmup": 0.0, **_PLAIN},
    "mlp": {"optimizer": "sgd", "lr": 0.1, "epochs": 10, "lr_schedule": "constant", "warmup": 0.0, **_PLAIN},
    "cnn": {"optimizer": "sgd", "lr": 0.1, "epochs": 10, "lr_schedule": "constant", "warmup": 0.0, **_PLAIN},
    "fasttext": {"optimizer": "adam", "lr": 0.02, "epochs": 10, "lr_schedule": "constant", "warmup": 0.0, **_PLAIN},
    "resnet": {"optimizer": "sgd", "lr": 0.05, "epochs": 10, "lr_schedule": "cosine", "warmup": 0.05, **_IMAGES},
    "mf": {"optimizer": "adam", "lr": 0.01, "epochs": 10, "lr_schedule": "constant", "warmup": 0.0, **_PLAIN},
    "twotower": {"optimizer": "adam", "lr": 0.01, "epochs": 10, "lr_schedule": "constant", "warmup": 0.0,
                 **_PLAIN},
    "vgg": {"optimizer": "adam", "lr": 0.001, "epochs": 10, "lr_schedule": "cosine", "warmup": 0.0, **_IMAGES},
}
TUNED = ("optimizer", "lr", "epochs", "lr_schedule", "warmup", "augment", "normalize")


def describe(key):
    """``--help``'s line: each model's default for ``key``."""
    def show(v):
        return ("on" if v else "off") if isinstance(v, bool) else f"{v:g}" if isinstance(v, (int, float)) else v

    return ", ".join(f"{m} {show(DEFAULTS[m][key])}" for m in DEFAULTS)


def fill(args):
    """Set every tuning flag the user left out to the model's default (in place); return args."""
    for key in TUNED:
        if getattr(args, key, None) is None:
            setattr(args, key, DEFAULTS[args.model][key])
    return args
