"""PaliGemma prompt tokenization for Pi0 / Pi0.5 (openpi `models/tokenizer.py: PaligemmaTokenizer`).

- The task text is cleaned: strip(), "_" -> " ", "\\n" -> " ".
- Pi0 (and Pi0.5 with discrete_state_input=False): bos + encode(text) + encode("\\n").
- Pi0.5: bos + encode(f"Task: {text}, State: {bins};\\nAction: "), bins = the normalized
  state digitized into 256 bins over [-1, 1] (np.digitize(s, linspace(-1, 1, 257)[:-1]) - 1,
  so a value below -1 gives -1 and one at or above 1 gives 255), joined by spaces.
- Right-padded with id 0 to max_len with a validity mask; a longer prompt is cut to
  max_len (the tail, "\\n" / "Action: " included, is lost) with a warning.
- An empty task is a valid prompt (openpi only refuses a missing one).

The tokenizer file: a SentencePiece model or a HF tokenizer.json, looked up in the
checkpoint directory, then in openpi's download cache and the Hugging Face cache.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece
from tokenizers import Tokenizer

from .errors import CheckpointError, PromptError

log = logging.getLogger(__name__)

CHECKPOINT_TOKENIZER_FILES = ("tokenizer.model", "paligemma_tokenizer.model", "tokenizer.json")
HF_TOKENIZER_REPO = "google/paligemma-3b-pt-224"


class SentencePieceText:
    def __init__(self, path: Path):
        self.path = path
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.bos_id = self._sp.bos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)


class HFTokenizerText:
    """A tokenizers `tokenizer.json` (LeRobot uses the HF PaliGemma tokenizer)."""

    def __init__(self, path: Path):
        self.path = path
        self._tok = Tokenizer.from_file(str(path))
        self.bos_id = self._tok.token_to_id("<bos>")
        if self.bos_id is None:
            raise CheckpointError(f"{path} has no <bos> token")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids


def tokenizer_search_paths(checkpoint: Path) -> list[Path]:
    openpi_cache = Path(os.environ.get("OPENPI_DATA_HOME", "~/.cache/openpi")).expanduser()
    hf_hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = hf_hub.expanduser() / f"models--{HF_TOKENIZER_REPO.replace('/', '--')}" / "snapshots"
    paths = [checkpoint / name for name in CHECKPOINT_TOKENIZER_FILES]
    paths.append(openpi_cache / "big_vision" / "paligemma_tokenizer.model")
    for snapshot in sorted(snapshots.glob("*")) if snapshots.is_dir() else []:
        paths += [snapshot / "tokenizer.model", snapshot / "tokenizer.json"]
    return paths


def load_text_tokenizer(checkpoint: Path):
    candidates = tokenizer_search_paths(Path(checkpoint))
    for path in candidates:
        if path.is_file():
            try:
                return HFTokenizerText(path) if path.suffix == ".json" else SentencePieceText(path)
            except Exception as e:  # noqa: BLE001 - sentencepiece / tokenizers raise untyped errors on bad files
                raise CheckpointError(f"cannot load tokenizer {path}: {e}") from e
    raise CheckpointError(
        "no PaliGemma tokenizer found; put the SentencePiece model (gs://big_vision/paligemma_tokenizer.model, "
        f"as tokenizer.model) or a tokenizer.json into {checkpoint}. Looked at: "
        + ", ".join(str(p) for p in candidates))


def clean_text(prompt: str) -> str:
    return prompt.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state: np.ndarray) -> np.ndarray:
    """Normalized state -> int bins in [-1, 255] (256 equal bins over [-1, 1])."""
    return np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1


def pi05_prompt(text: str, state_bins: np.ndarray) -> str:
    return f"Task: {clean_text(text)}, State: {' '.join(map(str, state_bins))};\nAction: "


@dataclass(frozen=True)
class TokenizedPrompt:
    tokens: np.ndarray        # int64 [max_len], 0-padded
    mask: np.ndarray          # bool [max_len]
    num_tokens: int           # valid tokens (after truncation)
    truncated: bool


class PromptTokenizer:
    """Builds the model's token sequence from a task prompt (and the state for Pi0.5)."""

    def __init__(self, text_tokenizer, max_len: int, discrete_state: bool):
        self.text = text_tokenizer
        self.max_len = max_len
        self.discrete_state = discrete_state

    def tokenize(self, prompt, state: np.ndarray | None = None) -> TokenizedPrompt:
        """state: the normalized, un-padded state (used only when discrete_state)."""
        if not isinstance(prompt, str):
            raise PromptError(f"prompt must be a str, got {type(prompt).__name__}")
        if self.discrete_state:
            ids = [self.text.bos_id, *self.text.encode(pi05_prompt(prompt, discretize_state(state)))]
        else:
            ids = self._pi0_ids(prompt)
        return self._pad(ids)

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one tokenizer per policy; prompts repeat every tick
    def _pi0_ids(self, prompt: str) -> list[int]:
        return [self.text.bos_id, *self.text.encode(clean_text(prompt)), *self.text.encode("\n")]

    def _pad(self, ids: list[int]) -> TokenizedPrompt:
        truncated = len(ids) > self.max_len
        if truncated:
            log.warning("prompt is %d tokens, more than the model's %d: truncated (the end of the prompt is lost)",
                        len(ids), self.max_len)
            ids = ids[:self.max_len]
        tokens = np.zeros(self.max_len, dtype=np.int64)
        tokens[:len(ids)] = ids
        return TokenizedPrompt(tokens, np.arange(self.max_len) < len(ids), len(ids), truncated)
