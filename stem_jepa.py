"""Stem-JEPA in one file: a reference implementation of

    A. Riou, S. Lattner, G. Hadjeres, M. Anslow, G. Peeters,
    "Stem-JEPA: A Joint-Embedding Predictive Architecture for Musical Stem
    Compatibility Estimation", ISMIR 2024.

Given a mix of some instrument stems (the *context*), a predictor conditioned on an
instrument label predicts, patch by patch, the embedding of a stem that fits the mix
(the *target*). Targets come from an EMA copy of the encoder; nothing is reconstructed.

Commands (each has --help):
    python stem_jepa.py toy --out toy/                              # procedural multitracks
    python stem_jepa.py train --data musdb18/ --out runs/musdb      # the paper's setup (GPU)
    python stem_jepa.py train --data toy/ --out runs/toy --preset tiny --steps 300   # a CPU
    torchrun --nproc_per_node 4 stem_jepa.py train --data musdb18/ --out runs/musdb
    python stem_jepa.py evaluate --checkpoint runs/musdb/checkpoint.pt --data musdb18/
    python stem_jepa.py demo                                        # toy data, end to end

Part one is the method, in the paper's order (paper -> code):
    3.3 front-end, encoder            LogMel, ViT (ViT-Base over 16x16 log-mel patches)
    3.1 predictor g_phi, emb(l)       MLPPredictor; TransformerPredictor (Table 1's ablation)
    Eq. 1; Eq. 2; 3.3 schedules       jepa_loss; ema_update, tau_at; lr_at
    Fig. 1                            StemJEPA, build_model
    3.2 sampler; 3.4 data             choose_stems, draw_example, StemChunks; find_tracks, prepare
    3.3 training                      training_step, train
    4.1 retrieval                     embed_long, pool, retrieval_metrics, which_song_and_instrument
Part two is what the commands need: Table 1's evaluation, the toy songs, the CLI. The analyses of
4.1.3-4.5 are in tutorial.ipynb; library search, HEAR, layout converters and the benchmark are
short files in extras/ and dev/.

Shape letters: B batch, S stems, N samples, M mel bins, L frames, F frequency patches, T time
patches (one per 160 ms), K = F*T tokens, D embedding width, W Transformer-predictor width,
H heads, h head width, C = F*D a pooled vector's width. Where this file follows the authors'
code (SonyCSLParis/Stem-JEPA) rather than the paper's text, the docstring says so.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchaudio


class StemJEPAError(Exception):
    """A problem the user can fix (bad data, bad arguments): the CLI prints it, no traceback."""


# =============================================================================================
# PART ONE: the method (3.1-3.4) and its measure (4.1), top to bottom
# =============================================================================================


# Configuration: the paper's values, and the numbers it leaves open read from the authors' code ----

@dataclass
class Config:
    """Every setting, the paper's values by default. "[code]": the authors' code's value
    (SonyCSLParis/Stem-JEPA, built on M2D); the paper states only 8 s chunks, 80 mels, 25/10 ms,
    16x16 patches, ViT-Base, the 6-layer MLP of width 1024, AdamW, batch 256, lr 3e-4, 300k
    steps and 20k warmup steps. The command line has an option per field (--batch-size)."""
    # front-end (3.3)
    sample_rate: int = 16000            # Hz [code]; stems are summed to mono
    chunk_seconds: float = 8.0          # training chunk: 8 s -> 800 frames -> 5 x 50 patches
    n_fft: int = 400                    # 25 ms window
    hop_length: int = 160               # 10 ms hop
    n_mels: int = 80
    f_min: float = 50.0                 # Hz [code]
    f_max: float = 8000.0               # Hz [code]
    patch_size: int = 16                # 16 x 16 patches of the (mel, frame) grid
    # encoder: ViT-Base (3.3)
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    # predictor (3.1, 3.3): "mlp" (the paper's); Table 1's ablations "mlp-nocond", "transformer"
    predictor: str = "mlp"
    pred_hidden: int = 1024             # MLP hidden width
    pred_layers: int = 6                # MLP Linear layers
    pred_tf_dim: int = 512              # Transformer predictor: width, depth, heads (M2D's)
    pred_tf_depth: int = 8
    pred_tf_heads: int = 16
    # sampler (3.2)
    active_threshold: float = 0.1       # [code] active: peak |amplitude| in the chunk above this
    redraw_tries: int = 10              # chunks drawn per track before the fallback (footnote 2)
    # optimisation (3.3)
    steps: int = 300_000
    batch_size: int = 256               # global: over all processes and accumulation steps
    grad_accum: int = 1                 # micro-batches per step, when a batch does not fit
    base_lr: float = 3e-4               # lr = base_lr * batch_size / 256
    warmup_steps: int = 20_000          # linear warmup, then cosine ...
    min_lr_ratio: float = 0.0           # ... down to min_lr_ratio x the peak (the paper: 0)
    beta1: float = 0.9                  # AdamW betas (0.9, 0.95) [code]
    beta2: float = 0.95
    weight_decay: float = 0.05          # [code]
    weight_decay_all: bool = True       # [code] on every parameter; False: M2D's grouping
    grad_clip: float = 3.0              # max global gradient norm [code]
    tau_start: float = 0.99995          # EMA rate tau_0 (Eq. 2) [code] ...
    tau_end: float = 0.99999            # ... rising linearly to tau_T [code]
    seed: int = 0
    log_every: int = 50                 # steps between log lines
    ckpt_every: int = 1000              # steps between checkpoints


PRESETS = {
    "paper": {},
    # A small ViT for CPUs, same code path. 4 s chunks (5 x 25 patches) and batch 32 run at about
    # 1.5 steps/s on 2 cores. It keeps the authors' code's slow tau: with a faster EMA (BYOL's
    # 0.996 -> 1), the targets of a small model collapse to one code per instrument
    # (docs/small-scale.md).
    "tiny": dict(chunk_seconds=4.0, dim=192, depth=4, heads=3, pred_hidden=384, pred_layers=4,
                 pred_tf_dim=128, pred_tf_depth=2, pred_tf_heads=4, steps=300, batch_size=32,
                 base_lr=8e-3, warmup_steps=30,
                 weight_decay_all=False,    # M2D's grouping, as the shipped model's run
                 log_every=20, ckpt_every=100),
}


def make_config(preset: str = "paper", **overrides) -> Config:
    """The preset's config with the given fields replaced (None values are ignored)."""
    if preset not in PRESETS:
        raise StemJEPAError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    fields = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return dataclasses.replace(Config(), **fields)


def chunk_samples(cfg: Config) -> int:
    """The training chunk in samples (8 s at 16 kHz: 128000); evaluation embeds in chunks of it."""
    return int(cfg.chunk_seconds * cfg.sample_rate)


# 3.3 Front-end: waveform -> normalised log-mel spectrogram ----------------------------------------

