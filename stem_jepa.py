"""Stem-JEPA in one file: a reference implementation of

    A. Riou, S. Lattner, G. Hadjeres, M. Anslow, G. Peeters,
    "Stem-JEPA: A Joint-Embedding Predictive Architecture for Musical Stem
    Compatibility Estimation", ISMIR 2024.

Given a mix of some instrument stems (the *context*), a predictor conditioned on an
instrument label predicts, patch by patch, the embedding of a stem that fits the mix
(the *target*). Targets come from an EMA copy of the encoder; nothing is reconstructed.

Commands (each has --help):
    python stem_jepa.py toy --out toy/          # procedural multitracks, MUSDB18-HQ layout
    python stem_jepa.py train --data musdb18/   # the paper's configuration (GPU)
    python stem_jepa.py train --data toy/ --preset tiny --steps 300   # minutes on a CPU
    torchrun --nproc_per_node 4 stem_jepa.py train --data musdb18/    # several GPUs
    python stem_jepa.py demo                    # toy data + tiny model, end to end
    python stem_jepa.py evaluate --checkpoint runs/stem-jepa/checkpoint.pt --data musdb18/
    python stem_jepa.py retrieve --checkpoint CKPT --mix mix.wav --library stems/ --instrument bass
    python stem_jepa.py score --checkpoint CKPT --mix mix.wav --stem bass.wav --instrument bass
    python stem_jepa.py embed --checkpoint CKPT --audio songs/ --out emb.npy
    python stem_jepa.py train --data slakh2100/ --init-from CKPT   # a new run from trained weights
    python stem_jepa.py analyze align|clusters ...; python stem_jepa.py probe ...
    python stem_jepa.py bench

Part one, the method, top to bottom (paper -> code); every name it uses is defined above:
    configuration                             Config, PRESETS, make_config, chunk_samples
    3.3 front-end (log-mel, 16x16 patches)    LogMel, ViT.patch_embed
    3.3 encoder (ViT-Base)                    ViT, sincos_2d
    3.1 predictor g_phi, emb(l)               MLPPredictor, TransformerPredictor
    Eq. 1 loss; 4.1 pooled vectors            jepa_loss, pool
    Eq. 2 EMA target encoder, tau_i           ema_update, tau_at
    3.3 lr schedule (warmup + cosine)         lr_at
    beyond the paper (off by default)         song_contrast_loss, StemJEPA.beyond_the_paper
    Fig. 1 the model                          StemJEPA, build_model
    3.2 sampling context and target           choose_stems, draw_example, StemChunks, StepBatches
    3.4 training data (multitracks)           find_tracks, load_audio, prepare
    3.3 device, precision; the step (AdamW)   pick_device, pick_precision, training_step
    3.3 checkpoints, run lock, signals        save_checkpoint, load_checkpoint, RunLock
    3.3 the training loop                     train
    4.1 retrieval metrics                     embed_long, retrieval_metrics
Part two, around it:
    a trained model, any length               StemJEPA.from_checkpoint, encode_long, predict_long,
                                              embed, score; open_trained, save_weights
    toy multitracks                           make_toy_song, write_toy_dataset
    4.1 Table 1, Fig. 2; 4.2 listening test   evaluate, failure_analysis, write_listening_test
    4.3 alignment, Eq. 3, Fig. 4              shift_similarity, alignment_curves, best_offset
    4.4 musical plausibility, Fig. 5          kmeans, cooccurrence, analyze_clusters
    4.5 downstream probes, Table 3            global_embeddings, train_probe, key_score, probe
    using a trained model; the HEAR API       retrieve, score, embed_files; load_model,
                                              get_scene_embeddings, get_timestamp_embeddings
    performance                               bench, train_flops_per_sample
    command line                              main

Shape letters: B batch, S stems, N samples, M mel bins, L frames, F frequency patches,
T time patches (Eq. 3's M: one vector per 160 ms), K = F*T tokens, D embedding width,
W Transformer-predictor width, H heads, h head width, C = F*D a patch column's width (pooled
vectors, `frames`), Q queries, R references, P positions or patches, n sounds (HEAR), J the
largest shift of Eq. 3.

Functions that report what they do take `log` (print by default) and `verbose` (False: the
results and notes, without the progress lines).

Where this file follows the authors' code (SonyCSLParis/Stem-JEPA) rather than the paper's
text, the docstring says so ([code] in Config).
"""
from __future__ import annotations

import argparse
import collections
import copy
import csv
import dataclasses
import functools
import hashlib
import inspect
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchaudio


VERSION = 1  # checkpoint format
CACHE_FORMAT = 2  # decoded-stem cache; 2: quiet stems are kept (the silence filter is training's)


class StemJEPAError(Exception):
    """A problem the user can fix (bad data, bad arguments): the CLI prints it, no traceback."""


# =============================================================================================
# PART ONE: the method (3.1-3.4) and its measure (4.1), top to bottom
# =============================================================================================


# Configuration: the paper's values, and the numbers it leaves open read from the authors' code ----

def option(default, help: str):
    """A Config field with its help, which the command line shows (`train --help`)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class Config:
    # "[code]": the value is the authors' code's (SonyCSLParis/Stem-JEPA, built on M2D), not the
    # paper's text, which states only 8 s chunks, 80 mels, 25/10 ms, 16x16 patches, ViT-Base, the
    # 6-layer MLP of width 1024, AdamW, batch 256, lr 3e-4, 300k steps and 20k warmup steps.
    # front-end (3.3)
    sample_rate: int = option(16000, "Hz [code]; stems are summed to mono")
    chunk_seconds: float = option(8.0, "training chunk: 8 s -> 800 frames -> 5 x 50 patches")
    n_fft: int = option(400, "25 ms window")
    hop_length: int = option(160, "10 ms hop")
    n_mels: int = 80
    f_min: float = option(50.0, "Hz [code]")
    f_max: float = option(8000.0, "Hz [code]")
    patch_size: int = option(16, "16 x 16 patches of the (mel, frame) grid")
    # encoder: ViT-Base (3.3)
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    # predictor (3.1, 3.3, Table 1)
    predictor: str = option("mlp", '"mlp" (the paper\'s), "mlp-nocond", "transformer"')
    pred_hidden: int = option(1024, "MLP hidden width")
    pred_layers: int = option(6, "MLP Linear layers")
    pred_tf_dim: int = option(512, "Transformer predictor width (M2D's)")
    pred_tf_depth: int = 8
    pred_tf_heads: int = 16
    # sampler (3.2)
    active_threshold: float = option(0.1, "[code] active: peak |amplitude| in the chunk above this")
    redraw_tries: int = option(10, "chunks drawn per track before the fallback (footnote 2)")
    # optimisation (3.3)
    steps: int = 300_000
    batch_size: int = option(256, "global, over all processes and accumulation steps")
    grad_accum: int = option(1, "micro-batches per step when the batch does not fit in memory")
    base_lr: float = option(3e-4, "lr = base_lr * batch_size / 256")
    warmup_steps: int = option(20_000, "linear warmup, then cosine ...")
    min_lr_ratio: float = option(0.0, "... down to min_lr_ratio x the peak (the paper: 0)")
    beta1: float = option(0.9, "AdamW betas (0.9, 0.95) [code]")
    beta2: float = 0.95
    weight_decay: float = option(0.05, "[code]")
    weight_decay_all: bool = option(True, "on every parameter, norms, biases and the instrument "
                                    "embedding included (the authors' code); False: M2D's "
                                    "grouping, no decay on biases, norms and embeddings")
    grad_clip: float = option(3.0, "max global gradient norm [code]")
    tau_start: float = option(0.99995, "EMA rate tau_0 (Eq. 2) [code] ...")
    tau_end: float = option(0.99999, "... rising linearly to tau_T [code]")
    # beyond the paper (0 = off): see song_contrast_loss
    song_contrast: float = option(0.0, 'weight of the "which song?" InfoNCE term added to Eq. 1')
    song_temperature: float = option(0.1, "its softmax temperature")
    seed: int = 0
    # bookkeeping
    log_every: int = option(50, "steps between log lines")
    ckpt_every: int = option(1000, "steps between checkpoints")


PRESETS = {
    "paper": {},
    # A small ViT for CPUs, same code path. 4 s chunks (5 x 25 patches) and batch 32 run at about
    # 1 step/s on 2 cores. It keeps the paper's slow tau: with a faster EMA (BYOL's 0.996 -> 1),
    # the targets of a small model collapse to one code per instrument (the README's study).
    "tiny": dict(chunk_seconds=4.0, dim=192, depth=4, heads=3, pred_hidden=384, pred_layers=4,
                 pred_tf_dim=128, pred_tf_depth=2, pred_tf_heads=4, steps=300, batch_size=32,
                 base_lr=8e-3, warmup_steps=30,
                 weight_decay_all=False,    # M2D's grouping, as in the runs the README reports
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


def patch_seconds(cfg: Config) -> float:
    """Audio per time patch, one column of patches: hop x patch width / sample rate (160 ms)."""
    return cfg.hop_length * cfg.patch_size / cfg.sample_rate


def prepare_options(cfg: Config) -> dict:
    """What `prepare` takes from a config: the sample rate, the chunk and the silence threshold."""
    return dict(sample_rate=cfg.sample_rate, chunk_seconds=cfg.chunk_seconds,
                threshold=cfg.active_threshold)


# 3.3 Front-end: waveform -> normalised log-mel spectrogram ----------------------------------------

class LogMel(nn.Module):
    """16 kHz mono waveforms (B, N) -> normalised log-mel spectrograms (B, M, L), L = N // hop.

    "log-scaled Mel Spectrograms with 80 mel bins and a window and hop size of 25 and 10 ms" (3.3).
    Slaney mel scale and area normalisation, log(mel + eps) and the dataset statistics
    (-9.453, 3.569) are the authors' code's. With center=True an 8 s chunk gives 801 frames; the
    last is dropped so that 800 frames make 50 whole patches. The filterbank is a buffer built once.
    """

    def __init__(self, *, sample_rate=16000, n_fft=400, hop_length=160, n_mels=80, f_min=50.0,
                 f_max=8000.0, mean=-9.453, std=3.569):
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, win_length=n_fft, hop_length=hop_length,
            f_min=f_min, f_max=f_max, n_mels=n_mels, power=2.0, center=True, pad_mode="reflect",
            norm="slaney", mel_scale="slaney")
        self.hop_length = hop_length
        self.mean = mean
        self.std = std
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

    Log-mel (B, M, L) -> one embedding per patch (B, F, T, D), F = M / 16, T = L // 16. Tokens are
    frequency-major (index f * T + t). Any length up to max_frames works: a shorter input uses the
    first T time positions; longer inputs are the caller's to chunk.
    """

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
            raise ValueError(f"input has {T} time patches; the positional grid has "
                             f"{self.pos.shape[1]}: chunk it")
        x = x.flatten(2).transpose(1, 2)                                # (B, K, D), k = f * T + t
        x = x + self.pos[:, :T].reshape(Fp * T, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x).view(B, Fp, T, D)


# 3.1 Predictor g_phi, conditioned on the label l of the missing stem ------------------------------

class MLPPredictor(nn.Module):
    """"Our predictor is a 6-layer MLP with ReLU activations and 1024 dimensions in each hidden
    layer" (3.3), applied to each patch independently: z~_k = g(concat(z_k, emb(l))) (3.1).

    With n_instruments = 0 it is the unconditioned ablation of Table 1 (input z_k alone). The output
    LayerNorm and emb(l) as a dim-wide (768-d) embedding initialised N(0, 1) are the authors'
    code's; the paper says only "a learnable embedding".
    """

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

    def forward(self, z: torch.Tensor, instrument: torch.Tensor) -> torch.Tensor:
        # z: (B, F, T, D), instrument: (B,)
        if self.instrument is not None:
            e = self.instrument(instrument)[:, None, None].expand_as(z)  # (B, F, T, D)
            z = torch.cat([z, e], dim=-1)                               # (B, F, T, 2D)
        return self.norm(self.net(z))                                   # (B, F, T, D)


class TransformerPredictor(nn.Module):
    """The Transformer predictor of Table 1, "the same as in [9]" (M2D): project to a narrower
    width, add 2D sin-cos positions, prepend one learned instrument token (without position),
    run pre-norm blocks, drop the token, normalise and project back. The instrument token is
    initialised N(0, 1), as in the authors' code."""

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
        # (B, 1 + K, W)
        x = torch.cat([self.instrument(instrument)[:, None], x.flatten(1, 2)], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x[:, 1:])).view(B, Fp, T, -1)         # (B, F, T, D)


# Eq. 1: normalised MSE between predictions and targets; 4.1: one vector per recording -------------

def unit_targets(target: torch.Tensor) -> torch.Tensor:
    """The targets as Eq. 1 compares them: each patch vector standardised over its D dims (the
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
    """Linear warmup to peak_lr over warmup_steps, then cosine annealing to min_ratio x peak_lr
    (the paper: to 0) at total_steps (3.3)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    floor = min_ratio * peak_lr
    return floor + 0.5 * (peak_lr - floor) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# Beyond the paper, off by default: a term added to Eq. 1 (StemJEPA.beyond_the_paper) --------------

def song_contrast_loss(pred: torch.Tensor, target: torch.Tensor, instrument: torch.Tensor, *,
                       temperature: float = 0.1) -> torch.Tensor:
    """Not in the paper: an auxiliary term that asks each prediction to tell songs apart.

    Eq. 1 alone lets a small model settle on the average stem of each instrument (the
    "collapse" that `collapse_measures` shows). Here each prediction and each target (B, F, T, D)
    is pooled as in retrieval (`pool`), and InfoNCE asks the prediction to be nearer its own target
    than the targets of the other samples *of the same instrument* in the batch: the negatives
    are other songs' basses, never drums, so the instrument label cannot solve it. Samples with
    no same-instrument negative contribute 0.
    """
    q, r = pool(pred), pool(target.detach())                           # (B, F*D) each
    logits = q @ r.T / temperature                                      # (B, B)
    logits = logits.masked_fill(instrument[:, None] != instrument[None], float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device))


# Fig. 1: front-end, context encoder, predictor and target encoder together ------------------------

class StemJEPA(nn.Module):
    """Front-end, context encoder f_theta, predictor g_phi and EMA target encoder f_theta_bar
    (Fig. 1). forward(context, target, instrument) returns the loss of Eq. 1 for a batch of
    waveforms (B, N); it is what the training step differentiates.

    `config` is the Config the parts were built from (`build_model`); checkpoints store it. Part
    two adds the methods for a trained model (from_checkpoint, and encode_long, predict_long,
    embed and score for recordings of any length), which read its chunk length and sample rate.
    """

    def __init__(self, *, frontend: LogMel, encoder: ViT, predictor: nn.Module,
                 instruments: list[str], config: Config, song_contrast: float = 0.0,
                 song_temperature: float = 0.1):
        super().__init__()
        self.frontend = frontend
        self.encoder = encoder
        self.predictor = predictor
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.instruments = list(instruments)
        self.config = config
        self.song_contrast = song_contrast
        self.song_temperature = song_temperature

    def encode(self, wav: torch.Tensor, *, target: bool = False) -> torch.Tensor:
        """Waveforms (B, N) -> patch embeddings (B, F, T, D), context or target encoder."""
        return (self.target_encoder if target else self.encoder)(self.frontend(wav))

    def predict(self, wav: torch.Tensor, instrument: torch.Tensor) -> torch.Tensor:
        """Context mixes (B, N), instrument ids (B,) -> predicted targets (B, F, T, D)."""
        return self.predictor(self.encode(wav), instrument)

    def forward(self, context: torch.Tensor, target: torch.Tensor,
                instrument: torch.Tensor) -> torch.Tensor:
        pred = self.predict(context, instrument)                        # z~ (B, F, T, D)
        with torch.no_grad():
            z_bar = self.encode(target, target=True)                    # (B, F, T, D), no gradient
        return jepa_loss(pred, z_bar) + self.beyond_the_paper(pred, z_bar, instrument)

    # Beyond the paper, off by default: what Config adds to Eq. 1, all in this one place.

    def beyond_the_paper(self, pred: torch.Tensor, z_bar: torch.Tensor,
                         instrument: torch.Tensor) -> torch.Tensor | float:
        """The terms added to Eq. 1 that are not the paper's: the song contrast
        (`song_contrast_loss`) weighted by Config.song_contrast; 0 when that is 0."""
        if not self.song_contrast:
            return 0.0
        return self.song_contrast * song_contrast_loss(pred, z_bar, instrument,
                                                       temperature=self.song_temperature)


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
                    instruments=instruments, config=cfg, song_contrast=cfg.song_contrast,
                    song_temperature=cfg.song_temperature)


# 3.2 Sampling context and target ------------------------------------------------------------------

def choose_stems(peaks: np.ndarray, rng: np.random.Generator, threshold: float):
    """Pick (target, context) from the stems' peak amplitudes in one chunk, or None if < 2 are
    active.

    "Let A be the indices of active (i.e. non-silent) stems. We first pick a random index t in A
    as target. Then, we randomly select a subset C of A minus {t} [...]. The number of stems |C|
    in this subset is uniformly sampled between 1 and |A| - 1" (3.2). Active: peak > threshold.
    """
    active = np.flatnonzero(peaks > threshold)
    if len(active) < 2:
        return None
    target = rng.choice(active)
    others = active[active != target]
    k = rng.integers(1, len(others) + 1)                                # |C| ~ U{1, ..., |A| - 1}
    return int(target), np.sort(rng.choice(others, size=k, replace=False))


def draw_example(stems: torch.Tensor, chunk: int, rng: np.random.Generator, *, threshold: float,
                 tries: int):
    """One training example from one track's stems (S, N): (context (chunk,), target (chunk,),
    target stem).

    A chunk at a uniformly random offset (zero-padded at the end when the track is shorter). "If
    |A| < 2 [...] we resample another audio chunk from the same track" (footnote 2), up to `tries`
    chunks; after that the fallback trains on the last chunk with its loudest stem as target and
    the second loudest as context. The authors' code differs: it redraws only when no stem is
    active, trains with a silent context when exactly one is, and after its last trial takes a
    random target with all the other stems as context; we follow the paper.
    Only the chunk is read: `stems` may wrap a memory map (torch's float16 kernels are ~10x
    faster than numpy's here).
    """
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
    """Item i -> (context (N,), target (N,), instrument id): a pure function of (seed, i), so the
    data order of a resumed run is the uninterrupted run's, whatever the number of workers."""

    def __init__(self, tracks: list[dict], instruments: list[str], *, chunk: int, threshold: float,
                 tries: int, seed: int):
        self.tracks = tracks
        self.chunk = chunk
        self.threshold = threshold
        self.tries = tries
        self.seed = seed
        self.instrument_ids = [[instruments.index(s) for s in t["stems"]] for t in tracks]
        self._open = {}                         # track -> memory map, per process

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, index])
        t = int(rng.integers(len(self.tracks)))
        # copy-on-write map: writable for torch, never written
        if t not in self._open:
            self._open[t] = torch.from_numpy(np.load(self.tracks[t]["npy"], mmap_mode="c"))
        context, target, stem = draw_example(self._open[t], self.chunk, rng,
                                             threshold=self.threshold, tries=self.tries)
        return context, target, self.instrument_ids[t][stem]


