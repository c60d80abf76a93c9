"""Frozen encoders through transformers: a speech SSL model, the Whisper encoder (+ASR from the same states), and a
text model on transcripts. Each takes a hub id or a local directory and returns one (T, D) float32 array per input,
or (T, L, D) when the encoder keeps several hidden states (`layers`, one forward pass: `HiddenStates`). Finding,
loading and describing the models is `models`' part.

Each audio encoder cuts an utterance into `Piece`s that run as rows of a batch, and the utterance's frames are its
pieces' kept frames in order (`pieces`), so a long recording never becomes one quadratic self-attention:
- speech: the whole utterance up to `window_seconds`; a longer one in overlapping windows, each keeping its central
  frames, stitched to exactly the frame count of a whole-utterance forward (`SpeechEncoder.pieces`).
- whisper: consecutive 30 s windows, each padded to 30 s as the model requires; ceil(samples / 320) frames are kept
  per window. Utterances without a transcript are decoded from the same encoder states, window by window.
- text: the transcript truncated to `max_tokens`; one vector per token.

Batching never changes an utterance's features:
- speech: length-sorted batches with an attention mask when the model normalises its conv features per frame
  (`feat_extract_norm="layer"`, WavLM-large); with group norm (`"group"`, WavLM-base) padding would change the
  statistics, so only pieces of identical length share a batch.
- whisper: every window is padded to 30 s anyway. text: right-padded batches with an attention mask.

Keeping a GPU busy: each model runs in its `compute_dtype` (default bfloat16 on CUDA, float32 on CPU); the speech
models' input normalisation and Whisper's log-mel spectrogram are computed on the device from one padded batch
assembled in pinned host memory; the forward returns every layer's states only when an inner layer, a mean of
layers or several layers are asked (`HiddenStates.wanted`); features come back with one device-to-host copy per batch.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from mtser.featurestore.config import EncoderConfig, resolve_compute_dtype
from mtser.featurestore.models import (
    WHISPER_SAMPLES_PER_FRAME, hidden_state_count, pretrained_model, resolve_layers,
)

WHISPER_WINDOW_S = 30
TEXT_BATCH_TOKENS = 8192


class HiddenStates:
    """Which hidden states an encoder keeps: one (`layer`, or the mean of the last `mean_last_k`), or several
    (`layers`, resolved to indices 0..count-1: `models.resolve_layers`), stacked as (..., T, L, D)."""

    def __init__(self, cfg: EncoderConfig, model_config: Any):
        self.cfg = cfg
        self.layers = resolve_layers(cfg, hidden_state_count(model_config, cfg.kind))

    @property
    def wanted(self) -> bool:
        """Whether the forward pass must return every layer's states: for an inner layer, a mean of layers or
        several layers. The last layer alone is `last_hidden_state`, so the others are never kept."""
        return self.layers is not None or self.cfg.layer != -1 or self.cfg.mean_last_k > 1

    def select(self, output: Any) -> torch.Tensor:
        """(N, T, D) hidden-state `layer` (0 = embeddings, -1 = last) or the mean of the last `mean_last_k`; with
        `layers`, (N, T, L, D) those states in the configured order.

        The last entry is the model's `last_hidden_state` (after its final layer norm where it has one: WavLM-large's
        `hidden_states[-1]` in transformers 5 is taken before that norm), so `layer=-1` is what `model(...)` returns.
        """
        cfg = self.cfg
        if self.layers is None and cfg.layer == -1 and cfg.mean_last_k == 1:
            return output.last_hidden_state
        states = (*output.hidden_states[:-1], output.last_hidden_state)
        if self.layers is not None:
            return torch.stack([states[k] for k in self.layers], dim=2)
        if cfg.mean_last_k > 1:
            return torch.stack(states[-cfg.mean_last_k:]).float().mean(dim=0)
        return states[cfg.layer]


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def padded_batch(waves: Sequence[np.ndarray], length: int, device: str) -> torch.Tensor:
    """Waves zero-padded (or cut) to `length` samples as one float32 (N, length) tensor on `device`, assembled in a
    pinned host buffer on CUDA so the copy runs asynchronously."""
    host = torch.zeros((len(waves), length), dtype=torch.float32, pin_memory=device.startswith("cuda"))
    for row, wave in zip(host, waves):
        n = min(len(wave), length)
        row[:n] = torch.from_numpy(np.asarray(wave[:n], dtype=np.float32))
    return host.to(device, non_blocking=True)


def _host_frames(states: torch.Tensor, counts: Sequence[int]) -> list[np.ndarray]:
    """Rows of `states` cut to their frame counts, as float32 numpy (one device-to-host copy per batch)."""
    host = states[:, : max(counts)].float().cpu().numpy()
    return [host[j, :n] for j, n in enumerate(counts)]


class Piece(NamedTuple):
    """Samples of one utterance that run as one row of a batch (a view into its wave, never a copy)."""

    wave: np.ndarray
    keep: slice = slice(None)                   # frames of this piece's output that are the utterance's
    stats: tuple[float, float] | None = None    # (mean, variance) to normalise with: the whole utterance's, for a
                                                # window of a long one (None: the piece's own samples)


def wave_stats(wave: np.ndarray, block: int = 1 << 20) -> tuple[float, float]:
    """(mean, population variance) of the samples in float64, a block at a time (no full-length temporary)."""
    mean = sum(float(wave[s: s + block].sum(dtype=np.float64)) for s in range(0, len(wave), block)) / len(wave)
    squares = 0.0
    for s in range(0, len(wave), block):
        centred = wave[s: s + block].astype(np.float64) - mean
        squares += float(centred @ centred)
    return mean, squares / len(wave)


MAX_PADDING = 0.15               # a batch's longest item is at most 15 % longer than its shortest


def length_batches(lengths: Sequence[int], budget: float, equal_only: bool = False) -> list[list[int]]:
    """Indices in length order, grouped so each batch's padded size (longest × count) stays within `budget` and
    padding stays under MAX_PADDING. A single item longer than the budget gets a batch of its own.
    `equal_only` groups identical lengths only."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        if (current is None or (len(current) + 1) * lengths[i] > budget
                or lengths[i] > lengths[current[0]] * (1 + MAX_PADDING)
                or (equal_only and lengths[i] != lengths[current[0]])):
            batches.append([i])
        else:
            current.append(i)
    return batches


