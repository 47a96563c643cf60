"""Tests of stem_jepa.py in the module's order, then of the side files in extras/ and dev/. Each
test states its property and checks it against an independent computation, an invariant, or a
measured effect of training, on a CPU. Subprocess training, torchrun, the notebook, and anything
over ~3 s are marked slow.

    python -m pytest -q test_stem_jepa.py                   # everything
    python -m pytest -q -m "not slow" test_stem_jepa.py     # the fast loop, under a minute
"""
from __future__ import annotations

import argparse
import ast
import builtins
import copy
import csv
import dataclasses
import fcntl
import importlib.util
import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn as nn
import torch.nn.functional as F

import stem_jepa as sj

torch.set_num_threads(1)    # a second thread that waits for a busy core makes steps 10x slower
HERE = Path(__file__).resolve().parent
SR = 16000
TOY_STEMS = ["bass", "drums", "other", "vocals"]
MUSDB_FREQS = {"bass": 110.0, "drums": 330.0, "other": 770.0, "vocals": 1500.0}
LOG_COLUMNS = ["step", "loss", "lr", "tau", "samples_per_s", "batch_loss", "avg_stem_loss",
               "pred_spread", "target_spread", "skipped"]
TINY_RUN = ["--preset", "tiny", "--batch-size", "4", "--workers", "0"]

def quiet(*args, **kwargs):
    """log=quiet: no output."""

def tiny(**overrides) -> sj.Config:
    """The tiny preset with 2 s chunks (5 x 12 patches): the same code path, faster."""
    return sj.make_config("tiny", **{"chunk_seconds": 2.0, **overrides})

def mini(**overrides) -> sj.Config:
    """A minimal model (ViT width 32, 1 block), 2 s chunks: for the plumbing, not the learning."""
    return sj.make_config("tiny", **{"dim": 32, "depth": 1, "heads": 2, "pred_hidden": 64,
                                     "pred_layers": 2, "chunk_seconds": 2.0, **overrides})

def sine(freq: float, seconds: float, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)

def noise(seconds: float, seed: int, amp: float = 0.2) -> np.ndarray:
    return (amp * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)

def write_track(folder: Path, stems: dict, sr: int = SR, ext: str = "wav") -> Path:
    """One multitrack folder: {name: waveform (N,) or (N, C)} -> folder/name.ext."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, x in stems.items():
        sf.write(folder / f"{name}.{ext}", x, sr)
    return folder

def good_track(folder: Path, seconds: float = 5.0) -> Path:
    return write_track(folder, {s: sine(f, seconds) for s, f in MUSDB_FREQS.items()})

def dominant_freq(x: np.ndarray, sr: int = SR) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(np.asarray(x, dtype=np.float64)))) * sr / len(x))

def read_log(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))

def start_cli(*args) -> subprocess.Popen:
    """`python stem_jepa.py ARGS` in a subprocess, as a user runs it, stderr into stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(HERE / "stem_jepa.py"), *map(str, args)],
                            cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)

def run_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    """`python stem_jepa.py ARGS`, to its end; stdout holds stderr too."""
    proc = start_cli(*args)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")

def run_main(main, argv, capsys) -> tuple[int, str, str]:
    """A command line's main(argv) in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return (code, *capsys.readouterr())

def wait_for_line(proc, needle, timeout=120) -> str:
    """Read the process's output until a line containing `needle`; returns everything read."""
    seen, t0 = [], time.time()
    while time.time() - t0 < timeout and (line := proc.stdout.readline()):
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"never saw {needle!r}:\n{''.join(seen)}")

def write_checkpoint(path: Path, cfg: sj.Config, instruments, *, seed=0) -> Path:
    """A checkpoint as `train` writes it (less the optimizer) of a random model whose target
    encoder differs from its context encoder (as after training)."""
    torch.manual_seed(seed)
    model = sj.build_model(cfg, list(instruments))
    with torch.no_grad():
        for p in model.target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": dataclasses.asdict(cfg), "instruments": list(instruments), "step": 0,
                "model": model.state_dict()}, path)
    return path

@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """10 toy songs of 20 s: 8 in train/, 2 in test/."""
    return sj.write_toy_dataset(tmp_path_factory.mktemp("toy"), tracks=10, seconds=20.0, seed=0)

@pytest.fixture(scope="session")
def trained_run(toy_data, tmp_path_factory):
    """One tiny model trained for 150 steps of batch 8 on the toy songs: (model, run folder)."""
    out = tmp_path_factory.mktemp("trained")
    model, stopped = sj.train(tiny(steps=150, batch_size=8, log_every=10), toy_data, out=out,
                              workers=0, log=quiet)
    assert stopped is None
    return model, out

@pytest.fixture(scope="module")
def mini_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("mini") / "checkpoint.pt", mini(), TOY_STEMS)


# =============================================================================================
# PART ONE: the method and its measure
# =============================================================================================

