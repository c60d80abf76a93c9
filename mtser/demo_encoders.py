"""Small local encoders for the demo and the tests: randomly initialised models of the real architectures (WavLM,
Whisper with a working tokenizer and generation config, RoBERTa), saved with `save_pretrained`, so every consumer
loads them through `from_pretrained` exactly like the real checkpoints. Nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

from mtser.demo import SAMPLE_RATE, demo_sentences


def make_test_encoders(out_dir: Path, sentences: list[str] | None = None, seed: int = 0,
                       layers: int = 2) -> dict[str, Path]:
    """Build small random-init WavLM, Whisper (+tokenizer, processor, generation config) and RoBERTa models with
    `layers` transformer layers each (layers + 1 hidden states; the demo's have 2; Whisper's decoder keeps 2).

    Tokenizers are byte-level BPEs trained on `sentences` (default: the demo sentences), so any text encodes.
    Returns {"wavlm": dir, "whisper": dir, "roberta": dir}; each loads with `from_pretrained`.
    """
    out_dir = Path(out_dir)
    texts = list(sentences) if sentences is not None else demo_sentences()
    return {
        "wavlm": _save_wavlm(out_dir / "wavlm", seed, layers),
        "whisper": _save_whisper(out_dir / "whisper", texts, seed, layers),
        "roberta": _save_roberta(out_dir / "roberta", texts, seed, layers),
    }


def _train_bpe(
    texts: list[str], vocab_size: int, special_tokens: list[str]
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary and merge list trained on `texts` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _save_wavlm(out: Path, seed: int, layers: int) -> Path:
    import torch
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

    torch.manual_seed(seed)
    config = WavLMConfig(
        hidden_size=64, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=128,
        conv_dim=(32,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),  # 320 samples/frame
        feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, num_buckets=64, max_bucket_distance=200,
    )
    WavLMModel(config).eval().save_pretrained(out)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True, return_attention_mask=True,
    ).save_pretrained(out)
    return out


WHISPER_LANGUAGES = ("en", "de", "fr", "es")  # a prefix of Whisper's language order, so token ids follow its scheme


def _save_whisper(out: Path, texts: list[str], seed: int, layers: int) -> Path:
    import torch
    from transformers import (
        GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor,
        WhisperTokenizer,
    )

    vocab, merges = _train_bpe(texts, vocab_size=600, special_tokens=[])
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges)
    # Whisper's special tokens follow the text vocabulary in the real order: end of text, start of transcript,
    # languages, tasks, ..., no-timestamps, then the 1501 timestamp tokens (timestamp_begin = no_timestamps + 1).
    specials = ["<|endoftext|>", "<|startoftranscript|>", *[f"<|{lang}|>" for lang in WHISPER_LANGUAGES],
                "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                "<|notimestamps|>", *[f"<|{i * 0.02:.2f}|>" for i in range(1501)]]
    tokenizer.add_tokens(specials, special_tokens=True)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in specials}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    # Random weights would happily emit control or timestamp tokens forever; suppress them so output is text.
    suppress = [ids[tok] for tok in specials if tok != "<|endoftext|>"]

    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=128, d_model=64, encoder_layers=layers, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=448, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        decoder_start_token_id=sot, begin_suppress_tokens=[eot], suppress_tokens=suppress,
    )
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, max_length=448,
        is_multilingual=True, return_timestamps=False,
        lang_to_id={f"<|{lang}|>": ids[f"<|{lang}|>"] for lang in WHISPER_LANGUAGES},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        begin_suppress_tokens=[eot], suppress_tokens=suppress,
    )
    model.save_pretrained(out)
    extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLE_RATE)
    WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out)
    return out


def _save_roberta(out: Path, texts: list[str], seed: int, layers: int) -> Path:
    import torch
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    vocab, merges = _train_bpe(texts, vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tokenizer = RobertaTokenizer(vocab=vocab, merges=merges)
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=514, type_vocab_size=1, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    RobertaModel(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