class LogMel(nn.Module):
    """16 kHz mono waveforms (B, N) -> normalised log-mel spectrograms (B, M, L), L = N // hop:
    "log-scaled Mel Spectrograms with 80 mel bins and a window and hop size of 25 and 10 ms" (3.3).
    Slaney mel scale and area normalisation, log(mel + eps) and the dataset statistics (-9.453,
    3.569) are the authors' code's. The 801st frame of an 8 s chunk is dropped: 800 = 50 patches."""
    def __init__(self, *, sample_rate=16000, n_fft=400, hop_length=160, n_mels=80, f_min=50.0,
                 f_max=8000.0, mean=-9.453, std=3.569):
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, win_length=n_fft, hop_length=hop_length,
            f_min=f_min, f_max=f_max, n_mels=n_mels, power=2.0, center=True, pad_mode="reflect",
            norm="slaney", mel_scale="slaney")
        self.hop_length, self.mean, self.std = hop_length, mean, std
        self.eps = torch.finfo(torch.float32).eps

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        with torch.autocast(wav.device.type, enabled=False):  # the STFT stays in float32
            mel = self.mel(wav.float())                       # (B, M, L + 1)
        mel = mel[..., : wav.shape[-1] // self.hop_length]    # (B, M, L)
        return (torch.log(mel + self.eps) - self.mean) / self.std


# 3.3 Encoder: ViT-Base over 16x16 patches, fixed 2D sin-cos positions, no CLS token ---------------

def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sin-cos code of integer positions (P,) -> (P, dim): sines then cosines."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * omega[None]                  # (P, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(n_freq: int, n_time: int, dim: int) -> torch.Tensor:
    """Fixed 2D positions (F, T, D): the first D/2 dims code the time index, the last D/2 the
    frequency index, so every token knows both where and when it is."""
    t = sincos_1d(torch.arange(n_time), dim // 2)                       # (T, D/2)
    f = sincos_1d(torch.arange(n_freq), dim // 2)                       # (F, D/2)
    return torch.cat([t[None].expand(n_freq, -1, -1), f[:, None].expand(-1, n_time, -1)], dim=-1)


class Attention(nn.Module):
    def __init__(self, *, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                               # (B, K, D)
        B, K, D = x.shape
        qkv = self.qkv(x).view(B, K, 3, self.heads, D // self.heads)    # (B, K, 3, H, h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                            # 3 x (B, H, K, h)
        x = F.scaled_dot_product_attention(q, k, v)                     # (B, H, K, h)
        return self.proj(x.transpose(1, 2).reshape(B, K, D))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""
    def __init__(self, *, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim=dim, heads=heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_vit_weights(module: nn.Module) -> None:
    """M2D/MAE init: xavier-uniform Linear and (flattened) patch-conv weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))    # conv: as (out, in)
            nn.init.zeros_(m.bias)


class ViT(nn.Module):
    """"We employ a standard ViT-Base model as the encoder" (3.3). No CLS token, and fixed (not
    learned) 2D sin-cos positions: both are the authors' code's (M2D's), not the paper's text.
    Log-mel (B, M, L) -> one embedding per patch (B, F, T, D), F = M / 16, T = L // 16; tokens are
    frequency-major (index f * T + t). Inputs longer than max_frames are the caller's to chunk."""
    def __init__(self, *, n_mels=80, max_frames=800, patch_size=16, dim=768, depth=12, heads=12,
                 mlp_ratio=4):
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos", sincos_2d(n_mels // patch_size, max_frames // patch_size, dim),
                             persistent=False)                          # (F, T_max, D), not trained
        self.blocks = nn.ModuleList(Block(dim=dim, heads=heads, mlp_ratio=mlp_ratio)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        init_vit_weights(self)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(mel[:, None])                              # (B, D, F, T)
        B, D, Fp, T = x.shape
        if T > self.pos.shape[1]:
            raise ValueError(f"{T} time patches, more than the {self.pos.shape[1]} positions")
        x = x.flatten(2).transpose(1, 2)                                # (B, K, D), k = f * T + t
        x = x + self.pos[:, :T].reshape(Fp * T, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x).view(B, Fp, T, D)


# 3.1 Predictor g_phi, conditioned on the label l of the missing stem ------------------------------

class MLPPredictor(nn.Module):
    """"Our predictor is a 6-layer MLP with ReLU activations and 1024 dimensions in each hidden
    layer" (3.3), applied to each patch independently: z~_k = g(concat(z_k, emb(l))) (3.1). With
    n_instruments = 0, Table 1's unconditioned ablation (input z_k alone). The output LayerNorm and
    emb(l) as a D-wide embedding initialised N(0, 1) are the authors' code's."""
    def __init__(self, *, dim=768, hidden=1024, layers=6, n_instruments=4):
        super().__init__()
        self.instrument = nn.Embedding(n_instruments, dim) if n_instruments else None
        if self.instrument is not None:
            nn.init.normal_(self.instrument.weight)
        widths = [2 * dim if n_instruments else dim] + [hidden] * (layers - 1) + [dim]
        net = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            net += [nn.Linear(a, b)] + ([nn.ReLU()] if i < layers - 1 else [])
        self.net = nn.Sequential(*net)
        self.norm = nn.LayerNorm(dim)

    def forward(self, z: torch.Tensor, instrument: torch.Tensor) -> torch.Tensor:  # (B,F,T,D), (B,)
        if self.instrument is not None:
            e = self.instrument(instrument)[:, None, None].expand_as(z)  # (B, F, T, D)
            z = torch.cat([z, e], dim=-1)                               # (B, F, T, 2D)
        return self.norm(self.net(z))                                   # (B, F, T, D)


class TransformerPredictor(nn.Module):
    """The Transformer predictor of Table 1, "the same as in [9]" (M2D): project to a narrower
    width, add 2D sin-cos positions, prepend an instrument token (N(0, 1) [code], no position),
    run pre-norm blocks, drop the token, normalise and project back."""
    def __init__(self, *, dim=768, width=512, depth=8, heads=16, mlp_ratio=4, n_instruments=4,
                 n_freq=5, max_time=50):
        super().__init__()
        self.embed = nn.Linear(dim, width)
        self.register_buffer("pos", sincos_2d(n_freq, max_time, width), persistent=False)
        self.instrument = nn.Embedding(n_instruments, width)
        self.blocks = nn.ModuleList(Block(dim=width, heads=heads, mlp_ratio=mlp_ratio)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)
        init_vit_weights(self)
        nn.init.normal_(self.instrument.weight)                         # N(0, 1)

    def forward(self, z: torch.Tensor, instrument: torch.Tensor) -> torch.Tensor:
        B, Fp, T, _ = z.shape
        x = self.embed(z) + self.pos[:, :T]                             # (B, F, T, W)
        x = torch.cat([self.instrument(instrument)[:, None], x.flatten(1, 2)], 1)  # (B, 1 + K, W)
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x[:, 1:])).view(B, Fp, T, -1)         # (B, F, T, D)


# Eq. 1: normalised MSE between predictions and targets; 4.1: one vector per recording -------------

def unit_targets(target: torch.Tensor) -> torch.Tensor:
    """The targets as the loss compares them: each patch vector standardised over its D dims (the
    authors' code: (t - mean) / sqrt(var + 1e-6), unbiased variance), then L2-normalised."""
    target = target.float()
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    return F.normalize(target, dim=-1)


def jepa_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L = 1/K sum_k || z~_k/||z~_k|| - z_k/||z_k|| ||^2  (Eq. 1), averaged over patches and batch.
    Each target patch is first standardised (`unit_targets`): the authors' code, not the paper's."""
    diff = F.normalize(pred.float(), dim=-1) - unit_targets(target)
    return diff.pow(2).sum(-1).mean()


def pool(z: torch.Tensor) -> torch.Tensor:
    """One vector per recording, what retrieval compares (4.1): (..., F, T, D) -> (..., F*D),
    average over time, concatenate the frequency rows (3840-d for ViT-B), layer-normalise without
    affine and L2-normalise (the authors' evaluation)."""
    v = z.float().mean(dim=-2).flatten(-2)                              # (..., F*D)
    return F.normalize(F.layer_norm(v, v.shape[-1:]), dim=-1)


def frames(z: torch.Tensor) -> torch.Tensor:
    """(F, T, D) -> (T, F*D): one vector per time patch (160 ms), frequency rows concatenated."""
    return z.permute(1, 0, 2).reshape(z.shape[1], -1)


# Eq. 2: the target encoder is an EMA of the context encoder; 3.3: the schedules -------------------

def tau_at(step: int, total_steps: int, tau_start: float, tau_end: float) -> float:
    """tau_i, "linearly interpolated between tau_0 and tau_T, T being the total number of steps"."""
    return tau_start + (tau_end - tau_start) * min(step / max(total_steps, 1), 1.0)


@torch.no_grad()
def ema_update(target: list[torch.Tensor], online: list[torch.Tensor], tau: float) -> None:
    """theta_bar <- tau * theta_bar + (1 - tau) * theta (Eq. 2), in place, tensor by tensor:
    lerp moves theta_bar the fraction 1 - tau of the way towards theta."""
    for t, o in zip(target, online):
        t.lerp_(o, 1.0 - tau)


def lr_at(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int,
          min_ratio: float = 0.0) -> float:
    """Linear warmup to peak_lr, then cosine annealing to min_ratio x peak_lr (the paper: 0)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    floor = min_ratio * peak_lr
    return floor + 0.5 * (peak_lr - floor) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# Fig. 1: front-end, context encoder, predictor and target encoder together ------------------------

class StemJEPA(nn.Module):
    """Front-end, context encoder f_theta, predictor g_phi and EMA target encoder f_theta_bar
    (Fig. 1); `config`: the Config they were built from. forward is what training differentiates;
    the methods after it use a trained model on one mono waveform (N,) of any length."""
    def __init__(self, *, frontend: LogMel, encoder: ViT, predictor: nn.Module,
                 instruments: list[str], config: Config):
        super().__init__()
        self.frontend, self.encoder, self.predictor = frontend, encoder, predictor
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.instruments = list(instruments)
        self.config = config

    def encode(self, wav: torch.Tensor, *, target: bool = False) -> torch.Tensor:
        """Waveforms (B, N) -> patch embeddings (B, F, T, D), context or target encoder."""
        return (self.target_encoder if target else self.encoder)(self.frontend(wav))

    def predict(self, wav: torch.Tensor, instrument: torch.Tensor) -> torch.Tensor:
        """Context mixes (B, N), instrument ids (B,) -> predicted targets (B, F, T, D)."""
        return self.predictor(self.encode(wav), instrument)

    def forward(self, context: torch.Tensor, target: torch.Tensor, instrument: torch.Tensor):
        """The loss of Eq. 1 for a batch of waveforms (B, N), with the predictions z~ and the
        targets z_bar it compared (the training log's collapse measures read them)."""
        pred = self.predict(context, instrument)                        # z~ (B, F, T, D)
        with torch.no_grad():
            z_bar = self.encode(target, target=True)                    # (B, F, T, D), no gradient
        return jepa_loss(pred, z_bar), pred.detach(), z_bar

    # A trained model, on recordings of any length

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu") -> StemJEPA:
        """A trained model from a checkpoint written by `train` (or its weights), in eval mode."""
        ckpt = load_checkpoint(path, map_location=map_location)
        known = {f.name for f in dataclasses.fields(Config)}
        config = Config(**{k: v for k, v in ckpt["config"].items() if k in known})
        model = build_model(config, ckpt["instruments"])
        model.load_state_dict(ckpt["model"])
        return model.eval()

    def instrument_id(self, instrument) -> int:
        """An instrument name (e.g. "bass") or id -> its id, or an error listing the known ones."""
        if not isinstance(instrument, str):
            return int(instrument)
        if instrument not in self.instruments:
            raise StemJEPAError(f"instrument {instrument!r}: the model knows "
                                f"{', '.join(self.instruments)}")
        return self.instruments.index(instrument)

    def encode_long(self, wav, *, target: bool = True, batch: int = 16) -> torch.Tensor:
        """One mono recording (N,) of any length -> patch embeddings (F, T, D), T = ceil(N / 2560),
        by `embed_long`; the target encoder by default (retrieval's references)."""
        return embed_long(self, [wav], target=target, batch=batch,
                          device=next(self.parameters()).device)[0]

    def predict_long(self, mix, instrument, *, batch: int = 16) -> torch.Tensor:
        """A mix (N,) and the missing instrument (name or id) -> the predicted patch embeddings
        (F, T, D) of a stem that fits it (retrieval's query before pooling)."""
        return embed_long(self, [mix], instruments=[self.instrument_id(instrument)],
                          batch=batch, device=next(self.parameters()).device)[0]

    def embed(self, wav, instrument=None, *, batch: int = 16) -> torch.Tensor:
        """One pooled vector (F*D,): a recording's target embedding or, given `instrument`, the
        prediction for the stem missing from this mix. Retrieval compares them by L2 (4.1)."""
        if instrument is None:
            return pool(self.encode_long(wav, batch=batch))
        return pool(self.predict_long(wav, instrument, batch=batch))

    def score(self, mix, stem, instrument, *, batch: int = 16) -> dict:
        """How well `stem` fits `mix` as `instrument` (4.1): the L2 distance of the pooled
        prediction and the stem's pooled embedding (0 to 2, lower fits better), and the cosine
        1 - d^2 / 2. Where it fits best (Eq. 3): extras/search.py."""
        distance = (self.embed(mix, instrument, batch=batch) - self.embed(stem, batch=batch)).norm()
        return {"distance": round(distance.item(), 4),
                "similarity": round(1 - distance.item() ** 2 / 2, 4)}


def build_model(cfg: Config, instruments: list[str]) -> StemJEPA:
    """The model of a config (Fig. 1), which it keeps as `model.config` (see `StemJEPA`)."""
    max_frames = chunk_samples(cfg) // cfg.hop_length
    frontend = LogMel(sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
                      n_mels=cfg.n_mels, f_min=cfg.f_min, f_max=cfg.f_max)
    encoder = ViT(n_mels=cfg.n_mels, max_frames=max_frames, patch_size=cfg.patch_size, dim=cfg.dim,
                  depth=cfg.depth, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio)
    if cfg.predictor in ("mlp", "mlp-nocond"):
        conditioned = len(instruments) if cfg.predictor == "mlp" else 0
        predictor = MLPPredictor(dim=cfg.dim, hidden=cfg.pred_hidden, layers=cfg.pred_layers,
                                 n_instruments=conditioned)
    elif cfg.predictor == "transformer":
        predictor = TransformerPredictor(
            dim=cfg.dim, width=cfg.pred_tf_dim, depth=cfg.pred_tf_depth, heads=cfg.pred_tf_heads,
            mlp_ratio=cfg.mlp_ratio, n_instruments=len(instruments),
            n_freq=cfg.n_mels // cfg.patch_size, max_time=max_frames // cfg.patch_size)
    else:
        raise StemJEPAError(f"unknown predictor {cfg.predictor!r}; "
                            "choose mlp, mlp-nocond or transformer")
    return StemJEPA(frontend=frontend, encoder=encoder, predictor=predictor,
                    instruments=instruments, config=cfg)


# 3.2 Sampling context and target ------------------------------------------------------------------

def choose_stems(peaks: np.ndarray, rng: np.random.Generator, threshold: float):
    """Pick (target, context) from the stems' peak amplitudes in one chunk, or None if < 2 are
    active (peak > threshold). "Let A be the indices of active (i.e. non-silent) stems. We first
    pick a random index t in A as target. Then, we randomly select a subset C of A minus {t} [...].
    The number of stems |C| in this subset is uniformly sampled between 1 and |A| - 1" (3.2)."""
    active = np.flatnonzero(peaks > threshold)
    if len(active) < 2:
        return None
    target = rng.choice(active)
    others = active[active != target]
    k = rng.integers(1, len(others) + 1)                                # |C| ~ U{1, ..., |A| - 1}
    return int(target), np.sort(rng.choice(others, size=k, replace=False))


def draw_example(stems: torch.Tensor, chunk: int, rng: np.random.Generator, *, threshold: float,
                 tries: int):
    """One example from one track's stems (S, N): (context (chunk,), target (chunk,), target stem).
    A chunk at a uniformly random offset, zero-padded at the end of a short track. "If |A| < 2
    [...] we resample another audio chunk from the same track" (footnote 2), up to `tries` times,
    then the last chunk's loudest stem is the target and the second loudest the context. (The
    authors' code redraws only when no stem is active, and at last takes a random target with all
    other stems as context; we follow the paper.) Only the chunk of `stems` (a memmap) is read."""
    for _ in range(tries):
        offset = int(rng.integers(0, max(stems.shape[1] - chunk, 0) + 1))
        x = stems[:, offset: offset + chunk]                            # (S, chunk), a view
        peaks = x.abs().amax(dim=1).float().numpy()                     # (S,)
        choice = choose_stems(peaks, rng, threshold)
        if choice is not None:
            break
    else:
        loudest = np.argsort(-peaks, kind="stable")
        choice = int(loudest[0]), loudest[1:2]
    target, context = choice
    pad = (0, chunk - x.shape[1])
    context_wav = F.pad(x[torch.from_numpy(context)].float().sum(0), pad)
    target_wav = F.pad(x[target].float(), pad)
    return context_wav, target_wav, target


class StemChunks(torch.utils.data.Dataset):
    """Item i -> (context (N,), target (N,), instrument id), a pure function of (seed, i): a resumed
    run reads the uninterrupted run's data, whatever the number of workers."""
    def __init__(self, tracks: list[dict], instruments: list[str], *, chunk: int, threshold: float,
                 tries: int, seed: int):
        self.tracks, self.chunk, self.threshold, self.tries, self.seed = (tracks, chunk, threshold,
                                                                          tries, seed)
        self.instrument_ids = [[instruments.index(s) for s in t["stems"]] for t in tracks]
        self._open = {}                         # track -> memory map, per process

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, index])
        t = int(rng.integers(len(self.tracks)))
        if t not in self._open:                 # copy-on-write map: writable for torch, unwritten
            self._open[t] = torch.from_numpy(np.load(self.tracks[t]["npy"], mmap_mode="c"))
        context, target, stem = draw_example(self._open[t], self.chunk, rng,
                                             threshold=self.threshold, tries=self.tries)
        return context, target, self.instrument_ids[t][stem]


def step_batches(*, start: int, steps: int, batch: int, rank: int = 0, world: int = 1):
    """Step s's dataset indices for rank r: [(s * world + r) * batch, ... + batch), a pure
    function of the step: starting at `start` resumes the same sequence."""
    for s in range(start, steps):
        first = (s * world + rank) * batch
        yield list(range(first, first + batch))


def _worker_ignores_signals(worker_id):             # the main process saves, then stops them
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def step_loader(tracks: list[dict], instruments: list[str], cfg: Config, *, start: int = 0,
                rank: int = 0, world: int = 1, workers=None, pin_memory: bool = False):
    """This process's share of each training step's batch, from step `start` on: batches of
    (context (B, N), target (B, N), instrument (B,)), B = batch_size / world."""
    dataset = StemChunks(tracks, instruments, chunk=chunk_samples(cfg),
                         threshold=cfg.active_threshold, tries=cfg.redraw_tries, seed=cfg.seed)
    batches = step_batches(start=start, steps=cfg.steps, batch=cfg.batch_size // world,
                           rank=rank, world=world)
    workers = min(8, max((os.cpu_count() or 2) // 2, 1)) if workers is None else workers
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin_memory,
        prefetch_factor=4 if workers else None, worker_init_fn=_worker_ignores_signals)


# 3.4 Training data: multitrack folders -> a cache of 16 kHz stems ---------------------------------

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3")
MIX_NAMES = ("mixture", "mix")              # a track's full mix is not a stem: ignored
MUSDB_STREAMS = {"drums": 1, "bass": 2, "other": 3, "vocals": 4}   # .stem.mp4; 0 is the mixture
LENGTH_TOLERANCE_S = 1.0                    # stems of one track may differ by this much (trimmed)


def find_tracks(root, split: str = "train") -> list[tuple[str, dict[str, tuple]]]:
    """ROOT/split's tracks (ROOT's without split folders; "all": train/, test/), sorted, as
    (name, {stem: (file, .stem.mp4 stream or None)})."""
    root = Path(root)
    if not root.is_dir():
        raise StemJEPAError(f"{root}: no such folder. --data must be a MUSDB18(-HQ) root (with "
                            "train/ and test/) or a folder with one sub-folder of stems per track")
    if split == "all" and any((root / s).is_dir() for s in ("train", "test")):
        return [t for s in ("train", "test") if (root / s).is_dir() for t in find_tracks(root, s)]
    base = root / split
    if not base.is_dir():
        if any((root / s).is_dir() for s in ("train", "test", "validation")):
            raise StemJEPAError(f"{root} has no {split}/ folder")
        base = root
    tracks, found = [], []
    for entry in sorted(p for p in base.iterdir() if not p.name.startswith(".")):
        found.append(entry.name + ("/" if entry.is_dir() else ""))
        if entry.name.endswith(".stem.mp4"):
            stems = {stem: (str(entry), stream) for stem, stream in MUSDB_STREAMS.items()}
            tracks.append((entry.name[: -len(".stem.mp4")], stems))
        elif entry.is_dir():
            stems = {f.stem.lower(): (str(f), None) for f in sorted(entry.iterdir())
                     if f.suffix.lower() in AUDIO_EXTENSIONS and f.stem.lower() not in MIX_NAMES}
            if stems:
                tracks.append((entry.name, stems))
    if not tracks:
        what = (f"holds no tracks; found {', '.join(found[:5])}{', ...' if len(found) > 5 else ''}"
                if found else "is empty")
        raise StemJEPAError(f"{base} {what}. Layouts read: ROOT/[train|test/]<track>/<stem>.wav "
                            "(MUSDB18-HQ, your own multitracks; or .flac, ...) and ROOT/{train,"
                            "test}/<track>.stem.mp4 (MUSDB18); convert others with "
                            "extras/convert.py")
    return tracks


def load_audio(path, sample_rate: int, stream: int | None = None) -> np.ndarray:
    """A file (or a .stem.mp4 stream) as mono float32 at sample_rate: the mean of its channels.
    ffmpeg only decodes, so both MUSDB18 layouts give one array (`-ac 1` would be 3 dB louder)."""
    source = path
    if stream is not None:
        if shutil.which("ffmpeg") is None:
            raise StemJEPAError(f"{path}: decoding MUSDB18 .stem.mp4 needs the ffmpeg program: "
                                "install it (e.g. apt install ffmpeg) or use MUSDB18-HQ")
        run = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", f"0:{stream}",
                              "-c:a", "pcm_f32le", "-f", "wav", "-"], capture_output=True)
        if run.returncode != 0:
            raise StemJEPAError(f"{path}: ffmpeg could not decode stream {stream}: "
                                f"{run.stderr.decode(errors='replace').strip()[-200:]}")
        source = io.BytesIO(run.stdout)
    elif not os.path.isfile(path):
        raise StemJEPAError(f"{path}: no such file")
    elif os.path.getsize(path) == 0:
        raise StemJEPAError(f"{path}: empty file (0 bytes)")
    try:
        x, sr = sf.read(source, dtype="float32", always_2d=True)        # (N, channels)
    except Exception as e:                      # libsndfile's errors vary by version
        reason = str(e).rsplit(":", 1)[-1].strip()                      # after the path it repeats
        raise StemJEPAError(f"{path}: not a readable audio file ({reason})") from None
    if len(x) == 0:
        raise StemJEPAError(f"{path}: no audio samples")
    if not np.isfinite(x).all():
        raise StemJEPAError(f"{path}: contains NaN or infinite samples")
    x = x.mean(axis=1)
    if sr != sample_rate:
        x = torchaudio.functional.resample(torch.from_numpy(x), sr, sample_rate).numpy()
    return x


def _decode_track(name: str, stems: dict, *, sample_rate: int, notes: list):
    """One track's stems as (sorted names, (S, N) float32), or (None, why it is left out)."""
    audio = {}
    for stem, (path, stream) in stems.items():
        try:
            audio[stem] = load_audio(path, sample_rate, stream)
        except StemJEPAError as e:
            notes.append(f"unreadable, skipped: {e}")
    if not audio:
        return None, "no readable stem"
    lengths = {s: len(x) for s, x in audio.items()}
    n = min(lengths.values())
    if max(lengths.values()) - n > LENGTH_TOLERANCE_S * sample_rate:
        found = ", ".join(f"{s} {v / sample_rate:.2f} s" for s, v in lengths.items())
        return None, f"stems differ in length by more than {LENGTH_TOLERANCE_S:g} s: {found}"
    for s in [s for s, x in audio.items() if not np.any(x[:n])]:
        notes.append(f"silent stem (all zero), left out: {name}/{s}")
        del audio[s]
    if not audio:
        return None, "every stem is all zero"
    return sorted(audio), np.stack([audio[s][:n] for s in sorted(audio)])     # (S, N)


def _whole_npy(path: Path, shape: list) -> bool:
    """Whether a cached array is whole: a readable header, the recorded shape, all its bytes."""
    try:
        x = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return False
    return list(x.shape) == list(shape) and x.offset + x.nbytes == os.path.getsize(path)


def _write_atomic(path: Path, write) -> None:
    """write(tmp), then rename: a reader never sees half a file, whenever the writer is killed."""
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)     # the suffix last: np.save keeps it
    write(tmp)
    os.replace(tmp, path)


def prepare(root, split: str = "train", *, cache=None, sample_rate=16000, chunk_seconds=8.0,
            threshold=0.1, training=True, log=print) -> list[dict]:
    """Decode each track once into a cache, a float16 .npy of its stems (memory-mapped in
    training), reused while its files are unchanged and the array whole -> [{name, stems, length,
    npy}]. training=True leaves out tracks with fewer than two stems above `threshold` (3.2);
    all-zero stems are always left out. "all": train/ and test/."""
    found = find_tracks(root, split)
    folder = Path(cache or Path(root) / ".stem_jepa_cache") / f"{sample_rate}hz"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StemJEPAError(f"cannot write the cache in {folder} ({e.strerror}): "
                            "pass --cache DIR") from None
    prepared, notes, t0 = [], [], time.time()
    for i, (name, stems) in enumerate(found):
        files = sorted((s, p, stream, os.stat(p).st_size, os.stat(p).st_mtime_ns)
                       for s, (p, stream) in stems.items())          # a changed file: a new key
        key = hashlib.sha1(json.dumps([sample_rate, files]).encode()).hexdigest()
        meta_path, npy = folder / f"{key[:16]}.json", folder / f"{key[:16]}.npy"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = None                         # new, changed, or left half-written by a kill
        if meta is not None and "excluded" not in meta and not _whole_npy(npy, meta["shape"]):
            log(f"prepare: the cached {npy} of {name} is missing or cut short: decoding it again")
            meta = None
        if meta is None:
            if i % 10 == 9:
                log(f"prepare {split}: decoding {i + 1}/{len(found)} ({time.time() - t0:.0f} s)")
            meta = {"name": name, "notes": []}
            names, x = _decode_track(name, stems, sample_rate=sample_rate, notes=meta["notes"])
            if names is None:
                meta["excluded"] = x
            else:
                _write_atomic(npy, lambda p: np.save(p, x.astype(np.float16)))
                meta.update(stems=names, shape=list(x.shape), peaks=np.abs(x).max(1).tolist())
            _write_atomic(meta_path, lambda p: p.write_text(json.dumps(meta)))
        notes += meta["notes"]
        why = meta.get("excluded")
        if why is None and training:
            active = sum(p > threshold for p in meta["peaks"])
            if active < 2:
                why = f"{active} stem(s) above the silence threshold: nothing to predict from"
            elif meta["shape"][1] < chunk_seconds * sample_rate:
                notes.append(f"shorter than a chunk, zero-padded at the end: {name} "
                             f"({meta['shape'][1] / sample_rate:.1f} s)")
        if why is not None:
            notes.append(f"track left out: {name}: {why}")
            continue
        prepared.append({"name": name, "stems": meta["stems"], "length": meta["shape"][1],
                         "npy": str(npy)})
    report = "".join(f"\n  {n}" for n in notes)
    if not prepared:
        raise StemJEPAError(f"no usable track in {root} ({split}):{report}")
    if notes:
        log(f"prepare {split}: {len(prepared)} of {len(found)} tracks usable; notes:{report}")
    return prepared


def prepare_options(cfg: Config) -> dict:
    """What `prepare` takes from a config: the sample rate, the chunk and the silence threshold."""
    return dict(sample_rate=cfg.sample_rate, chunk_seconds=cfg.chunk_seconds,
                threshold=cfg.active_threshold)


# 3.3 Training: device, optimizer, checkpoints, and what the log watches ---------------------------

def pick_device(name: str | None = None) -> torch.device:
    """cuda -> mps -> cpu, or the one asked for (an error if it is not available)."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "cpu": True}
    name = name or next(kind for kind, ok in available.items() if ok)
    if not available.get(name.split(":")[0]):
        raise StemJEPAError(f"--device {name}: not available on this machine (it has "
                            f"{', '.join(k for k, ok in available.items() if ok)})")
    return torch.device(name)


def autocast_dtype(device: torch.device):
    """The training precision: bf16 autocast on CUDA GPUs that have it natively, fp16 (with a
    GradScaler, the authors' code's choice) on older ones, None (fp32) on CPU and MPS."""
    if device.type != "cuda":
        return None
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)        # natively (Ampere on)
    return torch.bfloat16 if bf16 else torch.float16


def param_groups(model: nn.Module, weight_decay: float, *, decay_all: bool = True) -> list[dict]:
    """AdamW's parameter groups. decay_all: decay on every trainable parameter, as the authors'
    code; otherwise M2D's grouping, on weight matrices only (not biases, norms, embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            exempt = not decay_all and (p.ndim < 2 or "instrument" in name)
            (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint written by `train`: a plain dict, loadable with weights_only=True."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise StemJEPAError(f"{path}: no such checkpoint") from None
    except Exception as e:
        raise StemJEPAError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                            "truncated or not written by torch.save)") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise StemJEPAError(f"{path}: not a Stem-JEPA checkpoint")
    return ckpt


def collapse_measures(pred: torch.Tensor, target: torch.Tensor, instrument: torch.Tensor) -> dict:
    """Does the predictor use the mix, or only the instrument label? From one batch's predictions
    and targets (B, F, T, D) and instruments (B,), over the samples whose instrument occurs at
    least twice. avg_stem_loss: Eq. 1 for a predictor that outputs, at each patch, the mean unit
    target of the *other* samples of the same instrument, "the average bass": a predictor that
    ignores the mix cannot beat it; batch_loss (Eq. 1 of the model on the same samples) must.
    pred_spread, target_spread: RMS distance of the unit predictions (targets) to their
    per-(instrument, patch) mean; 0 when every song gets the same one."""
    p, t = F.normalize(pred.float(), dim=-1), unit_targets(target)      # (B, F, T, D)
    same = (instrument[:, None] == instrument[None]).float()            # (B, B)
    n = same.sum(1)                                 # samples of each one's instrument, itself in
    keep = n > 1
    if not keep.any():
        return dict.fromkeys(("batch_loss", "avg_stem_loss", "pred_spread", "target_spread"),
                             float("nan"))
    k = n[keep][:, None, None, None]
    others = (torch.einsum("ij,jftd->iftd", same, t) - t)[keep] / (k - 1)   # leave-one-out mean

    def spread(x):
        mean = torch.einsum("ij,jftd->iftd", same, x)[keep] / k
        return (x[keep] - mean).pow(2).sum(-1).mean().sqrt().item()
    return {"batch_loss": (p[keep] - t[keep]).pow(2).sum(-1).mean().item(),
            "avg_stem_loss": (F.normalize(others, dim=-1) - t[keep]).pow(2).sum(-1).mean().item(),
            "pred_spread": spread(p), "target_spread": spread(t)}


# 3.3 Training: the step and the loop --------------------------------------------------------------

def training_step(model: StemJEPA, optimizer, context, target, instrument, *, lr: float,
                  tau: float, grad_clip: float = 3.0, grad_accum: int = 1, loss_fn=None,
                  amp_dtype=None, scaler=None):
    """One step of 3.3, in four: forward and Eq. 1, backward, AdamW, EMA (Eq. 2). loss_fn: the
    model or its DDP / compiled wrapper; grad_accum micro-batches add their gradients. A
    non-finite gradient norm (fp16: an overflow, which also lowers the scale) skips the update.
    Returns the mean loss, whether it was applied, and the last micro-batch's (pred, z_bar,
    instrument) for the log."""
    loss_fn = model if loss_fn is None else loss_fn     # `or` would ask a compiled model its len()
    scaler = torch.amp.GradScaler(enabled=False) if scaler is None else scaler
    for group in optimizer.param_groups:
        group["lr"] = lr
    micro, total = len(context) // grad_accum, 0.0
    for i in range(grad_accum):
        part = slice(i * micro, (i + 1) * micro)
        last = i == grad_accum - 1                      # DDP averages the gradients only then
        sync = loss_fn.no_sync() if not last and hasattr(loss_fn, "no_sync") else nullcontext()
        with sync, torch.autocast(context.device.type, dtype=amp_dtype, enabled=bool(amp_dtype)):
            # Step 1. forward context and target, predict, Eq. 1
            loss, pred, z_bar = loss_fn(context[part], target[part], instrument[part])
        # Step 2. backward (gradients add up over the micro-batches)
        scaler.scale(loss / grad_accum).backward()
        total = total + loss.detach() / grad_accum
    # Step 3. clip the gradient norm and take the AdamW step, unless the norm is not finite
    scaler.unscale_(optimizer)                      # a no-op unless fp16
    trainable = [p for p in model.parameters() if p.requires_grad]
    applied = bool(torch.isfinite(nn.utils.clip_grad_norm_(trainable, grad_clip, foreach=True)))
    if applied:
        optimizer.step()
        # Step 4. the target encoder follows the context encoder (Eq. 2)
        ema_update(list(model.target_encoder.parameters()), list(model.encoder.parameters()), tau)
    scaler.update()                                 # fp16: halves the scale after an overflow
    optimizer.zero_grad(set_to_none=True)
    return total, applied, (pred, z_bar, instrument[part])


RESUMABLE_CHANGES = ("steps", "log_every", "ckpt_every", "grad_accum")  # weights mean the same


def check_resume(ckpt: dict, cfg: Config, data_id: str, instruments: list[str], force: bool):
    """Refuse to resume with another configuration or data; --force lets RESUMABLE_CHANGES and the
    data change (not the instruments, which fix the weights' shapes)."""
    changed = [k for k, v in ckpt["config"].items() if hasattr(cfg, k) and v != getattr(cfg, k)]
    changed += ["data"] * (ckpt["data"] != data_id)
    text = ", ".join(f"{k} {ckpt['config'].get(k, 'another track list')} -> "
                     f"{getattr(cfg, k, 'this one')}" for k in changed)
    if ckpt["instruments"] != instruments or not set(changed) <= {*RESUMABLE_CHANGES, "data"}:
        raise StemJEPAError(f"cannot resume a run of another configuration or instruments "
                            f"({text or ckpt['instruments']}): pass its preset and options")
    if changed and not force:
        raise StemJEPAError(f"cannot resume: {text}; pass --force to go on with these changes")


@contextmanager
def _guard_run(out: Path, rank: int):
    """Lock OUT while the loop runs (flock: kill -9 frees it; not on Windows), and let Ctrl-C or
    SIGTERM set stop["signal"]: the loop saves and returns; a second one ends the process."""
    stop = {}

    def handle(signum, frame):
        stop["signal"] = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)
    with open(out / "train.lock", "w") as lock:
        if rank == 0 and os.name == "posix":
            import fcntl
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StemJEPAError(f"{out} is in use by another run: use another --out") from None
        in_main = threading.current_thread() is threading.main_thread()  # only it sets handlers
        previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM) if in_main}
        try:
            yield stop
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def train(cfg: Config, data, *, out="runs/stem-jepa", cache=None, resume=False, force=False,
          device=None, compile=False, workers=None, stop_at=None, log=print):
    """Train on `data`'s train split (3.3) into OUT/checkpoint.pt and OUT/log.csv; stop_at, Ctrl-C
    and SIGTERM save and return (resume=True goes on). Returns (model, the signal that stopped)."""
    out, ckpt_path = Path(out), Path(out) / "checkpoint.pt"
    # Setup: one process per device under torchrun (DDP), else one; the device and its precision
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise StemJEPAError(f"--batch-size {cfg.batch_size} does not divide among {world} "
                            f"processes x {cfg.grad_accum} accumulation steps")
    if ddp and device is None and torch.cuda.is_available():
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    device = pick_device(device)
    if out.exists() and not out.is_dir():
        raise StemJEPAError(f"--out {out} is a file: give a folder for the run")
    out.mkdir(parents=True, exist_ok=True)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp_dtype = autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)   # fp16 only
    # Data (3.4): rank 0 decodes the tracks into the cache while the others wait, then read it
    if rank > 0:
        log = lambda *args: None                        # noqa: E731 (rank 0 speaks for all)
        dist.barrier()
    tracks = prepare(data, "train", cache=cache, log=log, **prepare_options(cfg))
    if ddp and rank == 0:
        dist.barrier()
    instruments = sorted({s for t in tracks for s in t["stems"]})
    data_id = hashlib.sha1(json.dumps([(t["name"], t["stems"], t["length"])
                                       for t in tracks]).encode()).hexdigest()
    # The model and AdamW (3.3); fused: one kernel over all parameters
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, instruments).to(device)
    groups = param_groups(model, cfg.weight_decay, decay_all=cfg.weight_decay_all)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(cfg.beta1, cfg.beta2),
                                  fused=device.type in ("cuda", "cpu"))
    # Resume: weights, optimizer, step, and the loss summed since the last log line
    step, skipped, loss_sum, n_summed = 0, 0, 0.0, 0
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        check_resume(ckpt, cfg, data_id, instruments, force)
        model.load_state_dict(ckpt["model"])
        if ckpt["optimizer"]:                       # None: a new run from these weights
            optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        step, skipped, (loss_sum, n_summed) = ckpt["step"], ckpt["skipped"], ckpt["log_window"]
        log(f"resuming {ckpt_path} at step {step}")
    log(f"training on {len(tracks)} tracks of {instruments}, {device} x {world}, step {step}")
    loss_fn = nn.parallel.DistributedDataParallel(model) if ddp else model
    loss_fn = torch.compile(loss_fn) if compile else loss_fn
    loader = step_loader(tracks, instruments, cfg, start=step, rank=rank, world=world,
                         workers=workers, pin_memory=device.type == "cuda")     # 3.2

    def save():                                     # all a resumed run needs, written atomically
        state = dict(config=dataclasses.asdict(cfg), instruments=instruments, step=step,
                     skipped=skipped, data=data_id, log_window=(loss_sum, n_summed),
                     model=model.state_dict(), optimizer=optimizer.state_dict(),
                     scaler=scaler.state_dict())
        if rank == 0:
            _write_atomic(ckpt_path, lambda p: torch.save(state, p))

    n_seen, bad_in_a_row, t_last = 0, 0, time.time()
    with _guard_run(out, rank) as stop:
        for batch in loader:
            if stop or step == stop_at:
                break
            context, target, instrument = (x.to(device, non_blocking=True) for x in batch)
            lr = lr_at(step, peak_lr=cfg.base_lr * cfg.batch_size / 256, min_ratio=cfg.min_lr_ratio,
                       warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)   # 3.3
            tau = tau_at(step, cfg.steps, cfg.tau_start, cfg.tau_end)      # Eq. 2's tau_i
            # Steps 1-4: forward and Eq. 1, backward, AdamW, EMA of the target encoder (Eq. 2)
            loss, applied, (pred, z_bar, inst) = training_step(
                model, optimizer, context, target, instrument, lr=lr, tau=tau,
                grad_clip=cfg.grad_clip, grad_accum=cfg.grad_accum, loss_fn=loss_fn,
                amp_dtype=amp_dtype, scaler=scaler)
            if applied:
                loss_sum, n_summed, bad_in_a_row = loss_sum + loss.item(), n_summed + 1, 0
            else:
                skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
                log(f"step {step}: non-finite loss or gradient, step skipped ({skipped} so far)")
                if bad_in_a_row == 5:
                    raise StemJEPAError(f"step {step}: 5 non-finite steps in a row; {ckpt_path} "
                                        "holds the last good state (try a lower --lr)")
            step, n_seen = step + 1, n_seen + 1
            if step % cfg.log_every == 0 or step == cfg.steps:     # the log, with collapse
                row = {"step": step, "loss": loss_sum / max(n_summed, 1), "lr": lr, "tau": tau,
                       "samples_per_s": n_seen * cfg.batch_size / (time.time() - t_last),
                       **collapse_measures(pred, z_bar, inst), "skipped": skipped}
                log("  ".join(f"{k} {v:.6g}" for k, v in row.items()))
                if rank == 0:
                    with open(out / "log.csv", "a") as f:
                        f.write(",".join(row) + "\n" if f.tell() == 0 else "")
                        f.write(",".join(f"{v:.8g}" for v in row.values()) + "\n")
                loss_sum, n_summed, n_seen, t_last = 0.0, 0, 0, time.time()
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save()
        if step < cfg.steps:
            save()
            log(f"{stop.get('signal', 'stop_at')}: saved at step {step}; --resume goes on")
    if ddp:
        dist.destroy_process_group()
    return model.eval(), stop.get("signal")


