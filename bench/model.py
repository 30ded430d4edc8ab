"""A scaling model of mpirt's training and recovery, fitted to what the other suites measured.

    python -m bench model [--max-ranks 1024]

Reads allreduce.json, scaling.json and recovery*.json (bench/results/latest, or MPIRT_BENCH_OUT) and fits:

- allreduce time of n bytes on p ranks (Rabenseifner's cost: a latency term per doubling step and a
  bandwidth term that tends to 2n/B):  A(p, n) = 2 log2(p) alpha + 2 (p-1)/p n / B, least squares on
  relative error over the (p, size) points of the tcp sweep (mpirt's segmented path) with p <= cores;
  the points with more ranks than cores (oversubscribed: ranks wait for a time slice at every round)
  get an alpha and B of their own, which the predictions at scale (one rank per core) do not use;
- compute per step of a model on one core from its two 1-rank, 1-thread points (strong and weak
  batch):  T1(G) = c G + h; a rank with t > 1 intra-op threads computes s_t times as fast, s_t from
  the 1-rank runs on every core against those on one core (bench/scaling.py measures both);
- packing and unpacking the gradient buckets, per byte, from the kernels suite's CPU pack + unpack (else
  from the fused-allreduce figure, mpirt's time over the raw Allreduce):  P(n) = pack n, on p > 1;
- a step on p ranks sharing C cores, with the step's Agree as a zero-byte collective, its buckets
  reduced while backward runs (mpirt.train.overlap): of the communication W, all but the last bucket's
  can hide behind backward, taken as BWD_SHARE of the compute K (backward costs about twice forward):
  K = (c G / p + h + P(n_dense)) max(1, p / C) / s_t,  T(p) = K + max(W - BWD_SHARE K, A(p, last)) + A(p, 0),
  W = A(p, n_dense) + X(p), and for fastText's row-sparse table X(p) = its dense allreduce or the
  allgather of the rows the batch touches, S = s G bytes with s measured (report.json's wire),
  Ag(p, S) = log2(p) alpha + (p-1)/p S / B, chosen by the runtime's rule (mpirt.train.sparse: the
  allreduce when DENSE_WEIGHT x the table's bytes < S);
  when the allgather is chosen, every rank then merges all S gathered bytes (sums the rows that
  several ranks touched, and applies them): M(p) = mu S max(1, p / C), after backward, so exposed;
  mu is fitted (least squares on relative error) to the multi-rank points of the row-sparse models,
  the only term fitted on multi-rank points (the merge is CPU the allgather's bytes do not show);
- recovery after a SIGKILL:  R(p) = r0 + r1 log2(p) (ULFM's shrink and agreement are trees), per machine.

Checked against every measured point (the table gives the error of each), then used to predict
efficiency and recovery at 16 to 1,024 ranks with one rank per core (C = p) on the measured network.
Strong-scaling predictions use a global batch of STRONG_BATCH (so that 1,024 ranks still get 16 samples
each); weak ones the measured per-rank batch. Writes model.json and model-*.png.
"""

import argparse
import glob
import json
import math
import os
import statistics

import numpy as np

from bench.common import OUT_DIR, load_results, log2_axes, save_png, table, write_results

STRONG_BATCH = 16384
BWD_SHARE = 2.0 / 3.0  # backward's share of a step's compute (about twice the forward's)
FIRST_BUCKET, BUCKET = 1 << 20, 16 << 20  # mpirt.train.allreduce, with overlap
PREDICT = [16, 32, 64, 128, 256, 512, 1024]


