"""Tests of stem_jepa.py, in the module's order. Part one, the method: configuration and
front-end, encoder, predictor, loss (Eq. 1), EMA and schedules (Eq. 2, 3.3), sampler (3.2),
training (the step, the loop, resume, signals, torchrun), retrieval metrics (4.1). Part two:
checkpoints and locks, data (3.4) and bad input, evaluation (4.1-4.2), analyses (4.3-4.5), use of a
trained model (retrieve, score, embed, any length, HEAR), bench, command line, the tutorial.

Every test states the property it checks, and checks it against an independent computation,
an invariant, or a measured effect of training. Everything runs on a CPU: the tiny preset, 2 s
chunks where the chunk length does not matter, and small toy data sets. Tests that run the
command line in a subprocess, train for more than a few steps, or take over ~3 s are marked slow.

    python -m pytest -q test_stem_jepa.py                   # everything (what .ci/run runs)
    python -m pytest -q -m "not slow" test_stem_jepa.py     # the fast loop, under a minute
"""
from __future__ import annotations

import ast
import builtins
import contextlib
import copy
import csv
import dataclasses
import inspect
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


# ---------------------------------------------------------------------------------------------
# Helpers and shared fixtures
# ---------------------------------------------------------------------------------------------

HERE = Path(__file__).resolve().parent


SR = 16000


TOY_STEMS = ["bass", "drums", "other", "vocals"]


MUSDB_FREQS = {"bass": 110.0, "drums": 330.0, "other": 770.0, "vocals": 1500.0}


def tiny(**overrides) -> sj.Config:
    """The tiny preset with 2 s chunks (5 x 12 patches): the same code path, several times
    faster."""
    return sj.make_config("tiny", **{"chunk_seconds": 2.0, **overrides})


def mini(**overrides) -> sj.Config:
    """A minimal model (ViT width 32, 1 block) on the tiny preset's path, 2 s chunks: milliseconds
    a chunk, for tests where what matters is the plumbing, not what the model learnt."""
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
    spectrum = np.abs(np.fft.rfft(np.asarray(x, dtype=np.float64)))
    return float(np.argmax(spectrum) * sr / len(x))


def draw(stems: np.ndarray, chunk: int, rng, *, threshold=0.1, tries=10):
    """sj.draw_example on a (S, N) numpy array (it takes a tensor), outputs as numpy arrays."""
    context, target, t = sj.draw_example(torch.from_numpy(stems), chunk, rng, threshold=threshold,
                                         tries=tries)
    return np.asarray(context), np.asarray(target), int(t)


def read_log(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def start_cli(*args, merge_stderr=False) -> subprocess.Popen:
    """`python stem_jepa.py ARGS` started in a subprocess, as a user runs it: the one way the
    tests run the command line. merge_stderr: one stream, for reading progress lines."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    stderr = subprocess.STDOUT if merge_stderr else subprocess.PIPE
    return subprocess.Popen([sys.executable, str(HERE / "stem_jepa.py"), *map(str, args)],
                            cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)


def finish(proc: subprocess.Popen, timeout=300) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    """`python stem_jepa.py ARGS`, to its end."""
    return finish(start_cli(*args), timeout)


def run_cli_together(*commands) -> list[subprocess.CompletedProcess]:
    """Several `python stem_jepa.py ARGS` at once (most of each run is importing torch)."""
    return [finish(p) for p in [start_cli(*c) for c in commands]]


def train_cli(data, tmp_path, *extra):
    return run_cli("train", "--data", data, "--preset", "tiny", "--steps", 1, "--batch-size", 2,
                   "--workers", 0, "--out", tmp_path / "run", *extra)


def assert_user_error(result, *words):
    """Exit status 2, one short `error:` message naming the problem, no traceback. (Decoders may
    print their own warnings to stderr before it.)"""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert "\nerror: " in "\n" + result.stderr, result.stderr
    assert result.stderr.count("error: ") == 1, result.stderr
    message = result.stderr[result.stderr.index("error: "):]
    assert len(message.splitlines()) <= 10, message
    for word in words:
        assert word in message, (word, message)


def assert_trained(result, tmp_path):
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 1


def _wait_for_line(proc, needle, timeout=120):
    """Read the process's output until a line containing `needle`; returns everything read."""
    seen, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"never saw {needle!r}:\n{''.join(seen)}")


TINY_RUN = ["--preset", "tiny", "--batch-size", "4", "--workers", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_checkpoint(path: Path, cfg: sj.Config, instruments, *, seed=0) -> Path:
    """A checkpoint as `train` writes it, of a randomly initialised model whose target encoder
    differs from its context encoder (as after training)."""
    torch.manual_seed(seed)
    model = sj.build_model(cfg, list(instruments))
    with torch.no_grad():
        for p in model.target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path.parent.mkdir(parents=True, exist_ok=True)
    sj.save_checkpoint(path, {"version": sj.VERSION, "config": dataclasses.asdict(cfg), "step": 0,
                              "instruments": list(instruments), "model": model.state_dict()})
    return path


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """10 toy songs of 20 s: 8 in train/, 2 in test/."""
    return sj.write_toy_dataset(tmp_path_factory.mktemp("toy"), tracks=10, seconds=20.0, seed=0)


@pytest.fixture(scope="session")
def trained_run(toy_data, tmp_path_factory):
    """One tiny model trained for 150 steps of batch 8 on the toy songs: (model, run folder)."""
    out = tmp_path_factory.mktemp("trained")
    cfg = tiny(steps=150, batch_size=8, log_every=10)
    model = sj.train(cfg, toy_data, out=out, workers=0, log=lambda *a, **k: None).model
    return model, out


@pytest.fixture(scope="module")
def mini_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("mini") / "checkpoint.pt", mini(), TOY_STEMS)


# =============================================================================================
# PART ONE: the method and its measure
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# Configuration and the 3.3 front-end
# ---------------------------------------------------------------------------------------------

def test_values_from_the_authors_code_say_so():
    """Where the paper's text is silent, the Config comment marks the value as the authors' code's
    ("[code]"): 16 kHz, f_min/f_max, the AdamW betas, weight decay, clipping at 3.0, both tau values
    and the 0.1 activity threshold."""
    source = inspect.getsource(sj.Config)
    for field in ("sample_rate", "f_min", "f_max", "beta1", "weight_decay:", "grad_clip",
                  "tau_start", "tau_end", "active_threshold"):
        line = next(l for l in source.splitlines() if l.strip().startswith(field))
        assert "[code]" in line, line


def slaney_mel_filterbank(*, sr, n_fft, n_mels, f_min, f_max) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangles equally spaced on the Slaney mel scale (linear below
    1 kHz, logarithmic above), each scaled to unit area (2 / bandwidth), written from the
    definition (Slaney's Auditory Toolbox, as in librosa)."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0

    def hz_to_mel(f):
        return f / f_sp if f < min_log_hz else min_log_mel + math.log(f / min_log_hz) / logstep

    def mel_to_hz(m):
        return m * f_sp if m < min_log_mel else min_log_hz * math.exp(logstep * (m - min_log_mel))

    mels = np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)
    edges = np.array([mel_to_hz(m) for m in mels])                  # (n_mels + 2,) Hz
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)                  # FFT bin centres
    fb = np.zeros((n_mels, len(freqs)))
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        for k, f in enumerate(freqs):
            rising, falling = (f - lo) / (mid - lo), (hi - f) / (hi - mid)
            fb[m, k] = max(0.0, min(rising, falling)) * 2.0 / (hi - lo)
    return fb


def test_logmel_matches_an_independent_stft_and_slaney_filterbank():
    """LogMel = log(SlaneyMel(|STFT|^2) + eps32), standardised with (-9.453, 3.569), on an STFT
    with n_fft 400, hop 160, periodic Hann, centred with reflect padding; an 8 s chunk gives
    801 frames of which the last is dropped: (80, 800)."""
    rng = np.random.default_rng(0)
    n = 128000
    wav = 0.1 * rng.standard_normal((2, n)) + np.stack([sine(440, 8.0), sine(3000, 8.0, amp=0.3)])
    wav = torch.tensor(wav, dtype=torch.float32)
    got = sj.LogMel()(wav)
    assert got.shape == (2, 80, 800)

    spec = torch.stft(wav.double(), n_fft=400, hop_length=160, win_length=400,
                      window=torch.hann_window(400, periodic=True, dtype=torch.float64),
                      center=True, pad_mode="reflect",
                      return_complex=True).abs() ** 2   # (B, 201, 801)
    assert spec.shape[-1] == 801
    fb = torch.tensor(slaney_mel_filterbank(sr=SR, n_fft=400, n_mels=80, f_min=50.0, f_max=8000.0))
    mel = torch.einsum("mf,bfl->bml", fb, spec)[..., :800]
    eps = float(np.finfo(np.float32).eps)
    want = (torch.log(mel + eps) + 9.453) / 3.569
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-4)


# ---------------------------------------------------------------------------------------------
# 3.3 Encoder: ViT-Base, 2D sin-cos positions
# ---------------------------------------------------------------------------------------------

def test_vit_tokens_are_frequency_major():
    """Token k of the (F, T) patch grid is k = f * T + t (f = 0 the lowest 16 mel bins), its
    position code is pos[f, t], and the output grid (B, F, T, D) puts it back at (f, t).
    A time-major order (k = t * F + f) would put the lone patch at another token index."""
    recorded = {}

    class Record(nn.Module):
        def forward(self, x):
            recorded["x"] = x.detach().clone()
            return x

    vit = sj.ViT(n_mels=80, max_frames=160, dim=8, depth=1, heads=1)     # F = 5, T = 10
    vit.blocks = nn.ModuleList([Record()])
    Fp, T = 5, 10

    # 1. positions alone (a silent input and zero patch-embedding bias): token f*T+t == pos[f, t]
    vit(torch.zeros(1, 80, 160))
    torch.testing.assert_close(recorded["x"][0], vit.pos.reshape(Fp * T, 8), rtol=0, atol=0)
    for f, t in [(0, 0), (1, 3), (4, 9), (3, 2)]:
        assert torch.equal(recorded["x"][0, f * T + t], vit.pos[f, t])

    # 2. one non-zero patch at (f0, t0) with the positions zeroed: only token f0*T+t0 is non-zero
    with torch.no_grad():
        vit.pos.zero_()
    f0, t0 = 1, 3
    mel = torch.zeros(1, 80, 160)
    mel[0, 16 * f0: 16 * (f0 + 1), 16 * t0: 16 * (t0 + 1)] = 1.0
    out = vit(mel)
    nonzero_tokens = recorded["x"][0].abs().sum(-1).nonzero().flatten().tolist()
    assert nonzero_tokens == [f0 * T + t0]                               # 13, not t0*F+f0 = 16
    assert out.shape == (1, Fp, T, 8)
    assert out[0].abs().sum(-1).nonzero().tolist() == [[f0, t0]]