# 4.1 Stem retrieval: whole tracks -> pooled embeddings -> Recall@K and normalised rank ------------

@torch.no_grad()
def embed_long(model: StemJEPA, wavs: list[np.ndarray], *, instruments=None, target=True,
               chunk=None, batch=16, device="cpu") -> list[torch.Tensor]:
    """Patch embeddings (F, T, D) of whole recordings, T covering every frame: each waveform is cut
    into consecutive training chunks (the last zero-padded to whole patches), batched across
    waveforms. With `instruments` (an id per waveform), the predictions; else the target (or
    context) encoder's. In float32 even under autocast: pooled vectors of one instrument sit at
    cosine ~0.98, where bf16 rounding reorders neighbours."""
    patch = model.frontend.hop_length * model.encoder.patch_size       # samples per time patch
    chunk = chunk or chunk_samples(model.config)
    chunk = max(patch, chunk - chunk % patch)                           # whole patches only
    by_length = {}                                      # length -> [(wav, position, samples)]
    for w, x in enumerate(wavs):
        x = np.asarray(x.detach().cpu() if torch.is_tensor(x) else x, dtype=np.float32)
        if x.ndim != 1:
            raise StemJEPAError(f"expected mono waveforms (N,), got shape {tuple(x.shape)}")
        for j, start in enumerate(range(0, max(len(x), 1), chunk)):
            piece = x[start: start + chunk]
            if len(piece) < chunk:                                      # whole patches, >= 1
                piece = np.pad(piece, (0, max(-len(piece) % patch, patch - len(piece))))
            by_length.setdefault(len(piece), []).append((w, j, piece))
    groups = [same[i: i + batch] for same in by_length.values() for i in range(0, len(same), batch)]
    out = [{} for _ in wavs]                                    # position -> (F, T_chunk, D)
    with torch.autocast(torch.device(device).type, enabled=False):
        for group in groups:
            x = torch.from_numpy(np.stack([p[2] for p in group])).float().to(device)   # (b, chunk)
            if instruments is None:
                z = model.encode(x, target=target)
            else:
                ids = torch.tensor([instruments[w] for w, _, _ in group], device=device)
                z = model.predict(x, ids)
            for (w, j, _), zi in zip(group, z.float().cpu()):
                out[w][j] = zi
    return [torch.cat([chunks[j] for j in sorted(chunks)], dim=1) for chunks in out]