class StepBatches(torch.utils.data.Sampler):
    """The dataset indices of each step's batch for this process: step s, rank r takes
    [s * B * world + r * B, ... + B). Starting at `start` resumes the same sequence."""

    def __init__(self, *, start: int, steps: int, batch: int, rank: int = 0, world: int = 1):
        self.start = start
        self.steps = steps
        self.batch = batch
        self.rank = rank
        self.world = world

    def __iter__(self):
        for s in range(self.start, self.steps):
            first = (s * self.world + self.rank) * self.batch
            yield list(range(first, first + self.batch))

    def __len__(self):
        return max(self.steps - self.start, 0)


# 3.4 Training data: multitrack folders -> a cache of 16 kHz stems ---------------------------------

def _write_atomic(path: Path, write, *, keep_previous: bool = False) -> None:
    """write(tmp) then rename: never half a file; keep_previous keeps the old as *.prev<suffix>."""
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)     # the suffix last: np.save keeps it
    write(tmp)
    if keep_previous and path.exists():
        os.replace(path, path.with_name(path.stem + ".prev" + path.suffix))
    os.replace(tmp, path)


def _file_id(path) -> tuple:
    """What identifies a file's version in a cache key: its path, size and modification time."""
    st = os.stat(path)
    return str(path), st.st_size, st.st_mtime_ns


def _cache_key(*parts) -> str:
    """The one cache key: a hash of the parts (files as `_file_id`) and of the file formats."""
    text = json.dumps([VERSION, CACHE_FORMAT, *parts], default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3")
MIX_NAMES = ("mixture", "mix")              # a track's full mix is not a stem: ignored
MUSDB_STREAMS = {"drums": 1, "bass": 2, "other": 3, "vocals": 4}   # .stem.mp4; 0 is the mixture
LENGTH_TOLERANCE_S = 1.0                    # stems of one track may differ by this much (trimmed)

LAYOUTS = (
    "MUSDB18-HQ or your own multitracks: ROOT/[train|test/]<track>/<stem>.wav (or another audio "
    "extension), the stem named after its file",
    "MUSDB18: ROOT/{train,test}/<track>.stem.mp4",
    "one multichannel WAV per track (the authors' format): ROOT/[split/]<track>.wav, channel i "
    "named by --channels NAME0,NAME1,...",
    "MoisesDB: ROOT/<provider>/<track>/<stem>/<file>.wav with <track>/data.json, the files of "
    "one stem folder summed",
    "Slakh2100: ROOT/{train,validation,test}/<track>/stems/SNN.flac with <track>/metadata.yaml, "
    "stems grouped by instrument class (--groups)",
)


# Slakh2100 (no vocals): its classes go to MUSDB18's groups, so both share instrument names.
SLAKH_GROUPS = {"bass": ["Bass"], "drums": ["Drums"], "other": ["*"]}


def parse_groups(text: str) -> dict[str, list[str]]:
    """--groups "bass=Bass;keys=Piano,Organ;other=*" -> {instrument: [class or stem name, ...]}."""
    groups = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, members = part.partition("=")
        if not sep or not name.strip() or not members.strip():
            raise StemJEPAError(f"--groups {text!r}: expected NAME=CLASS,CLASS;NAME=... "
                                f"(e.g. bass=Bass;drums=Drums;other=*), not {part!r}")
        groups[name.strip()] = [m.strip() for m in members.split(",") if m.strip()]
    return groups


def group_of(member: str, groups: dict[str, list[str]]) -> str | None:
    """The group naming a Slakh class or MoisesDB stem (any case), else that with "*", or None."""
    for name, members in groups.items():
        if member.lower() in (m.lower() for m in members):
            return name
    return next((name for name, members in groups.items() if "*" in members), None)


def _yaml_scalar(text: str):
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    constants = {"true": True, "false": False, "null": None, "~": None}
    if text.lower() in constants:
        return constants[text.lower()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_yaml_mapping(text: str, source="YAML") -> dict:
    """The YAML of Slakh2100's metadata.yaml, without a dependency: nested mappings of scalars."""
    root: dict = {}
    stack = [(-1, root)]                                    # (indent, mapping) of the open blocks
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw if raw.lstrip().startswith(("'", '"')) else raw.split(" #")[0]
        if not line.strip() or line.lstrip().startswith("#") or line.strip() in ("---", "..."):
            continue
        indent = len(line) - len(line.lstrip(" "))
        key, sep, value = line.strip().partition(":")
        if not sep or line.strip().startswith("- "):
            raise StemJEPAError(f"{source}, line {number}: {raw.strip()!r} is beyond the YAML this "
                                "file reads (mappings of scalars)")
        while indent <= stack[-1][0]:
            stack.pop()
        parent = stack[-1][1]
        key = key.strip().strip("'\"")
        if value.strip():
            parent[key] = _yaml_scalar(value.strip())
        else:
            parent[key] = {}
            stack.append((indent, parent[key]))
    return root


def _slakh_track(folder: Path, groups: dict) -> dict[str, list[tuple]]:
    """A Slakh2100 track: each stems/SNN.flac in the group of its inst_class ("Drums": is_drum)."""
    path = folder / "metadata.yaml"
    meta = parse_yaml_mapping(path.read_text(), source=str(path))
    stems = {}
    for sid, info in sorted((meta.get("stems") or {}).items()):
        files = [f for e in (".flac", ".wav") if (f := folder / "stems" / f"{sid}{e}").is_file()]
        if not files or not isinstance(info, dict):
            continue                            # audio_rendered: false, or a stem without a file
        group = group_of("Drums" if info.get("is_drum") else str(info.get("inst_class")), groups)
        if group is not None:
            stems.setdefault(group, []).append((str(files[0]), None, None))
    return stems


def _moisesdb_track(folder: Path, groups: dict | None) -> dict[str, list[tuple]]:
    """A MoisesDB track: one folder per stem (or per `groups` member), its files summed."""
    stems = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [f for f in sorted(sub.iterdir()) if f.suffix.lower() in AUDIO_EXTENSIONS]
        name = group_of(sub.name, groups) if groups else sub.name.lower()
        if files and name is not None and name not in MIX_NAMES:
            stems.setdefault(name, []).extend((str(f), None, None) for f in files)
    return stems


def _multichannel_track(file: Path, channels: list[str]) -> dict[str, list[tuple]]:
    """One multichannel file (the authors' format): channel i is the stem channels[i]."""
    try:
        n = sf.info(str(file)).channels
    except Exception:
        n = len(channels)                       # unreadable: reported when it is decoded
    if n != len(channels):
        raise StemJEPAError(f"{file} has {n} channels and --channels names {len(channels)} "
                            f"({','.join(channels)}): give one name per channel")
    return {c: [(str(file), None, i)] for i, c in enumerate(channels) if c not in MIX_NAMES}


def find_tracks(root, split: str = "train", *, channels=None,
                groups=None) -> list[tuple[str, dict[str, list[tuple]]]]:
    """Tracks of the LAYOUTS as (name, {stem: [source, ...]}), sorted; a source is (file, .stem.mp4
    stream or None, channel or None: all averaged), summed into its stem. ROOT or ROOT/split holds
    the tracks ("all": train/ then test/); `channels`, `groups`: see --channels, --groups."""
    root = Path(root)
    if not root.is_dir():
        raise StemJEPAError(f"{root}: no such folder. --data must be a MUSDB18(-HQ) root (with "
                            "train/ and test/) or a folder with one sub-folder of stems per track")
    if split == "all" and any((root / s).is_dir() for s in ("train", "test")):
        return [t for s in ("train", "test") if (root / s).is_dir()
                for t in find_tracks(root, s, channels=channels, groups=groups)]
    base = root / split
    if not base.is_dir():
        if any((root / s).is_dir() for s in ("train", "test", "validation")):
            raise StemJEPAError(f"{root} has no {split}/ folder")
        base = root
    tracks, loose, empty = [], [], []
    for entry in sorted(p for p in base.iterdir() if not p.name.startswith(".")):
        if entry.name.endswith(".stem.mp4"):
            stems = {stem: [(str(entry), stream, None)] for stem, stream in MUSDB_STREAMS.items()}
            tracks.append((entry.name[: -len(".stem.mp4")], stems))
        elif entry.is_file() and entry.suffix.lower() in AUDIO_EXTENSIONS:
            if channels:
                tracks.append((entry.stem, _multichannel_track(entry, channels)))
            else:
                loose.append(entry.name)
        elif entry.is_dir() and (entry / "metadata.yaml").is_file() and (entry / "stems").is_dir():
            tracks.append((entry.name, _slakh_track(entry, groups or SLAKH_GROUPS)))
        elif entry.is_dir() and (entry / "data.json").is_file():
            tracks.append((entry.name, _moisesdb_track(entry, groups)))
        elif entry.is_dir() and any((t / "data.json").is_file() for t in entry.iterdir()):
            tracks += [(t.name, _moisesdb_track(t, groups)) for t in sorted(entry.iterdir())
                       if (t / "data.json").is_file()]
        elif entry.is_dir():
            stems = {f.stem.lower(): [(str(f), None, None)] for f in sorted(entry.iterdir())
                     if f.suffix.lower() in AUDIO_EXTENSIONS and f.stem.lower() not in MIX_NAMES}
            tracks.append((entry.name, stems))
            if not stems:
                empty.append(entry.name + "/")
    tracks = [t for t in tracks if t[1]]
    if loose and not tracks:
        raise StemJEPAError(f"{base} holds {len(loose)} audio files ({', '.join(loose[:3])}"
                            f"{', ...' if len(loose) > 3 else ''}) and no track folders: "
                            "if each is one track with one stem per channel, name the channels "
                            "with --channels NAME0,NAME1,... (e.g. bass,drums,other,vocals)")
    if not tracks:
        others = [p.name for p in sorted(base.iterdir())
                  if not p.name.startswith(".") and p.name + "/" not in empty]
        found = "holds no tracks; found " + "; ".join(
            f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            for what, names in (("folders without audio files", empty), ("other files", others))
            if names)
        if not any(base.iterdir()):
            found = "is empty"
        raise StemJEPAError(f"{base} {found}. Layouts read "
                            f"(audio: {', '.join(AUDIO_EXTENSIONS)}):\n"
                            + "\n".join(f"  {layout}" for layout in LAYOUTS))
    return tracks


def load_audio(path, sample_rate: int, stream: int | None = None,
               channel: int | None = None) -> np.ndarray:
    """A file (or .stem.mp4 stream) as mono float32 at sample_rate: (L + R) / 2, or the `channel`.
    ffmpeg only decodes, so both MUSDB18 layouts give one array (`-ac 1` would be 3 dB louder)."""
    source = path
    if stream is not None:
        if shutil.which("ffmpeg") is None:
            raise StemJEPAError(f"{path}: decoding MUSDB18 .stem.mp4 needs the ffmpeg program: "
                                "install it (e.g. apt install ffmpeg, brew install ffmpeg) or use "
                                "MUSDB18-HQ")
        run = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", f"0:{stream}",
                              "-c:a", "pcm_f32le", "-f", "wav", "-"], capture_output=True)
        if run.returncode != 0:
            raise StemJEPAError(f"{path}: ffmpeg could not decode stream {stream}: "
                                f"{run.stderr.decode(errors='replace').strip().splitlines()[-1:]}")
        source = io.BytesIO(run.stdout)
    elif not os.path.isfile(path):
        raise StemJEPAError(f"{path}: no such file")
    elif os.path.getsize(path) == 0:
        raise StemJEPAError(f"{path}: empty file (0 bytes)")
    try:
        x, sr = sf.read(source, dtype="float32", always_2d=True)        # (N, C)
    except Exception as e:                      # libsndfile's errors vary by version
        reason = str(e).rsplit(":", 1)[-1].strip()                      # after the path it repeats
        raise StemJEPAError(f"{path}: not a readable audio file ({reason})") from None
    if len(x) == 0:
        raise StemJEPAError(f"{path}: no audio samples")
    if not np.isfinite(x).all():
        raise StemJEPAError(f"{path}: contains NaN or infinite samples")
    if channel is not None and channel >= x.shape[1]:
        raise StemJEPAError(f"{path}: has {x.shape[1]} channels, no channel {channel}")
    x = x.mean(axis=1) if channel is None else np.ascontiguousarray(x[:, channel])
    if sr != sample_rate:
        x = torchaudio.functional.resample(torch.from_numpy(x), sr, sample_rate).numpy()
    return x


def load_stem(sources: list[tuple], sample_rate: int) -> np.ndarray:
    """A stem: the sum of its sources (see find_tracks), the shorter ones zero-padded at the end."""
    parts = [load_audio(path, sample_rate, stream, channel) for path, stream, channel in sources]
    out = np.zeros(max(len(x) for x in parts), dtype=np.float32)
    for x in parts:
        out[: len(x)] += x
    return out


def _whole_npy(path: Path, shape: tuple) -> bool:
    """Whether a cached array is whole: a readable header, the shape its metadata records and
    exactly the bytes they take (a full disk or an interrupted copy leaves the file short)."""
    try:
        x = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return False
    return x.shape == shape and x.offset + x.nbytes == os.path.getsize(path)