def test_sincos_2d_codes_time_in_the_first_half_and_frequency_in_the_second():
    """sincos_2d(F, T, D) is (F, T, D); dims [0, D/2) depend on the time index only and equal
    sincos_1d(t, D/2); dims [D/2, D) depend on the frequency index only and equal
    sincos_1d(f, D/2); sincos_1d is sin(p w_i) then cos(p w_i), w_i = 10000^(-i / (D/4))."""
    Fp, T, D = 5, 50, 64
    pos = sj.sincos_2d(Fp, T, D)
    assert pos.shape == (Fp, T, D)
    time_half, freq_half = pos[..., : D // 2], pos[..., D // 2:]
    assert torch.equal(time_half, time_half[:1].expand(Fp, -1, -1))    # same for every f
    assert torch.equal(freq_half, freq_half[:, :1].expand(-1, T, -1))   # same for every t
    assert not torch.equal(time_half[:, 0], time_half[:, 1])            # but varies with t
    assert not torch.equal(freq_half[0], freq_half[1])                  # and with f
    assert torch.equal(time_half[0], sj.sincos_1d(torch.arange(T), D // 2))
    assert torch.equal(freq_half[:, 0], sj.sincos_1d(torch.arange(Fp), D // 2))

    half = D // 2
    naive = torch.tensor([[math.sin(p * 10000 ** (-i / (half // 2))) for i in range(half // 2)]
                          + [math.cos(p * 10000 ** (-i / (half // 2))) for i in range(half // 2)]
                          for p in range(T)])
    torch.testing.assert_close(sj.sincos_1d(torch.arange(T), half), naive.float(), rtol=0,
                               atol=1e-6)


def test_vit_positions_are_a_fixed_buffer_not_a_parameter():
    """The 2D sin-cos positions are not trained: a buffer of the ViT, absent from parameters()."""
    vit = sj.ViT(n_mels=80, max_frames=160, dim=16, depth=1, heads=2)
    assert "pos" in dict(vit.named_buffers())
    assert not any(p.data_ptr() == vit.pos.data_ptr() for p in vit.parameters())
    assert all("pos" not in name for name, _ in vit.named_parameters())
    assert torch.equal(vit.pos, sj.sincos_2d(5, 10, 16))


@pytest.fixture(scope="module")
def paper_model():
    return sj.build_model(sj.make_config("paper"), TOY_STEMS)


@pytest.mark.slow
def test_paper_encoder_is_vit_base_with_85253376_parameters(paper_model):
    """The paper preset's context encoder is ViT-B/16 without a CLS token or learned positions:
    exactly 85,253,376 trainable parameters; the target encoder is a frozen copy of the same
    size."""
    encoder, target = paper_model.encoder, paper_model.target_encoder
    assert sum(p.numel() for p in encoder.parameters() if p.requires_grad) == 85_253_376
    assert sum(p.numel() for p in target.parameters()) == 85_253_376
    assert not any(p.requires_grad for p in target.parameters())


@pytest.mark.slow
@torch.no_grad()
def test_paper_encoder_output_shapes(paper_model):
    """An 8 s chunk gives (B, 5, 50, 768) embeddings; a 3 s input uses the first 18 time
    positions and gives (B, 5, 18, 768)."""
    rng = np.random.default_rng(0)
    wav = torch.tensor(0.1 * rng.standard_normal((1, 128000)), dtype=torch.float32)
    assert paper_model.encode(wav).shape == (1, 5, 50, 768)
    assert paper_model.encode(wav[:, :48000], target=True).shape == (1, 5, 18, 768)


# ---------------------------------------------------------------------------------------------
# 3.1 Predictor
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mlp", "mlp-nocond", "transformer"])
@torch.no_grad()
def test_predictor_shapes_and_instrument_conditioning(kind):
    """Each predictor maps (B, F, T, D) to (B, F, T, D); "mlp" and "transformer" depend on the
    instrument id, "mlp-nocond" (the Table 1 ablation) does not."""
    torch.manual_seed(0)
    model = sj.build_model(tiny(predictor=kind), TOY_STEMS)
    z = torch.randn(2, 5, 12, 192)
    a = model.predictor(z, torch.tensor([0, 0]))
    b = model.predictor(z, torch.tensor([3, 3]))
    assert a.shape == (2, 5, 12, 192)
    assert model.predictor(z[:, :, :7], torch.tensor([0, 1])).shape == (2, 5, 7, 192)
    if kind == "mlp-nocond":
        assert torch.equal(a, b)
    else:
        assert (a - b).abs().max() > 1e-4


def test_instrument_embeddings_are_initialised_standard_normal():
    """The authors' code initialises the instrument embedding N(0, 1), for the MLP predictor
    (768-d in the paper preset) and for the Transformer predictor's instrument token alike (not
    ViT's std 0.02): over the 4 x 512 token values of the paper preset, mean ~0, std ~1."""
    torch.manual_seed(0)
    mlp = sj.MLPPredictor(dim=768, n_instruments=4)
    tf = sj.TransformerPredictor(dim=768, width=512, depth=1, heads=16, n_instruments=4)
    assert tuple(mlp.instrument.weight.shape) == (4, 768)
    assert tuple(tf.instrument.weight.shape) == (4, 512)
    for weight in (mlp.instrument.weight, tf.instrument.weight):
        assert abs(weight.mean().item()) < 0.1 and 0.9 < weight.std().item() < 1.1


@torch.no_grad()
def test_mlp_predictor_acts_on_each_patch_independently():
    """The MLP predictor is patch-wise (3.1): permuting the patches permutes the predictions."""
    torch.manual_seed(0)
    predictor = sj.build_model(tiny(), TOY_STEMS).predictor
    z, instrument = torch.randn(2, 5, 12, 192), torch.tensor([1, 2])
    perm = torch.randperm(12)
    torch.testing.assert_close(predictor(z[:, :, perm], instrument),
                               predictor(z, instrument)[:, :, perm])


# ---------------------------------------------------------------------------------------------
# Eq. 1 loss (and the song-contrast term)
# ---------------------------------------------------------------------------------------------

def naive_jepa_loss(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Eq. 1 with the authors' per-patch standardisation of the target, one vector at a time."""
    B, Fp, T, D = pred.shape
    total = 0.0
    for b in range(B):
        for f in range(Fp):
            for t in range(T):
                p = [float(v) for v in pred[b, f, t]]
                x = [float(v) for v in target[b, f, t]]
                mean = sum(x) / D
                var = sum((v - mean) ** 2 for v in x) / (D - 1)
                x = [(v - mean) / math.sqrt(var + 1e-6) for v in x]
                norm_p, norm_x = math.sqrt(sum(v * v for v in p)), math.sqrt(sum(v * v for v in x))
                total += sum((a / norm_p - c / norm_x) ** 2 for a, c in zip(p, x))
    return total / (B * Fp * T)


def test_jepa_loss_equals_eq1_with_standardised_targets():
    """jepa_loss = mean over patches of || p/|p| - t'/|t'| ||^2, t' = (t - mean) / sqrt(var + 1e-6)
    with the unbiased variance, computed here with explicit loops."""
    torch.manual_seed(0)
    pred = torch.randn(2, 2, 3, 16)
    target = 3.0 * torch.randn(2, 2, 3, 16) + 1.5                       # non-zero mean and scale
    assert sj.jepa_loss(pred, target).item() == pytest.approx(naive_jepa_loss(pred, target),
                                                              rel=1e-5)


def test_jepa_loss_is_zero_for_the_centred_target_and_not_for_the_raw_one():
    """The loss is invariant to the target's per-patch offset and scale and to the prediction's
    positive scale: predicting any positive multiple of t - mean(t) gives 0, predicting the raw
    target t (non-zero mean) does not, and predicting -(t - mean(t)) gives the maximum, 4."""
    torch.manual_seed(0)
    target = torch.randn(2, 5, 4, 32) + 2.0
    centred = target - target.mean(-1, keepdim=True)
    assert sj.jepa_loss(0.1 * centred, target).item() == pytest.approx(0.0, abs=1e-6)
    assert sj.jepa_loss(7.0 * centred, 5.0 * target - 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert sj.jepa_loss(target, target).item() > 0.05
    assert sj.jepa_loss(-centred, target).item() == pytest.approx(4.0, abs=1e-5)


def test_song_contrast_loss_equals_infonce_among_the_same_instrument_by_hand():
    """song_contrast_loss: for each sample, -log softmax over the pooled targets of the samples of
    its own instrument (itself included) at its own target, averaged over the batch; a sample
    alone with its instrument contributes 0."""
    torch.manual_seed(0)
    pred, target = torch.randn(6, 2, 3, 8), torch.randn(6, 2, 3, 8)
    inst = torch.tensor([0, 1, 0, 0, 1, 2])
    q, r = sj.pool(pred), sj.pool(target)
    want = 0.0
    for i in range(6):
        mine = [j for j in range(6) if inst[j] == inst[i]]
        if len(mine) == 1:
            continue                                                    # no negative: contributes 0
        logits = torch.stack([q[i] @ r[j] / 0.5 for j in mine])
        want -= (logits[mine.index(i)] - torch.logsumexp(logits, 0)).item() / 6
    got = sj.song_contrast_loss(pred, target, inst, temperature=0.5)
    assert got.item() == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Eq. 2 EMA and the 3.3 schedules
# ---------------------------------------------------------------------------------------------

def test_ema_update_is_tau_target_plus_one_minus_tau_online():
    """Eq. 2, ema_update: tau = 1 keeps the target, tau = 0 copies the online weights, any tau gives
    tau * target + (1 - tau) * online, for every tensor."""
    torch.manual_seed(0)
    online = [torch.randn(3, 4), torch.randn(5)]
    start = [torch.randn(3, 4), torch.randn(5)]

    for tau in (1.0, 0.0, 0.7, 0.996):
        target = [t.clone() for t in start]
        sj.ema_update(target, online, tau)
        for t, s, o in zip(target, start, online):
            if tau == 1.0:
                assert torch.equal(t, s)
            elif tau == 0.0:
                assert torch.equal(t, o)
            else:
                torch.testing.assert_close(t, tau * s + (1 - tau) * o, rtol=1e-6, atol=1e-6)


def test_tau_schedule_is_linear_from_tau0_to_tauT():
    """Eq. 2's tau_i: tau_at(0) = tau_0, tau_at(T) = tau_T, linear in between, tau_T after T."""
    assert sj.tau_at(0, 1000, 0.99995, 0.99999) == 0.99995
    assert sj.tau_at(1000, 1000, 0.99995, 0.99999) == pytest.approx(0.99999, abs=1e-15)
    assert sj.tau_at(250, 1000, 0.996, 1.0) == pytest.approx(0.996 + 0.25 * 0.004, abs=1e-15)
    assert sj.tau_at(2000, 1000, 0.996, 1.0) == pytest.approx(1.0, abs=1e-15)


def test_lr_schedule_warms_up_linearly_then_anneals_to_zero():
    """3.3: lr rises linearly to the peak at the end of warmup, then a half cosine reaching 0
    at the last step."""
    peak, warmup, total = 1e-3, 10, 110
    lr = [sj.lr_at(s, peak_lr=peak, warmup_steps=warmup,
                   total_steps=total) for s in range(total + 1)]
    assert lr[0] == pytest.approx(peak / warmup)
    assert lr[warmup - 1] == pytest.approx(peak) and lr[warmup] == pytest.approx(peak)
    assert all(b - a == pytest.approx(peak / warmup) for a, b in zip(lr[:warmup - 1], lr[1:warmup]))
    assert lr[total] == pytest.approx(0.0, abs=1e-15)
    for s in (30, 60, 100):
        progress = (s - warmup) / (total - warmup)
        assert lr[s] == pytest.approx(0.5 * peak * (1 + math.cos(math.pi * progress)))
    assert all(a >= b for a, b in zip(lr[warmup:], lr[warmup + 1:]))


def test_lr_schedule_with_a_floor_anneals_to_the_floor():
    """min_ratio: the cosine goes from the peak to min_ratio x peak instead of 0; warmup
    unchanged."""
    lr = [sj.lr_at(s, peak_lr=1.0, warmup_steps=10, total_steps=110,
                   min_ratio=0.1) for s in range(111)]
    assert (lr[9], lr[110], lr[60]) == pytest.approx((1.0, 0.1, 0.55))
    assert min(lr[10:]) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# 3.2 Sampler
# ---------------------------------------------------------------------------------------------

def test_choose_stems_draws_an_active_target_and_a_disjoint_active_context():
    """3.2, over 5000 draws: the target is active; the context is a non-empty set of active stems
    without the target; all context sizes 1..|A|-1 occur; every active stem is sometimes the
    target, about equally often. Active means peak > threshold (strictly)."""
    rng = np.random.default_rng(0)
    peaks = np.array([0.5, 0.05, 0.3, 0.9, 0.1, 0.2])                  # active: 0, 2, 3, 5
    active = {0, 2, 3, 5}
    targets, sizes = [], []
    for _ in range(5000):
        target, context = sj.choose_stems(peaks, rng, 0.1)
        context = [int(c) for c in context]
        assert target in active
        assert 1 <= len(context) and set(context) <= active - {target}
        assert len(set(context)) == len(context)
        targets.append(target)
        sizes.append(len(context))
    assert set(sizes) == {1, 2, 3}
    counts = np.bincount(targets, minlength=6)[sorted(active)]
    assert counts.min() > 0.8 * 5000 / 4 and counts.max() < 1.2 * 5000 / 4


def test_choose_stems_needs_two_active_stems():
    """Fewer than 2 stems above the threshold: no example (None); exactly 2: one is the target,
    the other the context."""
    rng = np.random.default_rng(0)
    assert sj.choose_stems(np.array([0.0, 0.0, 0.0]), rng, 0.1) is None
    assert sj.choose_stems(np.array([0.9, 0.05, 0.1]), rng, 0.1) is None   # 0.1 is not above 0.1
    for _ in range(50):
        target, context = sj.choose_stems(np.array([0.9, 0.05, 0.5]), rng, 0.1)
        assert {target, *map(int, context)} == {0, 2} and len(context) == 1


def test_draw_example_redraws_chunks_until_two_stems_are_active():
    """A 10 s track whose first 2 s hold one stem only: every example comes from a chunk with
    >= 2 active stems (footnote 2), seen at the chunk's last sample, which always lies in the
    valid part. Stems are constants 0.2, 0.4, 0.8, so the context's value names its stems."""
    values = np.array([0.2, 0.4, 0.8], dtype=np.float32)
    stems = np.repeat(values[:, None], 10 * SR, axis=1)
    stems[1:, : 2 * SR] = 0.0                                          # 0-2 s: stem 0 alone
    rng = np.random.default_rng(0)
    n_partial = 0
    for _ in range(2000):
        context, target, t = draw(stems, SR, rng, tries=10)
        assert context.shape == target.shape == (SR,)
        assert target[-1] == values[t]
        members = {i for i in range(3) if (round(float(context[-1]) / 0.2) >> i) & 1}
        assert members and t not in members                             # non-empty, disjoint
        n_partial += bool((context == 0).any())
    assert n_partial > 0                                               # chunks did straddle 2 s

    # Without redraws (tries=1) chunks in the first 2 s would give a silent context.
    rng = np.random.default_rng(0)
    silent = sum(not draw(stems, SR, rng, tries=1)[0].any() for _ in range(300))
    assert silent > 0


def test_draw_example_falls_back_to_the_two_loudest_stems_of_the_last_chunk():
    """When `tries` chunks in a row have < 2 active stems, the example is the last chunk's
    loudest stem as target and its second loudest as context. Track: three quiet stems (peaks
    0.05, 0.03, 0.08, below 0.1) with stems 0 and 1 loud in one 0.1 s spot; the stems are
    increasing ramps, so a chunk's first sample tells its offset."""
    n, chunk = 20 * SR, SR
    ramp = np.linspace(0.5, 1.0, n, dtype=np.float64)
    stems = np.stack([0.05 * ramp, 0.03 * ramp, 0.08 * ramp]).astype(np.float32)
    spot = slice(10 * SR, 10 * SR + 1600)
    stems[0, spot] = 0.5
    stems[1, spot] = 0.6
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


def test_draw_example_zero_pads_a_track_shorter_than_the_chunk():
    """A 1.5 s track with 2 s chunks: outputs of exactly 32000 samples, the track then zeros."""
    stems = np.stack([sine(200, 1.5), sine(300, 1.5), sine(500, 1.5)])
    context, target, t = draw(stems, 2 * SR, np.random.default_rng(0))
    assert context.shape == target.shape == (2 * SR,)
    assert np.array_equal(target[:24000], stems[t]) and not target[24000:].any()
    assert not context[24000:].any() and context[:24000].any()


# ---------------------------------------------------------------------------------------------
# 3.3 Training: the step, the loop, and what keeps a run alive
# ---------------------------------------------------------------------------------------------

def test_no_gradient_reaches_the_target_encoder():
    """After StemJEPA.forward and backward, the target encoder (a full copy of the context
    encoder at init) has no gradients and no trainable parameters, while every parameter of the
    context encoder and of the predictor received one."""
    torch.manual_seed(0)
    model = sj.build_model(tiny(), TOY_STEMS)
    for a, b in zip(model.encoder.state_dict().values(),
                    model.target_encoder.state_dict().values()):
        assert torch.equal(a, b)
    context, target = 0.3 * torch.randn(2, 32000), 0.3 * torch.randn(2, 32000)
    model(context, target, torch.tensor([0, 2])).backward()
    for p in model.target_encoder.parameters():
        assert p.grad is None and not p.requires_grad
    for name, p in [*model.encoder.named_parameters(), *model.predictor.named_parameters()]:
        assert p.grad is not None, name
    assert all(p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_training_step_under_bf16_autocast_matches_float32():
    """The GPU path runs the step under bf16 autocast. Exercised here with the CPU's bf16 autocast:
    the front-end stays float32 (an STFT in bf16 would lose the quiet bins), the loss is computed
    in float32 and is within bf16 rounding of the float32 loss, and the step applies."""
    torch.manual_seed(0)
    model = sj.build_model(tiny(), TOY_STEMS)
    context = 0.3 * torch.randn(2, 32000)
    target = 0.3 * torch.randn(2, 32000)
    instrument = torch.tensor([0, 2])
    with torch.no_grad():
        exact = model(context, target, instrument)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.frontend(context).dtype == torch.float32
            low = model(context, target, instrument)
    # the matmuls did run in bf16
    assert low.dtype == torch.float32 and low.item() != exact.item()
    assert abs(low.item() - exact.item()) < 0.03 * exact.item()
    optimizer = torch.optim.AdamW(sj.param_groups(model, 0.05), lr=1e-3, fused=True)
    before = model.encoder.blocks[0].attn.qkv.weight.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, applied = sj.training_step(model, optimizer, context, target, instrument, lr=1e-3,
                                         tau=0.99)
    after = model.encoder.blocks[0].attn.qkv.weight
    assert applied and torch.isfinite(loss) and not torch.equal(before, after)


@pytest.mark.slow
def test_training_step_through_torch_compile_matches_eager():
    """--compile wraps the model in torch.compile; the step must accept the wrapper and give the
    eager step's loss and update. Dynamo traces the model here (backend "eager" skips the C++
    code generation, which takes minutes on a CPU)."""
    context = 0.3 * torch.randn(2, 32000)
    target = 0.3 * torch.randn(2, 32000)
    instrument = torch.tensor([0, 2])
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = sj.build_model(tiny(), TOY_STEMS)
        optimizer = torch.optim.AdamW(sj.param_groups(model, 0.05), lr=1e-3, fused=True)
        loss_fn = torch.compile(model, backend="eager") if compiled else None
        loss, applied = sj.training_step(model, optimizer, context, target, instrument, lr=1e-3,
                                         tau=0.99,
                                         loss_fn=loss_fn)
        results.append((loss.item(), model.encoder.blocks[0].attn.qkv.weight.detach().clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_grad_scaler_step_equals_the_unscaled_step_and_skips_an_overflow():
    """training_step with a GradScaler (the fp16 path, run here in fp32 on the CPU): with a scale
    of 2^10 and clipping active, the weights and the target encoder after the step equal those of
    the step without a scaler (the gradients are unscaled before clipping). With a scale of 2^127
    and a loss 10^6 times larger the scaled gradients overflow: the step is skipped (weights and
    EMA target unchanged) and the scale is halved."""
    torch.manual_seed(0)
    base = sj.build_model(mini(), TOY_STEMS)
    context = torch.from_numpy(np.stack([noise(2.0, s) for s in range(4)]))
    target = torch.from_numpy(np.stack([noise(2.0, s + 10) for s in range(4)]))
    instrument = torch.tensor([0, 1, 2, 3])

    def step(scaler, loss_factor=1.0):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(sj.param_groups(model, 0.05), lr=0.0)
        _, applied = sj.training_step(model, opt, context, target, instrument, lr=1e-3, tau=0.9,
                                      grad_clip=0.01, precision="fp32", scaler=scaler,
                                      loss_fn=lambda *batch: loss_factor * model(*batch))
        return model, applied

    plain, applied = step(None)
    assert applied
    scaled, applied = step(torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    assert applied
    for (name, a), b in zip(plain.state_dict().items(), scaled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    moved = plain.state_dict()["encoder.norm.weight"] - base.state_dict()["encoder.norm.weight"]
    assert moved.abs().max() > 0
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    skipped, applied = step(scaler, loss_factor=1e6)
    assert not applied and scaler.get_scale() == 2.0 ** 126
    for (name, a), b in zip(base.state_dict().items(), skipped.state_dict().values()):
        assert torch.equal(a, b), name


def test_grad_accumulation_gives_the_full_batch_gradient():
    """grad_accum micro-batches add up to the gradient of the whole batch (the loss of each is
    divided by their number), so the update does not depend on how the batch is split."""
    cfg = tiny()
    context = 0.3 * torch.randn(4, 32000)
    target = 0.3 * torch.randn(4, 32000)
    instrument = torch.tensor([0, 1, 2, 3])
    weights = []
    for accum in (1, 2):
        torch.manual_seed(0)
        model = sj.build_model(cfg, TOY_STEMS)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        sj.training_step(model, optimizer, context, target, instrument, lr=1.0, tau=1.0,
                         grad_clip=1e9,
                         grad_accum=accum)
        weights.append(model.encoder.blocks[0].mlp[0].weight.detach().clone())
    assert torch.allclose(weights[0], weights[1], atol=1e-5)


def test_paper_preset_decays_every_parameter_and_m2d_grouping_is_an_option():
    """The authors' code applies weight decay 0.05 to every parameter, norms, biases and the
    instrument embedding included: so do the paper preset's parameter groups. With
    weight_decay_all=False (M2D's grouping) exactly the parameters with fewer than 2 dims and
    the instrument embedding go undecayed, and every weight matrix is decayed."""
    paper = sj.make_config("paper")
    assert paper.weight_decay_all is True and paper.weight_decay == 0.05
    model = sj.build_model(sj.make_config("tiny"), TOY_STEMS)
    trainable = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    for decay_all in (True, False):
        decay = {id(p): g["weight_decay"] for g in sj.param_groups(model, 0.05, decay_all=decay_all)
                 for p in g["params"]}
        assert decay.keys() == trainable.keys()
        for name, p in model.named_parameters():
            if p.requires_grad:
                exempt = not decay_all and (p.ndim < 2 or name.startswith("predictor.instrument"))
                assert decay[id(p)] == (0.0 if exempt else 0.05), (decay_all, name)
    names = [trainable[i] for i, wd in decay.items() if wd == 0.0]                  # M2D's
    assert "predictor.instrument.weight" in names and "encoder.norm.bias" in names
    assert "encoder.blocks.0.attn.qkv.weight" not in names


@pytest.mark.slow
def test_train_builds_the_optimizer_from_weight_decay_all(tmp_path):
    """`train` decays every parameter with weight_decay_all (the paper preset's setting): its
    checkpoint's optimizer has weight decay 0.05 on all trainable parameters; the tiny preset's
    M2D grouping leaves the 1-d ones and the instrument embedding at 0."""
    data = tmp_path / "data"
    write_track(data / "song", {s: sine(f, 2.0) for s, f in MUSDB_FREQS.items()})
    for decay_all in (True, False):
        cfg = tiny(steps=1, batch_size=2, weight_decay_all=decay_all)
        out = tmp_path / f"run{decay_all}"
        model = sj.train(cfg, data, out=out, workers=0, log=lambda *a: None).model
        groups = torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]
        decayed = sum(len(g["params"]) for g in groups["param_groups"] if g["weight_decay"] == 0.05)
        n = sum(p.requires_grad for p in model.parameters())
        exempt = sum(p.requires_grad and (p.ndim < 2 or name.startswith("predictor.instrument"))
                     for name, p in model.named_parameters())
        assert decayed == (n if decay_all else n - exempt), (decay_all, decayed, n, exempt)
    assert sj.make_config("tiny").weight_decay_all is False


def test_collapse_measures_tell_a_mix_blind_predictor_from_one_that_reads_the_mix():
    """A predictor that outputs one vector per instrument has prediction spread 0; the average-stem
    loss is Eq. 1 of the leave-one-out mean unit target of the same instrument (computed here
    sample by sample); a predictor that outputs the (standardised) target itself gets batch
    loss 0, below the average stem."""
    torch.manual_seed(0)
    target = torch.randn(6, 2, 3, 16) + 0.5
    # instrument 2 occurs once: left out
    inst = torch.tensor([0, 0, 0, 1, 1, 2])
    blind = torch.randn(3, 1, 1, 16)[inst].expand(-1, 2, 3, -1)
    m = sj.collapse_measures(blind, target, inst)
    assert m["pred_spread"] == pytest.approx(0.0, abs=1e-6) and m["target_spread"] > 0.5
    unit = sj.unit_targets(target)
    want = []
    for i in range(5):
        others = [j for j in range(5) if inst[j] == inst[i] and j != i]
        mean = F.normalize(unit[others].mean(0), dim=-1)
        want.append((mean - unit[i]).pow(2).sum(-1).mean().item())
    assert m["avg_stem_loss"] == pytest.approx(np.mean(want), rel=1e-5)
    reader = sj.collapse_measures(target - target.mean(-1, keepdim=True), target, inst)
    assert reader["batch_loss"] == pytest.approx(0.0, abs=1e-6)
    assert reader["avg_stem_loss"] > 0.1
    assert reader["pred_spread"] == pytest.approx(reader["target_spread"], rel=1e-5)


def test_quiet_mode_keeps_the_results_and_drops_the_progress_lines(toy_data, tmp_path):
    """verbose=False: train prints the last step's line only (log.csv still has a row per
    log_every steps) and every other line as before; evaluate prints its table but no per-track
    progress."""
    printed = {True: [], False: []}
    for verbose, lines in printed.items():
        out = tmp_path / f"run-{verbose}"
        sj.train(mini(steps=3, batch_size=2, log_every=1), toy_data, out=out, workers=0,
                 log=lines.append, verbose=verbose)
        assert len(read_log(out / "log.csv")) == 3
    steps = {v: [l for l in lines if l.startswith("step ")] for v, lines in printed.items()}
    assert len(steps[True]) == 3 and len(steps[False]) == 1
    assert steps[False][0].startswith("step 3/3 ")
    assert [l for l in printed[False] if not l.startswith("step ")] == \
        [l for l in printed[True] if not l.startswith("step ")]
    for verbose in (True, False):
        lines = []
        result = sj.evaluate(tmp_path / f"run-{verbose}" / "checkpoint.pt", toy_data,
                             cache=tmp_path / f"cache-{verbose}", log=lines.append,
                             verbose=verbose)
        assert sj.format_table(result) in lines
        assert any(l.startswith("  embedded") for l in lines) == verbose


@pytest.mark.slow
def test_training_lowers_the_loss(trained_run):
    """150 steps of batch 8 on 8 toy songs lower the loss: the mean of the last three logged
    losses (steps 121-150) lies below the first (steps 1-10) by more than 0.65 (measured:
    1.97 -> 0.62, so the margin is about half the drop), and the target embeddings did not
    collapse (their spread across the batch stays above 0.1; measured 0.3)."""
    model, out = trained_run
    rows = read_log(out / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(10, 151, 10))
    first, last = float(rows[0]["loss"]), np.mean([float(r["loss"]) for r in rows[-3:]])
    assert last < first - 0.65, (first, last)
    assert float(rows[-1]["embedding_spread"]) > 0.1
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 150


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(toy_data, tmp_path):
    """Training 6 steps straight, or 3 steps (stop_at) and then 3 more with resume=True, gives
    the same log (loss, lr, tau, spread per step) and bit-identical weights, optimizer included;
    the resumed part runs with a loader worker, so the data order does not depend on workers."""
    cfg = tiny(steps=6, batch_size=4, warmup_steps=2, log_every=1)
    quiet = dict(log=lambda *a, **k: None)
    a = sj.train(cfg, toy_data, out=tmp_path / "a", workers=0, **quiet).model
    sj.train(cfg, toy_data, out=tmp_path / "b", workers=0, stop_at=3, **quiet)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 3
    assert len(read_log(tmp_path / "b" / "log.csv")) == 3
    b = sj.train(cfg, toy_data, out=tmp_path / "b", workers=1, resume=True, **quiet).model

    columns = ("step", "loss", "lr", "tau", "embedding_spread", "skipped")
    log_a, log_b = read_log(tmp_path / "a" / "log.csv"), read_log(tmp_path / "b" / "log.csv")
    assert len(log_a) == 6
    assert [[r[c] for c in columns] for r in log_a] == [[r[c] for c in columns] for r in log_b]
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k
    opt_a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["optimizer"]["state"]
    opt_b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["optimizer"]["state"]
    for i in opt_a:
        for k in opt_a[i]:
            assert torch.equal(opt_a[i][k], opt_b[i][k])


@pytest.mark.slow
def test_resume_mid_log_window_reproduces_the_log(toy_data, tmp_path):
    """A run interrupted between two log lines (log_every 2, stopped at step 3) and resumed
    writes the same log as the uninterrupted run: the row of step 4 is the mean over steps 3-4."""
    cfg = tiny(steps=4, batch_size=2, warmup_steps=2, log_every=2)
    quiet = dict(log=lambda *a, **k: None)
    sj.train(cfg, toy_data, out=tmp_path / "a", workers=0, **quiet)
    sj.train(cfg, toy_data, out=tmp_path / "b", workers=0, stop_at=3, **quiet)
    sj.train(cfg, toy_data, out=tmp_path / "b", workers=0, resume=True, **quiet)
    log_a, log_b = read_log(tmp_path / "a" / "log.csv"), read_log(tmp_path / "b" / "log.csv")
    assert [(r["step"], r["loss"]) for r in log_a] == [(r["step"], r["loss"]) for r in log_b]


TORCHRUN_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    import stem_jepa as sj
    data, out = sys.argv[2], sys.argv[3]
    cfg = sj.make_config("tiny", steps=5, batch_size=4, chunk_seconds=2.0, log_every=1)
    model = sj.train(cfg, data, out=os.path.join(out, "run"), workers=0).model
    torch.save(model.state_dict(), os.path.join(out, f"rank{os.environ['RANK']}.pt"))
""")


@pytest.mark.slow
def test_torchrun_replicas_train_in_step(toy_data, tmp_path):
    """Two processes under torchrun (gloo, CPU) end with identical weights (DDP averages the
    gradients, the EMA follows identical online weights), different from the initial weights,
    and rank 0's checkpoint holds them."""
    script = tmp_path / "run_ddp.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), str(script), str(HERE), str(toy_data),
                          str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 5 and len(read_log(tmp_path / "run" / "log.csv")) == 5
    assert r0.keys() == r1.keys() == ckpt["model"].keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        assert torch.equal(r0[k], ckpt["model"][k]), k

    cfg = sj.Config(**ckpt["config"])
    torch.manual_seed(cfg.seed)
    init = sj.build_model(cfg, ckpt["instruments"]).state_dict()
    for prefix in ("encoder.", "predictor.", "target_encoder."):
        changed = [k for k in r0 if k.startswith(prefix) and not torch.equal(r0[k], init[k])]
        assert changed, prefix


@pytest.mark.slow
def test_batch_that_does_not_divide_among_processes(tmp_path, toy_data):
    """Under torchrun with 2 processes, an odd batch size is one clear error line."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), str(HERE / 'stem_jepa.py'), "train",
                        "--data", str(toy_data),
                        "--out", str(tmp_path / "run"), "--preset", "tiny", "--batch-size", "3",
                        "--steps", "1"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    assert "--batch-size 3 does not divide among 2 processes" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_resume_appends_to_the_log(tmp_path, toy_data, sig):
    """Ctrl-C / SIGTERM: a checkpoint at the current step, exit status 128 + signal, a message
    saying how to resume; --resume then finishes the run and log.csv is appended, not rewritten."""
    run = tmp_path / "run"
    proc = start_cli("train", "--data", toy_data, "--out", run, "--steps", "2000", "--log-every",
                     "5",
                     *TINY_RUN, merge_stderr=True)
    _wait_for_line(proc, "step 10/")
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig.value, rest
    assert "--resume" in rest and "Traceback" not in rest
    stopped_at = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 10 <= stopped_at < 2000
    resumed = run_cli("train", "--data", toy_data, "--out", run, "--steps", "2000", "--log-every",
                      "5",
                      "--resume", "--stop-at", stopped_at + 10, *TINY_RUN)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == stopped_at + 10
    steps = [int(r["step"]) for r in csv.DictReader(open(run / "log.csv"))]
    # one row per 5 steps, none lost or repeated
    assert steps == list(range(5, stopped_at + 11, 5))


@pytest.mark.slow
def test_sigkill_while_saving_leaves_a_loadable_checkpoint(tmp_path, toy_data):
    """With a checkpoint written at every step, kill -9 at arbitrary moments: what is on disk always
    loads (the latest or the previous one), and the run resumes from it."""
    run = tmp_path / "run"
    for delay in (0.05, 0.2, 0.5):
        proc = start_cli("train", "--data", toy_data, "--out", run, "--steps", "100000",
                         "--ckpt-every", "1",
                         "--log-every", "1", "--resume", *TINY_RUN, merge_stderr=True)
        _wait_for_line(proc, "step ")
        while not (run / "checkpoint.pt").exists():     # output is unbuffered: the line can come
            time.sleep(0.01)                            # before the first checkpoint is written
        time.sleep(delay)
        proc.kill()
        proc.wait()
        ckpt = sj.load_checkpoint(run / "checkpoint.pt")
        assert ckpt["step"] >= 1
    resumed = run_cli("train", "--data", toy_data, "--out", run, "--steps", "100000",
                      "--ckpt-every", "1",
                      "--log-every", "1", "--resume", "--stop-at", ckpt["step"] + 2, *TINY_RUN)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run / 'checkpoint.pt'} at step" in resumed.stdout


@pytest.mark.slow
def test_resume_with_another_configuration_is_refused(tmp_path, toy_data):
    """A different architecture is refused, naming the difference; a different number of steps
    needs --force, and then trains on."""
    run = tmp_path / "run"
    assert run_cli("train", "--data", toy_data, "--out", run, "--steps", "4",
                   *TINY_RUN).returncode == 0
    other = run_cli("train", "--data", toy_data, "--out", run, "--steps", "4", "--predictor",
                    "transformer",
                    "--resume", *TINY_RUN)
    assert other.returncode == 2 and "predictor: mlp -> transformer" in other.stderr
    assert "Traceback" not in other.stderr
    longer = run_cli("train", "--data", toy_data, "--out", run, "--steps", "6", "--resume",
                     *TINY_RUN)
    assert longer.returncode == 2
    assert "steps: 4 -> 6" in longer.stderr and "--force" in longer.stderr
    forced = run_cli("train", "--data", toy_data, "--out", run, "--steps", "6", "--resume",
                     "--force", *TINY_RUN)
    assert forced.returncode == 0, forced.stderr
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 6


def test_resume_of_a_checkpoint_from_before_weight_decay_all_says_what_to_pass():
    """A checkpoint saved before the weight_decay_all field existed (its config lacks the key) was
    trained with M2D's grouping (False). Resuming it with the paper preset's True is refused
    naming False -> True, the option to pass and a new --out; the options parsed from the advice
    give a config that resumes."""
    import argparse
    cfg = sj.make_config("paper")
    saved = dataclasses.asdict(cfg)
    del saved["weight_decay_all"]
    ckpt = {"config": saved, "data": "tracks"}
    with pytest.raises(sj.StemJEPAError) as refused:
        sj.check_resume(ckpt, cfg, "tracks", force=False)
    message = str(refused.value)
    assert "weight_decay_all: False -> True" in message and "None" not in message
    assert "needs --no-weight-decay-all" in message and "new --out" in message
    parser = argparse.ArgumentParser()
    sj._add_train_options(parser)
    advised = parser.parse_args(["--preset", "paper", "--no-weight-decay-all"])
    sj.check_resume(ckpt, sj._config_from(advised), "tracks", force=False)


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, toy_data):
    """An absurd learning rate makes the loss non-finite: steps are skipped and counted, training
    stops after 5 in a row with a message, and the checkpoint on disk holds finite weights."""
    run = tmp_path / "run"
    bad = run_cli("train", "--data", toy_data, "--out", run, "--steps", "40", "--lr", "1e30",
                  "--ckpt-every", "1",
                  *TINY_RUN)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "not finite for 5 steps in a row" in bad.stderr and "Traceback" not in bad.stderr
    assert "step skipped" in bad.stdout
    ckpt = sj.load_checkpoint(run / "checkpoint.pt")
    assert ckpt["skipped"] >= 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_the_checkpoints_weights(tmp_path, monkeypatch):
    """train(init_from=CKPT) on data with instruments bass, drums and piano, from a checkpoint
    that knows bass, drums, other, vocals: at the first step, the encoder, target encoder and
    predictor equal the checkpoint's; the rows of bass and drums are the checkpoint's rows of those
    names; piano's row is the fresh initialisation (the model built from the config's seed), none
    of the checkpoint's; the optimizer is empty and the lr is the schedule's at step 0. The log
    names piano as new. Another architecture is refused, naming the difference."""
    cfg = mini(steps=2, batch_size=2, warmup_steps=5)
    ckpt_path = write_checkpoint(tmp_path / "source" / "checkpoint.pt", cfg, TOY_STEMS, seed=1)
    for i in range(2):
        # 12 s: every part plays (the toy parts enter one by one)
        stems, _ = sj.make_toy_song(np.random.default_rng(i), seconds=12.0)
        write_track(tmp_path / "data" / f"song{i}",
                    {"bass": stems["bass"], "drums": stems["drums"], "piano": stems["other"]})
    seen = []
    real_step = sj.training_step

    def recording_step(model, optimizer, *args, lr, **kwargs):
        if not seen:
            state = {k: v.clone() for k, v in model.state_dict().items()}
            seen.append((state, len(optimizer.state), lr))
        return real_step(model, optimizer, *args, lr=lr, **kwargs)

    monkeypatch.setattr(sj, "training_step", recording_step)
    lines = []
    sj.train(cfg, tmp_path / "data", out=tmp_path / "run", init_from=ckpt_path, workers=0,
             log=lambda *a: lines.append(" ".join(map(str, a))))
    state, optimizer_entries, lr = seen[0]
    ckpt = sj.load_checkpoint(ckpt_path)
    emb = "predictor.instrument.weight"
    assert state.keys() == ckpt["model"].keys()
    for name, value in ckpt["model"].items():
        if name != emb:
            assert torch.equal(state[name], value), name
    assert torch.equal(state[emb][0], ckpt["model"][emb][TOY_STEMS.index("bass")])
    assert torch.equal(state[emb][1], ckpt["model"][emb][TOY_STEMS.index("drums")])
    torch.manual_seed(cfg.seed)
    fresh = sj.build_model(cfg, ["bass", "drums", "piano"])
    assert torch.equal(state[emb][2], fresh.state_dict()[emb][2])
    assert not any(torch.equal(state[emb][2], row) for row in ckpt["model"][emb])
    assert optimizer_entries == 0
    peak = cfg.base_lr * cfg.batch_size / 256
    assert lr == sj.lr_at(0, peak_lr=peak, warmup_steps=5, total_steps=2)
    assert any("new instrument embeddings for piano" in line for line in lines), lines
    assert sj.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    with pytest.raises(sj.StemJEPAError, match="dim: 32 -> 48"):
        sj.init_from_checkpoint(sj.build_model(mini(dim=48), TOY_STEMS), ckpt)


@pytest.mark.slow
def test_soak_500_steps_with_a_corrupt_file(tmp_path):
    """500 steps of a minimal model on toy data with a corrupt file in the set: the file is reported
    once, the run finishes, and every logged loss is finite."""
    data = sj.write_toy_dataset(tmp_path / "toy", tracks=5, seconds=6.0)
    bad = sorted((data / "train").iterdir())[0] / "drums.wav"
    bad.write_bytes(os.urandom(3000))
    cfg = sj.make_config("tiny", dim=32, depth=1, heads=2, pred_hidden=64, pred_layers=2,
                         chunk_seconds=1.28,
                         batch_size=4, steps=500, warmup_steps=20, log_every=50, ckpt_every=250)
    lines = []
    sj.train(cfg, data, out=tmp_path / "run", workers=0,
             log=lambda *a: lines.append(" ".join(map(str, a))))
    assert sum(str(bad) in line for line in lines) == 1
    losses = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "run" / "log.csv"))]
    assert len(losses) == 10 and all(np.isfinite(losses))


# ---------------------------------------------------------------------------------------------
# 4.1 Retrieval metrics
# ---------------------------------------------------------------------------------------------

def on_a_line(*xs) -> torch.Tensor:
    """Points of a line as (n, 1) vectors: the L2 distance between two of them is |x - y|."""
    return torch.tensor(xs, dtype=torch.float64)[:, None]


def metrics_by_enumeration(queries, refs, truth, ks) -> dict:
    """Recall@K and normalised rank when ties are broken at random, by brute force: every order of
    the references that sorts them by distance to the query (tied ones in any order) is equally
    likely; average 1[rank <= K] and rank / R over those orders, the rank counted from 1 (nrank)
    and from 0 (nrank0)."""
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
            "nrank_mean": 100 * float(np.mean(nranks)),
            "nrank_median": 100 * float(np.median(nranks)),
            "nrank0_mean": 100 * float(np.mean(nranks - 1 / R)),
            "nrank0_median": 100 * float(np.median(nranks - 1 / R))}


def test_queries_that_ignore_the_mix_find_the_instrument_but_not_the_song():
    """A predictor that gives every song the same query for an instrument (the collapse the project
    watches for): which song? is at chance (R@1 = 1/N, normalised 1-based rank (N + 1) / 2N) and the
    same-instrument query cosine is 1, while queries equal to their references get both questions
    right."""
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


def test_which_song_and_which_instrument_rank_within_their_groups_by_hand():
    """Two songs x two instruments on a line; each query competes only with the references of
    its instrument (which song?) or of its song (which instrument?), ranks counted by hand."""
    refs = on_a_line(0, 10, 20, 30)          # rows: (song 0, inst 0), (0, 1), (1, 0), (1, 1)
    track, inst = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    queries = on_a_line(19, 11, 1, 31)
    # Ranks from 1. which song: q0 (true 0) vs {0, 20}: 20 is closer -> rank 2; q1 vs {10, 30}:
    # rank 1; q2 (true 20) vs {0, 20}: 0 closer -> rank 2; q3 vs {10, 30}: rank 1. R = 2 each.
    # which instrument: q0 vs {0, 10}: 10 closer -> 2; q1 vs {0, 10}: 1; q2 vs {20, 30}: 1; q3: 1.
    m = sj.which_song_and_instrument(queries, refs, track, inst)
    assert m["which_song"]["R@1"] == pytest.approx(50.0)
    assert m["which_song"]["nrank_mean"] == pytest.approx(100 * (2 + 1 + 2 + 1) / 4 / 2)
    assert m["which_instrument"]["R@1"] == pytest.approx(75.0)
    assert m["which_instrument"]["nrank_mean"] == pytest.approx(100 * (2 + 1 + 1 + 1) / 4 / 2)
    assert m["query_cosine"] == pytest.approx(1.0)     # 1-d vectors of one sign
    # one song: no two queries of an instrument from different songs, so no cosine (valid JSON)
    one = sj.which_song_and_instrument(queries[:2], refs[:2], track[:2], inst[:2])
    assert one["query_cosine"] is None and one["which_song"]["R@1"] == 100.0


def test_centred_which_song_ranks_after_removing_each_instruments_mean_by_hand():
    """which_song_centred: subtract from queries and references their instrument's mean vector,
    L2-normalise, rank among the same instrument's references; checked against a naive loop. A
    large common part with a small song-specific one (a "hub") gets the raw rank wrong and the
    centred one right."""
    torch.manual_seed(0)
    N, S, C = 5, 3, 8
    track, inst = torch.arange(N).repeat_interleave(S), torch.arange(S).repeat(N)
    common, own = torch.randn(S, C) * 10, torch.randn(N * S, C)
    weight = torch.where(track == 0, 0.2, 1.0)[:, None]      # song 0's stems near the average
    refs = common[inst] + weight * own
    queries = common[inst] + 0.4 * own                         # the song part, weaker
    m = sj.which_song_and_instrument(queries, refs, track, inst)
    ranks = []
    for i in range(N * S):
        def centred(x, j):
            same = [k for k in range(N * S) if inst[k] == inst[j]]
            v = x[j].double() - x[same].double().mean(0)
            return v / v.norm()
        q = centred(queries, i)
        d = {j: (q - centred(refs, j)).norm().item() for j in range(N * S) if inst[j] == inst[i]}
        ranks.append(1 + sum(dj < d[i] for dj in d.values()))
    assert m["which_song_centred"]["nrank_mean"] == pytest.approx(100 * np.mean(ranks) / N)
    assert m["which_song_centred"]["R@1"] == pytest.approx(100 * np.mean(np.array(ranks) == 1))
    assert m["which_song_centred"]["nrank_mean"] < m["which_song"]["nrank_mean"]


def test_each_query_equal_to_its_reference_gives_recall_100_and_rank_1():
    """Queries identical to their (distinct) references, in any order: R@1 = R@5 = R@10 = 100,
    rank 1 (nearest) for every query, so normalised rank 1/R = 1/9, mean and median (0 with the
    0-based nrank0)."""
    refs = torch.randn(9, 16, generator=torch.Generator().manual_seed(0))
    perfect = {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "nrank_mean": 100 / 9,
               "nrank_median": 100 / 9, "nrank0_mean": 0.0, "nrank0_median": 0.0}
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    for got in (sj.retrieval_metrics(refs.clone(), refs, torch.arange(9)),
                sj.retrieval_metrics(refs[perm], refs, perm)):
        assert got.keys() == perfect.keys()
        for key in perfect:
            assert got[key] == pytest.approx(perfect[key], abs=1e-9), key


def test_retrieval_metrics_on_points_of_a_line_by_hand():
    """References at 0, 10, ..., 110 (R = 12). Queries (position -> true reference), ranks counted
    from 1 (nearest = 1): 0 -> 0 (rank 1), 0 -> 20 (0 and 10 are closer: rank 3), 3 -> 50 (0..40
    closer: rank 6), 110 -> 0 (rank 12), 55 -> 40 (50 and 60 closer, 70 tied: rank 3 + 1/2). So
    R@1 = 1/5, R@3 = (2 + 1/2)/5 (the tied query is 3rd or 4th with equal chance), R@5 = 3/5,
    R@10 = 4/5, mean normalised rank (1 + 3 + 6 + 12 + 3.5) / 5 / 12, median 3.5 / 12; the
    0-based ones (nrank0) are 1/12 lower."""
    refs = on_a_line(*range(0, 120, 10))
    queries, truth = on_a_line(0, 0, 3, 110, 55), torch.tensor([0, 2, 5, 0, 4])
    m = sj.retrieval_metrics(queries, refs, truth, ks=(1, 3, 5, 10))
    want = {"R@1": 20.0, "R@3": 50.0, "R@5": 60.0, "R@10": 80.0,
            "nrank_mean": 100 * 25.5 / 60, "nrank_median": 100 * 3.5 / 12,
            "nrank0_mean": 100 * 20.5 / 60, "nrank0_median": 100 * 2.5 / 12}
    assert m.keys() == want.keys()
    for key in want:
        assert m[key] == pytest.approx(want[key], abs=1e-5), key
    closer, tied, _ = sj.retrieval_ranks(queries, refs, truth)
    assert closer.tolist() == [0, 2, 5, 11, 2] and tied.tolist() == [1, 1, 1, 1, 2]


def test_ties_count_as_random_tie_breaking():
    """With tied distances (duplicate references, equidistant ones), the metrics equal their
    expectation over every distance-sorted order of the references, enumerated: rank = 1 + #closer
    + #(tied others) / 2 and R@K = P(rank <= K)."""
    refs = on_a_line(0, 2, 2, 4, 6, 6)
    queries, truth = on_a_line(3, 3, 0, 2, 5), torch.tensor([0, 1, 5, 2, 3])
    ks = (1, 2, 3, 5)
    m = sj.retrieval_metrics(queries, refs, truth, ks=ks)
    want = metrics_by_enumeration(queries, refs, truth, ks)
    for key in want:
        assert m[key] == pytest.approx(want[key], abs=1e-5), key
    assert want["nrank_mean"] == pytest.approx(100 * (5 + 2 + 5.5 + 1.5 + 2) / 5 / 6)  # closed form


def test_identical_references_give_the_chance_level():
    """R identical references carry no information: every query gets rank (R + 1) / 2 (counted
    from 1), so the normalised rank is (R + 1) / 2 / R ((R - 1) / 2 / R counted from 0), R@1 = 1/R,
    R@5 = 5/R, R@10 = 100 % for R = 7, which is also what chance_metrics(7) says."""
    R = 7
    refs = torch.ones(R, 4)
    queries = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    m = sj.retrieval_metrics(queries, refs, torch.tensor([0, 3, 6, 2, 2]))
    want = {"R@1": 100 / R, "R@5": 500 / R, "R@10": 100.0,
            "nrank_mean": 100 * (R + 1) / 2 / R, "nrank_median": 100 * (R + 1) / 2 / R,
            "nrank0_mean": 100 * (R - 1) / 2 / R, "nrank0_median": 100 * (R - 1) / 2 / R}
    chance = sj.chance_metrics(R)
    for key in want:
        assert m[key] == pytest.approx(want[key], abs=1e-5), key
        assert chance[key] == pytest.approx(want[key], abs=1e-5), key


def test_normalised_rank_counts_from_one_as_table_1():
    """Table 1's median normalised rank 0.5 % is rank 3 of 600 (the authors' compute_recall:
    argmax + 1, divided by the number of references). 600 references at 0, 1, ..., 599 and five
    queries at 0 whose true references are 0, 2, 2, 9 and 599: ranks 1, 3, 3, 10 and 600 (1 =
    nearest). nrank_median is 3 / 600 = 0.5 %, nrank_mean (1 + 3 + 3 + 10 + 600) / 5 / 600;
    counted from 0, nrank0_median is 2 / 600. The chance level agrees: (R + 1) / 2 / R."""
    R = 600
    refs = on_a_line(*range(R))
    m = sj.retrieval_metrics(on_a_line(0, 0, 0, 0, 0), refs, torch.tensor([0, 2, 2, 9, 599]))
    assert m["nrank_median"] == pytest.approx(0.5, abs=1e-9)
    assert m["nrank_mean"] == pytest.approx(100 * 617 / 5 / R, abs=1e-9)
    assert m["nrank0_median"] == pytest.approx(100 * 2 / R, abs=1e-9)
    assert m["nrank0_mean"] == pytest.approx(100 * 612 / 5 / R, abs=1e-9)
    assert (m["R@1"], m["R@5"], m["R@10"]) == pytest.approx((20.0, 60.0, 80.0))
    chance = sj.chance_metrics(R)
    assert chance["nrank_mean"] == pytest.approx(100 * (R + 1) / 2 / R)
    assert chance["nrank0_mean"] == pytest.approx(100 * (R - 1) / 2 / R)


def test_chance_metrics_equal_the_average_over_all_rankings():
    """chance_metrics(R) is the expectation over the R! equally likely orders of R references of
    1[rank of the true one <= K] and rank / R, and the median of rank / R, enumerated for R = 5,
    the rank counted from 1 (nrank) and from 0 (nrank0)."""
    R = 5
    ranks = np.array([order.index(0) + 1 for order in itertools.permutations(range(R))])
    want = {**{f"R@{k}": 100 * np.mean(ranks <= k) for k in (1, 2, 5, 10)},
            "nrank_mean": 100 * np.mean(ranks / R), "nrank_median": 100 * np.median(ranks / R),
            "nrank0_mean": 100 * np.mean((ranks - 1) / R),
            "nrank0_median": 100 * np.median((ranks - 1) / R)}
    got = sj.chance_metrics(R, ks=(1, 2, 5, 10))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-5), key


@pytest.fixture(scope="module")
def two_encoders_model():
    """A randomly initialised tiny-preset model (4 s chunks: 64000 samples = 25 time patches) whose
    target encoder is perturbed, so that target and context embeddings differ."""
    torch.manual_seed(0)
    model = sj.build_model(sj.make_config("tiny"), TOY_STEMS).eval()
    with torch.no_grad():
        for p in model.target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("chunk_seconds", [4.0, 2.0])
@torch.no_grad()
def test_embed_long_covers_every_frame(chunk_seconds):
    """A recording of N samples gives T = ceil(N / 2560) time patches (2560 samples = 16 frames of
    10 ms = 160 ms) whatever N and the chunk length: shorter than a patch, exactly a patch, a
    chunk, a chunk + 1 sample, two chunks and a bit. 4 s is the tiny preset's chunk (25 whole
    patches); a 2 s chunk (12.5 patches, as in the tests' tiny()) must not drop the half patch
    at the end of every chunk nor fail on a last piece longer than 12 patches."""
    torch.manual_seed(0)
    model = sj.build_model(sj.make_config("tiny", chunk_seconds=chunk_seconds), TOY_STEMS).eval()
    chunk = int(chunk_seconds * SR)
    rng = np.random.default_rng(0)
    lengths = [1000, 2560, chunk, chunk + 1, 2 * chunk + 5000, chunk - 1000]
    wavs = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]
    out = sj.embed_long(model, wavs, chunk=chunk, batch=4)
    assert [tuple(z.shape) for z in out] == [(5, math.ceil(n / 2560), 192) for n in lengths]


@torch.no_grad()
def test_embed_long_equals_encode_and_predict_chunk_by_chunk(two_encoders_model):
    """embed_long cuts a recording into 4 s chunks and concatenates their patch embeddings: the
    first 25 time patches equal model.encode of the first chunk alone (target encoder by default,
    context encoder with target=False), with instruments= they equal model.predict, and the last
    patches equal the encoding of the zero-padded remainder. Batching several recordings together
    gives the same embeddings as one at a time."""
    model = two_encoders_model
    rng = np.random.default_rng(1)
    x = (0.1 * rng.standard_normal(2 * 64000 + 3000)).astype(np.float32)      # 25 + 25 + 2 patches
    first = torch.from_numpy(x[None, :64000])
    rest = torch.from_numpy(np.pad(x[128000:], (0, 5120 - 3000))[None])

    z = sj.embed_long(model, [x], chunk=64000)[0]
    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z[:, :25], model.encode(first, target=True)[0], **close)
    torch.testing.assert_close(z[:, 50:], model.encode(rest, target=True)[0], **close)
    context = sj.embed_long(model, [x], chunk=64000, target=False)[0]
    torch.testing.assert_close(context[:, :25], model.encode(first, target=False)[0], **close)
    assert (context - z).abs().max() > 1e-3                             # the two encoders differ
    q = sj.embed_long(model, [x], chunk=64000, instruments=[2])[0]
    torch.testing.assert_close(q[:, :25], model.predict(first, torch.tensor([2]))[0], **close)
    torch.testing.assert_close(q[:, 50:], model.predict(rest, torch.tensor([2]))[0], **close)

    wavs = [x, x[:70000], (0.1 * rng.standard_normal(64000)).astype(np.float32)]
    together = sj.embed_long(model, wavs, chunk=64000, instruments=[0, 3, 1], batch=3)
    for w, i, zt in zip(wavs, [0, 3, 1], together):
        torch.testing.assert_close(zt,
                                   sj.embed_long(model, [w], chunk=64000, instruments=[i],
                                                 batch=1)[0], **close)


@torch.no_grad()
def test_embeddings_are_float32_even_where_training_uses_autocast(two_encoders_model, monkeypatch):
    """Evaluation and the analyses embed in float32, as the authors' evaluation, even on a GPU where
    training runs under bf16 autocast. Here autocast_for is switched to the CPU's bf16 autocast
    (what CUDA gets), TF32 is allowed, and embed_long is called inside a bf16 autocast region: its
    patch embeddings and predictions still equal the float32 computation (bf16 would be off by
    ~1e-2), every Linear of the encoders and the predictor ran in float32 without TF32, and the
    caller's TF32 setting is restored afterwards."""
    model = two_encoders_model
    x = (0.1 * np.random.default_rng(3).standard_normal(64000)).astype(np.float32)
    want_z = model.encode(torch.from_numpy(x)[None], target=True)[0]
    want_q = model.predict(torch.from_numpy(x)[None], torch.tensor([1]))[0]
    seen = []

    def record(module, inputs, output):
        seen.append((output.dtype, torch.backends.cuda.matmul.allow_tf32,
                     torch.backends.cudnn.allow_tf32))
    layers = (model.target_encoder.blocks[0].attn.qkv, model.encoder.blocks[0].attn.qkv,
              model.predictor.net[0])
    hooks = [m.register_forward_hook(record) for m in layers]
    bf16 = torch.bfloat16
    monkeypatch.setattr(sj, "autocast_for", lambda device: torch.autocast("cpu", dtype=bf16))
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = sj.embed_long(model, [x], chunk=64000)[0]
            q = sj.embed_long(model, [x], chunk=64000, instruments=[1])[0]
        restored = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        for h in hooks:
            h.remove()
    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z, want_z, **close)
    torch.testing.assert_close(q, want_q, **close)
    assert len(seen) == 3 and set(seen) == {(torch.float32, False, False)}, seen
    assert restored == (True, True)


def naive_pool(z: torch.Tensor) -> np.ndarray:
    """pool, one number at a time: the time-average of each frequency row, the rows one after the
    other (row 0 first), minus their mean, over sqrt(population variance + 1e-5), over its L2
    norm."""
    n_freq, n_time, dim = z.shape
    v = []
    for f in range(n_freq):
        for d in range(dim):
            v.append(sum(float(z[f, t, d]) for t in range(n_time)) / n_time)
    mean = sum(v) / len(v)
    var = sum((a - mean) ** 2 for a in v) / len(v)
    y = [(a - mean) / math.sqrt(var + 1e-5) for a in v]
    norm = math.sqrt(sum(a * a for a in y))
    return np.array([a / norm for a in y])


def test_pool_equals_the_naive_computation():
    """4.1: pool (F, T, D) -> (F*D,) is time-average, frequency rows concatenated in order, layer
    norm without affine, L2 normalisation, checked against loops. (The L2 normalisation cancels the
    variance and eps scale: what the check pins is the centring and the row order; rows with
    different offsets make a wrong order show.)"""
    g = torch.Generator().manual_seed(0)
    z = 2.0 * torch.randn(5, 7, 6, generator=g) + torch.arange(5.0)[:, None, None] + 0.3
    got = sj.pool(z)
    assert got.shape == (30,)
    np.testing.assert_allclose(got.numpy(), naive_pool(z), atol=1e-6)
    assert got.norm().item() == pytest.approx(1.0, abs=1e-6) and abs(got.mean().item()) < 1e-6


# =============================================================================================
# PART TWO: what runs around the method
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# Training machinery: precision, checkpoints, the run lock
# ---------------------------------------------------------------------------------------------

def test_pick_precision(monkeypatch):
    """auto: bf16 on a CUDA GPU with native bf16, fp16 on one without (T4, V100), fp32 on a CPU;
    bf16 or fp16 asked for on a CPU, or bf16 on a GPU without it, is a StemJEPAError."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert sj.pick_precision("auto", cpu) == sj.pick_precision("fp32", cpu) == "fp32"
    for name in ("bf16", "fp16"):
        with pytest.raises(sj.StemJEPAError, match="CUDA"):
            sj.pick_precision(name, cpu)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    for native, auto in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: native)
        assert sj.pick_precision("auto", cuda) == auto
        assert sj.pick_precision("fp16", cuda) == "fp16"
        assert sj.pick_precision("fp32", cuda) == "fp32"
    with pytest.raises(sj.StemJEPAError, match="Tesla T4 has no native bf16"):
        sj.pick_precision("bf16", cuda)
    assert isinstance(sj.autocast_for(cpu, "fp16"), type(contextlib.nullcontext()))


@pytest.mark.slow
def test_not_a_checkpoint_and_other_versions_are_refused(tmp_path, toy_data):
    """`evaluate` on a file that is not a checkpoint, or one of another format version: one clear
    line."""
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    r = run_cli("evaluate", "--checkpoint", junk, "--data", toy_data)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not a readable checkpoint" in r.stderr
    old = tmp_path / "old.pt"
    torch.save({"version": 0, "config": {}, "model": {}}, old)
    r = run_cli("evaluate", "--checkpoint", old, "--data", toy_data)
    assert r.returncode == 2 and "format 0" in r.stderr and "Traceback" not in r.stderr


def test_exported_weights_are_float16_and_load_as_the_same_model(tmp_path):
    """`export` (save_weights) keeps the config, the instruments and the weights rounded to
    float16, drops everything else; from_checkpoint loads it as a float32 model whose parameters
    are the original's rounded to float16, and whose predictions match to float16 precision."""
    cfg = mini()
    ckpt = write_checkpoint(tmp_path / "run" / "checkpoint.pt", cfg, TOY_STEMS)
    run_cli("export", "--checkpoint", ckpt, "--out", tmp_path / "model.pt")
    weights = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "optimizer" not in weights
    assert all(v.dtype == torch.float16 for v in weights["model"].values() if v.is_floating_point())
    original, loaded = sj.StemJEPA.from_checkpoint(ckpt), sj.StemJEPA.from_checkpoint(
        tmp_path / "model.pt")
    assert loaded.config == original.config and loaded.instruments == original.instruments
    for (name, a), b in zip(original.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == a.dtype and torch.equal(b, a.half().to(a.dtype)), name
    wav = torch.from_numpy(0.1 * np.random.default_rng(0).standard_normal((2, 2 * SR))).float()
    ids = torch.tensor([0, 1])
    with torch.no_grad():
        p, q = original.predict(wav, ids), loaded.predict(wav, ids)
    assert torch.allclose(p, q, atol=0.05 * p.abs().max().item())


@pytest.mark.slow
def test_from_checkpoint_gives_the_trained_model_in_eval_mode(trained_run):
    """StemJEPA.from_checkpoint rebuilds the model that `train` returned: eval mode, the same
    config and instruments, and the same context and target embeddings and predictions for the
    same input (not those of a freshly initialised model)."""
    trained, run = trained_run
    loaded = sj.StemJEPA.from_checkpoint(run / "checkpoint.pt")
    assert not any(m.training for m in loaded.modules())
    assert loaded.config == trained.config
    assert loaded.instruments == trained.instruments == TOY_STEMS
    wav = 0.1 * np.random.default_rng(0).standard_normal((2, 2 * SR))
    wav = torch.from_numpy(wav.astype(np.float32))
    with torch.no_grad():
        for target in (False, True):
            assert torch.equal(loaded.encode(wav, target=target),
                               trained.encode(wav, target=target))
        ids = torch.tensor([0, 3])
        assert torch.equal(loaded.predict(wav, ids), trained.predict(wav, ids))
        torch.manual_seed(trained.config.seed)
        fresh = sj.build_model(trained.config, TOY_STEMS).eval()
        assert (fresh.encode(wav) - loaded.encode(wav)).abs().max() > 1e-3


@pytest.mark.slow
def test_out_naming_a_file_is_a_clear_error(tmp_path):
    """train --out naming an existing file: exit 2, one error line saying it is a file."""
    (tmp_path / "notes.txt").write_text("x")
    r = run_cli("train", "--data", tmp_path, "--out", tmp_path / "notes.txt", "--preset", "tiny")
    assert_user_error(r, "notes.txt", "is a file")


@pytest.mark.slow
def test_lock_refuses_a_second_live_run_and_is_stale_after_kill_9(tmp_path):
    """While a training runs into OUT, a second one into OUT is refused (exit 2) naming the first's
    pid; after kill -9 of the first its lock is left behind, recognised as stale (the process is
    gone), and --resume continues from the checkpoint; when that run ends the lock is gone."""
    data = sj.write_toy_dataset(tmp_path / "toy", tracks=3, seconds=6.0)
    run = tmp_path / "run"
    mini_run = ["--preset", "tiny", "--batch-size", "2", "--workers", "0", "--ckpt-every", "1",
                "--log-every", "1", "--steps", "100000"]
    first = start_cli("train", "--data", data, "--out", run, *mini_run, merge_stderr=True)
    try:
        _wait_for_line(first, "step 2/")
        assert (run / "train.lock").read_text().split()[0] == str(first.pid)
        second = run_cli("train", "--data", data, "--out", run, *mini_run)
        assert_user_error(second, f"pid {first.pid}", "in use by another training")
    finally:
        first.kill()
        first.wait()
    assert (run / "train.lock").exists()
    step = sj.load_checkpoint(run / "checkpoint.pt")["step"]
    resumed = run_cli("train", "--data", data, "--out", run, *mini_run, "--resume",
                      "--stop-at", step + 1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stale lock" in resumed.stdout and f"resuming {run / 'checkpoint.pt'}" in resumed.stdout
    assert not (run / "train.lock").exists()


@pytest.mark.slow
def test_lock_is_held_while_training_and_released_after_an_error(tmp_path, monkeypatch):
    """In-process: OUT/train.lock holds this process's pid during the steps, and is gone after the
    training raised an exception."""
    data = sj.write_toy_dataset(tmp_path / "toy", tracks=2, seconds=5.0)
    held = []

    def failing_step(*args, **kwargs):
        held.append((tmp_path / "run" / "train.lock").read_text().split()[0])
        raise RuntimeError("boom")

    monkeypatch.setattr(sj, "training_step", failing_step)
    with pytest.raises(RuntimeError, match="boom"):
        sj.train(mini(steps=3, batch_size=2), data, out=tmp_path / "run", workers=0,
                 log=lambda *a: None)
    assert held == [str(os.getpid())]
    assert not (tmp_path / "run" / "train.lock").exists()


# ---------------------------------------------------------------------------------------------
# 3.4 Data: layouts, decoding, the cache, bad input
# ---------------------------------------------------------------------------------------------

def test_prepare_musdb18hq_stereo_44k_to_16k_mono(tmp_path):
    """MUSDB18-HQ layout (44.1 kHz stereo, with mixture.wav): the cache holds (S, N) 16 kHz mono
    arrays, stems sorted, no mixture, each stem's dominant frequency kept, channels averaged
    (left 0.6 sin, right 0.2 sin -> 0.4 sin)."""
    seconds = 3.0
    t = np.arange(int(seconds * 44100)) / 44100
    stems = {s: np.stack([0.6 * np.sin(2 * np.pi * f * t), 0.2 * np.sin(2 * np.pi * f * t)], axis=1)
             for s, f in {**MUSDB_FREQS, "mixture": 5000.0}.items()}
    write_track(tmp_path / "musdb" / "train" / "Artist - Title", stems, sr=44100)
    (tracks,) = sj.prepare(tmp_path / "musdb", "train", chunk_seconds=2.0, log=lambda *a: None)
    assert tracks["name"] == "Artist - Title" and tracks["stems"] == sorted(MUSDB_FREQS)
    x = np.load(tracks["npy"]).astype(np.float32)
    assert x.shape == (4, tracks["length"]) and abs(x.shape[1] - seconds * SR) <= 16
    for row, stem in zip(x, tracks["stems"]):
        assert dominant_freq(row) == pytest.approx(MUSDB_FREQS[stem], abs=1.0)
        assert np.abs(row[SR:2 * SR]).max() == pytest.approx(0.4, abs=0.02)


def test_prepare_custom_folder_names_stems_after_files(tmp_path):
    """A folder of multitracks without train/ or test/: each sub-folder is a track, its stems are
    named after the files (any supported extension), and mixture.wav is not a stem."""
    freqs = {"guitar": 220.0, "piano": 440.0, "strings": 660.0}
    folder = tmp_path / "mine" / "my song"
    write_track(folder, {"guitar": sine(220, 2.0)}, ext="flac")
    write_track(folder,
                {"piano": sine(440, 2.0), "strings": sine(660, 2.0), "mixture": sine(3000, 2.0)})
    (folder / "notes.txt").write_text("not audio")
    (track,) = sj.prepare(tmp_path / "mine", chunk_seconds=2.0, log=lambda *a: None)
    assert track["name"] == "my song" and track["stems"] == ["guitar", "piano", "strings"]
    x = np.load(track["npy"]).astype(np.float32)
    assert [dominant_freq(r) for r in x] == pytest.approx([freqs[s] for s in track["stems"]],
                                                          abs=1.0)


def test_prepare_musdb18_stem_mp4_maps_streams_to_stems(tmp_path):
    """A MUSDB18 .stem.mp4 (streams 0 mixture, 1 drums, 2 bass, 3 other, 4 vocals, AAC) decodes
    each stem from its own stream: each cached stem has its stream's frequency."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    seconds, sr = 3.0, 44100
    order = {"mixture": 5000.0, "drums": MUSDB_FREQS["drums"], "bass": MUSDB_FREQS["bass"],
             "other": MUSDB_FREQS["other"], "vocals": MUSDB_FREQS["vocals"]}
    inputs = []
    for name, f in order.items():
        sf.write(tmp_path / f"{name}.wav", sine(f, seconds, sr), sr)
        inputs += ["-i", str(tmp_path / f"{name}.wav")]
    mp4 = tmp_path / "musdb" / "train" / "Artist - Song.stem.mp4"
    mp4.parent.mkdir(parents=True)
    maps = [a for i in range(5) for a in ("-map", str(i))]
    subprocess.run(["ffmpeg", "-v", "error", "-y", *inputs, *maps, "-c:a", "aac", str(mp4)],
                   check=True)
    (track,) = sj.prepare(tmp_path / "musdb", chunk_seconds=2.0, log=lambda *a: None)
    assert track["name"] == "Artist - Song" and track["stems"] == ["bass", "drums", "other",
                                                                   "vocals"]
    x = np.load(track["npy"]).astype(np.float32)
    assert abs(x.shape[1] - seconds * SR) < 0.1 * SR
    assert [dominant_freq(r) for r in x] == pytest.approx([order[s] for s in track["stems"]],
                                                          abs=1.0)


def test_stem_mp4_and_wav_of_the_same_stereo_audio_give_equal_arrays(tmp_path):
    """One level for both MUSDB18 layouts: the same stereo 44.1 kHz stems as WAV files (MUSDB18-HQ)
    and as the lossless (ALAC) streams of a .stem.mp4 (MUSDB18) load as equal 16 kHz mono arrays,
    the channel mean (L + R) / 2 resampled alike; its RMS level is that of (L + R) / 2 (ffmpeg's
    `-ac 1` sums to 0.707 (L + R), 3 dB louder)."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    sr, rng = 44100, np.random.default_rng(0)
    t = np.arange(int(1.5 * sr)) / sr
    inputs, mean = [], {}
    for name in ["mixture", *sj.MUSDB_STREAMS]:                        # the .stem.mp4 stream order
        f = rng.uniform(100, 1000)
        x = np.stack([0.6 * np.sin(2 * np.pi * f * t), 0.2 * np.sin(3 * np.pi * f * t)], axis=1)
        sf.write(tmp_path / f"{name}.wav", x, sr, subtype="PCM_16")
        mean[name] = sf.read(tmp_path / f"{name}.wav", dtype="float64")[0].mean(axis=1)
        inputs += ["-i", str(tmp_path / f"{name}.wav")]
    mp4 = tmp_path / "Artist - Song.stem.mp4"
    maps = [a for i in range(5) for a in ("-map", str(i))]
    subprocess.run(["ffmpeg", "-v", "error", "-y", *inputs, *maps, "-c:a", "alac", str(mp4)],
                   check=True)
    for name, stream in sj.MUSDB_STREAMS.items():
        from_mp4 = sj.load_audio(mp4, SR, stream)
        from_wav = sj.load_audio(tmp_path / f"{name}.wav", SR)
        assert from_mp4.dtype == from_wav.dtype == np.float32
        np.testing.assert_array_equal(from_mp4, from_wav)
        assert np.sqrt(np.mean(from_mp4.astype(np.float64) ** 2)) == pytest.approx(
            np.sqrt(np.mean(mean[name] ** 2)), rel=0.01)


def cached_stems(root, **layout) -> dict[str, dict[str, np.ndarray]]:
    """prepare(root) -> {track: {stem: cached 16 kHz waveform}}."""
    tracks = sj.prepare(root, "train", chunk_seconds=2.0, layout=layout, log=lambda *a: None)
    return {t["name"]: dict(zip(t["stems"], np.load(t["npy"]).astype(np.float32))) for t in tracks}


def test_authors_multichannel_layout_names_channels_by_option(tmp_path):
    """One 4-channel WAV per track with --channels bass,drums,mix,vocals: each named channel is the
    stem of that name (its frequency), the channel named mix is left out. Without --channels, or
    with a wrong count, a StemJEPAError says what to pass."""
    freqs = {"bass": 110.0, "drums": 330.0, "mix": 5000.0, "vocals": 1500.0}
    root = tmp_path / "authors"
    (root / "train").mkdir(parents=True)
    channels = np.stack([sine(f, 3.0) for f in freqs.values()], axis=1)     # (N, 4)
    sf.write(root / "train" / "song.wav", channels, SR)
    (track,) = cached_stems(root, channels=list(freqs)).items()
    assert track[0] == "song" and sorted(track[1]) == ["bass", "drums", "vocals"]
    for stem, x in track[1].items():
        assert dominant_freq(x) == pytest.approx(freqs[stem], abs=1.0)
    with pytest.raises(sj.StemJEPAError, match="--channels"):
        sj.find_tracks(root)
    with pytest.raises(sj.StemJEPAError, match="4 channels"):
        sj.find_tracks(root, channels=["bass", "drums"])


def test_moisesdb_layout_sums_the_files_of_a_stem_folder(tmp_path):
    """MoisesDB: <provider>/<track>/<stem>/<file>.wav with data.json; each stem folder is a stem
    named after it, its files summed (two guitar files -> their sum)."""
    track = tmp_path / "moisesdb" / "provider" / "0a1b-track"
    parts = {"bass/b1.wav": sine(110, 3.0), "drums/d1.wav": sine(330, 3.0),
             "guitar/g1.wav": sine(440, 3.0, amp=0.3), "guitar/g2.wav": sine(660, 3.0, amp=0.3)}
    for name, x in parts.items():
        (track / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(track / name, x, SR, subtype="FLOAT")
    (track / "data.json").write_text(json.dumps({"song": "t", "artist": "a", "stems": []}))
    got = cached_stems(tmp_path / "moisesdb")["0a1b-track"]
    assert sorted(got) == ["bass", "drums", "guitar"]
    guitar = parts["guitar/g1.wav"] + parts["guitar/g2.wav"]
    np.testing.assert_allclose(got["guitar"], guitar, atol=2e-3)
    np.testing.assert_allclose(got["bass"], parts["bass/b1.wav"], atol=2e-3)


SLAKH_METADATA = """UUID: 1a81ae092884234f3264e2f45927f00a
audio_dir: stems
normalized: true
overall_gain: 0.18   # a comment
stems:
  S00:
    audio_rendered: true
    inst_class: Bass
    is_drum: false
    midi_program_name: 'Electric Bass (finger)'
    program_num: 33
  S01:
    inst_class: Drums
    is_drum: true
    program_num: 0
  S02:
    inst_class: Guitar
    is_drum: false
  S03:
    inst_class: Piano
    is_drum: false
  S04:
    audio_rendered: false
    inst_class: Strings
    is_drum: false
target_peak: -1.0
"""


def test_slakh_layout_groups_stems_by_instrument_class(tmp_path):
    """Slakh2100: <track>/stems/SNN.flac with metadata.yaml (read without a YAML library). By
    default Bass -> bass, the drum kit -> drums, every other class -> other (guitar + piano
    summed); S04 has no audio file and is skipped. With a mapping, the groups it names, and the
    classes it does not name left out."""
    track = tmp_path / "slakh" / "train" / "Track00001"
    (track / "stems").mkdir(parents=True)
    parts = {"S00": sine(110, 3.0), "S01": sine(330, 3.0), "S02": sine(440, 3.0, amp=0.3),
             "S03": sine(660, 3.0, amp=0.3)}
    for sid, x in parts.items():
        sf.write(track / "stems" / f"{sid}.flac", x, SR, subtype="PCM_24")
    (track / "metadata.yaml").write_text(SLAKH_METADATA)
    got = cached_stems(tmp_path / "slakh")["Track00001"]
    assert sorted(got) == ["bass", "drums", "other"]
    np.testing.assert_allclose(got["other"], parts["S02"] + parts["S03"], atol=2e-3)
    np.testing.assert_allclose(got["drums"], parts["S01"], atol=2e-3)
    mine = sj.find_tracks(tmp_path / "slakh", groups=sj.parse_groups("low=Bass;keys=Piano,Organ"))
    assert {k: [Path(s[0]).name for s in v] for k, v in mine[0][1].items()} == \
        {"low": ["S00.flac"], "keys": ["S03.flac"]}


def test_unknown_layout_lists_what_was_found_and_the_layouts_read(tmp_path):
    """A folder of folders without audio and a stray file: the error names what it found and
    lists every accepted layout."""
    root = tmp_path / "odd"
    (root / "a").mkdir(parents=True)
    (root / "a" / "notes.txt").write_text("x")
    (root / "b").mkdir()
    (root / "readme.md").write_text("x")
    with pytest.raises(sj.StemJEPAError) as e:
        sj.find_tracks(root)
    message = str(e.value)
    assert "2 folders without audio files (a/, b/)" in message and "readme.md" in message
    for layout in ("MUSDB18-HQ", ".stem.mp4", "multichannel", "MoisesDB", "Slakh2100"):
        assert layout in message, layout


def test_quiet_stem_is_kept_for_evaluation_and_never_sampled_in_training(tmp_path):
    """The silence filter is training's only. A stem whose whole-track peak is 0.05 (under the 0.1
    activity threshold) stays in the cache, in evaluation's tracks and among the retrieval
    references (the authors' evaluation keeps all four stems), its reference being that stem's own
    embedding; a track with one loud stem and one quiet one is evaluated too. Training's sampler
    never draws the quiet stem, as target or in the context (no 770 Hz in any context), and the
    one-loud-stem track cannot train. An all-zero stem is left out, and a note says so."""
    data, n = tmp_path / "data", 2 * SR
    song = {"bass": sine(110, 2.0), "drums": sine(330, 2.0), "other": sine(770, 2.0, amp=0.05),
            "vocals": sine(1500, 2.0), "piano": np.zeros(n, np.float32)}
    write_track(data / "song", song)
    write_track(data / "duo", {"bass": sine(110, 2.0), "other": sine(770, 2.0, amp=0.05)})
    notes = []
    evaluation = sj.prepare(data, chunk_seconds=2.0, training=False, log=notes.append)
    assert [(t["name"], t["stems"]) for t in evaluation] == [
        ("duo", ["bass", "other"]), ("song", ["bass", "drums", "other", "vocals"])]
    assert "silent stems (all zero: left out)" in notes[-1] and "song/piano" in notes[-1]
    x = np.load(evaluation[1]["npy"]).astype(np.float32)
    assert np.abs(x[2]).max() == pytest.approx(0.05, abs=1e-3)

    torch.manual_seed(0)
    model = sj.build_model(tiny(), TOY_STEMS).eval()
    emb = sj.retrieval_embeddings(model, evaluation, log=lambda *a: None)
    assert list(zip(emb.track.tolist(), emb.instrument.tolist())) == [
        (0, 0), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]
    own = sj.pool(sj.embed_long(model, [x[2]], chunk=n)[0])           # the quiet stem alone
    torch.testing.assert_close(emb.refs_target[4], own)

    notes.clear()
    (train,) = sj.prepare(data, chunk_seconds=2.0, log=notes.append)
    assert train["name"] == "song"
    assert "song/other" in notes[-1] and "duo: 1 non-silent" in notes[-1]
    dataset = sj.StemChunks([train], train["stems"], chunk=n, threshold=0.1, tries=10, seed=0)
    for i in range(40):
        context, _, instrument = dataset[i]
        assert train["stems"][instrument] != "other"
        spectrum = np.abs(np.fft.rfft(context.numpy().astype(np.float64)))   # 0.5 Hz bins
        assert spectrum[770 * 2] < 1.0                                   # a 0.05 sine gives 800


def test_prepare_reuses_the_cache_and_redecodes_a_changed_track(tmp_path, monkeypatch):
    """A second prepare decodes nothing (load_audio is never called) and returns the same
    tracks; after one file changes, only that file's track is decoded again, with the new audio."""
    root = tmp_path / "data"
    write_track(root / "a", {"bass": sine(110, 2.0), "drums": sine(330, 2.0)})
    write_track(root / "b", {"bass": sine(220, 2.0), "drums": sine(440, 2.0)})
    first = sj.prepare(root, chunk_seconds=2.0, log=lambda *a: None)
    real, decoded = sj.load_audio, []

    def refuse(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(sj, "load_audio", refuse)
    assert sj.prepare(root, chunk_seconds=2.0, log=lambda *a: None) == first

    def counting(path, *args, **kwargs):
        decoded.append(Path(path).parent.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(sj, "load_audio", counting)
    sf.write(root / "b" / "bass.wav", sine(550, 2.0), SR)
    # a different mtime for certain
    os.utime(root / "b" / "bass.wav", ns=(1, 1))
    again = sj.prepare(root, chunk_seconds=2.0, log=lambda *a: None)
    assert decoded == ["b", "b"]
    b = next(t for t in again if t["name"] == "b")
    assert dominant_freq(np.load(b["npy"])[0]) == pytest.approx(550.0, abs=1.0)


def test_half_written_cache_is_rebuilt(tmp_path):
    """A track whose cache entry was left half-written (metadata missing, array truncated) is
    decoded again; intact entries are reused."""
    data = sj.write_toy_dataset(tmp_path / "toy", tracks=3, seconds=6.0)
    cache = tmp_path / "cache"
    first = sj.prepare(data, "train", cache=cache, chunk_seconds=4.0, log=lambda *a: None)
    npy = Path(first[0]["npy"])
    npy.write_bytes(npy.read_bytes()[:1000])                           # an interrupted write ...
    npy.with_suffix(".json").unlink()                                  # ... never got its metadata
    decoded = []
    real = sj.load_audio
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sj, "load_audio", lambda *a, **k: decoded.append(a[0]) or real(*a, **k))
        again = sj.prepare(data, "train", cache=cache, chunk_seconds=4.0, log=lambda *a: None)
    assert {Path(p).parent.name for p in decoded} == {first[0]["name"]}
    assert again == first and np.load(again[0]["npy"]).shape == (len(first[0]["stems"]),
                                                                 first[0]["length"])


def test_cached_array_cut_short_is_decoded_again(tmp_path):
    """Cached arrays damaged after their metadata was written (cut short by a full disk or an
    interrupted copy of the cache: in the samples, in the header) are found when the cache is
    read: those tracks alone are decoded again, a line names each file, and the arrays are whole."""
    data = sj.write_toy_dataset(tmp_path / "toy", tracks=4, seconds=6.0)
    cache = tmp_path / "cache"
    first = sj.prepare(data, "train", cache=cache, chunk_seconds=4.0, log=lambda *a: None)
    samples_cut, header_cut = Path(first[0]["npy"]), Path(first[1]["npy"])
    samples_cut.write_bytes(samples_cut.read_bytes()[:-1000])
    header_cut.write_bytes(header_cut.read_bytes()[:50])
    decoded, lines = [], []
    real = sj.load_audio
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sj, "load_audio", lambda *a, **k: decoded.append(a[0]) or real(*a, **k))
        again = sj.prepare(data, "train", cache=cache, chunk_seconds=4.0, log=lines.append)
    assert {Path(p).parent.name for p in decoded} == {first[0]["name"], first[1]["name"]}
    for npy in (samples_cut, header_cut):
        assert sum(str(npy) in line and "cut short" in line for line in lines) == 1
    assert again == first
    for t in again:
        assert np.load(t["npy"]).shape == (len(t["stems"]), t["length"])


@pytest.mark.slow
def test_bad_files_are_reported_together_by_name(tmp_path):
    """A non-audio file with an audio extension, a zero-byte file and a file with NaN samples are
    skipped and listed once, by path, in one message; a silent stem is excluded; training goes
    on."""
    data = sj.write_toy_dataset(tmp_path / "toy", tracks=4, seconds=6.0)
    tracks = sorted((data / "train").iterdir())
    (tracks[0] / "vocals.wav").write_text("not audio at all")
    (tracks[1] / "bass.wav").write_bytes(b"")
    sf.write(tracks[2] / "drums.wav", np.full(16000, np.nan, dtype=np.float32), 16000,
             subtype="FLOAT")
    sf.write(tracks[2] / "other.wav", np.zeros(96000, dtype=np.float32), 16000)
    r = run_cli("train", "--data", data, "--out", tmp_path / "run", "--steps", "2", *TINY_RUN)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.count(str(tracks[0] / "vocals.wav")) == 1 and "not a readable audio file" in out
    assert out.count(str(tracks[1] / "bass.wav")) == 1 and "empty file" in out
    assert "NaN" in out and str(tracks[2] / "drums.wav") in out
    assert f"{tracks[2].name}/other" in out and "silent stems" in out


@pytest.mark.slow
def test_unknown_stem_names_become_instruments(tmp_path):
    """A custom folder with guitar/piano/strings stems trains a model that knows exactly those."""
    for i in range(2):
        stems, _ = sj.make_toy_song(np.random.default_rng(i), seconds=5.0)
        folder = tmp_path / "mine" / f"song{i}"
        folder.mkdir(parents=True)
        for name, src in (("guitar", "other"), ("piano", "bass"), ("strings", "vocals")):
            sf.write(folder / f"{name}.flac", stems[src], 16000)
    r = run_cli("train", "--data", tmp_path / "mine", "--out", tmp_path / "run", "--steps", "1",
                *TINY_RUN)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("['guitar', 'piano', 'strings']") == 1
    assert sj.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["instruments"] == ["guitar",
                                                                                     "piano",
                                                                                     "strings"]


def readme_only(data: Path) -> None:
    data.mkdir()
    (data / "README.txt").write_text("hello")


def unreadable_track(data: Path) -> None:
    (data / "bad").mkdir(parents=True)
    for i, stem in enumerate(TOY_STEMS):
        (data / "bad" / f"{stem}.wav").write_bytes(np.random.default_rng(i).bytes(5000))


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.mark.slow
@pytest.mark.parametrize("setup, options, words", [
    # --data pointing nowhere: the message names the folder
    pytest.param(lambda data: None, [], ["{data}: no such folder"], id="missing-folder"),
    # an empty --data folder
    pytest.param(lambda data: data.mkdir(), [], ["{data} is empty"], id="empty-folder"),
    # a folder with only a README: the message lists the layouts read
    pytest.param(readme_only, [], ["holds no tracks", ".stem.mp4"], id="folder-without-tracks"),
    # the only track has a single stem: nothing to predict from, the message names the track
    pytest.param(lambda data: write_track(data / "solo", {"piano": sine(440, 5.0)}), [],
                 ["solo", "nothing to predict from"], id="track-with-one-stem"),
    # stems of 3 s and 5 s: the track is refused, the message names it and the lengths
    pytest.param(lambda data: write_track(data / "ragged", {"bass": sine(110, 3.0),
                                                            "drums": sine(330, 5.0)}), [],
                 ["ragged", "bass 3.00 s", "drums 5.00 s"], id="stems-differ-by-over-a-second"),
    # every file of the only track is unreadable: the message names the files
    pytest.param(unreadable_track, [],
                 ["no usable track", os.path.join("{data}", "bad", "bass.wav")],
                 id="only-track-corrupt"),
    # --device cuda without CUDA
    pytest.param(lambda data: good_track(data / "good"), ["--device", "cuda"],
                 ["cuda", "not available"], id="device-not-available", marks=NO_CUDA),
])
def test_cli_error(tmp_path, setup, options, words):
    """train on a bad --data folder (what `setup` makes of it) or with bad options: exit 2, one
    `error:` message with the words (`{data}`: the folder's path), no traceback."""
    data = tmp_path / "data"
    setup(data)
    assert_user_error(train_cli(data, tmp_path, *options), *[w.format(data=data) for w in words])


@pytest.mark.slow
def test_cli_stems_within_a_second_are_trimmed_and_training_proceeds(tmp_path):
    """Stems of 5 s and 5.5 s: trimmed to the shortest, with a note naming the track."""
    write_track(tmp_path / "data" / "almost", {"bass": sine(110, 5.0), "drums": sine(330, 5.5)})
    result = train_cli(tmp_path / "data", tmp_path)
    assert_trained(result, tmp_path)
    assert "trimmed" in result.stdout and "almost" in result.stdout


@pytest.mark.slow
def test_cli_track_shorter_than_a_chunk_is_padded(tmp_path):
    """A 2 s track with the tiny preset's 4 s chunks: zero-padded, a note says so, training runs."""
    good_track(tmp_path / "data" / "short", seconds=2.0)
    result = train_cli(tmp_path / "data", tmp_path)
    assert_trained(result, tmp_path)
    assert "zero-padded" in result.stdout and "short (2.0 s)" in result.stdout


# ---------------------------------------------------------------------------------------------
# 4.1-4.2 Evaluation: Table 1, Fig. 2, the listening test
# ---------------------------------------------------------------------------------------------

def test_failure_analysis_categories_and_confusion_by_hand():
    """Fig. 2 on a constructed case: references are orthogonal unit vectors (3 songs x 4
    instruments); each query is a reference z* plus a smaller pull towards its true stem, so its
    nearest reference is z*. Bass queries get 1 both correct, 1 right instrument, 1 right song;
    drums 1 both correct, 1 right instrument, 1 both wrong; vocals 1 both correct, 1 right song;
    "other" has no query (NaN). Confusion rows (instrument of z*): bass [2/3, 1/3, 0, 0], drums
    [0, 2/3, 0, 1/3], vocals [1/2, 0, 0, 1/2]. "Both correct" is exactly Recall@1 (footnote 3)."""
    instruments = ["bass", "drums", "other", "vocals"]
    # ref 4 n + s: song n, instrument s
    refs = torch.eye(12, dtype=torch.float64)
    ref_track, ref_inst = torch.arange(12) // 4, torch.arange(12) % 4
    # (query song, inst) -> nearest
    cases = [((0, 0), (0, 0)), ((1, 0), (2, 0)), ((2, 0), (2, 1)),
             ((0, 1), (1, 3)), ((1, 1), (1, 1)), ((2, 1), (0, 1)),
             ((0, 3), (0, 3)), ((1, 3), (1, 0))]
    true_ref = torch.tensor([4 * n + s for (n, s), _ in cases])
    nearest = torch.tensor([4 * n + s for _, (n, s) in cases])
    queries = refs[nearest] + 0.3 * refs[true_ref]
    fig2 = sj.failure_analysis(queries, refs, true_ref // 4, true_ref % 4, ref_track, ref_inst,
                               instruments)

    third, half = 1 / 3, 1 / 2
    want = {"bass": {"both correct": third, "right instrument": third, "right song": third,
                     "both wrong": 0.0},
            "drums": {"both correct": third, "right instrument": third, "right song": 0.0,
                      "both wrong": third},
            "vocals": {"both correct": half, "right instrument": 0.0, "right song": half,
                       "both wrong": 0.0}}
    assert fig2["instruments"] == instruments
    for s, cats in want.items():
        assert fig2["categories"][s] == pytest.approx(cats), s
    assert all(math.isnan(v) for v in fig2["categories"]["other"].values())
    confusion = np.array(fig2["confusion"])
    for i, row in [(0, [2 / 3, 1 / 3, 0, 0]), (1, [0, 2 / 3, 0, 1 / 3]), (3, [0.5, 0, 0, 0.5])]:
        np.testing.assert_allclose(confusion[i], row, atol=1e-6)
    assert sj.retrieval_metrics(queries, refs, true_ref)["R@1"] == pytest.approx(100 * 3 / 8)


@pytest.fixture(scope="module")
def retrieval_set(tmp_path_factory) -> Path:
    """5 held-out toy songs of 8 s (all in test/, other seeds than the training songs)."""
    return sj.write_toy_dataset(tmp_path_factory.mktemp("retrieval") / "toy", tracks=5, seconds=8.0,
                                seed=1,
                                test_fraction=1.0)


def recording_retrieval_embeddings(checkpoint, calls: list):
    """sj.retrieval_embeddings that appends "trained" or "random" to `calls`, by comparing the
    model's patch embedding with the checkpoint's."""
    real = sj.retrieval_embeddings
    trained = torch.load(checkpoint, weights_only=True)["model"]["encoder.patch_embed.weight"]

    def wrapper(model, tracks, **kw):
        calls.append("trained" if torch.equal(model.encoder.patch_embed.weight.detach().cpu(),
                                              trained) else "random")
        return real(model, tracks, **kw)
    return wrapper


@pytest.fixture(scope="module")
def evaluation(trained_run, retrieval_set, tmp_path_factory) -> dict:
    """sj.evaluate of the trained tiny model on the held-out songs, with 2 listening-test trials,
    counting which models retrieval_embeddings ran on."""
    checkpoint = trained_run[1] / "checkpoint.pt"
    root = tmp_path_factory.mktemp("evaluation")
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sj, "retrieval_embeddings", recording_retrieval_embeddings(checkpoint, calls))
        result = sj.evaluate(checkpoint, retrieval_set, split="test", out=root / "eval",
                             cache=root / "cache",
                             listening=2, log=lambda *a: None)
    tracks = sj.prepare(retrieval_set, "test", cache=root / "cache", training=False,
                        chunk_seconds=trained_run[0].config.chunk_seconds, log=lambda *a: None)
    return dict(result=result, out=root / "eval", cache=root / "cache", calls=calls, tracks=tracks,
                checkpoint=checkpoint, data=retrieval_set)


@pytest.mark.slow
def test_evaluate_beats_chance_and_random_weights(evaluation):
    """On 5 held-out toy songs, the trained tiny model (150 steps) puts the true stem far nearer
    than random weights or chance do: mean normalised rank counted from 0 below 25 % and at least
    20 points under both (measured 20.1 % against 47.8 % for random weights and 47.1 % for chance;
    12-20 % against 45-51 % on five other toy sets; counted from 1, all are 100/R points higher),
    while random weights stay near chance. At this scale
    the gain comes from the instrument (Fig. 2): at least 60 % of the queries have a stem of the
    right instrument as nearest neighbour (measured 13 of 17; about 1/4 by chance), while the song
    is mostly missed ("both correct", which is R@1: 2 of 17). Also checked: the table's rows
    and keys, retrieval.json holding the returned numbers, Fig. 2's confusion rows agreeing with
    its categories, "both correct" being R@1, and fig2.png."""
    result, tracks = evaluation["result"], evaluation["tracks"]
    n_refs = sum(len(t["stems"]) for t in tracks)
    assert (result["N"], result["S"], result["references"]) == (len(tracks), 4, n_refs)
    assert set(result["rows"]) == {"Stem-JEPA, target-encoder refs",
                                   "Stem-JEPA, context-encoder refs",
                                   "random weights", "DSP (chroma + tempo)", "chance"}
    metrics = {"R@1", "R@5", "R@10", "nrank_mean", "nrank_median", "nrank0_mean", "nrank0_median"}
    for name, row in result["rows"].items():
        assert metrics <= set(row), name
    assert set(result["per_instrument"]) == set(TOY_STEMS)
    chance_row = result["rows"]["chance"]
    assert {k: chance_row[k] for k in metrics} == pytest.approx(sj.chance_metrics(n_refs))
    assert chance_row["which_song"] == pytest.approx(sj.chance_metrics(len(tracks), ks=(1,)))
    # which song? among N, which instrument? among S
    for name, row in result["rows"].items():
        assert {"which_song", "which_instrument", "query_cosine"} <= set(row), name
    written = json.loads((evaluation["out"] / "retrieval.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert (evaluation["out"] / "fig2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model = result["rows"]["Stem-JEPA, target-encoder refs"]
    random_weights = result["rows"]["random weights"]
    chance = result["rows"]["chance"]
    assert result["nrank_mean"] == model["nrank_mean"]
    assert model["nrank0_mean"] < 25
    assert model["nrank_mean"] == pytest.approx(model["nrank0_mean"] + 100 / n_refs)
    assert model["nrank_mean"] < random_weights["nrank_mean"] - 20, (model, random_weights)
    assert model["nrank_mean"] < chance["nrank_mean"] - 20
    assert abs(random_weights["nrank_mean"] - chance["nrank_mean"]) < 15

    fig2 = result["fig2"]
    # queries per instrument
    counts = np.array([sum(s in t["stems"] for t in tracks) for s in fig2["instruments"]])
    cats = {c: np.array([fig2["categories"][s][c] for s in fig2["instruments"]]) for c in
            ("both correct", "right instrument", "right song", "both wrong")}
    confusion = np.array(fig2["confusion"])
    np.testing.assert_allclose(confusion.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.diag(confusion), cats["both correct"] + cats["right instrument"],
                               atol=1e-6)
    np.testing.assert_allclose(sum(cats.values()), 1.0, atol=1e-6)
    assert (counts * cats["both correct"]).sum() / counts.sum() == pytest.approx(model["R@1"] / 100,
                                                                                 abs=1e-6)
    right_instrument = (counts * np.diag(confusion)).sum() / counts.sum()
    assert right_instrument >= 0.6, fig2


@pytest.mark.slow
def test_evaluate_reuses_the_trained_models_embeddings(evaluation, tmp_path, monkeypatch):
    """A second evaluation of the same checkpoint on the same data reads the trained model's
    embeddings from the cache (retrieval_embeddings ran on it once across the two runs) and
    recomputes only the random-weights row, by design, from the same seed: every row comes out
    the same."""
    assert evaluation["calls"] == ["trained", "random"]
    calls = []
    monkeypatch.setattr(sj, "retrieval_embeddings",
                        recording_retrieval_embeddings(evaluation["checkpoint"], calls))
    again = sj.evaluate(evaluation["checkpoint"], evaluation["data"], split="test", out=tmp_path,
                        cache=evaluation["cache"], log=lambda *a: None)
    assert calls == ["random"]
    assert again["rows"] == evaluation["result"]["rows"]


@pytest.mark.slow
def test_evaluate_recomputes_embeddings_when_the_data_changes(trained_run, tmp_path, monkeypatch):
    """The cached retrieval embeddings belong to the audio they were computed from: after a stem
    file of the data changes, the next evaluation embeds with the trained model again instead
    of reusing the old embeddings."""
    checkpoint = trained_run[1] / "checkpoint.pt"
    data = sj.write_toy_dataset(tmp_path / "toy", tracks=3, seconds=4.0, seed=2, test_fraction=1.0)
    calls = []
    monkeypatch.setattr(sj, "retrieval_embeddings",
                        recording_retrieval_embeddings(checkpoint, calls))
    run = dict(split="test", cache=tmp_path / "cache", log=lambda *a: None)
    before = sj.evaluate(checkpoint, data, out=tmp_path / "a", **run)
    song = sorted((data / "test").iterdir())[0]
    others = sorted((data / "test").iterdir())[1]
    # song 0 now holds song 1's stems
    for stem in TOY_STEMS:
        (song / f"{stem}.wav").write_bytes((others / f"{stem}.wav").read_bytes())
    after = sj.evaluate(checkpoint, data, out=tmp_path / "b", **run)
    assert calls == ["trained", "random", "trained", "random"]
    row = "Stem-JEPA, target-encoder refs"
    assert after["rows"][row] != before["rows"][row]


def untrained_checkpoint(path: Path, cfg: sj.Config, instruments: list) -> Path:
    """A checkpoint as `train` writes it, of a randomly initialised model (seed 0)."""
    torch.manual_seed(0)
    model = sj.build_model(cfg, instruments)
    path.parent.mkdir(parents=True, exist_ok=True)
    sj.save_checkpoint(path, {"version": sj.VERSION, "config": dataclasses.asdict(cfg), "step": 0,
                              "instruments": list(instruments), "model": model.state_dict()})
    return path


@pytest.mark.slow
def test_evaluate_split_all_ranks_among_train_and_test_and_states_r(tmp_path):
    """Table 1 ranks each query among the stems of all 150 MUSDB18 tracks, train and test together
    (R = 600). evaluate(split="all") on 3 train and 2 test tracks of 4 stems, one of them quiet
    (peak 0.05, kept in evaluation), ranks among R = 20 references, and split "test" among R = 8;
    each printed table states its R, and the chance row is chance_metrics(R)."""
    data, rng = tmp_path / "data", np.random.default_rng(0)
    for split, names in (("train", ["a", "b", "c"]), ("test", ["d", "e"])):
        for name in names:
            write_track(data / split / name, {s: sine(f * rng.uniform(0.8, 1.25), 3.0, amp=0.05 if
                                                      name == "e" and s == "other" else 0.5)
                                              for s, f in MUSDB_FREQS.items()})
    checkpoint = untrained_checkpoint(tmp_path / "run" / "checkpoint.pt", tiny(), TOY_STEMS)
    for split, N in (("all", 5), ("test", 2)):
        printed = []
        result = sj.evaluate(checkpoint, data, split=split, cache=tmp_path / "cache",
                             log=printed.append)
        assert (result["N"], result["references"]) == (N, 4 * N)
        table = sj.format_table(result)
        assert f"R = {4 * N} references" in table and table in printed
        chance = result["rows"]["chance"]
        expected = sj.chance_metrics(4 * N)
        assert {k: chance[k] for k in expected} == pytest.approx(expected)
        assert (tmp_path / "run" / f"eval-{split}" / "retrieval.json").exists()


def where_and_how_loud(clip: np.ndarray, source: np.ndarray) -> tuple[int, float, float]:
    """Where `clip` sits in `source` (best cross-correlation), the gain g that fits it best there,
    and the largest difference |clip - g * source| left."""
    size = 1 << (len(source) + len(clip)).bit_length()
    corr = np.fft.irfft(np.fft.rfft(source, size) * np.conj(np.fft.rfft(clip, size)), size)
    at = int(np.argmax(corr[: len(source) - len(clip) + 1]))
    seg = source[at: at + len(clip)].astype(np.float64)
    gain = float(clip @ seg / max(seg @ seg, 1e-12))
    return at, gain, float(np.abs(clip - gain * seg).max())


def check_trial_audio(folder: Path, sources: dict, *, excerpt_s=16.0, crop_s=10.0) -> list[int]:
    """Each of mix/A/B/C.wav is 16 kHz, at most 10 s, and is its source (the array given for it)
    at one gain common to the trial, at most 1 (no clipping): returns where each sits."""
    offsets, gains = [], []
    for name, source in sources.items():
        clip, sr = sf.read(folder / f"{name}.wav", dtype="float64")
        assert sr == SR and 0 < len(clip) <= crop_s * SR, (name, sr, len(clip))
        at, gain, residual = where_and_how_loud(clip, source)
        assert residual < 2e-4, (folder.name, name, residual)
        offsets.append(at)
        gains.append(gain)
    assert max(gains) <= 1 + 1e-3 and max(gains) - min(gains) < 1e-3, gains
    return offsets


@pytest.mark.slow
def test_listening_test_material(evaluation):
    """evaluate(listening=2) writes trials/trial00 and trial01, each with mix.wav (the song without
    one stem) and A/B/C.wav: the true stem, the stem of that instrument the model retrieves among
    the other songs' (the nearest by the cached embeddings), and a random one of a third song;
    key.csv names true/retrieved/random once each per trial, and the audio matches the key."""
    folder = evaluation["out"] / "listening"
    assert evaluation["result"]["listening"] == {"trials": 2, "folder": str(folder)}
    assert sorted(p.name for p in (folder / "trials").iterdir()) == ["trial00", "trial01"]
    with open(folder / "key.csv") as f:
        key = list(csv.DictReader(f))
    tracks = evaluation["tracks"]
    names = [t["name"] for t in tracks]
    emb = torch.load(next((evaluation["cache"] / "16000hz" / "embeddings").glob("*.pt")),
                     weights_only=True)
    d = torch.cdist(emb["queries"].double(), emb["refs_target"].double())
    assert [row["trial"] for row in key] == ["trial00", "trial01"]
    for row in key:
        assert sorted(row[c] for c in "ABC") == ["random", "retrieved", "true"], row
        assert row["instrument"] in TOY_STEMS
        assert len({row["track"], row["retrieved_from"], row["random_from"]}) == 3, row
        inst, n = TOY_STEMS.index(row["instrument"]), names.index(row["track"])
        q = int(torch.nonzero((emb["track"] == n) & (emb["instrument"] == inst)))
        others = torch.nonzero((emb["instrument"] == inst) & (emb["track"] != n)).flatten()
        assert names[int(emb["track"][others[d[q, others].argmin()]])] == row["retrieved_from"]

        def stem(name):
            t = tracks[names.index(name)]
            return np.load(t["npy"]).astype(np.float64)[t["stems"].index(row["instrument"])]
        t = tracks[n]
        x = np.load(t["npy"]).astype(np.float64)
        origin = {"true": row["track"], "retrieved": row["retrieved_from"],
                  "random": row["random_from"]}
        sources = {"mix": x.sum(0) - x[t["stems"].index(row["instrument"])],
                   **{c: stem(origin[row[c]]) for c in "ABC"}}
        assert sorted(p.name for p in (folder / "trials" / row["trial"]).iterdir()) == \
            ["A.wav", "B.wav", "C.wav", "mix.wav"]
        check_trial_audio(folder / "trials" / row["trial"], sources)


def test_listening_crops_ten_seconds_of_a_common_sixteen_second_excerpt(tmp_path):
    """With 30 s songs (2 instruments each, noise stems) and hand-made embeddings whose nearest
    other-song stem is the next song's: each trial file is 10 s; the mix and the true stem come
    from the same 16 s excerpt (offsets within 6 s of each other); "retrieved" is the next song's
    stem and "random" a third song's."""
    rng = np.random.default_rng(0)
    n_tracks, n = 4, 30 * SR
    tracks = []
    for i in range(n_tracks):
        x = rng.uniform(-0.3, 0.3, (2, n)).astype(np.float16)
        np.save(tmp_path / f"t{i}.npy", x)
        tracks.append({"name": f"t{i}", "stems": ["bass", "vocals"], "length": n,
                       "npy": str(tmp_path / f"t{i}.npy")})
    refs = torch.randn(2 * n_tracks, 8, generator=torch.Generator().manual_seed(0))
    rows = [(i, s) for i in range(n_tracks) for s in range(2)]
    nearest = torch.tensor([2 * ((i + 1) % n_tracks) + s for i, s in rows])
    emb = sj.RetrievalEmbeddings(queries=refs[nearest] + 0.01, refs_target=refs,
                                 track=torch.tensor([i for i, _ in rows]),
                                 instrument=torch.tensor([s for _, s in rows]))
    out = sj.write_listening_test(tracks, emb, ["bass", "vocals"], tmp_path / "listening", trials=3,
                                  sample_rate=SR, seed=0)
    assert out["trials"] == 3
    with open(tmp_path / "listening" / "key.csv") as f:
        key = list(csv.DictReader(f))
    audio = {t["name"]: np.load(t["npy"]).astype(np.float64) for t in tracks}
    for row in key:
        s = ["bass", "vocals"].index(row["instrument"])
        assert row["retrieved_from"] == f"t{(int(row['track'][1:]) + 1) % n_tracks}"
        assert row["random_from"] not in (row["track"], row["retrieved_from"])
        origin = {"true": row["track"], "retrieved": row["retrieved_from"],
                  "random": row["random_from"]}
        sources = {"mix": audio[row["track"]][1 - s],
                   **{c: audio[origin[row[c]]][s] for c in "ABC"}}
        offsets = check_trial_audio(tmp_path / "listening" / "trials" / row["trial"], sources)
        for c in ["mix", *"ABC"]:
            clip = tmp_path / "listening" / "trials" / row["trial"] / f"{c}.wav"
            assert sf.info(str(clip)).frames == 10 * SR
        true_clip = offsets[1 + "ABC".index(next(c for c in "ABC" if row[c] == "true"))]
        # the mix and its true stem: one 16 s excerpt
        assert abs(offsets[0] - true_clip) <= 6 * SR, offsets


# ---------------------------------------------------------------------------------------------
# 4.3-4.5 Analyses: alignment (Eq. 3), clusters, probes
# ---------------------------------------------------------------------------------------------

def test_eq3_matches_a_naive_double_loop():
    """alignment_curve is Eq. 3: 1/(MS) sum_s sum_i cos(z_s[i], q_s[(i + j) % M]), for negative
    shifts too."""
    g = torch.Generator().manual_seed(0)
    S, M, C = 3, 13, 6
    z = [torch.randn(M, C, generator=g) for _ in range(S)]
    q = [torch.randn(M, C, generator=g) for _ in range(S)]
    shifts = list(range(-6, 7))
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))              # noqa: E731
    naive = [sum(cos(z[s][i], q[s][(i + j) % M]) for s in range(S) for i in range(M)) / (M * S)
             for j in shifts]
    assert torch.allclose(sj.alignment_curve(z, q, shifts), torch.tensor(naive), atol=1e-5)


def test_a_prediction_running_m_steps_late_peaks_at_plus_m():
    """Sign convention: q[i] = z[i - m] (q lags z by m steps) gives the peak, 1.0, at j = +m."""
    z = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    m = 5
    q = torch.roll(z, shifts=m, dims=0)
    shifts = list(range(-10, 11))
    curve = sj.shift_similarity(z, q, shifts, circular=True)
    assert shifts[int(curve.argmax())] == m
    assert curve.max().item() == pytest.approx(1.0, abs=1e-5)


def test_best_offset_finds_where_a_stem_sits_in_a_longer_sequence():
    """best_offset(stem, prediction) = j0 when the stem is prediction[j0 : j0 + len(stem)]."""
    prediction = torch.randn(60, 8, generator=torch.Generator().manual_seed(2))
    assert sj.best_offset(prediction[17:37], prediction) == 17


def test_random_pair_level_is_the_mean_cosine_of_all_cross_track_patch_pairs():
    """The exact shortcut (dot product of mean unit vectors) equals brute force over every pair of
    patches (z of one track, q of another), each pair of sequences weighted equally."""
    g = torch.Generator().manual_seed(3)
    track = torch.tensor([0, 0, 1, 2])
    zs = [torch.randn(m, 5, generator=g) for m in (4, 4, 6, 3)]
    qs = [torch.randn(m, 5, generator=g) for m in (4, 4, 6, 3)]
    unit = torch.nn.functional.normalize
    brute = [(unit(zs[a], dim=-1) @ unit(qs[b], dim=-1).T).mean().item()
             for a in range(4) for b in range(4) if track[a] != track[b]]
    level = sj.random_pair_level(torch.stack([unit(z, dim=-1).mean(0) for z in zs]),
                                 torch.stack([unit(q, dim=-1).mean(0) for q in qs]), track)
    assert level == pytest.approx(np.mean(brute), abs=1e-6)
    assert sj.random_pair_level(torch.ones(2, 3), torch.ones(2, 3), torch.tensor([0, 0])) is None


def blobs(seed):
    """Three well-separated Gaussian blobs of 100 points in 8-d, and their true labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[10.0] * 8, [-10.0] * 8, [10.0] * 4 + [-10.0] * 4])
    truth = torch.arange(3).repeat_interleave(100)
    return centres[truth] + torch.randn(300, 8, generator=g), truth


def test_kmeans_separates_well_separated_blobs_and_is_deterministic():
    """Each blob is one cluster (assignment = truth up to a permutation); the same seed gives the
    same result."""
    x, truth = blobs(4)
    centroids, assignment = sj.kmeans(x, 3, iters=50, seed=0)
    clusters_of_blob = [set(assignment[truth == b].tolist()) for b in range(3)]
    assert all(len(c) == 1 for c in clusters_of_blob)
    assert len(set().union(*clusters_of_blob)) == 3
    again_c, again_a = sj.kmeans(x, 3, iters=50, seed=0)
    assert torch.equal(assignment, again_a) and torch.equal(centroids, again_c)


def test_kmeans_keeps_k_clusters_when_there_are_more_clusters_than_blobs():
    """Asked for more clusters than natural groups, no cluster is left empty."""
    x, _ = blobs(5)
    _, assignment = sj.kmeans(x, 10, iters=50, seed=1)
    assert torch.bincount(assignment, minlength=10).min() > 0


def test_cooccurrence_counts_ordered_pairs_of_different_members_by_hand():
    """Clusters {a, a, b} and {b, c} (and an unlabelled member): a-a 2, a-b 2, b-c 1 ordered
    pairs."""
    labels = ["a", "a", "b", "b", "c", None]
    names, counts = sj.cooccurrence(labels, torch.tensor([0, 0, 0, 1, 1, 1]), 2)
    assert names == ["a", "b", "c"]
    assert counts.tolist() == [[2, 2, 0], [2, 0, 1], [0, 1, 0]]


def test_interval_profile_reads_key_of_the_first_member_and_chord_of_the_second():
    """'C/C' with 'C/G' in one cluster: pairs C-key/C-chord (0) and C-key/G-chord (7), each once
    per order: half the mass on the tonic, half on the dominant."""
    names, counts = sj.cooccurrence(["C/C", "C/G"], torch.tensor([0, 0]), 1)
    profile = sj.interval_profile(names, counts)
    assert profile[0].item() == pytest.approx(0.5) and profile[7].item() == pytest.approx(0.5)
    names, counts = sj.cooccurrence(["Em/C", "Bb/F#"], torch.tensor([0, 0]), 1)
    profile = sj.interval_profile(names, counts)                        # E -> F# 2; Bb -> C 2
    assert profile[2].item() == pytest.approx(1.0)


def test_shuffled_labels_permute_within_groups_and_keep_gaps():
    """Within-track shuffling keeps each track's multiset of labels and the None entries in
    place."""
    labels = ["a", "b", None, "c", "d", "e"]
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    out = sj.shuffled_labels(labels, groups, torch.Generator().manual_seed(0))
    assert out[2] is None
    assert sorted(out[:2]) == ["a", "b"] and sorted(out[3:]) == ["c", "d", "e"]


def test_lab_files_parse_and_normalise(tmp_path):
    """parse_lab keeps 'Key E' whole; N -> no chord, C:min7 -> Cm, A/3 -> A, Silence -> no key;
    labels_at finds the segment sounding at each time and None in a gap."""
    (tmp_path / "song.chords.lab").write_text(
        "0.000 2.500 N\n2.500 5.000 C:min7\n\n5.0\t7.5\tA/3\n")
    (tmp_path / "song.keys.lab").write_text("0.000\t0.394\tSilence\n0.394\t150.0\tKey\tE\n")
    chords = sj.parse_lab(tmp_path / "song.chords.lab")
    keys = sj.parse_lab(tmp_path / "song.keys.lab")
    assert chords == [(0.0, 2.5, "N"), (2.5, 5.0, "C:min7"), (5.0, 7.5, "A/3")]
    assert keys == [(0.0, 0.394, "Silence"), (0.394, 150.0, "Key E")]
    assert [sj.normalise_chord(c) for _, _, c in chords] == [None, "Cm", "A"]
    assert [sj.normalise_key(k) for _, _, k in keys] == [None, "E"]
    assert sj.normalise_key("Key C#:minor") == "C#m" and sj.normalise_key("Bb:min") == "Bbm"
    assert sj.normalise_chord("C:dim") == "Co" and sj.normalise_chord("Db:7") == "C#"
    assert sj.labels_at(chords, [3.0, 9.0]) == ["C:min7", None]
    assert sj.patch_labels(keys, chords, patches=3, patch_s=2.0) == [None, "E/Cm", "E/A"]
    index = sj.lab_index(tmp_path)
    assert index == {"song": {"keys": tmp_path / "song.keys.lab",
                              "chords": tmp_path / "song.chords.lab"}}


def test_lab_index_reads_the_isophonics_tree(tmp_path):
    """The same <name>.lab under keylab/ and chordlab/ pairs up by name."""
    for folder in ("keylab", "chordlab"):
        d = tmp_path / folder / "The Beatles" / "01_-_Please_Please_Me"
        d.mkdir(parents=True)
        (d / "06_-_Boys.lab").write_text("0 1 N\n")
    index = sj.lab_index(tmp_path)
    assert set(index) == {"06_-_Boys"} and set(index["06_-_Boys"]) == {"keys", "chords"}


def test_malformed_lab_line_names_the_file_and_line(tmp_path):
    """A line that is not 'start end label' is an error pointing at it."""
    (tmp_path / "bad.lab").write_text("0.0 1.0 C\nonset 2.0 D\n")
    with pytest.raises(sj.StemJEPAError, match="bad.lab:2"):
        sj.parse_lab(tmp_path / "bad.lab")


def separable(n, seed, classes=4, dim=20):
    """Points of `classes` classes, linearly separable with a margin, in `dim` dims."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    x = torch.randn(n, dim, generator=g)
    x[torch.arange(n), y] += 6.0
    return x, y


def test_probe_learns_a_separable_task_and_not_shuffled_labels():
    """Accuracy > 0.9 on a linearly separable 4-class task; trained on shuffled labels, near chance
    (0.25)."""
    (xt, yt), (xv, yv), (xs, ys) = separable(400, 0), separable(100, 1), separable(400, 2)
    fit = dict(task="multiclass", n_classes=4, hidden=64, batch=100, epochs=40, patience=8, seed=0)
    clf = sj.train_probe(xt, yt, xv, yv, **fit)
    assert sj.probe_metrics(clf, xs, ys, task="multiclass")["accuracy"] > 0.9
    g = torch.Generator().manual_seed(9)
    clf = sj.train_probe(xt, yt[torch.randperm(400, generator=g)], xv,
                         yv[torch.randperm(100, generator=g)], **fit)
    assert sj.probe_metrics(clf, xs, ys, task="multiclass")["accuracy"] < 0.4


def test_probes_embed_with_the_context_encoder_unless_asked_for_the_target(
        two_encoders_model, tmp_path, monkeypatch):
    """4.5's frozen encoder is the context encoder f_theta (the authors' downstream wrapper loads
    only the encoder.* weights): global_embeddings pools model.encoder's patch embeddings of each
    file by default, the target encoder's with target=True (the two differ in this model); `probe`
    passes encoder="context" by default and "target" on request, for the model and the
    random-weights row alike, and says which in probe.json."""
    model = two_encoders_model
    rng = np.random.default_rng(4)
    files = []
    for i in range(6):
        files.append(tmp_path / f"clip{i}.wav")
        clip = (0.1 * rng.standard_normal(5 * 2560)).astype(np.float32)  # 5 whole patches
        sf.write(files[-1], clip, SR)
    x = torch.from_numpy(sj.load_audio(files[0], SR))[None]
    for target in (False, True):
        got = sj.global_embeddings(model, files, **({"target": True} if target else {}))
        with torch.no_grad():
            want = sj.pool(model.encode(x, target=target)[0])
        torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-6)
    context, target = (sj.global_embeddings(model, files[:1], target=t) for t in (False, True))
    assert (context - target).abs().max() > 1e-3

    labels = tmp_path / "labels.csv"
    splits = ["train", "train", "valid", "valid", "test", "test"]
    labels.write_text("file,label,split\n"
                      + "".join(f"clip{i}.wav,{'ab'[i % 2]},{splits[i]}\n" for i in range(6)))
    checkpoint = untrained_checkpoint(tmp_path / "run" / "checkpoint.pt", sj.make_config("tiny"),
                                      TOY_STEMS)
    real, seen = sj.global_embeddings, []

    def recording(m, f, **kw):
        seen.append(kw.get("target", False))
        return real(m, f, **kw)
    monkeypatch.setattr(sj, "global_embeddings", recording)
    quiet = dict(epochs=1, log=lambda *a: None)
    assert sj.probe(checkpoint, labels, out=tmp_path / "a", **quiet)["encoder"] == "context"
    target = sj.probe(checkpoint, labels, encoder="target", out=tmp_path / "b", **quiet)
    assert target["encoder"] == "target"
    assert seen == [False, False, True, True]
    assert json.loads((tmp_path / "b" / "probe.json").read_text())["encoder"] == "target"


# (estimate, reference, MIREX weighted score), scored by hand from the rules
HAND_SCORED_KEYS = [
    ("C major", "C major", 1.0), ("Db major", "C# major", 1.0),         # same key, spelled two ways
    ("G major", "C major", 0.5), ("D minor", "G minor", 0.5),           # a fifth above, same mode
    ("F major", "C major", 0.0), ("G minor", "C major", 0.0),           # fifth below; other mode
    ("A minor", "C major", 0.3), ("C major", "A minor", 0.3),           # relative minor / major
    ("E minor", "G major", 0.3), ("Bb major", "G minor", 0.3),
    ("C minor", "C major", 0.2), ("F# major", "F# minor", 0.2),         # parallel
    ("Eb minor", "C major", 0.0), ("D major", "C major", 0.0), ("B major", "G# major", 0.0),
    ("A:min", "C:maj", 0.3), ("Key E", "Em", 0.2),                     # other spellings
]


@pytest.mark.parametrize("estimate, reference, score", HAND_SCORED_KEYS)
def test_key_score_is_the_mirex_weighted_score(estimate, reference, score):
    """Table 3's GiantSteps "Acc refined": 1 for the same key, 0.5 for a perfect fifth above in the
    same mode, 0.3 for the relative major/minor, 0.2 for the parallel one, else 0."""
    assert sj.key_score(estimate, reference) == score


def test_key_probe_reports_refined_accuracy_beside_accuracy():
    """With key classes, probe_metrics and the chance row add accuracy_refined, the mean
    MIREX score of the predictions (hand-scored: 1, 0.5, 0.3, 0.2 and 0 -> 0.4, accuracy 0.2); the
    majority class C major scores (1 + 0 + 0.3 + 0.2 + 0) / 5 against the same truth. A genre task
    (classes that are no keys, "blues" starting with a note letter) or lower-case letters get
    plain accuracy only."""
    classes = ["A minor", "C major", "C minor", "D major", "G major"]
    truth = torch.tensor([1, 1, 1, 1, 1])                                # all C major
    predicted = [1, 4, 0, 2, 3]                                           # C, G, Am, Cm, D
    probe = sj.ProbeMLP(dim=5, hidden=5, classes=5, mean=torch.zeros(5), std=torch.ones(5))
    with torch.no_grad():                                           # logits = the one-hot input
        for layer in (probe.net[0], probe.net[2]):
            layer.weight.copy_(torch.eye(5))
            layer.bias.zero_()
    x = torch.eye(5)[predicted]
    m = sj.probe_metrics(probe, x, truth, task="multiclass", classes=classes)
    assert m["accuracy"] == pytest.approx(0.2) and m["accuracy_refined"] == pytest.approx(2.0 / 5)
    chance = sj.chance_probe_metrics(torch.tensor([1, 1, 0]), torch.tensor([1, 4, 0, 2, 3]),
                                     task="multiclass", classes=classes)
    assert chance["accuracy"] == pytest.approx(0.2)
    assert chance["accuracy_refined"] == pytest.approx((1 + 0 + 0.3 + 0.2 + 0) / 5)
    genres = ["blues", "classical", "country", "disco", "metal"]
    for other in (genres, ["a", "b", "c", "d", "e"]):
        assert "accuracy_refined" not in sj.probe_metrics(probe, x, truth, task="multiclass",
                                                          classes=other)


def test_multilabel_probe_scores_tags():
    """Two tags, each a linear function of the input: macro ROC-AUC and AP close to 1."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(500, 10, generator=g)
    y = torch.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0], dim=1).float()
    clf = sj.train_probe(x[:300], y[:300], x[300:400], y[300:400], task="multilabel", hidden=64,
                         batch=100,
                         epochs=40, patience=8, seed=0)
    m = sj.probe_metrics(clf, x[400:], y[400:], task="multilabel")
    assert m["roc_auc"] > 0.95 and m["average_precision"] > 0.9 and m["classes_scored"] == 2


def test_roc_auc_and_average_precision_by_hand():
    """scores (0.1, 0.4, 0.35, 0.8), positives the last two: AUC 3/4 (0.35 loses to 0.4),
    AP = 1/2 * 1 + 1/2 * 2/3. With a tie between a positive and a negative: AUC counts it 1/2,
    AP takes both at once (precision 1/2)."""
    s, t = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])
    assert sj.roc_auc(s, t) == pytest.approx(0.75)
    assert sj.average_precision(s, t) == pytest.approx(0.5 + 0.5 * 2 / 3)
    s, t = torch.tensor([0.5, 0.5, 0.2]), torch.tensor([1, 0, 0])
    assert sj.roc_auc(s, t) == pytest.approx(0.75)
    assert sj.average_precision(s, t) == pytest.approx(0.5)
    assert np.isnan(sj.roc_auc(s, torch.ones(3)))


def test_macro_skips_tags_without_both_classes():
    """A tag with no positive in the split is not averaged (its AUC is undefined)."""
    scores = torch.tensor([[0.9, 0.1], [0.1, 0.2], [0.8, 0.3]])
    targets = torch.tensor([[1, 0], [0, 0], [1, 0]])
    assert sj.macro(sj.roc_auc, scores, targets) == (1.0, 1)


def test_hold_out_takes_ten_percent_of_train_and_leaves_test():
    """Without valid rows, 10 % of train (at least one) becomes valid; test rows are untouched."""
    splits = ["train"] * 30 + ["test"] * 5
    out = sj.hold_out(splits, 0.1, seed=0)
    assert out.count("valid") == 3 and out.count("train") == 27 and out[30:] == ["test"] * 5


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """4 toy songs of 12 s (3 train, 1 test) and a tiny checkpoint after 3 steps."""
    root = tmp_path_factory.mktemp("e2e")
    data = sj.write_toy_dataset(root / "toy", tracks=4, seconds=12)
    sj.train(sj.make_config("tiny", steps=3, batch_size=4), data, out=root / "run", workers=0,
             log=lambda *a: None)
    return root, data, root / "run" / "checkpoint.pt"


def e2e_commands(data, ckpt, labels, out):
    """The three commands on the toy train split (3 songs, so that random pairs across tracks
    exist)."""
    return [["analyze", "align", "--checkpoint", ckpt, "--data", data, "--split", "train",
             "--max-shift-s", 3,
             "--out", out / "align"],
            ["analyze", "clusters", "--checkpoint", ckpt, "--data", data, "--split", "train", "--k",
             8,
             "--shuffles", 2, "--out", out / "clusters"],
            ["probe", "--checkpoint", ckpt, "--labels", labels, "--epochs", 5, "--out",
             out / "probe"]]


def check_e2e_outputs(out):
    """The JSON holds what Fig. 4, Fig. 5 and Table 3 need; the PNGs are written."""
    align = json.loads((out / "align" / "align.json").read_text())
    # 3 s = 19 steps of 160 ms
    assert align["shifts"] == list(range(-19, 20)) and len(align["tracks"]) == 3
    assert all(len(t["curve"]) == 39 for t in align["tracks"])
    clusters = json.loads((out / "clusters" / "clusters.json").read_text())
    # 12 s = 75 steps
    assert clusters["patches"] == 3 * 75 and clusters["labelled_patches"] == 3 * 75
    assert sum(map(sum, clusters["matrix"])) > 0 and len(clusters["top"]) == len(clusters["matrix"])
    assert set(clusters["tonal_share"]) == {"Stem-JEPA", "random weights",
                                            "shuffled across patches",
                                            "shuffled within tracks"}
    result = json.loads((out / "probe" / "probe.json").read_text())
    assert set(result["rows"]) == {"Stem-JEPA", "random weights", "chance"}
    assert (out / "align" / "fig4.png").stat().st_size > 0
    assert (out / "clusters" / "fig5.png").stat().st_size > 0


def test_toy_chords_move_by_the_smallest_voice_leading():
    """_voicing: the chord's pitch classes, one note each, within the range, and no other voicing
    (every octave placement, enumerated naively) moves less from the previous chord."""
    rng = np.random.default_rng(0)
    previous = [60, 64, 67]
    for _ in range(20):
        chord = [int(p) for p in rng.choice(12, 3, replace=False)]
        v = sj._voicing(previous, chord)
        assert sorted(m % 12 for m in v) == sorted(chord) and all(55 <= m <= 74 for m in v)
        moves = [sum(abs(a - b) for a, b in zip(sorted(c), previous))
                 for c in itertools.product(range(55, 75), repeat=3)
                 if sorted(m % 12 for m in c) == sorted(chord)]
        assert sum(abs(a - b) for a, b in zip(v, previous)) == min(moves)
        previous = v


def test_toy_breaks_are_heard_in_every_stem_at_once():
    """A break stops every part together: over its span the mix is at least 10 dB quieter than
    over the song (the room's reverb tail alone rings on), and every stem is quieter there than
    over the song. Breaks start on a beat of a bar after the first."""
    found = 0
    for seed in range(4):
        stems, labels = sj.make_toy_song(np.random.default_rng(seed), seconds=20.0)
        mix = sum(stems.values())
        beat = 60.0 / labels["tempo"]
        rms = lambda x: float(np.sqrt(np.mean(x ** 2)))
        for start, end in labels["breaks"]:
            found += 1
            assert start >= 4 * beat - 1e-3
            assert abs(start / beat - round(start / beat)) < 1e-2
            span = slice(int((start + 0.05) * SR), int(end * SR))
            if end - start < 0.2:                       # cut short by the end of the song
                continue
            assert rms(mix[span]) < 10 ** (-10 / 20) * rms(mix)
            for name, x in stems.items():
                if rms(x) > 0:
                    assert rms(x[span]) < rms(x), name
    assert found >= 4


def test_toy_song_is_a_function_of_its_seed():
    """The same seed gives the same stems and labels; another seed another song."""
    a, la = sj.make_toy_song(np.random.default_rng(3), seconds=3.0)
    b, lb = sj.make_toy_song(np.random.default_rng(3), seconds=3.0)
    c, lc = sj.make_toy_song(np.random.default_rng(4), seconds=3.0)
    assert la == lb and all(np.array_equal(a[s], b[s]) for s in TOY_STEMS)
    assert la != lc


def test_toy_instrument_probe_labels_every_stem_with_its_instrument(tmp_path):
    """toy_probe_labels(task="instrument"), the NSynth column's analogue: one row per stem of
    every toy song, labelled with the stem's name, its audio the stem itself, the splits the
    song's (10 % of train held out as valid)."""
    data = sj.write_toy_dataset(tmp_path / "toy", tracks=5, seconds=2.0)
    path = sj.toy_probe_labels(data, tmp_path / "probe" / "labels.csv", task="instrument")
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 5 * len(TOY_STEMS)
    for row in rows:
        song, instrument = Path(row["file"]).stem.split("-")
        assert row["label"] == instrument in TOY_STEMS
        split = "test" if (data / "test" / song).is_dir() else "train"
        assert row["split"] in ((split,) if split == "test" else ("train", "valid"))
        audio, _ = sf.read(tmp_path / "probe" / row["file"], dtype="float32")
        stem, _ = sf.read(data / split / song / f"{instrument}.wav", dtype="float32")
        assert np.allclose(audio, stem, atol=1e-6)


@pytest.mark.slow
def test_commands_in_a_subprocess(toy_run):
    """`python stem_jepa.py analyze align|clusters` and `probe` run as a user would run them and
    write their JSON and PNG (the three at once: most of each run is importing torch)."""
    root, data, ckpt = toy_run
    labels = sj.toy_probe_labels(data, root / "probe_tempo" / "labels.csv", task="tempo")
    out = root / "subprocess"
    for run in run_cli_together(*e2e_commands(data, ckpt, labels, out)):
        assert run.returncode == 0, run.stderr
    check_e2e_outputs(out)


@pytest.mark.slow
def test_analyze_reads_a_multichannel_layout_with_channels(mini_checkpoint, tmp_path):
    """`analyze align` and `analyze clusters` take --channels as train and evaluate do: on one
    4-channel WAV per track, align pairs the named stems (the channel named mix left out) and
    clusters labels every patch of the two mixes; without --channels, the error says to pass it."""
    root, labels = tmp_path / "authors", tmp_path / "labels"
    (root / "test").mkdir(parents=True)
    labels.mkdir()
    for i, name in enumerate(["one", "two"]):
        freqs = [(1 + i / 4) * f for f in (110.0, 330.0, 5000.0, 1500.0)]
        sf.write(root / "test" / f"{name}.wav", np.stack([sine(f, 3.0) for f in freqs], 1), SR)
        (labels / f"{name}.keys.lab").write_text("0 3 Key C\n")
        (labels / f"{name}.chords.lab").write_text("0 1.5 C\n1.5 3 G\n")
    channels = ["--channels", "bass,drums,mix,vocals"]
    align = ["analyze", "align", "--checkpoint", mini_checkpoint, "--data", root, "--max-shift-s",
             1, "--out", tmp_path / "align"]
    clusters = ["analyze", "clusters", "--checkpoint", mini_checkpoint, "--data", root,
                "--labels", labels, "--k", 2, "--shuffles", 1, "--out", tmp_path / "clusters"]
    aligned, clustered, without = run_cli_together([*align, *channels], [*clusters, *channels],
                                                   align)
    assert aligned.returncode == 0, aligned.stderr
    tracks = json.loads((tmp_path / "align" / "align.json").read_text())["tracks"]
    assert [(t["name"], t["stems"]) for t in tracks] == [("one", ["bass", "drums", "vocals"]),
                                                         ("two", ["bass", "drums", "vocals"])]
    assert clustered.returncode == 0, clustered.stderr
    result = json.loads((tmp_path / "clusters" / "clusters.json").read_text())
    assert result["tracks"] == 2 and result["labelled_patches"] == result["patches"] > 0
    assert_user_error(without, "--channels")


# ---------------------------------------------------------------------------------------------
# Using a trained model: retrieve, score, embed, any length, HEAR
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bass_library(retrieval_set, tmp_path_factory):
    """A query mix (a held-out song without its bass, as float WAV so that nothing clips) and a
    library of that song's bass and the vocal stems of all the held-out songs."""
    root = tmp_path_factory.mktemp("bass_library")
    songs = sorted((retrieval_set / "test").iterdir())
    song = next(s for s in songs if all(np.abs(sf.read(s / f"{stem}.wav")[0]).max() > 0.1
                                        for stem in ("bass", "vocals")))
    stems = {s: sf.read(song / f"{s}.wav", dtype="float32")[0] for s in TOY_STEMS}
    mix = root / "mix.wav"
    sf.write(mix, stems["drums"] + stems["other"] + stems["vocals"], SR, subtype="FLOAT")
    library = root / "library"
    library.mkdir()
    shutil.copy(song / "bass.wav", library / f"{song.name}_bass.wav")
    for s in songs:
        if np.abs(sf.read(s / "vocals.wav")[0]).max() > 0.1:
            shutil.copy(s / "vocals.wav", library / f"{s.name}_vocals.wav")
    return mix, library, library / f"{song.name}_bass.wav"


@pytest.mark.slow
def test_retrieve_cli_ranks_the_true_bass_first_and_reuses_the_library_cache(trained_run,
                                                                             bass_library):
    """`retrieve --json` for the mix without its bass, asking for bass, over a library of that
    bass and vocal stems (an instrument the tiny model tells from bass; it is not yet good at
    telling songs apart): the true bass ranks first (measured distance 0.23, the vocals 0.81 and
    more); every file is listed once, by increasing
    distance, each distance being the L2 distance between the pooled prediction for the mix and
    the file's pooled target embedding, computed here. The library's embeddings are cached in
    LIBRARY/.stem_jepa_cache; a second query reads no library file again but the one it
    reports an offset for."""
    mix, library, true_bass = bass_library
    checkpoint = trained_run[1] / "checkpoint.pt"
    r = run_cli("retrieve", "--checkpoint", checkpoint, "--mix", mix, "--library", library,
                "--instrument", "bass", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout)
    files = sorted(library.glob("*.wav"))
    assert [x["rank"] for x in results] == list(range(1, len(files) + 1))
    assert sorted(x["file"] for x in results) == [str(f) for f in files]
    assert results[0]["file"] == str(true_bass), results
    distances = [x["distance"] for x in results]
    assert distances == sorted(distances)
    assert all(isinstance(x["offset_patches"], int) for x in results)

    model = sj.StemJEPA.from_checkpoint(checkpoint)
    chunk = int(model.config.chunk_seconds * SR)
    q = sj.pool(sj.embed_long(model, [sj.load_audio(mix, SR)], chunk=chunk, instruments=[0])[0])
    for x in results:
        ref = sj.pool(sj.embed_long(model, [sj.load_audio(x["file"], SR)], chunk=chunk)[0])
        assert x["distance"] == pytest.approx((q - ref).norm().item(), abs=2e-4), x

    assert len(list((library / ".stem_jepa_cache").glob("library-*.pt"))) == 1
    read = []
    real_load = sj.load_audio
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sj, "load_audio", lambda path, *a,
                   **k: read.append(Path(path)) or real_load(path, *a, **k))
        again = sj.retrieve(checkpoint, mix, library, "bass", top=1, log=lambda *a: None)
    assert read == [mix, true_bass]
    assert again == results[:1]


def local_features(model, wavs, *, instruments=None, target=True, chunk=None, batch=16,
                   device="cpu"):
    """A stand-in for embed_long whose embeddings depend on the local audio only: one (1, T, 64)
    sequence per waveform, row t the log band energies of samples [2560 t, 2560 (t + 1))."""
    out = []
    for x in wavs:
        x = np.pad(x, (0, -len(x) % 2560))
        spectrum = np.abs(np.fft.rfft(x.reshape(-1, 2560), axis=1))[:, 1:1281]
        out.append(torch.from_numpy(np.log1p(spectrum.reshape(len(spectrum), 64,
                                                              20).sum(-1))).float()[None])
    return out


@pytest.mark.slow
def test_retrieve_offsets_follow_best_offsets_convention(trained_run, bass_library, tmp_path,
                                                         monkeypatch):
    """The offset retrieve reports is best_offset's j: place the file j steps of 160 ms after the
    start of the mix. With embeddings that depend on the local audio only (embed_long replaced),
    the mix itself gets offset 0 (and distance 0: ranked first), the mix delayed by 3.2 s of
    silence j = -20 (-3.2 s: start it 3.2 s before the mix), the mix without its first 3.2 s
    j = +20 (+3.2 s)."""
    mix = bass_library[0]
    x, _ = sf.read(mix, dtype="float32")
    library = tmp_path / "library"
    library.mkdir()
    sf.write(library / "same.wav", x, SR, subtype="FLOAT")
    sf.write(library / "late.wav", np.r_[np.zeros(51200, np.float32), x], SR, subtype="FLOAT")
    sf.write(library / "early.wav", x[51200:], SR, subtype="FLOAT")
    monkeypatch.setattr(sj, "embed_long", local_features)
    results = sj.retrieve(trained_run[1] / "checkpoint.pt", mix, library, "bass",
                          log=lambda *a: None)
    by_name = {Path(r["file"]).name: r for r in results}
    assert results[0]["file"] == str(library / "same.wav")
    assert results[0]["distance"] == pytest.approx(0, abs=1e-4)
    assert [(by_name[f]["offset_patches"], by_name[f]["offset_s"]) for f in ("same.wav", "late.wav",
                                                                             "early.wav")] == \
        [(0, 0.0), (-20, -3.2), (20, 3.2)]


def test_retrieve_leaves_out_an_unreadable_library_file(mini_checkpoint, tmp_path):
    """retrieve over a library with a corrupt file: the file is reported by name, every other file
    is ranked."""
    library = tmp_path / "library"
    library.mkdir()
    for i in range(3):
        sf.write(library / f"stem{i}.wav", noise(2.5, seed=i), SR)
    (library / "bad.wav").write_bytes(os.urandom(2000))
    mix = tmp_path / "mix.wav"
    sf.write(mix, noise(4.0, seed=9), SR)
    lines = []
    results = sj.retrieve(mini_checkpoint, mix, library, "bass", log=lines.append)
    assert sorted(Path(r["file"]).name for r in results) == ["stem0.wav", "stem1.wav", "stem2.wav"]
    assert sum(str(library / "bad.wav") in line for line in lines) == 1


def test_unknown_instrument_is_an_error_naming_the_option(mini_checkpoint, tmp_path):
    """retrieve and score with an instrument the model does not know: a StemJEPAError naming
    --instrument and its value and listing the known instruments, before any file is read (the
    mix, stem and library given here do not exist)."""
    missing = tmp_path / "missing.wav"
    expected = r"^--instrument piano: the model knows bass, drums, other, vocals$"
    with pytest.raises(sj.StemJEPAError, match=expected):
        sj.retrieve(mini_checkpoint, missing, tmp_path / "no_library", "piano")
    with pytest.raises(sj.StemJEPAError, match=expected):
        sj.score(mini_checkpoint, missing, missing, "piano")


@pytest.mark.slow
def test_cli_retrieval_errors(trained_run, bass_library, tmp_path):
    """Bad input to embed/retrieve: exit status 2, one `error:` line naming the problem, no
    traceback: a checkpoint that is a text file; a library folder with no audio; an instrument the
    model does not know (the message lists the known ones); a --mix file that does not exist."""
    checkpoint = trained_run[1] / "checkpoint.pt"
    mix, library, _ = bass_library
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    (tmp_path / "no_audio").mkdir()
    (tmp_path / "no_audio" / "README.txt").write_text("hello")
    small = tmp_path / "small"
    small.mkdir()
    sf.write(small / "x.wav", 0.1 * np.ones(SR // 2, np.float32), SR)
    retrieve = ["retrieve", "--checkpoint", checkpoint, "--instrument", "bass"]
    not_a_checkpoint, no_audio, unknown, no_mix = run_cli_together(
        ["embed", "--checkpoint", text, "--audio", small, "--out", tmp_path / "emb.npy"],
        [*retrieve, "--mix", mix, "--library", tmp_path / "no_audio"],
        ["retrieve", "--checkpoint", checkpoint, "--instrument", "piano", "--mix", mix, "--library",
         small],
        [*retrieve, "--mix", tmp_path / "missing.wav", "--library", small])
    assert_user_error(not_a_checkpoint, "notes.txt", "not a readable checkpoint")
    assert_user_error(no_audio, "no_audio", "holds no audio files")
    assert_user_error(unknown, "--instrument piano:", "bass, drums, other, vocals")
    assert_user_error(no_mix, "missing.wav", "no such file")


@pytest.mark.slow
def test_score_cli_is_the_retrieval_distance_of_one_pair(mini_checkpoint, tmp_path):
    """`score --json` for (mix, stem, bass): the distance is the L2 distance between the pooled
    prediction for the mix and the stem's pooled target embedding, computed here from embed_long
    and pool; similarity = 1 - d^2 / 2 (the cosine of the two unit vectors); and `retrieve` over a
    library holding that stem reports the same distance and offset for it."""
    stems, _ = sj.make_toy_song(np.random.default_rng(1), seconds=7.0)
    mix, stem = tmp_path / "mix.wav", tmp_path / "library" / "bass.wav"
    stem.parent.mkdir()
    sf.write(mix, stems["drums"] + stems["other"] + stems["vocals"], SR, subtype="FLOAT")
    sf.write(stem, stems["bass"], SR, subtype="FLOAT")
    r = run_cli("score", "--checkpoint", mini_checkpoint, "--mix", mix, "--stem", stem,
                "--instrument", "bass", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    model = sj.StemJEPA.from_checkpoint(mini_checkpoint)
    chunk = int(model.config.chunk_seconds * SR)
    q = sj.pool(sj.embed_long(model, [sj.load_audio(mix, SR)], chunk=chunk, instruments=[0])[0])
    ref = sj.pool(sj.embed_long(model, [sj.load_audio(stem, SR)], chunk=chunk)[0])
    d = (q - ref).norm().item()
    assert got["distance"] == pytest.approx(d, abs=2e-4)
    assert got["similarity"] == pytest.approx(float(q @ ref), abs=2e-4)
    (ranked,) = sj.retrieve(mini_checkpoint, mix, stem.parent, "bass", log=lambda *a: None)
    assert (ranked["distance"], ranked["offset_patches"]) == (got["distance"],
                                                              got["offset_patches"])


def test_score_finds_where_the_stem_fits(mini_checkpoint, monkeypatch):
    """score's offset is best_offset's: with embeddings that depend on the local audio only, a
    stem equal to the mix fits at 0 with distance 0; the mix delayed by 3.2 s fits at -20 steps
    (-3.2 s), the mix without its first 3.2 s at +20 (+3.2 s)."""
    x = noise(9.0, seed=5)
    monkeypatch.setattr(sj, "embed_long", local_features)
    model = sj.StemJEPA.from_checkpoint(mini_checkpoint)
    same = model.score(x, x, "bass")
    assert same["distance"] == pytest.approx(0, abs=1e-4) and same["offset_patches"] == 0
    late = model.score(x, np.r_[np.zeros(51200, np.float32), x], "bass")
    early = model.score(x, x[51200:], "bass")
    assert (late["offset_patches"], late["offset_s"]) == (-20, -3.2)
    assert (early["offset_patches"], early["offset_s"]) == (20, 3.2)


@pytest.mark.slow
def test_embed_cli_writes_rows_names_and_sequences(trained_run, tmp_path):
    """`embed --sequences` on a folder (a sub-folder searched, a hidden one and non-audio files
    skipped) writes FILE.npy (n_files, F*D = 960), FILE.txt with the files in the same order,
    and FILE.sequences.npz with one (T, 960) array per file whose time-average, layer-normalised
    and L2-normalised as in pool, is that file's row; a row equals the file embedded here."""
    audio = tmp_path / "audio"
    rng = np.random.default_rng(0)
    clips = {audio / "a.wav": 1.5, audio / "sub" / "b.flac": 3.3, audio / ".hidden" / "c.wav": 1.0}
    for path, seconds in clips.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, (0.2 * rng.standard_normal(int(seconds * SR))).astype(np.float32), SR)
    (audio / "notes.txt").write_text("not audio")
    out = tmp_path / "emb.npy"
    r = run_cli("embed", "--checkpoint", trained_run[1] / "checkpoint.pt", "--audio", audio,
                "--out", out,
                "--sequences")
    assert r.returncode == 0, r.stderr[-3000:]
    files = [audio / "a.wav", audio / "sub" / "b.flac"]
    assert (tmp_path / "emb.txt").read_text().splitlines() == [str(f) for f in files]
    rows = np.load(out)
    assert rows.shape == (2, 960)
    seqs = np.load(tmp_path / "emb.sequences.npz")
    assert sorted(seqs.files) == ["file0", "file1"]
    for k in range(2):
        seq = seqs[f"file{k}"]
        assert seq.ndim == 2 and seq.shape[1] == 960 and seq.shape[0] >= 1
        v = seq.mean(0)
        v = (v - v.mean()) / np.sqrt(v.var() + 1e-5)
        np.testing.assert_allclose(v / np.linalg.norm(v), rows[k], atol=1e-5)
    model = sj.StemJEPA.from_checkpoint(trained_run[1] / "checkpoint.pt")
    chunk = int(model.config.chunk_seconds * SR)
    b = sj.pool(sj.embed_long(model, [sj.load_audio(files[1], SR)], chunk=chunk)[0]).numpy()
    np.testing.assert_allclose(rows[1], b, atol=1e-5)


@pytest.mark.slow
def test_embed_cli_skips_unreadable_files_and_reports_progress(mini_checkpoint, tmp_path):
    """`embed --batch 3` over a folder with a corrupt file and an empty one among good clips: exit
    0, each bad file named once in the output, a progress line with an ETA; the rows and FILE.txt
    hold the readable files, in order, each row the file's pooled embedding computed here."""
    audio = tmp_path / "audio"
    audio.mkdir()
    good = [audio / f"clip{i}.wav" for i in range(4)]
    for i, f in enumerate(good):
        sf.write(f, noise([1.0, 5.5, 1.2, 3.0][i], seed=i), SR)
    (audio / "broken.wav").write_bytes(os.urandom(3000))
    (audio / "empty.flac").write_bytes(b"")
    out = tmp_path / "emb.npy"
    r = run_cli("embed", "--checkpoint", mini_checkpoint, "--audio", audio, "--out", out,
                "--batch", 3)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(str(audio / "broken.wav")) == 1
    assert r.stdout.count(str(audio / "empty.flac")) == 1
    assert "ETA" in r.stdout
    assert (tmp_path / "emb.txt").read_text().splitlines() == [str(f) for f in good]
    rows = np.load(out)
    model = sj.StemJEPA.from_checkpoint(mini_checkpoint)
    for f, row in zip(good, rows):
        np.testing.assert_allclose(row, model.embed(sj.load_audio(f, SR)).numpy(), atol=1e-5)


def test_files_of_similar_length_are_embedded_together(mini_checkpoint, tmp_path, monkeypatch):
    """embed_audio_files sorts files by duration and embeds `group` at a time: with durations 1, 9,
    1.2, 8.5, 4 and 4.2 s and groups of 2, the calls get {1, 1.2}, {4, 4.2}, {8.5, 9} s; results
    come back in the given order."""
    seconds = [1.0, 9.0, 1.2, 8.5, 4.0, 4.2]
    files = []
    for i, s in enumerate(seconds):
        files.append(tmp_path / f"f{i}.wav")
        sf.write(files[-1], noise(s, seed=i), SR)
    calls, real = [], sj.embed_long

    def recording(model, wavs, **kwargs):
        calls.append(sorted(len(w) / SR for w in wavs))
        return real(model, wavs, **kwargs)

    monkeypatch.setattr(sj, "embed_long", recording)
    model = sj.StemJEPA.from_checkpoint(mini_checkpoint)
    kept, lengths = sj.embed_audio_files(model, files, keep=lambda z: z.shape[1], group=2,
                                         log=lambda *a: None)
    assert calls == [[1.0, 1.2], [4.0, 4.2], [8.5, 9.0]]
    assert kept == files and lengths == [math.ceil(s * SR / 2560) for s in seconds]


def readme_python_example() -> str:
    """The README's Python example: the ```python block that calls encode_long."""
    blocks = (HERE / "README.md").read_text().split("```python\n")[1:]
    return next(b.split("```")[0] for b in blocks if "encode_long" in b)


def test_readme_python_example_runs_on_a_three_minute_file(tmp_path, monkeypatch):
    """The README's Python example runs as written, on a 3-minute song.wav (and a mix.wav and
    bass.wav) beside runs/musdb/checkpoint.pt (here a minimal random-weights model): encode_long
    gives one column of patches per 160 ms over the whole file (T = ceil(N / 2560)) equal to
    embed_long's chunk-encode-concatenate; embed is pool of it; predict_long is embed_long with the
    instrument; embed(mix, "bass") pools predict_long; score's distance is the two vectors'."""
    cfg = mini()
    write_checkpoint(tmp_path / "runs" / "musdb" / "checkpoint.pt", cfg, TOY_STEMS)
    stems, _ = sj.make_toy_song(np.random.default_rng(0), seconds=180.0)
    sf.write(tmp_path / "song.wav", sum(stems.values()), SR, subtype="FLOAT")
    sf.write(tmp_path / "mix.wav", stems["drums"] + stems["other"] + stems["vocals"], SR,
             subtype="FLOAT")
    sf.write(tmp_path / "bass.wav", stems["bass"], SR, subtype="FLOAT")
    monkeypatch.chdir(tmp_path)
    env = {}
    exec(readme_python_example(), env)
    model, song, mix = env["model"], env["song"], env["mix"]
    assert len(song) == 180 * SR
    chunk = int(cfg.chunk_seconds * SR)
    assert tuple(env["z"].shape) == (5, math.ceil(len(song) / 2560), 32)
    torch.testing.assert_close(env["z"], sj.embed_long(model, [song], chunk=chunk)[0])
    torch.testing.assert_close(env["v"], sj.pool(env["z"]))
    bass_id = TOY_STEMS.index("bass")
    q = sj.embed_long(model, [mix], chunk=chunk, instruments=[bass_id])[0]
    torch.testing.assert_close(env["q"], q)
    torch.testing.assert_close(env["query"], sj.pool(env["q"]))
    d = (env["query"] - model.embed(env["bass"])).norm().item()
    assert model.score(mix, env["bass"], "bass")["distance"] == pytest.approx(d, abs=1e-4)


def test_any_length_methods_refuse_a_batch_and_an_unknown_instrument(mini_checkpoint):
    """encode_long takes one waveform: a (B, N) batch is a StemJEPAError naming the shape; an
    unknown instrument name is an error listing the known ones."""
    model = sj.StemJEPA.from_checkpoint(mini_checkpoint)
    with pytest.raises(sj.StemJEPAError, match=r"\(2, 16000\)"):
        model.encode_long(np.zeros((2, 16000), np.float32))
    with pytest.raises(sj.StemJEPAError, match="bass, drums, other, vocals"):
        model.predict_long(np.zeros(16000, np.float32), "piano")


@pytest.mark.slow
def test_hear_api_shapes_timestamps_and_batch_independence(mini_checkpoint, paper_model):
    """As the HEAR validator checks: load_model gives an nn.Module with integer sample_rate (16000),
    scene and timestamp embedding sizes F*D (3840 for ViT-B, 160 here); for audio (n, N) float32,
    timestamp embeddings (n, T, F*D) and timestamps (n, T) in ms are float32, T = ceil(N / 2560),
    timestamps at the centres of the 160 ms columns (80, 240, ...), the same for every sound;
    scene embeddings (n, F*D) are the normalised time-average of the timestamp embeddings; a
    sound's embeddings do not depend on the other sounds of the batch."""
    assert sj.HEARModel(paper_model).scene_embedding_size == 3840
    model = sj.load_model(str(mini_checkpoint))
    assert isinstance(model, nn.Module)
    assert model.sample_rate == 16000 and isinstance(model.sample_rate, int)
    assert model.scene_embedding_size == model.timestamp_embedding_size == 5 * 32
    n_samples = int(2.7 * SR)                                           # a chunk and a part of one
    audio = torch.from_numpy(np.stack([noise(2.7, seed) for seed in range(3)]))
    emb, ts = sj.get_timestamp_embeddings(audio, model)
    T = math.ceil(n_samples / 2560)
    assert emb.shape == (3, T, 160) and emb.dtype == torch.float32
    assert ts.shape == (3, T) and ts.dtype == torch.float32
    for row in ts:
        assert row.tolist() == pytest.approx([160.0 * t + 80.0 for t in range(T)])
    scene = sj.get_scene_embeddings(audio, model)
    assert scene.shape == (3, 160) and scene.dtype == torch.float32
    for i in range(3):
        v = emb[i].double().mean(0)
        v = (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5)
        torch.testing.assert_close(scene[i].double(), v / v.norm(), atol=1e-5, rtol=0)
        alone, ts_alone = sj.get_timestamp_embeddings(audio[i: i + 1], model)
        torch.testing.assert_close(alone[0], emb[i], atol=1e-5, rtol=1e-5)
        assert torch.equal(ts_alone[0], ts[i])
        torch.testing.assert_close(sj.get_scene_embeddings(audio[i: i + 1], model)[0], scene[i],
                                   atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Performance: bench
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bench_counts_flops_by_hand_and_divides_by_the_peak(tmp_path, monkeypatch):
    """train_flops_per_sample against a hand count for a config small enough to count, and
    bench's arithmetic: samples/s = batch / step time, achieved = FLOPs per sample x samples/s,
    MFU = achieved / peak (step time and peak fixed here, so only the arithmetic is tested)."""
    fields = dict(n_mels=32, chunk_seconds=0.16, dim=8, depth=1, heads=2, mlp_ratio=4,
                  pred_hidden=16, pred_layers=2)
    # 32 mel bins x 16 frames of 10 ms: 2 frequency x 1 time patch, K = 2 tokens of D = 8
    K, D = 2, 8
    block = (2 * K * D * 3 * D          # qkv
             + 2 * K * D * D            # attention output projection
             + 2 * K * D * 4 * D * 2    # MLP, two linears
             + 2 * K * K * D * 2)       # QK^T and AV
    encoder = block + 2 * K * 16 * 16 * D                               # + patch embedding
    predictor = 2 * K * (2 * D * 16 + 16 * D)       # [z, emb(l)] (2D) -> 16 -> D
    assert (block, encoder, predictor) == (3200, 11392, 1536)
    hand = 3 * (encoder + predictor) + encoder      # forward + backward, and the target forward
    assert sj.train_flops_per_sample(sj.make_config("tiny", **fields)) == hand == 50176

    monkeypatch.setattr(sj, "matmul_peak", lambda device, dtype=torch.float32: 1e6)
    monkeypatch.setattr(sj, "_median_time", lambda fn, device, *, warmup, repeats: 0.25)
    data = sj.write_toy_dataset(tmp_path / "toy", tracks=3, seconds=2.0)
    r = sj.bench(preset="tiny", batch_size=2, device="cpu", steps=1, data=data, **fields)
    assert r["samples_per_s"] == 2 / 0.25
    assert r["flops_per_sample"] == hand
    assert r["achieved_flops"] == hand * 8
    assert r["mfu"] == pytest.approx(hand * 8 / 1e6)


@pytest.mark.slow
def test_bench_times_the_step_in_the_precision_asked_for(tmp_path, monkeypatch):
    """bench's precision reaches the training step it times and is recorded in the result and its
    table; `bench --precision bf16` on a CPU is refused as `train`'s is (the option reaches it)."""
    precisions = []
    real_step = sj.training_step

    def recording_step(*args, **kwargs):
        precisions.append(kwargs["precision"])
        return real_step(*args, **kwargs)

    def once(fn, device, *, warmup, repeats):
        fn()
        return 0.25

    monkeypatch.setattr(sj, "training_step", recording_step)
    monkeypatch.setattr(sj, "_median_time", once)
    monkeypatch.setattr(sj, "matmul_peak", lambda device, dtype=torch.float32: 1e6)
    data = sj.write_toy_dataset(tmp_path / "toy", tracks=3, seconds=2.0)
    fields = dict(n_mels=32, chunk_seconds=0.16, dim=8, depth=1, heads=2, pred_hidden=16,
                  pred_layers=2)
    r = sj.bench(preset="tiny", device="cpu", steps=1, data=data, precision="fp32", **fields)
    assert precisions == ["fp32"] and r["precision"] == "fp32"
    assert "tiny, 2, fp32" in sj.format_bench(r)
    assert_user_error(run_cli("bench", "--device", "cpu", "--precision", "bf16"),
                      "--precision bf16", "CUDA")


# ---------------------------------------------------------------------------------------------
# Command line, the tutorial, the licence
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_toy_then_train_writes_data_checkpoint_and_log(tmp_path):
    """`toy` writes train/<song>/{bass,drums,other,vocals}.wav + labels.json; `train` on it for
    3 steps writes a checkpoint loadable with weights_only=True at step 3, from which the model
    loads, and a log with one row per step."""
    data, run = tmp_path / "toy", tmp_path / "run"
    toy = run_cli("toy", "--out", data, "--tracks", 3, "--seconds", 10)
    assert toy.returncode == 0, toy.stderr
    songs = sorted((data / "train").iterdir())
    assert len(songs) == 2 and len(list((data / "test").iterdir())) == 1
    for song in songs:
        expected = sorted([f"{s}.wav" for s in TOY_STEMS] + ["labels.json"])
        assert sorted(p.name for p in song.iterdir()) == expected
        assert sf.info(str(song / "bass.wav")).duration == pytest.approx(10.0)

    train = run_cli("train", "--data", data, "--preset", "tiny", "--steps", 3, "--batch-size", 4,
                    "--out", run, "--log-every", 1, "--workers", 0)
    assert train.returncode == 0, train.stderr
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["instruments"] == TOY_STEMS
    assert [r["step"] for r in read_log(run / "log.csv")] == ["1", "2", "3"]
    model = sj.StemJEPA.from_checkpoint(run / "checkpoint.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k


@pytest.mark.slow
def test_every_config_field_is_a_train_option():
    """The train options come from the Config fields: each field has its --flag, a given flag sets
    the field (the GPU check's --warmup-steps and --tau-start among them), and unset flags keep
    the preset's values."""
    import argparse
    parser = argparse.ArgumentParser()
    sj._add_train_options(parser)
    flags = {a for action in parser._actions for a in action.option_strings}
    assert {"--" + f.name.replace("_", "-") for f in dataclasses.fields(sj.Config)} <= flags
    args = parser.parse_args(["--preset", "tiny", "--warmup-steps", "7", "--tau-start", "0.9",
                              "--song-contrast", "0.5", "--no-weight-decay-all"])
    cfg = sj._config_from(args)
    assert (cfg.warmup_steps, cfg.tau_start, cfg.song_contrast, cfg.weight_decay_all) == \
        (7, 0.9, 0.5, False)
    assert cfg.dim == sj.make_config("tiny").dim and cfg.steps == sj.make_config("tiny").steps


@pytest.mark.parametrize("command, options", [
    ("toy", ["--out", "--tracks", "--seconds", "--seed"]),
    ("train", ["--data", "--out", "--cache", "--resume", "--device", "--preset", "--predictor",
               "--steps", "--batch-size", "--stop-at", "--workers"]),
    ("demo", ["--dir", "--tracks", "--steps"]),
    ("probe", ["--checkpoint", "--labels", "--task", "--encoder"]),
    ("evaluate", ["--checkpoint", "--data", "--split", "all"]),
])
def test_cli_help_lists_the_options(command, options):
    """`stem_jepa.py COMMAND --help` exits 0 and mentions each of its options."""
    result = run_cli(command, "--help")
    assert result.returncode == 0
    for option in options:
        assert option in result.stdout, option


SHIPPED = HERE / "models" / "stem-jepa-tiny-toy.pt"


def test_shipped_model_is_what_the_readme_command_makes():
    """models/stem-jepa-tiny-toy.pt loads in one line as the tiny preset with the README's options
    (6000 steps, log every 100, checkpoint every 500) on MUSDB18's four instruments, in float16
    within 10 MB; its log.csv has the module's columns and ends at the checkpoint's step."""
    model = sj.StemJEPA.from_checkpoint(SHIPPED)
    assert model.config == sj.make_config("tiny", steps=6000, log_every=100, ckpt_every=500)
    assert model.instruments == list(TOY_STEMS)
    assert SHIPPED.stat().st_size < 10_000_000
    weights = torch.load(SHIPPED, weights_only=True)["model"]
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float16}
    rows = list(csv.DictReader(open(SHIPPED.with_suffix(".log.csv"))))
    assert ",".join(rows[0]) == sj.LOG_COLUMNS
    assert int(rows[-1]["step"]) == torch.load(SHIPPED, weights_only=True)["step"] == 6000


TUTORIAL = HERE / "tutorial.ipynb"


def test_committed_tutorial_shows_every_result_and_stays_under_2_mb():
    """The notebook is committed executed, so that a reader sees the results without running it:
    every code cell has outputs, none of them an error, the setting is the fast one, and the file
    (figures and embedded audio included) stays under 2 MB."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(TUTORIAL, as_version=4)
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    assert code
    assert 'SETTING = "fast"' in code[0][1].source
    assert [i for i, c in code if not c.outputs] == [], "code cells without outputs"
    assert [i for i, c in code if any(o.output_type == "error" for o in c.outputs)] == []
    assert TUTORIAL.stat().st_size < 2_000_000


@pytest.mark.slow
def test_tutorial_runs_top_to_bottom_in_the_fast_setting(tmp_path, monkeypatch):
    """Every cell executes without error from a clean slate, as a reader runs it: headless, in the
    repository root, in the fast setting, with the notebook's files (toy data, runs) in a fresh
    folder, so nothing cached by an earlier run is reused. Every code cell produces output. The
    trainings take a few steps each (STEM_JEPA_TUTORIAL_SMOKE): the cells are what is tested; the
    committed outputs come from the full fast setting."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(TUTORIAL, as_version=4)
    # the kernel inherits it
    monkeypatch.setenv("STEM_JEPA_TUTORIAL_RUNS", str(tmp_path / "tutorial_runs"))
    monkeypatch.setenv("STEM_JEPA_TUTORIAL_SMOKE", "1")
    client = nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3",
                                     resources={"metadata": {"path": str(HERE)}})
    # raises CellExecutionError on the first failing cell
    client.execute()
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    assert [i for i, c in code if not c.outputs] == [], "code cells without outputs"
    # it trained, not reused
    assert (tmp_path / "tutorial_runs" / "live" / "checkpoint.pt").exists()


def test_module_and_tests_keep_to_100_columns():
    """Every line of the module and of this file fits in 100 columns, the width they are read at."""
    for path in (HERE / "stem_jepa.py", HERE / "test_stem_jepa.py"):
        lines = path.read_text().splitlines()
        assert [i for i, line in enumerate(lines, 1) if len(line) > 100] == [], path.name


def test_part_one_stands_alone_top_to_bottom():
    """Part one (between the PART ONE and PART TWO banners) can be saved and run by itself: every
    name it loads is a builtin, bound inside its own definition (arguments, locals, nested
    functions), or imported or defined at module level above the line that uses it; none is
    defined only in part two, nor below its use."""
    source = (HERE / "stem_jepa.py").read_text()
    lines = source.splitlines()
    one, two = (next(i for i, line in enumerate(lines, 1) if line.startswith(f"# PART {part}"))
                for part in ("ONE", "TWO"))
    tree = ast.parse(source)
    defined = {}                                    # module-level name -> its first line
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.ClassDef)):
            names = [stmt.name]
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            names = [(alias.asname or alias.name).split(".")[0] for alias in stmt.names]
        else:
            names = [n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)
                     and isinstance(n.ctx, ast.Store)]
        for name in names:
            defined.setdefault(name, stmt.lineno)
    late = []
    for stmt in (s for s in tree.body if one < s.lineno < two):
        nodes = list(ast.walk(stmt))
        functions = [n for n in nodes if isinstance(n, (ast.FunctionDef, ast.Lambda))]
        own = ({n.arg for n in nodes if isinstance(n, ast.arg)}
               | {n.id for n in nodes if isinstance(n, ast.Name) and type(n.ctx) is not ast.Load}
               | {n.name for n in nodes if isinstance(n, ast.ExceptHandler) and n.name}
               | {m.name for f in functions for m in ast.walk(f)
                  if m is not f and isinstance(m, ast.FunctionDef)})
        for n in nodes:
            if (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in own
                    and not hasattr(builtins, n.id) and not defined.get(n.id, two) < n.lineno):
                late.append(f"{n.id} (line {n.lineno}, defined at {defined.get(n.id)})")
    assert late == []


def test_licence_is_mit_and_the_readme_says_so():
    """LICENSE is the MIT licence of the Stem-JEPA reference contributors; the README names it."""
    text = (HERE / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the Stem-JEPA reference contributors" in text
    assert "Permission is hereby granted, free of charge" in text
    assert "MIT" in (HERE / "README.md").read_text().split("## Licence")[1]