def retrieval_metrics(queries, refs, truth, ks=(1, 5, 10), candidates=None) -> dict:
    """Recall@K and normalised rank (mean and median over the queries), in percent (4.1.1).
    nrank: rank / R counted from 1 (nearest = 1), as the authors' evaluation and Table 1 (its
    median 0.5 % is rank 3 of 600); nrank0: from 0, the paper's text's [0, 1), 100 / R lower.
    With `candidates` (Q, R), each query's R is the number of references it competes with. By
    L2 distance; ties are broken at random, in expectation: rank = 1 + closer + (tied - 1) / 2."""
    d = torch.cdist(queries.double(), refs.double())                    # (Q, R)
    if candidates is not None:
        d = d.masked_fill(~candidates, float("inf"))
    d_true = d.gather(1, truth[:, None])                                # (Q, 1): the true stem's
    closer, tied = (d < d_true).sum(1), (d == d_true).sum(1)            # tied: itself included
    R = refs.shape[0] if candidates is None else candidates.sum(1)
    rank = 1 + closer + (tied - 1).double() / 2
    m = {f"R@{k}": 100 * ((k - closer) / tied).clamp(0, 1).mean().item() for k in ks}
    for name, r in (("nrank", rank), ("nrank0", rank - 1)):
        m[f"{name}_mean"] = 100 * (r / R).mean().item()
        m[f"{name}_median"] = 100 * (r / R).quantile(0.5).item()    # middle two's mean if even
    return m


