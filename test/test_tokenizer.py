"""Prompt formats (byte-exact), state binning, padding / truncation, tokenizer files and lookup."""

import logging

import numpy as np
import pytest
import sentencepiece

from flashrt_core.errors import CheckpointError, PromptError
from flashrt_core.synthetic import train_tokenizer
from flashrt_core.tokenizer import (HFTokenizerText, PromptTokenizer, SentencePieceText, clean_text,
                                    discretize_state, load_text_tokenizer, pi05_prompt)


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(train_tokenizer())
    return path


@pytest.fixture(scope="module")
def sp(sp_file):
    return sentencepiece.SentencePieceProcessor(model_file=str(sp_file))


def test_text_cleaning():
    assert clean_text("  pick_up the\nred block \n") == "pick up the red block"


def test_state_bins_edges():
    # 256 bins of width 1/128 over [-1, 1]; below -1 -> -1, at or above the last edge -> 255.
    state = np.array([-1.5, -1.0, -0.99, 0.0, 0.5, 0.9921875, 1.0, 3.0, -1 + 1 / 128])
    assert discretize_state(state).tolist() == [-1, 0, 1, 128, 192, 255, 255, 255, 1]


def test_pi05_prompt_string_is_byte_exact():
    bins = discretize_state(np.array([-1.0, 0.0, 0.99, -2.0]))
    assert pi05_prompt(" pick_up the\ncup ", bins) == "Task: pick up the cup, State: 0 128 254 -1;\nAction: "


def test_pi0_and_pi05_token_ids(sp, sp_file):
    text = SentencePieceText(sp_file)
    pi0 = PromptTokenizer(text, 32, discrete_state=False).tokenize(" pick_up the cup\n")
    expected = sp.encode("pick up the cup", add_bos=True) + sp.encode("\n")
    assert pi0.num_tokens == len(expected) and not pi0.truncated
    assert pi0.tokens[:len(expected)].tolist() == expected and not pi0.tokens[len(expected):].any()
    assert pi0.mask.tolist() == [True] * len(expected) + [False] * (32 - len(expected))
    assert expected[0] == 2 and expected[-1] == sp.piece_to_id("\n")

    state = np.array([-1.0, 0.0, 0.5])
    pi05 = PromptTokenizer(text, 64, discrete_state=True).tokenize("open_drawer", state)
    expected = sp.encode("Task: open drawer, State: 0 128 192;\nAction: ", add_bos=True)
    assert pi05.tokens[:pi05.num_tokens].tolist() == expected and pi05.num_tokens == len(expected)


def test_truncation_keeps_the_head_and_warns(sp_file, sp, caplog):
    tokenizer = PromptTokenizer(SentencePieceText(sp_file), 8, discrete_state=False)
    prompt = "pick up the red block and put it in the green bowl"
    full = sp.encode(prompt, add_bos=True) + sp.encode("\n")
    with caplog.at_level(logging.WARNING, logger="flashrt_core.tokenizer"):
        out = tokenizer.tokenize(prompt)
    assert out.truncated and out.num_tokens == 8 and out.mask.all()
    assert out.tokens.tolist() == full[:8]
    assert "truncated" in caplog.text


def test_empty_prompt_is_valid_and_non_text_is_not(sp_file, sp):
    tokenizer = PromptTokenizer(SentencePieceText(sp_file), 8, discrete_state=False)
    assert tokenizer.tokenize("").tokens[:2].tolist() == [2, sp.piece_to_id("\n")]
    with pytest.raises(PromptError):
        tokenizer.tokenize(None)
    with pytest.raises(PromptError):
        tokenizer.tokenize(b"bytes")


def tokenizer_json_from(sp, path):
    """A tokenizers BPE equivalent of the SentencePiece model (merges ranked by merged-piece id,
    byte fallback, "\n" as an added token), the way HF converts Gemma's tokenizer."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers

    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    plain = [p for p, i in vocab.items() if not (sp.is_control(i) or sp.is_byte(i))]
    merges = sorted(((a, b) for a in plain for b in plain if a + b in vocab), key=lambda m: vocab[m[0] + m[1]])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.add_special_tokens([AddedToken(t, special=True) for t in ["<pad>", "<eos>", "<bos>", "<unk>"]])
    tok.add_tokens([AddedToken("\n", normalized=False)])
    tok.save(str(path))
    return path


def test_tokenizer_json_encodes_like_sentencepiece(sp, sp_file, tmp_path):
    hf = HFTokenizerText(tokenizer_json_from(sp, tmp_path / "tokenizer.json"))
    spt = SentencePieceText(sp_file)
    assert hf.bos_id == spt.bos_id == 2
    for text in ["Task: pick up the red block, State: 12 255 -1;\nAction: ", "\n", "w\u00f6rld \u2713 \u65e5", "a_b  c"]:
        assert hf.encode(text) == spt.encode(text), text
    expected = sp.encode("cup", add_bos=True) + sp.encode("\n")
    assert PromptTokenizer(hf, 16, discrete_state=False).tokenize("cup").tokens[:len(expected)].tolist() == expected


def test_lookup_order_and_missing(tmp_path, sp_file, monkeypatch):
    monkeypatch.setenv("OPENPI_DATA_HOME", str(tmp_path / "openpi"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    with pytest.raises(CheckpointError, match="tokenizer.model.*into .*ckpt"):
        load_text_tokenizer(checkpoint)
    snapshot = tmp_path / "hf/hub/models--google--paligemma-3b-pt-224/snapshots/abc"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.model").write_bytes(sp_file.read_bytes())
    assert load_text_tokenizer(checkpoint).path == snapshot / "tokenizer.model"
    cache = tmp_path / "openpi/big_vision"
    cache.mkdir(parents=True)
    (cache / "paligemma_tokenizer.model").write_bytes(sp_file.read_bytes())
    assert load_text_tokenizer(checkpoint).path == cache / "paligemma_tokenizer.model"
    (checkpoint / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match="cannot load tokenizer"):
        load_text_tokenizer(checkpoint)
