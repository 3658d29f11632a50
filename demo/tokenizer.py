"""A small byte-level BPE for the demo model, trained on the rendered training corpus.

The pipeline is Qwen3.5's (NFC, the Qwen2 split regex with \\p{M} in the letter classes, byte-level
BPE), so llama.cpp's `qwen35` pre-tokenizer reproduces it; Qwen's special and markup tokens are
single added tokens, appended after the learned vocabulary as in Qwen's own tokenizers.

One deliberate difference from Qwen's vocabulary: no learned token joins letters to what precedes
them (" Lisbon", '"Lisbon'), nor newlines to punctuation. Qwen's regex glues a leading space or
quote to a word, so a word would be one token in the user's sentence, another after a newline in a
tool call and a third inside JSON; a model this small cannot learn those pairings for names it has
never seen, but it can learn to copy identical tokens. Training merges only within letter runs
(and within the other pieces) gives " Lisbon" -> "Ġ" + "Lisbon" under the unchanged Qwen regex.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

# Qwen2's pre-tokenizer regex with \p{M} added to the letter classes (llama.cpp: LLAMA_VOCAB_PRE_TYPE_QWEN35)
SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MARKUP_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# only while learning merges: letter runs and newline runs are isolated inside Qwen's pieces
TRAINING_SPLIT = r"[\p{L}\p{M}]+|[\r\n]+"
TOKENIZER_CLASS = "Qwen3_5Tokenizer"  # what transformers 5 uses for qwen3_5* directories anyway


def _pre_tokenizer(training: bool = False):
    from tokenizers import Regex, pre_tokenizers

    splits = [pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False)]
    if training:
        splits.append(pre_tokenizers.Split(Regex(TRAINING_SPLIT), behavior="isolated", invert=False))
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _pipeline(model, training: bool = False):
    from tokenizers import Tokenizer, decoders, normalizers

    tok = Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(training)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A tokenizers.Tokenizer: `vocab_size` learned tokens (all 256 bytes included), then the added tokens."""
    from tokenizers import AddedToken, models, pre_tokenizers, trainers

    tok = _pipeline(models.BPE(byte_fallback=False, fuse_unk=False), training=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    # the markup must not be learned as pieces of ordinary text: hide it from the trainer
    hidden = CONTROL_TOKENS + MARKUP_TOKENS

    def strip(text: str) -> str:
        for t in hidden:
            text = text.replace(t, "\n")
        return text

    tok.train_from_iterator((strip(t) for t in texts), trainer=trainer)
    tok.pre_tokenizer = _pre_tokenizer()
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    return tok


def save_hf_tokenizer(tok, out_dir: Path, chat_template: str) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja, loadable by AutoTokenizer."""
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                 unk_token=None, bos_token=None, clean_up_tokenization_spaces=False)
    hf.chat_template = chat_template
    hf.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = TOKENIZER_CLASS
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


def special_ids(tok) -> dict[str, int]:
    return {t: tok.token_to_id(t) for t in CONTROL_TOKENS + MARKUP_TOKENS}
