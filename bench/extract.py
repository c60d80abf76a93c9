"""How fast is `mtser extract` against what a user writes from the transformers docs, and does it scale?

    .venv/bin/python bench/extract.py [--quick | --large | --tiny] [--utterances N] [--workers 1,2]

One run, same corpus (espeak-ng demo corpus: MSP-Podcast layout, ~10 % audio-only Test3 utterances that need ASR)
and the same randomly initialised encoders of the real architectures (WavLM-large layout, Whisper, RoBERTa) at a
size where compute dominates:
  (a) naive   one utterance at a time, float32, as the transformers docs show: feature extractor + model per
              encoder (on the GPU where there is one), Whisper's generate() for utterances without a transcript (it
              runs the encoder again), one float16 .npy per utterance and encoder (what peers store)
  (b) mtser   extract() with 1 Ray worker (all cores' threads, or the GPU)
  (c) mtser   extract() with 2 Ray workers (cores split between them; needs 2 GPUs on a GPU machine), unless
              --workers leaves it out (bench/gpu.sh does on its one GPU)
Wall time per mode covers model loading, every forward pass and writing the outputs; the Ray cluster is started
once beforehand (like joining one with --address). The last line printed is one JSON object; besides the ratios it
has `audio_hours_per_hour_per_worker` (audio hours one mtser worker extracts per wall-clock hour, 1-worker run;
on CUDA also as `audio_hours_per_gpu_hour`, one worker per GPU), the workers' share of time in the encoders and
waiting for decoded audio, and on CUDA the GPU utilisation sampled over the 1-worker run (`gpu_utilisation_mean`,
via torch.cuda.utilization / pynvml; null where unavailable) and the card's name (`gpu_name`).
--tiny (bench/gpu.sh --dry-run) runs the same steps with tiny encoders on 10 utterances: it checks, not measures.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtser.featurestore.corpus import Utterance, read_corpus  # noqa: E402
from mtser.trainer.config import load_config  # noqa: E402

# Encoder sizes (hidden, layers, heads, ffn): full is WavLM-base / Whisper-base / RoBERTa-base scale.
SIZES = {
    "full": {"wavlm": (768, 12, 12, 3072), "whisper": (512, 6, 8, 2048), "roberta": (768, 12, 12, 3072)},
    "quick": {"wavlm": (192, 3, 4, 768), "whisper": (192, 3, 4, 768), "roberta": (192, 3, 4, 768)},
    # real sizes: WavLM-large, Whisper-large-v3 (80 mel bins here, v3 has 128: only the first conv's input differs),
    # RoBERTa-large; for a GPU (2.2 B random-init parameters, about 9 GB in float32; not run on the 2-core machine)
    "large": {"wavlm": (1024, 24, 16, 4096), "whisper": (1280, 32, 20, 5120), "roberta": (1024, 24, 16, 4096)},
    # the dry run's: every step, nothing measured (None: `mtser make-test-encoders`' tiny encoders as they are)
    "tiny": None,
}
ASR_TOKENS = 32


def build_encoders(out: Path, sizes: dict[str, tuple[int, int, int, int]] | None) -> Path:
    """Random-init models of the real architectures: the demo's tokenizers/processors, resized networks (None: the
    demo's tiny test encoders themselves)."""
    import torch
    from transformers import (
        AutoConfig, GenerationConfig, RobertaModel, WavLMModel, WhisperForConditionalGeneration,
    )

    from mtser.demo_encoders import make_test_encoders

    dirs = make_test_encoders(out, seed=0)
    if sizes is None:
        return out
    torch.manual_seed(0)
    hidden, layers, heads, ffn = sizes["wavlm"]
    cfg = AutoConfig.from_pretrained(dirs["wavlm"])
    cfg.update(dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
                    conv_dim=(512,) * 7, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16))
    WavLMModel(cfg).eval().save_pretrained(dirs["wavlm"])
    hidden, layers, heads, ffn = sizes["whisper"]
    cfg = AutoConfig.from_pretrained(dirs["whisper"])
    cfg.update(dict(d_model=hidden, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                    decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn))
    model = WhisperForConditionalGeneration(cfg).eval()
    model.generation_config = GenerationConfig.from_pretrained(dirs["whisper"])
    model.save_pretrained(dirs["whisper"])
    hidden, layers, heads, ffn = sizes["roberta"]
    cfg = AutoConfig.from_pretrained(dirs["roberta"])
    cfg.update(dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn))
    RobertaModel(cfg).eval().save_pretrained(dirs["roberta"])
    return out