def _has_two_active(x: np.ndarray, chunk: int, threshold: float, block: int = 1600) -> bool:
    """Whether some chunk-long window has >= 2 stems above threshold (checked on 0.1 s blocks)."""
    nb = -(-x.shape[1] // block)
    padded = np.pad(np.abs(x), ((0, 0), (0, nb * block - x.shape[1])))
    active = (padded.reshape(len(x), nb, block).max(-1) > threshold).astype(np.int32)  # (S, blocks)
    w = max(chunk // block, 1)
    counts = np.cumsum(np.pad(active, ((0, 0), (1, 0))), axis=1)
    in_window = (counts[:, w:] - counts[:, :-w]) > 0 if nb >= w else active.any(1, keepdims=True)
    return bool((in_window.sum(0) >= 2).any())


def _prepare_track(name, stems, *, sample_rate, chunk, threshold) -> dict:
    """One track's metadata, (kind, text) notes and (unless excluded) (S, N) float32 stems."""
    notes, audio = [], {}
    for stem, sources in stems.items():
        try:
            audio[stem] = load_stem(sources, sample_rate)
        except StemJEPAError as e:
            notes.append(("unreadable files (skipped)", str(e)))
    meta = {"name": name, "stems": [], "length": 0, "notes": notes}
    lengths = {s: len(x) for s, x in audio.items()}
    n = min(lengths.values(), default=0)
    if not audio:
        why = "no readable stem"
    elif max(lengths.values()) - n > LENGTH_TOLERANCE_S * sample_rate:
        found = ", ".join(f"{s} {l / sample_rate:.2f} s" for s, l in lengths.items())
        why = f"stems differ in length by more than {LENGTH_TOLERANCE_S:g} s: {found}"
    else:
        if max(lengths.values()) > n:
            notes.append(("stems trimmed to the shortest", name))
        for s in [s for s, x in audio.items() if not np.any(x[:n])]:
            notes.append(("silent stems (all zero: left out)", f"{name}/{s}"))
            del audio[s]
        why = None if audio else "every stem is all zero"
    if why:
        notes.append(("tracks excluded", f"{name}: {why}"))
        return {**meta, "excluded": why}
    x = np.stack([audio[s][:n] for s in sorted(audio)])                 # (S, N)
    meta.update(stems=sorted(audio), length=n, peaks=np.abs(x).max(axis=1).tolist(),
                two_active=_has_two_active(x, chunk, threshold), audio=x)
    return meta


def _training_exclusion(meta: dict, *, threshold: float, chunk: int, sample_rate: int):
    """Training's silence filter: (why the track cannot train, or None; notes). A stem peaking at
    <= threshold is never sampled, but evaluation keeps it (as the authors keep all four stems)."""
    name = meta["name"]
    quiet = [s for s, p in zip(meta["stems"], meta["peaks"]) if p <= threshold]
    notes = [(f"quiet stems (peak <= {threshold:g}: never sampled in training)", f"{name}/{s}")
             for s in quiet]
    if len(meta["stems"]) - len(quiet) < 2:
        why = f"{len(meta['stems']) - len(quiet)} non-silent stem(s): nothing to predict from"
    elif not meta["two_active"]:
        why = "no chunk has 2 active stems at once (the sampler needs a context and a target)"
    else:
        why = None
        if meta["length"] < chunk:
            notes.append(("shorter than a chunk (zero-padded at the end)",
                          f"{name} ({meta['length'] / sample_rate:.1f} s)"))
    return why, notes


def prepare(root, split: str = "train", *, cache=None, sample_rate=16000, chunk_seconds=8.0,
            threshold=0.1, training=True, layout=None, log=print, verbose=True) -> list[dict]:
    """Decode each track once into a cache, a float16 .npy of 16 kHz mono stems (memory-mapped in
    training), reused while its files are unchanged and the array whole; all-zero stems and unusable
    tracks are left out and reported. training=True adds the silence filter. "all": train/ and test/
    (Table 1 ranks among all 150 tracks). Per track: name, stems (sorted), length (samples), npy."""
    options = dict(cache=cache, sample_rate=sample_rate, chunk_seconds=chunk_seconds,
                   threshold=threshold, training=training, layout=layout, log=log, verbose=verbose)
    if split == "all" and any((Path(root) / s).is_dir() for s in ("train", "test")):
        return [t for s in ("train", "test") if (Path(root) / s).is_dir()
                for t in prepare(root, s, **options)]
    found = find_tracks(root, split, **(layout or {}))
    cache = Path(cache) if cache else Path(root) / ".stem_jepa_cache"
    folder = cache / f"{sample_rate}hz" / split
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StemJEPAError(f"cannot write the cache in {folder} ({e.strerror}): "
                            "pass --cache DIR") from None
    chunk = int(chunk_seconds * sample_rate)
    notes, prepared = [], []
    decoded = 0
    t0 = time.time()
    for i, (name, stems) in enumerate(found):
        safe = "".join(c if c.isalnum() else "_" for c in name)[:60]
        safe = hashlib.sha1(name.encode()).hexdigest()[:8] + "_" + safe
        meta_path = folder / f"{safe}.json"
        npy_path = folder / f"{safe}.npy"
        sources = [(stem, _file_id(path), stream, channel)
                   for stem, parts in sorted(stems.items()) for path, stream, channel in parts]
        signature = _cache_key(sample_rate, threshold, chunk, sources)
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = None
        fresh = meta is not None and meta.get("signature") == signature
        if fresh and "excluded" not in meta:
            fresh = _whole_npy(npy_path, (len(meta["stems"]), meta["length"]))
            if not fresh:
                log(f"prepare {split}: the cached {npy_path} of {name} is missing or cut short: "
                    "decoding it again")
        if not fresh:                           # new, changed, or left half-written by a kill
            meta = _prepare_track(name, stems, sample_rate=sample_rate, chunk=chunk,
                                  threshold=threshold)
            audio = meta.pop("audio", None)
            if audio is not None:
                _write_atomic(npy_path, lambda p: np.save(p, audio.astype(np.float16)))
            meta.update(signature=signature, chunk=chunk)
            _write_atomic(meta_path, lambda p: p.write_text(json.dumps(meta)))
            decoded += 1
            if verbose and decoded % 10 == 0:
                log(f"prepare {split}: {i + 1}/{len(found)} tracks ({time.time() - t0:.0f} s)")
        notes += [tuple(n) for n in meta["notes"]]
        if "excluded" in meta:
            continue
        if training:
            why, more = _training_exclusion(meta, threshold=threshold, chunk=chunk,
                                            sample_rate=sample_rate)
            notes += more + ([("tracks excluded", f"{name}: {why}")] if why else [])
            if why:
                continue
        prepared.append({**{k: meta[k] for k in ("name", "stems", "length")}, "npy": str(npy_path)})
    report = "".join(f"  {kind}:\n" + "".join(f"    {text}\n" for k, text in notes if k == kind)
                     for kind in dict.fromkeys(k for k, _ in notes))
    if not prepared:
        raise StemJEPAError(f"no usable track in {root} ({split}):\n{report}".rstrip())
    if report:
        log(f"prepare {split}: {len(prepared)} of {len(found)} tracks usable; notes:\n{report}")
    return prepared


# 3.3 Training: device and precision, then the step (Eq. 1, AdamW, Eq. 2) --------------------------

def pick_device(name: str | None = None) -> torch.device:
    """cuda -> mps -> cpu, or the one asked for (an error if it is not available)."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "cpu": True}
    if name is None:
        name = next(kind for kind, ok in available.items() if ok)
    kind = name.split(":")[0]
    if kind not in available:
        raise StemJEPAError(f"--device {name}: unknown device; use cpu, cuda, cuda:N or mps")
    if not available[kind]:
        raise StemJEPAError(f"--device {name}: {kind} is not available on this machine; "
                            "use --device cpu")
    return torch.device(name)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def pick_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on a CUDA GPU that has it natively (Ampere on), else fp16 with a GradScaler (the
    authors' code's choice; T4, V100); fp32 off CUDA."""
    if name not in PRECISIONS:
        raise StemJEPAError(f"--precision {name}: choose one of {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        if name in ("bf16", "fp16"):
            raise StemJEPAError(f"--precision {name} is for CUDA GPUs; on {device.type} training "
                                "runs in fp32 (--precision auto or fp32)")
        return "fp32"
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if name == "bf16" and not native_bf16:
        raise StemJEPAError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no native "
                            "bf16; use --precision fp16 (or auto)")
    if name == "auto":
        return "bf16" if native_bf16 else "fp16"
    return name


def autocast_for(device: torch.device, precision: str = "bf16"):
    """Autocast in the training precision on CUDA (`pick_precision`), none for fp32 or elsewhere."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@contextmanager
def full_precision(device: torch.device):
    """float32, no autocast or TF32, as the authors evaluate: pooled vectors of one instrument sit
    at cosine ~0.98, where bf16 rounding reorders neighbours."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def param_groups(model: nn.Module, weight_decay: float, *, decay_all: bool = True) -> list[dict]:
    """AdamW's parameter groups. decay_all: weight decay on every trainable parameter, as the
    authors' code (the paper's "all other hyperparameters" of M2D leave this open); otherwise M2D's
    grouping, decay on weight matrices only, not on biases, norms or embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            exempt = not decay_all and (p.ndim < 2 or "instrument" in name)
            (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def training_step(model: StemJEPA, optimizer, context, target, instrument, *, lr: float, tau: float,
                  grad_clip: float = 3.0, grad_accum: int = 1, loss_fn=None,
                  precision: str = "bf16", scaler=None) -> tuple[torch.Tensor, bool]:
    """One step of 3.3: forward context and target, predict, loss (Eq. 1), backward, clip the
    gradient norm, AdamW step, then the EMA update of the target encoder (Eq. 2).

    loss_fn: the model or its DDP / compiled wrapper. The batch is split into grad_accum
    micro-batches whose gradients add up (DDP synchronises only the last). Returns the loss (a
    tensor: reading it would wait for the device) and whether the step was applied: a non-finite
    gradient norm (with fp16's GradScaler: an overflow, which also lowers the scale) skips the
    update and the EMA.
    """
    loss_fn = model if loss_fn is None else loss_fn
    for group in optimizer.param_groups:
        group["lr"] = lr
    # Step 1. forward context and target, predict, loss (Eq. 1), backward, by micro-batches
    micro = len(context) // grad_accum
    total = 0.0
    for i in range(grad_accum):
        part = slice(i * micro, (i + 1) * micro)
        last = i == grad_accum - 1
        sync = nullcontext() if last or not hasattr(loss_fn, "no_sync") else loss_fn.no_sync()
        with sync, autocast_for(context.device, precision):
            loss = loss_fn(context[part], target[part], instrument[part]) / grad_accum
        (loss if scaler is None else scaler.scale(loss)).backward()
        total = total + loss.detach()
    # Step 2. clip the gradient norm and take the AdamW step (3.3), unless the norm is not finite
    if scaler is not None:
        scaler.unscale_(optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_norm = nn.utils.clip_grad_norm_(trainable, grad_clip, foreach=True)
    applied = bool(torch.isfinite(grad_norm))   # one host sync: the price of skipping bad steps
    if applied:
        optimizer.step()
        # Step 3. the target encoder follows the context encoder (Eq. 2)
        ema_update(list(model.target_encoder.parameters()), list(model.encoder.parameters()), tau)
    if scaler is not None:
        scaler.update()                             # halves the scale after an overflow
    optimizer.zero_grad(set_to_none=True)
    return total, applied


# 3.3 Training: what the loop relies on: checkpoints, collapse measures, run lock, signals ---------

def save_checkpoint(path: Path, state: dict) -> None:
    """Keep the previous checkpoint as *.prev.pt and write atomically (`_write_atomic`)."""
    _write_atomic(path, lambda p: torch.save(state, p), keep_previous=True)


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint written by `train` (a plain dict, loadable with weights_only=True); if it is
    missing or unreadable, the previous one (*.prev.pt)."""
    path = Path(path)
    problems = []
    for p in (path, path.with_name(path.stem + ".prev.pt")):
        if not p.exists():
            continue
        try:
            ckpt = torch.load(p, map_location=map_location, weights_only=True)
        except Exception as e:
            problems.append(f"{p}: not a readable checkpoint ({type(e).__name__})")
            continue
        if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
            problems.append(f"{p}: not a Stem-JEPA checkpoint")
        elif ckpt.get("version") != VERSION:
            problems.append(f"{p}: written by checkpoint format {ckpt.get('version')}, "
                            f"this file reads {VERSION}")
        else:
            return ckpt
    raise StemJEPAError("; ".join(problems) or f"{path}: no such checkpoint")


# Config fields that may change on --resume with --force: they do not change what the weights mean.
RESUMABLE_CHANGES = ("steps", "log_every", "ckpt_every", "grad_accum")

# Config fields newer than some checkpoints, and the value the runs saved without them used:
# M2D's weight decay grouping, the cosine down to 0, no song-contrast term.
BEFORE_THE_FIELD = {"weight_decay_all": False, "min_lr_ratio": 0.0, "song_contrast": 0.0,
                    "song_temperature": 0.1}


def _flag(field: str, value) -> str:
    """A Config field's value as the command line spells it: --no-weight-decay-all, --steps 10."""
    flag = field.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def check_resume(ckpt: dict, cfg: Config, data_id: str, force: bool) -> None:
    """Refuse to resume with another config or data; --force passes RESUMABLE_CHANGES and data.
    A field the checkpoint predates has the value its run used (BEFORE_THE_FIELD)."""
    saved = {**BEFORE_THE_FIELD, **ckpt["config"]}
    diffs = {k: (saved.get(k, "not recorded"), v) for k, v in dataclasses.asdict(cfg).items()
             if saved.get(k) != v}
    if ckpt.get("data") != data_id:
        diffs["dataset"] = ("a different track list", "this one")
    text = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diffs.items())
    if any(k not in RESUMABLE_CHANGES + ("dataset",) for k in diffs):
        advice = "pass the same preset and options"
        older = [k for k in diffs if k in BEFORE_THE_FIELD and k not in ckpt["config"]]
        if older:
            flags = ", ".join("--" + k.replace("_", "-") for k in older)
            advice += (f" (a checkpoint from before {flags} existed needs "
                       f"{' '.join(_flag(k, saved[k]) for k in older)})")
        raise StemJEPAError(f"cannot resume: the run was made with another configuration ({text}); "
                            f"{advice}, or start a new --out")
    if diffs and not force:
        raise StemJEPAError(f"cannot resume: {text}; pass --force to continue with these changes")


# Config fields that fix the shapes of the weights: --init-from needs the checkpoint's values.
ARCHITECTURE = ("sample_rate", "n_fft", "hop_length", "n_mels", "f_min", "f_max", "patch_size",
                "dim", "depth", "heads", "mlp_ratio", "predictor", "pred_hidden", "pred_layers",
                "pred_tf_dim", "pred_tf_depth", "pred_tf_heads")


def init_from_checkpoint(model: StemJEPA, ckpt: dict) -> list[str]:
    """Copy a checkpoint's weights into a fresh model, for fine-tuning (any chunk length: positions
    are fixed); instrument rows by name, new instruments kept fresh. Returns the new names."""
    diffs = [f"{k}: {ckpt['config'].get(k)} -> {getattr(model.config, k)}" for k in ARCHITECTURE
             if ckpt["config"].get(k) != getattr(model.config, k)]
    if diffs:
        raise StemJEPAError(f"cannot --init-from a checkpoint of another architecture "
                            f"({', '.join(diffs)}); pass the checkpoint's preset and options")
    state = model.state_dict()
    for name, value in ckpt["model"].items():
        if name.endswith("instrument.weight"):
            for row, instrument in enumerate(ckpt["instruments"]):
                if instrument in model.instruments:
                    state[name][model.instruments.index(instrument)] = value[row]
        else:
            state[name] = value
    model.load_state_dict(state)
    return [s for s in model.instruments if s not in ckpt["instruments"]]


LOG_COLUMNS = ("step,loss,lr,tau,samples_per_s,embedding_spread,batch_loss,avg_stem_loss,"
               "pred_spread,target_spread,skipped")


def embedding_spread(z: torch.Tensor) -> float:
    """Collapse indicator: the standard deviation across the batch of the (standardised, time- and
    frequency-averaged) embeddings, averaged over dims. It falls towards 0 when the encoder maps
    every input to the same point, which a falling loss alone does not reveal."""
    z = F.layer_norm(z.float(), z.shape[-1:]).mean(dim=(1, 2))          # (B, D)
    return z.std(dim=0).mean().item() if len(z) > 1 else float("nan")


def collapse_measures(pred: torch.Tensor, target: torch.Tensor, instrument: torch.Tensor) -> dict:
    """Does the predictor use the mix, or only the instrument label? From one batch's predictions
    and targets (B, F, T, D) and target instruments (B,), over the samples whose instrument occurs
    at least twice in the batch:

    - avg_stem_loss: Eq. 1 for a predictor that outputs, at each patch, the mean unit target of the
      *other* samples of the same instrument (leave-one-out): "the average bass". A predictor that
      ignores the mix cannot beat it; batch_loss (Eq. 1 of the model on the same samples) must.
    - pred_spread, target_spread: RMS distance of the unit predictions (targets) to their
      per-(instrument, patch) batch mean. pred_spread is 0 when every song gets the same prediction.
    """
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


class RunLock:
    """OUT/train.lock: refuses a second live training into OUT; stale once its process is gone."""

    def __init__(self, folder: Path, log=print):
        self.path = Path(folder) / "train.lock"
        self.log = log
        self.held = False

    def holder(self) -> int | None:
        """The pid of the live process holding the lock, or None (no lock, or a stale one)."""
        try:
            pid_text, _, host = self.path.read_text().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            return None                         # no lock, or one being written: acquire decides
        if host.strip() != os.uname().nodename:
            return pid                          # another machine (shared disk): assume it is alive
        try:
            os.kill(pid, 0)                     # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid                          # exists, owned by another user
        return pid

    def check(self) -> None:
        pid = self.holder()
        if pid is not None and pid != os.getpid():
            raise StemJEPAError(f"{self.path.parent} is in use by another training (pid {pid}): "
                                f"wait for it, stop it, or choose another --out (if no training "
                                f"runs there, delete {self.path})")

    def __enter__(self):
        self.check()
        if self.path.exists():
            self.log(f"removing the stale lock {self.path} ({self.path.read_text().strip()}: "
                     "that process is gone)")
            self.path.unlink(missing_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)   # atomic: one winner
        except FileExistsError:
            self.check()
            raise StemJEPAError(f"{self.path} appeared while starting: another training is "
                                "starting in the same folder") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {os.uname().nodename}\n")
        self.held = True
        return self

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


class GracefulStop:
    """Ctrl-C or SIGTERM sets .reason: the loop saves and exits. A second Ctrl-C exits at once."""

    def __init__(self):
        self.reason = None                      # the signal's name, once one arrives
        self.previous = {}                      # the handlers to put back

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # the only one that may set them
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.reason = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _ignore_sigint(_worker_id):
    """Loader workers leave Ctrl-C to the main process, which saves and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _quiet(*args, **kwargs) -> None:
    """The log of processes other than rank 0."""


# 3.3 Training: the loop ---------------------------------------------------------------------------

class Trained(NamedTuple):
    """What `train` returns: the model, in eval mode, and why the run stopped before its last
    step: "SIGINT" or "SIGTERM" (the CLI exits with 128 + the signal's number), else None."""
    model: StemJEPA
    interrupted: str | None


def train(cfg: Config, data, *, out="runs/stem-jepa", cache=None, resume=False, force=False,
          device=None, compile=False, workers=None, stop_at=None, init_from=None,
          precision="auto", layout=None, log=print, verbose=True) -> Trained:
    """Train Stem-JEPA on the `train` split of `data` (3.3) into OUT/checkpoint.pt and OUT/log.csv.
    stop_at: save and return at this step (continue with resume=True). init_from: a new run (fresh
    optimizer, schedules from step 0) from a checkpoint's weights; resume=True with a checkpoint in
    OUT takes precedence. precision: `pick_precision`; layout: `find_tracks`'s options. Under
    torchrun, each process takes batch_size / world_size samples per step and DDP averages the
    gradients; OUT/train.lock (`RunLock`) keeps a second live run out of OUT. verbose=False: the
    setup, the last step's line and the notes, not every log_every step (log.csv has them all)."""
    out = Path(out)
    ckpt_path = out / "checkpoint.pt"
    # Processes and device: torchrun's environment variables, one process per device
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise StemJEPAError(f"--batch-size {cfg.batch_size} does not divide among {world} "
                            f"processes x {cfg.grad_accum} accumulation steps")
    if ddp and device is None:
        device = f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu"
    device = pick_device(device)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if out.exists() and not out.is_dir():
        raise StemJEPAError(f"--out {out} is a file: give a folder for the run "
                            "(it holds checkpoint.pt and log.csv)")
    precision = pick_precision(precision, device)   # bf16, or fp16 with loss scaling, on CUDA
    # Data: rank 0 decodes the tracks into the cache (`prepare`); the others then read it
    if rank == 0:
        RunLock(out, log=log).check()               # before decoding the data; the loop takes it
    else:
        log = _quiet
        dist.barrier()
    tracks = prepare(data, "train", cache=cache, layout=layout, log=log, verbose=verbose,
                     **prepare_options(cfg))
    if ddp and rank == 0:
        dist.barrier()
    instruments = sorted({s for t in tracks for s in t["stems"]})
    names = json.dumps([(t["name"], t["stems"], t["length"]) for t in tracks])
    data_id = hashlib.sha1(names.encode()).hexdigest()     # resuming checks it is the same data
    # The model, AdamW (3.3) and, for fp16, a GradScaler
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, instruments).to(device)
    groups = param_groups(model, cfg.weight_decay, decay_all=cfg.weight_decay_all)
    # fused: one kernel over all parameters, not ~10 passes (a CPU ViT-B step: 60 ms, not 400 ms)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(cfg.beta1, cfg.beta2),
                                  fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    if device.type == "cuda":
        log(f"precision {precision}" + (" with a gradient scaler" if scaler is not None else ""))
    # Resume from OUT's checkpoint, or start from another run's weights, or from scratch. The log
    # window (loss_sum over the n_applied applied steps since the last log line) is checkpointed
    # too, so that a resumed run logs what an uninterrupted one would.
    step, skipped, loss_sum, n_applied = 0, 0, torch.zeros((), device=device), 0
    if resume and (ckpt_path.exists() or ckpt_path.with_name("checkpoint.prev.pt").exists()):
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        check_resume(ckpt, cfg, data_id, force)
        if ckpt["instruments"] != instruments:
            raise StemJEPAError(f"cannot resume: the checkpoint knows instruments "
                                f"{ckpt['instruments']}, the data has {instruments}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, skipped = ckpt["step"], ckpt.get("skipped", 0)
        window_loss, n_applied = ckpt.get("log_window", (0.0, 0))
        loss_sum.fill_(float(window_loss))
        log(f"resuming {ckpt_path} at step {step}")
    elif init_from:
        new = init_from_checkpoint(model, load_checkpoint(init_from, map_location=device))
        log(f"initialised from {init_from} (encoder, target encoder, predictor); a new run from "
            "step 0" + (f"; new instrument embeddings for {', '.join(new)}" if new else ""))
    elif resume:
        log(f"no checkpoint in {out}: starting from scratch")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "log.csv").exists():
            (out / "log.csv").write_text(LOG_COLUMNS + "\n")
    if device.type == "cpu" and cfg.dim >= 768:
        log("note: the paper preset is made for a GPU (the paper: about four days on an A100; "
            "years on a CPU); use --preset tiny to learn in minutes")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"training {cfg.predictor} predictor, {trainable / 1e6:.1f} M trainable parameters, "
        f"{len(tracks)} tracks, instruments {instruments}, on {device} x {world}, "
        f"steps {step}..{cfg.steps}")
    # What the step differentiates: the model, in DDP under torchrun, compiled on request
    loss_fn = model
    if ddp:
        ids = [device] if device.type == "cuda" else None
        loss_fn = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if compile:
        loss_fn = torch.compile(loss_fn)
    # This process's share of each step's batch, from this step on (3.2: StemChunks, StepBatches)
    workers = min(8, max((os.cpu_count() or 2) // 2, 1)) if workers is None else workers
    dataset = StemChunks(tracks, instruments, chunk=chunk_samples(cfg),
                         threshold=cfg.active_threshold, tries=cfg.redraw_tries, seed=cfg.seed)
    sampler = StepBatches(start=step, steps=cfg.steps, batch=cfg.batch_size // world, rank=rank,
                          world=world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
        worker_init_fn=_ignore_sigint, prefetch_factor=4 if workers else None)

    def save():                                 # all a resumed run needs, written by rank 0
        if rank == 0:
            save_checkpoint(ckpt_path, {
                "version": VERSION, "config": dataclasses.asdict(cfg), "instruments": instruments,
                "step": step, "skipped": skipped, "data": data_id,
                "log_window": (loss_sum.item(), n_applied), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None})

    peak_lr = cfg.base_lr * cfg.batch_size / 256
    bad_in_a_row, n_seen, t_last = 0, 0, time.time()   # n_seen: steps since the last log line
    lock = RunLock(out, log=log) if rank == 0 else nullcontext()
    with GracefulStop() as stop, lock:
        batches = iter(loader)
        while step < min(cfg.steps, stop_at or cfg.steps) and stop.reason is None:
            try:
                batch = next(batches)
            except Exception:
                if stop.reason:                 # the signal also interrupted a loader worker
                    break
                raise
            context, target, instrument = (x.to(device, non_blocking=True) for x in batch)
            # This step's learning rate (3.3: linear warmup, then cosine) and tau_i (Eq. 2)
            lr = lr_at(step, peak_lr=peak_lr, warmup_steps=cfg.warmup_steps,
                       total_steps=cfg.steps, min_ratio=cfg.min_lr_ratio)
            tau = tau_at(step, cfg.steps, cfg.tau_start, cfg.tau_end)
            # Steps 1-3: forward and Eq. 1, backward and AdamW, EMA of the target encoder (Eq. 2)
            loss, applied = training_step(model, optimizer, context, target, instrument, lr=lr,
                                          tau=tau, grad_clip=cfg.grad_clip,
                                          grad_accum=cfg.grad_accum, loss_fn=loss_fn,
                                          precision=precision, scaler=scaler)
            if applied:
                loss_sum += loss                # on the device: adding a loss does not sync
                n_applied, bad_in_a_row = n_applied + 1, 0
            else:
                skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
                log(f"step {step}: non-finite loss or gradient, step skipped ({skipped} so far)")
                if bad_in_a_row >= 5:
                    raise StemJEPAError(f"step {step}: the loss was not finite for 5 steps in a "
                                        f"row; {ckpt_path} holds the last good state "
                                        "(try a lower --lr)")
            step, n_seen = step + 1, n_seen + 1
            # Log: the mean loss since the last line, the collapse measures of this batch
            if step % cfg.log_every == 0 or step == cfg.steps:
                mean_loss = loss_sum.item() / max(n_applied, 1)
                speed = n_seen * cfg.batch_size / (time.time() - t_last)
                with torch.no_grad(), autocast_for(device, precision):
                    z_bar = model.encode(target, target=True)
                    c = collapse_measures(model.predict(context, instrument), z_bar, instrument)
                    spread = embedding_spread(z_bar)
                if verbose or step == cfg.steps:
                    log(f"step {step}/{cfg.steps}  loss {mean_loss:.4f} (batch "
                        f"{c['batch_loss']:.4f}, average stem {c['avg_stem_loss']:.4f})  "
                        f"prediction spread {c['pred_spread']:.3f}  target spread "
                        f"{c['target_spread']:.3f}  embedding spread {spread:.3f}  lr {lr:.2e}  "
                        f"tau {tau:.6f}  {speed:.1f} samples/s  "
                        f"ETA {(cfg.steps - step) * cfg.batch_size / speed / 60:.1f} min")
                if rank == 0:
                    with open(out / "log.csv", "a") as f:
                        f.write(f"{step},{mean_loss:.6f},{lr:.6e},{tau:.8f},{speed:.2f},"
                                f"{spread:.4f},{c['batch_loss']:.6f},{c['avg_stem_loss']:.6f},"
                                f"{c['pred_spread']:.4f},{c['target_spread']:.4f},{skipped}\n")
                loss_sum.zero_()
                n_seen = n_applied = 0
                t_last = time.time()
            if step % cfg.ckpt_every == 0 or step == cfg.steps:     # checkpoint
                save()
        if stop.reason or step < cfg.steps:
            save()
            log(f"{stop.reason or 'stop_at'}: saved {ckpt_path} at step {step}; continue with "
                "the same command and --resume")
    if ddp:
        dist.destroy_process_group()
    return Trained(model.eval(), stop.reason)


# 4.1 Stem retrieval: whole tracks -> pooled embeddings -> Recall@K and normalised rank ------------

@torch.no_grad()
def embed_long(model: StemJEPA, wavs: list[np.ndarray], *, instruments=None, target=True,
               chunk=None, batch=16, device="cpu") -> list[torch.Tensor]:
    """Patch embeddings of whole recordings, one (F, T, D) tensor per waveform, T covering every
    frame: each is cut into consecutive chunks (by default the training chunk), the last zero-padded
    to whole patches. With `instruments` (one id per waveform), the predictions conditioned on them
    (context encoder); otherwise the target (or context) encoder's. Chunks of equal length are
    batched together, across waveforms. In float32 (`full_precision`), even under autocast."""
    patch = model.frontend.hop_length * model.encoder.patch_size       # samples per time patch
    chunk = chunk or chunk_samples(model.config)
    chunk = max(patch, chunk - chunk % patch)                           # whole patches only
    by_length = {}                                      # length -> [(wav, position, samples)]
    for w, x in enumerate(wavs):
        for j, start in enumerate(range(0, max(len(x), 1), chunk)):
            piece = x[start: start + chunk]
            if len(piece) < chunk:                                      # whole patches, >= 1
                piece = np.pad(piece, (0, max(-len(piece) % patch, patch - len(piece))))
            by_length.setdefault(len(piece), []).append((w, j, piece))
    groups = [same[i: i + batch] for same in by_length.values() for i in range(0, len(same), batch)]
    out = [{} for _ in wavs]                                    # position -> (F, T_chunk, D)
    with full_precision(torch.device(device)):
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


def retrieval_ranks(queries: torch.Tensor, refs: torch.Tensor, truth: torch.Tensor,
                    candidates=None):
    """L2 distances d from each query (Q, C) to every reference (R, C); for each query, how many
    references are closer than its true one `truth[q]` and how many tie with it (itself included).
    Ties are broken at random, in expectation: rank = 1 + closer + (tied - 1) / 2 (1 = nearest).
    candidates (Q, R) bool, optional: each query competes only with these references."""
    d = torch.cdist(queries.double(), refs.double())                    # (Q, R)
    if candidates is not None:
        d = d.masked_fill(~candidates, float("inf"))
    d_true = d.gather(1, truth[:, None])                                # (Q, 1)
    return (d < d_true).sum(1), (d == d_true).sum(1), d                 # closer, tied, d


def retrieval_metrics(queries, refs, truth, ks=(1, 5, 10), candidates=None) -> dict:
    """Recall@K and normalised rank (mean and median over the queries), in percent (4.1.1).

    nrank_mean, nrank_median: rank / R with the rank counted from 1 (nearest = 1), R the number of
    references, as in the authors' evaluation (evar/musdb_eval.py, compute_recall), the figure
    comparable with Table 1 (its median 0.5 % is rank 3 of 600). The paper's text says [0, 1);
    that is nrank0_mean, nrank0_median: the rank counted from 0, exactly 100 / R points lower.
    With `candidates` (Q, R), each query's R is the number of references it competes with.
    """
    closer, tied, _ = retrieval_ranks(queries, refs, truth, candidates)
    R = refs.shape[0] if candidates is None else candidates.sum(1)
    rank = 1 + closer + (tied - 1).double() / 2                 # 1-based, ties in expectation
    m = {f"R@{k}": 100 * ((k - closer) / tied).clamp(0, 1).mean().item() for k in ks}
    for name, r in (("nrank", rank), ("nrank0", rank - 1)):
        m[f"{name}_mean"] = 100 * (r / R).mean().item()
        m[f"{name}_median"] = 100 * (r / R).quantile(0.5).item()    # middle two's mean if even
    return m


def chance_metrics(R: int, ks=(1, 5, 10)) -> dict:
    """Expected metrics of a random ranking of R references, with the keys of `retrieval_metrics`
    (nrank: ranks 1..R, nrank0: ranks 0..R-1, each divided by R)."""
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
    """The two questions inside a retrieval rank (query i's true stem is reference i), each as R@1
    and mean normalised rank in percent (chance: 100/N or 100/S, and about 50):

    - which song? the rank of the true stem among the references of the *same instrument*
      (N candidates). This is compatibility: the bass of this song, not any bass.
    - which instrument? its rank among the stems of the *same song* (S candidates).
    - which song, centred: the same rank after subtracting, from the queries and from the
      references, their instrument's mean vector (then L2-normalising). Not the paper's ranking:
      it removes the part common to every bass, which otherwise favours the references nearest
      the average bass for every query, and shows whether a song-specific part exists under it.
    - query_cosine: the mean cosine between pooled queries of one instrument in different songs;
      1 when the predictor has learnt the instrument only. Pooled vectors share a large common
      part, so it stays high even when the ranking by song is informative. None with one song.
    """
    same_inst = instrument[:, None] == instrument[None]                 # (Q, R)
    same_song = track[:, None] == track[None]
    q = F.normalize(queries.double(), dim=1)
    others = same_inst & ~same_song
    cosine = (q @ q.T)[others].mean().item() if others.any() else None
    truth = torch.arange(len(queries))
    ranks = functools.partial(retrieval_metrics, queries, refs, truth, ks=(1,))
    centred = retrieval_metrics(centre_per_instrument(queries, instrument),
                                centre_per_instrument(refs, instrument), truth, ks=(1,),
                                candidates=same_inst)
    return {"which_song": ranks(candidates=same_inst), "which_song_centred": centred,
            "which_instrument": ranks(candidates=same_song), "query_cosine": cosine}


# =============================================================================================
# PART TWO: around the method: a trained model, toy songs, the analyses of 4.1-4.5, using
# a trained model, benchmarks, the command line
# =============================================================================================


# A trained model: StemJEPA.from_checkpoint, and the model on recordings of any length -------------
# StemJEPA's methods beyond Fig. 1, functions of the model set on the class at the end of this
# section. Any length: chunk, encode, concatenate (`embed_long`, as the evaluation does); they take
# one mono waveform (N,) at config.sample_rate, numpy or torch, and return CPU tensors.

def _from_checkpoint(cls, path, map_location="cpu") -> StemJEPA:
    """A trained model from a checkpoint written by `train`, in eval mode."""
    ckpt = load_checkpoint(path, map_location=map_location)
    model = build_model(Config(**ckpt["config"]), ckpt["instruments"])
    model.load_state_dict(ckpt["model"])
    return model.eval()


def _instrument_id(self: StemJEPA, instrument) -> int:
    """An instrument name (e.g. "bass") or id -> its id, or an error listing the known ones."""
    if isinstance(instrument, str):
        if instrument not in self.instruments:
            raise StemJEPAError(f"instrument {instrument!r}: the model knows "
                                f"{', '.join(self.instruments)}")
        return self.instruments.index(instrument)
    return int(instrument)


def _embed_one(self: StemJEPA, wav, instrument=None, *, target=True, batch=16) -> torch.Tensor:
    """One waveform (N,) -> (F, T, D) by `embed_long`: encoded, or predicted for `instrument`."""
    x = np.asarray(wav.detach().cpu() if torch.is_tensor(wav) else wav, dtype=np.float32)
    if x.ndim != 1:
        raise StemJEPAError(f"expected one mono waveform (N,), got shape {tuple(x.shape)}")
    ids = None if instrument is None else [self.instrument_id(instrument)]
    return embed_long(self, [x], instruments=ids, target=target, batch=batch,
                      device=next(self.parameters()).device)[0]


def _encode_long(self: StemJEPA, wav, *, target: bool = True, batch: int = 16) -> torch.Tensor:
    """A recording of any length (N,) -> its patch embeddings (F, T, D), one column of patches
    per 160 ms, T = ceil(N / 2560); the target encoder by default (retrieval's references)."""
    return _embed_one(self, wav, target=target, batch=batch)


def _predict_long(self: StemJEPA, mix, instrument, *, batch: int = 16) -> torch.Tensor:
    """A mix of any length (N,) and the missing instrument (name or id) -> the predicted patch
    embeddings (F, T, D) of a stem that fits it (retrieval's query before pooling)."""
    return _embed_one(self, mix, instrument, batch=batch)


def _embed(self: StemJEPA, wav, instrument=None, *, batch: int = 16) -> torch.Tensor:
    """One pooled vector (F*D,) (`pool`, 3840-d for ViT-B) for a recording of any length: its
    target embedding, or with `instrument` the prediction for the stem missing from this mix.
    The L2 distance between the two is retrieval's (4.1)."""
    return pool(_embed_one(self, wav, instrument, batch=batch))


def _score(self: StemJEPA, mix, stem, instrument, *, batch: int = 16) -> dict:
    """How well `stem` fits `mix` as `instrument` (4.1): the L2 distance between the pooled
    prediction for the mix and the stem's pooled target embedding (0 to 2, lower fits better),
    the cosine similarity 1 - d^2 / 2, and the offset at which the stem fits best (4.3:
    `best_offset`; place the stem offset_s seconds after the start of the mix)."""
    q = self.predict_long(mix, instrument, batch=batch)
    z = self.encode_long(stem, batch=batch)
    distance = (pool(q) - pool(z)).norm().item()
    offset = best_offset(frames(z), frames(q))
    return {"distance": round(distance, 4), "similarity": round(1 - distance ** 2 / 2, 4),
            "offset_patches": offset, "offset_s": round(offset * patch_seconds(self.config), 2)}


StemJEPA.from_checkpoint = classmethod(_from_checkpoint)
StemJEPA.instrument_id = _instrument_id
StemJEPA.encode_long = _encode_long
StemJEPA.predict_long = _predict_long
StemJEPA.embed = _embed
StemJEPA.score = _score


def open_trained(checkpoint, device=None, data=None, *, split="test", cache=None, layout=None,
                 log=print, verbose=True) -> tuple[StemJEPA, torch.device, list[dict] | None]:
    """The model in eval mode on the device; given `data`, the split's tracks (training=False)."""
    device = pick_device(device)
    model = StemJEPA.from_checkpoint(checkpoint).to(device)
    if data is None:
        return model, device, None
    return model, device, prepare(data, split, cache=cache, training=False, layout=layout,
                                  log=log, verbose=verbose, **prepare_options(model.config))


def random_twin(model: StemJEPA, seed: int | None = None) -> StemJEPA:
    """The comparison row "random weights": the model's architecture, untrained, in eval mode."""
    if seed is not None:
        torch.manual_seed(seed)
    return build_model(model.config, model.instruments).to(next(model.parameters()).device).eval()


def save_weights(checkpoint, out) -> Path:
    """A checkpoint without its optimizer, the weights in float16: what a trained model needs to be
    shared (about 8 MB for the tiny preset). `StemJEPA.from_checkpoint` loads it; it cannot resume
    a training."""
    ckpt = load_checkpoint(checkpoint)
    weights = {k: ckpt.get(k) for k in ("version", "config", "instruments", "step", "data")}
    weights["model"] = {k: v.half() if v.is_floating_point() else v
                        for k, v in ckpt["model"].items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, lambda p: torch.save(weights, p))
    return out


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
    """One procedural song: ({stem: waveform}, labels), made so that each stem is predictable from
    the others, as in real music. A key, a tempo and an 8-bar chord progression (functional
    harmony, a chord per bar) per song; the parts move together: the bass plays the chord's root
    on the kick drum's onsets, the chords ("other") move by voice leading on a comping pattern,
    the lead ("vocals") repeats a rhythm of the song with chord tones on the beats; at random bars
    every part stops together for the last beat or two (a break), which marks a moment in a
    song that the mix shares with each stem. Timbres, grooves and a recording chain (`_room`) are
    drawn per song; each 4-bar section mutes some stems (two or more play)."""
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
    out = Path(out)
    n_test = max(1, round(tracks * test_fraction)) if tracks > 1 else 0
    for i in range(tracks):
        stems, labels = make_toy_song(np.random.default_rng([seed, i]), seconds=seconds,
                                      sample_rate=sample_rate)
        folder = out / ("test" if i >= tracks - n_test else "train") / f"song{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, x in stems.items():
            sf.write(folder / f"{name}.wav", x, sample_rate, subtype="PCM_16")
        (folder / "labels.json").write_text(json.dumps(labels, indent=1))
    return out


# 4.1-4.2 Evaluation: Table 1, Fig. 2, comparison rows, listening test -----------------------------

def _write_json(path: Path, data) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=1)))


