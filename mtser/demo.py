"""Demo data: a synthetic MSP-Podcast-style corpus spoken by espeak-ng, and a long recording made of it.

`make_demo_corpus` writes `Audios/`, `Transcripts/` and `Labels/labels_consensus.csv` exactly as an MSP-Podcast
release lays them out. Every labelled utterance's wording carries its emotion (class-specific words in shared
sentence frames) and its prosody carries its attributes (speaking rate and pitch follow arousal, loudness follows
dominance, pitch range follows valence and the class), so the labels are learnable from text alone and from audio
alone. Test3 utterances (`MSP-PODCAST_test3_NNNN.wav`) are audio only: no transcript and no row in the label file,
as in the 2025 challenge release. The same seed gives byte-identical files.

`make_long_recording` strings demo utterances into one long WAV with pauses and noise (for the timeline), with its
truth. The small local encoders the demo runs on are in `mtser.demo_encoders`.
"""
from __future__ import annotations

import csv
import random
import shutil
import subprocess
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pandas as pd

from mtser.errors import DataError, MtserError
from mtser.featurestore.labels import CLASSES

SAMPLE_RATE = 16000
LABEL_COLUMNS = ("FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set")


class DemoError(MtserError, RuntimeError):
    """The demo corpus cannot be synthesised (espeak-ng missing or failing): exit code 1."""


# ------------------------------------------------------------------------------------------------------------ wording
CLASS_WORDS: dict[str, tuple[str, ...]] = {
    "A": ("angry", "furious", "outraged", "livid", "enraged", "mad", "irritated", "infuriated"),
    "S": ("sad", "miserable", "heartbroken", "gloomy", "depressed", "lonely", "sorrowful", "devastated"),
    "H": ("happy", "delighted", "joyful", "thrilled", "cheerful", "glad", "overjoyed", "elated"),
    "U": ("surprised", "astonished", "amazed", "shocked", "stunned", "startled", "speechless", "flabbergasted"),
    "F": ("afraid", "scared", "terrified", "frightened", "nervous", "anxious", "panicked", "fearful"),
    "D": ("disgusted", "sickened", "revolted", "nauseated", "repulsed", "appalled", "queasy", "grossed out"),
    "C": ("contemptuous", "dismissive", "scornful", "unimpressed", "condescending", "disdainful", "smug", "snide"),
    "N": ("fine", "okay", "calm", "normal", "steady", "settled", "ordinary", "alright"),
    "O": ("puzzled", "conflicted", "nostalgic", "curious", "pensive", "torn", "restless", "wistful"),
}
TOPICS = (
    "the meeting", "the new job", "that phone call", "the trip to the coast", "this podcast", "the dinner last night",
    "the game on Sunday", "my neighbour", "the weather report", "the election news", "the traffic this morning",
    "the letter from the bank",
)
FRAMES = (
    "Honestly, {topic} made me feel {w1}.",
    "I am {w1} about {topic}, really {w2}.",
    "When I think about {topic} I get so {w1}.",
    "After {topic} I was {w1} and {w2}.",
    "You know, I felt {w1} after {topic}.",
    "People keep asking about {topic}, and I am just {w1}.",
)

# ----------------------------------------------------------------------------------------------------------- prosody
# Mean (arousal, valence, dominance) per class on the 1..7 scale; labels add noise around these.
CLASS_ATTRIBUTES: dict[str, tuple[float, float, float]] = {
    "A": (5.8, 2.2, 5.6), "S": (2.3, 2.3, 2.7), "H": (5.0, 6.0, 4.8), "U": (5.6, 4.6, 3.9),
    "F": (5.2, 2.5, 2.4), "D": (4.2, 2.4, 4.6), "C": (3.6, 3.0, 5.4), "N": (3.4, 4.1, 4.0),
    "O": (4.0, 4.0, 4.0), "X": (4.0, 4.0, 4.0),
}
CLASS_PITCH_RANGE: dict[str, float] = {  # multiplies the valence-driven pitch range (SSML prosody range, in %)
    "A": 1.3, "S": 0.4, "H": 1.6, "U": 2.2, "F": 1.1, "D": 0.7, "C": 0.5, "N": 0.9, "O": 1.0, "X": 1.0,
}