def chance_metrics(R: int, ks=(1, 5, 10)) -> dict:
    """The expected `retrieval_metrics` of a random ranking of R references."""
    ranks = np.arange(1, R + 1) / R
    return {**{f"R@{k}": 100 * min(k / R, 1.0) for k in ks},
            "nrank_mean": 100 * ranks.mean(), "nrank_median": 100 * float(np.median(ranks)),
            "nrank0_mean": 100 * (ranks - 1 / R).mean(),
            "nrank0_median": 100 * float(np.median(ranks - 1 / R))}


def centre_per_instrument(x: torch.Tensor, instrument: torch.Tensor) -> torch.Tensor:
    """Vectors (Q, C) minus the mean vector of their instrument, L2-normalised."""
    x = x.double()
    means = torch.zeros(int(instrument.max()) + 1, x.shape[1], dtype=x.dtype).index_add_(
        0, instrument, x) / torch.bincount(instrument)[:, None].clamp(min=1)
    return F.normalize(x - means[instrument], dim=1)


def which_song_and_instrument(queries, refs, track, instrument) -> dict:
    """The two questions inside a retrieval rank (query i's true stem is reference i), as R@1 and
    normalised rank: which_song, among the N references of the *same instrument* (the bass of this
    song, not any bass); which_instrument, among the S stems of the *same song*;
    which_song_centred, after subtracting each instrument's mean vector (not the paper's: it
    removes the part common to every bass, which favours the references nearest the average
    bass); query_cosine, of one instrument's queries across songs (1: only the instrument)."""
    same_inst = instrument[:, None] == instrument[None]                 # (Q, R)
    same_song = track[:, None] == track[None]
    q = F.normalize(queries.double(), dim=1)
    others = same_inst & ~same_song
    cosine = (q @ q.T)[others].mean().item() if others.any() else None
    truth = torch.arange(len(queries))
    centred = [centre_per_instrument(x, instrument) for x in (queries, refs)]
    return {"which_song": retrieval_metrics(queries, refs, truth, (1,), candidates=same_inst),
            "which_song_centred": retrieval_metrics(*centred, truth, (1,), candidates=same_inst),
            "which_instrument": retrieval_metrics(queries, refs, truth, (1,), candidates=same_song),
            "query_cosine": cosine}


