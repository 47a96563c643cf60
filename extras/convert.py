"""Converters to the MUSDB18-HQ layout that stem_jepa.py reads (paper 3.4, the training data):
OUT/[split/]<track>/<stem>.wav at the source's sample rate, mono or stereo as the source.

    python extras/convert.py multichannel --src DIR --out DIR --channels bass,drums,other,vocals
        the authors' format: one multichannel WAV per track, SRC/[split/]<track>.wav, channel i
        is the i-th name of --channels; channels named mix or mixture are dropped
    python extras/convert.py moisesdb --src DIR --out DIR [--groups "bass=bass;drums=drums;other=*"]
        MoisesDB: SRC/[<provider>/]<track>/<stem folder>/<files>.wav with <track>/data.json; the
        files of a stem folder are summed; without --groups each stem folder is a stem
    python extras/convert.py slakh --src DIR --out DIR [--groups "bass=Bass;drums=Drums;other=*"]
        Slakh2100: SRC/{train,validation,test}/<track>/stems/SNN.flac with <track>/metadata.yaml;
        each stem goes to the group of its inst_class (is_drum: "Drums"), the members of a group
        are summed; the split folders are kept

--groups "NAME=MEMBER,MEMBER;NAME=*": a member is a Slakh class or a MoisesDB stem folder (any
case); "*" takes whatever no other group names. Sources of unequal length are zero-padded at the
end before summing. A stem is written as 16-bit WAV when its sources are all 16-bit (or less)
and the sum does not clip, else as 32-bit float.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import stem_jepa as sj  # noqa: E402

SLAKH_GROUPS = "bass=Bass;drums=Drums;other=*"   # MUSDB18's names (Slakh2100 has no vocals)
NARROW = ("PCM_16", "PCM_S8", "PCM_U8")          # subtypes that 16-bit WAV holds exactly


def parse_groups(text: str) -> dict[str, list[str]]:
    """"bass=Bass;keys=Piano,Organ;other=*" -> {instrument: [class or stem name, ...]}."""
    groups = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, members = part.partition("=")
        if not sep or not name.strip() or not members.strip():
            raise sj.StemJEPAError(f"--groups {text!r}: expected NAME=CLASS,CLASS;NAME=... "
                                   f"(e.g. bass=Bass;drums=Drums;other=*), not {part!r}")
        groups[name.strip()] = [m.strip() for m in members.split(",") if m.strip()]
    return groups


def group_of(member: str, groups: dict[str, list[str]]) -> str | None:
    """The group naming a Slakh class or MoisesDB stem (any case), else the "*" group, or None."""
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
            raise sj.StemJEPAError(f"{source}, line {number}: {raw.strip()!r} is beyond the YAML "
                                   "this file reads (mappings of scalars)")
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


def read(path, header_only=False):
    """An audio file as float32 (N, channels), its rate, and whether it is 16-bit or less; or
    with header_only, soundfile's info (channels, samplerate, subtype, ...)."""
    try:
        info = sf.info(str(path))
        if header_only:
            return info
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:                      # libsndfile's errors vary by version
        raise sj.StemJEPAError(f"{path}: not a readable audio file ({e})") from None
    return x, sr, info.subtype in NARROW


def mix_files(files: list[Path]) -> tuple[np.ndarray, int, bool]:
    """The sum of audio files (N, channels), the shorter zero-padded at the end, mono ones added
    to every channel; their common rate; whether all are 16-bit or less."""
    parts = [read(f) for f in files]
    if len({sr for _, sr, _ in parts}) > 1:
        raise sj.StemJEPAError(f"{files[0].parent}: the files differ in sample rate")
    channels = max(x.shape[1] for x, _, _ in parts)
    out = np.zeros((max(len(x) for x, _, _ in parts), channels), dtype=np.float32)
    for f, (x, _, _) in zip(files, parts):
        if x.shape[1] not in (1, channels):
            raise sj.StemJEPAError(f"{f}: {x.shape[1]} channels, the other files {channels}")
        out[: len(x)] += x
    return out, parts[0][1], all(narrow for _, _, narrow in parts)


def write_stem(path: Path, x: np.ndarray, sr: int, narrow: bool) -> None:
    """A stem as WAV, 16-bit if `narrow` and it does not clip, else float; never half a file."""
    subtype = "PCM_16" if narrow and np.abs(x).max() <= 1.0 else "FLOAT"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    sf.write(str(tmp), x, sr, subtype=subtype, format="WAV")
    os.replace(tmp, path)


def track_folders(src: Path, is_track, what: str) -> list[tuple[str | None, Path]]:
    """(the folder above, or None for SRC itself; the track) for the tracks in SRC or one level
    below it (a split or a provider folder), sorted."""
    if not src.is_dir():
        raise sj.StemJEPAError(f"--src {src}: no such folder")
    def visible(folder):
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    found = []
    for entry in visible(src):
        if is_track(entry):
            found.append((None, entry))
        elif entry.is_dir():
            found += [(entry.name, t) for t in visible(entry) if is_track(t)]
    if not found:
        raise sj.StemJEPAError(f"--src {src}: no {what} in it or one folder below")
    return found


