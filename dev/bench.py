"""The benchmark of the README's "Performance" table: how close the training step of 3.3 (front-end
to EMA update) comes to the machine's peak, beside the same step built the obvious way; how fast
evaluation (4.1) embeds audio; whether one loader worker (3.2) keeps up with the step.

    python dev/bench.py --preset paper --batch-size 2 --baseline
    python dev/bench.py --preset tiny --batch-size 32 --baseline
    python dev/bench.py [--preset paper|tiny] [--batch-size 2] [--steps 5] [--compile]
                        [--baseline] [--device cuda] [--data DIR] [--json FILE] [--CONFIG-FIELD V]

--steps is the number of timed steps (after warm-up); the other Config fields (--dim, --predictor,
...) change the model as in `stem_jepa.py train`. The precision is training's: bf16 autocast on
CUDA where native, fp16 with a GradScaler on older CUDA GPUs, fp32 elsewhere; MFU divides by the
peak matmul throughput of that precision.
"""
import argparse
import copy
import dataclasses
import functools
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchaudio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import stem_jepa as sj  # noqa: E402

PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def timed(fn, device) -> float:
    """Wall time of one fn() call, from a synchronised device until its work is done."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def median_time(fn, device, *, warmup: int, repeats: int) -> float:
    """Median wall time of fn() after warm-up calls (compilation, allocator and cache warm-up)."""
    for _ in range(warmup):
        fn()
    return float(np.median([timed(fn, device) for _ in range(repeats)]))


def matmul_peak(device: torch.device, dtype=torch.float32) -> float:
    """Practical peak FLOP/s: the best of several large square torch.mm (2 n^3 FLOPs each)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)                              # warm-up
    return 2 * n ** 3 / min(timed(lambda: torch.mm(a, b), device) for _ in range(8))