def failure_analysis(queries, refs, query_track, query_inst, ref_track, ref_inst,
                     instruments) -> dict:
    """Fig. 2 per instrument: the fractions of queries whose nearest reference z* is "both correct",
    "right instrument", "right song" or "both wrong"; the instrument confusion (rows sum to 1)."""
    nearest = torch.cdist(queries.double(), refs.double()).argmin(1)
    same_song = ref_track[nearest] == query_track
    same_inst = ref_inst[nearest] == query_inst
    cats = {"both correct": same_song & same_inst, "right instrument": ~same_song & same_inst,
            "right song": same_song & ~same_inst, "both wrong": ~same_song & ~same_inst}
    out = {"categories": {}, "confusion": [], "instruments": list(instruments)}
    for i, name in enumerate(instruments):
        rows = query_inst == i
        out["categories"][name] = {c: v[rows].float().mean().item() if rows.any() else float("nan")
                                   for c, v in cats.items()}
        counts = torch.bincount(ref_inst[nearest][rows], minlength=len(instruments)).float()
        out["confusion"].append((counts / counts.sum().clamp(min=1)).tolist())
    return out


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
    """4.1's pooled vectors, one row per (track, stem): queries q_s^(n), references z_s^(n) (row
    i's true reference is row i); refs_context: the context encoder's (None for DSP)."""
    queries: torch.Tensor                       # (Q, C)
    refs_target: torch.Tensor                   # (R, C)
    track: torch.Tensor                         # (R,)
    instrument: torch.Tensor                    # (R,)
    refs_context: torch.Tensor | None = None    # (R, C)


def retrieval_embeddings(model: StemJEPA, tracks: list[dict], *, device="cpu", batch=16,
                         log=print, verbose=True) -> RetrievalEmbeddings:
    """Per prepared track n and known stem s: the query q_s^(n) (the predictor on s over the mix
    of the other stems, 4.1.1) and the target and context encoders' references z_s^(n), `pool`ed."""
    model = model.to(device).eval()
    embed = functools.partial(embed_long, model, batch=batch, device=device)
    seconds = [t["length"] * 2 * len(t["stems"]) / model.config.sample_rate for t in tracks]
    queries, refs_target, refs_context, track, instrument = [], [], [], [], []
    t0 = time.time()
    for n, t in enumerate(tracks):
        x = np.load(t["npy"]).astype(np.float32)                        # (S, N)
        known = [i for i, s in enumerate(t["stems"]) if s in model.instruments]
        ids = [model.instruments.index(t["stems"][i]) for i in known]
        stems = [x[i] for i in known]
        mixes = [x.sum(0) - x[i] for i in known]                        # x_{not s}: all but s
        queries += [pool(q) for q in embed(mixes, instruments=ids)]
        refs_target += [pool(z) for z in embed(stems)]
        refs_context += [pool(z) for z in embed(stems, target=False)]
        track += [n] * len(known)
        instrument += ids
        rate = sum(seconds[: n + 1]) / (time.time() - t0)
        if verbose and ((n + 1) % 10 == 0 or n + 1 == len(tracks)):
            log(f"  embedded {n + 1}/{len(tracks)} tracks, {rate:.0f} s of audio per s, "
                f"ETA {sum(seconds[n + 1:]) / rate:.0f} s")
    return RetrievalEmbeddings(queries=torch.stack(queries), refs_target=torch.stack(refs_target),
                               refs_context=torch.stack(refs_context), track=torch.tensor(track),
                               instrument=torch.tensor(instrument))


def dsp_embeddings(tracks: list[dict], instruments: list[str],
                   sample_rate: int) -> RetrievalEmbeddings:
    """The DSP baseline: queries from the mix without s, as for the model (one query for every
    missing stem would be unfair: DSP has no notion of instrument), references from each stem."""
    rows = []                                           # (query, reference, track, instrument)
    for n, t in enumerate(tracks):
        x = np.load(t["npy"]).astype(np.float32)
        rows += [(dsp_features(x.sum(0) - x[i], sample_rate), dsp_features(x[i], sample_rate), n,
                  instruments.index(s)) for i, s in enumerate(t["stems"]) if s in instruments]
    q, r, tr, ins = zip(*rows)
    return RetrievalEmbeddings(queries=torch.tensor(np.stack(q)),
                               refs_target=torch.tensor(np.stack(r)),
                               track=torch.tensor(tr), instrument=torch.tensor(ins))