def multichannel(src: Path, out: Path, channels: list[str]) -> int:
    """One multichannel file per track (SRC/[split/]<track>.wav): channel i -> stem channels[i]."""
    if len(set(channels)) != len(channels) or not all(channels):
        raise sj.StemJEPAError(f"--channels {','.join(channels)}: give each channel its own name")
    tracks = track_folders(src, lambda p: p.is_file() and p.suffix.lower() in sj.AUDIO_EXTENSIONS,
                           "audio files")
    for _, file in tracks:                      # every file checked before any is written
        if (n := read(file, header_only=True).channels) != len(channels):
            raise sj.StemJEPAError(f"{file} has {n} channels and --channels names "
                                   f"{len(channels)} ({','.join(channels)})")
    for split, file in tracks:
        x, sr, narrow = read(file)
        for i, name in enumerate(channels):
            if name.lower() not in sj.MIX_NAMES:
                write_stem(out / (split or "") / file.stem / f"{name}.wav", x[:, i], sr, narrow)
    return len(tracks)


def grouped(src: Path, out: Path, marker: str, stems_of, keep_split: bool) -> int:
    """The track folders holding a `marker` file, each stem of stems_of(folder) -> {stem: [files]}
    the sum of its files."""
    written = 0
    for split, folder in track_folders(src, lambda p: (p / marker).is_file(),
                                       f"track folders with a {marker}"):
        stems = stems_of(folder)
        if not stems:
            print(f"skipped {folder}: no stem in any group", file=sys.stderr)
            continue
        for name, files in stems.items():
            x, sr, narrow = mix_files(files)
            write_stem(out / (split if keep_split and split else "") / folder.name / f"{name}.wav",
                       x, sr, narrow)
        written += 1
    return written


def moisesdb_stems(folder: Path, groups: dict | None) -> dict[str, list[Path]]:
    """A MoisesDB track: each stem folder's audio files, under its name or its group's."""
    stems = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [f for f in sorted(sub.iterdir()) if f.suffix.lower() in sj.AUDIO_EXTENSIONS]
        name = group_of(sub.name, groups) if groups else sub.name.lower()
        if files and name is not None and name not in sj.MIX_NAMES:
            stems.setdefault(name, []).extend(files)
    return stems


def slakh_stems(folder: Path, groups: dict) -> dict[str, list[Path]]:
    """A Slakh2100 track: each rendered stems/SNN.flac under the group of its inst_class."""
    path = folder / "metadata.yaml"
    meta = parse_yaml_mapping(path.read_text(), source=str(path))
    stems = {}
    for sid, info in sorted((meta.get("stems") or {}).items()):
        files = [f for e in (".flac", ".wav") if (f := folder / "stems" / f"{sid}{e}").is_file()]
        if files and isinstance(info, dict):    # no file: audio_rendered is false
            group = group_of("Drums" if info.get("is_drum") else str(info.get("inst_class")),
                             groups)
            if group is not None:
                stems.setdefault(group, []).append(files[0])
    return stems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="layout", required=True)
    m = sub.add_parser("multichannel", help="one multichannel WAV per track (the authors')")
    m.add_argument("--channels", required=True, help="the stem of each channel, e.g. "
                   "bass,drums,other,vocals (mix or mixture: dropped)")
    d = sub.add_parser("moisesdb", help="MoisesDB: a folder per stem, its files summed")
    d.add_argument("--groups", help="stem folders per instrument, e.g. 'bass=bass;other=*' "
                   "(default: each stem folder is a stem)")
    s = sub.add_parser("slakh", help="Slakh2100: stems grouped by instrument class")
    s.add_argument("--groups", default=SLAKH_GROUPS, help=f"default '{SLAKH_GROUPS}'")
    for p in (m, d, s):
        p.add_argument("--src", required=True, type=Path, help="the dataset's root")
        p.add_argument("--out", required=True, type=Path, help="the MUSDB18-HQ-layout root")
    args = parser.parse_args(argv)
    try:
        if args.layout == "multichannel":
            n = multichannel(args.src, args.out, [c.strip() for c in args.channels.split(",")])
        elif args.layout == "moisesdb":
            groups = parse_groups(args.groups) if args.groups else None
            n = grouped(args.src, args.out, "data.json", lambda t: moisesdb_stems(t, groups),
                        keep_split=False)
        else:
            groups = parse_groups(args.groups)
            n = grouped(args.src, args.out, "metadata.yaml", lambda t: slakh_stems(t, groups),
                        keep_split=True)
        print(f"wrote {n} tracks to {args.out}")
    except sj.StemJEPAError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