# =============================================================================================
# PART TWO: what the commands need: Table 1's evaluation, toy songs, the command line
# =============================================================================================


# 4.1 Table 1: the model's retrieval beside chance, random weights and a DSP baseline --------------

def dsp_features(x: np.ndarray, sample_rate: int = 16000) -> np.ndarray:
    """A recording after AutoMashupper's harmonic and rhythmic "mashability": time-averaged
    chroma (12), onset-envelope autocorrelation at 60-180 BPM (25), each L2-normalised."""
    x = torch.from_numpy(np.asarray(x, dtype=np.float32))
    spec = torch.stft(x, 4096, 1024, window=torch.hann_window(4096),
                      return_complex=True).abs()                        # (bins, frames)
    freqs = torch.fft.rfftfreq(4096, 1 / sample_rate)
    band = (freqs > 55) & (freqs < 4000)
    pitch_class = (torch.round(12 * torch.log2(freqs[band] / 440.0)).long() + 9) % 12
    chroma = torch.zeros(12).index_add_(0, pitch_class, spec[band].mean(1))
    hop = 256
    logspec = torch.log1p(torch.stft(x, 1024, hop, window=torch.hann_window(1024),
                                     return_complex=True).abs())
    flux = (logspec[:, 1:] - logspec[:, :-1]).clamp(min=0).sum(0)
    flux = flux - flux.mean()
    lags = (60 * (sample_rate / hop) / torch.linspace(60, 180, 25)).round().long()  # frames/beat
    ac = torch.stack([(flux[:-lag] * flux[lag:]).mean() if lag < len(flux) else torch.zeros(())
                      for lag in lags])
    return torch.cat([F.normalize(chroma, dim=0),
                      F.normalize(ac.clamp(min=0), dim=0)]).numpy() / np.sqrt(2)


@dataclass
class RetrievalEmbeddings:
    """4.1's pooled vectors, a row per (track, stem): queries q_s^(n) and references z_s^(n)."""
    queries: torch.Tensor                       # (Q, C)
    refs_target: torch.Tensor                   # (R, C)
    track: torch.Tensor                         # (R,)
    instrument: torch.Tensor                    # (R,)


def retrieval_embeddings(model: StemJEPA, tracks: list[dict], *, device="cpu", batch=16, log=print):
    """Per prepared track n and known stem s: the query q_s^(n) (the predictor on s over the mix
    of the other stems, 4.1.1) and the target encoder's reference z_s^(n), `pool`ed."""
    model = model.to(device).eval()

    def embed(wavs, **options):                         # (F, T, D) per waveform, then pooled
        return [pool(z) for z in embed_long(model, wavs, batch=batch, device=device, **options)]
    queries, refs_target, track, instrument = [], [], [], []
    t0 = time.time()
    for n, t in enumerate(tracks):
        x = np.load(t["npy"]).astype(np.float32)                        # (S, N)
        known = [i for i, s in enumerate(t["stems"]) if s in model.instruments]
        ids = [model.instruments.index(t["stems"][i]) for i in known]
        stems = [x[i] for i in known]
        mixes = [x.sum(0) - x[i] for i in known]                        # x_{not s}: all but s
        queries += embed(mixes, instruments=ids)
        refs_target += embed(stems)
        track += [n] * len(known)
        instrument += ids
        if (n + 1) % 10 == 0:
            log(f"  embedded {n + 1}/{len(tracks)} tracks in {time.time() - t0:.0f} s")
    return RetrievalEmbeddings(queries=torch.stack(queries), refs_target=torch.stack(refs_target),
                               track=torch.tensor(track), instrument=torch.tensor(instrument))