def _cached_retrieval_embeddings(model: StemJEPA, checkpoint, tracks: list[dict], *, device,
                                 batch, log, verbose) -> RetrievalEmbeddings:
    """`retrieval_embeddings`, cached beside the decoded stems while checkpoint and stems hold."""
    key = _cache_key(_file_id(Path(checkpoint).resolve()), [_file_id(t["npy"]) for t in tracks])
    path = Path(tracks[0]["npy"]).parent.parent / "embeddings" / f"{key}.pt"
    if path.exists():
        if verbose:
            log(f"embeddings from {path}")
        return RetrievalEmbeddings(**torch.load(path, weights_only=True))
    if verbose:
        log(f"embedding {len(tracks)} tracks with {checkpoint}")
    emb = retrieval_embeddings(model, tracks, device=device, batch=batch, log=log, verbose=verbose)
    path.parent.mkdir(exist_ok=True)
    _write_atomic(path, lambda p: torch.save(dataclasses.asdict(emb), p))
    return emb


def evaluate(checkpoint, data, *, split="test", out=None, cache=None, device=None, batch=16,
             listening=0, seed=0, layout=None, log=print, verbose=True) -> dict:
    """Table 1 and Fig. 2 of a checkpoint on a split, beside chance, random weights and DSP ->
    OUT/retrieval.json, OUT/fig2.png; rows: (track, stem) pairs, quiet stems too. split "all" ranks
    among train/ and test/ together, as Table 1 (MUSDB18: 150 tracks, R = 600). [code] `pool` and
    the 1-based normalised rank (`retrieval_metrics`) follow the authors' code, not the paper's."""
    model, device, tracks = open_trained(checkpoint, device, data, split=split, cache=cache,
                                         layout=layout, log=log, verbose=verbose)
    cfg = model.config
    out = Path(out or Path(checkpoint).parent / f"eval-{split}")
    out.mkdir(parents=True, exist_ok=True)
    options = dict(device=device, batch=batch, log=log, verbose=verbose)
    emb = _cached_retrieval_embeddings(model, checkpoint, tracks, **options)
    if verbose:
        log("embedding with random weights")
    rand = retrieval_embeddings(random_twin(model, seed), tracks, **options)
    dsp = dsp_embeddings(tracks, model.instruments, cfg.sample_rate)
    truth = torch.arange(len(emb.queries))                           # query i's stem is reference i
    rows = {"Stem-JEPA, target-encoder refs": (emb.queries, emb.refs_target),
            "Stem-JEPA, context-encoder refs": (emb.queries, emb.refs_context),
            "random weights": (rand.queries, rand.refs_target),
            "DSP (chroma + tempo)": (dsp.queries, dsp.refs_target)}
    results = {"N": len(tracks), "S": len(model.instruments), "references": len(truth),
               "checkpoint": str(checkpoint), "split": split, "rows": {},
               "rank_convention": "nrank_*: 1-based rank / references (nearest = 1, Table 1's); "
                                  "nrank0_*: 0-based rank / references"}
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
    results.update(results["rows"]["Stem-JEPA, target-encoder refs"])  # headline numbers on top
    results["fig2"] = failure_analysis(emb.queries, emb.refs_target, emb.track, emb.instrument,
                                       emb.track, emb.instrument, model.instruments)
    plot_fig2(results["fig2"], out / "fig2.png")
    if listening:
        results["listening"] = write_listening_test(
            tracks, emb, model.instruments, out / "listening", trials=listening,
            sample_rate=cfg.sample_rate, seed=seed, threshold=cfg.active_threshold)
    (out / "retrieval.json").write_text(json.dumps(results, indent=1))
    log(format_table(results))
    log(f"wrote {out / 'retrieval.json'} and {out / 'fig2.png'}")
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
    for s, m in results["rows"]["Stem-JEPA, target-encoder refs"].get("per_instrument", {}).items():
        lines.append(f"{'  ' + s:34s} {m['R@1']:6.1f} {m['R@5']:6.1f} {m['R@10']:6.1f} "
                     f"{m['nrank_mean']:11.1f} {m['nrank_median']:7.1f}")
    return "\n".join(lines)