@dataclass(frozen=True)
class DemoSpeaker:
    speaker_id: str
    voice: str                # espeak-ng voice+variant
    gender: str
    base_rate: int            # words per minute at arousal 4
    base_pitch: int           # espeak-ng pitch 0..99 at arousal 4


SPEAKERS: tuple[DemoSpeaker, ...] = tuple(
    DemoSpeaker(str(100 + i), voice, gender, rate, pitch)
    for i, (voice, gender, rate, pitch) in enumerate([
        ("en+m1", "Male", 165, 40), ("en+f1", "Female", 170, 55), ("en-us+m3", "Male", 180, 45),
        ("en-us+f2", "Female", 175, 60), ("en+m5", "Male", 160, 35), ("en+f4", "Female", 185, 50),
        ("en-us+m7", "Male", 170, 42), ("en-us+f3", "Female", 165, 58), ("en+m2", "Male", 175, 38),
        ("en+f5", "Female", 180, 52), ("en-us+m4", "Male", 185, 44), ("en-us+f1", "Female", 170, 56),
    ])
)
TRAIN_SPEAKERS, DEV_SPEAKERS, TEST_SPEAKERS = SPEAKERS[:7], SPEAKERS[7:10], SPEAKERS[10:]


def demo_sentences() -> list[str]:
    """Every sentence the demo corpus can produce (the training text of the demo tokenizers)."""
    words = [w for ws in CLASS_WORDS.values() for w in ws]
    out = []
    for frame in FRAMES:
        for topic in TOPICS:
            for i, w1 in enumerate(words):
                out.append(_fill(frame, topic, w1, words[(i + 1) % len(words)]))
    return out


def _fill(frame: str, topic: str, w1: str, w2: str) -> str:
    text = frame.format(topic=topic, w1=w1, w2=w2)
    return text[0].upper() + text[1:]


# ------------------------------------------------------------------------------------------------------------ corpus
@dataclass(frozen=True)
class DemoUtterance:
    file_name: str
    split: str                # Train, Development or Test3
    emo_class: str            # also drawn for Test3 (it shapes wording and prosody) but never written out
    attributes: tuple[float, float, float]
    speaker: DemoSpeaker
    speaker_known: bool
    text: str
    has_transcript: bool


def make_demo_corpus(out: Path, size: int, seed: int = 0, overwrite: bool = False, workers: int = 4) -> Path:
    """Write a `size`-utterance MSP-Podcast-style corpus to `out` and return `out`.

    About 10 % are Test3 (audio only), the rest Train/Development (75/25, disjoint speakers). Labelled rows include
    a few O and X classes, some SpkrID `Unknown` and some utterances without a transcript file. The corpus is
    written to `<out>.partial` and renamed when complete; an existing `out` is an error unless `overwrite`.
    """
    out = Path(out)
    if size < 10:
        raise ValueError(f"demo corpus size must be at least 10, got {size}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: already exists and is not empty (overwrite=True, or --overwrite, replaces it)")
    if shutil.which("espeak-ng") is None:
        raise DemoError("espeak-ng not found on PATH: install it (apt-get install espeak-ng) to synthesise speech")
    plan = plan_demo_corpus(size, seed)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _write_corpus(partial, plan, seed, workers)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out