def dsp_embeddings(tracks: list[dict], instruments: list[str], sample_rate: int):
    """The DSP baseline: queries from the mix without s, as for the model (one query for every
    missing stem would be unfair: DSP has no notion of instrument), references from each stem."""
    rows = []                                           # (query, reference, track, instrument)
    for n, t in enumerate(tracks):
        x = np.load(t["npy"]).astype(np.float32)
        rows += [(dsp_features(x.sum(0) - x[i], sample_rate), dsp_features(x[i], sample_rate), n,
                  instruments.index(s)) for i, s in enumerate(t["stems"]) if s in instruments]
    q, r, track, instrument = (torch.tensor(np.stack(column)) for column in zip(*rows))
    return RetrievalEmbeddings(queries=q, refs_target=r, track=track, instrument=instrument)


def evaluate(checkpoint, data, *, split="test", out=None, cache=None, device=None, batch=16,
             seed=0, log=print) -> dict:
    """Table 1 of a checkpoint on a split beside chance, random weights and DSP, with which song
    and which instrument -> OUT/retrieval.json. "all": train/ and test/, as Table 1 (R = 600)."""
    device = pick_device(device)
    model = StemJEPA.from_checkpoint(checkpoint).to(device)
    cfg = model.config                                  # the run's: its sample rate and chunk
    tracks = prepare(data, split, cache=cache, training=False, log=log, **prepare_options(cfg))
    log(f"embedding {len(tracks)} tracks with {checkpoint}, then with random weights")
    emb = retrieval_embeddings(model, tracks, device=device, batch=batch, log=log)
    torch.manual_seed(seed)
    untrained = build_model(cfg, model.instruments).to(device).eval()
    rand = retrieval_embeddings(untrained, tracks, device=device, batch=batch, log=log)
    dsp = dsp_embeddings(tracks, model.instruments, cfg.sample_rate)
    truth = torch.arange(len(emb.queries))                          # query i's stem is reference i
    rows = {"Stem-JEPA": (emb.queries, emb.refs_target),
            "random weights": (rand.queries, rand.refs_target),
            "DSP (chroma + tempo)": (dsp.queries, dsp.refs_target)}
    results = {"N": len(tracks), "S": len(model.instruments), "references": len(truth),
               "checkpoint": str(checkpoint), "split": split, "rows": {}}
    for name, (q, r) in rows.items():
        results["rows"][name] = {**retrieval_metrics(q, r, truth),
                                 **which_song_and_instrument(q, r, emb.track, emb.instrument),
                                 "per_instrument": {s: retrieval_metrics(q[m], r, truth[m])
                                                    for i, s in enumerate(model.instruments)
                                                    if (m := emb.instrument == i).any()}}
    results["rows"]["chance"] = {**chance_metrics(len(truth)),
                                 "which_song": chance_metrics(len(tracks), ks=(1,)),
                                 "which_song_centred": chance_metrics(len(tracks), ks=(1,)),
                                 "which_instrument": chance_metrics(results["S"], ks=(1,)),
                                 "query_cosine": None}
    results.update(results["rows"]["Stem-JEPA"])                      # headline numbers on top
    out = Path(out or Path(checkpoint).parent / f"eval-{split}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval.json").write_text(json.dumps(results, indent=1))
    log(format_table(results))
    log(f"wrote {out / 'retrieval.json'}")
    return results


def format_table(results: dict) -> str:
    """Table 1's layout in percent, then which song?, which instrument? and the query cosine."""
    lines = [f"retrieval on {results['N']} tracks x {results['S']} instruments, "
             f"R = {results['references']} references; nrank = rank / R, nearest = rank 1",
             f"{'model':34s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s} {'nrank mean':>11s} "
             f"{'median':>7s} | {'song R@1':>8s} {'song nrank':>10s} {'centred':>8s} | "
             f"{'inst R@1':>8s} {'inst nrank':>10s} | {'q cos':>6s}"]
    for name, m in results["rows"].items():
        cosine = "-" if m["query_cosine"] is None else format(m["query_cosine"], ".3f")
        lines.append(f"{name:34s} {m['R@1']:6.1f} {m['R@5']:6.1f} {m['R@10']:6.1f} "
                     f"{m['nrank_mean']:11.1f} {m['nrank_median']:7.1f}"
                     f" | {m['which_song']['R@1']:8.1f} {m['which_song']['nrank_mean']:10.1f}"
                     f" {m['which_song_centred']['nrank_mean']:8.1f}"
                     f" | {m['which_instrument']['R@1']:8.1f}"
                     f" {m['which_instrument']['nrank_mean']:10.1f} | {cosine:>6s}")
    for s, m in results["rows"]["Stem-JEPA"]["per_instrument"].items():
        lines.append(f"{'  ' + s:34s} {m['R@1']:6.1f} {m['R@5']:6.1f} {m['R@10']:6.1f} "
                     f"{m['nrank_mean']:11.1f} {m['nrank_median']:7.1f}")
    return "\n".join(lines)


# Toy multitracks: procedural songs whose stems share a key, a tempo and chords --------------------

NOTE_NAMES = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"]
SCALES = {"maj": [0, 2, 4, 5, 7, 9, 11], "min": [0, 2, 3, 5, 7, 8, 10]}
TOY_STEMS = ("bass", "drums", "other", "vocals")


def _tone(freq, dur, sr, harmonics, *, attack=0.01, decay=0.5, vibrato=0.0):
    """Additive harmonics below Nyquist, attack/exponential decay, vibrato (depth at 5.5 Hz)."""
    t = np.arange(int(dur * sr)) / sr
    phase = 2 * np.pi * freq * t
    if vibrato:
        phase += vibrato * freq / 5.5 * np.sin(2 * np.pi * 5.5 * t)
    k = np.arange(1, len(harmonics) + 1)
    amps = np.where(k * freq < sr / 2, harmonics, 0.0)
    wave = np.sin(phase[:, None] * k[None]) @ amps
    envelope = (np.minimum(t / attack, 1.0) * np.exp(-t / decay)
                * np.minimum((dur - t) / 0.01, 1.0))
    return wave * envelope


def _drum(kind, sr, rng, params):
    t = np.arange(int(0.25 * sr)) / sr
    if kind == "kick":
        freq = params["kick_low"] + 90 * np.exp(-t / 0.03)
        return np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.exp(-t / params["kick_decay"])
    noise = rng.standard_normal(len(t))
    if kind == "snare":
        tone = np.sin(2 * np.pi * 190 * t) * np.exp(-t / 0.04)
        return 0.6 * noise * np.exp(-t / params["snare_decay"]) + tone
    return 0.5 * np.diff(noise, prepend=0.0) * np.exp(-t / 0.015)      # hi-hat: high-passed noise


def _room(x: np.ndarray, sr: int, *, cutoff: float, decay: float, wet: float, rng) -> np.ndarray:
    """A song's recording chain: a one-pole low-pass at `cutoff` Hz, a noise reverb (`decay` s)."""
    a = np.exp(-2 * np.pi * cutoff / sr)
    spectrum = np.fft.rfft(x, 2 * len(x))
    freqs = np.fft.rfftfreq(2 * len(x))                                 # cycles per sample
    spectrum *= (1 - a) / (1 - a * np.exp(-2j * np.pi * freqs))         # the one-pole response
    t = np.arange(int(4 * decay * sr)) / sr
    ir = rng.standard_normal(len(t)) * np.exp(-t / decay)
    ir *= wet / np.sqrt(np.sum(ir ** 2))
    spectrum *= 1 + np.fft.rfft(ir, 2 * len(x))                        # dry + wet
    return np.fft.irfft(spectrum)[: len(x)]


# Functional harmony on scale degrees (0 = I, 4 = V): the degrees that may follow each one.
NEXT_DEGREE = {0: [3, 4, 5, 1], 1: [4, 6], 2: [5, 3], 3: [4, 0, 1], 4: [0, 5], 5: [3, 1], 6: [0]}


def _voicing(previous: list[int], pitch_classes: list[int], low=55, high=74) -> list[int]:
    """Voice leading: of the voicings of a chord (one note per pitch class in [low, high]), the one
    whose notes, low to high, move least from the previous chord's."""
    options = itertools.product(*[[m for m in range(low, high + 1) if m % 12 == pc]
                                  for pc in pitch_classes])
    return min((sorted(v) for v in options),
               key=lambda v: sum(abs(a - b) for a, b in zip(v, previous)))