def _lstsq_positive(X, t):
    """Least squares on relative error (rows scaled by 1/t), dropping terms that come out negative."""
    keep = list(range(X.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(X[:, keep] / t[:, None], np.ones_like(t), rcond=None)
        if (coef >= 0).all() or len(keep) == 1:
            full = np.zeros(X.shape[1])
            full[keep] = np.maximum(coef, 0)
            return full
        keep.pop(int(np.argmin(coef)))


# -- allreduce ---------------------------------------------------------------------------------
def _ar_features(p, n):
    return [2 * math.log2(p), 2 * (p - 1) / p * n]


def fit_allreduce(doc, column="mpirt", cores=None):
    """Fit alpha and B on the points with p <= cores, then the oversubscription factor on the rest."""
    points = [(int(p), int(size), statistics.median(r[column]))
              for p, sweep in doc["results"]["sweep"].items() for size, r in sweep.items()]
    cores = cores or max(p for p, _, _ in points)

    def alpha_bw(pts):
        alpha, inv_bw = _lstsq_positive(np.array([_ar_features(p, n) for p, n, _ in pts]),
                                        np.array([t for _, _, t in pts]))
        return {"alpha_s": alpha, "bandwidth_Bps": 1 / inv_bw if inv_bw else math.inf}

    fit = dict(alpha_bw([pt for pt in points if pt[0] <= cores] or points), cores=cores)
    over = [pt for pt in points if pt[0] > cores]
    if over:
        fit["oversubscribed"] = alpha_bw(over)
    # Packing the gradients into buckets and unpacking them: the fused figure's time over the raw
    # Allreduce of the same bytes, per byte (per core's share when that run was oversubscribed).
    r = doc["results"]
    fit["pack_s_per_byte"] = 0.0
    if "fused" in r:
        extra = statistics.median(r["fused"]["mpirt"]) - statistics.median(r["fused"]["raw"])
        fit["pack_s_per_byte"] = max(extra, 0.0) / (4 * r["total_floats"]) / max(1.0, r["fused_ranks"] / cores)
    return fit, points


def allreduce_time(fit, p, n, cores=None):
    """Seconds to allreduce n bytes on p ranks sharing ``cores`` cores (None: one rank per core)."""
    if p == 1:
        return 0.0
    if cores and p > cores and "oversubscribed" in fit:
        fit = fit["oversubscribed"]
    return 2 * math.log2(p) * fit["alpha_s"] + 2 * (p - 1) / p * n / fit["bandwidth_Bps"]


# -- training steps ----------------------------------------------------------------------------
def threads_of(pt):
    """The intra-op threads of a scaling point's ranks (recorded; else what mpirt launch gives)."""
    from mpirt.comm.launch import threads_per_rank

    return pt.get("threads") or threads_per_rank(pt["ranks"], pt.get("cores") or os.cpu_count())


def fit_compute(points):
    """Per model: c (s per sample) and h (s per step) on one core, from its 1-rank points on one core
    (strong and weak batch; the 1-rank points on every core where a run has no 1-thread points), and the
    intra-op threads' speed-up s_t from the pairs."""
    fits = {}
    for model in sorted({p["model"] for p in points}):
        ones = [p for p in points if p["model"] == model and p["ranks"] == 1]
        single = [p for p in ones if threads_of(p) == 1] or ones
        pts = [(p["global_batch"], p["global_batch"] / statistics.median(p["samples_per_s"])) for p in single]
        if not pts:
            continue
        (g1, t1), (g2, t2) = pts[0], pts[-1]
        if g1 != g2 and (t1 - t2) / (g1 - g2) > 0:
            c = (t1 - t2) / (g1 - g2)
            h = max(t1 - c * g1, 0.0)
        else:
            c, h = statistics.mean(t / g for g, t in pts), 0.0
        fits[model] = {"c_s_per_sample": c, "h_s_per_step": h, "params": ones[0]["params"],
                       "thread_speedup": 1.0, "speedup_threads": 1}
        pairs = [(statistics.median(p["samples_per_s"]) / statistics.median(q["samples_per_s"]), threads_of(p))
                 for p in ones if threads_of(p) > 1 for q in single
                 if q["mode"] == p["mode"] and threads_of(q) == 1]
        if pairs:
            fits[model]["thread_speedup"] = statistics.median(x for x, _ in pairs)
            fits[model]["speedup_threads"] = max(t for _, t in pairs)
        # A row-sparse table (fastText): its size, and the bytes a sample's touched rows put on the
        # wire, from the multi-rank runs' report (the most ranks: each rank's rows are merged per rank,
        # so the gathered rows grow with the ranks towards every sample's own rows).
        many = [p for p in points if p["model"] == model and p["ranks"] > 1 and (p.get("wire") or {}).get(
            "sparse_bytes_per_step")]
        if many:
            top = max(many, key=lambda p: p["ranks"])
            wire = top["wire"]
            fits[model]["sparse_params"] = top.get("sparse_params") or _table_params(model, top)
            fits[model]["sparse_bytes_per_sample"] = wire["sparse_bytes_per_step"] / top["global_batch"]
    return fits


def speedup(cf, threads):
    """How many times faster a rank with ``threads`` intra-op threads computes than one with 1: the
    measured s_t at its t, linear between 1 and t (and no further gain past t)."""
    t, s = cf.get("speedup_threads", 1), cf.get("thread_speedup", 1.0)
    if threads <= 1 or t <= 1:
        return 1.0
    return 1.0 + (s - 1.0) * (min(threads, t) - 1) / (t - 1)


def _table_params(model, point):
    """The embedding table's parameters when a point does not record them: all but the classifier."""
    dense = point["wire"]["dense_bytes_per_step"] // 4
    return max(point["params"] - dense, 0)


def allgather_time(fit, p, n, cores=None):
    """Seconds to allgather n bytes in all (every rank ends with all n) on p ranks."""
    if p == 1:
        return 0.0
    if cores and p > cores and "oversubscribed" in fit:
        fit = fit["oversubscribed"]
    return math.log2(p) * fit["alpha_s"] + (p - 1) / p * n / fit["bandwidth_Bps"]


def last_bucket(dense_bytes):
    """Bytes of the bucket reduced after backward (the first layers' and the stats)."""
    if dense_bytes <= FIRST_BUCKET:
        return dense_bytes
    rest = dense_bytes - FIRST_BUCKET
    return rest - BUCKET * ((rest - 1) // BUCKET)


def step_time(cf, ar, p, global_batch, cores, merge=True, threads=1):
    share = max(1.0, p / cores)
    dense = 4 * (cf["params"] - cf.get("sparse_params", 0))
    pack = ar.get("pack_s_per_byte", 0.0) * dense if p > 1 else 0.0
    # Intra-op threads speed a rank up only on cores of their own: ranks that oversubscribe the cores
    # (unbound, one thread per core each) share them, which ``share`` counts.
    own = threads if p * threads <= cores else 1
    compute = (cf["c_s_per_sample"] * global_batch / p + cf["h_s_per_step"] + pack) * share / speedup(cf, own)
    comm = allreduce_time(ar, p, dense, cores)
    merged = 0.0
    if cf.get("sparse_params"):  # each step, the runtime's rule (mpirt.train.sparse.SparseExchange.choose)
        from mpirt.train.sparse import DENSE_WEIGHT

        gathered = cf["sparse_bytes_per_sample"] * global_batch
        if 4 * cf["sparse_params"] * DENSE_WEIGHT < gathered:
            comm += allreduce_time(ar, p, 4 * cf["sparse_params"], cores)
        else:
            comm += allgather_time(ar, p, gathered, cores)
            if merge and p > 1:
                merged = cf.get("merge_s_per_byte", 0.0) * gathered * share
    exposed = max(comm - BWD_SHARE * compute, allreduce_time(ar, p, last_bucket(dense), cores))
    return compute + exposed + merged + allreduce_time(ar, p, 0, cores)  # and the Agree of the step protocol


def fit_merge(cf, ar, points):
    """mu (s per gathered byte) of each row-sparse model, from its multi-rank points: what their step
    time exceeds the model without the merge by, against the gathered bytes times the core share."""
    for model, f in cf.items():
        if not f.get("sparse_params"):
            continue
        xs, ys = [], []
        for pt in points:
            if pt["model"] != model or pt["ranks"] < 2:
                continue
            p, g, cores = pt["ranks"], pt["global_batch"], pt.get("cores") or os.cpu_count()
            t = g / statistics.median(pt["samples_per_s"])
            xs.append(f["sparse_bytes_per_sample"] * g * max(1.0, p / cores) / t)
            ys.append((t - step_time(f, ar, p, g, cores, merge=False, threads=threads_of(pt))) / t)
        if xs:
            x, y = np.array(xs), np.array(ys)
            f["merge_s_per_byte"] = max(float(x @ y / (x @ x)), 0.0)


def throughput(cf, ar, p, global_batch, cores, threads=1):
    return global_batch / step_time(cf, ar, p, global_batch, cores, threads=threads)


def predict_efficiency(cf, ar, mode, per_rank_batch, ranks):
    """Efficiency at each p of ``ranks``, one rank per core."""
    out = {}
    for p in ranks:
        g = STRONG_BATCH if mode == "strong" else per_rank_batch * p
        g1 = STRONG_BATCH if mode == "strong" else per_rank_batch
        out[p] = throughput(cf, ar, p, g, p) / (p * throughput(cf, ar, 1, g1, 1))
    return out


# -- recovery ----------------------------------------------------------------------------------
def recovery_points(out_dir):
    """{machine label: [(p, total ms), ...]} from every recovery*.json."""
    machines = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "recovery*.json"))):
        with open(path) as f:
            doc = json.load(f)
        label = doc.get("label") or f"{doc['machine'].get('cpus')}-core {doc['machine'].get('host')}"
        pts = []
        for p, runs in doc["results"].get("kill", {}).items():
            totals = [r["total"] for r in runs if r]
            if totals:
                pts.append((int(p), statistics.median(totals)))
        if pts:
            machines[label] = {"points": sorted(pts), "cores": doc["machine"].get("cpus")}
    return machines