class NaiveEncoders:
    """What the transformers docs show, one utterance at a time in float32 on `device`: feature extractor + model per
    encoder, Whisper's generate() for an utterance without a transcript (it runs the encoder again)."""

    def __init__(self, wavlm: Path, whisper: Path, roberta: Path, asr_tokens: int = ASR_TOKENS, device: str = "cpu"):
        from transformers import AutoFeatureExtractor, AutoModel, AutoProcessor, AutoTokenizer, WhisperForConditionalGeneration

        self.device = device
        self.wavlm_fe = AutoFeatureExtractor.from_pretrained(wavlm)
        self.wavlm = AutoModel.from_pretrained(wavlm).eval().to(device)
        self.processor = AutoProcessor.from_pretrained(whisper)
        self.whisper = WhisperForConditionalGeneration.from_pretrained(whisper).eval().to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(roberta)
        self.roberta = AutoModel.from_pretrained(roberta).eval().to(device)
        self.asr_tokens = asr_tokens

    def features(self, audio: np.ndarray, transcript: str | None = None) -> dict[str, np.ndarray]:
        """(T, D) float32 features of one 16 kHz utterance (up to 30 s) per encoder."""
        import torch

        with torch.no_grad():
            inputs = self.wavlm_fe(audio, sampling_rate=16000, return_tensors="pt").to(self.device)
            speech = self.wavlm(**inputs).last_hidden_state[0]
            features = self.processor(audio, sampling_rate=16000, return_tensors="pt").input_features.to(self.device)
            encoded = self.whisper.model.encoder(features).last_hidden_state[0, : math.ceil(len(audio) / 320)]
            text = transcript
            if not text:
                ids = self.whisper.generate(features, language="en", task="transcribe", max_new_tokens=self.asr_tokens)
                text = self.processor.batch_decode(ids, skip_special_tokens=True)[0]
            tokens = self.roberta(**self.tokenizer(text, return_tensors="pt").to(self.device)).last_hidden_state[0]
        return {"wavlm": speech.cpu().numpy(), "whisper": encoded.cpu().numpy(), "roberta": tokens.cpu().numpy()}


def naive_loop(utts: list[Utterance], encoders: Path, out: Path, device: str = "cpu") -> None:
    """NaiveEncoders per utterance on `device`, one float16 .npy per utterance and encoder (what peers store)."""
    import soundfile
    import torch
    import torchaudio.functional as AF

    naive = NaiveEncoders(encoders / "wavlm", encoders / "whisper", encoders / "roberta", device=device)
    out.mkdir(parents=True)
    for utt in utts:
        audio, rate = soundfile.read(utt.path, dtype="float32")
        if audio.ndim > 1:
            audio = audio.mean(axis=1)
        if rate != 16000:
            audio = AF.resample(torch.from_numpy(audio), rate, 16000).numpy()
        stem = out / Path(utt.id).stem
        for name, x in naive.features(audio, utt.transcript).items():
            np.save(f"{stem}.{name}.npy", x.astype(np.float16))


class GpuSampler:
    """Mean GPU utilisation (percent) sampled every `period` s while active; None without CUDA or NVML."""

    def __init__(self, period: float = 0.2):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import torch

        while not self._stop.wait(self.period):
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception:  # noqa: BLE001 - no NVML: report null, not a made-up number
                return

    def __enter__(self) -> "GpuSampler":
        import torch

        if torch.cuda.is_available():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def add_size_arguments(parser: argparse.ArgumentParser, utterances: int) -> None:
    """--quick / --large / --tiny / --utterances, shared by the extraction benches (`utterances`: the full run's
    corpus)."""
    parser.add_argument("--quick", action="store_true", help="small encoders and corpus (under a minute)")
    parser.add_argument("--large", action="store_true",
                        help="real-size encoders (WavLM-large, Whisper-large, RoBERTa-large; for a GPU)")
    parser.add_argument("--tiny", action="store_true", help="tiny encoders, 10 utterances: the dry run's check of "
                                                            "every step (measures nothing)")
    parser.add_argument("--utterances", type=int, default=0,
                        help=f"corpus size (default {utterances}, quick and tiny 10)")


