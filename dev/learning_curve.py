"""The learning curve of docs/small-scale.md: checkpoints of one run, evaluated on held-out songs.

For each checkpoint and each data set: "which song?" (raw and centred, normalised rank counted
from 0, as the README's table), the query cosine, "which instrument?" R@1, Table 1's R@1 and mean
normalised rank, and the share of songs whose Eq. 3 curve peaks at j = 0. Random weights and the
DSP baseline are measured once per data set. Rows go to a CSV; the figure plots which-song against
the training examples seen (steps x batch), with the paper's 300k x 256 marked.

    python dev/learning_curve.py --data toy240 --data chorales260 --baselines \
        --checkpoints models/stem-jepa-tiny-toy.pt runs/tiny-toy-seed1/checkpoint.pt \
        runs/tiny-toy-12k/keep/step-*.pt
    python dev/learning_curve.py --plot docs/learning-curve.csv --figure docs/learning-curve.png
    python dev/learning_curve.py --data toy240 --paired models/stem-jepa-tiny-toy.pt \
        runs/tiny-toy-12k/keep/step-12000.pt
"""
import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import stem_jepa as sj                                          # noqa: E402
from extras.search import shift_similarity                      # noqa: E402

PAPER_EXAMPLES = 300_000 * 256                                  # 3.3: 300k steps of batch 256
# The 6000-step run that made the shipped model (docs/small-scale.md's table): which song on
# toy240/test at its checkpoints, which were not kept; its last point is re-measured here.
EARLIER_RUN = {"steps": [1000, 2000, 4000, 6000], "batch": 32,
               "which_song": [46.9, 46.0, 44.5, 43.9], "which_song_centred": [42.2, 40.9, 34.6, 33.7]}


