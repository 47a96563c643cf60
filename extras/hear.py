"""The HEAR API (https://hearbenchmark.com) for a trained Stem-JEPA: the frozen target encoder's
embeddings of any sound, the paper's 4.5 (downstream tasks on frozen embeddings) on HEAR's tasks.

    from extras import hear
    model = hear.load_model("runs/musdb/checkpoint.pt")
    emb, ts = hear.get_timestamp_embeddings(audio, model)   # (n, T, F*D) float32, (n, T) in ms
    scene = hear.get_scene_embeddings(audio, model)          # (n, F*D) float32

From the repository root (the validator imports the module by name, so the root must be on the
path): PYTHONPATH=. hear-validator extras.hear --model runs/musdb/checkpoint.pt

One embedding per 160 ms patch, F*D wide (5 frequency rows x 768 = 3840 for ViT-B); a scene
embedding is `stem_jepa.pool` of the patches. Each sound is embedded on its own, whatever the
batch holds (no batch statistics).
"""
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import stem_jepa as sj  # noqa: E402


class HEARModel(nn.Module):
    """A trained Stem-JEPA with what HEAR reads: sample_rate, scene_embedding_size and
    timestamp_embedding_size (both F*D). `.to(device)` moves the model."""

    def __init__(self, model: sj.StemJEPA):
        super().__init__()
        self.model = model.eval()
        cfg = model.config
        self.sample_rate = cfg.sample_rate
        self.scene_embedding_size = (cfg.n_mels // cfg.patch_size) * cfg.dim
        self.timestamp_embedding_size = self.scene_embedding_size
        self.patch_ms = 1000 * cfg.hop_length * cfg.patch_size / cfg.sample_rate   # 160 ms


def load_model(model_file_path: str = "", device=None) -> HEARModel:
    """A checkpoint written by `train` -> the model get_*_embeddings take."""
    if not model_file_path:
        raise sj.StemJEPAError("load_model needs the path of a checkpoint written by `train`")
    return HEARModel(sj.StemJEPA.from_checkpoint(model_file_path).to(sj.pick_device(device)))


def _patches(audio: torch.Tensor, model: HEARModel, batch: int) -> list[torch.Tensor]:
    """Each sound of a HEAR batch (n, N) -> its target-encoder patch embeddings (F, T, D)."""
    if audio.ndim != 2:
        raise sj.StemJEPAError(f"HEAR audio is (n_sounds, n_samples); got {tuple(audio.shape)}")
    jepa = model.model
    return sj.embed_long(jepa, list(audio.detach().float().cpu().numpy()), batch=batch,
                         device=next(jepa.parameters()).device)


def get_timestamp_embeddings(audio: torch.Tensor, model: HEARModel,
                             batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """audio (n, N) at model.sample_rate -> embeddings (n, T, F*D), one per patch (`frames`),
    and timestamps (n, T): the patch centres in ms, every 160 ms. The last patch is zero-padded
    past the end of the sound; it is kept only when its centre lies within the sound (HEAR wants
    no timestamp past the end), so T = max(1, floor(N / 2560 + 1/2))."""
    emb = torch.stack([sj.frames(z) for z in _patches(audio, model, batch)])   # (n, T, F*D)
    duration_ms = 1000 * audio.shape[1] / model.sample_rate
    centres = (torch.arange(emb.shape[1]) + 0.5) * model.patch_ms
    keep = max(1, int((centres <= duration_ms).sum()))
    ts = centres[:keep].float().expand(len(emb), -1).contiguous()              # (n, T)
    return emb[:, :keep].float().to(audio.device), ts.to(audio.device)


def get_scene_embeddings(audio: torch.Tensor, model: HEARModel, batch: int = 16) -> torch.Tensor:
    """audio (n, N) -> (n, F*D): `pool` of each sound's patch embeddings, as retrieval (4.1)."""
    return torch.stack([sj.pool(z) for z in _patches(audio, model, batch)]).float().to(audio.device)