class SpeechEncoder:
    """A speech SSL model (WavLM, wav2vec 2.0, HuBERT, ... any AutoModel taking raw 16 kHz audio through a conv
    feature encoder: `conv_kernel`, `conv_stride` in its config).

    Its feature extractor's per-utterance normalisation runs on the device, on the padded batch."""

    def __init__(self, cfg: EncoderConfig, device: str = "cpu"):
        from transformers import AutoFeatureExtractor, AutoModel

        self.cfg, self.device = cfg, device
        self.compute_dtype = resolve_compute_dtype(cfg, device)
        self.model = pretrained_model(AutoModel, cfg)
        self.model.to(device, TORCH_DTYPES[self.compute_dtype]).eval()
        self.hidden = HiddenStates(cfg, self.model.config)
        self.extractor = AutoFeatureExtractor.from_pretrained(cfg.model, revision=cfg.revision)
        self.pads_safely = getattr(self.model.config, "feat_extract_norm", "layer") != "group"
        self.normalises = bool(getattr(self.extractor, "do_normalize", False))
        strides, kernels = self.model.config.conv_stride, self.model.config.conv_kernel
        self.hop = math.prod(strides)                                   # samples per frame (320 for WavLM)
        self.receptive = 1 + sum((k - 1) * math.prod(strides[:i]) for i, k in enumerate(kernels))   # 400

    def frames(self, samples: int) -> int:
        """Frames the model gives for `samples` of audio: frame f sees samples [f·hop, f·hop + receptive)."""
        if samples < self.receptive:
            return 0
        return int(self.model._get_feat_extract_output_lengths(torch.tensor(samples)))

    def pieces(self, wave: np.ndarray, sample_rate: int, window_s: float, context_s: float) -> list[Piece]:
        """The whole utterance when it has at most `window_s` of frames; else windows of that many frames whose
        starts are multiples of `hop` samples, so a window's frame j is the utterance's frame start + j, computed
        from the same samples. Consecutive windows overlap by at least 2 × `context_s`; each keeps its frames up to
        the middle of its overlaps (the first from frame 0, the last to the end), so every frame comes from exactly
        one window and has at least `context_s` of audio on both sides inside it (short of the recording's ends).
        All windows normalise with the utterance's mean and variance. ValueError for audio shorter than one frame."""
        total = self.frames(len(wave))
        if total < 1:
            raise ValueError(f"audio too short for encoder {self.cfg.name}: {len(wave)} samples "
                             f"({1000 * len(wave) / sample_rate:.1f} ms); one frame needs {self.receptive} "
                             f"({1000 * self.receptive / sample_rate:.0f} ms)")
        span = max(1, round(window_s * sample_rate / self.hop))             # frames per window
        if total <= span:
            return [Piece(wave)]
        context = min(round(context_s * sample_rate / self.hop), (span - 1) // 2)
        starts = [*range(0, total - span, span - 2 * context), total - span]
        cuts = [0, *((a + b + span) // 2 for a, b in zip(starts, starts[1:])), total]
        size = self.hop * (span - 1) + self.receptive                        # samples of `span` frames
        stats = wave_stats(wave) if self.normalises else None
        return [Piece(wave[s * self.hop: s * self.hop + size], slice(lo - s, hi - s), stats)
                for s, lo, hi in zip(starts, cuts, cuts[1:])]

    def batches(self, waves: Sequence[np.ndarray], batch_seconds: float, sample_rate: int) -> list[list[int]]:
        return length_batches([len(w) for w in waves], batch_seconds * sample_rate, equal_only=not self.pads_safely)

    def input_values(self, pieces: Sequence[Piece]) -> tuple[torch.Tensor, torch.Tensor]:
        """(padded, normalised input values, attention mask) on the device, as the feature extractor makes them:
        zero mean and unit variance over each piece's own samples (or its `stats`) when it normalises,
        padding_value after."""
        sizes = [len(p.wave) for p in pieces]
        lengths = torch.tensor(sizes, device=self.device)
        x = padded_batch([p.wave for p in pieces], max(sizes), self.device)
        mask = torch.arange(x.shape[1], device=self.device)[None, :] < lengths[:, None]
        if self.normalises:
            n = lengths[:, None].to(torch.float32)
            mean = x.sum(dim=1, keepdim=True) / n
            var = ((x - mean).pow(2) * mask).sum(dim=1, keepdim=True) / n
            given = [j for j, p in enumerate(pieces) if p.stats is not None]
            if given:
                stats = torch.tensor([pieces[j].stats for j in given], dtype=torch.float32, device=self.device)
                mean[given], var[given] = stats[:, :1], stats[:, 1:]
            x = (x - mean) / torch.sqrt(var + 1e-7)
        return torch.where(mask, x, float(getattr(self.extractor, "padding_value", 0.0))), mask

    @torch.inference_mode()
    def forward(self, items: Sequence[Piece | np.ndarray], sample_rate: int) -> list[np.ndarray]:
        """The kept frames of each piece (a bare wave is a whole utterance); a window's are a copy, so the batch's
        host array is not kept alive by the few frames it contributes."""
        pieces = [p if isinstance(p, Piece) else Piece(p) for p in items]
        x, mask = self.input_values(pieces)
        out = self.model(x.to(TORCH_DTYPES[self.compute_dtype]),
                         attention_mask=mask.long() if self.pads_safely else None,
                         output_hidden_states=self.hidden.wanted)
        states = self.hidden.select(out)
        frames = _host_frames(states, [self.frames(len(p.wave)) for p in pieces])
        return [f if p.keep == slice(None) else f[p.keep].copy() for f, p in zip(frames, pieces)]


class WhisperEncoder:
    """Whisper's encoder (any WhisperForConditionalGeneration checkpoint); decodes transcripts from its own states.

    The log-mel spectrogram is computed on the device (`log_mel`, the feature extractor's own recipe in torch)."""

    def __init__(self, cfg: EncoderConfig, device: str = "cpu", language: str = "en", max_new_tokens: int = 128):
        from transformers import AutoFeatureExtractor, AutoTokenizer, WhisperForConditionalGeneration

        self.cfg, self.device, self.max_new_tokens = cfg, device, max_new_tokens
        self.compute_dtype = resolve_compute_dtype(cfg, device)
        self.model = pretrained_model(WhisperForConditionalGeneration, cfg)
        self.model.to(device, TORCH_DTYPES[self.compute_dtype]).eval()
        self.hidden = HiddenStates(cfg, self.model.config)
        self.extractor = AutoFeatureExtractor.from_pretrained(cfg.model, revision=cfg.revision)
        self.mel_filters = torch.from_numpy(np.asarray(self.extractor.mel_filters, dtype=np.float32)).T.to(device)
        self.window = torch.hann_window(self.extractor.n_fft, device=device)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model, revision=cfg.revision) if cfg.asr else None
        multilingual = bool(getattr(self.model.generation_config, "lang_to_id", None))
        self.generate_kwargs = {"language": language, "task": "transcribe"} if multilingual else {}

    def pieces(self, wave: np.ndarray, sample_rate: int, window_s: float = 0.0, context_s: float = 0.0
               ) -> list[Piece]:
        """Consecutive 30 s windows, the input length the model was trained on (`window_s`/`context_s`, the speech
        encoders' windows, do not apply)."""
        size = WHISPER_WINDOW_S * sample_rate
        return [Piece(wave[s: s + size]) for s in range(0, len(wave), size)]

    def batches(self, waves: Sequence[np.ndarray], batch_seconds: float, sample_rate: int) -> list[list[int]]:
        windows = [max(1, math.ceil(len(w) / (WHISPER_WINDOW_S * sample_rate))) for w in waves]
        return length_batches(windows, max(1.0, batch_seconds / WHISPER_WINDOW_S))

    def log_mel(self, pieces: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, n_mels, 3000) float32 log-mel features of ≤ 30 s pieces, zero-padded to 30 s, on the device: what
        `WhisperFeatureExtractor(pieces, sampling_rate=16000)` returns (its STFT, mel filters, log10 clamp, 8 dB
        floor below each piece's maximum, (x + 4) / 4)."""
        fe = self.extractor
        x = padded_batch(pieces, fe.n_samples, self.device)
        if fe.dither:
            x = x + fe.dither * torch.randn_like(x)
        spectrum = torch.stft(x, fe.n_fft, fe.hop_length, window=self.window, return_complex=True)
        power = spectrum[..., :-1].abs().pow(2)
        log_spec = (self.mel_filters @ power).clamp_min(1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0

    @torch.inference_mode()
    def forward(self, items: Sequence[tuple[np.ndarray, bool]], sample_rate: int
                ) -> list[tuple[np.ndarray, str | None]]:
        """items: (wave, transcribe?) → (frames, transcript or None) per item."""
        pieces = [(i, p.wave) for i, (w, _) in enumerate(items) for p in self.pieces(w, sample_rate)]
        features = self.log_mel([p for _, p in pieces]).to(TORCH_DTYPES[self.compute_dtype])
        enc = self.model.model.encoder(features, output_hidden_states=self.hidden.wanted)
        states = self.hidden.select(enc)
        frames: list[list[np.ndarray]] = [[] for _ in items]
        counts = [math.ceil(len(piece) / WHISPER_SAMPLES_PER_FRAME) for _, piece in pieces]
        for (i, _), piece_frames in zip(pieces, _host_frames(states, counts)):
            frames[i].append(piece_frames)
        texts: list[list[str]] = [[] for _ in items]
        asr_rows = [j for j, (i, _) in enumerate(pieces) if items[i][1]]
        if asr_rows:
            for j, text in zip(asr_rows, self.transcribe(enc.last_hidden_state[asr_rows])):
                texts[pieces[j][0]].append(text)
        return [(np.concatenate(f), " ".join(filter(None, t)).strip() if want else None)
                for f, t, (_, want) in zip(frames, texts, items)]

    def transcribe(self, last_hidden_state: torch.Tensor) -> list[str]:
        """Greedy transcripts from encoder states already computed (no second encoder pass)."""
        from transformers.modeling_outputs import BaseModelOutput

        if self.tokenizer is None:
            raise ValueError(f"encoder {self.cfg.name}: asr is off in the config")
        ids = self.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=last_hidden_state),
                                  max_new_tokens=self.max_new_tokens, **self.generate_kwargs)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


class TextEncoder:
    """A text model (RoBERTa or any AutoModel with a tokenizer) on transcripts: one vector per token."""

    def __init__(self, cfg: EncoderConfig, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        self.cfg, self.device = cfg, device
        self.compute_dtype = resolve_compute_dtype(cfg, device)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model, revision=cfg.revision)
        self.model = pretrained_model(AutoModel, cfg)
        self.model.to(device, TORCH_DTYPES[self.compute_dtype]).eval()
        self.hidden = HiddenStates(cfg, self.model.config)

    def batches(self, texts: Sequence[str], batch_seconds: float, sample_rate: int) -> list[list[int]]:
        lengths = [len(ids) for ids in self._tokenize(list(texts))["input_ids"]]
        return length_batches(lengths, TEXT_BATCH_TOKENS)

    def _tokenize(self, texts: list[str], **kwargs):
        return self.tokenizer(texts, truncation=True, max_length=self.cfg.max_tokens, **kwargs)

    @torch.inference_mode()
    def forward(self, texts: Sequence[str], sample_rate: int) -> list[np.ndarray]:
        inputs = self._tokenize(list(texts), padding=True, return_tensors="pt").to(self.device)
        out = self.model(**inputs, output_hidden_states=self.hidden.wanted)
        states = self.hidden.select(out)
        mask = inputs["attention_mask"].bool().cpu()
        host = states.float().cpu()
        return [host[j][mask[j]].numpy() for j in range(len(texts))]


Encoder = SpeechEncoder | WhisperEncoder | TextEncoder
def load_encoder(cfg: EncoderConfig, device: str = "cpu", language: str = "en", max_new_tokens: int = 128) -> Encoder:
    if cfg.kind == "speech":
        return SpeechEncoder(cfg, device)
    if cfg.kind == "whisper":
        return WhisperEncoder(cfg, device, language, max_new_tokens)
    return TextEncoder(cfg, device)


def run_batched(forward: Callable[[list], list], inputs: Sequence, batches: list[list[int]]
                ) -> tuple[dict[int, Any], dict[int, str]]:
    """Run `forward` per batch; when a batch fails, retry its items one by one so only the bad ones fail (a batch
    too big for memory may fit item by item). An error is kept as `Type: first line of its message`."""
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    for batch in batches:
        try:
            results.update(zip(batch, forward([inputs[i] for i in batch])))
            continue
        except Exception as exc:  # noqa: BLE001 - one bad input must not fail the others
            if len(batch) == 1:
                errors[batch[0]] = _reason(exc)
                continue
        for i in batch:
            try:
                results[i] = forward([inputs[i]])[0]
            except Exception as exc:  # noqa: BLE001
                errors[i] = _reason(exc)
    return results, errors


def _reason(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
