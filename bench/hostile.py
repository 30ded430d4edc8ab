"""The hostile-inputs set of ``python -m bench chaos --hostile``: what a careless or hostile user does.

Every case runs a real mpirt command on inputs made here and must end with a non-zero exit, one
error line naming the problem, no traceback, and every input file unchanged (SHA-256 before and
after). Reported as a table; the JSON keeps each case's exit status and error line.
"""

import hashlib
import json
import os
import subprocess
import sys

import h5py

from bench.common import mpi_env

MPIRT = [sys.executable, "-m", "mpirt"]


def _sha(path):
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _setup(d):
    """Inputs the cases attack: a data set, a checkpoint, a text file, a FIFO, a crafted data set."""
    env = _env()
    digits = os.path.join(d, "digits.h5")
    subprocess.run(MPIRT + ["prepare", "digits", digits, "--shard-rows", "256"], check=True, env=env,
                   capture_output=True)
    subprocess.run(MPIRT + ["train", "--data", digits, "--model", "linear", "--epochs", "1", "--no-progress",
                            "--checkpoint-dir", os.path.join(d, "ck")], check=True, env=env, capture_output=True)
    ckpt = os.path.join(d, "ck", sorted(n for n in os.listdir(os.path.join(d, "ck")) if n.startswith("ckpt-"))[0])
    notes = os.path.join(d, "notes.txt")
    with open(notes, "w") as f:
        f.write("a user's own file\n")
    fifo = os.path.join(d, "fifo")
    os.mkfifo(fifo)
    crafted = os.path.join(d, "crafted.h5")
    with open(digits, "rb") as src, open(crafted, "wb") as dst:
        dst.write(src.read())
    with h5py.File(crafted, "r+") as f:  # labels changed behind the checksums' back
        y = f["train/y"][()]
        y[:10] = (y[:10] + 1) % 10
        f["train/y"][...] = y
    jsonl = os.path.join(d, "in.jsonl")
    with open(jsonl, "w") as f:
        f.write('{"text": "hello world", "label": "a"}\n{"text": "bye", "label": "b"}\n')
    return {"digits": digits, "ckpt": ckpt, "notes": notes, "fifo": fifo, "crafted": crafted, "jsonl": jsonl,
            "d": d}


CASES = [
    ("prepare text over its own input", lambda p: ["prepare", "text", p["jsonl"], p["jsonl"]]),
    ("wordcount --out onto its data", lambda p: ["wordcount", p["digits"], "--out", p["digits"]]),
    ("classify --out onto its checkpoint", lambda p: ["classify", "--data", p["digits"], "--checkpoint", p["ckpt"],
                                                      "--out", p["ckpt"]]),
    ("classify --out onto a user's file", lambda p: ["classify", "--data", p["digits"], "--checkpoint", p["ckpt"],
                                                     "--out", p["notes"]]),
    ("train on labels changed behind the checksums", lambda p: ["train", "--data", p["crafted"], "--model", "linear", "--epochs", "1",
                                                                 "--no-progress"]),
    ("train --lr nan", lambda p: ["train", "--data", p["digits"], "--model", "linear", "--lr", "nan", "--no-progress"]),
    ("train --hidden -1", lambda p: ["train", "--data", p["digits"], "--model", "mlp", "--hidden", "-1"]),
    ("train --seed 1e23", lambda p: ["train", "--data", p["digits"], "--model", "linear", "--seed", "1e23"]),
    ("train --resume without --checkpoint-dir", lambda p: ["train", "--data", p["digits"], "--model", "linear", "--resume"]),
    ("classify --top-k 33", lambda p: ["classify", "--data", p["digits"], "--checkpoint", p["ckpt"], "--out",
                                       os.path.join(p["d"], "pred.h5"), "--top-k", "33"]),
    ("a FIFO as data", lambda p: ["train", "--data", p["fifo"], "--model", "linear", "--no-progress"]),
    ("a checkpoint that is not HDF5", lambda p: ["classify", "--data", p["digits"], "--checkpoint", p["notes"],
                                                 "--out", os.path.join(p["d"], "pred2.h5")]),
    ("output into a missing directory", lambda p: ["wordcount", p["digits"], "--out",
                                                   os.path.join(p["d"], "nope", "c.h5")]),
    ("launch --hang-timeout nan", lambda p: ["launch", "--hang-timeout", "nan", "--", "true"]),
    ("an unknown flag", lambda p: ["train", "--data", p["digits"], "--model", "linear", "--bogus"]),
]


def _env():
    return mpi_env()


def run(tmp):
    """Run every case; return one result per case."""
    inputs = _setup(tmp)
    files = [v for k, v in inputs.items() if k not in ("d", "fifo")]
    results = []
    for name, build in CASES:
        before = {f: _sha(f) for f in files}
        proc = subprocess.run(MPIRT + build(inputs), capture_output=True, text=True, timeout=300, env=_env(),
                              stdin=subprocess.DEVNULL)
        errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
        intact = all(_sha(f) == before[f] for f in files)
        ok = proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr + proc.stdout and intact
        results.append({"case": name, "ok": ok, "returncode": proc.returncode, "inputs_intact": intact,
                        "error": errors[0] if len(errors) == 1 else proc.stderr[-400:]})
    return results


def report(results):
    from bench.common import table

    rows = [[r["case"], "ok" if r["ok"] else "FAIL", r["returncode"], "yes" if r["inputs_intact"] else "NO",
             r["error"][:90]] for r in results]
    print("## Hostile inputs: one line, non-zero exit, no traceback, inputs intact\n")
    print(table(rows, ["case", "verdict", "exit", "inputs intact", "the line"]))
    print(f"\n{sum(r['ok'] for r in results)}/{len(results)} cases handled")
    return json.loads(json.dumps(results))
