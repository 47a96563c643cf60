"""Stem search for producers: rank a library of stems by how well each fits a mix, score one
stem against one mix, or export embeddings for other tools.

The paper's 4.1 (retrieval: the L2 distance between the pooled prediction for a mix and a
stem's pooled target embedding, lower fits better) and 4.3 (Eq. 3: where a stem fits best in
time, `best_offset`), applied to any audio files rather than to MUSDB18's test songs.

    python extras/search.py retrieve --checkpoint CKPT --mix mix.wav --library stems/ \\
        --instrument bass [--top 10] [--json] [--device cuda] [--batch 16]
    python extras/search.py score --checkpoint CKPT --mix mix.wav --stem bass.wav \\
        --instrument bass [--json]
    python extras/search.py embed --checkpoint CKPT --audio DIR_OR_FILE --out emb.npy [--sequences]

The library's embeddings are cached in LIBRARY/.stem_jepa_cache/library-<key>.pt, the key
made of the checkpoint file and the library files (path, size, modification time): a second
search of an unchanged library embeds only the mix.
"""
import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import stem_jepa as sj  # noqa: E402


def shift_similarity(z: torch.Tensor, q: torch.Tensor, shifts, circular: bool = True):
    """Eq. 3, s(z, q, j) = 1/(MS) sum_s sum_i <z_s[i], q_s[(i + j) % M]>, for one stem (S = 1)
    at each shift j: z, q (T, C) one vector per time patch (`sj.frames`), normalised here; M = T.
    circular=False (sequences of different lengths): the mean over the overlapping patches."""
    sims = F.normalize(z.float(), dim=-1) @ F.normalize(q.float(), dim=-1).T   # (T, T')
    i = torch.arange(sims.shape[0])
    out = []
    for j in shifts:
        k = (i + j) % sims.shape[1] if circular else i + j
        ok = (k >= 0) & (k < sims.shape[1])
        out.append(sims[i[ok], k[ok]].mean() if ok.any() else torch.tensor(float("nan")))
    return torch.stack(out)


def best_offset(stem: torch.Tensor, prediction: torch.Tensor, min_overlap: float = 0.5) -> int:
    """The shift j (time patches) at which a stem (T, C) best matches a mix's prediction (T', C):
    the stem starts j patches into the mix. Shifts sharing < min_overlap of the shorter are out."""
    T, Tq = len(stem), len(prediction)
    need = max(1, int(min_overlap * min(T, Tq)))
    shifts = list(range(-(T - need), Tq - need + 1))
    return shifts[int(shift_similarity(stem, prediction, shifts, circular=False).argmax())]


def audio_files(path) -> list[Path]:
    """The audio files of a file or a folder (recursively, skipping hidden folders), sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise sj.StemJEPAError(f"{path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in sj.AUDIO_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise sj.StemJEPAError(f"{path} holds no audio files ({', '.join(sj.AUDIO_EXTENSIONS)})")
    return files


def embed_audio_files(model: sj.StemJEPA, files: list[Path], *, keep=sj.pool, device="cpu",
                      batch=16, group=8, log=print) -> tuple[list[Path], list]:
    """(the readable files, in the given order; keep(z) of each one's target embeddings z
    (F, T, D)). Unreadable files are reported and skipped; `group` files are embedded at once,
    shortest first (chunks of equal length share a batch)."""
    def seconds(f):
        try:
            return sf.info(str(f)).duration
        except Exception:                       # unreadable: load_audio below says why
            return 0.0
    order = sorted(files, key=seconds)
    results, last_log = {}, time.time()
    for i in range(0, len(order), group):
        loaded = []
        for f in order[i: i + group]:
            try:
                loaded.append((f, sj.load_audio(f, model.config.sample_rate)))
            except sj.StemJEPAError as e:
                log(f"skipped {e}")
        zs = sj.embed_long(model, [x for _, x in loaded], batch=batch, device=device)
        results.update((f, keep(z)) for (f, _), z in zip(loaded, zs))
        done = min(i + group, len(order))
        if time.time() - last_log > 10 or done == len(order):      # a line per 10 s at most
            log(f"embedded {done}/{len(order)} files")
            last_log = time.time()
    if not results:
        raise sj.StemJEPAError(f"none of the {len(files)} audio files could be read")
    kept = [f for f in files if f in results]
    return kept, [results[f] for f in kept]


def open_model(checkpoint, device, instrument=None):
    """The trained model on its device; an unknown --instrument is an error before any decoding."""
    device = sj.pick_device(device)
    model = sj.StemJEPA.from_checkpoint(checkpoint).to(device)
    if instrument is not None and instrument not in model.instruments:
        raise sj.StemJEPAError(f"--instrument {instrument}: the model knows "
                               f"{', '.join(model.instruments)}")
    return model, device


def library_key(checkpoint, files: list[Path]) -> str:
    """The cache key of a library: the checkpoint file and each file's (path, size, mtime)."""
    def file_id(p):
        st = os.stat(p)
        return [str(Path(p).resolve()), st.st_size, st.st_mtime_ns]
    text = json.dumps([file_id(checkpoint), [file_id(f) for f in files]])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def retrieve(checkpoint, mix, library, instrument: str, *, top=10, device=None, batch=16,
             log=print) -> list[dict]:
    """The library's readable files ranked by fit to `mix` as `instrument` (4.1), the `top`
    ones with the offset at which each fits best (4.3: start it offset_s into the mix)."""
    model, device = open_model(checkpoint, device, instrument)
    sr, files = model.config.sample_rate, audio_files(library)
    mix_audio = sj.load_audio(mix, sr)          # a bad --mix fails before the library is embedded
    folder = Path(library) if Path(library).is_dir() else Path(library).parent
    cache_file = folder / ".stem_jepa_cache" / f"library-{library_key(checkpoint, files)}.pt"
    if cache_file.exists():
        cached = torch.load(cache_file, weights_only=True)
    else:
        log(f"embedding {len(files)} library files")
        kept, refs = embed_audio_files(model, files, device=device, batch=batch, log=log)
        where = {f: i for i, f in enumerate(files)}
        cached = {"kept": [where[f] for f in kept], "refs": torch.stack(refs)}
        cache_file.parent.mkdir(exist_ok=True)
        tmp = cache_file.with_name(cache_file.name + ".tmp")
        torch.save(cached, tmp)
        os.replace(tmp, cache_file)             # never half a cache file
    q = model.predict_long(mix_audio, instrument, batch=batch)         # (F, T, D)
    d = torch.cdist(sj.pool(q)[None].double(), cached["refs"].double())[0]
    patch_s = model.config.hop_length * model.config.patch_size / sr
    results = []
    for rank, i in enumerate(d.argsort()[:top].tolist(), 1):
        file = str(files[cached["kept"][i]])          # the key fixes the list of files
        z = model.encode_long(sj.load_audio(file, sr), batch=batch)
        offset = best_offset(sj.frames(z), sj.frames(q))
        results.append({"rank": rank, "file": file, "distance": round(d[i].item(), 4),
                        "offset_patches": offset, "offset_s": round(offset * patch_s, 2)})
    return results


