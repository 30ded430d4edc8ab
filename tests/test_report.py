"""Training reports: metrics by hand, the JSON and PNG files, plain and progress-bar output."""

import io
import json

import numpy as np

from mpirt.train.report import Reporter, classification_metrics


def test_metrics_by_hand():
    m = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 1], 4, ["a", "b", "c", "d"])
    assert m["accuracy"] == 3 / 5
    assert m["confusion"][0] == [1, 1, 0, 0] and m["confusion"][2] == [0, 1, 0, 0]
    a, b, c, d = m["per_class"]
    assert (a["precision"], a["recall"]) == (1.0, 0.5)
    assert b["precision"] == 2 / 4 and b["recall"] == 1.0 and abs(b["f1"] - 2 / 3) < 1e-12
    assert c == {"class": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}  # never predicted
    assert d["support"] == 0 and d["f1"] == 0.0  # never occurs: 0, not NaN
    json.dumps(m)


def run_reporter(tmp_path, stream, progress=False):
    r = Reporter(tmp_path / "rep", class_names=["x", "y"], total_steps=6, stream=stream, progress=progress)
    for e in range(3):
        for s in range(2):
            r.step(e, 2 * e + s, 0.5, 10, 2)
        r.epoch(e, train_loss=1.0 / (e + 1), samples_per_s=100.0, val_loss=0.9, val_accuracy=0.5, ranks=2, seconds=1)
    r.event("view 1: 1 ranks")
    return r.final(y_true=np.array([0, 1, 1]), y_pred=np.array([0, 1, 0]), test_loss=0.3, extra={"views": 2})


def test_plain_lines_json_and_pngs(tmp_path):
    out = io.StringIO()
    report = run_reporter(tmp_path, out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("epoch 1  train loss 1.0000  val loss 0.9000  val acc 50.00%  100 samples/s  2 ranks")
    assert "[mpirt] view 1: 1 ranks" in lines and lines[-1].startswith("test accuracy 66.67% on 3 rows")
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert doc["views"] == 2 and len(doc["epochs"]) == 3 and doc["test"]["confusion"] == [[1, 0], [1, 1]]
    assert report["test"]["accuracy"] == doc["test"]["accuracy"]
    import matplotlib.pyplot as plt

    for name in ("loss", "accuracy", "confusion", "throughput"):
        png = tmp_path / "rep" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert plt.imread(png).ndim == 3


def test_progress_bar_and_disabled(tmp_path):
    out = io.StringIO()
    run_reporter(tmp_path, out, progress=True)
    assert "6/6" in out.getvalue() and "epoch 3" in out.getvalue()
    quiet = io.StringIO()
    r = Reporter(tmp_path / "none", class_names=["x"], total_steps=1, enabled=False, stream=quiet)
    r.epoch(0, train_loss=1, samples_per_s=1, ranks=1, seconds=1)
    assert r.final(y_true=[0], y_pred=[0]) == {} and quiet.getvalue() == "" and not (tmp_path / "none").exists()