def plot_fig2(fig2: dict, path) -> None:
    """Fig. 2: failure categories per instrument (left), instrument confusion matrix (right)."""
    from matplotlib.figure import Figure        # not pyplot: leaves a notebook's backend alone
    names = fig2["instruments"]
    fig = Figure(figsize=(9, 3.5))
    a, b = fig.subplots(1, 2)
    bottom = np.zeros(len(names))
    for cat in ("both correct", "right instrument", "right song", "both wrong"):
        v = np.nan_to_num([fig2["categories"][s][cat] for s in names])
        a.bar(names, v, bottom=bottom, label=cat)
        bottom += v
    a.set_ylabel("fraction of queries")
    a.legend(fontsize=7)
    c = np.array(fig2["confusion"])
    b.imshow(c, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(c):
        b.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    b.set_xticks(range(len(names)), names, rotation=45)
    b.set_yticks(range(len(names)), names)
    b.set(xlabel="retrieved instrument", ylabel="true stem")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def write_listening_test(tracks, emb, instruments, out, *, trials, sample_rate, seed=0,
                         excerpt_s=16.0, crop_s=10.0, threshold=0.1) -> dict:
    """4.2's listening test: per trial a query mix (one stem removed), then as A/B/C in random order
    the true stem, the one retrieved from another song (the paper's green segment) and a random one;
    16 s excerpts cropped to 10 s, the mix and true stem at one place, the others where they play
    most. key.csv (apart from trials/) says which is which."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "trials").mkdir(parents=True, exist_ok=True)
    d = torch.cdist(emb.queries.double(), emb.refs_target.double())
    n_ex, n_crop = int(excerpt_s * sample_rate), int(crop_s * sample_rate)    # samples
    key_rows = []

    def busiest_start(y):                       # the excerpt with the most active 0.1 s blocks
        block = sample_rate // 10
        nb = len(y) // block
        if len(y) <= n_ex or nb == 0:
            return 0
        active = (np.abs(y[: nb * block]).reshape(nb, block).max(1) > threshold).astype(np.int64)
        return int(np.convolve(active, np.ones(min(n_ex // block, nb), np.int64),
                               "valid").argmax()) * block

    def excerpt(x, start):
        seg = x[start: start + n_ex]
        c = int(rng.integers(0, max(len(seg) - n_crop, 0) + 1))
        return seg[c: c + n_crop]

    def stem_audio(row):
        t = tracks[int(emb.track[row])]
        stem = t["stems"].index(instruments[int(emb.instrument[row])])
        return np.load(t["npy"], mmap_mode="r")[stem].astype(np.float32)

    candidates = [q for q in range(len(d)) if ((emb.instrument == emb.instrument[q])
                                               & (emb.track != emb.track[q])).sum() >= 2]
    for k, q in enumerate(rng.permutation(candidates)[:trials]):
        n, inst = int(emb.track[q]), int(emb.instrument[q])
        others = torch.nonzero((emb.instrument == inst) & (emb.track != n)).flatten()
        retrieved = int(others[d[q, others].argmin()])
        random_pick = int(rng.choice([o for o in others.tolist() if o != retrieved]))
        t = tracks[n]
        x = np.load(t["npy"]).astype(np.float32)
        start = int(rng.integers(0, max(x.shape[1] - n_ex, 0) + 1))
        folder = out / "trials" / f"trial{k:02d}"
        folder.mkdir(exist_ok=True)
        clips = {"mix": excerpt(x.sum(0) - x[t["stems"].index(instruments[inst])], start)}
        options = {"true": stem_audio(q), "retrieved": stem_audio(retrieved),
                   "random": stem_audio(random_pick)}
        order = rng.permutation(list(options))
        for letter, what in zip("ABC", order):
            y = options[what]
            at = min(start, max(len(y) - n_ex, 0)) if what == "true" else busiest_start(y)
            clips[letter] = excerpt(y, at)
        # one gain per trial: no clipping
        gain = min(1.0, 0.99 / max(max(float(np.abs(c).max()) for c in clips.values()), 1e-9))
        for name, c in clips.items():
            sf.write(folder / f"{name}.wav", gain * c, sample_rate)
        key_rows.append({"trial": folder.name, "track": t["name"], "instrument": instruments[inst],
                         **dict(zip("ABC", order)),
                         "retrieved_from": tracks[int(emb.track[retrieved])]["name"],
                         "random_from": tracks[int(emb.track[random_pick])]["name"]})
    with open(out / "key.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(key_rows[0]) if key_rows else ["trial"])
        w.writeheader()
        w.writerows(key_rows)
    return {"trials": len(key_rows), "folder": str(out)}


# 4.3 Stem alignment: target patches against shifted predictions (Eq. 3, Fig. 4) -------------------

def frames(z: torch.Tensor) -> torch.Tensor:
    """(F, T, D) -> (T, F*D): one vector per time patch (160 ms), frequency rows concatenated."""
    return z.permute(1, 0, 2).reshape(z.shape[1], -1)


def shift_similarity(z: torch.Tensor, q: torch.Tensor, shifts,
                     circular: bool = True) -> torch.Tensor:
    """Eq. 3, s(z, q, j) = 1/(MS) sum_s sum_i <z_s[i], q_s[(i + j) % M]>, for one stem (S = 1)
    at each shift j: z, q (T, C), normalised here; M = T, the number of time patches. With
    circular=False (lengths differ, as in `retrieve`), the mean over the overlapping patches."""
    sims = F.normalize(z.float(), dim=-1) @ F.normalize(q.float(), dim=-1).T   # (T, T')
    i = torch.arange(sims.shape[0])
    if circular:
        return torch.stack([sims[i, (i + j) % sims.shape[1]].mean() for j in shifts])
    out = []
    for j in shifts:
        ok = (i + j >= 0) & (i + j < sims.shape[1])
        out.append(sims[i[ok], i[ok] + j].mean() if ok.any() else torch.tensor(float("nan")))
    return torch.stack(out)


def best_offset(stem: torch.Tensor, prediction: torch.Tensor, min_overlap: float = 0.5) -> int:
    """The shift j (time patches) at which a stem (T, C) best matches a mix's prediction (T', C):
    the stem starts j patches into the mix. Shifts sharing < min_overlap of the shorter are out."""
    T, Tq = len(stem), len(prediction)
    need = max(1, int(min_overlap * min(T, Tq)))
    shifts = list(range(-(T - need), Tq - need + 1))
    return shifts[int(shift_similarity(stem, prediction, shifts, circular=False).argmax())]


def alignment_curve(z_seqs: list[torch.Tensor], q_seqs: list[torch.Tensor], shifts) -> torch.Tensor:
    """Eq. 3 for one track: `shift_similarity` averaged over the stems' target patches z_seqs[s]
    and predictions q_seqs[s] (T, C). A prediction m patches late (q[i] = z[i - m]) peaks at +m."""
    return torch.stack([shift_similarity(z, q, shifts) for z, q in zip(z_seqs, q_seqs)]).mean(0)


def random_pair_level(z_means: torch.Tensor, q_means: torch.Tensor,
                      track: torch.Tensor) -> float | None:
    """Footnote 5's "average cosine similarity between random representations and predictions"
    (0.17): the mean cos(z_s^(n)[i], q_s'^(n')[i']), n' != n, exactly <mean z, mean q> over each
    sequence's mean unit vector z_means, q_means (P, C) and track (P,). None with one track."""
    other_track = track[:, None] != track[None, :]                      # (P, P)
    if not other_track.any():
        return None
    return (z_means @ q_means.T)[other_track].mean().item()


def stem_sequences(model: StemJEPA, x: np.ndarray, stems: list[str], *, device, batch: int):
    """One track's stems x (S, N) -> [(stem, z, q)] for the stems the model knows: z (T, C) the
    target encoder's patches of the stem, q (T, C) the predictor's from the mix of the others."""
    known = [i for i, s in enumerate(stems) if s in model.instruments]
    ids = [model.instruments.index(stems[i]) for i in known]
    mixes = [x.sum(0) - x[i] for i in known]                            # x_{not s}
    q = embed_long(model, mixes, instruments=ids, batch=batch, device=device)
    z = embed_long(model, [x[i] for i in known], batch=batch, device=device)
    return [(stems[i], frames(zi), frames(qi)) for i, zi, qi in zip(known, z, q)]


def alignment_curves(model: StemJEPA, tracks: list[dict], *, max_shift: int, device="cpu",
                     batch=16, log=print, verbose=True) -> dict:
    """Fig. 4: Eq. 3 per prepared track over circular shifts j = -J..J patches (J <= (T - 1) // 2 of
    the shortest), their mean, the random-pair level. "A sharp peak in similarity at j = 0, followed
    by a rapid decrease, suggests that the embeddings are rich in local information" (4.3)."""
    if not tracks:
        raise StemJEPAError("no track to analyse")
    model = model.to(device).eval()
    patch_s = patch_seconds(model.config)
    patch = model.frontend.hop_length * model.encoder.patch_size      # samples per time patch
    shortest = min(-(-t["length"] // patch) for t in tracks)           # T of the shortest track
    J = min(max_shift, (shortest - 1) // 2)
    if J < max_shift:
        log(f"shifts capped at +-{J} patches: half the shortest track ({shortest} patches)")
    shifts = list(range(-J, J + 1))
    rows, z_means, q_means, owner = [], [], [], []
    for n, t in enumerate(tracks):
        seqs = stem_sequences(model, np.load(t["npy"]).astype(np.float32), t["stems"],
                              device=device, batch=batch)
        if not seqs:
            log(f"  {t['name']}: no stem the model knows; skipped")
            continue
        names, zs, qs = zip(*seqs)
        curve = alignment_curve(list(zs), list(qs), shifts)
        best = shifts[int(curve.argmax())]
        rows.append({"name": t["name"], "stems": list(names), "curve": curve.tolist(),
                     "best_shift": best, "best_shift_s": round(best * patch_s, 3)})
        z_means += [F.normalize(z.float(), dim=-1).mean(0) for z in zs]
        q_means += [F.normalize(q.float(), dim=-1).mean(0) for q in qs]
        owner += [n] * len(seqs)
        if verbose:
            log(f"  {t['name']}: s(j=0) {curve[J]:.3f}, peak at {best:+d} patches")
    if not rows:
        raise StemJEPAError("no track has a stem the model knows")
    level = random_pair_level(torch.stack(z_means), torch.stack(q_means), torch.tensor(owner))
    return {"patch_s": patch_s, "shifts": shifts,
            "shifts_s": [round(j * patch_s, 3) for j in shifts], "tracks": rows,
            "mean": torch.tensor([r["curve"] for r in rows]).mean(0).tolist(),
            "random_level": level,
            "peak_at_zero": sum(r["best_shift"] == 0 for r in rows) / len(rows)}


def analyze_alignment(checkpoint, data, *, split="test", tracks=None, max_shift_s=10.0, out=None,
                      cache=None, device=None, batch=16, layout=None, log=print,
                      verbose=True) -> dict:
    """4.3 on a split: OUT/align.json and OUT/fig4.png; tracks: the first K only (the paper: 8)."""
    model, device, prepared = open_trained(checkpoint, device, data, split=split, cache=cache,
                                           layout=layout, log=log, verbose=verbose)
    prepared = prepared[:tracks]
    out = Path(out or Path(checkpoint).parent / f"align-{split}")
    out.mkdir(parents=True, exist_ok=True)
    log(f"alignment (Eq. 3) on {len(prepared)} tracks of {split}")
    max_shift = round(max_shift_s / patch_seconds(model.config))
    result = alignment_curves(model, prepared, max_shift=max_shift, device=device, batch=batch,
                              log=log, verbose=verbose)
    result.update(checkpoint=str(checkpoint), split=split)
    _write_json(out / "align.json", result)
    plot_fig4(result, out / "fig4.png", chunk_seconds=model.config.chunk_seconds)
    level = result["random_level"]
    level_text = "n/a (one track)" if level is None else f"{level:.3f}"
    log(f"mean s(j=0) {result['mean'][result['shifts'].index(0)]:.3f}, mean over shifts "
        f"{np.mean(result['mean']):.3f}, random pairs {level_text}; "
        f"{100 * result['peak_at_zero']:.0f} % of tracks peak at j = 0")
    log(f"wrote {out / 'align.json'} and {out / 'fig4.png'}")
    return result


def plot_fig4(result: dict, path, *, chunk_seconds=None, max_tracks=8) -> None:
    """Fig. 4: s(z, q, j) per track and their mean; dotted at chunk multiples (4.3's peaks)."""
    from matplotlib.figure import Figure        # not pyplot: leaves a notebook's backend alone
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    x = result["shifts_s"]
    for r in result["tracks"][:max_tracks]:
        ax.plot(x, r["curve"], lw=0.8, alpha=0.7, label=r["name"][:24])
    ax.plot(x, result["mean"], color="black", lw=2, label=f"mean of {len(result['tracks'])} tracks")
    ax.axvline(0, color="grey", lw=0.5)
    if result["random_level"] is not None:
        ax.axhline(result["random_level"], color="grey", ls="--", lw=1, label="random pairs")
    if chunk_seconds:
        for k in range(1, int(max(abs(x[0]), x[-1]) // chunk_seconds) + 1):
            for sign in (-1, 1):
                ax.axvline(sign * k * chunk_seconds, color="grey", ls=":", lw=0.8)
    ax.set(xlabel="shift j (s)", ylabel="s(z, q, j)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# 4.4 Musical plausibility: k-means on patch embeddings, key/chord co-occurrence (Fig. 5) ----------

def parse_lab(path) -> list[tuple[float, float, str]]:
    """A `.lab` file (Isophonics, MIREX) -> [(start, end, label)], seconds: `start end label` per
    line, the label the rest of it (`0.394 150.0 Key E` gives "Key E"); blank lines skipped."""
    segments = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            start, end = float(parts[0]), float(parts[1])
        except (ValueError, IndexError):
            raise StemJEPAError(f"{path}:{n}: expected 'start end label', got {line!r}") from None
        if len(parts) < 3:
            raise StemJEPAError(f"{path}:{n}: no label in {line!r}")
        segments.append((start, end, " ".join(parts[2:])))
    return segments


def labels_at(segments: list[tuple[float, float, str]], times) -> list:
    """The label at each time t: the segment's with start <= t < end (the later if two), or None."""
    segments = sorted(segments, key=lambda s: s[0])
    starts = np.array([s[0] for s in segments])
    idx = np.searchsorted(starts, np.asarray(times, dtype=float), side="right") - 1
    return [segments[i][2] if i >= 0 and t < segments[i][1] else None for i, t in zip(idx, times)]


def _split_root(label: str) -> tuple[str, str]:
    """'Bb:min7' -> ('Bb', ':min7'), 'Ebm' -> ('Eb', 'm'): the letter and its accidentals first."""
    end = 1 + len(label[1:]) - len(label[1:].lstrip("#b"))
    return label[:end], label[end:]


def pitch_class(name: str) -> int:
    """The root of a note, key or chord name -> 0..11: 'C' 0, 'F#m' 6, 'Bb:7' 10, 'Cb' 11."""
    root, _ = _split_root(name)
    base = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}[root[0].upper()]
    return (base + root.count("#") - root.count("b")) % 12


def normalise_key(label: str) -> str | None:
    """Isophonics' "Key E", "Key C#:minor" or the toy set's "A:min" -> "E", "C#m", "Am" (NOTE_NAMES
    spelling), None for no key; modes fold by their third (dorian, phrygian, locrian -> minor)."""
    words = label.split()
    if words and words[0].lower() == "key":
        words = words[1:]
    text = "".join(words)
    if not text or text[0].upper() not in "ABCDEFG":
        return None                                                     # "Silence", "N", "X"
    root, rest = _split_root(text)
    mode = rest.lstrip(":").lower()
    minor = mode.startswith("min") or mode in ("m", "aeolian", "dorian", "phrygian", "locrian")
    return NOTE_NAMES[pitch_class(root)] + ("m" if minor else "")


def normalise_chord(label: str) -> str | None:
    """A chord in Harte's syntax -> root and triad family: "C", "Cm", "Co" (dim), "C+" (aug),
    "Csus", "C5" (no third); None for "N", "X". Sevenths and extensions fold into their triad
    (C:min7 -> Cm, C:7 -> C), inversions drop (A/3 -> A), C:(1,b3,5) is read from its third."""
    label = label.strip()
    if not label or label[0].upper() not in "ABCDEFG":
        return None
    root, rest = _split_root(label.split("/")[0])
    shorthand, _, intervals = rest.lstrip(":").partition("(")
    prefixes = {"min": "m", "dim": "o", "hdim": "o", "aug": "+", "sus": "sus"}
    family = next((f for p, f in prefixes.items() if shorthand.startswith(p)), "")  # "": maj, 7
    if shorthand in ("5", "1") or (not shorthand and intervals and "3" not in intervals):
        family = "5"
    elif not shorthand and "b3" in intervals.replace(" ", "").split(","):
        family = "m"
    return NOTE_NAMES[pitch_class(root)] + family


def patch_labels(keys, chords, *, patches: int, patch_s: float) -> list:
    """The "key/chord" label of each of `patches` time patches, read at its centre ((i + 0.5) *
    patch_s seconds) from raw segments; None where the key or the chord is missing."""
    times = (np.arange(patches) + 0.5) * patch_s
    k = labels_at([(s, e, normalise_key(l)) for s, e, l in keys], times)
    c = labels_at([(s, e, normalise_chord(l)) for s, e, l in chords], times)
    return [f"{a}/{b}" if a and b else None for a, b in zip(k, c)]


def lab_index(labels_dir) -> dict[str, dict[str, Path]]:
    """.lab files by track, {name: {"keys": path, "chords": path}}: <name>.keys.lab and .chords.lab
    (any sub-folder), or Isophonics' tree: <name>.lab under keylab/ and chordlab/ folders."""
    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise StemJEPAError(f"--labels {labels_dir}: no such folder")
    index = {}
    for p in sorted(labels_dir.rglob("*.lab")):
        name = p.name[: -len(".lab")]
        folders = {part.lower() for part in p.parent.relative_to(labels_dir).parts}
        for kind, suffix, folder in (("keys", ".keys", "keylab"),
                                     ("chords", ".chords", "chordlab")):
            if name.endswith(suffix):
                index.setdefault(name[: -len(suffix)], {})[kind] = p
            elif folder in folders:
                index.setdefault(name, {})[kind] = p
    return index


def track_annotations(name: str, folder, index=None):
    """A track's (key segments, chord segments), or None if either is missing: from `index`
    (`lab_index`) if given, else FOLDER/labels.json (toy set: one key, [start, end, chord])."""
    if index is not None:
        files = index.get(name, {})
        if "keys" not in files or "chords" not in files:
            return None
        return parse_lab(files["keys"]), parse_lab(files["chords"])
    path = Path(folder) / "labels.json"
    labels = json.loads(path.read_text()) if path.exists() else {}
    if "key" not in labels or "chords" not in labels:
        return None
    chords = [(float(s), float(e), c) for s, e, c in labels["chords"]]
    return [(0.0, math.inf, labels["key"])], chords


def mix_sources(*, data=None, audio=None, split="test", cache=None, cfg: Config, layout=None,
                log=print, verbose=True) -> list[tuple]:
    """The full mixes, (name, folder of its labels.json, load() -> mono waveform): the files of
    `audio` (named as their .lab files), or each track's stems summed (prepared as for training)."""
    if audio:
        return [(f.stem, f.parent, lambda f=f: load_audio(f, cfg.sample_rate))
                for f in audio_files(audio)]
    folders = {name: Path(next(iter(stems.values()))[0][0]).parent
               for name, stems in find_tracks(data, split, **(layout or {}))}
    prepared = prepare(data, split, cache=cache, training=False, layout=layout, log=log,
                       verbose=verbose, **prepare_options(cfg))
    return [(t["name"], folders[t["name"]],
             lambda t=t: np.load(t["npy"]).astype(np.float32).sum(0)) for t in prepared]


def labelled_patches(model: StemJEPA, sources: list[tuple], *, device="cpu", batch=16):
    """4.4: "We utilize key and chord annotations [...] to label all patch embeddings." sources
    (name, load, keys, chords) -> x (P, C), the target encoder's unit vector per 160 ms patch of
    each full mix (as annotated), each patch's "key/chord" label (or None), its track."""
    model = model.to(device).eval()
    xs, labels, owner = [], [], []
    for n, (name, load, keys, chords) in enumerate(sources):
        z = frames(embed_long(model, [load()], batch=batch, device=device)[0])
        xs.append(F.normalize(z.float(), dim=-1))       # (T, C), unit: k-means groups by cosine
        labels += patch_labels(keys, chords, patches=len(z), patch_s=patch_seconds(model.config))
        owner += [n] * len(z)
    return torch.cat(xs), labels, torch.tensor(owner)


def squared_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """||x_p - c_k||^2 of rows x (P, C) and c (K, C) -> (P, K), without a (P, K, C) tensor."""
    return ((x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None]).clamp(min=0)


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur and Vassilvitskii, 2007): each next centre drawn with p ~ d^2."""
    chosen = [int(torch.randint(len(x), (1,), generator=generator))]
    d2 = squared_distances(x, x[chosen]).squeeze(1)                     # (P,)
    for _ in range(1, k):
        if d2.sum() > 0:
            i = int(torch.multinomial(d2 / d2.sum(), 1, generator=generator))
        else:                                   # fewer distinct points than k
            i = int(torch.randint(len(x), (1,), generator=generator))
        chosen.append(i)
        d2 = torch.minimum(d2, squared_distances(x, x[i: i + 1]).squeeze(1))
    return x[chosen].clone()


def kmeans(x: torch.Tensor, k: int, *, iters: int = 100,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """4.4: "we then conduct k-means clustering on the latent space with k = 32 clusters": Lloyd's,
    k-means++ seeded, x (P, C) -> centroids (k, C), assignment (P,); empty ones take far points."""
    if len(x) < k:
        raise StemJEPAError(f"k-means: {len(x)} points for k = {k} clusters")
    x = x.float()
    centroids = kmeans_plusplus(x, k, torch.Generator().manual_seed(seed))
    previous = None
    for _ in range(iters):
        d2 = squared_distances(x, centroids)                            # (P, k)
        assignment = d2.argmin(1)
        if previous is not None and torch.equal(assignment, previous):
            break
        counts = torch.bincount(assignment, minlength=k)                # (k,)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
        centroids = sums / counts.clamp(min=1)[:, None]
        own = d2.gather(1, assignment[:, None]).squeeze(1)              # (P,) to own centroid
        for c in torch.nonzero(counts == 0).flatten().tolist():
            far = int(own.argmax())
            centroids[c] = x[far]
            own[far] = 0.0                                  # the next empty one takes another
        previous = assignment
    else:                                                   # the last update moved the centroids
        assignment = squared_distances(x, centroids).argmin(1)
    return centroids, assignment


def cooccurrence(labels: list, assignment: torch.Tensor,
                 n_clusters: int) -> tuple[list, torch.Tensor]:
    """Within-cluster co-occurrence of labels -> (sorted names (L,), counts (L, L)). "Within each
    cluster, we calculate the co-occurrence of all key and chord pairs and aggregate these counts
    across all clusters [...] considering all possible pairs for counting" (4.4): counts[a, b] =
    sum_c n_c(a) n_c(b) - [a = b] n_c(a), ordered pairs of different members; None: not counted."""
    keep = [i for i, label in enumerate(labels) if label is not None]
    names = sorted({labels[i] for i in keep})
    column = {name: j for j, name in enumerate(names)}
    which = torch.tensor([column[labels[i]] for i in keep], dtype=torch.long)
    per_cluster = torch.zeros(n_clusters, len(names), dtype=torch.float64)  # n_c(a), exact
    per_cluster.index_put_((assignment[keep], which), torch.ones(len(keep), dtype=torch.float64),
                           accumulate=True)
    counts = per_cluster.T @ per_cluster - torch.diag(per_cluster.sum(0))
    return names, counts.round().long()


def interval_profile(names: list[str], counts: torch.Tensor) -> torch.Tensor:
    """Co-occurrence mass per interval (0..11 semitones) from the key's tonic (a pair's first label)
    to the chord's root (its second) -> (12,) summing to 1: Fig. 5's tonic 0, IV 5, V 7."""
    tonic = torch.tensor([pitch_class(n.split("/")[0]) for n in names])
    root = torch.tensor([pitch_class(n.split("/")[1]) for n in names])
    interval = (root[None, :] - tonic[:, None]) % 12        # (L, L): key of row, chord of column
    mass = torch.bincount(interval.flatten(), weights=counts.flatten().double(), minlength=12)
    return mass / mass.sum().clamp(min=1)


TONAL_INTERVALS = (0, 5, 7)     # chord root on the key's tonic, subdominant or dominant


def shuffled_labels(labels: list, groups: torch.Tensor | None, generator: torch.Generator) -> list:
    """The labelled entries permuted across all (groups None) or within each group; None stays."""
    group_of = groups.tolist() if groups is not None else [0] * len(labels)
    members = {}                                                        # group -> positions
    for i, label in enumerate(labels):
        if label is not None:
            members.setdefault(group_of[i], []).append(i)
    out = list(labels)
    for where in members.values():
        for i, j in zip(where, torch.randperm(len(where), generator=generator).tolist()):
            out[i] = labels[where[j]]
    return out


def cluster_statistics(x: torch.Tensor, labels: list, track: torch.Tensor, *, k: int, iters: int,
                       seed: int, shuffles: int = 0) -> dict:
    """k-means on x; the labels' co-occurrence counts, interval profile, tonal share (mass on
    TONAL_INTERVALS), share of pairs from one track; with shuffles > 0, the mean tonal share with
    labels shuffled across patches, within tracks (what cluster sizes, song identity alone give)."""
    _, assignment = kmeans(x, k, iters=iters, seed=seed)
    names, counts = cooccurrence(labels, assignment, k)
    profile = interval_profile(names, counts)
    track_labels = [t if label is not None else None for t, label in zip(track.tolist(), labels)]
    _, same = cooccurrence(track_labels, assignment, k)
    stats = {"names": names, "counts": counts, "interval_profile": profile.tolist(),
             "tonal_share": profile[list(TONAL_INTERVALS)].sum().item(),
             "same_track_pairs": (same.trace() / same.sum().clamp(min=1)).item(),
             "cluster_sizes": torch.bincount(assignment, minlength=k).tolist()}
    g = torch.Generator().manual_seed(seed)
    for what, groups in (("shuffled across patches", None), ("shuffled within tracks", track)):
        draws = [shuffled_labels(labels, groups, g) for _ in range(shuffles)]
        profiles = [interval_profile(*cooccurrence(d, assignment, k)) for d in draws]
        if profiles:
            stats[what] = float(np.mean([p[list(TONAL_INTERVALS)].sum().item() for p in profiles]))
    return stats


def top_combinations(names: list[str], counts: torch.Tensor, labels: list, top: int = 80):
    """Fig. 5's axes: the `top` most frequent labels, ordered by key and chord, and their counts."""

    def order(name):                # key tonic, mode, then chord root and family
        key, chord = name.split("/")
        return pitch_class(key), key.endswith("m"), pitch_class(chord), _split_root(chord)[1]

    frequent = collections.Counter(filter(None, labels)).most_common(top)
    chosen = sorted((name for name, _ in frequent), key=order)
    idx = torch.tensor([names.index(n) for n in chosen], dtype=torch.long)
    return chosen, counts[idx][:, idx]


def analyze_clusters(checkpoint, *, data=None, audio=None, split="test", labels=None, k=32,
                     iters=100, top=80, shuffles=5, out=None, cache=None, device=None, batch=16,
                     seed=0, layout=None, log=print, verbose=True) -> dict:
    """4.4 and Fig. 5 -> OUT/clusters.json, OUT/fig5.png: patches of the annotated mixes labelled
    "key/chord" ("E/B": a B chord in E major), pairs counted within k-means clusters; the tonal
    share beside shuffled labels and random weights (clusters of one song also raise it)."""
    model, device, _ = open_trained(checkpoint, device)
    index = lab_index(labels) if labels else None
    sources = mix_sources(data=data, audio=audio, split=split, cache=cache, cfg=model.config,
                          layout=layout, log=log, verbose=verbose)
    found = [(name, load, track_annotations(name, folder, index)) for name, folder, load in sources]
    annotated = [(name, load, *ann) for name, load, ann in found if ann is not None]
    missing = [name for name, _, ann in found if ann is None]
    if missing:
        log(f"{len(missing)} tracks without key and chord annotations skipped: "
            f"{', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if not annotated:
        where = (f"{labels}/<track>.keys.lab and .chords.lab" if labels
                 else "labels.json beside the stems")
        raise StemJEPAError(f"no track has key and chord annotations (looked for {where})")
    out = Path(out or Path(checkpoint).parent / ("clusters" if audio else f"clusters-{split}"))
    out.mkdir(parents=True, exist_ok=True)
    if verbose:
        log(f"embedding {len(annotated)} annotated mixes")
    x, patch_label, track = labelled_patches(model, annotated, device=device, batch=batch)
    n_labelled = sum(label is not None for label in patch_label)
    if n_labelled < 2:
        raise StemJEPAError(f"only {n_labelled} patches have both a key and a chord: "
                            "nothing to count")
    n_patches = len(x)
    log(f"k-means (k = {k}) on {n_patches} patches, {n_labelled} labelled")
    stats = cluster_statistics(x, patch_label, track, k=k, iters=iters, seed=seed,
                               shuffles=shuffles)
    del x                                       # P x 3840 floats: 2.6 GB for the Beatles' songs
    log("the same with random weights")
    x_rand = labelled_patches(random_twin(model, seed), annotated, device=device, batch=batch)[0]
    rand = cluster_statistics(x_rand, patch_label, track, k=k, iters=iters, seed=seed)
    chosen, block = top_combinations(stats["names"], stats["counts"], patch_label, top=top)
    result = {
        "checkpoint": str(checkpoint), "k": k, "tracks": len(annotated), "patches": n_patches,
        "labelled_patches": n_labelled, "combinations": len(stats["names"]),
        "tonal_intervals": list(TONAL_INTERVALS),
        "tonal_share": {"Stem-JEPA": stats["tonal_share"], "random weights": rand["tonal_share"],
                        **{w: v for w, v in stats.items() if w.startswith("shuffled")}},
        **{key: {"Stem-JEPA": stats[key], "random weights": rand[key]}
           for key in ("same_track_pairs", "interval_profile")},
        "cluster_sizes": stats["cluster_sizes"], "top": chosen, "matrix": block.tolist(),
        "definition": "counts[a][b]: ordered pairs of different patches in the same k-means "
                      "cluster, labelled a and b ('key/chord'), summed over clusters; tonal share: "
                      "fraction of those pairs where the root of b's chord is 0, 5 or 7 semitones "
                      "above the tonic of a's key"}
    _write_json(out / "clusters.json", result)
    plot_fig5(result, out / "fig5.png")
    log("tonal share of within-cluster pairs (chord root on the tonic, subdominant or dominant "
        "of the key):\n"
        + "\n".join(f"  {name:26s} {100 * v:5.1f} %" for name, v in result["tonal_share"].items()))
    log(f"pairs from the same track: {100 * stats['same_track_pairs']:.1f} % "
        f"(random weights {100 * rand['same_track_pairs']:.1f} %)")
    log(f"wrote {out / 'clusters.json'} and {out / 'fig5.png'}")
    return result


ROMAN = ["I", "bII", "II", "bIII", "III", "IV", "#IV", "V", "bVI", "VI", "bVII", "VII"]


def plot_fig5(result: dict, path) -> None:
    """Fig. 5: key/chord co-occurrence of the top combinations (log), and the interval profiles."""
    from matplotlib.figure import Figure        # not pyplot: leaves a notebook's backend alone
    fig = Figure(figsize=(11, 6))
    a, b = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    names = result["top"]
    a.imshow(np.log1p(np.array(result["matrix"], dtype=float)), cmap="viridis")
    size = min(7.0, max(3.0, 320 / max(len(names), 1)))            # 80 labels fit, at 4 pt
    a.set_xticks(range(len(names)), names, rotation=90, fontsize=size)
    a.set_yticks(range(len(names)), names, fontsize=size)
    a.set_title(f"key/chord co-occurrence within {result['k']} clusters (log)", fontsize=9)
    width = 0.8 / len(result["interval_profile"])
    for i, (name, profile) in enumerate(result["interval_profile"].items()):
        b.bar(np.arange(12) + i * width, profile, width=width, label=name)
    b.set_xticks(np.arange(12) + 0.4 - width / 2, ROMAN, fontsize=7)
    b.set(xlabel="chord root relative to the key", ylabel="share of within-cluster pairs")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# 4.5 Downstream probes on frozen embeddings (Table 3) ---------------------------------------------

def tempo_class(bpm: float) -> str:
    """Three equal tempo bins over the toy set's 80-160 BPM: slow, mid, fast."""
    if bpm < 80 + 80 / 3:
        return "slow"
    return "mid" if bpm < 80 + 160 / 3 else "fast"


def hold_out(splits: list[str], fraction: float, seed: int) -> list[str]:
    """A seeded random `fraction` of the train rows (at least one, leaving one) becomes "valid"."""
    train = [i for i, s in enumerate(splits) if s == "train"]
    n = min(max(1, round(fraction * len(train))), len(train) - 1)
    chosen = set(np.random.default_rng(seed).permutation(train)[:max(n, 0)].tolist())
    return ["valid" if i in chosen else s for i, s in enumerate(splits)]


def toy_probe_labels(data_dir, out_csv, task: str = "key", *, sample_rate=16000, seed=0) -> Path:
    """A toy-set probe task -> OUT_CSV (file, label, split: toy train/ -> train, 10 % of it valid;
    test/ -> test) and the float audio beside it: "key" (up to 24 classes) or "tempo"
    (`tempo_class`) of each song's mix, or "instrument" of each stem (NSynth's task)."""
    if task not in ("key", "tempo", "instrument"):
        raise StemJEPAError(f"toy probe task {task!r}: choose key, tempo or instrument")
    out_csv = Path(out_csv)
    clips = out_csv.parent / ("stems" if task == "instrument" else "mixes")
    clips.mkdir(parents=True, exist_ok=True)
    rows = []
    for split in ("train", "test"):
        for name, stems in find_tracks(data_dir, split):
            audio = {s: load_stem(sources, sample_rate) for s, sources in stems.items()}
            n = min(len(a) for a in audio.values())
            if task == "instrument":
                for s, a in audio.items():
                    sf.write(clips / f"{name}-{s}.wav", a, sample_rate, subtype="FLOAT")
                    rows.append([f"stems/{name}-{s}.wav", s, split])
                continue
            sf.write(clips / f"{name}.wav", np.sum([a[:n] for a in audio.values()], axis=0),
                     sample_rate, subtype="FLOAT")
            folder = Path(next(iter(stems.values()))[0][0]).parent
            labels = json.loads((folder / "labels.json").read_text())
            rows.append([f"mixes/{name}.wav",
                         labels["key"] if task == "key" else tempo_class(labels["tempo"]), split])
    splits = hold_out([r[2] for r in rows], 0.1, seed)
    rows = [[file, label, split] for (file, label, _), split in zip(rows, splits)]
    with open(out_csv, "w", newline="") as f:
        csv.writer(f).writerows([["file", "label", "split"], *rows])
    return out_csv


SPLIT_NAMES = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid",
               "test": "test"}


def read_probe_labels(path, audio_root, *, task: str,
                      seed=0) -> tuple[list[Path], list[list[str]], list[str]]:
    """CSV of file (from audio_root unless absolute), label (multilabel: ';'-separated) and split
    (train, valid, test; without valid, 10 % of train) -> (files, label lists, splits)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"file", "label", "split"} - set(reader.fieldnames or [])
        if missing:
            raise StemJEPAError(f"{path}: missing column(s) {', '.join(sorted(missing))}; "
                                "expected file,label,split")
        rows = list(reader)
    kept, problems = [], []
    for n, r in enumerate(rows, 2):
        file = Path(audio_root) / r["file"].strip()            # an absolute path stays as it is
        label = ([l.strip() for l in r["label"].split(";") if l.strip()] if task == "multilabel"
                 else [r["label"].strip()])
        split = SPLIT_NAMES.get(r["split"].strip().lower())
        if not file.exists():
            problems.append(f"line {n}: {file} does not exist")
        elif split is None:
            problems.append(f"line {n}: split {r['split']!r} is not train, valid or test")
        elif task == "multiclass" and (not label[0] or ";" in label[0]):
            problems.append(f"line {n}: multiclass needs exactly one label (got {r['label']!r}; "
                            "for several use --task multilabel)")
        else:
            kept.append((file, label, split))
    if problems:
        raise StemJEPAError(f"{path}: {len(problems)} bad rows:\n  " + "\n  ".join(problems[:10]))
    splits = [split for _, _, split in kept]
    if "valid" not in splits:
        splits = hold_out(splits, 0.1, seed)
    for s in ("train", "valid", "test"):
        if s not in splits:
            raise StemJEPAError(f"{path}: no {s} rows (and too few train rows to hold some out)")
    return [file for file, _, _ in kept], [label for _, label, _ in kept], splits


def encode_targets(labels: list[list[str]], classes: list[str], *, task: str) -> torch.Tensor:
    """Label lists -> class indices (N,) (multiclass) or multi-hot rows (N, C) (multilabel)."""
    if task == "multiclass":
        return torch.tensor([classes.index(l[0]) for l in labels], dtype=torch.long)
    multi_hot = [[float(c in row) for c in classes] for row in labels]
    return torch.tensor(multi_hot).view(len(labels), len(classes))


def global_embeddings(model: StemJEPA, files: list[Path], *, device="cpu", batch=16, group=8,
                      target=False) -> torch.Tensor:
    """4.5.1: "Each audio sample is processed by the frozen encoder, and its patch-wise outputs are
    concatenated and averaged along frequency and time dimensions to produce a 3840-dimensional
    global embedding" -> (n files, F*D). [code] The context encoder, as the authors' downstream
    wrapper loads only encoder.* weights; target=True: the EMA target encoder."""
    model = model.to(device).eval()
    rows = []
    for i in range(0, len(files), group):                       # `group` files share batches
        wavs = [load_audio(f, model.config.sample_rate) for f in files[i: i + group]]
        rows += [pool(z) for z in embed_long(model, wavs, target=target, batch=batch,
                                             device=device)]
    return torch.stack(rows).float()


class ProbeMLP(nn.Module):
    """"an MLP with 512 hidden units and a softmax layer" (4.5.1) -> logits (softmax: in the loss).
    Our choice: inputs standardised by train mean, std (buffers); raw ones are ~1/sqrt(3840)."""

    def __init__(self, *, dim: int, hidden: int, classes: int, mean: torch.Tensor,
                 std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):                                               # (B, dim) -> (B, classes)
        return self.net((x - self.mean) / self.std)


def probe_loss(logits: torch.Tensor, y: torch.Tensor, *, task: str) -> torch.Tensor:
    """Cross-entropy of the softmax (4.5.1); per-tag binary cross-entropy for multilabel tagging."""
    return (F.cross_entropy(logits, y) if task == "multiclass"
            else F.binary_cross_entropy_with_logits(logits, y))


def train_probe(x_train, y_train, x_valid, y_valid, *, task: str, n_classes=None, hidden=512,
                epochs=200, lr=1e-3, weight_decay=1e-2, batch=64, patience=20, seed=0,
                device="cpu") -> ProbeMLP:
    """AdamW-fit `ProbeMLP`, early-stopped at its best valid loss; seeded, global RNG untouched."""
    classes = (y_train.shape[1] if task == "multilabel"
               else n_classes or int(max(y_train.max(), y_valid.max())) + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        std = x_train.std(0).clamp(min=1e-6) if len(x_train) > 1 else torch.ones(x_train.shape[1])
        model = ProbeMLP(dim=x_train.shape[1], hidden=hidden, classes=classes, mean=x_train.mean(0),
                         std=std).to(device)
    x_train, y_train = x_train.to(device), y_train.to(device)
    x_valid, y_valid = x_valid.to(device), y_valid.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    order = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch = math.inf, copy.deepcopy(model.state_dict()), -1
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x_train), generator=order).split(batch):
            loss = probe_loss(model(x_train[idx.to(device)]), y_train[idx.to(device)], task=task)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            valid = probe_loss(model(x_valid), y_valid, task=task).item()
        if valid < best:
            best, best_state, best_epoch = valid, copy.deepcopy(model.state_dict()), epoch
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    return model.eval()


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of x (N,) in ascending order, tied values sharing the mean of their ranks."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()                                    # rank of the last copy
    return ((last - counts + 1 + last) / 2)[inverse]


def roc_auc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """ROC AUC: P(positive scores above negative), ties half (Mann-Whitney U); NaN if one class."""
    pos = targets.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return ((average_ranks(scores)[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """AP = sum_k (R_k - R_{k-1}) P_k over the distinct score thresholds k, highest first (recall
    and precision of "score >= k": tied scores enter together). NaN without a positive."""
    pos = targets.double()
    if pos.sum() == 0:
        return float("nan")
    values, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    tp = torch.bincount(inverse, weights=pos, minlength=len(values)).flip(0).cumsum(0)
    seen = torch.bincount(inverse, minlength=len(values)).flip(0).cumsum(0)
    recall = tp / pos.sum()
    precision = tp / seen
    return (torch.diff(recall, prepend=recall.new_zeros(1)) * precision).sum().item()


def macro(metric, scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """A per-class metric's mean over the classes (columns of (N, C)) with both -> (mean, count)."""
    values = [metric(scores[:, c], targets[:, c]) for c in range(targets.shape[1])
              if 0 < targets[:, c].sum() < len(targets)]
    return (float(np.mean(values)) if values else float("nan")), len(values)


KEY_LABEL = re.compile(r"(?:[Kk]ey\s+)?([A-G])([#b]*)\s*:?\s*((?i:major|minor|maj|min|m))?")


def parse_key_label(label: str):
    """A key class label ("Eb minor", "A:min", "F#", "Bbm") -> (tonic pitch class, minor?), or None.
    Stricter than `normalise_key`, so that other tasks' classes ("blues") are not keys."""
    m = KEY_LABEL.fullmatch(label.strip())
    if m is None:
        return None
    return pitch_class(m[1] + m[2]), (m[3] or "").lower() in ("minor", "min", "m")


def key_score(estimate: str, reference: str) -> float:
    """The MIREX weighted key score, Table 3's GiantSteps "Acc refined" (MARBLE's
    mir_eval.key.weighted_score, the same rules): a fifth below scores 0, as in mir_eval."""
    (e, e_minor), (r, r_minor) = parse_key_label(estimate), parse_key_label(reference)
    if (e, e_minor) == (r, r_minor):
        return 1.0
    if e_minor == r_minor and (e - r) % 12 == 7:                      # a fifth above
        return 0.5
    if e_minor != r_minor and (e - r) % 12 == (9 if e_minor else 3):  # A minor <-> C major
        return 0.3
    if e == r:                                                        # parallel
        return 0.2
    return 0.0


def refined_accuracy(predicted, truth, classes: list[str]) -> dict:
    """{"accuracy_refined": the predictions' mean `key_score`} if every class is a key, else {}."""
    if not classes or any(parse_key_label(c) is None for c in classes):
        return {}
    scores = [key_score(classes[p], classes[t]) for p, t in zip(predicted, truth)]
    return {"accuracy_refined": float(np.mean(scores))}


@torch.no_grad()
def probe_metrics(model: ProbeMLP, x: torch.Tensor, y: torch.Tensor, *, task: str,
                  classes=None) -> dict:
    """Table 3's metrics, as fractions: accuracy (multiclass; for a key task also accuracy_refined,
    the MIREX weighted score), or macro ROC-AUC and average precision over the tags."""
    logits = model(x.to(next(model.parameters()).device)).float().cpu()
    if task == "multiclass":
        return {"accuracy": (logits.argmax(1) == y).float().mean().item(),
                **refined_accuracy(logits.argmax(1).tolist(), y.tolist(), classes)}
    auc, scored = macro(roc_auc, logits, y)
    ap, _ = macro(average_precision, logits, y)
    return {"roc_auc": auc, "average_precision": ap, "classes_scored": scored}


def chance_probe_metrics(y_train: torch.Tensor, y_test: torch.Tensor, *, task: str,
                         classes=None) -> dict:
    """A model that ignores its input: the train set's majority class (and refined accuracy for a
    key task); for tagging, ROC-AUC 0.5 and, as AP, each tag's share of positives (chance AP)."""
    if task == "multiclass":
        majority = torch.bincount(y_train).argmax()
        return {"accuracy": (y_test == majority).float().mean().item(),
                **refined_accuracy([int(majority)] * len(y_test), y_test.tolist(), classes)}
    ap, scored = macro(lambda _, targets: targets.mean().item(), y_test, y_test)
    return {"roc_auc": 0.5, "average_precision": ap, "classes_scored": scored}


def probe(checkpoint, labels, *, audio=None, task="multiclass", encoder="context", out=None,
          device=None, batch=16, epochs=200, lr=1e-3, patience=20, seed=0, log=print,
          verbose=True) -> dict:
    """Table 3's protocol on one task: frozen global embeddings -> MLP probe fit on train, early-
    stopped on valid, scored on test; also random weights and chance. Writes OUT/probe.json."""
    if task not in ("multiclass", "multilabel"):
        raise StemJEPAError(f"--task {task}: choose multiclass or multilabel")
    if encoder not in ("context", "target"):
        raise StemJEPAError(f"--encoder {encoder}: choose context or target")
    model, device, _ = open_trained(checkpoint, device)
    audio_root = Path(audio) if audio else Path(labels).parent
    files, label_lists, splits = read_probe_labels(labels, audio_root, task=task, seed=seed)
    classes = sorted({l for row in label_lists for l in row})
    y = encode_targets(label_lists, classes, task=task)
    part = {s: torch.tensor([i for i, x in enumerate(splits) if x == s], dtype=torch.long)
            for s in ("train", "valid", "test")}
    results = {"checkpoint": str(checkpoint), "labels": str(labels), "task": task,
               "encoder": encoder, "classes": classes, "n": {s: len(i) for s, i in part.items()},
               "rows": {}}
    for name, m in {"Stem-JEPA": model, "random weights": random_twin(model, seed)}.items():
        if verbose:
            log(f"embedding {len(files)} files ({name}, {encoder} encoder)")
        x = global_embeddings(m, files, device=device, batch=batch, target=encoder == "target")
        clf = train_probe(x[part["train"]], y[part["train"]], x[part["valid"]], y[part["valid"]],
                          task=task, n_classes=len(classes), epochs=epochs, lr=lr,
                          patience=patience, seed=seed, device=device)
        results["rows"][name] = probe_metrics(clf, x[part["test"]], y[part["test"]], task=task,
                                              classes=classes)
    results["rows"]["chance"] = chance_probe_metrics(y[part["train"]], y[part["test"]], task=task,
                                                     classes=classes)
    out = Path(out or Path(checkpoint).parent / "probe")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "probe.json", results)
    log(format_probe_table(results))
    log(f"wrote {out / 'probe.json'}")
    return results


def format_probe_table(results: dict) -> str:
    """Table 3's layout: one row per encoder, metrics in percent (accuracy_refined: key tasks)."""
    metrics = ["accuracy"] if results["task"] == "multiclass" else ["roc_auc", "average_precision"]
    metrics += ["accuracy_refined"] if "accuracy_refined" in results["rows"]["chance"] else []
    n = results["n"]
    lines = [f"probe ({results['task']}, {len(results['classes'])} classes; "
             f"{n['train']} train, {n['valid']} valid, {n['test']} test)",
             f"{'encoder':20s}" + "".join(f" {m:>18s}" for m in metrics)]
    for name, row in results["rows"].items():
        lines.append(f"{name:20s}" + "".join(f" {100 * row[m]:18.1f}" for m in metrics))
    return "\n".join(lines)


# Using a trained model: retrieve, score, embed, any length, the HEAR API --------------------------

def audio_files(path) -> list[Path]:
    """The audio files of a file or a folder (recursively, skipping hidden folders), sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise StemJEPAError(f"{path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise StemJEPAError(f"{path} holds no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    return files


def embed_audio_files(model: StemJEPA, files: list[Path], *, keep=pool, device="cpu", batch=16,
                      group=8, log=print, verbose=True) -> tuple[list[Path], list]:
    """(readable files in the given order, keep(z) of each one's target embeddings z (F, T, D)).
    Unreadable files are reported and skipped; embedded `group` at a time, shortest first."""
    seconds = {}
    for f in files:
        try:
            seconds[f] = sf.info(str(f)).duration
        except Exception:                       # unreadable: decoding below will say why
            seconds[f] = 0.0
    order = sorted(files, key=lambda f: seconds[f])
    total, done = sum(seconds.values()), 0.0                            # seconds of audio
    t0 = t_log = time.time()
    results, skipped = {}, []
    for i in range(0, len(order), group):
        loaded = []
        for f in order[i: i + group]:
            try:
                loaded.append((f, load_audio(f, model.config.sample_rate)))
            except StemJEPAError as e:
                skipped.append(str(e))
                log(f"skipped {e}")
        zs = embed_long(model, [x for _, x in loaded], batch=batch, device=device)
        results.update((f, keep(z)) for (f, _), z in zip(loaded, zs))
        done += sum(seconds[f] for f in order[i: i + group])
        n = min(i + group, len(order))
        rate = done / max(time.time() - t0, 1e-9)
        if verbose and (time.time() - t_log > 10 or n == len(order)):
            t_log = time.time()
            log(f"embedded {n}/{len(order)} files ({len(skipped)} skipped), {rate:.0f} s of audio "
                f"per s, ETA {(total - done) / max(rate, 1e-9):.0f} s")
    if not results:
        raise StemJEPAError(f"none of the {len(files)} audio files could be read: "
                            + "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else ""))
    kept = [f for f in files if f in results]
    return kept, [results[f] for f in kept]


def _instrument_option(model: StemJEPA, instrument) -> int:
    """The id of --instrument; a name the model does not know is an error naming the option and
    listing the known ones (retrieve and score check it before decoding anything)."""
    if isinstance(instrument, str) and instrument not in model.instruments:
        raise StemJEPAError(f"--instrument {instrument}: the model knows "
                            f"{', '.join(model.instruments)}")
    return model.instrument_id(instrument)


def retrieve(checkpoint, mix, library, instrument: str, *, top=10, device=None, batch=16,
             log=print, verbose=True) -> list[dict]:
    """Rank a library's readable audio files by fit to `mix` as `instrument` (4.1: L2 of pooled
    prediction and target embeddings) and the `top` ones' best offsets; cache beside the library."""
    model, device, _ = open_trained(checkpoint, device)
    cfg = model.config
    instrument_id = _instrument_option(model, instrument)
    files = audio_files(library)
    mix_audio = load_audio(mix, cfg.sample_rate)  # a bad --mix fails before the library is embedded
    key = _cache_key(_file_id(Path(checkpoint).resolve()), "files+refs", list(map(_file_id, files)))
    cache = (Path(library) if Path(library).is_dir() else Path(library).parent) / ".stem_jepa_cache"
    cache_file = cache / f"library-{key}.pt"
    if cache_file.exists():
        cached = torch.load(cache_file, weights_only=True)
    else:
        if verbose:
            log(f"embedding {len(files)} library files")
        kept, refs = embed_audio_files(model, files, device=device, batch=batch, log=log,
                                       verbose=verbose)
        cached = {"files": [str(f) for f in kept], "refs": torch.stack(refs)}
        cache.mkdir(exist_ok=True)
        _write_atomic(cache_file, lambda p: torch.save(cached, p))
    q_seq = model.predict_long(mix_audio, instrument_id, batch=batch)
    d = torch.cdist(pool(q_seq)[None].double(), cached["refs"].double())[0]
    results = []
    for r, i in enumerate(d.argsort()[:top].tolist()):
        file = cached["files"][i]
        z_seq = model.encode_long(load_audio(file, cfg.sample_rate), batch=batch)
        offset = best_offset(frames(z_seq), frames(q_seq))
        results.append({"rank": r + 1, "file": file, "distance": round(d[i].item(), 4),
                        "offset_patches": offset,
                        "offset_s": round(offset * patch_seconds(cfg), 2)})
    return results


def score(checkpoint, mix, stem, instrument: str, *, device=None, batch=16) -> dict:
    """StemJEPA.score for two audio files: how well `stem` fits `mix` as `instrument`, and where."""
    model, _, _ = open_trained(checkpoint, device)
    _instrument_option(model, instrument)
    sr = model.config.sample_rate
    return {"mix": str(mix), "stem": str(stem), "instrument": instrument,
            **model.score(load_audio(mix, sr), load_audio(stem, sr), instrument, batch=batch)}


def embed_files(checkpoint, audio, out, *, sequences=False, device=None, batch=16,
                log=print, verbose=True) -> np.ndarray:
    """Readable files' pooled 3840-d target embeddings (4.1's references; 4.5 probes the context
    encoder) -> OUT (.npy rows), OUT.txt (paths); `sequences`: OUT.sequences.npz, (T, 3840) each."""
    model, device, _ = open_trained(checkpoint, device)
    files = audio_files(audio)
    kept, embedded = embed_audio_files(model, files, device=device, batch=batch, log=log,
                                       verbose=verbose,
                                       keep=lambda z: (pool(z).numpy(), frames(z).numpy()))
    rows = np.stack([row for row, _ in embedded])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, rows)
    out.with_suffix(".txt").write_text("".join(f"{f}\n" for f in kept))
    if sequences:
        np.savez(out.with_suffix(".sequences.npz"),
                 **{f"file{k}": seq for k, (_, seq) in enumerate(embedded)})
    skipped = len(files) - len(kept)
    log(f"wrote {len(kept)} embeddings of {rows.shape[1]} dims to {out}"
        + (f" ({skipped} unreadable files skipped)" if skipped else ""))
    return rows


class HEARModel(nn.Module):
    """A trained Stem-JEPA as HEAR expects it: sample_rate, scene_embedding_size and
    timestamp_embedding_size (both F*D: 3840 for ViT-B)."""

    def __init__(self, model: StemJEPA):
        super().__init__()
        self.model = model.eval()
        cfg = model.config
        self.sample_rate = cfg.sample_rate
        self.scene_embedding_size = (cfg.n_mels // cfg.patch_size) * cfg.dim
        self.timestamp_embedding_size = self.scene_embedding_size


def load_model(model_file_path: str = "", device=None) -> HEARModel:
    """HEAR: a checkpoint written by `train` -> the model get_*_embeddings take."""
    if not model_file_path:
        raise StemJEPAError("load_model needs the path of a checkpoint written by `train`")
    return HEARModel(open_trained(model_file_path, device)[0])


def _hear_patches(audio: torch.Tensor, model: HEARModel, batch: int) -> list[torch.Tensor]:
    """Each sound of a HEAR batch (n, N) -> its target-encoder patch embeddings (F, T, D)."""
    if audio.ndim != 2:
        raise StemJEPAError(f"HEAR audio is (n_sounds, n_samples); got shape {tuple(audio.shape)}")
    jepa = model.model
    return embed_long(jepa, list(audio.detach().float().cpu().numpy()), batch=batch,
                      device=next(jepa.parameters()).device)


def get_timestamp_embeddings(audio: torch.Tensor, model: HEARModel,
                             batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """HEAR: audio (n, N) at model.sample_rate -> target `frames` (n, T, F*D) and their centres
    (n, T) in ms; each sound embedded on its own (as `embed_long`), independent of the batch."""
    emb = torch.stack([frames(z) for z in _hear_patches(audio, model, batch)])  # (n, T, F*D)
    patch_ms = 1000 * patch_seconds(model.model.config)
    ts = ((torch.arange(emb.shape[1]) + 0.5) * patch_ms).float().expand(len(emb), -1)  # (n, T)
    return emb.to(audio.device), ts.contiguous().to(audio.device)


def get_scene_embeddings(audio: torch.Tensor, model: HEARModel, batch: int = 16) -> torch.Tensor:
    """HEAR: audio (n, N) -> `pool` of each sound's target embeddings (n, F*D), as in 4.5."""
    return torch.stack([pool(z) for z in _hear_patches(audio, model, batch)]).to(audio.device)


# Performance: `bench` measures the machine's peak and how close the training step gets to it ------

def _timed(fn, device) -> float:
    """Wall time of one fn() call, from a synchronised device until its work is done."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def _median_time(fn, device, *, warmup: int, repeats: int) -> float:
    """Median wall time of fn() after warm-up calls (compilation, allocator and cache warm-up)."""
    for _ in range(warmup):
        fn()
    return float(np.median([_timed(fn, device) for _ in range(repeats)]))


def matmul_peak(device: torch.device, dtype=torch.float32) -> float:
    """Practical peak FLOP/s: the best of several large square torch.mm (2 n^3 FLOPs each)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)                              # warm-up
    return 2 * n ** 3 / min(_timed(lambda: torch.mm(a, b), device) for _ in range(8))


def train_flops_per_sample(cfg: Config) -> float:
    """FLOPs of one training sample, counted from the shapes: a matmul (n x k)(k x m) is 2nkm;
    backward costs twice the forward. Context encoder and predictor: forward + backward (3x);
    target encoder: forward only (1x). Front-end, norms and softmax are left out (< 1 %)."""
    T = chunk_samples(cfg) // cfg.hop_length // cfg.patch_size        # time patches
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


def obvious_step(cfg: Config, device, context, target, instrument):
    """`bench --baseline`'s yardstick, the same step built the obvious way (a no-argument function):
    nn.TransformerEncoder, learned positions, EMA by mul_, add_, mel rebuilt, .item() each step."""
    D = cfg.dim
    frames = chunk_samples(cfg) // cfg.hop_length
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
    embedding = nn.Embedding(len(TOY_STEMS), D).to(device)
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
        loss = jepa_loss(pred, t)
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
          baseline=False, precision="auto", **overrides) -> dict:
    """Peak matmul FLOP/s, the training step (samples/s, FLOP/s, MFU), one loader worker (chunks/s,
    warm cache), evaluation speed, peak memory. precision: the step's (`pick_precision`); MFU
    divides by the peak of its matmuls. overrides: Config fields (`make_config`)."""
    import resource
    import tempfile
    device = pick_device(device)
    precision = pick_precision(precision, device)
    cfg = make_config(preset, batch_size=batch_size, **overrides)
    cpu = f"{device.type}, {torch.get_num_threads()} threads"
    r = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
         "preset": preset, "batch_size": batch_size, "precision": precision, "compile": compile}
    r["peak_fp32_flops"] = matmul_peak(device)
    if precision != "fp32":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        r[f"peak_{precision}_flops"] = matmul_peak(device, dtype)

    # the training step, front-end to EMA update, on random waveforms
    torch.manual_seed(0)
    model = build_model(cfg, list(TOY_STEMS)).to(device)
    groups = param_groups(model, cfg.weight_decay, decay_all=cfg.weight_decay_all)
    optimizer = torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2),
                                  fused=device.type in ("cuda", "cpu"))
    loss_fn = torch.compile(model) if compile else model
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    n = chunk_samples(cfg)
    context, target = (0.1 * torch.randn(batch_size, n, device=device) for _ in range(2))
    instrument = torch.arange(batch_size, device=device) % len(TOY_STEMS)
    step = functools.partial(training_step, model, optimizer, context, target, instrument,
                             lr=1e-4, tau=0.999, grad_clip=cfg.grad_clip, loss_fn=loss_fn,
                             precision=precision, scaler=scaler)
    r["step_s"] = _median_time(step, device, warmup=3 if compile else 2, repeats=steps)
    r["samples_per_s"] = batch_size / r["step_s"]
    r["flops_per_sample"] = train_flops_per_sample(cfg)
    r["achieved_flops"] = r["flops_per_sample"] * r["samples_per_s"]
    r["mfu"] = r["achieved_flops"] / r[f"peak_{precision}_flops"]
    if baseline:
        del optimizer, step                     # free its state before the baseline's
        step = obvious_step(cfg, device, context, target, instrument)
        r["baseline_samples_per_s"] = batch_size / _median_time(step, device, warmup=2,
                                                                repeats=steps)

    # evaluation: seconds of audio embedded per second by the target encoder
    audio = np.random.default_rng(0).normal(0, 0.1, 4 * 60 * cfg.sample_rate).astype(np.float32)
    seconds = _timed(lambda: embed_long(model, [audio], batch=16, device=device), device)
    r["eval_audio_s_per_s"] = len(audio) / cfg.sample_rate / seconds

    # the data pipeline: one loader worker, from a warm cache
    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            data = write_toy_dataset(Path(tmp) / "toy", tracks=10, seconds=30.0)
        tracks = prepare(data, "train", cache=Path(tmp) / "cache", log=_quiet,
                         **prepare_options(cfg))
        dataset = StemChunks(tracks, sorted({s for t in tracks for s in t["stems"]}), chunk=n,
                             threshold=cfg.active_threshold, tries=cfg.redraw_tries, seed=0)
        batches, per_batch = 40, 32
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=StepBatches(start=0, steps=batches, batch=per_batch),
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


