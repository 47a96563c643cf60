"""Render composed four-part music into a multitrack development set (MUSDB18-HQ layout).

Real music for developing and judging Stem-JEPA at small scale, without MUSDB18: four-part
pieces from the score corpus shipped inside the `music21` package (Bach chorales, Palestrina),
rendered part by part with FluidSynth and a General MIDI SoundFont, as Slakh2100 renders Lakh
MIDI. Each piece becomes OUT/{train,test}/<piece>/{soprano,alto,tenor,bass}.wav at 16 kHz mono.
Per piece, a tempo and one General MIDI program per voice are drawn from the seed, so songs
differ in sound as well as in key, harmony and rhythm.

Extra dependencies (not the project's): `pip install music21`, and the Debian packages
`fluidsynth` and `fluid-soundfont-gm`.

    python dev/render_music21.py --out dev/data/chorales --pieces 120 --test 20
"""
import argparse
import subprocess
import tempfile
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile as sf

SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
VOICES = ("soprano", "alto", "tenor", "bass")
# General MIDI programs (0-based) that can play each voice's range.
PROGRAMS = {
    "soprano": [40, 68, 73, 71, 56, 52, 19, 0],     # violin, oboe, flute, clarinet, trumpet, choir, organ, piano
    "alto": [40, 41, 71, 52, 19, 0, 69, 48],         # violin, viola, clarinet, choir, organ, piano, horn, strings
    "tenor": [41, 42, 60, 70, 52, 19, 0, 57],        # viola, cello, French horn, bassoon, choir, organ, piano, trombone
    "bass": [42, 43, 32, 33, 70, 58, 19, 0],         # cello, contrabass, ac. bass, el. bass, bassoon, tuba, organ, piano
}


def four_part_pieces(limit: int) -> list[Path]:
    """Corpus files with exactly four parts, Bach chorales first, then Palestrina."""
    from music21 import corpus
    found = []
    for composer in ("bach", "palestrina"):
        for path in sorted(corpus.getComposer(composer)):
            if len(found) >= limit:
                return found
            found.append(Path(path))
    return found


def render(job) -> str | None:
    """Render one piece's four voices to OUT/split/name/*.wav; returns the name or None."""
    from music21 import converter, instrument, tempo
    path, out, seed, max_seconds = job
    rng = np.random.default_rng(seed)
    try:
        score = converter.parse(path)
    except Exception:
        return None
    parts = list(score.parts)
    if len(parts) != 4:
        return None
    bpm = float(rng.uniform(60, 110))
    waves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for voice, part in zip(VOICES, parts):
            part = part.flatten()
            for old in part.getElementsByClass((instrument.Instrument, tempo.MetronomeMark)):
                part.remove(old)
            program = instrument.Instrument()
            program.midiProgram = int(rng.choice(PROGRAMS[voice]))
            part.insert(0, program)
            part.insert(0, tempo.MetronomeMark(number=bpm))
            mid, wav = Path(tmp) / f"{voice}.mid", Path(tmp) / f"{voice}.wav"
            part.write("midi", fp=mid)
            try:                    # a few scores make FluidSynth run on forever: skip them
                subprocess.run(["fluidsynth", "-ni", "-q", "-g", "0.5", "-r", "16000", "-F",
                                str(wav), SOUNDFONT, str(mid)], check=True, capture_output=True,
                               timeout=60)
            except (subprocess.TimeoutExpired, subprocess.CalledProcessError):
                return None
            x, sr = sf.read(wav, dtype="float32", always_2d=True)
            assert sr == 16000
            waves[voice] = x.mean(1)[: int(max_seconds * sr)]
    n = min(len(w) for w in waves.values())
    mix_peak = max(np.abs(sum(w[:n] for w in waves.values())).max(), 1e-9)
    gain = 0.9 / mix_peak                                       # the mix peaks at 0.9; stems keep their balance
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for voice, w in waves.items():
        sf.write(folder / f"{voice}.wav", w[:n] * gain, 16000, subtype="PCM_16")
    return str(folder)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="dev/data/chorales")
    p.add_argument("--pieces", type=int, default=120, help="pieces to try (those without 4 parts are skipped)")
    p.add_argument("--test", type=int, default=20, help="pieces held out in test/ (every k-th piece)")
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args()
    pieces = four_part_pieces(a.pieces)
    every = max(len(pieces) // max(a.test, 1), 1)
    jobs = []
    for i, path in enumerate(pieces):
        split = "test" if a.test and i % every == every - 1 and i // every < a.test else "train"
        name = f"{path.parent.name}-{path.stem}" if path.parent.name != "bach" else path.stem
        jobs.append((path, Path(a.out) / split / name, [a.seed, i], a.max_seconds))
    with Pool(a.jobs) as pool:
        done = [r for r in pool.imap_unordered(render, jobs) if r]
    print(f"rendered {len(done)} of {len(pieces)} pieces into {a.out}")


if __name__ == "__main__":
    main()