def run_size(args: argparse.Namespace, utterances: int) -> tuple[str, int]:
    """(encoder size in SIZES, corpus size) chosen by add_size_arguments' flags."""
    size = "tiny" if args.tiny else "quick" if args.quick else "large" if args.large else "full"
    return size, args.utterances or {"quick": 10, "tiny": 10}.get(size, utterances)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_size_arguments(parser, 48)
    parser.add_argument("--workers", default="1,2", help="mtser runs, by Ray workers (comma-separated; default 1,2)")
    args = parser.parse_args()
    size, n = run_size(args, 48)
    worker_counts = [int(w) for w in args.workers.split(",")]
    if 1 not in worker_counts:
        parser.error("--workers must include 1 (the per-worker figures come from the 1-worker run)")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch
    from transformers.utils import logging as hf_logging

    from mtser.demo import make_demo_corpus
    from mtser.featurestore.extract import extract

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="mtser-bench-extract-"))
    try:
        encoders = build_encoders(work / "encoders", SIZES[size])
        utts = read_corpus(make_demo_corpus(work / "corpus", size=n, seed=1)).utterances
        audio_s = sum(__import__("soundfile").info(u.path).duration for u in utts)
        cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml").extract
        cfg = replace(cfg, encoders=[replace(e, model=str(encoders / e.name)) for e in cfg.encoders],
                      asr_max_new_tokens=ASR_TOKENS, shard_seconds=audio_s / (2 if size == "tiny" else 8),
                      batch_seconds=60.0)
        print(f"corpus: {len(utts)} utterances, {audio_s:.0f} s audio, {sum(not u.transcript for u in utts)} "
              f"without transcript; encoders {SIZES[size] or 'the demo test encoders'}; "
              f"torch threads {torch.get_num_threads()}", flush=True)
        results, summaries = {}, {}
        device = "cuda" if torch.cuda.is_available() else "cpu"
        start = time.perf_counter()
        naive_loop(utts, encoders, work / "naive", device)
        if device == "cuda":
            torch.cuda.synchronize()
        results["naive"] = time.perf_counter() - start
        print(f"(a) naive loop:     {results['naive']:.1f} s", flush=True)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
        for workers in worker_counts:
            start = time.perf_counter()
            with GpuSampler() as gpu:
                summary = extract(utts, cfg, str(work / f"store{workers}"), workers=workers, progress=False)
            results[f"mtser_{workers}"] = time.perf_counter() - start
            summaries[workers] = (summary, gpu.mean)
            assert summary.ok and summary.written == len(utts), summary.line()
            print(f"({'bc'[workers - 1]}) mtser {workers} worker(s): {results[f'mtser_{workers}']:.1f} s  "
                  f"[{summary.line()}]", flush=True)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rates = {k: len(utts) / v for k, v in results.items()}
    one, gpu_mean = summaries[1]
    busy = {f"{k}_share_1_worker": round(v / (one.wall_seconds * one.workers), 3)
            for k, v in (("encoder_time", one.encode_seconds), ("audio_wait", one.audio_wait_seconds))}
    two = "mtser_2" in results
    report = {
        "audio_hours_per_hour_per_worker": round(audio_s / results["mtser_1"], 2),
        "audio_hours_per_gpu_hour": round(audio_s / results["mtser_1"], 2) if one.device == "cuda" else None,
        "audio_hours_per_hour_per_worker_2_workers": round(audio_s / results["mtser_2"] / 2, 2) if two else None,
        **busy, "device": one.device, "gpu_utilisation_mean": gpu_mean,
        "gpu_name": torch.cuda.get_device_name(0) if one.device == "cuda" else None,
        "speedup_vs_naive": round(rates["mtser_1"] / rates["naive"], 3),
        "scaling_2_workers": round(rates["mtser_2"] / rates["mtser_1"], 3) if two else None,
        **{f"{k}_utt_per_s": round(v, 3) for k, v in rates.items()},
        **{f"{k}_audio_s_per_s": round(audio_s / t, 3) for k, t in results.items()},
        "utterances": len(utts), "audio_seconds": round(audio_s, 1), "quick": args.quick, "size": size,
        "workers": worker_counts,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
