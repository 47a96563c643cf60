"""Is it scale? The tiny and paper presets at the paper's batch of 256 on one GPU, on the toy songs
of docs/small-scale.md's learning curve, measured with the same columns as its CPU rows.

    python dev/is_it_scale.py --out runs/scale --minutes 2

The songs are made where it runs (`toy240`, seed 1, as the CPU rows). Per preset: 20 steps measure
its speed, then one run of as many steps as fit in --minutes, with a tenth of them of warmup, so
that the learning rate's cosine and the tau schedule span the run as the presets do; its
checkpoint is then measured by dev/learning_curve.py beside random weights (the first preset's),
DSP and chance. OUT gets toy240/, each run's folder (checkpoint.pt, log.csv) and scale.csv. Sized
for one device call of at most 10 minutes: the songs take 80 s on 2 CPU cores, the two runs
2 x --minutes, the speed probes and measurements the rest (an estimate: not yet run on a GPU).
"""
import argparse
import csv
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import stem_jepa as sj                                          # noqa: E402
import learning_curve                                           # noqa: E402  (dev/, beside it)


def steps_per_second(cfg, data, out):
    """The training speed of `cfg` over steps 11-20 (the first ten include the warm-up)."""
    sj.train(dataclasses.replace(cfg, log_every=10), data, out=out, stop_at=20,
             log=lambda *a: None)
    rows = list(csv.DictReader(open(Path(out) / "log.csv")))
    shutil.rmtree(out)
    return float(rows[-1]["samples_per_s"]) / cfg.batch_size


def main(out, minutes, presets, batch_size, tracks):
    out = Path(out)
    data = out / "toy240"
    if not (data / "test").is_dir():
        sj.write_toy_dataset(data, tracks=tracks, seconds=20, seed=1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoints = []
    for preset in presets:
        cfg = sj.make_config(preset, batch_size=batch_size)
        rate = steps_per_second(cfg, data, out / f"{preset}-speed")
        steps = max(20, int(minutes * 60 * rate))
        cfg = sj.make_config(preset, batch_size=batch_size, steps=steps,
                             warmup_steps=max(1, steps // 10), log_every=max(1, steps // 50),
                             ckpt_every=steps)
        print(f"{preset}: {rate:.2f} steps/s on {device}: {steps} steps of batch {batch_size} "
              f"({steps * batch_size} examples)", flush=True)
        t0 = time.time()
        sj.train(cfg, data, out=out / f"{preset}-{batch_size}", log=lambda *a: None)
        print(f"{preset}: trained in {time.time() - t0:.0f} s", flush=True)
        checkpoints.append(out / f"{preset}-{batch_size}" / "checkpoint.pt")
    learning_curve.measure(checkpoints, [data], out / "scale.csv", baselines=True, device=device)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/scale")
    p.add_argument("--minutes", type=float, default=2.0, help="training time per preset")
    p.add_argument("--presets", nargs="+", default=["tiny", "paper"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--tracks", type=int, default=240, help="toy songs (a fifth go to test/)")
    a = p.parse_args()
    main(a.out, a.minutes, a.presets, a.batch_size, a.tracks)