def train_flops_per_sample(cfg: sj.Config) -> float:
    """FLOPs of one training sample, counted from the shapes: a matmul (n x k)(k x m) is 2nkm;
    backward costs twice the forward. Context encoder and predictor: forward + backward (3x);
    target encoder: forward only (1x). Front-end, norms and softmax are left out (< 1 %)."""
    T = sj.chunk_samples(cfg) // cfg.hop_length // cfg.patch_size     # time patches
    K = (cfg.n_mels // cfg.patch_size) * T                              # tokens
    D = cfg.dim
    block = 2 * K * (4 + 2 * cfg.mlp_ratio) * D * D + 4 * K * K * D   # linears; QK^T and AV
    encoder = cfg.depth * block + 2 * K * cfg.patch_size ** 2 * D
    if cfg.predictor == "transformer":
        W = cfg.pred_tf_dim
        tf_block = 2 * (K + 1) * (4 + 2 * cfg.mlp_ratio) * W * W + 4 * (K + 1) ** 2 * W
        predictor = cfg.pred_tf_depth * tf_block + 2 * 2 * K * D * W
    else:
        first = 2 * D if cfg.predictor == "mlp" else D
        widths = [first] + [cfg.pred_hidden] * (cfg.pred_layers - 1) + [D]
        predictor = 2 * K * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    return 3 * (encoder + predictor) + encoder


def obvious_step(cfg: sj.Config, device, context, target, instrument):
    """--baseline's yardstick, the same step built the obvious way (a no-argument function), in
    fp32: nn.TransformerEncoder, learned positions, EMA by mul_, add_, the mel transform rebuilt
    and .item() at each step."""
    D = cfg.dim
    frames = sj.chunk_samples(cfg) // cfg.hop_length
    tokens = (cfg.n_mels // cfg.patch_size) * (frames // cfg.patch_size)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(1, D, cfg.patch_size, cfg.patch_size)
            self.pos = nn.Parameter(torch.zeros(1, tokens, D))
            layer = nn.TransformerEncoderLayer(D, cfg.heads, cfg.mlp_ratio * D, dropout=0.0,
                                               activation="gelu", batch_first=True, norm_first=True)
            self.body = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(D)

        def forward(self, mel):
            x = self.patch(mel[:, None]).flatten(2).transpose(1, 2)              # (B, K, D)
            return self.norm(self.body(x + self.pos))

    online = Encoder().to(device)
    target_net = copy.deepcopy(online).requires_grad_(False)
    embedding = nn.Embedding(len(sj.TOY_STEMS), D).to(device)
    layers = [nn.Linear(2 * D, cfg.pred_hidden), nn.ReLU()]
    for _ in range(cfg.pred_layers - 2):
        layers += [nn.Linear(cfg.pred_hidden, cfg.pred_hidden), nn.ReLU()]
    predictor = nn.Sequential(*layers, nn.Linear(cfg.pred_hidden, D), nn.LayerNorm(D)).to(device)
    params = [*online.parameters(), *embedding.parameters(), *predictor.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        mel = torchaudio.transforms.MelSpectrogram(
            cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, f_min=cfg.f_min,
            f_max=cfg.f_max, n_mels=cfg.n_mels, norm="slaney", mel_scale="slaney").to(device)
        logmel = lambda w: (torch.log(mel(w)[..., :frames] + 1e-7) + 9.453) / 3.569   # noqa: E731
        z = online(logmel(context))
        e = embedding(instrument)[:, None].expand(-1, z.shape[1], -1)
        pred = predictor(torch.cat([z, e], dim=-1))
        with torch.no_grad():
            t = target_net(logmel(target))
        loss = sj.jepa_loss(pred, t)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():
            for p_t, p_o in zip(target_net.parameters(), online.parameters()):
                p_t.mul_(0.999).add_(p_o, alpha=0.001)
        return loss.item()
    return step


def bench(*, preset="paper", batch_size=2, device=None, compile=False, steps=5, data=None,
          baseline=False, **overrides) -> dict:
    """Peak matmul FLOP/s, the training step (samples/s, FLOP/s, MFU), one loader worker (chunks/s,
    warm cache), evaluation speed, peak memory. overrides: Config fields (`make_config`)."""
    device = sj.pick_device(device)
    amp_dtype = sj.autocast_dtype(device)
    precision = PRECISION_NAMES[amp_dtype]
    cfg = sj.make_config(preset, batch_size=batch_size, **overrides)
    cpu = f"{device.type}, {torch.get_num_threads()} threads"
    r = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
         "preset": preset, "batch_size": batch_size, "precision": precision, "compile": compile}
    r["peak_fp32_flops"] = matmul_peak(device)
    if amp_dtype is not None:
        r[f"peak_{precision}_flops"] = matmul_peak(device, amp_dtype)

    # the training step, front-end to EMA update, on random waveforms
    torch.manual_seed(0)
    model = sj.build_model(cfg, list(sj.TOY_STEMS)).to(device)
    groups = sj.param_groups(model, cfg.weight_decay, decay_all=cfg.weight_decay_all)
    optimizer = torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2),
                                  fused=device.type in ("cuda", "cpu"))
    loss_fn = torch.compile(model) if compile else model
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    n = sj.chunk_samples(cfg)
    context, target = (0.1 * torch.randn(batch_size, n, device=device) for _ in range(2))
    instrument = torch.arange(batch_size, device=device) % len(sj.TOY_STEMS)
    step = functools.partial(sj.training_step, model, optimizer, context, target, instrument,
                             lr=1e-4, tau=0.999, grad_clip=cfg.grad_clip, loss_fn=loss_fn,
                             amp_dtype=amp_dtype, scaler=scaler)
    r["step_s"] = median_time(step, device, warmup=3 if compile else 2, repeats=steps)
    r["samples_per_s"] = batch_size / r["step_s"]
    r["flops_per_sample"] = train_flops_per_sample(cfg)
    r["achieved_flops"] = r["flops_per_sample"] * r["samples_per_s"]
    r["mfu"] = r["achieved_flops"] / r[f"peak_{precision}_flops"]
    if baseline:
        del optimizer, step                     # free its state before the baseline's
        step = obvious_step(cfg, device, context, target, instrument)
        r["baseline_samples_per_s"] = batch_size / median_time(step, device, warmup=2,
                                                               repeats=steps)

    # evaluation: seconds of audio embedded per second by the target encoder
    audio = np.random.default_rng(0).normal(0, 0.1, 4 * 60 * cfg.sample_rate).astype(np.float32)
    seconds = timed(lambda: sj.embed_long(model, [audio], batch=16, device=device), device)
    r["eval_audio_s_per_s"] = len(audio) / cfg.sample_rate / seconds

    # the data pipeline: one loader worker, from a warm cache
    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            data = sj.write_toy_dataset(Path(tmp) / "toy", tracks=10, seconds=30.0)
        tracks = sj.prepare(data, "train", cache=Path(tmp) / "cache", log=lambda *a: None,
                            **sj.prepare_options(cfg))
        dataset = sj.StemChunks(tracks, sorted({s for t in tracks for s in t["stems"]}), chunk=n,
                                threshold=cfg.active_threshold, tries=cfg.redraw_tries, seed=0)
        batches, per_batch = 40, 32
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sj.step_batches(start=0, steps=batches, batch=per_batch),
            num_workers=1, prefetch_factor=4)
        it = iter(loader)
        next(it)                                                        # worker start-up excluded
        t = time.perf_counter()
        for _ in it:
            pass
        r["loader_chunks_per_s"] = (batches - 1) * per_batch / (time.perf_counter() - t)
    r["loader_to_step_ratio"] = r["loader_chunks_per_s"] / r["samples_per_s"]
    r["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    if device.type == "cuda":
        r["peak_gpu_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return r


def format_bench(r: dict) -> str:
    g = 1e9
    compiled = ", compiled" if r["compile"] else ""
    rows = [("device", r["device"]),
            ("preset, batch, precision",
             f"{r['preset']}, {r['batch_size']}, {r['precision']}{compiled}")]
    for kind in ("fp32", "bf16", "fp16"):
        if f"peak_{kind}_flops" in r:
            rows.append((f"peak {kind} matmul", f"{r[f'peak_{kind}_flops'] / g:.0f} GFLOP/s"))
    rows += [("training step", f"{r['step_s'] * 1000:.0f} ms, {r['samples_per_s']:.2f} samples/s"),
             ("FLOPs per sample",
              f"{r['flops_per_sample'] / g:.1f} GFLOP (counted from the shapes)"),
             ("achieved",
              f"{r['achieved_flops'] / g:.0f} GFLOP/s, MFU {100 * r['mfu']:.0f} % of peak"),
             ("evaluation", f"{r['eval_audio_s_per_s']:.0f} s of audio per s")]
    if "baseline_samples_per_s" in r:
        rows.append(("obvious baseline step", f"{r['baseline_samples_per_s']:.2f} samples/s: ours "
                     f"is {r['samples_per_s'] / r['baseline_samples_per_s']:.2f}x"))
    rows += [("data loader (1 worker)", f"{r['loader_chunks_per_s']:.0f} chunks/s, "
              f"{r['loader_to_step_ratio']:.0f}x what the step consumes"),
             ("peak memory (process)", f"{r['peak_rss_gb']:.2f} GB")]
    if "peak_gpu_allocated_gb" in r:
        rows.append(("peak GPU memory", f"{r['peak_gpu_allocated_gb']:.2f} GB"))
    return "\n".join(f"{k:24s} {v}" for k, v in rows)


def main(argv=None):
    # Every Config field is an option (sj.add_config_options); "resolve" lets bench's own
    # --batch-size and --steps (the timed steps) replace the Config's.
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     conflict_handler="resolve")
    sj.add_config_options(parser)
    parser.add_argument("--batch-size", type=int, default=2, help="samples per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after warm-up)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the step")
    parser.add_argument("--baseline", action="store_true", help="also time the obvious step")
    parser.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: the best there is)")
    parser.add_argument("--data", help="dataset for the loader measurement (default: 10 toy songs)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(sj.Config)
                 if f.name not in ("steps", "batch_size")}
    try:
        r = bench(preset=args.preset, batch_size=args.batch_size, device=args.device,
                  compile=args.compile, steps=args.steps, data=args.data,
                  baseline=args.baseline, **overrides)
    except sj.StemJEPAError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_bench(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