def score(checkpoint, mix, stem, instrument: str, *, device=None, batch=16) -> dict:
    """How well `stem` fits `mix` as `instrument` (StemJEPA.score: the L2 distance of the pooled
    vectors, and its cosine) and where (Eq. 3: start the stem offset_s seconds into the mix)."""
    model, _ = open_model(checkpoint, device, instrument)
    sr = model.config.sample_rate
    mix_audio, stem_audio = sj.load_audio(mix, sr), sj.load_audio(stem, sr)
    q = model.predict_long(mix_audio, instrument, batch=batch)         # (F, T', D)
    z = model.encode_long(stem_audio, batch=batch)                     # (F, T, D)
    distance = (sj.pool(q) - sj.pool(z)).norm().item()
    offset = best_offset(sj.frames(z), sj.frames(q))
    patch_s = model.config.hop_length * model.config.patch_size / sr
    return {"mix": str(mix), "stem": str(stem), "instrument": instrument,
            "distance": round(distance, 4), "similarity": round(1 - distance ** 2 / 2, 4),
            "offset_patches": offset, "offset_s": round(offset * patch_s, 2)}


def embed_files(checkpoint, audio, out, *, sequences=False, device=None, batch=16,
                log=print) -> np.ndarray:
    """The readable files' pooled target embeddings (F*D: 3840 for ViT-B) -> OUT (.npy, a row
    per file) and OUT.txt (the files); `sequences`: OUT.sequences.npz, (T, F*D) per file, one
    row per 160 ms, keys file0, file1, ... in OUT.txt's order."""
    model, device = open_model(checkpoint, device)
    files = audio_files(audio)
    kept, embedded = embed_audio_files(model, files, device=device, batch=batch, log=log,
                                       keep=lambda z: (sj.pool(z).numpy(), sj.frames(z).numpy()))
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("retrieve", help="rank a library's stems by how well they fit a mix")
    r.add_argument("--library", required=True, help="a folder of candidate stems (or one file)")
    r.add_argument("--top", type=int, default=10, help="how many to list")
    s = sub.add_parser("score", help="how well one stem fits one mix, and where")
    s.add_argument("--stem", required=True, help="audio file of the candidate stem")
    e = sub.add_parser("embed", help="pooled embeddings of audio files, for other tools")
    e.add_argument("--audio", required=True, help="an audio file or a folder")
    e.add_argument("--out", required=True, help="FILE.npy: a row per file, the files in FILE.txt")
    e.add_argument("--sequences", action="store_true", help="also FILE.sequences.npz")
    for p in (r, s):
        p.add_argument("--mix", required=True, help="audio file of the mix")
        p.add_argument("--instrument", required=True, help="the stem's instrument (e.g. bass)")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
    for p in (r, s, e):
        p.add_argument("--checkpoint", required=True, help="a run's checkpoint.pt")
        p.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: the best there is)")
        p.add_argument("--batch", type=int, default=16, help="chunks encoded at once")
    args = parser.parse_args(argv)
    progress = lambda message: print(message, file=sys.stderr)   # noqa: E731 (stdout: results)
    try:
        if args.command == "retrieve":
            results = retrieve(args.checkpoint, args.mix, args.library, args.instrument,
                               top=args.top, device=args.device, batch=args.batch, log=progress)
            if args.json:
                print(json.dumps(results, indent=1))
                return
            print(f"{'rank':>4s}  {'distance':>8s}  {'offset':>8s}  file")
            for x in results:
                print(f"{x['rank']:4d}  {x['distance']:8.4f}  {x['offset_s']:7.2f}s  {x['file']}")
        elif args.command == "score":
            x = score(args.checkpoint, args.mix, args.stem, args.instrument, device=args.device,
                      batch=args.batch)
            print(json.dumps(x, indent=1) if args.json else
                  f"distance {x['distance']:.4f} (0 to 2, lower fits better), similarity "
                  f"{x['similarity']:.4f}; best offset {x['offset_s']:+.2f} s (start the stem "
                  "this long after the start of the mix)")
        else:
            embed_files(args.checkpoint, args.audio, args.out, sequences=args.sequences,
                        device=args.device, batch=args.batch, log=progress)
    except sj.StemJEPAError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