def slaney_mel_filterbank(*, sr, n_fft, n_mels, f_min, f_max) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangles equally spaced on the Slaney mel scale (linear below
    1 kHz, logarithmic above), each of unit area (2 / bandwidth), from the definition (Slaney's
    Auditory Toolbox, as in librosa)."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    def hz_to_mel(f):
        return f / f_sp if f < min_log_hz else min_log_mel + math.log(f / min_log_hz) / logstep
    def mel_to_hz(m):
        return m * f_sp if m < min_log_mel else min_log_hz * math.exp(logstep * (m - min_log_mel))
    edges = [mel_to_hz(m) for m in np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)]
    fb = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(n_mels):
        lo, mid, hi = edges[m: m + 3]
        for k, f in enumerate(np.linspace(0, sr / 2, n_fft // 2 + 1)):      # FFT bin centres
            fb[m, k] = max(0.0, min((f - lo) / (mid - lo), (hi - f) / (hi - mid))) * 2 / (hi - lo)
    return fb

def test_logmel_matches_an_independent_stft_and_slaney_filterbank():
    """LogMel = (log(SlaneyMel(|STFT|^2) + eps32) + 9.453) / 3.569, STFT n_fft 400, hop 160,
    periodic Hann, centred, reflect padding; 8 s give 801 frames, the last dropped: (80, 800)."""
    wav = torch.from_numpy(np.stack([noise(8.0, 0, amp=0.1) + sine(440, 8.0),
                                     noise(8.0, 1, amp=0.1) + sine(3000, 8.0, amp=0.3)]))
    got = sj.LogMel()(wav)
    assert got.shape == (2, 80, 800)
    spec = torch.stft(wav.double(), n_fft=400, hop_length=160, win_length=400,
                      window=torch.hann_window(400, periodic=True, dtype=torch.float64),
                      center=True, pad_mode="reflect", return_complex=True).abs() ** 2
    assert spec.shape[-1] == 801
    fb = torch.tensor(slaney_mel_filterbank(sr=SR, n_fft=400, n_mels=80, f_min=50.0, f_max=8000.0))
    mel = torch.einsum("mf,bfl->bml", fb, spec)[..., :800]
    want = (torch.log(mel + float(np.finfo(np.float32).eps)) + 9.453) / 3.569
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-4)

def test_vit_tokens_are_frequency_major():
    """Token k of the (F, T) patch grid is k = f * T + t (f = 0 the lowest 16 mel bins), its
    position code is pos[f, t], and the output grid (B, F, T, D) puts it back at (f, t); a
    time-major order (k = t * F + f) would put the lone patch at another token."""
    recorded, vit = {}, sj.ViT(n_mels=80, max_frames=160, dim=8, depth=1, heads=1)  # F 5, T 10
    vit.blocks = nn.ModuleList([nn.Identity()])                         # the tokens as they come
    vit.blocks[0].register_forward_hook(lambda m, i, o: recorded.update(x=o.detach().clone()))
    vit(torch.zeros(1, 80, 160))          # positions alone (zero patch-embedding bias)
    torch.testing.assert_close(recorded["x"][0], vit.pos.reshape(50, 8), rtol=0, atol=0)
    for f, t in [(0, 0), (1, 3), (4, 9), (3, 2)]:
        assert torch.equal(recorded["x"][0, f * 10 + t], vit.pos[f, t])
    with torch.no_grad():
        vit.pos.zero_()
    mel = torch.zeros(1, 80, 160)
    mel[0, 16:32, 48:64] = 1.0                                          # the patch (1, 3)
    out = vit(mel)
    assert recorded["x"][0].abs().sum(-1).nonzero().flatten().tolist() == [13]   # not 3 * 5 + 1
    assert out.shape == (1, 5, 10, 8) and out[0].abs().sum(-1).nonzero().tolist() == [[1, 3]]

def test_sincos_2d_codes_time_in_the_first_half_and_frequency_in_the_second():
    """sincos_2d(F, T, D) (F, T, D): dims [0, D/2) are sincos_1d(t, D/2), the same for every f;
    dims [D/2, D) sincos_1d(f, D/2), the same for every t; sincos_1d is sin(p w_i) then cos(p w_i),
    w_i = 10000^(-i / (D/4)). The ViT keeps them as a buffer, not a trained parameter."""
    Fp, T, D = 5, 50, 64
    pos = sj.sincos_2d(Fp, T, D)
    assert pos.shape == (Fp, T, D)
    time_half, freq_half = pos[..., : D // 2], pos[..., D // 2:]
    assert torch.equal(time_half, time_half[:1].expand(Fp, -1, -1))
    assert torch.equal(freq_half, freq_half[:, :1].expand(-1, T, -1))
    assert torch.equal(time_half[0], sj.sincos_1d(torch.arange(T), D // 2))
    assert torch.equal(freq_half[:, 0], sj.sincos_1d(torch.arange(Fp), D // 2))
    assert not torch.equal(freq_half[0], freq_half[1])
    q = D // 4
    naive = torch.tensor([[math.sin(p * 10000 ** (-i / q)) for i in range(q)]
                          + [math.cos(p * 10000 ** (-i / q)) for i in range(q)] for p in range(T)])
    torch.testing.assert_close(sj.sincos_1d(torch.arange(T), D // 2), naive.float(), rtol=0,
                               atol=1e-6)
    vit = sj.ViT(n_mels=80, max_frames=160, dim=16, depth=1, heads=2)
    assert "pos" in dict(vit.named_buffers()) and torch.equal(vit.pos, sj.sincos_2d(5, 10, 16))
    assert all(p.data_ptr() != vit.pos.data_ptr() for p in vit.parameters())

@pytest.mark.slow
@torch.no_grad()
def test_paper_encoder_is_vit_base_with_85253376_parameters():
    """The paper preset's context encoder is ViT-B/16 without CLS token or learned positions:
    85,253,376 trainable parameters, and a frozen target copy of the same size. 8 s give
    (B, 5, 50, 768) embeddings; 3 s the first 18 time positions."""
    paper_model = sj.build_model(sj.make_config("paper"), TOY_STEMS)
    encoder, target = paper_model.encoder, paper_model.target_encoder
    assert sum(p.numel() for p in encoder.parameters() if p.requires_grad) == 85_253_376
    assert sum(p.numel() for p in target.parameters()) == 85_253_376
    assert not any(p.requires_grad for p in target.parameters())
    wav = torch.from_numpy(noise(8.0, seed=0, amp=0.1))[None]
    assert paper_model.encode(wav).shape == (1, 5, 50, 768)
    assert paper_model.encode(wav[:, :48000], target=True).shape == (1, 5, 18, 768)

@pytest.mark.parametrize("kind", ["mlp", "mlp-nocond", "transformer"])
@torch.no_grad()
def test_predictor_shapes_conditioning_and_patch_independence(kind):
    """Each predictor maps (B, F, T, D) to (B, F, T, D); "mlp" and "transformer" depend on the
    instrument id, through an embedding initialised N(0, 1) as in the authors' code (not ViT's
    std 0.02), "mlp-nocond" (Table 1's ablation) does not; the MLPs act on each patch alone
    (3.1): permuting the patches permutes the predictions."""
    torch.manual_seed(0)
    if kind != "mlp-nocond":                                            # the paper's widths
        weight = (sj.MLPPredictor(dim=768, n_instruments=4) if kind == "mlp" else
                  sj.TransformerPredictor(dim=768, width=512, depth=1, heads=16)).instrument.weight
        assert weight.shape == (4, 768 if kind == "mlp" else 512)
        assert abs(weight.mean().item()) < 0.1 and 0.9 < weight.std().item() < 1.1
    predictor = sj.build_model(tiny(predictor=kind), TOY_STEMS).predictor
    z = torch.randn(2, 5, 12, 192)
    a, b = predictor(z, torch.tensor([0, 0])), predictor(z, torch.tensor([3, 3]))
    assert a.shape == (2, 5, 12, 192)
    assert predictor(z[:, :, :7], torch.tensor([0, 1])).shape == (2, 5, 7, 192)
    assert torch.equal(a, b) if kind == "mlp-nocond" else (a - b).abs().max() > 1e-4
    if kind != "transformer":
        perm = torch.randperm(12)
        torch.testing.assert_close(predictor(z[:, :, perm], torch.tensor([1, 2])),
                                   predictor(z, torch.tensor([1, 2]))[:, :, perm])

def naive_jepa_loss(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Eq. 1 with the authors' per-patch standardisation of the target, one vector at a time."""
    B, Fp, T, D = pred.shape
    total = 0.0
    for b, f, t in itertools.product(range(B), range(Fp), range(T)):
        p, x = [float(v) for v in pred[b, f, t]], [float(v) for v in target[b, f, t]]
        mean = sum(x) / D
        var = sum((v - mean) ** 2 for v in x) / (D - 1)
        x = [(v - mean) / math.sqrt(var + 1e-6) for v in x]
        norm_p, norm_x = math.sqrt(sum(v * v for v in p)), math.sqrt(sum(v * v for v in x))
        total += sum((a / norm_p - c / norm_x) ** 2 for a, c in zip(p, x))
    return total / (B * Fp * T)

def test_jepa_loss_is_eq1_with_standardised_targets():
    """jepa_loss = mean over patches of || p/|p| - t'/|t'| ||^2, t' = (t - mean) / sqrt(var +
    1e-6) (unbiased), as computed by loops; so it ignores the target's per-patch offset and scale
    and the prediction's positive scale: 0 for any positive multiple of t - mean(t), not for the
    raw t, and the maximum 4 for -(t - mean(t))."""
    torch.manual_seed(0)
    pred, target = torch.randn(2, 2, 3, 16), 3.0 * torch.randn(2, 2, 3, 16) + 1.5
    assert sj.jepa_loss(pred, target).item() == pytest.approx(naive_jepa_loss(pred, target),
                                                              rel=1e-5)
    target = torch.randn(2, 5, 4, 32) + 2.0
    centred = target - target.mean(-1, keepdim=True)
    assert sj.jepa_loss(0.1 * centred, target).item() == pytest.approx(0.0, abs=1e-6)
    assert sj.jepa_loss(7.0 * centred, 5.0 * target - 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert sj.jepa_loss(target, target).item() > 0.05
    assert sj.jepa_loss(-centred, target).item() == pytest.approx(4.0, abs=1e-5)

def naive_pool(z: torch.Tensor) -> np.ndarray:
    """pool one number at a time: the time-average of each frequency row, the rows one after the
    other, minus their mean, over sqrt(population variance + 1e-5), over its norm."""
    n_freq, n_time, dim = z.shape
    v = [sum(float(z[f, t, d]) for t in range(n_time)) / n_time
         for f in range(n_freq) for d in range(dim)]
    mean = sum(v) / len(v)
    y = [(a - mean) / math.sqrt(sum((a - mean) ** 2 for a in v) / len(v) + 1e-5) for a in v]
    return np.array(y) / math.sqrt(sum(a * a for a in y))

def test_pool_equals_the_naive_computation():
    """4.1: pool (F, T, D) -> (F*D,): time-average, frequency rows concatenated in order, layer
    norm without affine, L2 norm, as computed by loops (rows of different offsets: a wrong row
    order shows)."""
    z = 2.0 * torch.randn(5, 7, 6, generator=torch.Generator().manual_seed(0))
    z = z + torch.arange(5.0)[:, None, None] + 0.3
    assert sj.pool(z).shape == (30,)
    np.testing.assert_allclose(sj.pool(z).numpy(), naive_pool(z), atol=1e-6)

def test_ema_tau_and_lr_schedules():
    """Eq. 2: ema_update sets every tensor to tau * target + (1 - tau) * online (tau = 1 keeps the
    target, tau = 0 copies the online weights); tau_i rises linearly from tau_0 at step 0 to tau_T
    at step T and stays there. 3.3: lr rises linearly to the peak at the end of warmup, then a
    half cosine reaches 0 at the last step."""
    torch.manual_seed(0)
    online, start = [torch.randn(3, 4), torch.randn(5)], [torch.randn(3, 4), torch.randn(5)]
    for tau in (1.0, 0.0, 0.7, 0.996):
        target = [t.clone() for t in start]
        sj.ema_update(target, online, tau)
        for t, s, o in zip(target, start, online):
            if tau in (0.0, 1.0):
                assert torch.equal(t, s if tau else o)
            torch.testing.assert_close(t, tau * s + (1 - tau) * o, rtol=1e-6, atol=1e-6)
    assert sj.tau_at(0, 1000, 0.99995, 0.99999) == 0.99995
    assert sj.tau_at(1000, 1000, 0.99995, 0.99999) == pytest.approx(0.99999, abs=1e-15)
    assert sj.tau_at(250, 1000, 0.996, 1.0) == pytest.approx(0.996 + 0.25 * 0.004, abs=1e-15)
    assert sj.tau_at(2000, 1000, 0.996, 1.0) == pytest.approx(1.0, abs=1e-15)
    peak = 1e-3
    lr = [sj.lr_at(s, peak_lr=peak, warmup_steps=10, total_steps=110) for s in range(111)]
    assert (lr[0], lr[9], lr[10]) == pytest.approx((peak / 10, peak, peak))
    assert all(b - a == pytest.approx(peak / 10) for a, b in zip(lr[:9], lr[1:10]))
    assert lr[110] == pytest.approx(0.0, abs=1e-15)
    for s in (30, 60, 100):
        assert lr[s] == pytest.approx(0.5 * peak * (1 + math.cos(math.pi * (s - 10) / 100)))
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert [sj.lr_at(s, peak_lr=1, warmup_steps=10, total_steps=110, min_ratio=0.1)
            for s in (110, 60)] == pytest.approx([0.1, 0.55])          # a floor: min_ratio x peak

def draw(stems: np.ndarray, chunk: int, rng, *, threshold=0.1, tries=10):
    """sj.draw_example on a (S, N) numpy array (it takes a tensor), outputs as numpy arrays."""
    context, target, t = sj.draw_example(torch.from_numpy(stems), chunk, rng, threshold=threshold,
                                         tries=tries)
    return np.asarray(context), np.asarray(target), int(t)

def test_choose_stems_draws_an_active_target_and_a_disjoint_active_context():
    """3.2, over 5000 draws: the target is active; the context a non-empty set of active stems
    without the target; every context size 1..|A|-1 occurs; every active stem is the target
    about equally often. Active: peak > threshold (strictly); < 2 active stems: None."""
    rng = np.random.default_rng(0)
    peaks, active = np.array([0.5, 0.05, 0.3, 0.9, 0.1, 0.2]), {0, 2, 3, 5}
    draws = []
    for _ in range(5000):
        target, context = sj.choose_stems(peaks, rng, 0.1)
        assert target in active and 1 <= len(context) == len(set(context.tolist()))
        assert set(context.tolist()) <= active - {target}
        draws.append((target, len(context)))
    targets, sizes = zip(*draws)
    assert set(sizes) == {1, 2, 3}
    counts = np.bincount(targets, minlength=6)[sorted(active)]
    assert counts.min() > 0.8 * 5000 / 4 and counts.max() < 1.2 * 5000 / 4
    assert sj.choose_stems(np.array([0.0, 0.0, 0.0]), rng, 0.1) is None
    assert sj.choose_stems(np.array([0.9, 0.05, 0.1]), rng, 0.1) is None   # 0.1 is not above 0.1
    for _ in range(50):
        target, context = sj.choose_stems(np.array([0.9, 0.05, 0.5]), rng, 0.1)
        assert {target, *map(int, context)} == {0, 2} and len(context) == 1

def test_draw_example_redraws_chunks_until_two_stems_are_active():
    """A 10 s track whose first 2 s hold one stem only: every example comes from a chunk with
    >= 2 active stems (footnote 2), seen at its last sample (the stems are constants 0.2, 0.4,
    0.8: the context's value names its stems). Without redraws (tries=1) some contexts are silent.
    A track shorter than the chunk is zero-padded at the end."""
    values = np.array([0.2, 0.4, 0.8], dtype=np.float32)
    stems = np.repeat(values[:, None], 10 * SR, axis=1)
    stems[1:, : 2 * SR] = 0.0
    rng = np.random.default_rng(0)
    n_partial = 0
    for _ in range(600):
        context, target, t = draw(stems, SR, rng, tries=10)
        assert context.shape == target.shape == (SR,) and target[-1] == values[t]
        members = {i for i in range(3) if (round(float(context[-1]) / 0.2) >> i) & 1}
        assert members and t not in members                             # non-empty, disjoint
        n_partial += bool((context == 0).any())
    assert n_partial > 0                                               # chunks did straddle 2 s
    assert sum(not draw(stems, SR, rng, tries=1)[0].any() for _ in range(100)) > 0
    short = np.stack([sine(200, 1.5), sine(300, 1.5), sine(500, 1.5)])
    context, target, t = draw(short, 2 * SR, rng)
    assert context.shape == target.shape == (2 * SR,)
    assert np.array_equal(target[:24000], short[t]) and not target[24000:].any()
    assert not context[24000:].any() and context[:24000].any()

def test_draw_example_falls_back_to_the_two_loudest_stems_of_the_last_chunk():
    """After `tries` chunks with < 2 active stems, the example is the last chunk's loudest stem as
    target, its second loudest as context. Three quiet stems (peaks 0.05, 0.03, 0.08) with stems
    0 and 1 loud in one 0.1 s spot; the stems are ramps: a chunk's first sample tells its offset."""
    n, chunk = 20 * SR, SR
    ramp = np.linspace(0.5, 1.0, n, dtype=np.float64)
    stems = np.stack([0.05 * ramp, 0.03 * ramp, 0.08 * ramp]).astype(np.float32)
    stems[0, 10 * SR: 10 * SR + 1600], stems[1, 10 * SR: 10 * SR + 1600] = 0.5, 0.6
    rng = np.random.default_rng(0)
    fallback = valid = 0
    for _ in range(300):
        context, target, t = draw(stems, chunk, rng, tries=3)
        if t == 2:                                                     # the fallback
            offset = int(np.argmin(np.abs(stems[2] - target[0])))
            assert np.array_equal(target, stems[2, offset: offset + chunk])
            assert np.array_equal(context, stems[0, offset: offset + chunk])   # 0.05 > 0.03
            assert np.abs(target).max() <= 0.1                         # a chunk without the spot
            fallback += 1
        else:                                                          # the spot was found
            assert t in (0, 1) and np.abs(target).max() > 0.1 and np.abs(context).max() > 0.1
            valid += 1
    assert fallback > 0 and valid > 0

def test_prepare_musdb18hq_and_a_folder_of_multitracks(tmp_path):
    """MUSDB18-HQ (44.1 kHz stereo, with mixture.wav): the cache holds (S, N) 16 kHz mono arrays,
    stems sorted, no mixture, each stem's frequency kept, channels averaged (0.6 and 0.2 -> 0.4).
    A folder without train/ or test/: each sub-folder is a track, its stems named after the files
    (any supported extension); mixture.wav and notes.txt are not stems."""
    t = np.arange(int(3.0 * 44100)) / 44100
    stems = {s: np.stack([0.6 * np.sin(2 * np.pi * f * t), 0.2 * np.sin(2 * np.pi * f * t)], axis=1)
             for s, f in {**MUSDB_FREQS, "mixture": 5000.0}.items()}
    write_track(tmp_path / "musdb" / "train" / "Artist - Title", stems, sr=44100)
    (track,) = sj.prepare(tmp_path / "musdb", "train", chunk_seconds=2.0, log=quiet)
    assert track["name"] == "Artist - Title" and track["stems"] == sorted(MUSDB_FREQS)
    x = np.load(track["npy"]).astype(np.float32)
    assert x.shape == (4, track["length"]) and abs(x.shape[1] - 3 * SR) <= 16
    for row, stem in zip(x, track["stems"]):
        assert dominant_freq(row) == pytest.approx(MUSDB_FREQS[stem], abs=1.0)
        assert np.abs(row[SR:2 * SR]).max() == pytest.approx(0.4, abs=0.02)
    freqs = {"guitar": 220.0, "piano": 440.0, "strings": 660.0}
    folder = write_track(tmp_path / "mine" / "my song", {"guitar": sine(220, 2.0)}, ext="flac")
    write_track(folder, {"piano": sine(440, 2.0), "strings": sine(660, 2.0),
                         "mixture": sine(3000, 2.0)})
    (folder / "notes.txt").write_text("not audio")
    (track,) = sj.prepare(tmp_path / "mine", chunk_seconds=2.0, log=quiet)
    assert track["name"] == "my song" and track["stems"] == sorted(freqs)
    assert [dominant_freq(r) for r in np.load(track["npy"]).astype(np.float32)] == pytest.approx(
        [freqs[s] for s in track["stems"]], abs=1.0)

def stem_mp4(path: Path, sources: dict, codec: str, tmp: Path) -> Path:
    """A .stem.mp4 with one stream per source {name: (x, sr)}, in order, encoded by ffmpeg."""
    inputs = []
    for name, (x, sr) in sources.items():
        sf.write(tmp / f"{name}.wav", x, sr, subtype="PCM_16")
        inputs += ["-i", str(tmp / f"{name}.wav")]
    path.parent.mkdir(parents=True, exist_ok=True)
    maps = [a for i in range(len(sources)) for a in ("-map", str(i))]
    subprocess.run(["ffmpeg", "-v", "error", "-y", *inputs, *maps, "-c:a", codec, str(path)],
                   check=True)
    return path

NO_FFMPEG = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")

@NO_FFMPEG
def test_musdb18_stem_mp4_streams_are_the_stems_and_equal_the_wav_files(tmp_path):
    """A MUSDB18 .stem.mp4 (streams 0 mixture, 1 drums, 2 bass, 3 other, 4 vocals, AAC): each
    cached stem is decoded from its own stream (its frequency). The same stereo 44.1 kHz stems as
    WAV files (MUSDB18-HQ) and as lossless (ALAC) streams load as equal 16 kHz mono arrays, at the
    RMS of (L + R) / 2 (ffmpeg's `-ac 1` would give 0.707 (L + R), 3 dB louder)."""
    t = np.arange(int(3.0 * 44100)) / 44100
    freqs = {"mixture": 5000.0, **{s: MUSDB_FREQS[s] for s in sj.MUSDB_STREAMS}}
    sources = {name: (np.stack([0.6 * np.sin(2 * np.pi * f * t), 0.2 * np.sin(3 * np.pi * f * t)],
                               axis=1), 44100) for name, f in freqs.items()}
    stem_mp4(tmp_path / "musdb" / "train" / "Artist - Song.stem.mp4", sources, "aac", tmp_path)
    (track,) = sj.prepare(tmp_path / "musdb", chunk_seconds=2.0, log=quiet)
    assert track["name"] == "Artist - Song" and track["stems"] == sorted(MUSDB_FREQS)
    x = np.load(track["npy"]).astype(np.float32)
    assert abs(x.shape[1] - 3 * SR) < 0.1 * SR
    assert [dominant_freq(r) for r in x] == pytest.approx([freqs[s] for s in track["stems"]],
                                                          abs=1.0)
    mp4 = stem_mp4(tmp_path / "lossless.stem.mp4", sources, "alac", tmp_path)
    for name, stream in sj.MUSDB_STREAMS.items():
        from_mp4, from_wav = (sj.load_audio(mp4, SR, stream),
                              sj.load_audio(tmp_path / f"{name}.wav", SR))
        assert from_mp4.dtype == from_wav.dtype == np.float32
        np.testing.assert_array_equal(from_mp4, from_wav)
        mean = sf.read(tmp_path / f"{name}.wav", dtype="float64")[0].mean(axis=1)
        assert np.sqrt(np.mean(from_mp4.astype(np.float64) ** 2)) == pytest.approx(
            np.sqrt(np.mean(mean ** 2)), rel=0.01)

def test_quiet_stem_is_kept_for_evaluation_and_never_sampled_in_training(tmp_path):
    """The silence filter is training's only. A stem of peak 0.05 (under the 0.1 threshold) stays
    in the cache, in evaluation's tracks and among the retrieval references (its own embedding);
    a track of one loud and one quiet stem is evaluated too, but left out of training, whose
    sampler never draws the quiet stem (no 770 Hz in any context). An all-zero stem is left out,
    with a note."""
    data, n = tmp_path / "data", 2 * SR
    write_track(data / "song", {"bass": sine(110, 2.0), "drums": sine(330, 2.0),
                                "other": sine(770, 2.0, amp=0.05), "vocals": sine(1500, 2.0),
                                "piano": np.zeros(n, np.float32)})
    write_track(data / "duo", {"bass": sine(110, 2.0), "other": sine(770, 2.0, amp=0.05)})
    notes = []
    evaluation = sj.prepare(data, chunk_seconds=2.0, training=False, log=notes.append)
    assert [(t["name"], t["stems"]) for t in evaluation] == [
        ("duo", ["bass", "other"]), ("song", ["bass", "drums", "other", "vocals"])]
    assert "silent stem (all zero), left out: song/piano" in notes[-1]
    x = np.load(evaluation[1]["npy"]).astype(np.float32)
    assert np.abs(x[2]).max() == pytest.approx(0.05, abs=1e-3)
    torch.manual_seed(0)
    model = sj.build_model(mini(), TOY_STEMS).eval()
    emb = sj.retrieval_embeddings(model, evaluation, log=quiet)
    assert list(zip(emb.track.tolist(), emb.instrument.tolist())) == [
        (0, 0), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]
    torch.testing.assert_close(emb.refs_target[4], sj.pool(sj.embed_long(model, [x[2]])[0]))
    (train,) = sj.prepare(data, chunk_seconds=2.0, log=notes.append)
    assert train["name"] == "song" and "track left out: duo" in notes[-1]
    dataset = sj.StemChunks([train], train["stems"], chunk=n, threshold=0.1, tries=10, seed=0)
    for i in range(40):
        context, _, instrument = dataset[i]
        assert train["stems"][instrument] != "other"
        spectrum = np.abs(np.fft.rfft(context.numpy().astype(np.float64)))   # 0.5 Hz bins
        assert spectrum[770 * 2] < 1.0                                   # a 0.05 sine gives 800

def test_prepare_reuses_the_cache_and_redecodes_a_changed_track(tmp_path, monkeypatch):
    """A second prepare decodes nothing (load_audio is never called) and returns the same tracks;
    after one file changes, only its track is decoded again, with the new audio."""
    root = tmp_path / "data"
    write_track(root / "a", {"bass": sine(110, 2.0), "drums": sine(330, 2.0)})
    write_track(root / "b", {"bass": sine(220, 2.0), "drums": sine(440, 2.0)})
    first, real, decoded = sj.prepare(root, chunk_seconds=2.0, log=quiet), sj.load_audio, []
    monkeypatch.setattr(sj, "load_audio", lambda path, *a, **k: decoded.append(Path(path))
                        or real(path, *a, **k))
    assert sj.prepare(root, chunk_seconds=2.0, log=quiet) == first and decoded == []
    sf.write(root / "b" / "bass.wav", sine(550, 2.0), SR)
    os.utime(root / "b" / "bass.wav", ns=(1, 1))                        # a different mtime
    again = sj.prepare(root, chunk_seconds=2.0, log=quiet)
    assert [p.parent.name for p in decoded] == ["b", "b"]
    b = next(t for t in again if t["name"] == "b")
    assert dominant_freq(np.load(b["npy"])[0]) == pytest.approx(550.0, abs=1.0)

def test_cached_array_cut_short_is_decoded_again(tmp_path, monkeypatch):
    """Cached arrays damaged after their metadata was written (cut in the samples or the header
    by a full disk or an interrupted copy), or left without metadata by a kill, are decoded again,
    those tracks only; a line names each cut file; the arrays come back whole."""
    data = sj.write_toy_dataset(tmp_path / "toy", tracks=5, seconds=6.0)    # 4 in train/
    first = sj.prepare(data, "train", cache=tmp_path / "cache", chunk_seconds=4.0, log=quiet)
    samples_cut, header_cut, no_meta = (Path(t["npy"]) for t in first[:3])
    samples_cut.write_bytes(samples_cut.read_bytes()[:-1000])
    header_cut.write_bytes(header_cut.read_bytes()[:50])
    no_meta.write_bytes(no_meta.read_bytes()[:1000])
    no_meta.with_suffix(".json").unlink()
    decoded, lines, real = [], [], sj.load_audio
    monkeypatch.setattr(sj, "load_audio", lambda *a, **k: decoded.append(a[0]) or real(*a, **k))
    again = sj.prepare(data, "train", cache=tmp_path / "cache", chunk_seconds=4.0,
                       log=lines.append)
    assert {Path(p).parent.name for p in decoded} == {t["name"] for t in first[:3]}
    for npy in (samples_cut, header_cut):
        assert sum(str(npy) in line and "cut short" in line for line in lines) == 1
    assert again == first
    assert all(np.load(t["npy"]).shape == (len(t["stems"]), t["length"]) for t in again)

def step_inputs(n=2, seconds=2.0):
    """Context and target waveforms (n, N) of noise, and instrument ids 0, 2, 1, 3."""
    context = torch.from_numpy(np.stack([noise(seconds, s, amp=0.3) for s in range(n)]))
    target = torch.from_numpy(np.stack([noise(seconds, s + 10, amp=0.3) for s in range(n)]))
    return context, target, torch.tensor([0, 2, 1, 3][:n])

def test_no_gradient_reaches_the_target_encoder():
    """forward returns the loss, the detached predictions and the targets; after backward the
    target encoder (at init a copy of the context encoder) has no gradient and no trainable
    parameter, while every parameter of the context encoder and predictor has one."""
    torch.manual_seed(0)
    model = sj.build_model(mini(), TOY_STEMS)
    assert all(torch.equal(a, b) for a, b in zip(model.encoder.state_dict().values(),
                                                 model.target_encoder.state_dict().values()))
    loss, pred, z_bar = model(*step_inputs())
    assert pred.shape == z_bar.shape == (2, 5, 12, 32)
    assert not pred.requires_grad and not z_bar.requires_grad
    assert loss.item() == pytest.approx(sj.jepa_loss(pred, z_bar).item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.target_encoder.parameters())
    for name, p in [*model.encoder.named_parameters(), *model.predictor.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name

def test_training_step_under_bf16_autocast_matches_float32(monkeypatch):
    """training_step(amp_dtype=bf16), run with the CPU's bf16 autocast (the GPU path): the
    front-end stays float32 (a bf16 STFT would lose the quiet bins); the loss is float32, within
    1 % of the float32 step's without equal to it (the matmuls ran in bf16); the update (SGD: the
    gradient) points the float32 one's way (cosine > 0.999). autocast_dtype: None (fp32) on CPU
    and MPS; on CUDA bf16 where native, else fp16."""
    torch.manual_seed(0)
    base = sj.build_model(mini(), TOY_STEMS)
    context, target, instrument = step_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert base.frontend(context).dtype == torch.float32
    results = {}
    for amp in (None, torch.bfloat16):
        model = copy.deepcopy(base)
        loss, applied, _ = sj.training_step(model, torch.optim.SGD(model.parameters(), lr=1.0),
                                            context, target, instrument, lr=1.0, tau=0.99,
                                            grad_clip=1e9, amp_dtype=amp)
        assert applied and loss.dtype == torch.float32
        name = "encoder.blocks.0.attn.qkv.weight"
        results[amp] = loss.item(), (model.state_dict()[name] - base.state_dict()[name]).flatten()
    (exact, d32), (low, d16) = results[None], results[torch.bfloat16]
    assert low != exact and abs(low - exact) < 0.01 * exact
    assert F.cosine_similarity(d32, d16, dim=0) > 0.999 and not torch.equal(d32, d16)
    assert sj.autocast_dtype(torch.device("cpu")) is sj.autocast_dtype(torch.device("mps")) is None
    for native, want in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: native)
        assert sj.autocast_dtype(torch.device("cuda")) == want

@pytest.mark.slow
def test_training_step_through_torch_compile_matches_eager():
    """The step accepts a torch.compile wrapper (--compile) and gives the eager step's loss and
    update (backend "eager": Dynamo traces, without the minutes of C++ code generation)."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = sj.build_model(tiny(), TOY_STEMS)
        optimizer = torch.optim.AdamW(sj.param_groups(model, 0.05), lr=1e-3, fused=True)
        loss, applied, _ = sj.training_step(
            model, optimizer, *step_inputs(), lr=1e-3, tau=0.99,
            loss_fn=torch.compile(model, backend="eager") if compiled else None)
        results.append((applied, loss.item(), model.encoder.blocks[0].attn.qkv.weight.detach()))
    assert results[0][0] and results[1][0]
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
    assert torch.allclose(results[0][2], results[1][2], atol=1e-6)

def test_grad_scaler_step_equals_the_unscaled_step_and_skips_an_overflow():
    """training_step with a GradScaler (the fp16 path, here in fp32): with a scale of 2^10 and
    clipping active, the weights and target encoder after the step equal the unscaled step's (the
    gradients are unscaled before clipping); with a scale of 2^127 and a loss 10^6 times larger
    the gradients overflow: the step is skipped (weights and target unchanged), the scale halved."""
    torch.manual_seed(0)
    base = sj.build_model(mini(), TOY_STEMS)
    def step(scaler, factor=1.0):
        model = copy.deepcopy(base)
        def scaled(*batch):
            loss, pred, z_bar = model(*batch)
            return factor * loss, pred, z_bar
        _, applied, _ = sj.training_step(model, torch.optim.AdamW(sj.param_groups(model, 0.05)),
                                         *step_inputs(4), lr=1e-3, tau=0.9, grad_clip=0.01,
                                         scaler=scaler, loss_fn=scaled)
        return model.state_dict(), applied
    (plain, applied), (scaled, applied_too) = step(None), step(
        torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    assert applied and applied_too
    for name in plain:
        torch.testing.assert_close(plain[name], scaled[name], rtol=1e-5, atol=1e-7, msg=name)
    for name in ("encoder.norm.weight", "target_encoder.norm.weight"):
        assert (plain[name] - base.state_dict()[name]).abs().max() > 0, name
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    skipped, applied = step(scaler, factor=1e6)
    assert not applied and scaler.get_scale() == 2.0 ** 126
    assert all(torch.equal(v, skipped[k]) for k, v in base.state_dict().items())

def test_grad_accumulation_gives_the_full_batch_gradient():
    """grad_accum micro-batches add up to the whole batch's gradient (each loss divided by their
    number): the update and the returned mean loss do not depend on the split."""
    results = []
    for accum in (1, 2):
        torch.manual_seed(0)
        model = sj.build_model(mini(), TOY_STEMS)
        loss, _, (pred, _, inst) = sj.training_step(
            model, torch.optim.SGD(model.parameters(), lr=1.0), *step_inputs(4), lr=1.0, tau=1.0,
            grad_clip=1e9, grad_accum=accum)
        assert len(pred) == len(inst) == 4 // accum
        results.append((loss.item(), model.encoder.blocks[0].mlp[0].weight.detach()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)

def test_weight_decay_on_every_parameter_or_m2d_grouping_as_configured(tmp_path):
    """param_groups: with decay_all (the paper preset, the authors' code) every trainable
    parameter is decayed; without (M2D's grouping, the tiny preset) exactly those with fewer than
    2 dims and the instrument embedding are not. `train`'s AdamW has the config's groups."""
    assert sj.make_config("paper").weight_decay_all and not sj.make_config("tiny").weight_decay_all
    model = sj.build_model(mini(), TOY_STEMS)
    data = good_track(tmp_path / "data" / "song", seconds=2.0).parent
    for decay_all in (True, False):
        groups = sj.param_groups(model, 0.05, decay_all=decay_all)
        decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
        for name, p in model.named_parameters():
            exempt = not decay_all and (p.ndim < 2 or name.startswith("predictor.instrument"))
            assert decay.get(id(p)) == (None if not p.requires_grad else 0.0 if exempt else 0.05)
        out = tmp_path / f"run{decay_all}"
        sj.train(mini(steps=1, batch_size=2, weight_decay_all=decay_all), data, out=out,
                 workers=0, log=quiet)
        saved = torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
        assert [(len(g["params"]), g["weight_decay"]) for g in saved] == [
            (len(g["params"]), g["weight_decay"]) for g in groups]

def test_collapse_measures_tell_a_mix_blind_predictor_from_one_that_reads_the_mix():
    """A predictor of one vector per instrument has prediction spread 0; avg_stem_loss is Eq. 1 of
    the leave-one-out mean unit target of the same instrument (by loops); predicting the
    standardised target gives batch loss 0, below the average stem. Lone instruments: left out."""
    torch.manual_seed(0)
    target = torch.randn(6, 2, 3, 16) + 0.5
    inst = torch.tensor([0, 0, 0, 1, 1, 2])
    m = sj.collapse_measures(torch.randn(3, 1, 1, 16)[inst].expand(-1, 2, 3, -1), target, inst)
    assert m["pred_spread"] == pytest.approx(0.0, abs=1e-6) and m["target_spread"] > 0.5
    unit, want = sj.unit_targets(target), []
    for i in range(5):
        mean = F.normalize(unit[[j for j in range(5) if inst[j] == inst[i] and j != i]].mean(0),
                           dim=-1)
        want.append((mean - unit[i]).pow(2).sum(-1).mean().item())
    assert m["avg_stem_loss"] == pytest.approx(np.mean(want), rel=1e-5)
    reader = sj.collapse_measures(target - target.mean(-1, keepdim=True), target, inst)
    assert reader["batch_loss"] == pytest.approx(0.0, abs=1e-6) and reader["avg_stem_loss"] > 0.1
    assert reader["pred_spread"] == pytest.approx(reader["target_spread"], rel=1e-5)

@pytest.mark.slow
def test_training_lowers_the_loss(trained_run):
    """150 steps of batch 8 on 8 toy songs: the mean of the last three logged losses lies below
    the first by more than 0.65 (measured 1.97 -> 0.62), the targets did not collapse (target
    spread > 0.1); log.csv has the 10 columns, a row per 10 steps."""
    model, out = trained_run
    rows = read_log(out / "log.csv")
    assert list(rows[0]) == LOG_COLUMNS and [int(r["step"]) for r in rows] == list(range(10, 151,
                                                                                         10))
    first, last = float(rows[0]["loss"]), np.mean([float(r["loss"]) for r in rows[-3:]])
    assert last < first - 0.65, (first, last)
    assert float(rows[-1]["target_spread"]) > 0.1 and not model.training
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 150

@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_even_mid_log_window(toy_data, tmp_path):
    """6 steps straight, or 3 (stop_at, between two log rows of log_every 2) then 3 more with
    resume=True and a loader worker, give the same log (all but the speed; the row of step 4 the
    mean over steps 3-4) and bit-identical weights and optimizer state."""
    cfg = tiny(steps=6, batch_size=4, warmup_steps=2, log_every=2)
    a, _ = sj.train(cfg, toy_data, out=tmp_path / "a", workers=0, log=quiet)
    sj.train(cfg, toy_data, out=tmp_path / "b", workers=0, stop_at=3, log=quiet)
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["log_window"][1] == 1
    assert len(read_log(tmp_path / "b" / "log.csv")) == 1
    b, _ = sj.train(cfg, toy_data, out=tmp_path / "b", workers=1, resume=True, log=quiet)
    logs = [read_log(tmp_path / run / "log.csv") for run in "ab"]
    for row in logs[0] + logs[1]:
        del row["samples_per_s"]
    assert [r["step"] for r in logs[0]] == ["2", "4", "6"] and logs[0] == logs[1]
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    opt_a, opt_b = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["optimizer"]
                    ["state"] for run in "ab")
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])

TORCHRUN_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    import stem_jepa as sj
    data, out = sys.argv[2], sys.argv[3]
    cfg = sj.make_config("tiny", steps=5, batch_size=4, chunk_seconds=2.0, log_every=1)
    model, _ = sj.train(cfg, data, out=os.path.join(out, "run"), workers=0)
    torch.save(model.state_dict(), os.path.join(out, f"rank{os.environ['RANK']}.pt"))
""")

@pytest.mark.slow
def test_torchrun_replicas_train_in_step(toy_data, tmp_path):
    """Two processes under torchrun (gloo, CPU) end with identical weights (DDP averages the
    gradients, the EMA follows identical online weights), changed from the initial ones in every
    part, and rank 0's checkpoint holds them."""
    (tmp_path / "ddp.py").write_text(TORCHRUN_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(port), str(tmp_path / "ddp.py"), str(HERE),
                          str(toy_data), str(tmp_path)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 5 and len(read_log(tmp_path / "run" / "log.csv")) == 5
    assert r0.keys() == r1.keys() == ckpt["model"].keys()
    assert all(torch.equal(r0[k], r1[k]) and torch.equal(r0[k], ckpt["model"][k]) for k in r0)
    torch.manual_seed(0)
    init = sj.build_model(sj.Config(**ckpt["config"]), ckpt["instruments"]).state_dict()
    for prefix in ("encoder.", "predictor.", "target_encoder."):
        assert any(k.startswith(prefix) and not torch.equal(r0[k], init[k]) for k in r0), prefix

@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_resume_appends_to_the_log(tmp_path, toy_data, sig):
    """Ctrl-C / SIGTERM: a checkpoint at the current step, exit status 128 + signal, a message
    saying how to resume; --resume then goes on, and log.csv is appended, not rewritten."""
    run = tmp_path / "run"
    args = ["train", "--data", toy_data, "--out", run, "--steps", 2000, "--log-every", 5, *TINY_RUN]
    proc = start_cli(*args)
    wait_for_line(proc, "step 10 ")
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig.value, rest
    assert "--resume" in rest and "Traceback" not in rest
    stopped_at = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 10 <= stopped_at < 2000
    resumed = run_cli(*args, "--resume", "--stop-at", stopped_at + 10)
    assert resumed.returncode == 0, resumed.stdout
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == stopped_at + 10
    assert [int(r["step"]) for r in read_log(run / "log.csv")] == list(range(5, stopped_at + 11,
                                                                             5))

@pytest.mark.slow
def test_sigkill_while_saving_leaves_a_loadable_checkpoint(tmp_path, toy_data):
    """With a checkpoint written at every step, kill -9 at arbitrary moments: what is on disk
    always loads (checkpoints are written to a temporary file, then renamed)."""
    run = tmp_path / "run"
    for delay in (0.05, 0.2, 0.5):
        proc = start_cli("train", "--data", toy_data, "--out", run, "--steps", 100000,
                         "--ckpt-every", 1, "--log-every", 1, "--resume", *TINY_RUN)
        wait_for_line(proc, "step ")
        while not (run / "checkpoint.pt").exists():     # the line can come before the first save
            time.sleep(0.01)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        assert sj.load_checkpoint(run / "checkpoint.pt")["step"] >= 1

def test_resume_with_another_configuration_is_refused_and_fine_tuning_starts_fresh(
        tmp_path, monkeypatch):
    """resume=True with another architecture is refused, naming the difference, even with force;
    another number of steps (one of RESUMABLE_CHANGES) needs force, and then trains on. The
    README's fine-tuning recipe (the checkpoint at step 0 without optimizer) resumes from its
    weights with an empty optimizer and the lr of step 0."""
    assert "steps" in sj.RESUMABLE_CHANGES and "dim" not in sj.RESUMABLE_CHANGES
    data, run = good_track(tmp_path / "data" / "song", seconds=2.0).parent, tmp_path / "run"
    sj.train(mini(steps=2, batch_size=2), data, out=run, workers=0, log=quiet)
    for cfg, force, words in [(mini(steps=2, batch_size=2, predictor="transformer"), False,
                               "predictor mlp -> transformer"),
                              (mini(steps=3, batch_size=2), False, "steps 2 -> 3.*--force"),
                              (mini(steps=3, batch_size=2, dim=48), True, "dim 32 -> 48")]:
        with pytest.raises(sj.StemJEPAError, match=words):
            sj.train(cfg, data, out=run, workers=0, resume=True, force=force, log=quiet)
    sj.train(mini(steps=3, batch_size=2), data, out=run, workers=0, resume=True, force=True,
             log=quiet)
    assert (ckpt := sj.load_checkpoint(run / "checkpoint.pt"))["step"] == 3
    ckpt.update(step=0, skipped=0, log_window=(0.0, 0), optimizer=None, scaler=None)
    (tmp_path / "tune").mkdir()
    torch.save(ckpt, tmp_path / "tune" / "checkpoint.pt")
    seen, real = [], sj.training_step
    monkeypatch.setattr(sj, "training_step", lambda model, opt, *a, lr, **k: seen.append(
        ({n: v.clone() for n, v in model.state_dict().items()}, len(opt.state), lr))
        or real(model, opt, *a, lr=lr, **k))
    sj.train(mini(steps=3, batch_size=2), data, out=tmp_path / "tune", workers=0, resume=True,
             force=True, log=quiet)
    state, n_state, lr = seen[0]
    assert len(seen) == 3 and n_state == 0 and lr == sj.lr_at(0, peak_lr=8e-3 * 2 / 256,
                                                              warmup_steps=30, total_steps=3)
    assert all(torch.equal(state[n], v) for n, v in ckpt["model"].items())

def test_non_finite_loss_stops_after_5_with_the_last_good_checkpoint(tmp_path):
    """An absurd learning rate makes the loss non-finite: steps are skipped and counted, training
    stops after 5 in a row with a StemJEPAError, and the checkpoint holds finite weights."""
    data, run = good_track(tmp_path / "data" / "song", seconds=2.0).parent, tmp_path / "run"
    lines = []
    with pytest.raises(sj.StemJEPAError, match="5 non-finite steps in a row"):
        sj.train(mini(steps=40, batch_size=2, base_lr=1e30, ckpt_every=1), data, out=run,
                 workers=0, log=lines.append)
    assert sum("step skipped" in line for line in lines) == 5
    ckpt = sj.load_checkpoint(run / "checkpoint.pt")
    assert ckpt["skipped"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())

def lock_is_free(path: Path) -> bool:
    """Whether an flock on `path` can be taken now (from another open file description)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

def test_lock_is_held_while_training_and_released_after_an_error(tmp_path, monkeypatch):
    """OUT/train.lock is flock-ed while the steps run (another flock on it fails) and free again
    after the training raised an exception."""
    data = good_track(tmp_path / "data" / "song", seconds=2.0).parent
    held = []
    def failing_step(*args, **kwargs):
        held.append(lock_is_free(tmp_path / "run" / "train.lock"))
        raise RuntimeError("the stand-in step")
    monkeypatch.setattr(sj, "training_step", failing_step)
    with pytest.raises(RuntimeError, match="the stand-in step"):
        sj.train(mini(steps=3, batch_size=2), data, out=tmp_path / "run", workers=0, log=quiet)
    assert held == [False] and lock_is_free(tmp_path / "run" / "train.lock")

# Bad input: one table, through the command line ----------------------------------------------
BASE = ["--preset", "tiny", "--steps", "1", "--batch-size", "2", "--workers", "0", "--dim", "32",
        "--depth", "1", "--heads", "2", "--pred-hidden", "64", "--pred-layers", "2"]   # mini()

def train_args(data, out, *extra) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), *BASE, *map(str, extra)]

def tracks(good=False, **stems):
    """A setup: a track `odd` of these stems {name: audio or file bytes}, beside a good track."""
    def setup(data, out, mp):
        if good:
            good_track(data / "good")
        (data / "odd").mkdir(parents=True)
        for name, x in stems.items():
            path = data / "odd" / f"{name}.wav"
            path.write_bytes(x) if isinstance(x, bytes) else sf.write(path, x, SR, subtype="FLOAT")
    return setup

def hold_lock(data, out, mp):
    good_track(data / "good")
    out.mkdir(parents=True)
    fcntl.flock(lock := open(out / "train.lock", "w"), fcntl.LOCK_EX | fcntl.LOCK_NB)
    mp.setattr(sys.modules[__name__], "held", lock, raising=False)  # open until the test ends

def bad_checkpoint(spoil):
    def setup(data, out, mp):
        good_track(data / "good")
        spoil(write_checkpoint(out / "checkpoint.pt", mini(), TOY_STEMS))
        return ["--resume"]
    return setup

def data_changed(*extra):
    def setup(data, out, mp):
        good_track(data / "good")
        sj.main(train_args(data, out))
        good_track(data / "added", seconds=6.0)
        return ["--resume", *extra]
    return setup

def killed_by_sigkill(data, out, mp):
    good_track(data / "good")
    more = ["--steps", "100000", "--ckpt-every", "1", "--log-every", "1"]
    proc = start_cli(*train_args(data, out, *more))
    wait_for_line(proc, "step ")
    while not (out / "checkpoint.pt").exists():
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    return [*more, "--resume", "--stop-at", sj.load_checkpoint(out / "checkpoint.pt")["step"] + 1]

def case(name, setup, trains, words, check=None, marks=()):
    return pytest.param(setup, trains, words, check, id=name, marks=marks)

SILENT, NAN = np.zeros(SR, np.float32), np.full(5 * SR, np.nan, np.float32)
TWO_GOOD = {"drums": sine(330, 5.0), "other": sine(770, 5.0)}
BAD_INPUT = [   # setup(data, out, monkeypatch) -> extra args; trains?; words; check(data, out)
    case("missing-folder", lambda d, o, mp: None, False, ["{data}: no such folder"]),
    case("empty-folder", lambda d, o, mp: d.mkdir(), False, ["{data} is empty"]),
    case("no-track-folder", lambda d, o, mp: d.mkdir() or (d / "README.txt").write_text("hi")
         and None, False, ["holds no tracks; found README.txt", ".stem.mp4", "extras/convert.py"]),
    case("one-stem-dataset", tracks(piano=sine(440, 5.0)), False,
         ["no usable track", "odd", "nothing to predict from"]),
    case("corrupt-file", tracks(True, bass=os.urandom(3000), **TWO_GOOD), True,
         ["{data}/odd/bass.wav: not a readable audio file"]),
    case("zero-byte-file", tracks(True, bass=b"", **TWO_GOOD), True,
         ["{data}/odd/bass.wav: empty file (0 bytes)"]),
    case("text-as-wav", tracks(True, bass=b"not audio at all", **TWO_GOOD), True,
         ["{data}/odd/bass.wav: not a readable audio file"]),
    case("every-track-bad", tracks(bass=os.urandom(5000), drums=b"", other=b"text"), False,
         ["no usable track", "{data}/odd/bass.wav: not a readable audio file",
          "{data}/odd/drums.wav: empty file", "{data}/odd/other.wav: not a readable audio file"]),
    case("shorter-than-a-chunk", tracks(guitar=sine(220, 2.0), piano=sine(440, 2.0)), True,
         ["zero-padded", "odd (2.0 s)"],
         lambda d, o: sj.load_checkpoint(o / "checkpoint.pt")["instruments"] == ["guitar",
                                                                                 "piano"]),
    case("stems-differ-by-over-1-s", tracks(True, bass=sine(110, 3.0), drums=sine(330, 5.0)),
         True, ["track left out: odd", "bass 3.00 s", "drums 5.00 s"]),
    case("stems-differ-by-under-1-s", tracks(bass=sine(110, 5.0), drums=sine(330, 5.5)), True,
         [], lambda d, o: [np.load(p).shape for p in d.rglob("*.npy")] == [(2, 5 * SR)]),
    case("all-silent-track", tracks(bass=SILENT, drums=SILENT), False,
         ["no usable track", "odd: every stem is all zero"]),
    case("nan-samples", tracks(True, bass=sine(110, 5.0), drums=NAN, other=sine(770, 5.0)), True,
         ["{data}/odd/drums.wav: contains NaN"]),
    case("cuda-unavailable", lambda d, o, mp: ["--device", "cuda"], False,
         ["--device cuda", "not available"],
         marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")),
    case("out-is-a-file", lambda d, o, mp: o.write_text("x") and None, False,
         ["--out {out} is a file"]),
    case("two-runs-into-one-folder", hold_lock, False, ["{out} is in use by another run"]),
    case("batch-not-dividing-among-processes", lambda d, o, mp: mp.setenv("RANK", "0")
         or mp.setenv("WORLD_SIZE", "2") or ["--batch-size", "3"], False,
         ["--batch-size 3 does not divide among 2 processes"]),
    case("truncated-checkpoint", bad_checkpoint(lambda p: p.write_bytes(p.read_bytes()[:5000])),
         False, ["{out}/checkpoint.pt: not a readable checkpoint", "truncated"]),
    case("not-a-stem-jepa-checkpoint", bad_checkpoint(lambda p: torch.save({"x": 1}, p)), False,
         ["{out}/checkpoint.pt: not a Stem-JEPA checkpoint"]),
    case("data-changed", data_changed(), False, ["cannot resume", "data", "--force"]),
    case("data-changed-force", data_changed("--force", "--steps", "2"), True, ["resuming"],
         lambda d, o: sj.load_checkpoint(o / "checkpoint.pt")["step"] == 2),
    case("kill-9-then-resume", killed_by_sigkill, True, ["resuming"], marks=pytest.mark.slow),
]

@pytest.mark.parametrize("setup, trains, words, check", BAD_INPUT)
def test_bad_input_to_train_is_named(tmp_path, monkeypatch, capsys, setup, trains, words, check):
    """`stem_jepa.py train` (sj.main) on bad data, options or run folder: exit status 2 and one
    `error:` line saying what was wrong; or, where the input can be used (a bad file among good
    ones, a short track, stems within a second, --force), training runs and its output says what
    was left out or changed ({data}, {out}: the folders' paths)."""
    data, out = tmp_path / "data", tmp_path / "run"
    extra = setup(data, out, monkeypatch) or []
    code, stdout, stderr = run_main(sj.main, train_args(data, out, *extra), capsys)
    if trains:
        assert code == 0 and sj.load_checkpoint(out / "checkpoint.pt")["step"] >= 1, stderr
    else:
        assert code == 2 and stderr.count("error: ") == 1, stderr
    for word in words:
        assert word.format(data=data, out=out) in (stdout if trains else stderr), word
    assert check is None or check(data, out)

def on_a_line(*xs) -> torch.Tensor:
    """Points of a line as (n, 1) vectors: the L2 distance between two of them is |x - y|."""
    return torch.tensor(xs, dtype=torch.float64)[:, None]

def metrics_by_enumeration(queries, refs, truth, ks) -> dict:
    """Recall@K and normalised rank with ties broken at random, by brute force: every order of the
    references sorted by distance to the query (tied ones in any order) is equally likely; the
    mean of 1[rank <= K] and rank / R over them, rank counted from 1 (nrank) and from 0 (nrank0)."""
    R = len(refs)
    hits, nranks = {k: [] for k in ks}, []
    for q, t in zip(queries, truth.tolist()):
        d = [float((q - r).norm()) for r in refs]
        ranks = [order.index(t) + 1 for order in itertools.permutations(range(R))
                 if all(d[a] <= d[b] for a, b in zip(order, order[1:]))]
        for k in ks:
            hits[k].append(np.mean([r <= k for r in ranks]))
        nranks.append(np.mean(ranks) / R)
    nranks = np.array(nranks)
    return {**{f"R@{k}": 100 * float(np.mean(hits[k])) for k in ks},
            "nrank_mean": 100 * np.mean(nranks), "nrank_median": 100 * np.median(nranks),
            "nrank0_mean": 100 * np.mean(nranks - 1 / R),
            "nrank0_median": 100 * np.median(nranks - 1 / R)}

def assert_metrics(got: dict, want: dict, abs=1e-5):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=abs), key

def test_retrieval_metrics_on_points_of_a_line_by_hand():
    """References at 0, 10, ..., 110 (R = 12); queries (position -> true reference) 0 -> 0 (rank
    1), 0 -> 20 (rank 3), 3 -> 50 (rank 6), 110 -> 0 (rank 12), 55 -> 40 (50, 60 closer, 70 tied:
    rank 3.5), counted from 1: R@1 = 1/5, R@3 = 2.5/5, R@5 = 3/5, R@10 = 4/5, mean normalised rank
    25.5 / 5 / 12, median 3.5 / 12, 1/12 lower counted from 0. Table 1's median 0.5 % is rank 3
    of 600 (the authors' compute_recall: argmax + 1, over R). Queries equal to their references,
    in any order: R@K = 100, normalised rank 1/R (0 from 0)."""
    refs = on_a_line(*range(0, 120, 10))
    queries, truth = on_a_line(0, 0, 3, 110, 55), torch.tensor([0, 2, 5, 0, 4])
    assert_metrics(sj.retrieval_metrics(queries, refs, truth, ks=(1, 3, 5, 10)),
                   {"R@1": 20.0, "R@3": 50.0, "R@5": 60.0, "R@10": 80.0,
                    "nrank_mean": 100 * 25.5 / 60, "nrank_median": 100 * 3.5 / 12,
                    "nrank0_mean": 100 * 20.5 / 60, "nrank0_median": 100 * 2.5 / 12})
    m = sj.retrieval_metrics(on_a_line(0, 0, 0, 0, 0), on_a_line(*range(600)),
                             torch.tensor([0, 2, 2, 9, 599]))          # ranks 1, 3, 3, 10, 600
    assert_metrics(m, {"R@1": 20.0, "R@5": 60.0, "R@10": 80.0, "nrank_median": 0.5,
                       "nrank_mean": 100 * 617 / 5 / 600, "nrank0_median": 100 * 2 / 600,
                       "nrank0_mean": 100 * 612 / 5 / 600})
    refs = torch.randn(9, 16, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    assert_metrics(sj.retrieval_metrics(refs[perm], refs, perm), {
        "R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "nrank_mean": 100 / 9, "nrank_median": 100 / 9,
        "nrank0_mean": 0.0, "nrank0_median": 0.0})

def test_ties_count_as_random_tie_breaking_and_chance_is_the_average_ranking():
    """With tied distances the metrics equal their expectation over every distance-sorted order
    of the references, enumerated (rank = 1 + #closer + #(tied others) / 2). R identical
    references give every query rank (R + 1) / 2: the chance level, chance_metrics(7); and
    chance_metrics(5) is the average over the 5! orders, enumerated."""
    refs = on_a_line(0, 2, 2, 4, 6, 6)
    queries, truth = on_a_line(3, 3, 0, 2, 5), torch.tensor([0, 1, 5, 2, 3])
    want = metrics_by_enumeration(queries, refs, truth, (1, 2, 3, 5))
    assert_metrics(sj.retrieval_metrics(queries, refs, truth, ks=(1, 2, 3, 5)), want)
    assert want["nrank_mean"] == pytest.approx(100 * (5 + 2 + 5.5 + 1.5 + 2) / 5 / 6)
    queries = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    want = {"R@1": 100 / 7, "R@5": 500 / 7, "R@10": 100.0, "nrank_mean": 100 * 4 / 7,
            "nrank_median": 100 * 4 / 7, "nrank0_mean": 100 * 3 / 7, "nrank0_median": 100 * 3 / 7}
    assert_metrics(sj.retrieval_metrics(queries, torch.ones(7, 4), torch.tensor([0, 3, 6, 2, 2])),
                   want)
    assert_metrics(sj.chance_metrics(7), want)
    ranks = np.array([order.index(0) + 1 for order in itertools.permutations(range(5))])
    assert_metrics(sj.chance_metrics(5, ks=(1, 2, 5, 10)), {
        **{f"R@{k}": 100 * np.mean(ranks <= k) for k in (1, 2, 5, 10)},
        "nrank_mean": 100 * np.mean(ranks / 5), "nrank_median": 100 * np.median(ranks / 5),
        "nrank0_mean": 100 * np.mean((ranks - 1) / 5),
        "nrank0_median": 100 * np.median((ranks - 1) / 5)})

def test_which_song_and_which_instrument_rank_within_their_groups():
    """Which song? ranks a query among its instrument's references, which instrument? among its
    song's, by hand on a line. Queries that give every song the same vector per instrument (the
    collapse the log watches for): which song at chance (R@1 = 1/N, rank (N + 1) / 2N), query
    cosine 1; queries equal to their references: both right. One song: no cosine (None)."""
    refs = on_a_line(0, 10, 20, 30)          # rows: (song 0, inst 0), (0, 1), (1, 0), (1, 1)
    track, inst = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    queries = on_a_line(19, 11, 1, 31)
    # which song: q0 vs {0, 20}: rank 2; q1 vs {10, 30}: 1; q2 vs {0, 20}: 2; q3: 1 (R = 2)
    # which instrument: q0 vs {0, 10}: 2; q1 vs {0, 10}: 1; q2 vs {20, 30}: 1; q3: 1
    m = sj.which_song_and_instrument(queries, refs, track, inst)
    assert (m["which_song"]["R@1"], m["which_song"]["nrank_mean"]) == pytest.approx((50, 75))
    assert (m["which_instrument"]["R@1"], m["which_instrument"]["nrank_mean"]) == pytest.approx(
        (75, 62.5))
    assert m["query_cosine"] == pytest.approx(1.0)     # 1-d vectors of one sign
    one = sj.which_song_and_instrument(queries[:2], refs[:2], track[:2], inst[:2])
    assert one["query_cosine"] is None and one["which_song"]["R@1"] == 100.0
    torch.manual_seed(0)
    N, S = 6, 4
    refs = F.normalize(torch.randn(N * S, 16), dim=1)
    track, inst = torch.arange(N).repeat_interleave(S), torch.arange(S).repeat(N)
    collapsed = sj.which_song_and_instrument(torch.randn(S, 16)[inst], refs, track, inst)
    assert collapsed["which_song"]["R@1"] == pytest.approx(100 / N)
    assert collapsed["which_song"]["nrank_mean"] == pytest.approx(100 * (N + 1) / 2 / N)
    assert collapsed["query_cosine"] == pytest.approx(1.0)
    exact = sj.which_song_and_instrument(refs, refs, track, inst)
    assert exact["which_song"]["R@1"] == exact["which_instrument"]["R@1"] == 100.0
    assert exact["query_cosine"] < 0.9

def test_centred_which_song_ranks_after_removing_each_instruments_mean_by_hand():
    """which_song_centred: queries and references minus their instrument's mean vector,
    L2-normalised, ranked among the same instrument's references, as a naive loop does. A large
    common part with a small song part (a "hub": song 0 near the average) gets the raw rank wrong
    and the centred one right."""
    torch.manual_seed(0)
    N, S, C = 5, 3, 8
    track, inst = torch.arange(N).repeat_interleave(S), torch.arange(S).repeat(N)
    common, own = torch.randn(S, C) * 10, torch.randn(N * S, C)
    refs = common[inst] + torch.where(track == 0, 0.2, 1.0)[:, None] * own
    queries = common[inst] + 0.4 * own
    m = sj.which_song_and_instrument(queries, refs, track, inst)
    def centred(x, j):
        v = x[j].double() - x[inst == inst[j]].double().mean(0)
        return v / v.norm()
    ranks = []
    for i in range(N * S):
        d = {j: (centred(queries, i) - centred(refs, j)).norm().item()
             for j in range(N * S) if inst[j] == inst[i]}
        ranks.append(1 + sum(dj < d[i] for dj in d.values()))
    assert m["which_song_centred"]["nrank_mean"] == pytest.approx(100 * np.mean(ranks) / N)
    assert m["which_song_centred"]["R@1"] == pytest.approx(100 * np.mean(np.array(ranks) == 1))
    assert m["which_song_centred"]["nrank_mean"] < m["which_song"]["nrank_mean"]

@pytest.fixture(scope="module")
def two_encoders_model(tmp_path_factory):
    """A random minimal model with 4 s chunks (25 time patches) whose two encoders differ."""
    return sj.StemJEPA.from_checkpoint(write_checkpoint(
        tmp_path_factory.mktemp("two") / "checkpoint.pt", mini(chunk_seconds=4.0), TOY_STEMS))

@pytest.mark.parametrize("chunk_seconds", [4.0, 2.0])
@torch.no_grad()
def test_embed_long_covers_every_frame(chunk_seconds):
    """N samples give T = ceil(N / 2560) time patches (160 ms each) whatever N and the chunk:
    shorter than a patch, a patch, a chunk, a chunk + 1, two chunks and a bit. A 2 s chunk (12.5
    patches) must not drop the half patch of every chunk nor fail on a last piece over 12."""
    torch.manual_seed(0)
    model = sj.build_model(mini(chunk_seconds=chunk_seconds), TOY_STEMS).eval()
    chunk = int(chunk_seconds * SR)
    lengths = [1000, 2560, chunk, chunk + 1, 2 * chunk + 5000, chunk - 1000]
    out = sj.embed_long(model, [noise(n / SR, seed=n) for n in lengths], chunk=chunk, batch=4)
    assert [tuple(z.shape) for z in out] == [(5, math.ceil(n / 2560), 32) for n in lengths]

@torch.no_grad()
def test_embed_long_equals_encode_and_predict_chunk_by_chunk(two_encoders_model):
    """embed_long concatenates the patch embeddings of 4 s chunks: the first 25 time patches equal
    model.encode of the first chunk alone (target encoder by default, context with target=False),
    with instruments= model.predict, and the last ones the encoding of the zero-padded remainder.
    Several recordings batched together give what each gives alone."""
    model, close = two_encoders_model, dict(rtol=1e-4, atol=1e-5)
    x = noise(8.1875, seed=1, amp=0.1)                                  # 25 + 25 + 2 patches
    first = torch.from_numpy(x[None, :64000])
    rest = torch.from_numpy(np.pad(x[128000:], (0, 5120 - 3000))[None])
    z = sj.embed_long(model, [x], chunk=64000)[0]
    torch.testing.assert_close(z[:, :25], model.encode(first, target=True)[0], **close)
    torch.testing.assert_close(z[:, 50:], model.encode(rest, target=True)[0], **close)
    context = sj.embed_long(model, [x], chunk=64000, target=False)[0]
    torch.testing.assert_close(context[:, :25], model.encode(first, target=False)[0], **close)
    assert (context - z).abs().max() > 1e-3                             # the two encoders differ
    q = sj.embed_long(model, [x], chunk=64000, instruments=[2])[0]
    torch.testing.assert_close(q[:, :25], model.predict(first, torch.tensor([2]))[0], **close)
    torch.testing.assert_close(q[:, 50:], model.predict(rest, torch.tensor([2]))[0], **close)
    wavs = [x, x[:70000], noise(4.0, seed=2, amp=0.1)]
    together = sj.embed_long(model, wavs, chunk=64000, instruments=[0, 3, 1], batch=3)
    for w, i, zt in zip(wavs, [0, 3, 1], together):
        torch.testing.assert_close(zt, sj.embed_long(model, [w], chunk=64000, instruments=[i],
                                                     batch=1)[0], **close)

@torch.no_grad()
def test_embeddings_are_float32_even_inside_autocast(two_encoders_model):
    """Evaluation embeds in float32, as the authors' evaluation, even where training runs under
    bf16 autocast: inside a bf16 autocast region embed_long gives the float32 embeddings and
    predictions (bf16 is ~1e-2 off), and the encoders' and predictor's Linears ran in float32."""
    model = two_encoders_model
    x = noise(4.0, seed=3, amp=0.1)
    want_z = model.encode(torch.from_numpy(x)[None], target=True)[0]
    want_q = model.predict(torch.from_numpy(x)[None], torch.tensor([1]))[0]
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
             for m in (model.target_encoder.blocks[0].attn.qkv, model.encoder.blocks[0].attn.qkv,
                       model.predictor.net[0])]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = sj.embed_long(model, [x], chunk=64000)[0]
            q = sj.embed_long(model, [x], chunk=64000, instruments=[1])[0]
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(z, want_z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q, want_q, rtol=1e-4, atol=1e-5)
    assert seen == [torch.float32] * 3

def local_features(model, wavs, *, instruments=None, target=True, chunk=None, batch=16,
                   device="cpu"):
    """A stand-in for embed_long whose embeddings depend on the local audio only: a (1, T, 64)
    sequence per waveform, row t the log band energies of samples [2560 t, 2560 (t + 1))."""
    out = []
    for x in wavs:
        x = np.pad(x, (0, -len(x) % 2560))
        spectrum = np.abs(np.fft.rfft(x.reshape(-1, 2560), axis=1))[:, 1:1281]
        out.append(torch.from_numpy(np.log1p(spectrum.reshape(len(x) // 2560, 64, 20).sum(-1)))
                   .float()[None])
    return out

def test_any_length_methods_are_embed_long_and_pool(mini_checkpoint, monkeypatch):
    """encode_long is embed_long's target-encoder sequence of a whole recording (T = ceil(N /
    2560)); predict_long(mix, "bass") is embed_long with bass's id; embed pools them; score's
    distance is the pooled vectors' L2 distance, its similarity 1 - d^2 / 2. A batch (B, N) and
    an unknown instrument are StemJEPAErrors naming the shape and the known instruments."""
    model = sj.StemJEPA.from_checkpoint(mini_checkpoint)
    mix, bass = noise(20.0, seed=0), noise(19.0, seed=1)
    z = model.encode_long(torch.from_numpy(bass))
    assert tuple(z.shape) == (5, math.ceil(len(bass) / 2560), 32)
    torch.testing.assert_close(z, sj.embed_long(model, [bass])[0])
    q = model.predict_long(mix, "bass")
    torch.testing.assert_close(q, sj.embed_long(model, [mix], instruments=[0])[0])
    torch.testing.assert_close(model.embed(bass), sj.pool(z))
    torch.testing.assert_close(model.embed(mix, "bass"), sj.pool(q))
    d = (sj.pool(q) - sj.pool(z)).norm().item()
    got = model.score(mix, bass, "bass")
    assert (got["distance"], got["similarity"]) == pytest.approx((d, 1 - d ** 2 / 2), abs=1e-4)
    with pytest.raises(sj.StemJEPAError, match=r"\(2, 16000\)"):
        model.encode_long(np.zeros((2, 16000), np.float32))
    with pytest.raises(sj.StemJEPAError, match="'piano': the model knows bass, drums, other, voc"):
        model.predict_long(np.zeros(16000, np.float32), "piano")

@pytest.mark.slow
def test_from_checkpoint_gives_the_trained_model_in_eval_mode(trained_run):
    """StemJEPA.from_checkpoint rebuilds the model `train` returned: eval mode, its config and
    instruments, its context and target embeddings and predictions (not a fresh model's)."""
    trained, run = trained_run
    loaded = sj.StemJEPA.from_checkpoint(run / "checkpoint.pt")
    assert not any(m.training for m in loaded.modules())
    assert loaded.config == trained.config and loaded.instruments == trained.instruments
    wav = torch.from_numpy(np.stack([noise(2.0, seed=s, amp=0.1) for s in range(2)]))
    with torch.no_grad():
        assert all(torch.equal(loaded.encode(wav, target=t), trained.encode(wav, target=t))
                   for t in (False, True))
        assert torch.equal(*(m.predict(wav, torch.tensor([0, 3])) for m in (loaded, trained)))
        torch.manual_seed(trained.config.seed)
        fresh = sj.build_model(trained.config, TOY_STEMS).eval()
        assert (fresh.encode(wav) - loaded.encode(wav)).abs().max() > 1e-3

def test_shipped_model_loads_in_one_line_with_the_tiny_config():
    """models/stem-jepa-tiny-toy.pt loads with StemJEPA.from_checkpoint, in eval mode, as the tiny
    preset with the README's options (6000 steps, log every 100, checkpoint every 500) on
    MUSDB18's four instruments; its log.csv (which also has the older embedding_spread) has the
    10 columns and ends at the checkpoint's step."""
    shipped = HERE / "models" / "stem-jepa-tiny-toy.pt"
    model = sj.StemJEPA.from_checkpoint(shipped)
    assert model.config == sj.make_config("tiny", steps=6000, log_every=100, ckpt_every=500)
    assert model.instruments == TOY_STEMS and not model.training
    rows = read_log(shipped.with_suffix(".log.csv"))
    assert set(LOG_COLUMNS) <= set(rows[0])
    assert int(rows[-1]["step"]) == sj.load_checkpoint(shipped)["step"] == 6000

def test_eq3_shift_similarity_and_best_offset(search):
    """extras/search.py: shift_similarity is Eq. 3 for one stem, (1/M) sum_i cos(z[i], q[(i+j)%M]),
    by a naive loop, negative shifts too; circular=False: the mean over 0 <= i + j < T'. A
    prediction m steps late (q[i] = z[i - m]) peaks, at 1, at j = +m; best_offset(stem, pred) is
    j0 where the stem is pred[j0:], -j0 where pred is stem[j0:]."""
    g = torch.Generator().manual_seed(0)
    z, q, short = (torch.randn(m, 6, generator=g) for m in (13, 13, 9))
    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))
    naive = [np.mean([cos(z[i], q[(i + j) % 13]) for i in range(13)]) for j in range(-6, 7)]
    assert torch.allclose(search.shift_similarity(z, q, range(-6, 7)), torch.tensor(naive).float(),
                          atol=1e-5)
    naive = [np.mean([cos(z[i], short[i + j]) for i in range(13) if 0 <= i + j < 9])
             for j in range(-12, 9)]
    assert torch.allclose(search.shift_similarity(z, short, range(-12, 9), circular=False),
                          torch.tensor(naive).float(), atol=1e-5)
    z = torch.randn(40, 16, generator=g)
    curve = search.shift_similarity(z, torch.roll(z, shifts=5, dims=0), range(-10, 11))
    assert int(curve.argmax()) - 10 == 5 and curve.max().item() == pytest.approx(1.0, abs=1e-5)
    prediction = torch.randn(60, 8, generator=g)
    assert search.best_offset(prediction[17:37], prediction) == 17
    assert search.best_offset(prediction, prediction[7:50]) == -7


# =============================================================================================
# PART TWO: Table 1's evaluation, toy songs, the command line, the tutorial
# =============================================================================================

@pytest.fixture(scope="module")
def retrieval_set(tmp_path_factory) -> Path:
    """5 held-out toy songs of 8 s (all in test/, other seeds than the training songs)."""
    return sj.write_toy_dataset(tmp_path_factory.mktemp("retrieval") / "toy", tracks=5,
                                seconds=8.0, seed=1, test_fraction=1.0)

@pytest.mark.slow
def test_evaluate_beats_chance_and_random_weights(trained_run, retrieval_set, tmp_path):
    """On 5 held-out toy songs the trained tiny model (150 steps) ranks the true stem far nearer
    than random weights or chance: mean normalised rank from 0 below 25 %, 20 points under both
    (measured 20.1 % against 47.8 % and 47.1 %), random weights near chance. The rows, their
    keys, the chance rows (chance_metrics), nrank = nrank0 + 100 / R, and retrieval.json."""
    checkpoint = trained_run[1] / "checkpoint.pt"
    result = sj.evaluate(checkpoint, retrieval_set, out=tmp_path / "eval", cache=tmp_path / "c",
                         log=quiet)
    tracks = sj.prepare(retrieval_set, "test", cache=tmp_path / "c", training=False, log=quiet)
    R = sum(len(t["stems"]) for t in tracks)
    assert (result["N"], result["S"], result["references"]) == (len(tracks), 4, R)
    assert set(result["rows"]) == {"Stem-JEPA", "random weights", "chance", "DSP (chroma + tempo)"}
    metrics = {"R@1", "R@5", "R@10", "nrank_mean", "nrank_median", "nrank0_mean", "nrank0_median"}
    for name, row in result["rows"].items():
        assert metrics | {"which_song", "which_instrument", "query_cosine"} <= set(row), name
    assert set(result["per_instrument"]) == set(TOY_STEMS)
    chance = result["rows"]["chance"]
    assert {k: chance[k] for k in metrics} == pytest.approx(sj.chance_metrics(R))
    assert chance["which_song"] == pytest.approx(sj.chance_metrics(len(tracks), ks=(1,)))
    assert json.loads((tmp_path / "eval" / "retrieval.json").read_text()) == json.loads(
        json.dumps(result))
    model, random_weights = (result["rows"][k] for k in ("Stem-JEPA", "random weights"))
    assert result["nrank_mean"] == model["nrank_mean"] and model["nrank0_mean"] < 25
    assert model["nrank_mean"] == pytest.approx(model["nrank0_mean"] + 100 / R)
    assert model["nrank_mean"] < random_weights["nrank_mean"] - 20, (model, random_weights)
    assert model["nrank_mean"] < chance["nrank_mean"] - 20
    assert abs(random_weights["nrank_mean"] - chance["nrank_mean"]) < 15

@pytest.mark.slow
def test_evaluate_split_all_ranks_among_train_and_test_and_states_r(tmp_path):
    """Table 1 ranks among the stems of all 150 MUSDB18 tracks, train and test (R = 600).
    evaluate(split="all") on 3 train and 2 test tracks of 4 stems, one quiet (peak 0.05, kept),
    ranks among R = 20 references, split "test" among R = 8; each printed table states its R,
    and the chance row is chance_metrics(R)."""
    data, rng = tmp_path / "data", np.random.default_rng(0)
    for split, names in (("train", "abc"), ("test", "de")):
        for name in names:
            write_track(data / split / name, {
                s: sine(f * rng.uniform(0.8, 1.25), 3.0, amp=0.05 if name + s == "eother" else 0.5)
                for s, f in MUSDB_FREQS.items()})
    checkpoint = write_checkpoint(tmp_path / "run" / "checkpoint.pt", mini(), TOY_STEMS)
    for split, N in (("all", 5), ("test", 2)):
        result = sj.evaluate(checkpoint, data, split=split, cache=tmp_path / "c",
                             log=(printed := []).append)
        assert (result["N"], result["references"]) == (N, 4 * N)
        table = sj.format_table(result)
        assert f"R = {4 * N} references" in table and table in printed
        chance, expected = result["rows"]["chance"], sj.chance_metrics(4 * N)
        assert {k: chance[k] for k in expected} == pytest.approx(expected)
        assert (tmp_path / "run" / f"eval-{split}" / "retrieval.json").exists()

def test_toy_chords_move_by_the_smallest_voice_leading():
    """_voicing: the chord's pitch classes, one note each, within the range, and no other voicing
    (every octave placement, enumerated) moves less from the previous chord."""
    rng, previous = np.random.default_rng(0), [60, 64, 67]
    for _ in range(20):
        chord = [int(p) for p in rng.choice(12, 3, replace=False)]
        v = sj._voicing(previous, chord)
        assert sorted(m % 12 for m in v) == sorted(chord) and all(55 <= m <= 74 for m in v)
        moves = [sum(abs(a - b) for a, b in zip(sorted(c), previous))
                 for c in itertools.product(range(55, 75), repeat=3)
                 if sorted(m % 12 for m in c) == sorted(chord)]
        assert sum(abs(a - b) for a, b in zip(v, previous)) == min(moves)
        previous = v

def test_toy_breaks_are_heard_in_every_stem_at_once_and_a_song_is_its_seeds():
    """A break stops every part together: over its span the mix is 10 dB quieter than over the
    song (the reverb tail alone rings on) and every stem is quieter there; breaks start on a beat
    of a bar after the first. The same seed gives the same stems and labels, another another."""
    found = 0
    def rms(x):
        return float(np.sqrt(np.mean(x ** 2)))
    for seed in range(4):
        stems, labels = sj.make_toy_song(np.random.default_rng(seed), seconds=20.0)
        mix, beat = sum(stems.values()), 60.0 / labels["tempo"]
        for start, end in labels["breaks"]:
            found += 1
            assert start >= 4 * beat - 1e-3 and abs(start / beat - round(start / beat)) < 1e-2
            span = slice(int((start + 0.05) * SR), int(end * SR))
            if end - start >= 0.2:                          # not cut short by the song's end
                assert rms(mix[span]) < 10 ** (-10 / 20) * rms(mix)
                assert all(rms(x) == 0 or rms(x[span]) < rms(x) for x in stems.values())
    assert found >= 4
    (a, la), (b, lb), (c, lc) = (sj.make_toy_song(np.random.default_rng(s), seconds=3.0)
                                 for s in (3, 3, 4))
    assert la == lb and all(np.array_equal(a[s], b[s]) for s in TOY_STEMS)
    assert la != lc and not np.array_equal(a["bass"], c["bass"])

def test_every_config_field_is_a_train_option():
    """The train options are the Config fields: each has its --flag; given flags set their fields
    (--lr is --base-lr, a bool takes --no-), the others keep the preset's values."""
    parser = argparse.ArgumentParser()
    sj.add_config_options(parser)
    flags = {a for action in parser._actions for a in action.option_strings}
    assert {"--" + f.name.replace("_", "-") for f in dataclasses.fields(sj.Config)} <= flags
    cfg = sj.config_from(parser.parse_args(["--preset", "tiny", "--warmup-steps", "7", "--lr",
                                            "0.5", "--weight-decay-all", "--tau-start", "0.9",
                                            "--predictor", "transformer"]))
    assert cfg == dataclasses.replace(sj.make_config("tiny"), warmup_steps=7, tau_start=0.9,
                                      base_lr=0.5, weight_decay_all=True, predictor="transformer")
    assert not sj.config_from(parser.parse_args(["--no-weight-decay-all"])).weight_decay_all

@pytest.mark.slow
def test_cli_toy_then_train_then_evaluate(tmp_path):
    """`toy` writes train/<song>/{bass,drums,other,vocals}.wav + labels.json; `train` 3 steps
    writes a checkpoint loadable with weights_only=True (step 3, from which the model loads) and
    log.csv with the 10 columns, a row per step; `evaluate` writes retrieval.json."""
    data, run = tmp_path / "toy", tmp_path / "run"
    assert run_cli("toy", "--out", data, "--tracks", 3, "--seconds", 10).returncode == 0
    songs = sorted((data / "train").iterdir())
    assert len(songs) == 2 and len(list((data / "test").iterdir())) == 1
    assert all(sorted(p.name for p in song.iterdir()) == ["bass.wav", "drums.wav", "labels.json",
               "other.wav", "vocals.wav"] and sf.info(str(song / "bass.wav")).duration == 10.0
               for song in songs)
    train = run_cli("train", "--data", data, "--steps", 3, "--out", run, "--log-every", 1,
                    *TINY_RUN)
    assert train.returncode == 0, train.stdout
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["instruments"] == TOY_STEMS
    assert [list(r) + [r["step"]] for r in read_log(run / "log.csv")] == [
        LOG_COLUMNS + [step] for step in "123"]
    model = sj.StemJEPA.from_checkpoint(run / "checkpoint.pt")
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
    evaluate = run_cli("evaluate", "--checkpoint", run / "checkpoint.pt", "--data", data,
                       "--out", tmp_path / "eval")
    assert evaluate.returncode == 0, evaluate.stdout
    result = json.loads((tmp_path / "eval" / "retrieval.json").read_text())
    assert (result["N"], result["references"], result["split"]) == (1, 4, "test")
    assert {"Stem-JEPA", "random weights", "chance"} <= set(result["rows"])

TUTORIAL = HERE / "tutorial.ipynb"

def test_committed_tutorial_shows_every_result_and_stays_under_1_2_mb():
    """The notebook is committed executed: every code cell has outputs, none an error, and the
    file (figures and audio included) stays under 1.2 MB."""
    code = [c for c in json.loads(TUTORIAL.read_text())["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] for c in code), "code cells without outputs"
    assert not any(o["output_type"] == "error" for c in code for o in c["outputs"])
    assert TUTORIAL.stat().st_size < 1_200_000

@pytest.mark.slow
def test_tutorial_runs_top_to_bottom(tmp_path, monkeypatch):
    """Every cell runs without error from a clean slate, headless, in the repository root, with
    the notebook's files in a fresh folder (STEM_JEPA_TUTORIAL_RUNS: nothing cached is reused)
    and trainings of a few steps (STEM_JEPA_TUTORIAL_SMOKE); every code cell has output and the
    notebook trained a model of its own in that folder."""
    nbformat, nbclient = pytest.importorskip("nbformat"), pytest.importorskip("nbclient")
    nb = nbformat.read(TUTORIAL, as_version=4)
    monkeypatch.setenv("STEM_JEPA_TUTORIAL_RUNS", str(tmp_path / "runs"))   # the kernel
    monkeypatch.setenv("STEM_JEPA_TUTORIAL_SMOKE", "1")                     # inherits them
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3",
                            resources={"metadata": {"path": str(HERE)}}).execute()
    assert all(c.outputs for c in nb.cells if c.cell_type == "code"), "cells without outputs"
    assert list((tmp_path / "runs").rglob("checkpoint.pt"))

def test_module_and_tests_keep_to_100_columns():
    """Every line of the module and of this file fits in 100 columns."""
    for path in (HERE / "stem_jepa.py", HERE / "test_stem_jepa.py"):
        lines = path.read_text().splitlines()
        assert [i for i, line in enumerate(lines, 1) if len(line) > 100] == [], path.name

def visit(node, at_import: list, at_call: list, evaluated=True) -> None:
    """The nodes of a module-level statement, sorted into those evaluated when the module runs it
    (decorators, default arguments, base classes, class bodies, expressions) and those evaluated
    when a function it defines is called (bodies). Annotations are never evaluated (PEP 563)."""
    (at_import if evaluated else at_call).append(node)
    for field, value in ast.iter_fields(node):
        body = field == "body" and isinstance(node, (ast.FunctionDef, ast.Lambda))
        if field not in ("annotation", "returns"):
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    visit(child, at_import, at_call, evaluated and not body)

def bound(nodes) -> set[str]:
    """The names these nodes bind: arguments, assignments, except names, definitions, imports."""
    return ({n.arg for n in nodes if isinstance(n, ast.arg)}
            | {n.id for n in nodes if isinstance(n, ast.Name) and type(n.ctx) is not ast.Load}
            | {n.name for n in nodes if isinstance(n, (ast.ExceptHandler, ast.FunctionDef,
                                                        ast.ClassDef)) and n.name}
            | {(a.asname or a.name).split(".")[0] for n in nodes
               if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names})

def names_part_one_lacks(source: str) -> list[str]:
    """The names part one of `source` (between its "# PART ONE" and "# PART TWO" banners) loads
    and would lack if saved and run without part two: not builtins, not bound in the statement,
    and not imported or defined at module level before PART TWO, or, for a name evaluated when
    the module runs, only below its use."""
    lines = source.splitlines()
    one, two = (next(i for i, line in enumerate(lines, 1) if line.startswith(f"# PART {part}"))
                for part in ("ONE", "TWO"))
    defined, statements, lacking = {}, [], []       # module-level name -> its first line
    for stmt in ast.parse(source).body:
        at_import, at_call = [], []
        visit(stmt, at_import, at_call)
        for name in bound([stmt] if isinstance(stmt, (ast.FunctionDef, ast.ClassDef))
                          else at_import):
            defined.setdefault(name, stmt.lineno)
        statements += [(at_import, at_call)] if one < stmt.lineno < two else []
    for at_import, at_call in statements:
        own, now = bound(at_import[1:] + at_call), set(map(id, at_import))
        for n in at_import + at_call:
            if (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in own
                    and not hasattr(builtins, n.id)):
                line = defined.get(n.id, two)
                if line >= two or (id(n) in now and line >= n.lineno):
                    lacking.append(n.id)
    return lacking

LACKING_PART_ONE = '''import os
# PART ONE
def body_uses_part_two(): return helper()
def body_uses_part_one_names_defined_below(): return os.sep, LATER, Later
def default_uses_a_name_defined_below(x=LATER): return x
@decorate
def decorated_above_its_decorator(): pass
def decorate(f): return f
class Base(Later): size = LATER
class Later: pass
LATER = 1
# PART TWO
def helper(): pass
'''

def test_part_one_stands_alone():
    """Part one runs without part two: every name it loads is a builtin, bound locally, imported,
    or defined at module level in part one (anywhere for names in function bodies; above the use
    for names evaluated at import). The check finds each kind of lack in a made-up module: a
    part-two name in a body; a name defined below its use in a default, a decorator, a base class
    and a class body."""
    assert sorted(names_part_one_lacks(LACKING_PART_ONE)) == ["LATER", "LATER", "Later",
                                                              "decorate", "helper"]
    assert names_part_one_lacks((HERE / "stem_jepa.py").read_text()) == []


# =============================================================================================
# The side files: extras/search.py, extras/hear.py, extras/convert.py, dev/bench.py
# =============================================================================================

def side_file(relative: str):
    """A side file imported from its path (it imports stem_jepa: this same module object)."""
    spec = importlib.util.spec_from_file_location(Path(relative).stem, HERE / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

@pytest.fixture(scope="module")
def search():
    return side_file("extras/search.py")


def test_search_score_finds_where_the_stem_fits(search, mini_checkpoint, tmp_path, monkeypatch):
    """extras/search.py score: its distance is the pooled vectors' (StemJEPA.score's); with local
    embeddings, a stem equal to the mix fits at 0, the mix 3.2 s late at -20 patches (-3.2 s),
    the mix less its first 3.2 s at +20 (start the stem offset_s into the mix)."""
    monkeypatch.setattr(sj, "embed_long", local_features)
    x = noise(9.0, seed=5)
    for name, wave in {"x": x, "late": np.r_[np.zeros(51200, np.float32), x],
                       "early": x[51200:]}.items():
        sf.write(tmp_path / f"{name}.wav", wave, SR, subtype="FLOAT")
    got = {name: search.score(mini_checkpoint, tmp_path / "x.wav", tmp_path / f"{name}.wav",
                              "bass") for name in ("x", "late", "early")}
    model = sj.StemJEPA.from_checkpoint(mini_checkpoint)
    assert got["x"]["distance"] == model.score(x, x, "bass")["distance"]
    assert [(g["offset_patches"], g["offset_s"]) for g in got.values()] == [
        (0, 0.0), (-20, -3.2), (20, 3.2)]

@pytest.mark.slow
def test_retrieve_cli_ranks_the_true_bass_first_and_reuses_the_library_cache(
        search, trained_run, retrieval_set, tmp_path, capsys, monkeypatch):
    """`search.py retrieve --json` for a held-out song's mix without its bass, asking for bass,
    over a library of that bass and the songs' vocal stems: the true bass ranks first; each file
    once, by increasing distance, the L2 distance of the pooled prediction for the mix and the
    file's pooled target embedding (computed here). The library's embeddings are cached in
    LIBRARY/.stem_jepa_cache: a second query reads no library file but the one it places."""
    songs = sorted((retrieval_set / "test").iterdir())
    loud = {(s, stem): np.abs(sf.read(s / f"{stem}.wav")[0]).max() > 0.1 for s in songs
            for stem in ("bass", "vocals")}
    song = next(s for s in songs if loud[s, "bass"] and loud[s, "vocals"])
    mix, library = tmp_path / "mix.wav", tmp_path / "library"
    sf.write(mix, sum(sf.read(song / f"{s}.wav", dtype="float32")[0]
                      for s in ("drums", "other", "vocals")), SR, subtype="FLOAT")
    library.mkdir()
    true_bass = Path(shutil.copy(song / "bass.wav", library / f"{song.name}_bass.wav"))
    for s in (s for s in songs if loud[s, "vocals"]):
        shutil.copy(s / "vocals.wav", library / f"{s.name}_vocals.wav")
    checkpoint = trained_run[1] / "checkpoint.pt"
    code, out, err = run_main(search.main, ["retrieve", "--checkpoint", checkpoint, "--mix", mix,
                                            "--library", library, "--instrument", "bass",
                                            "--json"], capsys)
    assert code == 0, err
    results, files = json.loads(out), sorted(library.glob("*.wav"))
    assert [x["rank"] for x in results] == list(range(1, len(files) + 1))
    assert sorted(x["file"] for x in results) == [str(f) for f in files]
    assert results[0]["file"] == str(true_bass), results
    assert [x["distance"] for x in results] == sorted(x["distance"] for x in results)
    model = sj.StemJEPA.from_checkpoint(checkpoint)
    q = sj.pool(sj.embed_long(model, [sj.load_audio(mix, SR)], instruments=[0])[0])
    for x in results:
        ref = sj.pool(sj.embed_long(model, [sj.load_audio(x["file"], SR)])[0])
        assert x["distance"] == pytest.approx((q - ref).norm().item(), abs=2e-4), x
    assert len(list((library / ".stem_jepa_cache").glob("library-*.pt"))) == 1
    read, real = [], sj.load_audio
    monkeypatch.setattr(sj, "load_audio", lambda p, *a, **k: read.append(Path(p))
                        or real(p, *a, **k))
    assert search.retrieve(checkpoint, mix, library, "bass", top=1, log=quiet) == results[:1]
    assert read == [mix, true_bass]

def test_score_cli_is_the_retrieval_distance_and_bad_files_and_instruments_are_named(
        search, mini_checkpoint, tmp_path, capsys):
    """`search.py score --json` for (mix, stem, bass): the distance is the L2 distance of the
    pooled prediction for the mix and the stem's pooled target embedding (embed_long and pool
    here), the similarity 1 - d^2 / 2 (their cosine). `retrieve` over a library of that stem, two
    others and a corrupt file names the corrupt file, once, ranks the others, and gives the stem
    score's distance and offset. An instrument the model does not know: exit status 2, an error
    naming --instrument, its value and the known ones, before any file is read."""
    mix, library, missing = tmp_path / "mix.wav", tmp_path / "library", tmp_path / "missing.wav"
    library.mkdir()
    sf.write(mix, noise(7.0, seed=1), SR, subtype="FLOAT")
    for i in range(3):
        sf.write(library / f"stem{i}.wav", noise(6.0 - i, seed=i + 2), SR, subtype="FLOAT")
    (library / "bad.wav").write_bytes(os.urandom(2000))
    code, out, err = run_main(search.main, ["score", "--checkpoint", mini_checkpoint, "--mix", mix,
                                            "--stem", library / "stem0.wav", "--instrument",
                                            "bass", "--json"], capsys)
    assert code == 0, err
    got, model = json.loads(out), sj.StemJEPA.from_checkpoint(mini_checkpoint)
    q = sj.pool(sj.embed_long(model, [sj.load_audio(mix, SR)], instruments=[0])[0])
    ref = sj.pool(sj.embed_long(model, [sj.load_audio(library / "stem0.wav", SR)])[0])
    assert (got["distance"], got["similarity"]) == pytest.approx(
        ((q - ref).norm().item(), float(q @ ref)), abs=2e-4)
    lines = []
    ranked = {Path(r["file"]).name: r for r in search.retrieve(mini_checkpoint, mix, library,
                                                               "bass", log=lines.append)}
    assert sorted(ranked) == ["stem0.wav", "stem1.wav", "stem2.wav"]
    assert sum(str(library / "bad.wav") in line for line in lines) == 1
    assert (ranked["stem0.wav"]["distance"], ranked["stem0.wav"]["offset_patches"]) == (
        got["distance"], got["offset_patches"])
    for command in (["retrieve", "--library", tmp_path / "nowhere"], ["score", "--stem", missing]):
        code, _, err = run_main(search.main, [*command, "--checkpoint", mini_checkpoint, "--mix",
                                              missing, "--instrument", "piano"], capsys)
        assert code == 2
        assert "error: --instrument piano: the model knows bass, drums, other, vocals" in err

def test_embed_cli_writes_rows_names_and_sequences(search, mini_checkpoint, tmp_path, capsys):
    """`search.py embed --sequences` on a folder (a sub-folder searched; a hidden one and
    non-audio files skipped) writes FILE.npy (n_files, F*D = 160), FILE.txt (the files, in
    order) and FILE.sequences.npz, a (ceil(N / 2560), 160) array per file whose time-average,
    layer- and L2-normalised, is the file's row; a row is the file's embedding computed here."""
    audio = tmp_path / "audio"
    clips = {audio / "a.wav": 1.5, audio / "sub" / "b.flac": 3.3, audio / ".hidden" / "c.wav": 1.0}
    for i, (path, seconds) in enumerate(clips.items()):
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, noise(seconds, seed=i), SR)
    (audio / "notes.txt").write_text("not audio")
    code, _, err = run_main(search.main, ["embed", "--checkpoint", mini_checkpoint, "--audio",
                                          audio, "--out", tmp_path / "emb.npy", "--sequences"],
                            capsys)
    assert code == 0, err
    files = [audio / "a.wav", audio / "sub" / "b.flac"]
    assert (tmp_path / "emb.txt").read_text().splitlines() == [str(f) for f in files]
    rows, seqs = np.load(tmp_path / "emb.npy"), np.load(tmp_path / "emb.sequences.npz")
    assert rows.shape == (2, 160) and sorted(seqs.files) == ["file0", "file1"]
    for k, seconds in enumerate([1.5, 3.3]):
        seq = seqs[f"file{k}"]
        assert seq.shape == (math.ceil(seconds * SR / 2560), 160)
        v = (seq.mean(0) - seq.mean()) / np.sqrt(seq.mean(0).var() + 1e-5)
        np.testing.assert_allclose(v / np.linalg.norm(v), rows[k], atol=1e-5)
    model = sj.StemJEPA.from_checkpoint(mini_checkpoint)
    np.testing.assert_allclose(rows[1], model.embed(sj.load_audio(files[1], SR)), atol=1e-5)

def test_hear_api_shapes_timestamps_and_batch_independence(mini_checkpoint):
    """As the HEAR validator checks, for 2 s and 3.74 s of noise: load_model gives an nn.Module
    with integer sample_rate 16000 and embedding sizes F*D (3840 for ViT-B, 160 here); timestamp
    embeddings (n, T, F*D) and timestamps (n, T) are float32, one per 160 ms patch whose centre
    lies in the sound, at 80, 240, ... ms, the sound's target-encoder patches (embed_long); scene
    embeddings (n, F*D) float32, the layer- and L2-normalised time-average of all its patches;
    a sound's embeddings do not depend on the rest of the batch."""
    hear = side_file("extras/hear.py")
    paper = type("Paper", (nn.Module,), {"config": sj.make_config("paper")})()   # all it reads
    assert hear.HEARModel(paper).scene_embedding_size == 3840
    model = hear.load_model(str(mini_checkpoint))
    assert isinstance(model, nn.Module) and type(model.sample_rate) is int
    assert (model.sample_rate, model.scene_embedding_size, model.timestamp_embedding_size) == (
        16000, 160, 160)
    for seconds in (2.0, 3.74):
        audio = torch.from_numpy(np.stack([noise(seconds, seed) for seed in range(3)]))
        N = audio.shape[1]
        T = sum((t + 0.5) * 160 <= 1000 * N / SR for t in range(math.ceil(N / 2560)))
        (emb, ts), scene = hear.get_timestamp_embeddings(audio, model), hear.get_scene_embeddings(
            audio, model)
        assert (emb.shape, ts.shape, scene.shape) == ((3, T, 160), (3, T), (3, 160))
        assert emb.dtype == ts.dtype == scene.dtype == torch.float32
        assert ts.tolist() == [[160.0 * t + 80.0 for t in range(T)]] * 3
        for i in range(3):
            z = sj.embed_long(model.model, [audio[i].numpy()])[0]               # (F, T', D)
            patches = z.permute(1, 0, 2).reshape(z.shape[1], -1).double()     # (T', F*D)
            torch.testing.assert_close(emb[i].double(), patches[:T], atol=1e-5, rtol=1e-5)
            v = patches.mean(0)
            v = (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5)
            torch.testing.assert_close(scene[i].double(), v / v.norm(), atol=1e-5, rtol=0)
            alone, ts_alone = hear.get_timestamp_embeddings(audio[i: i + 1], model)
            assert torch.allclose(alone[0], emb[i], atol=1e-5) and torch.equal(ts_alone[0], ts[i])
            assert torch.allclose(hear.get_scene_embeddings(audio[i: i + 1], model)[0], scene[i],
                                  atol=1e-5)

def converted(capsys, *argv) -> dict[str, dict[str, np.ndarray]]:
    """extras/convert.py ARGV (it must succeed) -> {track: {stem: 16 kHz audio}} as sj.find_tracks
    and sj.load_audio read the folder it wrote (--out, the last argument)."""
    code, _, err = run_main(side_file("extras/convert.py").main, argv, capsys)
    assert code == 0, err
    return {name: {s: sj.load_audio(path, SR, stream) for s, (path, stream) in stems.items()}
            for name, stems in sj.find_tracks(argv[-1], "all")}

SLAKH_METADATA = """UUID: 1a81ae092884234f3264e2f45927f00a
overall_gain: 0.18   # a comment
stems:
  S00:
    inst_class: Bass
    midi_program_name: 'Electric Bass (finger)'
  S01:
    inst_class: Drums
    is_drum: true
  S02:
    inst_class: Guitar
  S03:
    inst_class: Piano
  S04:
    audio_rendered: false
    inst_class: Strings
"""

def test_each_converter_writes_a_folder_that_find_tracks_reads(tmp_path, capsys):
    """Multichannel: one 4-channel WAV per track with --channels bass,drums,mix,vocals; each named
    channel becomes that stem (its frequency), mix is left out; a wrong number of names is an
    error naming the file and both counts. MoisesDB: <provider>/<track>/<stem>/<file>.wav with
    data.json; each stem folder becomes a stem, its files summed. Slakh2100: <split>/<track>/
    stems/SNN.flac with metadata.yaml (read without a YAML library): Bass -> bass, the drum kit ->
    drums, other classes -> other (summed); S04 (no audio) skipped; the split kept; --groups
    makes the groups it names and leaves out the classes it does not."""
    freqs = {"bass": 110.0, "drums": 330.0, "mix": 5000.0, "vocals": 1500.0}
    (tmp_path / "src" / "train").mkdir(parents=True)
    sf.write(tmp_path / "src" / "train" / "song.wav",
             np.stack([sine(f, 3.0) for f in freqs.values()], axis=1), SR)
    got = converted(capsys, "multichannel", "--src", tmp_path / "src", "--channels",
                    ",".join(freqs), "--out", tmp_path / "out")
    assert list(got) == ["song"] and sorted(got["song"]) == ["bass", "drums", "vocals"]
    assert all(dominant_freq(x) == pytest.approx(freqs[s], abs=1) for s, x in got["song"].items())
    code, _, err = run_main(side_file("extras/convert.py").main, [
        "multichannel", "--src", tmp_path / "src", "--channels", "bass,drums", "--out",
        tmp_path / "x"], capsys)
    assert code == 2 and "song.wav has 4 channels and --channels names 2" in err
    track = tmp_path / "moisesdb" / "provider" / "0a1b-track"
    parts = {"bass/b1.wav": sine(110, 3.0), "drums/d1.wav": sine(330, 3.0),
             "guitar/g1.wav": sine(440, 3.0, amp=0.3), "guitar/g2.wav": sine(660, 3.0, amp=0.3)}
    for name, x in parts.items():
        (track / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(track / name, x, SR, subtype="FLOAT")
    (track / "data.json").write_text(json.dumps({"song": "t", "artist": "a", "stems": []}))
    got = converted(capsys, "moisesdb", "--src", tmp_path / "moisesdb", "--out", tmp_path / "m")
    assert list(got) == ["0a1b-track"] and sorted(got["0a1b-track"]) == ["bass", "drums", "guitar"]
    np.testing.assert_allclose(got["0a1b-track"]["guitar"],
                               parts["guitar/g1.wav"] + parts["guitar/g2.wav"], atol=2e-3)
    np.testing.assert_allclose(got["0a1b-track"]["bass"], parts["bass/b1.wav"], atol=2e-3)
    track = tmp_path / "slakh" / "train" / "Track00001"
    (track / "stems").mkdir(parents=True)
    parts = {"S00": sine(110, 3.0), "S01": sine(330, 3.0), "S02": sine(440, 3.0, amp=0.3),
             "S03": sine(660, 3.0, amp=0.3)}
    for sid, x in parts.items():
        sf.write(track / "stems" / f"{sid}.flac", x, SR, subtype="PCM_24")
    (track / "metadata.yaml").write_text(SLAKH_METADATA)
    got = converted(capsys, "slakh", "--src", tmp_path / "slakh", "--out", tmp_path / "s")
    assert (tmp_path / "s" / "train" / "Track00001").is_dir()
    assert list(got) == ["Track00001"] and sorted(got["Track00001"]) == ["bass", "drums", "other"]
    np.testing.assert_allclose(got["Track00001"]["other"], parts["S02"] + parts["S03"], atol=2e-3)
    np.testing.assert_allclose(got["Track00001"]["drums"], parts["S01"], atol=2e-3)
    mine = converted(capsys, "slakh", "--src", tmp_path / "slakh", "--groups",
                     "low=Bass;keys=Piano,Organ", "--out", tmp_path / "mine")["Track00001"]
    assert sorted(mine) == ["keys", "low"]
    np.testing.assert_allclose(mine["keys"], parts["S03"], atol=2e-3)

def test_bench_counts_flops_by_hand_and_divides_by_the_step_time_and_the_peak(tmp_path,
                                                                              monkeypatch):
    """train_flops_per_sample for the tiny preset against a hand count: K = 5 x 25 tokens of D =
    192; a matmul (n x k)(k x m) is 2nkm; per block qkv, output projection, two MLP linears, QK^T
    and AV; 4 blocks and the 16 x 16 patch embedding; the predictor 2D -> 384 -> 384 -> 384 -> D;
    encoder and predictor forward and backward (3x), the target encoder forward (1x). bench, with
    a step time of 0.25 s and a peak of 1 MFLOP/s: samples/s = batch / step time, achieved =
    FLOPs x samples/s, MFU = achieved / peak."""
    bench = side_file("dev/bench.py")
    K, D = 125, 192
    block = 2 * K * D * 3 * D + 2 * K * D * D + 2 * K * D * 4 * D * 2 + 2 * K * K * D * 2
    encoder = 4 * block + 2 * K * 16 * 16 * D
    predictor = 2 * K * (2 * D * 384 + 384 * 384 + 384 * 384 + 384 * D)
    assert bench.train_flops_per_sample(sj.make_config("tiny")) == \
        3 * (encoder + predictor) + encoder == 2_397_696_000
    monkeypatch.setattr(bench, "matmul_peak", lambda device, dtype=torch.float32: 1e6)
    monkeypatch.setattr(bench, "median_time", lambda fn, device, *, warmup, repeats: 0.25)
    fields = dict(n_mels=32, chunk_seconds=0.16, dim=8, depth=1, heads=2, pred_hidden=16,
                  pred_layers=2)
    data = sj.write_toy_dataset(tmp_path / "toy", tracks=3, seconds=2.0)
    r = bench.bench(preset="tiny", batch_size=2, device="cpu", steps=1, data=data, **fields)
    flops = bench.train_flops_per_sample(sj.make_config("tiny", **fields))
    assert (r["samples_per_s"], r["flops_per_sample"]) == (8.0, flops)
    assert (r["achieved_flops"], r["mfu"]) == pytest.approx((flops * 8, flops * 8 / 1e6))