def fit_recovery(pts):
    X = np.array([[1.0, math.log2(p)] for p, _ in pts])
    t = np.array([ms for _, ms in pts])
    r0, r1 = _lstsq_positive(X, t)
    return {"r0_ms": r0, "r1_ms_per_doubling": r1}


def recovery_ms(fit, p):
    return fit["r0_ms"] + fit["r1_ms_per_doubling"] * math.log2(p)


# -- the whole model ---------------------------------------------------------------------------
def build(out_dir):
    ar_doc, sc_doc = load_results("allreduce", out_dir), load_results("scaling", out_dir)
    if not ar_doc or not sc_doc:
        raise SystemExit(f"model: needs allreduce.json and scaling.json in {out_dir} "
                         "(python -m bench allreduce; python -m bench scaling)")
    ar, ar_points = fit_allreduce(ar_doc, cores=ar_doc["machine"].get("cpus"))
    kernels = load_results("kernels", out_dir)
    if kernels and "cpu" in kernels["results"]:
        # Measured directly: the fused pack + unpack of the kernels suite (25M floats in 160 tensors).
        from bench.kernels import resnet_like_sizes

        ar["pack_s_per_byte"] = statistics.median(kernels["results"]["cpu"]["pack_fused_s"]) / (
            4 * sum(resnet_like_sizes()))
    points = sc_doc["results"]["points"]
    cf = fit_compute(points)
    fit_merge(cf, ar, points)
    checks = []
    for p, size, t in ar_points:
        checks.append({"what": "allreduce", "case": f"{p} ranks, {size} B", "measured": t,
                       "predicted": allreduce_time(ar, p, size, ar["cores"]), "unit": "s"})
    for pt in points:
        if pt["model"] not in cf:
            continue
        got, threads = statistics.median(pt["samples_per_s"]), threads_of(pt)
        want = throughput(cf[pt["model"]], ar, pt["ranks"], pt["global_batch"], pt.get("cores") or os.cpu_count(),
                          threads)
        checks.append({"what": "training", "case": f"{pt['model']} {pt['mode']} {pt['ranks']} ranks x {threads} "
                       f"thread{'s' if threads > 1 else ''}", "measured": got, "predicted": want, "unit": "samples/s"})
    rec = {}
    for label, m in recovery_points(out_dir).items():
        # Fitted on the points with a core per rank when there are two or more (oversubscribed ranks
        # wait for a time slice at every round of shrink and agree, which a log model does not capture).
        cores = m["cores"] or math.inf
        own = [(p, ms) for p, ms in m["points"] if p <= cores]
        fit = fit_recovery(own if len(own) >= 2 else m["points"])
        rec[label] = dict(fit, points=m["points"], cores=m["cores"])
        for p, ms in m["points"]:
            over = " (oversubscribed)" if p > cores else ""
            checks.append({"what": "recovery", "case": f"{label}, {p} ranks{over}", "measured": ms,
                           "predicted": recovery_ms(fit, p), "unit": "ms"})
    for c in checks:
        c["error"] = c["predicted"] / c["measured"] - 1 if c["measured"] else None
    weak_batch = {pt["model"]: pt["global_batch"] for pt in points if pt["mode"] == "weak" and pt["ranks"] == 1}
    # At scale one rank per core, one thread a rank: efficiency against 1 rank on one core.
    predictions = {f"{m} {mode}": predict_efficiency(cf[m], ar, mode, weak_batch.get(m, 64), PREDICT)
                   for m in cf for mode in ("strong", "weak")}
    # Recovery at scale from the machine with the most cores (its points are not oversubscribed).
    best = max(rec, key=lambda k: rec[k]["cores"] or 0) if rec else None
    rec_pred = {p: recovery_ms(rec[best], p) for p in PREDICT} if best else {}
    return {"allreduce": ar, "compute": cf, "recovery": rec, "checks": checks, "strong_batch": STRONG_BATCH,
            "efficiency_predicted": predictions, "recovery_predicted_ms": rec_pred, "recovery_from": best,
            "measured_points": points}


