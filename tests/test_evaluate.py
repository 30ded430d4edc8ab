"""Evaluation on every rank (mpirt.train.evaluate): the same bits on 1, 2 and 3 ranks, and a
failure during evaluation recovered like a step."""

import json
import sys

import pytest

from harness import assert_same_model, mpirun, run_cli

pytestmark = [pytest.mark.mpi, pytest.mark.cli]

# One model (seeded), one split, evaluated by the real function on the ranks of a real job.
SCRIPT = r'''
import json, sys
import torch
from mpirt.comm.elastic import ElasticComm
from mpirt.data.reader import open_dataset
from mpirt.train import models
from mpirt.train.evaluate import evaluate
from mpirt.train.source import RowSource
ec = ElasticComm()
with open_dataset(sys.argv[1]) as ds:
    spec = models.spec_for("mlp", ds, hidden=64)
    torch.manual_seed(7)
    model = models.build(spec)
    out = evaluate(model, "mlp", RowSource(ds.split(sys.argv[2])), ec, with_predictions=True)
if ec.rank == 0:
    print("RESULT", json.dumps({"loss": out["loss"].hex(), "accuracy": out["accuracy"].hex(),
                                "pred": out["y_pred"].tolist()}), flush=True)
ec.comm.Barrier()
'''


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    out = d / "digits.h5"
    # Test split of 1,797 x 0.6 rows: two fixed batches, so 3 ranks leave one rank with none.
    run_cli("prepare", "digits", out, "--shard-rows", "256", "--test-fraction", "0.6").check()
    return out


def test_the_numbers_are_the_same_bits_on_any_number_of_ranks(tmp_path, digits):
    script = tmp_path / "eval.py"
    script.write_text(SCRIPT)
    results = []
    for n in (1, 2, 3):
        res = mpirun(n, [sys.executable, script, digits, "test"], timeout=120)
        res.check()
        line = next(x for x in res.stdout.splitlines() if "RESULT " in x)
        results.append(json.loads(line.split("RESULT ", 1)[1]))
    assert len(results[0]["pred"]) > 1024
    assert results[1] == results[0] and results[2] == results[0]


def test_a_kill_during_evaluation_is_recovered_like_a_step(tmp_path, digits):
    from test_train import assert_exactly_once, final_params, n_train, records, train

    res, one = train(tmp_path, digits, 1, "--report", tmp_path / "r1", name="one")
    res.check()
    steps_per_epoch = -(-n_train(digits) // 64)
    faults = [f"kill:member=1:step={steps_per_epoch}:phase=eval",  # the val evaluation after epoch 1
              f"kill:member=coordinator:step={2 * steps_per_epoch}:phase=eval"]  # after epoch 2
    res, run = train(tmp_path, digits, 4, "--report", tmp_path / "r4", faults=faults, name="four")
    res.check()
    fired = [e for e in records(run / "events.jsonl") if e["event"] == "fault"]
    assert [(e["phase"], e["step"]) for e in fired] == [("eval", steps_per_epoch), ("eval", 2 * steps_per_epoch)]
    views = [e for e in records(run / "events.jsonl") if e["event"] == "view"]
    assert [v["failed"] for v in views] == [[], [1], [0]]
    assert_same_model(final_params(one)[0], final_params(run)[0])
    assert_exactly_once(run, n_train(digits))
    with open(tmp_path / "r1" / "report.json") as f1, open(tmp_path / "r4" / "report.json") as f4:
        r1, r4 = json.load(f1), json.load(f4)
    # Every epoch reported once, with its validation figures (epoch 2's and the test's by the
    # coordinator that took over during epoch 2's evaluation).
    assert [e["epoch"] for e in r4["epochs"]] == [0, 1]
    assert all(e["val_accuracy"] is not None for e in r4["epochs"])
    assert r4["test"]["n"] == r1["test"]["n"]
    assert abs(r4["test"]["accuracy"] - r1["test"]["accuracy"]) <= 1 / r1["test"]["n"]
