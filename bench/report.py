"""``python -m bench report``: bench/RESULTS.md and its plots, from the suites' JSON results.

Every section shows the exact command that produced it, the machine and git commit it ran on, the
table (each figure beside its baseline from the same run) and a PNG plot. Reads bench/results/latest
(or MPIRT_BENCH_OUT), writes the plots next to the JSON and RESULTS.md in bench/.
"""

import os
import statistics

from bench.common import OUT_DIR, fmt_bytes, load_results, log2_axes, save_png, table

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS.md")


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _header(doc, title):
    m = doc["machine"]
    where = f"{m.get('cpus')} cores, {m.get('host')}, {m.get('time')}, git {m.get('git') or '?'}"
    lines = [f"## {title}", "", f"`{_command(doc)}`  ", f"*{where}; torch {m.get('torch')}, "
             f"mpi4py {m.get('mpi4py')}, h5py {m.get('h5py')}*"]
    if doc.get("note"):
        lines.append(f"  \n*{doc['note']}*")
    return lines + [""]


def _command(doc):
    cmd = doc.get("command", "")
    if "bench/__main__.py" in cmd:  # python -m bench records its own path
        cmd = "python -m bench" + cmd.split("bench/__main__.py", 1)[1]
    return cmd


def _img(path):
    return f"![{os.path.basename(path)}]({os.path.relpath(path, HERE)})"


# -- suites ------------------------------------------------------------------------------------
def allreduce(doc, out_dir):
    from bench.allreduce import busbw

    r = doc["results"]
    lines = _header(doc, "allreduce: mpirt's fused/segmented allreduce, raw mpi4py (tcp, sm), torch gloo")
    f = {k: med(v) for k, v in r["fused"].items()}
    nbytes = 4 * r["total_floats"]
    rows = [[name, f"{1e3 * f[key]:.1f}", f"{nbytes / f[key] / 1e9:.2f}", f"{f[key] / f['mpirt']:.2f}x"]
            for name, key in (("mpirt GradAllreduce (pack, segments, unpack)", "mpirt"),
                              ("mpirt, 4 segments in flight", "mpirt_inflight4"),
                              ("raw mpi4py Allreduce, one flat buffer", "raw"),
                              ("torch gloo, all_reduce per tensor", "gloo_per_tensor"),
                              ("torch gloo, one flat buffer", "gloo_flat"))]
    lines += [f"Fused gradient: {r['total_floats'] / 1e6:.0f}M floats in {r['tensors']} tensors, "
              f"{r['fused_ranks']} ranks, fault-tolerant tcp path (median):", "",
              table(rows, ["what", "ms", "algbw GB/s", "its time / mpirt's"]), ""]
    plt = _plt()
    fig, axes = plt.subplots(1, len(r["sweep"]), figsize=(5 * len(r["sweep"]), 4), squeeze=False)
    for ax, (n, sweep) in zip(axes[0], sorted(r["sweep"].items(), key=lambda kv: int(kv[0]))):
        n = int(n)
        sizes = sorted(int(s) for s in sweep)
        rows = []
        for label, key in (("raw Allreduce (tcp, FT)", "raw"), ("mpirt segmented (tcp, FT)", "mpirt"),
                           ("torch gloo", "gloo"), ("raw Allreduce (sm, no FT)", "raw_sm")):
            ax.plot(sizes, [busbw(s, med(sweep[str(s)][key]), n) for s in sizes], "o-", label=label, markersize=3)
        for s in sizes:
            m = {k: med(v) for k, v in sweep[str(s)].items()}
            rows.append([fmt_bytes(s)] + [f"{s / m[k] / 1e9:.2f} / {busbw(s, m[k], n):.2f}"
                                           for k in ("mpirt", "raw", "gloo", "raw_sm")]
                        + [f"{m['raw'] / m['mpirt']:.2f}x", f"{m['gloo'] / m['mpirt']:.2f}x"])
        over = f" (more ranks than the {doc['machine'].get('cpus')} cores: oversubscribed)" if n > (
            doc["machine"].get("cpus") or n) else ""
        lines += [f"Sizes on {n} ranks{over}, algbw / busbw in GB/s (nccl-tests' definitions):", "",
                  table(rows, ["bytes", "mpirt (tcp)", "raw (tcp)", "gloo", "raw (sm, no FT)", "mpirt vs raw tcp",
                               "mpirt vs gloo"]), ""]
        log2_axes(ax, "bytes", "busbw (GB/s)")
        ax.set_title(f"{n} ranks", fontsize=9)
    lines += [_img(save_png(fig, out_dir, "allreduce.png")), ""]
    return lines