def plot(model, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    measured, threads = {}, {}
    for pt in model["measured_points"]:
        if pt.get("one_core"):
            continue
        measured.setdefault((pt["model"], pt["mode"]), {})[pt["ranks"]] = statistics.median(pt["samples_per_s"])
        threads[(pt["model"], pt["mode"], pt["ranks"])] = threads_of(pt)
    for i, key in enumerate(sorted(model["efficiency_predicted"])):
        color = f"C{i}"
        m, mode = key.split()
        cf = model["compute"][m]
        pts = measured.get((m, mode), {})
        ranks = sorted(pts)
        if ranks and 1 in pts:
            cores = next((p.get("cores") for p in model["measured_points"]), None) or os.cpu_count()
            ax.plot(ranks, [pts[p] / (p * pts[1]) for p in ranks], "o", color=color, label=f"{key}: measured")
            g = {p: next(x["global_batch"] for x in model["measured_points"]
                         if x["model"] == m and x["mode"] == mode and x["ranks"] == p) for p in ranks}
            t = {p: threads[(m, mode, p)] for p in ranks}
            fitted = [throughput(cf, model["allreduce"], p, g[p], cores, t[p]) /
                      (p * throughput(cf, model["allreduce"], 1, g[1], cores, t[1])) for p in ranks]
            ax.plot(ranks, fitted, ":", color=color)
        weak_b = next((x["global_batch"] for x in model["measured_points"]
                       if x["model"] == m and x["mode"] == "weak" and x["ranks"] == 1), 64)
        line = predict_efficiency(cf, model["allreduce"], mode, weak_b, [1 << k for k in range(11)])
        ax.plot(list(line), list(line.values()), "-", color=color,
                label=f"{key}: predicted, 1 rank/core" + (f", G={model['strong_batch']}" if mode == "strong" else ""))
    log2_axes(ax, "ranks", "efficiency (samples/s / (p x 1-rank samples/s))", legend=6)
    ax.set_ylim(0, 1.15)
    ax.set_title("Training efficiency: model (lines; dotted = this machine) and measured points", fontsize=9)
    paths.append(save_png(fig, out_dir, "model-efficiency.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [1 << k for k in range(1, 11)]
    for i, (label, r) in enumerate(sorted(model["recovery"].items())):
        ax.plot([p for p, _ in r["points"]], [ms for _, ms in r["points"]], "o", color=f"C{i}",
                label=f"{label}: measured")
        ax.plot(xs, [recovery_ms(r, p) for p in xs], "-", color=f"C{i}",
                label=f"{label}: {r['r0_ms']:.1f} + {r['r1_ms_per_doubling']:.1f} log2(p) ms")
    log2_axes(ax, "ranks", "recovery after SIGKILL (ms)", logy=True, legend=6)
    ax.set_title("Recovery time: fits per machine and their prediction to 1,024 ranks", fontsize=9)
    paths.append(save_png(fig, out_dir, "model-recovery.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_p = {}
    for c in model["checks"]:
        if c["what"] == "allreduce":
            p, size = c["case"].split(" ranks, ")
            by_p.setdefault(int(p), []).append((int(size.split()[0]), c["measured"], c["predicted"]))
    for i, (p, rows) in enumerate(sorted(by_p.items())):
        rows.sort()
        ax.plot([r[0] for r in rows], [r[1] * 1e3 for r in rows], "o", color=f"C{i}", label=f"{p} ranks: measured")
        ax.plot([r[0] for r in rows], [r[2] * 1e3 for r in rows], "-", color=f"C{i}", label=f"{p} ranks: model")
    log2_axes(ax, "bytes", "allreduce time (ms)", logy=True)
    a = model["allreduce"]
    ax.set_title(f"Allreduce fit: {_ar_text(a)}", fontsize=8)
    paths.append(save_png(fig, out_dir, "model-allreduce.png"))
    return paths


def _ar_text(a):
    text = f"alpha {a['alpha_s'] * 1e6:.1f} us per doubling, B {a['bandwidth_Bps'] / 1e9:.2f} GB/s"
    if "oversubscribed" in a:
        o = a["oversubscribed"]
        text += (f"; more ranks than its {a['cores']} cores: alpha {o['alpha_s'] * 1e6:.0f} us, "
                 f"B {o['bandwidth_Bps'] / 1e9:.2f} GB/s")
    return text


def print_model(model):
    a = model["allreduce"]
    print(f"allreduce: {_ar_text(a)}")
    for m, cf in model["compute"].items():
        print(f"{m}: {cf['c_s_per_sample'] * 1e6:.1f} us per sample, {cf['h_s_per_step'] * 1e3:.2f} ms per step "
              f"on one core, {cf['thread_speedup']:.2f}x on {cf['speedup_threads']} threads, "
              f"{cf['params']:,} parameters")
    rows = [[c["what"], c["case"], f"{c['measured']:.4g}", f"{c['predicted']:.4g}", c["unit"],
             f"{100 * c['error']:+.0f}%"] for c in model["checks"]]
    print(table(rows, ["what", "case", "measured", "model", "unit", "model error"]))
    heads = ["ranks"] + sorted(model["efficiency_predicted"]) + ["recovery ms"]
    rows = [[p] + [f"{100 * model['efficiency_predicted'][k][p]:.0f}%" for k in heads[1:-1]]
            + [f"{model['recovery_predicted_ms'].get(p, float('nan')):.1f}"] for p in PREDICT]
    print(table(rows, heads))


def main(argv):
    p = argparse.ArgumentParser(prog="python -m bench model")
    p.parse_args(argv)
    out_dir = os.environ.get("MPIRT_BENCH_OUT", OUT_DIR)
    model = build(out_dir)
    print_model(model)
    for path in plot(model, out_dir):
        print("wrote", path)
    print("wrote", write_results("model", {k: v for k, v in model.items() if k != "measured_points"}))
    return 0