# Command line -------------------------------------------------------------------------------------

def _add_train_options(p, exclude=()):
    """One option per Config field (--batch-size: batch_size) with the field's help (`option`)."""
    p.add_argument("--preset", choices=list(PRESETS), default="paper",
                   help="paper (GPU) or tiny (CPU, minutes)")
    for f in [f for f in dataclasses.fields(Config) if f.name not in exclude]:
        kind = (dict(action=argparse.BooleanOptionalAction) if f.type == "bool"
                else dict(type={"int": int, "float": float, "str": str}[f.type]))
        p.add_argument("--" + f.name.replace("_", "-"), help=f.metadata.get("help", ""), **kind)
    p.add_argument("--lr", type=float, dest="base_lr", help="the same as --base-lr")


def _add_shared_options(p, *names):
    """The options several commands share, by name."""
    shared = {"checkpoint": dict(required=True, help="a run's checkpoint.pt"),
              "device": dict(help="cuda, cuda:N, mps or cpu (default: the best available)"),
              "mix": dict(required=True, help="audio file of the mix"),
              "instrument": dict(required=True, help="the stem's instrument (e.g. bass)"),
              "json": dict(action="store_true", help="print JSON instead of text"),
              "batch": dict(type=int, default=16, help="chunks encoded at once"),
              "cache": dict(help="where decoded 16 kHz stems go (default DATA/.stem_jepa_cache)"),
              "seed": dict(type=int, default=0),
              "precision": dict(choices=PRECISIONS, default="auto",
                                help="autocast on CUDA: auto is bf16 where the GPU has it, else "
                                     "fp16 with loss scaling; fp32 off CUDA"),
              "channels": dict(help="one multichannel file per track: the names of its channels, "
                                    "e.g. bass,drums,other,vocals (mix or mixture: left out)"),
              "groups": dict(help="Slakh2100 classes (or MoisesDB stems) per instrument, e.g. "
                                  "'bass=Bass;drums=Drums;other=*' (the default for Slakh2100)")}
    for name in names:
        p.add_argument("--" + name, **shared[name])


