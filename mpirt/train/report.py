"""Training reports: a progress bar or plain lines while training, JSON and PNG plots at the end.

Only the coordinator reports (``enabled=False`` elsewhere). matplotlib and tqdm are imported when
used, never at import.
"""

import json
import os
import sys

import numpy as np

from mpirt.atomic import atomic_path
from mpirt.secure.policy import makedirs as private_makedirs


def classification_metrics(y_true, y_pred, n_classes, class_names=None):
    """Accuracy, confusion matrix (rows: true class), per-class precision/recall/F1 (0 when undefined)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(float)
    predicted, support = confusion.sum(0), confusion.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros(n_classes), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(n_classes), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(n_classes), where=denom > 0)
    names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
    return {
        "accuracy": float(tp.sum() / max(len(y_true), 1)), "n": int(len(y_true)),
        "confusion": confusion.tolist(), "macro_f1": float(f1.mean()) if n_classes else 0.0,
        "per_class": [{"class": names[i], "precision": float(precision[i]), "recall": float(recall[i]),
                       "f1": float(f1[i]), "support": int(support[i])} for i in range(n_classes)],
    }


class Reporter:
    """Per-step progress, per-epoch lines, and the final report (see the module docstring)."""

    def __init__(self, report_dir=None, *, class_names, total_steps, enabled=True, stream=None, progress=None):
        self.dir, self.class_names, self.enabled = report_dir, list(class_names), enabled
        self.stream = stream or sys.stdout
        self.epochs, self.total_steps = [], total_steps
        self.bar = None
        if enabled and progress is not False and (progress or self.stream.isatty()):
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, file=self.stream, unit="step", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def _print(self, line):
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def step(self, epoch, step, loss, samples, ranks):
        if self.enabled and self.bar is not None:
            self.bar.n = step + 1
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", ranks=ranks, refresh=False)
            self.bar.update(0)

    def event(self, text):
        if self.enabled:
            self._print(f"[mpirt] {text}")

    def epoch(self, epoch, *, train_loss, samples_per_s, val_loss=None, val_accuracy=None, ranks, seconds,
              echo=True):
        if not self.enabled:
            return
        rec = {"epoch": epoch, "train_loss": float(train_loss), "samples_per_s": float(samples_per_s),
               "val_loss": None if val_loss is None else float(val_loss),
               "val_accuracy": None if val_accuracy is None else float(val_accuracy),
               "ranks": int(ranks), "seconds": float(seconds)}
        self.epochs.append(rec)
        if not echo:
            return
        val = "" if val_loss is None else f"  val loss {val_loss:.4f}  val acc {100 * val_accuracy:.2f}%"
        self._print(f"epoch {epoch + 1}  train loss {train_loss:.4f}{val}  {samples_per_s:,.0f} samples/s  "
                    f"{ranks} ranks  ({seconds:.1f} s)")

    def final(self, *, y_true=None, y_pred=None, test_loss=None, extra=None, test_images=None):
        """The test metrics line, report.json and the plots; ``test_images``: (X, sources) of the test
        rows, for image data sets: the misclassified ones are drawn in misclassified.png."""
        if not self.enabled:
            return {}
        self.close()
        report = {"epochs": self.epochs, **(extra or {})}
        if y_true is not None and len(y_true):
            test = classification_metrics(y_true, y_pred, len(self.class_names), self.class_names)
            test["loss"] = None if test_loss is None else float(test_loss)
            report["test"] = test
            self._print(f"test accuracy {100 * test['accuracy']:.2f}% on {test['n']} rows "
                        f"(macro F1 {test['macro_f1']:.3f})")
        if self.dir:
            private_makedirs(self.dir)
            with atomic_path(os.path.join(self.dir, "report.json")) as tmp, open(tmp, "w") as f:
                json.dump(report, f, indent=1, default=_plain)
            _plots(self.dir, report, self.class_names)
            if test_images is not None and y_true is not None and len(y_true):
                report_wrong = misclassified_grid(self.dir, test_images[0], y_true, y_pred, self.class_names,
                                                  test_images[1])
                self._print(f"misclassified test images: {report_wrong} shown in "
                            f"{os.path.join(self.dir, 'misclassified.png')}")
        return report

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def misclassified_grid(directory, X, y_true, y_pred, class_names, sources=None, limit=48):
    """Draw the first ``limit`` misclassified rows of ``X`` (images (H, W[, 3])) with their true and
    predicted class (and source file) in ``directory/misclassified.png``; return how many are shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wrong = np.flatnonzero(np.asarray(y_true) != np.asarray(y_pred))[:limit]
    cols = 8
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.5, rows * 1.75), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), wrong):
        img = X[i]
        ax.imshow(img if img.ndim == 3 else img, cmap=None if img.ndim == 3 else "gray")
        title = f"{class_names[y_true[i]]} -> {class_names[y_pred[i]]}"
        if sources is not None:
            title += f"\n{os.path.basename(sources[i])[:18]}"
        ax.set_title(title, fontsize=6)
    fig.suptitle(f"misclassified test images (true -> predicted): {len(wrong)} shown", fontsize=8)
    with atomic_path(os.path.join(directory, "misclassified.png")) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return len(wrong)


def _plain(x):
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, set):
        return sorted(x)
    return str(x)


def _plots(directory, report, class_names):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = report["epochs"]
    x = [e["epoch"] + 1 for e in ep]

    def save(fig, name):
        with atomic_path(os.path.join(directory, name)) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(x, [e["train_loss"] for e in ep], "o-", label="train")
    if any(e["val_loss"] is not None for e in ep):
        ax.plot(x, [e["val_loss"] for e in ep], "s-", label="val")
    ax.set(xlabel="epoch", ylabel="loss", title="loss")
    ax.legend()
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    if any(e["val_accuracy"] is not None for e in ep):
        ax.plot(x, [e["val_accuracy"] for e in ep], "s-", label="val")
    if "test" in report:
        ax.plot([x[-1] if x else 1], [report["test"]["accuracy"]], "r*", markersize=12, label="test")
    ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    ax.legend()
    save(fig, "accuracy.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(x, [e["samples_per_s"] for e in ep])
    for xi, e in zip(x, ep):
        ax.annotate(f"{e['ranks']} r", (xi, e["samples_per_s"]), ha="center", va="bottom")
    ax.set(xlabel="epoch", ylabel="samples/s", title="throughput (ranks annotated)")
    save(fig, "throughput.png")

    if report.get("lr"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(range(len(report["lr"])), report["lr"])
        ax.set(xlabel="step", ylabel="learning rate", title="learning rate (--lr-schedule, --warmup)")
        save(fig, "lr.png")

    n = len(class_names)
    cm = np.array(report["test"]["confusion"]) if "test" in report else np.zeros((n, n), dtype=int)
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * n, 1.2 + 0.45 * n))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=90)
    ax.set_yticks(range(n), class_names)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title="confusion (test)")
    save(fig, "confusion.png")
