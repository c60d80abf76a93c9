"""How far do a speech encoder's windowed features lie from one forward over the whole recording?

    .venv/bin/python bench/windowing.py [--quick] [--seconds 60 90] [--workdir /tmp]

Recordings of 60 and 90 s (`--quick`: 60 s) of espeak-ng speech (demo corpus utterances one after another) go
through the demo WavLM (`make_test_encoders`: the real architecture, random-init, 2 layers, 64-d) once whole and
once as mtser's pipeline cuts them (`SpeechEncoder.pieces`: windows of `window_seconds` overlapping by 2 ×
`window_context_seconds`, central frames kept), for the default windowing (30 s / 5 s) and two others. Per frame t:
  rel_error  ||x_t - whole_t|| / ||whole_t||   (reported: max and mean over frames)
  cosine     cos(x_t, whole_t)                  (reported: min and mean over frames)
Frame counts are equal by construction (asserted). Random-init weights are not trained ones: the numbers show how
much the stitching changes this architecture's states, not the effect on emotion recognition. Last line: one JSON
object.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WINDOWINGS = ((30.0, 5.0), (30.0, 0.0), (10.0, 2.0))      # (window_seconds, window_context_seconds); first = default
SR = 16000


def deviation(windowed: np.ndarray, whole: np.ndarray) -> dict:
    error = np.linalg.norm(windowed - whole, axis=1) / np.linalg.norm(whole, axis=1)
    cosine = (windowed * whole).sum(1) / (np.linalg.norm(windowed, axis=1) * np.linalg.norm(whole, axis=1))
    return {"rel_error_max": float(error.max()), "rel_error_mean": float(error.mean()),
            "cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one 60 s recording (< 60 s)")
    parser.add_argument("--seconds", type=float, nargs="+", default=[60.0, 90.0])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    from mtser.demo import make_demo_corpus
    from mtser.demo_encoders import make_test_encoders
    from mtser.featurestore.audio import load_audio
    from mtser.featurestore.config import EncoderConfig
    from mtser.featurestore.corpus import read_corpus
    from mtser.featurestore.encoders import SpeechEncoder

    lengths = [60.0] if args.quick else args.seconds
    work = Path(tempfile.mkdtemp(prefix="mtser-windowing-", dir=args.workdir))
    try:
        encoders = make_test_encoders(work / "encoders", seed=0)
        corpus = make_demo_corpus(work / "corpus", size=int(max(args.seconds) / 2) + 10, seed=0)   # quick: same audio
        utts = sorted(read_corpus(corpus).utterances, key=lambda u: u.id)
        speech = np.concatenate([load_audio(u.path) for u in utts])
        encoder = SpeechEncoder(EncoderConfig("wavlm", "speech", str(encoders["wavlm"])))
        results = []
        for seconds in lengths:
            wave = speech[: int(seconds * SR)]
            assert len(wave) == int(seconds * SR), f"demo corpus too short for {seconds} s"
            whole = encoder.forward([wave], SR)[0]
            for window, context in WINDOWINGS:
                pieces = encoder.pieces(wave, SR, window, context)
                windowed = np.concatenate(encoder.forward(pieces, SR))
                assert windowed.shape == whole.shape
                row = {"seconds": seconds, "window_seconds": window, "context_seconds": context,
                       "windows": len(pieces), "frames": len(whole), **deviation(windowed, whole)}
                results.append(row)
                print(f"{seconds:5.0f} s, windows {window:4.0f} s / context {context:3.0f} s ({len(pieces)}): "
                      f"rel error max {row['rel_error_max']:.4f} mean {row['rel_error_mean']:.5f}; "
                      f"cosine min {row['cosine_min']:.5f} mean {row['cosine_mean']:.6f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"quick": args.quick, "encoder": "demo wavlm (random-init, 2 layers, 64-d)", "runs": results}))


if __name__ == "__main__":
    main()