def _layout_from(args) -> dict:
    channels = [c.strip() for c in args.channels.split(",")] if args.channels else None
    return {"channels": channels, "groups": parse_groups(args.groups) if args.groups else None}


def _config_overrides(args) -> dict:
    """The Config fields given on the command line (the others are None: the preset's)."""
    return {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Config)}


def _config_from(args) -> Config:
    return make_config(args.preset, **_config_overrides(args))


def _keywords(args, fn) -> dict:
    """The command line's values that fn takes, by name: a command's options are named as the
    parameters of the function it calls (--max-shift-s: max_shift_s)."""
    parameters = inspect.signature(fn).parameters
    return {name: value for name, value in vars(args).items() if name in parameters}


def cmd_toy(args):
    write_toy_dataset(**_keywords(args, write_toy_dataset))
    print(f"wrote {args.tracks} toy songs of {args.seconds:g} s to {args.out}")


def cmd_train(args):
    run = train(_config_from(args), layout=_layout_from(args), **_keywords(args, train))
    if run.interrupted:
        sys.exit(128 + signal.Signals[run.interrupted].value)


def cmd_export(args):
    print(f"wrote {save_weights(**_keywords(args, save_weights))}")


def cmd_demo(args):
    data, out = Path(args.dir) / "toy", Path(args.dir) / "run"
    if not (data / "train").is_dir():
        print(f"writing {args.tracks} toy songs to {data}")
        write_toy_dataset(data, tracks=args.tracks, seconds=30.0, seed=0)
    train(make_config("tiny", steps=args.steps), data, out=out, device=args.device, resume=True)
    rows = list(csv.DictReader(open(out / "log.csv")))
    first, last = rows[0], rows[-1]
    print(f"\nloss {float(first['loss']):.3f} (step {first['step']}) -> {float(last['loss']):.3f} "
          f"(step {last['step']}); checkpoint in {out / 'checkpoint.pt'}\n")
    evaluate(out / "checkpoint.pt", data, split="test", device=args.device)


def cmd_evaluate(args):
    evaluate(layout=_layout_from(args), **_keywords(args, evaluate))


def cmd_retrieve(args):
    results = retrieve(log=_quiet if args.json else print, **_keywords(args, retrieve))
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"{'rank':>4s}  {'distance':>8s}  {'offset':>8s}  file")
    for r in results:
        print(f"{r['rank']:4d}  {r['distance']:8.4f}  {r['offset_s']:7.2f}s  {r['file']}")


def cmd_score(args):
    r = score(**_keywords(args, score))
    if args.json:
        print(json.dumps(r, indent=1))
        return
    print(f"distance {r['distance']:.4f} (0 to 2, lower fits better), "
          f"similarity {r['similarity']:.4f}; best offset {r['offset_s']:+.2f} s "
          "(start the stem this long after the start of the mix)")


def cmd_embed(args):
    embed_files(**_keywords(args, embed_files))


def cmd_analyze(args):
    analyze = analyze_alignment if args.analysis == "align" else analyze_clusters
    analyze(layout=_layout_from(args), **_keywords(args, analyze))


def cmd_probe(args):
    probe(**_keywords(args, probe))


def cmd_bench(args):
    overrides = {k: v for k, v in _config_overrides(args).items()
                 if k not in ("steps", "batch_size")}   # bench's --steps: the timed steps
    r = bench(**_keywords(args, bench), **overrides)
    print(format_bench(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="stem_jepa.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("toy", help="write procedural multitrack songs in the MUSDB18-HQ layout")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tracks", type=int, default=20, help="number of songs (20 %% go to test/)")
    p.add_argument("--seconds", type=float, default=30.0, help="length of each song")
    _add_shared_options(p, "seed")

    p = sub.add_parser("train", help="train Stem-JEPA on a multitrack folder")
    p.add_argument("--data", required=True, help="MUSDB18(-HQ) root or a folder of track folders")
    p.add_argument("--out", default="runs/stem-jepa", help="run folder: checkpoint.pt and log.csv")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--force", action="store_true",
                   help="resume despite harmless changes (e.g. --steps)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--workers", type=int, help="loader processes (default: half the cores, max 8)")
    p.add_argument("--stop-at", type=int, help="save and exit at this step; --resume continues")
    p.add_argument("--init-from", metavar="CKPT", help="a new run starting from this checkpoint's "
                   "encoders and predictor (fresh optimizer and schedules)")
    _add_shared_options(p, "cache", "device", "channels", "groups", "precision")
    _add_train_options(p)

    p = sub.add_parser("evaluate", help="stem retrieval (Table 1, Fig. 2) with comparison rows")
    p.add_argument("--data", required=True, help="dataset root (as for train)")
    p.add_argument("--split", default="test",
                   help="train, test, or all: both together, as Table 1 (MUSDB18: 600 references)")
    p.add_argument("--out", help="output folder (default: beside the checkpoint, eval-SPLIT)")
    p.add_argument("--listening", type=int, default=0, help="also write N listening trials (4.2)")
    _add_shared_options(p, "checkpoint", "cache", "device", "batch", "seed", "channels", "groups")

    p = sub.add_parser("retrieve", help="rank the stems of a library by how well they fit a mix")
    p.add_argument("--library", required=True, help="folder of candidate stems (any audio files)")
    p.add_argument("--top", type=int, default=10)
    _add_shared_options(p, "instrument", "json", "checkpoint", "mix", "device", "batch")

    p = sub.add_parser("score", help="how well one stem fits one mix as an instrument, and where")
    p.add_argument("--stem", required=True, help="audio file of the candidate stem")
    _add_shared_options(p, "instrument", "json", "checkpoint", "mix", "device")

    p = sub.add_parser("embed", help="3840-d embeddings of audio files, for other uses")
    p.add_argument("--audio", required=True, help="an audio file or a folder")
    p.add_argument("--out", required=True, help="FILE.npy (a row per file; the files in FILE.txt)")
    p.add_argument("--sequences", action="store_true",
                   help="also FILE.sequences.npz: one vector per 160 ms")
    _add_shared_options(p, "checkpoint", "device", "batch")

    p = sub.add_parser("analyze", help="stem alignment (4.3) and musical plausibility (4.4)")
    kinds = p.add_subparsers(dest="analysis", required=True)
    a = kinds.add_parser("align", help="Eq. 3: target patches against shifted predictions (Fig. 4)")
    a.add_argument("--data", required=True, help="multitrack dataset root (as for train)")
    a.add_argument("--tracks", type=int, help="first K tracks only (default: all; Fig. 4 draws 8)")
    a.add_argument("--max-shift-s", type=float, default=10.0, help="largest shift, in seconds")
    c = kinds.add_parser("clusters", help="k-means on patches, key/chord co-occurrence (Fig. 5)")
    source = c.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="multitrack root: the mix of each track's stems is embedded")
    source.add_argument("--audio",
                        help="folder of full mixes (e.g. the Beatles), named as their .lab files")
    c.add_argument("--labels", help="folder of NAME.keys.lab and NAME.chords.lab files, or "
                   "Isophonics' keylab/, chordlab/ tree (default: each track's labels.json)")
    c.add_argument("--k", type=int, default=32, help="k-means clusters")
    c.add_argument("--iters", type=int, default=100, help="k-means iterations at most")
    c.add_argument("--top", type=int, default=80, help="key/chord combinations shown in fig5.png")
    c.add_argument("--shuffles", type=int, default=5, help="label shuffles for the chance level")
    _add_shared_options(c, "seed")
    for q in (a, c):
        q.add_argument("--split", default="test", help="split (with --data): train, test or all")
        q.add_argument("--out", help="output folder (default: beside the checkpoint)")
        _add_shared_options(q, "checkpoint", "cache", "device", "batch", "channels", "groups")

    p = sub.add_parser("probe", help="frozen-embedding probe (4.5, Table 3), with random weights")
    p.add_argument("--labels", required=True, help="CSV: file,label,split (train/valid/test)")
    p.add_argument("--audio", help="root of the CSV's relative paths (default: the CSV's folder)")
    p.add_argument("--task", choices=["multiclass", "multilabel"], default="multiclass",
                   help="one label per file (accuracy), or ';'-separated tags (ROC-AUC, AP)")
    p.add_argument("--encoder", choices=["context", "target"], default="context",
                   help="frozen encoder to probe: context (authors' downstream code) or EMA target")
    p.add_argument("--out", help="output folder (default: beside the checkpoint, probe/)")
    p.add_argument("--epochs", type=int, default=200, help="at most; early stopping on valid")
    p.add_argument("--patience", type=int, default=20, help="early-stopping patience, in epochs")
    p.add_argument("--lr", type=float, default=1e-3)
    _add_shared_options(p, "checkpoint", "device", "batch", "seed")

    p = sub.add_parser("bench", help="measure peak FLOP/s, training step, loader and evaluation")
    p.set_defaults(batch_size=2)                        # a batch of 2 unless --batch-size
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after warm-up)")
    p.add_argument("--data", help="dataset for the loader measurement (default: 10 toy songs)")
    p.add_argument("--baseline", action="store_true", help="also time a step built the obvious way")
    p.add_argument("--json", help="also write the numbers to this file")
    _add_shared_options(p, "device", "precision")
    _add_train_options(p, exclude=("steps",))

    p = sub.add_parser("export", help="a checkpoint's weights in float16, to share a model")
    _add_shared_options(p, "checkpoint")
    p.add_argument("--out", required=True, help="the weights file to write")

    p = sub.add_parser("demo", help="toy data + the tiny preset on this machine, end to end")
    p.add_argument("--dir", default="demo", help="folder for the toy data and the run")
    p.add_argument("--tracks", type=int, default=40)
    p.add_argument("--steps", type=int, default=300)
    _add_shared_options(p, "device")

    args = parser.parse_args(argv)
    commands = {"toy": cmd_toy, "train": cmd_train, "evaluate": cmd_evaluate,
                "retrieve": cmd_retrieve, "score": cmd_score, "embed": cmd_embed,
                "analyze": cmd_analyze, "probe": cmd_probe, "bench": cmd_bench,
                "export": cmd_export, "demo": cmd_demo}
    try:
        commands[args.command](args)
    except StemJEPAError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