def make_toy_song(rng: np.random.Generator, *, seconds=30.0, sample_rate=16000):
    """One procedural song, ({stem: waveform}, labels), whose stems are predictable from each other:
    a key, tempo and 8-bar progression (functional harmony); the bass plays the chord's root on the
    kick's onsets, the chords ("other") move by voice leading, the lead ("vocals") repeats a rhythm
    with chord tones on the beats; at random bars every part stops for a beat or two (a break).
    Timbres, groove and a recording chain per song; each 4-bar section mutes some stems."""
    sr = sample_rate
    n = int(seconds * sample_rate)
    root = int(rng.integers(12))
    mode = str(rng.choice(["maj", "min"]))
    scale = np.array(SCALES[mode]) + root
    tempo = float(rng.uniform(80, 160))
    beat = 60.0 / tempo
    bar, sixteenth = 4 * beat, beat / 4
    progression = [0]
    while len(progression) < 8:
        progression.append(int(rng.choice(NEXT_DEGREE[progression[-1]])))
    tilt = rng.uniform(0.5, 2.0)                                        # the song's timbre family
    timbre = {s: rng.uniform(0.1, 1.0, 8) / np.arange(1, 9) ** (tilt + rng.uniform(-0.15, 0.15))
              for s in TOY_STEMS}
    room = dict(cutoff=float(rng.uniform(1500, 7000)), decay=float(rng.uniform(0.05, 0.4)),
                wet=float(rng.uniform(0.1, 0.6)))
    # the groove, on the 16 sixteenths of a bar: kick and bass share their onsets
    drum_params = dict(kick_low=rng.uniform(40, 60), kick_decay=rng.uniform(0.08, 0.2),
                       snare_decay=rng.uniform(0.05, 0.15))
    kicks = sorted({0} | set(np.flatnonzero(rng.random(16) < 0.25).tolist()) - {4, 12})
    hat_every = int(rng.choice([1, 2]))
    comping = str(rng.choice(["pad", "stabs", "arpeggio"]))
    stabs = [0] + [k for k in (2, 6, 8, 10, 14) if rng.random() < 0.6]
    lead_rhythm = [0] + [k for k in range(2, 16, 2) if rng.random() < 0.55]  # eighth notes
    out = {s: np.zeros(n + 2 * sr) for s in TOY_STEMS}

    def add(stem, start, wave):
        i = int(start * sr)
        if i < n:
            out[stem][i: i + len(wave)] += wave[: len(out[stem]) - i]

    def note(stem, start, midi, length, **envelope):    # a MIDI note in the stem's timbre
        hz = 440.0 * 2.0 ** ((midi - 69) / 12)
        add(stem, start, _tone(hz, length, sr, timbre[stem], **envelope))

    def lengths(onsets):                        # each note lasts until the next onset in the bar
        return [(b - a) * sixteenth for a, b in zip(onsets, onsets[1:] + [16])]

    chords, voicing = [], [60, 64, 67]
    pitch = 62 + (root - 2) % 12
    for b in range(int(np.ceil(seconds / bar))):
        t0 = b * bar
        d = progression[b % 8]
        triad = [int(scale[(d + i) % 7]) % 12 for i in (0, 2, 4)]       # pitch classes
        intervals = ((triad[1] - triad[0]) % 12, (triad[2] - triad[0]) % 12)
        quality = {(4, 7): "maj", (3, 7): "min", (3, 6): "dim"}[intervals]
        chords.append([round(t0, 3), round(min(t0 + bar, seconds), 3),
                       f"{NOTE_NAMES[triad[0]]}:{quality}"])
        for step, length in zip(kicks, lengths(kicks)):
            fifth = 7 if step >= 8 and rng.random() < 0.3 else 0
            note("bass", t0 + step * sixteenth, 36 + triad[0] + fifth, 0.9 * length, decay=0.4)
        for step in range(16):
            t = t0 + step * sixteenth
            if step in kicks:
                add("drums", t, _drum("kick", sr, rng, drum_params))
            if step in (4, 12):
                add("drums", t, _drum("snare", sr, rng, drum_params))
            if step % hat_every == 0:                                   # 16ths or 8ths
                add("drums", t, 0.5 * _drum("hat", sr, rng, drum_params))
        voicing = _voicing(voicing, triad)
        if comping == "pad":
            for m in voicing:
                note("other", t0, m, bar, attack=0.05, decay=2.0)
        elif comping == "stabs":
            for step, length in zip(stabs, lengths(stabs)):
                for m in voicing:
                    note("other", t0 + step * sixteenth, m, 0.8 * length, decay=0.3)
        else:
            for k in range(8):
                note("other", t0 + k * 2 * sixteenth, voicing[k % 3], 2 * sixteenth, decay=0.4)
        for step, length in zip(lead_rhythm, lengths(lead_rhythm)):     # a walk on the scale,
            allowed = set(triad) if step % 4 == 0 else {int(m) % 12 for m in scale}   # chord
            candidates = [m for m in range(pitch - 4, pitch + 5)          # tones on the beats
                          if m % 12 in allowed and 60 <= m <= 79]
            pitch = int(rng.choice(candidates))
            note("vocals", t0 + step * sixteenth, pitch, 0.95 * length, attack=0.03, decay=1.0,
                 vibrato=0.012)
    breaks = []                 # stops: every part rests together for the last beat or two of a bar
    for b in range(1, int(np.ceil(seconds / bar))):
        if rng.random() < 0.3:
            start = b * bar + int(rng.choice([2, 3])) * beat
            if start >= seconds:
                break
            breaks.append([round(start, 3), round(min((b + 1) * bar, seconds), 3)])
            i0, i1 = int(start * sr), int((b + 1) * bar * sr)
            fade = np.linspace(1.0, 0.0, int(0.01 * sr))
            for x in out.values():
                x[i0: i0 + len(fade)] *= fade
                x[i0 + len(fade): i1] = 0.0
    sections = []
    section = 4 * bar
    for s0 in np.arange(0, seconds, section):
        on = rng.random(len(TOY_STEMS)) > 0.25
        while on.sum() < 2:
            on[rng.integers(len(TOY_STEMS))] = True
        playing = [s for s, keep in zip(TOY_STEMS, on) if keep]
        for stem in (s for s in TOY_STEMS if s not in playing):
            out[stem][int(s0 * sr): int((s0 + section) * sr)] = 0.0
        sections.append([round(float(s0), 3), round(float(min(s0 + section, seconds)), 3), playing])
    stems = {}
    for s in TOY_STEMS:
        x = _room(out[s][:n], sr, rng=rng, **room)
        stems[s] = (x * rng.uniform(0.3, 0.6) / max(np.abs(x).max(), 1e-9)).astype(np.float32)
    labels = {"key": f"{NOTE_NAMES[root]}:{mode}", "tempo": round(tempo, 2), "chords": chords,
              "sections": sections, "breaks": breaks, "tilt": round(tilt, 3), "kicks": kicks,
              "comping": comping, "room": {k: round(v, 3) for k, v in room.items()}}
    return stems, labels


def write_toy_dataset(out, *, tracks=20, seconds=30.0, seed=0, sample_rate=16000,
                      test_fraction=0.2) -> Path:
    """Seeded toy songs as OUT/{train,test}/songNNN/{stem}.wav, with labels.json (key, chords)."""
    n_test = max(1, round(tracks * test_fraction)) if tracks > 1 else 0
    for i in range(tracks):
        stems, labels = make_toy_song(np.random.default_rng([seed, i]), seconds=seconds,
                                      sample_rate=sample_rate)
        folder = Path(out) / ("test" if i >= tracks - n_test else "train") / f"song{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, x in stems.items():
            sf.write(folder / f"{name}.wav", x, sample_rate, subtype="PCM_16")
        (folder / "labels.json").write_text(json.dumps(labels, indent=1))
    return Path(out)


# Command line -------------------------------------------------------------------------------------

def add_config_options(p) -> None:
    """--preset, and one option per Config field (--batch-size: batch_size)."""
    p.add_argument("--preset", choices=list(PRESETS), default="paper",
                   help="paper (GPU) or tiny (CPU, minutes)")
    for f in dataclasses.fields(Config):
        kind = (dict(action=argparse.BooleanOptionalAction) if f.type == "bool"
                else dict(type={"int": int, "float": float, "str": str}[f.type]))
        p.add_argument("--" + f.name.replace("_", "-"), help=f"Config.{f.name}", **kind)
    p.add_argument("--lr", type=float, dest="base_lr", help="the same as --base-lr")


def config_from(args) -> Config:
    """The preset's Config with the fields given on the command line (the others are None)."""
    return make_config(args.preset, **{f.name: getattr(args, f.name, None)
                                       for f in dataclasses.fields(Config)})


def main(argv=None):
    parser = argparse.ArgumentParser(prog="stem_jepa.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("toy", help="write procedural multitrack songs in the MUSDB18-HQ layout")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tracks", type=int, default=20, help="number of songs (20 %% go to test/)")
    p.add_argument("--seconds", type=float, default=30.0, help="length of each song")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("train", help="train Stem-JEPA on a multitrack folder")
    p.add_argument("--out", default="runs/stem-jepa", help="run folder: checkpoint.pt and log.csv")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--force", action="store_true", help="resume although --steps or data changed")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--workers", type=int, help="loader processes (default: half the cores, max 8)")
    p.add_argument("--stop-at", type=int, help="save and exit at this step; --resume continues")
    add_config_options(p)
    e = sub.add_parser("evaluate", help="retrieval (Table 1) beside chance, random weights, DSP")
    e.add_argument("--checkpoint", required=True, help="a run's checkpoint.pt, or shipped weights")
    e.add_argument("--split", default="test", help="train, test, or all (both, as Table 1)")
    e.add_argument("--out", help="output folder (default: beside the checkpoint, eval-SPLIT)")
    for q in (p, e):
        q.add_argument("--data", required=True, help="MUSDB18(-HQ) root, or a folder of tracks")
        q.add_argument("--cache", help="where decoded stems go (default DATA/.stem_jepa_cache)")
    d = sub.add_parser("demo", help="toy data + the tiny preset on this machine, end to end")
    d.add_argument("--dir", default="demo", help="folder for the toy data and the run")
    d.add_argument("--tracks", type=int, default=40)
    d.add_argument("--steps", type=int, default=300)
    for q in (p, e, d):
        q.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: the best there is)")
    args = parser.parse_args(argv)
    try:
        if args.command == "toy":
            write_toy_dataset(args.out, tracks=args.tracks, seconds=args.seconds, seed=args.seed)
            print(f"wrote {args.tracks} toy songs of {args.seconds:g} s to {args.out}")
        elif args.command == "train":
            _, stopped_by = train(config_from(args), args.data, out=args.out, cache=args.cache,
                                  resume=args.resume, force=args.force, device=args.device,
                                  compile=args.compile, workers=args.workers, stop_at=args.stop_at)
            if stopped_by:
                sys.exit(128 + signal.Signals[stopped_by].value)
        elif args.command == "evaluate":
            evaluate(args.checkpoint, args.data, split=args.split, out=args.out, cache=args.cache,
                     device=args.device)
        else:
            data, run = Path(args.dir) / "toy", Path(args.dir) / "run"
            if not (data / "train").is_dir():
                write_toy_dataset(data, tracks=args.tracks, seconds=30.0, seed=0)
            train(make_config("tiny", steps=args.steps), data, out=run, device=args.device,
                  resume=True)
            evaluate(run / "checkpoint.pt", data, device=args.device)
    except StemJEPAError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
