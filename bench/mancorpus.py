"""A real-text corpus: this machine's man pages rendered to HTML by groff, labelled by section.

    python -m bench.mancorpus OUT.jsonl [--per-section 400]

Real HTML (tags, entities, tables, code) that ``mpirt prepare text`` cleans and hashes: the corpus the
text benchmarks train fastText on. Sections 1, 2, 3, 5, 7 and 8 (4 and 6 have too few pages here);
at most ``--per-section`` pages each, evenly spaced over the sorted file names, so the corpus is the
same on every machine with the same man pages. Needs Debian's ``groff`` (not only ``groff-base``:
the HTML device). Pages that are only a ``.so`` redirect are skipped.
"""

import argparse
import concurrent.futures as cf
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

SECTIONS = ("1", "2", "3", "5", "7", "8")
MAN = "/usr/share/man"


def pages(per_section, man=MAN):
    """[(path, section)] chosen deterministically: evenly spaced over each section's sorted names."""
    out = []
    for s in SECTIONS:
        d = os.path.join(man, f"man{s}")
        names = sorted(n for n in os.listdir(d) if n.endswith(".gz")) if os.path.isdir(d) else []
        step = max(len(names) / per_section, 1.0)
        out += [(os.path.join(d, names[int(i * step)]), s) for i in range(min(per_section, len(names)))]
    return out


def render(item):
    """(HTML text, section) of one page, or None for a redirect or a page groff cannot render."""
    path, section = item
    with gzip.open(path, "rb") as f:
        src = f.read()
    if src.lstrip().startswith(b".so "):
        return None
    # grohtml renders tables and equations to PNG files in its working directory: give it a scratch one.
    with tempfile.TemporaryDirectory() as scratch:
        res = subprocess.run(["groff", "-mandoc", "-Thtml"], input=src, capture_output=True, timeout=60, cwd=scratch)
    # groff stamps the time it ran: drop it, so the corpus is the same bytes on every build.
    html = re.sub(r"<!-- CreationDate:[^>]*-->\n", "", res.stdout.decode("utf-8", "replace"))
    return (html, section) if res.returncode == 0 and len(html) > 500 else None


def build(out, per_section=400, workers=None):
    """Write the corpus as JSONL (``{"text": html, "label": "man1", "source": name}``); return its size."""
    if shutil.which("groff") is None or subprocess.run(["groff", "-Thtml"], input=b"", capture_output=True).returncode:
        raise SystemExit("bench.mancorpus: groff with its HTML device is needed (apt-get install groff)")
    chosen = pages(per_section)
    n = 0
    tmp = out + ".tmp"
    with open(tmp, "w") as f, cf.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        for (path, _), doc in zip(chosen, pool.map(render, chosen)):
            if doc is None:
                continue
            html, section = doc
            f.write(json.dumps({"text": html, "label": f"man{section}", "source": os.path.basename(path)}) + "\n")
            n += 1
    os.replace(tmp, out)
    return n


def linear_baseline(h5, C=1.0):
    """Test accuracy of scikit-learn's LogisticRegression (its defaults: L2, C=1, lbfgs) on tf-idf of the
    same hashed token ids as a prepared text data set, trained on its train split.

    The yardstick of fastText's default run (tests/test_defaults.py, bench/defaults.py). Only the hashed
    columns that occur in training rows are kept: an L2-regularised model gives the others zero weight
    anyway, and fitting 28k columns instead of 2^20 takes seconds instead of minutes.
    """
    import numpy as np
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import TfidfTransformer
    from sklearn.linear_model import LogisticRegression

    from mpirt.data.reader import open_dataset

    with open_dataset(h5) as ds:
        parts = [ds.split(name).read(0, ds.split(name).n_rows) for name in ("train", "test")]
    mats = []
    for b in parts:
        rows = np.repeat(np.arange(len(b.y)), np.diff(b.offsets))
        mats.append(sp.csr_matrix((np.ones(len(b.ids)), (rows, b.ids)), shape=(len(b.y), int(b.ids.max()) + 1)))
    width = max(m.shape[1] for m in mats)
    train, test = (sp.csr_matrix((m.data, m.indices, m.indptr), shape=(m.shape[0], width)) for m in mats)
    used = np.unique(train.indices)
    tfidf = TfidfTransformer(sublinear_tf=True).fit(train[:, used])
    model = LogisticRegression(C=C, max_iter=2000).fit(tfidf.transform(train[:, used]), parts[0].y)
    return float((model.predict(tfidf.transform(test[:, used])) == parts[1].y).mean())


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.mancorpus")
    p.add_argument("output")
    p.add_argument("--per-section", type=int, default=400)
    args = p.parse_args(argv)
    n = build(args.output, args.per_section)
    print(f"{args.output}: {n} man pages as HTML")
    return 0


if __name__ == "__main__":
    sys.exit(main())
