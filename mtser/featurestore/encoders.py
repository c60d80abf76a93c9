"""Frozen encoders through transformers: a speech SSL model, the Whisper encoder (+ASR from the same states), and a
text model on transcripts. Each takes a hub id or a local directory and returns one (T, D) float32 array per input.

Batching never changes an utterance's features:
- speech: length-sorted batches with an attention mask when the model normalises its conv features per frame
  (`feat_extract_norm="layer"`, WavLM-large); with group norm (`"group"`, WavLM-base) padding would change the
  statistics, so only utterances of identical length share a batch. Frames kept: the model's conv output length.
- whisper: every 30 s window is padded to 30 s as the model requires; ceil(samples / 320) frames are kept per window
  and windows are concatenated. Utterances without a transcript are decoded from the same encoder states.
- text: right-padded batches with an attention mask; one vector per token.

Keeping a GPU busy: each model runs in its `compute_dtype` (default bfloat16 on CUDA, float32 on CPU); the speech
models' input normalisation and Whisper's log-mel spectrogram are computed on the device from one padded batch
assembled in pinned host memory; the forward returns every layer's states only when an inner layer or a mean of
layers is asked (`wants_hidden_states`); features come back with one device-to-host copy per batch.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mtser.config import ConfigError, EncoderConfig, model_candidates, resolve_compute_dtype

WHISPER_WINDOW_S = 30
WHISPER_SAMPLES_PER_FRAME = 320
TEXT_BATCH_TOKENS = 8192


def wants_hidden_states(cfg: EncoderConfig) -> bool:
    """Whether the forward pass must return every layer's states: only for an inner layer or a mean of layers.
    The last layer alone is `last_hidden_state`, so the others are never kept."""
    return cfg.layer != -1 or cfg.mean_last_k > 1


def select_hidden(output: Any, layer: int, mean_last_k: int) -> torch.Tensor:
    """Hidden-state `layer` (0 = embeddings, -1 = last), or the mean of the last `mean_last_k` layers.

    The last entry is the model's `last_hidden_state` (after its final layer norm where it has one: WavLM-large's
    `hidden_states[-1]` in transformers 5 is taken before that norm), so `layer=-1` is what `model(...)` returns.
    """
    if layer == -1 and mean_last_k == 1:
        return output.last_hidden_state
    states = (*output.hidden_states[:-1], output.last_hidden_state)
    if mean_last_k > 1:
        return torch.stack(states[-mean_last_k:]).float().mean(dim=0)
    return states[layer]


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
    """A speech SSL model (WavLM, wav2vec 2.0, HuBERT, ... any AutoModel taking raw 16 kHz audio).

    Its feature extractor's per-utterance normalisation runs on the device, on the padded batch."""

    def __init__(self, cfg: EncoderConfig, device: str = "cpu"):
        from transformers import AutoFeatureExtractor, AutoModel

        self.cfg, self.device = cfg, device
        self.compute_dtype = resolve_compute_dtype(cfg, device)
        self.model = pretrained_model(AutoModel, cfg)
        self.model.to(device, TORCH_DTYPES[self.compute_dtype]).eval()
        self.extractor = AutoFeatureExtractor.from_pretrained(cfg.model, revision=cfg.revision)
        self.pads_safely = getattr(self.model.config, "feat_extract_norm", "layer") != "group"

    def batches(self, waves: Sequence[np.ndarray], batch_seconds: float, sample_rate: int) -> list[list[int]]:
        return length_batches([len(w) for w in waves], batch_seconds * sample_rate, equal_only=not self.pads_safely)

    def input_values(self, waves: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(padded, normalised input values, attention mask) on the device, as the feature extractor makes them:
        zero mean and unit variance over each utterance's own samples when it normalises, padding_value after."""
        sizes = [len(w) for w in waves]
        lengths = torch.tensor(sizes, device=self.device)
        x = padded_batch(waves, max(sizes), self.device)
        mask = torch.arange(x.shape[1], device=self.device)[None, :] < lengths[:, None]
        if getattr(self.extractor, "do_normalize", False):
            n = lengths[:, None].to(torch.float32)
            mean = x.sum(dim=1, keepdim=True) / n
            var = ((x - mean).pow(2) * mask).sum(dim=1, keepdim=True) / n
            x = (x - mean) / torch.sqrt(var + 1e-7)
        return torch.where(mask, x, float(getattr(self.extractor, "padding_value", 0.0))), mask

    @torch.inference_mode()
    def forward(self, waves: Sequence[np.ndarray], sample_rate: int) -> list[np.ndarray]:
        x, mask = self.input_values(waves)
        out = self.model(x.to(TORCH_DTYPES[self.compute_dtype]),
                         attention_mask=mask.long() if self.pads_safely else None,
                         output_hidden_states=wants_hidden_states(self.cfg))
        states = select_hidden(out, self.cfg.layer, self.cfg.mean_last_k)
        frames = self.model._get_feat_extract_output_lengths(torch.tensor([len(w) for w in waves]))
        return _host_frames(states, [int(n) for n in frames])


class WhisperEncoder:
    """Whisper's encoder (any WhisperForConditionalGeneration checkpoint); decodes transcripts from its own states.

    The log-mel spectrogram is computed on the device (`log_mel`, the feature extractor's own recipe in torch)."""

    def __init__(self, cfg: EncoderConfig, device: str = "cpu", language: str = "en", max_new_tokens: int = 128):
        from transformers import AutoFeatureExtractor, AutoTokenizer, WhisperForConditionalGeneration

        self.cfg, self.device, self.max_new_tokens = cfg, device, max_new_tokens
        self.compute_dtype = resolve_compute_dtype(cfg, device)
        self.model = pretrained_model(WhisperForConditionalGeneration, cfg)
        self.model.to(device, TORCH_DTYPES[self.compute_dtype]).eval()
        self.extractor = AutoFeatureExtractor.from_pretrained(cfg.model, revision=cfg.revision)
        self.mel_filters = torch.from_numpy(np.asarray(self.extractor.mel_filters, dtype=np.float32)).T.to(device)
        self.window = torch.hann_window(self.extractor.n_fft, device=device)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model, revision=cfg.revision) if cfg.asr else None
        multilingual = bool(getattr(self.model.generation_config, "lang_to_id", None))
        self.generate_kwargs = {"language": language, "task": "transcribe"} if multilingual else {}

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
        window = WHISPER_WINDOW_S * sample_rate
        pieces = [(i, w[s: s + window]) for i, (w, _) in enumerate(items) for s in range(0, len(w), window)]
        features = self.log_mel([p for _, p in pieces]).to(TORCH_DTYPES[self.compute_dtype])
        enc = self.model.model.encoder(features, output_hidden_states=wants_hidden_states(self.cfg))
        states = select_hidden(enc, self.cfg.layer, self.cfg.mean_last_k)
        frames: list[list[np.ndarray]] = [[] for _ in items]
        counts = [math.ceil(len(piece) / WHISPER_SAMPLES_PER_FRAME) for _, piece in pieces]
        for (i, _), piece_frames in zip(pieces, _host_frames(states, counts)):
            frames[i].append(piece_frames)
        texts: list[list[str]] = [[] for _ in items]
        asr_rows = [j for j, (i, _) in enumerate(pieces) if items[i][1]]
        if asr_rows:
            for j, text in zip(asr_rows, self.transcribe(enc.last_hidden_state[asr_rows])):
                texts[pieces[j][0]].append(text)
        return [(np.concatenate(f), " ".join(t).strip() if want else None)
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

    def batches(self, texts: Sequence[str], batch_seconds: float, sample_rate: int) -> list[list[int]]:
        lengths = [len(ids) for ids in self._tokenize(list(texts))["input_ids"]]
        return length_batches(lengths, TEXT_BATCH_TOKENS)

    def _tokenize(self, texts: list[str], **kwargs):
        return self.tokenizer(texts, truncation=True, max_length=self.cfg.max_tokens, **kwargs)

    @torch.inference_mode()
    def forward(self, texts: Sequence[str], sample_rate: int) -> list[np.ndarray]:
        inputs = self._tokenize(list(texts), padding=True, return_tensors="pt").to(self.device)
        out = self.model(**inputs, output_hidden_states=wants_hidden_states(self.cfg))
        states = select_hidden(out, self.cfg.layer, self.cfg.mean_last_k)
        mask = inputs["attention_mask"].bool().cpu()
        host = states.float().cpu()
        return [host[j][mask[j]].numpy() for j in range(len(texts))]


Encoder = SpeechEncoder | WhisperEncoder | TextEncoder
ALLOW_PICKLE_ENV = "MTSER_ALLOW_PICKLE_WEIGHTS"


def pretrained_model(cls: Any, cfg: EncoderConfig) -> Any:
    """`cls.from_pretrained` of the encoder's model with safetensors weights only: a pickled `pytorch_model.bin`
    can run code when loaded, and a config or a checkpoint sidecar names the model. `MTSER_ALLOW_PICKLE_WEIGHTS=1`
    (the user's environment, never a file mtser reads) allows pickled weights too."""
    allow = os.environ.get(ALLOW_PICKLE_ENV) == "1"
    try:
        return cls.from_pretrained(cfg.model, revision=cfg.revision, use_safetensors=None if allow else True)
    except OSError as exc:
        if allow or "safetensors" not in str(exc):
            raise
        raise ConfigError(f"encoder {cfg.name!r}: {cfg.model} has no safetensors weights and mtser does not load "
                          f"pickled ones (they can run code); convert the model to safetensors, or set "
                          f"{ALLOW_PICKLE_ENV}=1 if you trust it") from None


def load_encoder(cfg: EncoderConfig, device: str = "cpu", language: str = "en", max_new_tokens: int = 128) -> Encoder:
    if cfg.kind == "speech":
        return SpeechEncoder(cfg, device)
    if cfg.kind == "whisper":
        return WhisperEncoder(cfg, device, language, max_new_tokens)
    return TextEncoder(cfg, device)


def run_batched(forward: Callable[[list], list], inputs: Sequence, batches: list[list[int]]
                ) -> tuple[dict[int, Any], dict[int, str]]:
    """Run `forward` per batch; when a batch fails, retry its items one by one so only the bad ones fail."""
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    for batch in batches:
        try:
            results.update(zip(batch, forward([inputs[i] for i in batch])))
            continue
        except Exception as exc:  # noqa: BLE001 - one bad input must not fail the others
            if len(batch) == 1:
                errors[batch[0]] = f"{type(exc).__name__}: {exc}"
                continue
        for i in batch:
            try:
                results[i] = forward([inputs[i]])[0]
            except Exception as exc:  # noqa: BLE001
                errors[i] = f"{type(exc).__name__}: {exc}"
    return results, errors


# ----------------------------------------------------------------------------------------------- finding the models
OFFLINE_HINT = ("give a folder (relative to the config file or the current directory) or a hub id this machine can "
                "reach; offline (HF_HUB_OFFLINE=1) a hub id must already be in the Hugging Face cache, else use a "
                "local path")


def check_models(encoders: Sequence[EncoderConfig], config_dir: Path) -> None:
    """ConfigError naming `extract.encoders[i].model`, the folders tried and what to do, for the first encoder whose
    model is neither a local folder (`model_candidates`) nor a hub id whose config this machine can load."""
    for i, enc in enumerate(encoders):
        tried = model_candidates(enc.model, config_dir)
        if any(path.is_dir() for path in tried):
            continue
        reason = _hub_problem(enc.model, enc.revision)
        if reason is not None:
            raise ConfigError(f"extract.encoders[{i}].model: {enc.model!r} is not a folder (tried "
                              f"{', '.join(str(p) for p in tried)}) and {reason}; {OFFLINE_HINT}")


def _hub_problem(model: str, revision: str | None) -> str | None:
    """None when `model` is a hub id whose config loads (from the cache or the hub), else why not."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    from transformers import AutoConfig

    try:
        validate_repo_id(model)
    except HFValidationError:
        return "not a hub id ('name' or 'namespace/name')"
    try:
        AutoConfig.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"the hub id cannot be loaded ({first[:200]})"
    return None


# ------------------------------------------------------------------------------------------------------- provenance
def encoder_dim_and_rate(cfg: EncoderConfig, sample_rate: int) -> tuple[int, float]:
    """Feature width and frames per second of audio (0.0 for text tokens), read from the model config only."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.model, revision=cfg.revision)
    if cfg.kind == "whisper":
        return int(config.d_model), sample_rate / WHISPER_SAMPLES_PER_FRAME
    if cfg.kind == "speech":
        return int(config.hidden_size), sample_rate / float(np.prod(config.conv_stride))
    return int(config.hidden_size), 0.0


def content_hash(model: str) -> str | None:
    """sha256 over a local model directory's file names and bytes (None for hub ids: the revision identifies them)."""
    root = Path(model)
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