def recovery(doc, out_dir):
    r = doc["results"]
    title = "recovery: in place after SIGKILL and SIGSTOP, against torchrun's restart"
    lines = _header(doc, title + (f" (second machine: {doc['label']})" if doc.get("label") else ""))
    phases = ("detect", "revoke+shrink", "agree", "replan", "first unit")
    rows, ranks = [], sorted(r["kill"], key=int)
    meds = {}
    for n in ranks:
        runs = [x for x in r["kill"][n] if x]
        m = {k: med([x.get(k) for x in runs]) for k in phases + ("total",)}
        meds[n] = m
        tr_all = r.get("torchrun", {}).get(n, [])
        tr = med(tr_all)
        rows.append([n] + [f"{m[k]:.1f}" if m[k] is not None else "-" for k in phases + ("total",)]
                    + [f"{tr:.0f}" if tr else f"failed ({sum(t is not None for t in tr_all)}/{len(tr_all)})",
                       f"{tr / m['total']:.0f}x" if tr else "-"])
    lines += ["Recovery after SIGKILL of one rank, ms (median):", "",
              table(rows, ["ranks", "detect", "revoke+shrink", "agree+sync", "re-plan", "first unit", "mpirt total",
                           "torchrun restart", "torchrun / mpirt"]), ""]
    if r.get("hang"):
        hrows = [[n, f"{med([x['total'] for x in runs if x]):.0f}"] for n, runs in sorted(r["hang"].items())]
        lines += ["Hang (SIGSTOP) with a 2 s bound: recovered after (ms):", "", table(hrows, ["ranks", "ms"]), ""]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(ranks)
    for k in phases:
        vals = [meds[n][k] or 0.0 for n in ranks]
        ax.bar([str(n) for n in ranks], vals, bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("ranks")
    ax.set_ylabel("ms")
    tr = {n: med(r.get("torchrun", {}).get(n, [])) for n in ranks}
    ax.set_title("mpirt recovery phases; torchrun restart: " + ", ".join(
        f"{n}: {'%.0f ms' % t if t else 'failed'}" for n, t in tr.items()), fontsize=8)
    ax.legend(fontsize=7)
    name = f"{os.path.splitext(doc.get('_file', 'recovery.json'))[0]}.png"
    lines += [_img(save_png(fig, out_dir, name)), ""]
    return lines


def scaling(doc, out_dir):
    from bench.scaling import HEADERS, efficiency, rows_of

    pts = doc["results"]["points"]
    lines = _header(doc, "scaling: strong and weak scaling of `mpirt train` (digits CNN, a 20M MLP, fastText)")
    lines += ["Samples/s (median of the timed epochs); efficiency against the 1-rank run of the same series on "
              "every core (its intra-op threads), and per core against the 1-rank run on one core "
              "(OMP_NUM_THREADS=1): samples/s / (min(ranks x threads, cores) x that run's). Both baselines are "
              "from the same run.", "", table(rows_of(pts), HEADERS), ""]
    rows = [r for r in efficiency(pts) if not (r["ranks"] == 1 and r["threads"] == 1 and r["efficiency"] is None)]
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    series = sorted({(r["model"], r["mode"]) for r in rows})
    for i, (m, mode) in enumerate(series):
        xs = [r for r in rows if (r["model"], r["mode"]) == (m, mode)]
        a1.plot([x["ranks"] for x in xs], [x["samples_per_s"] for x in xs], "o-", color=f"C{i}", label=f"{m} {mode}")
        a2.plot([x["ranks"] for x in xs], [x["efficiency"] for x in xs], "o-", color=f"C{i}",
                label=f"{m} {mode}: vs 1 rank")
        if all(x["per_core"] is not None for x in xs):
            a2.plot([x["ranks"] for x in xs], [x["per_core"] for x in xs], "s--", color=f"C{i}",
                    label=f"{m} {mode}: per core")
    log2_axes(a1, "ranks", "samples/s")
    log2_axes(a2, "ranks", "efficiency", legend=6)
    a2.set_ylim(0, 1.1)
    lines += [_img(save_png(fig, out_dir, "scaling.png")), ""]
    return lines


def model(doc, out_dir):
    r = doc["results"]
    lines = _header(doc, "model: the scaling model, fitted to the measurements above, checked, extrapolated")
    a = r["allreduce"]
    from bench.model import _ar_text

    lines += [f"Fitted: allreduce {_ar_text(a)}; pack/unpack {a.get('pack_s_per_byte', 0) * 1e9:.2f} ns/byte; "
              + "; ".join(
                  f"{m}: {c['c_s_per_sample'] * 1e6:.1f} us/sample + {c['h_s_per_step'] * 1e3:.2f} ms/step on one "
                  f"core, {c.get('thread_speedup', 1.0):.2f}x on {c.get('speedup_threads', 1)} threads, "
                  f"{c['params']:,} parameters" for m, c in r["compute"].items()) + "; recovery " + "; ".join(
                  f"{k}: {v['r0_ms']:.1f} + {v['r1_ms_per_doubling']:.1f} log2(p) ms" for k, v in r["recovery"].items()),
              "", "Every measured point against the model:", "",
              table([[c["what"], c["case"], f"{c['measured']:.4g}", f"{c['predicted']:.4g}", c["unit"],
                      f"{100 * c['error']:+.0f}%"] for c in r["checks"]],
                    ["what", "case", "measured", "model", "unit", "error"]), ""]
    keys = sorted(r["efficiency_predicted"])
    ranks = sorted({int(p) for k in keys for p in r["efficiency_predicted"][k]})
    lines += [f"Predicted at scale, one rank per core on the measured network (strong: global batch "
              f"{r['strong_batch']}; recovery from the {r['recovery_from']} fit):", "",
              table([[p] + [f"{100 * r['efficiency_predicted'][k][str(p)]:.0f}%" for k in keys]
                     + [f"{r['recovery_predicted_ms'].get(str(p), float('nan')):.1f}"] for p in ranks],
                    ["ranks"] + [f"efficiency {k}" for k in keys] + ["recovery ms"]), ""]
    for name in ("model-efficiency.png", "model-recovery.png", "model-allreduce.png"):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            lines += [_img(path), ""]
    return lines


def kernels(doc, out_dir):
    r = doc["results"]
    lines = _header(doc, "kernels: fused softmax-cross-entropy and bucket pack, against numpy/torch baselines")
    rows, bars = [], []
    cpu = r.get("cpu", {})
    if cpu:
        xn, xt = med(cpu["xent_numpy_s"]), med(cpu["xent_torch_s"])
        pf, pl = med(cpu["pack_fused_s"]), med(cpu["pack_loop_s"])
        rows += [["CPU xent fwd+bwd 65,536 x 1,000: torch backend", f"{xt * 1e3:.1f}", "numpy reference",
                  f"{xn * 1e3:.1f}", f"{xn / xt:.2f}x"],
                 ["CPU pack+unpack 160 tensors: fused", f"{pf * 1e3:.1f}", "per-tensor copies", f"{pl * 1e3:.1f}",
                  f"{pl / pf:.2f}x"]]
        bars += [("xent torch", xt), ("xent numpy", xn), ("pack fused", pf), ("pack per-tensor", pl)]
    for key, val in r.items():
        if key != "cpu" and isinstance(val, dict) and "ms" in val and "baseline_ms" in val:
            rows.append([key, f"{val['ms']:.3f}", val.get("baseline", "baseline"), f"{val['baseline_ms']:.3f}",
                         f"{val['baseline_ms'] / val['ms']:.2f}x"])
    lines += [table(rows, ["what", "ms", "baseline", "baseline ms", "speed-up"]), ""]
    gpu_md = os.path.join(HERE, "results", "kernels-h100.md")
    if len(rows) <= 2 and os.path.exists(gpu_md):
        lines += ["No GPU in this run; the figures recorded on the H100 machine (`MPIRT_REQUIRE_GPU=1 python -m "
                  "bench kernels`) are in [results/kernels-h100.md](results/kernels-h100.md).", ""]
    if bars:
        lines += _bars(out_dir, "kernels.png", [(k, v * 1e3) for k, v in bars], "ms (median)",
                       "CPU kernels (blue) against their baselines (grey)", pairs=True)
    return lines


def io(doc, out_dir):
    r = doc["results"]
    lines = _header(doc, "io: prepare and the sharded reader against the obvious code and raw h5py")
    bars = []
    if "prepare" in r:
        p = r["prepare"]
        ours, obvious = p["rows"] / p["seconds"], p["obvious_rows"] / p["obvious_seconds"]
        lines += [table([["mpirt prepare text (streaming, parallel)", f"{ours:,.0f}", f"{p['rows']:,}"],
                         ["obvious pipeline (baseline)", f"{obvious:,.0f}", f"{p['obvious_rows']:,}"]],
                        ["what", "rows/s", "rows"]),
                  "", f"{ours / obvious:.1f}x the baseline; peak memory by input size (MB): "
                  + ", ".join(f"{int(k):,} rows: {v:.0f}" for k, v in p.get("peak_mb", {}).items()), ""]
        bars += [("prepare", ours), ("obvious", obvious)]
    reader = load_results("io-reader", out_dir)  # the reader alone, re-run with the fair baseline
    if reader:
        lines += [f"Reader against raw h5py (`{_command(reader)}`, git {reader['machine'].get('git')}):", "",
                  table(reader["results"]["reader"],
                        ["kind", "batch", "mpirt reader rows/s", "raw h5py rows/s", "mpirt / raw"]), ""]
    if bars:
        lines += _bars(out_dir, "io.png", bars, "rows/s", "prepare text: mpirt against the obvious pipeline")
    return lines


def checkpoint(doc, out_dir):
    from bench.checkpoint import tables

    r = doc["results"]
    s = {k: med(v) for k, v in r["seconds"].items()}
    lines = _header(doc, "io: checkpoints against raw h5py, and what they cost training") + [tables(r), ""]
    names = {"save_mpirt": "save mpirt", "save_raw": "save h5py", "load_mpirt": "load mpirt", "load_raw": "load h5py"}
    return lines + _bars(out_dir, "checkpoint.png", [(names[k], s[k] * 1e3) for k in names], "ms",
                         "checkpoints: mpirt (blue) against raw h5py (grey)", pairs=True)


def train(doc, out_dir):
    r = doc["results"]
    m = {k: med(v) for k, v in r["samples_per_s"].items()}
    lines = _header(doc, "train: one elastic training step against a bare mpi4py loop and torch DDP (gloo)")
    lines += [table([[k, f"{m[k]:,.0f}", f"{m['mpirt'] / m[k]:.2f}x"] for k in ("mpirt", "bare", "ddp")],
                    ["loop", "samples/s", "mpirt / this"]), "",
              f"MLP 784-{r['config']['hidden']}-{r['config']['hidden']}-10, global batch {r['config']['batch']}, "
              f"{r['ranks']} ranks.", ""]
    if "compute" in m and "comm" in m:
        b = r["config"]["batch"]
        step, comp, com = (b / m[k] for k in ("mpirt", "compute", "comm"))
        lines += [f"Step {1e3 * step:.1f} ms against compute alone {1e3 * comp:.1f} ms and communication alone "
                  f"{1e3 * com:.1f} ms: step / max(compute, communication) = {step / max(comp, com):.2f}. "
                  f"No loop can beat its compute alone, so no loop can be more than DDP's step / compute alone "
                  f"= {b / m['ddp'] / comp:.2f}x DDP here.", ""]
    return lines + _bars(out_dir, "train.png", [(k, m[k]) for k in ("mpirt", "bare", "ddp")], "samples/s",
                         "elastic step (blue) against a bare mpi4py loop and DDP gloo (grey)")


def text(doc, out_dir):
    from bench.text import HEADERS, rows_of

    r = doc["results"]
    lines = _header(doc, "text: fastText on real text (man pages as HTML), sparse against dense embedding gradients")
    lines += [table(rows_of(r["median"]), HEADERS), "",
              f"{r['epochs']} epochs, global batch 64, {r.get('optimizer', 'SGD lr 2.0')}; test accuracy "
              f"{r.get('test_accuracy', '?')}; the train loop is the report's epoch times; the first epoch also "
              "faults in the tables' memory.", ""]
    return lines


def defaults(doc, out_dir):
    from bench.defaults import tables

    return _header(doc, "defaults: a run with no tuning flag against a tuned run and scikit-learn") + \
        [tables(doc["results"]), ""]


def images(doc, out_dir):
    from bench.images import tables

    return _header(doc, "images: ResNet training, 1 rank against 2, augmentation on and off") + \
        [tables(doc["results"]), ""]


def security(doc, out_dir):
    from bench.security import tables

    return _header(doc, "security: encryption and signatures against the same without") + [tables(doc["results"]), ""]


def recsys(doc, out_dir):
    from bench.recsys import tables

    return _header(doc, "recsys: embedding tables sharded over the ranks against replicated ones") + \
        [tables(doc["results"]), ""]


def sparse(doc, out_dir):
    r, cfg = doc["results"], doc["results"]["config"]
    lines = _header(doc, "sparse: the sparse-row exchange against the dense allreduce of the same table")
    rows = [[f"{x['touched']:,}", f"{1e3 * x['allgather']:.1f}", f"{1e3 * x['allreduce']:.1f}",
             f"{x['allreduce'] / x['allgather']:.2f}x", x["picked"]] for x in r["results"]]
    lines += [table(rows, ["rows touched per rank", "allgather ms", "allreduce ms", "allreduce / allgather",
                           "auto picks"]), "",
              f"Table {cfg['rows']:,} x {cfg['dim']} float32, {r['ranks']} ranks.", ""]
    if "apply_ms" in r:
        a = r["apply_ms"]
        lines += ["The optimizer's side: one lazy Adam step on the touched rows (mpirt.train.sparse.apply_rows), "
                  "median ms:", "",
                  table([[f"{cfg['apply_touched']:,} of {cfg['apply_rows']:,} x {cfg['dim']}",
                          f"{a['huge']:.2f}", f"{a['ordinary']:.2f}", f"{a['ordinary'] / a['huge']:.2f}x"]],
                        ["rows updated", "tables in huge pages ms", "ordinary pages ms (baseline)", "speed-up"]), ""]
    return lines


def exact(doc, out_dir):
    from bench.exact import tables

    return _header(doc, "exact: the cost of --exact (bit-identical on any world size) beside the default") + \
        tables(doc["results"])


def horovod(doc, out_dir):
    from bench.horovod import tables

    return _header(doc, "horovod: Horovod's synthetic benchmark step through mpirt.horovod, beside mpirt's loop "
                        "and DDP") + tables(doc["results"])


def _bars(out_dir, name, bars, ylabel, title, pairs=False):
    """A bar plot: mpirt's bars blue, baselines grey; the first bar is mpirt's, or with ``pairs``
    every other one (mpirt, its baseline, mpirt, its baseline...)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    colors = ["C0", "C7"] * (len(bars) // 2 + 1) if pairs else ["C0"] + ["C7"] * (len(bars) - 1)
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color=colors[:len(bars)])
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    return [_img(save_png(fig, out_dir, name)), ""]


def ledger(doc, out_dir):
    r = doc["results"]
    b, f = med(r["bare_s"]), med(r["farm_s"])
    return _header(doc, "ledger: the elastic shard farm against a bare master/worker loop") + [
        table([["mpirt farm (leases, commits, acks)", f"{f:.3f}"], ["bare mpi4py master/worker", f"{b:.3f}"]],
              ["what", "s"]), "", f"{r['units']} units on {r['ranks']} ranks: {f / b:.2f}x the bare loop.", ""] + _bars(
        out_dir, "ledger.png", [("mpirt farm", f), ("bare loop", b)], "s", "shard farm against a bare loop")


def chaos(doc, out_dir):
    runs = doc["results"]
    ok = sum(r["survived"] for r in runs)
    lost, dup = sum(r["lost"] for r in runs), sum(r["duplicated"] for r in runs)
    return _header(doc, "chaos: random fault schedules on the shard farm") + [
        f"{ok}/{len(runs)} schedules survived; lost units {lost}, duplicated {dup}.", ""] + _bars(
        out_dir, "chaos.png", [("survived", ok), ("failed", len(runs) - ok), ("lost units", lost),
                               ("duplicated", dup)], "count", "random fault schedules")


def chaoshosts(doc, out_dir):
    runs = doc["results"]
    ok = sum(r["survived"] for r in runs)
    lost, dup = sum(r["lost"] for r in runs), sum(r["duplicated"] for r in runs)
    rows = [[" ".join(r["faults"]), "ok" if r["survived"] else "FAIL", r["lost"], r["duplicated"]] for r in runs]
    return _header(doc, "chaos over hosts: one host fault (crash, freeze, partition) plus process faults, "
                        "6 ranks on 3 simulated hosts") + [
        f"{ok}/{len(runs)} schedules survived; lost units {lost}, duplicated {dup}.", "",
        table(rows, ["faults", "verdict", "lost", "duplicated"]), ""]


def hostile(doc, out_dir):
    runs = doc["results"]
    rows = [[r["case"], "ok" if r["ok"] else "FAIL", r["returncode"], "yes" if r["inputs_intact"] else "NO",
             r["error"][:100].replace("|", "/")] for r in runs]
    return _header(doc, "hostile inputs: one line, a non-zero exit, no traceback, inputs intact") + [
        f"{sum(r['ok'] for r in runs)}/{len(runs)} cases handled.", "",
        table(rows, ["case", "verdict", "exit", "inputs intact", "the line"]), ""]


SECTIONS = (("allreduce", allreduce), ("recovery", recovery), ("scaling", scaling), ("model", model),
            ("kernels", kernels), ("io", io), ("checkpoint", checkpoint), ("train", train), ("text", text),
            ("defaults", defaults), ("images", images), ("recsys", recsys), ("security", security), ("sparse", sparse), ("exact", exact), ("horovod", horovod), ("ledger", ledger),
            ("chaos", chaos), ("chaoshosts", chaoshosts), ("hostile", hostile))


def plot_suite(name, out_dir):
    """The PNG plots of one suite's results (each suite calls this when it writes its JSON)."""
    fn = dict(SECTIONS).get(name.split("-")[0])
    doc = load_results(name, out_dir)
    if fn and doc:
        doc["_file"] = name + ".json"
        fn(doc, out_dir)


def main(argv):
    out_dir = os.environ.get("MPIRT_BENCH_OUT", OUT_DIR)
    lines = ["# mpirt benchmark results", "",
             "Made by `python -m bench report` from the JSON in `bench/results/latest/` (machine, versions, git "
             "commit, every sample). Each section starts with the exact command that produced it. "
             "Each figure is beside its baseline from the same run.", ""]
    missing = []
    for name, fn in SECTIONS:
        docs = [(name, load_results(name, out_dir))]
        if name == "recovery":  # other machines' recovery runs too
            docs += [(f[:-5], load_results(f[:-5], out_dir)) for f in sorted(os.listdir(out_dir))
                     if f.startswith("recovery-") and f.endswith(".json")]
        for fname, doc in docs:
            if doc is None:
                missing.append(name)
                continue
            doc["_file"] = fname + ".json"
            lines += fn(doc, out_dir)
    if missing:
        lines += ["## Not run yet", "", ", ".join(missing), ""]
    tmp = RESULTS + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, RESULTS)
    print("wrote", RESULTS)
    return 0