def peaks_at_zero(model, tracks, max_shift_s=10.0, device="cpu"):
    """The share of songs whose Eq. 3 curve (the mean over its stems) is highest at j = 0."""
    patch_s = model.config.hop_length * model.config.patch_size / model.config.sample_rate
    shortest = min(-(-t["length"] // round(patch_s * model.config.sample_rate)) for t in tracks)
    J = min(round(max_shift_s / patch_s), (shortest - 1) // 2)
    peaks = 0
    for t in tracks:
        x = np.load(t["npy"]).astype(np.float32)
        known = [i for i, s in enumerate(t["stems"]) if s in model.instruments]   # as retrieval
        ids = [model.instruments.index(t["stems"][i]) for i in known]
        q = sj.embed_long(model, [x.sum(0) - x[i] for i in known], instruments=ids, device=device)
        z = sj.embed_long(model, [x[i] for i in known], device=device)
        curve = torch.stack([shift_similarity(sj.frames(a), sj.frames(b), range(-J, J + 1))
                             for a, b in zip(z, q)]).mean(0)
        peaks += int(curve.argmax()) == J
    return 100 * peaks / len(tracks)


FIELDS = ["data", "songs", "model", "step", "examples", "which_song", "which_song_centred",
          "query_cosine", "which_instrument_R1", "R1", "nrank_mean", "eq3_peak_share"]


def columns(emb, eq3=None) -> dict:
    truth = torch.arange(len(emb.queries))
    table1 = sj.retrieval_metrics(emb.queries, emb.refs_target, truth)
    parts = sj.which_song_and_instrument(emb.queries, emb.refs_target, emb.track, emb.instrument)
    return {"which_song": parts["which_song"]["nrank0_mean"],
            "which_song_centred": parts["which_song_centred"]["nrank0_mean"],
            "query_cosine": parts["query_cosine"],
            "which_instrument_R1": parts["which_instrument"]["R@1"],
            "R1": table1["R@1"], "nrank_mean": table1["nrank_mean"], "eq3_peak_share": eq3}


def measure(checkpoints, datasets, out_csv, baselines=False, device="cpu"):
    """Rows appended to out_csv as they are measured: the checkpoints, and with `baselines` the
    random-weights, DSP and chance rows (built with the first checkpoint's config)."""
    def write(row):
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        new = not Path(out_csv).exists()
        with open(out_csv, "a", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            if new:
                w.writeheader()
            w.writerow(row)
    for data in datasets:
        first = sj.StemJEPA.from_checkpoint(checkpoints[0])
        tracks = sj.prepare(data, "test", training=False, log=lambda *a: None,
                            **sj.prepare_options(first.config))
        torch.manual_seed(0)
        untrained = sj.build_model(first.config, first.instruments).eval()
        chance = sj.chance_metrics(len(tracks))["nrank0_mean"]
        base = {"data": Path(data).name, "songs": len(tracks), "step": 0, "examples": 0}
        if baselines:
            write({**base, "model": "random weights", **columns(
                sj.retrieval_embeddings(untrained, tracks, device=device, log=lambda *a: None),
                peaks_at_zero(untrained, tracks, device=device))})
            dsp = sj.dsp_embeddings(tracks, first.instruments, first.config.sample_rate)
            write({**base, "model": "DSP (chroma + tempo)", **columns(dsp)})
            write({**base, "model": "chance", "which_song": chance, "which_song_centred": chance})
        for path in checkpoints:
            model = sj.StemJEPA.from_checkpoint(path)
            step = int(torch.load(path, map_location="cpu", weights_only=True)["step"])
            emb = sj.retrieval_embeddings(model, tracks, device=device, log=lambda *a: None)
            write({**base, "model": str(path), "step": step,
                   "examples": step * model.config.batch_size,
                   **columns(emb, peaks_at_zero(model, tracks, device=device))})


def per_query(emb) -> dict:
    """`columns`' which-song (raw, centred), which-instrument R@1 and Table 1's nrank, query by
    query (their means are `columns`' values)."""
    same_inst = emb.instrument[:, None] == emb.instrument[None]
    same_song = emb.track[:, None] == emb.track[None]
    centred = [sj.centre_per_instrument(x, emb.instrument) for x in (emb.queries, emb.refs_target)]
    out = {"which_song": [], "which_song_centred": [], "which_instrument_R1": [], "nrank_mean": []}
    for i in range(len(emb.queries)):
        def m(q, r, candidates=None):
            return sj.retrieval_metrics(q[i:i + 1], r, torch.tensor([i]), (1,), candidates)
        out["which_song"].append(m(emb.queries, emb.refs_target, same_inst[i:i + 1])["nrank0_mean"])
        out["which_song_centred"].append(m(*centred, same_inst[i:i + 1])["nrank0_mean"])
        out["which_instrument_R1"].append(m(emb.queries, emb.refs_target, same_song[i:i + 1])["R@1"])
        out["nrank_mean"].append(m(emb.queries, emb.refs_target)["nrank_mean"])
    return {k: np.array(v) for k, v in out.items()}


def paired(a, b, data, n_draws=4000):
    """Checkpoint b minus checkpoint a on data's test songs, per column, with a 95 % interval from
    a bootstrap over songs (both models see the same draws)."""
    models = [sj.StemJEPA.from_checkpoint(p) for p in (a, b)]
    tracks = sj.prepare(data, "test", training=False, log=lambda *_: None,
                        **sj.prepare_options(models[0].config))
    embs = [sj.retrieval_embeddings(m, tracks, log=lambda *_: None) for m in models]
    (pa, pb), track = [per_query(e) for e in embs], embs[0].track.numpy()
    songs = [np.flatnonzero(track == n) for n in np.unique(track)]
    rng = np.random.default_rng(0)
    draws = [np.concatenate([songs[j] for j in rng.integers(0, len(songs), len(songs))])
             for _ in range(n_draws)]
    for k in pa:
        d = pb[k] - pa[k]
        lo, hi = np.percentile([d[pick].mean() for pick in draws], [2.5, 97.5])
        print(f"{k:20s} {pa[k].mean():6.2f} -> {pb[k].mean():6.2f}: {d.mean():+.2f} [{lo:+.2f}, {hi:+.2f}]")


def plot(in_csv, figure, run_name, data="toy240"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in csv.DictReader(open(in_csv)) if r["data"] == data]
    run = sorted((r for r in rows if run_name in r["model"]), key=lambda r: int(r["step"]))
    level = {r["model"]: r for r in rows if int(r["step"]) == 0}
    x = np.array([int(r["examples"]) for r in run])
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for key, colour, name in (("which_song", "C0", "raw"), ("which_song_centred", "C1", "centred")):
        y = np.array([float(r[key]) for r in run])
        ax.plot(x, y, "o-", color=colour, label=f"{name}, this run")
        ax.plot(np.array(EARLIER_RUN["steps"]) * EARLIER_RUN["batch"], EARLIER_RUN[key], "s", mfc="none",
                color=colour, label=f"{name}, the 6000-step run")
        for r in rows:                                  # other seeds of the 6000-step run
            if "seed" in r["model"]:
                ax.plot(int(r["examples"]), float(r[key]), "^", mfc="none", color=colour,
                        label=f"{name}, the 6000-step run, another seed")
        for model, ls in (("random weights", ":"), ("DSP (chroma + tempo)", "--")):
            ax.axhline(float(level[model][key]), color=colour, ls=ls, lw=0.8, label=f"{name}, {model}")
        slope, icpt = np.polyfit(np.log2(x), y, 1)          # a line in log2(examples)
        far = np.geomspace(x[0], PAPER_EXAMPLES, 50)
        ax.plot(far, np.clip(icpt + slope * np.log2(far), 0, None), color=colour, lw=0.8, alpha=0.6,
                label=f"{name}, this run's fit, extended")
        dsp = float(level["DSP (chroma + tempo)"][key])
        print(f"{name}: {slope:+.2f} points per doubling of the examples seen; 40 at "
              f"{2 ** ((40 - icpt) / slope):.3g} examples, the DSP row ({dsp:.1f}) at "
              f"{2 ** ((dsp - icpt) / slope):.3g}")
    ax.axhline(float(level["chance"]["which_song"]), color="black", lw=0.8, label="chance")
    ax.axvline(PAPER_EXAMPLES, color="grey", lw=1)
    ax.text(PAPER_EXAMPLES, 1, "the paper's 77 M ", fontsize=7, ha="right", va="bottom")
    ax.set(xscale="log", ylim=(0, 52), xlabel="training examples seen (steps x batch)",
           ylabel="which song? nrank (%, from 0)",
           title=f"which song? on the {rows[0]['songs']} songs of {data}/test")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(figure, dpi=80)
    print(f"wrote {figure}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", action="append", default=[], help="a data set with a test/ split")
    p.add_argument("--checkpoints", nargs="*", default=[])
    p.add_argument("--baselines", action="store_true", help="also random weights, DSP, chance")
    p.add_argument("--csv", default="docs/learning-curve.csv")
    p.add_argument("--device", default="cpu", help="where the models embed: cpu or cuda")
    p.add_argument("--plot", help="a CSV this script wrote: draw its figure instead")
    p.add_argument("--paired", nargs=2, metavar=("A", "B"),
                   help="two checkpoints: B - A per column on --data, with bootstrap intervals")
    p.add_argument("--figure", default="docs/learning-curve.png")
    p.add_argument("--run", default="tiny-toy-12k", help="the run's checkpoints: paths containing it")
    a = p.parse_args()
    if a.plot:
        plot(a.plot, a.figure, a.run)
    elif a.paired:
        paired(*a.paired, a.data[0])
    else:
        measure(a.checkpoints, a.data, a.csv, a.baselines, a.device)