def _write_corpus(root: Path, plan: list[DemoUtterance], seed: int, workers: int) -> None:
    for sub in ("Audios", "Transcripts", "Labels"):
        (root / sub).mkdir(parents=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda utt: _write_audio(root / "Audios" / utt.file_name, utt, seed), plan))
    for utt in plan:
        if utt.has_transcript:
            (root / "Transcripts" / (Path(utt.file_name).stem + ".txt")).write_text(utt.text + "\n")
    with open(root / "Labels" / "labels_consensus.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(LABEL_COLUMNS)
        for utt in sorted(plan, key=lambda u: u.file_name):
            if utt.split == "Test3":
                continue
            spk = utt.speaker.speaker_id if utt.speaker_known else "Unknown"
            gender = utt.speaker.gender if utt.speaker_known else "Unknown"
            writer.writerow([utt.file_name, utt.emo_class, *(f"{a:.1f}" for a in utt.attributes), spk, gender,
                             utt.split])


def plan_demo_corpus(size: int, seed: int) -> list[DemoUtterance]:
    """Decide every utterance's name, split, class, attributes, speaker and wording (no audio yet)."""
    rng = random.Random(seed)
    n_test = max(1, round(size * 0.1))
    n_labelled = size - n_test
    n_dev = max(1, round(n_labelled * 0.25))
    classes = [CLASSES[i % len(CLASSES)] for i in range(n_labelled)]
    for i in range(0, n_labelled, 25):  # about 4 % O and 4 % X, at least one of each
        classes[i] = "O"
        classes[min(i + 12, n_labelled - 1)] = "X"
    rng.shuffle(classes)
    splits = ["Development"] * n_dev + ["Train"] * (n_labelled - n_dev)
    rng.shuffle(splits)
    plan = []
    for i, (emo, split) in enumerate(zip(classes, splits)):
        speakers = DEV_SPEAKERS if split == "Development" else TRAIN_SPEAKERS
        name = f"MSP-PODCAST_{i // 10 + 1:04d}_{i % 10 + 1:04d}.wav"
        plan.append(_plan_one(rng, name, split, emo, rng.choice(speakers),
                              speaker_known=rng.random() > 0.07, has_transcript=rng.random() > 0.08))
    for k in range(n_test):
        plan.append(_plan_one(rng, f"MSP-PODCAST_test3_{k + 1:04d}.wav", "Test3", rng.choice(CLASSES),
                              rng.choice(TEST_SPEAKERS), speaker_known=False, has_transcript=False))
    return plan


def _plan_one(rng: random.Random, name: str, split: str, emo: str, speaker: DemoSpeaker, speaker_known: bool,
              has_transcript: bool) -> DemoUtterance:
    if emo == "X":  # no agreement: wording from one class, second word and attributes half from another
        first, second = rng.sample(CLASSES, 2)
        w1, w2 = rng.choice(CLASS_WORDS[first]), rng.choice(CLASS_WORDS[second])
        mean = tuple((a + b) / 2 for a, b in zip(CLASS_ATTRIBUTES[first], CLASS_ATTRIBUTES[second]))
    else:
        w1, w2 = rng.sample(CLASS_WORDS[emo], 2)
        mean = CLASS_ATTRIBUTES[emo]
    attributes = tuple(round(min(7.0, max(1.0, m + rng.gauss(0.0, 0.35))), 1) for m in mean)
    text = _fill(rng.choice(FRAMES), rng.choice(TOPICS), w1, w2)
    return DemoUtterance(name, split, emo, attributes, speaker, speaker_known, text, has_transcript)


def espeak_command(utt: DemoUtterance) -> list[str]:
    """The espeak-ng call speaking `utt` with prosody derived from its attributes, class and speaker."""
    arousal, valence, dominance = utt.attributes
    rate = int(np.clip(utt.speaker.base_rate + 22 * (arousal - 4), 80, 400))
    pitch = int(np.clip(utt.speaker.base_pitch + 6 * (arousal - 4) + 3 * (valence - 4), 0, 99))
    amplitude = int(np.clip(100 + 18 * (dominance - 4), 20, 200))
    gap = max(0, round(3 * (4 - arousal)))
    pitch_range = int(np.clip((100 + 25 * (valence - 4)) * CLASS_PITCH_RANGE[utt.emo_class], 20, 400))
    ssml = f'<speak><prosody range="{pitch_range}%">{escape(utt.text)}</prosody></speak>'
    return ["espeak-ng", "-m", "-v", utt.speaker.voice, "-s", str(rate), "-p", str(pitch), "-a", str(amplitude),
            "-g", str(gap), "--stdout", ssml]


def _write_audio(path: Path, utt: DemoUtterance, seed: int) -> None:
    from scipy.signal import resample_poly

    proc = subprocess.run(espeak_command(utt), capture_output=True)
    if proc.returncode != 0:
        raise DemoError(f"espeak-ng failed on {utt.file_name} (exit {proc.returncode}): "
                         f"{proc.stderr.decode(errors='replace').strip()}")
    pcm, rate = _parse_wav_stream(proc.stdout)
    audio = resample_poly(pcm.astype(np.float64), SAMPLE_RATE, rate) if rate != SAMPLE_RATE else pcm.astype(np.float64)
    noise_seed = [seed, *path.stem.encode()]
    audio += np.random.default_rng(noise_seed).normal(0.0, 20.0, audio.shape)  # a faint noise floor
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(np.clip(np.round(audio), -32768, 32767).astype("<i2").tobytes())


def _parse_wav_stream(data: bytes) -> tuple[np.ndarray, int]:
    """16-bit mono PCM and its rate from a WAV written to a pipe (espeak-ng leaves the sizes unset)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise DemoError("espeak-ng did not write a WAV stream")
    rate = int.from_bytes(data[24:28], "little")
    start = data.index(b"data", 12) + 8
    body = data[start:len(data) - (len(data) - start) % 2]
    return np.frombuffer(body, dtype="<i2"), rate


# ----------------------------------------------------------------------------------------------------- long recording
def make_long_recording(corpus: Path, out: Path, utterances: int = 60, pause_s: tuple[float, float] = (0.2, 2.0),
                        snr_db: float | None = 20.0, repeat_to_s: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """Concatenate demo-corpus utterances (sorted names, cycled) with random pauses into one 16 kHz WAV at `out`,
    with white background noise at `snr_db` over the whole recording (None: none); with `repeat_to_s` the
    utterances are cycled until the recording is that long. Written in pieces (hours need no more memory than an
    utterance). Returns the truth: one row per utterance (`utterance`, `start_s`, `end_s`, `EmoClass`)."""
    import soundfile

    rng = np.random.default_rng(seed)
    audios = sorted((Path(corpus) / "Audios").glob("*.wav"))
    labels = _demo_labels(corpus)
    if not audios:
        raise DataError(f"{corpus}: no Audios/*.wav")
    waves = [soundfile.read(p, dtype="float32")[0] for p in audios]
    power = float(np.mean([np.mean(w ** 2) for w in waves]))
    noise = 0.0 if snr_db is None else np.sqrt(power / 10 ** (snr_db / 10))
    rows, position, k = [], 0, 0
    with soundfile.SoundFile(out, "w", SAMPLE_RATE, 1, "PCM_16") as f:
        while k < utterances or position < repeat_to_s * SAMPLE_RATE:
            i = k % len(audios)
            pause = np.zeros(int(rng.uniform(*pause_s) * SAMPLE_RATE), np.float32)
            for piece, name in ((pause, None), (waves[i], audios[i].name)):
                if name is not None:
                    rows.append({"utterance": name, "start_s": position / SAMPLE_RATE,
                                 "end_s": (position + len(piece)) / SAMPLE_RATE, "EmoClass": labels.get(name)})
                f.write(np.clip(piece + noise * rng.standard_normal(len(piece)), -1, 1))
                position += len(piece)
            k += 1
        tail = np.zeros(int(pause_s[1] * SAMPLE_RATE), np.float32)
        f.write(np.clip(tail + noise * rng.standard_normal(len(tail)), -1, 1))
    return pd.DataFrame(rows)


def _demo_labels(corpus: Path) -> dict[str, str]:
    path = Path(corpus) / "Labels" / "labels_consensus.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["FileName"]: row["EmoClass"] for row in csv.DictReader(f)}
