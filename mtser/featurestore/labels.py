"""The one label map of the project: class codes, attribute names, split names."""
from __future__ import annotations

CLASSES: tuple[str, ...] = ("A", "S", "H", "U", "F", "D", "C", "N")  # the challenge's order; model logits follow it
CLASS_NAMES: dict[str, str] = {
    "A": "angry", "S": "sad", "H": "happy", "U": "surprise", "F": "fear", "D": "disgust", "C": "contempt",
    "N": "neutral", "O": "other", "X": "no agreement",
}
EXTRA_CLASSES: tuple[str, ...] = ("O", "X")  # valid in label files, never predicted
ALL_CLASS_CODES: tuple[str, ...] = CLASSES + EXTRA_CLASSES
CLASS_INDEX: dict[str, int] = {c: i for i, c in enumerate(CLASSES)}

ATTRIBUTES: tuple[str, ...] = ("arousal", "valence", "dominance")
ATTRIBUTE_COLUMNS: dict[str, str] = {"arousal": "EmoAct", "valence": "EmoVal", "dominance": "EmoDom"}
ATTRIBUTE_RANGE: tuple[float, float] = (1.0, 7.0)

SPLITS: tuple[str, ...] = ("Train", "Development", "Test1", "Test2", "Test3")
