"""A byte-level BPE `tokenizers.Tokenizer` rebuilt from a GGUF file's vocabulary.

A GGUF carries no tokenizer.json, only llama.cpp's fields: `tokenizer.ggml.model`
("gpt2" = byte-level BPE), `.tokens`, `.token_type`, `.merges`, `.pre` (which
pre-tokenizer the merges were learned with), the special ids and the chat template.
We rebuild the Hugging Face tokenizer those fields came from:

  model          BPE(vocab = tokens, merges), no unk, no byte fallback
  pre-tokenizer  chosen by `.pre` so text is split exactly as at training time;
                 SmolLM2 ("smollm"): every digit alone, then GPT-2's ByteLevel regex,
                 which is its original tokenizer.json
  added tokens   CONTROL tokens (type 3, e.g. <|im_start|>) as special tokens and
                 USER_DEFINED ones (type 4) as plain added tokens, so they are
                 matched whole in text instead of being cut into bytes
  decoder        ByteLevel

Only byte-level BPE vocabularies are supported (Llama 3, SmolLM, Qwen2, GPT-2
style); sentencepiece ("llama") vocabularies get a clear error.
"""
import functools

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

_CONTROL, _USER_DEFINED = 3, 4

# Split regexes of the Hugging Face tokenizer.json files these vocabularies come from.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(regex: str) -> pre_tokenizers.PreTokenizer:
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _gpt2() -> pre_tokenizers.PreTokenizer:
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm() -> pre_tokenizers.PreTokenizer:
  # llama.cpp's "smollm": "\p{N}" then the GPT-2 regex; HF's tokenizer.json spells
  # it Digits(individual_digits) + ByteLevel(use_regex).
  return pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


# tokenizer.ggml.pre -> pre-tokenizer factory.
PRE_TOKENIZERS = {
    "default": _gpt2,
    "gpt2": _gpt2,
    "smollm": _smollm,
    "llama-bpe": functools.partial(_split_then_bytes, _LLAMA3_SPLIT),
    "llama3": functools.partial(_split_then_bytes, _LLAMA3_SPLIT),
    "qwen2": functools.partial(_split_then_bytes, _QWEN2_SPLIT),
}


@functools.cache
def _byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> printable character table (bytes_to_unicode)."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def build_tokenizer(fields: dict, source: str = "GGUF") -> tokenizers.Tokenizer:
  """Builds the `tokenizers.Tokenizer` described by GGUF tokenizer fields.

  Args:
    fields: GGUF metadata with the "tokenizer.ggml." prefix stripped: "model",
      "pre" (optional), "tokens" (list[str]), "token_type" (list[int], optional),
      "merges" (list[str] "a b").
    source: the file, for error messages.
  """
  kind = fields.get("model")
  if kind != "gpt2":
    raise ValueError(
        f"{source}: tokenizer.ggml.model={kind!r} is not supported; only byte-level "
        "BPE vocabularies ('gpt2': Llama 3, SmolLM, Qwen2) can be rebuilt. Use the "
        "model's Hugging Face directory instead.")
  pre = fields.get("pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise ValueError(
        f"{source}: unknown pre-tokenizer tokenizer.ggml.pre={pre!r}; supported: "
        f"{sorted(PRE_TOKENIZERS)}")
  if "merges" not in fields:
    raise ValueError(f"{source}: the vocabulary has no tokenizer.ggml.merges")
  tokens = list(fields["tokens"])
  alphabet = _byte_alphabet()
  printable = set(alphabet.values())
  # Tokens are stored in the byte alphabet already; respell any that are not
  # (some converters store raw text), as transformers' GGUF conversion does.
  spelled = [t if set(t) <= printable else "".join(alphabet[b] for b in t.encode())
             for t in tokens]
  vocab = {t: i for i, t in enumerate(spelled)}
  if len(vocab) != len(spelled):
    raise ValueError(f"{source}: the vocabulary has duplicate tokens")
  merges = [tuple(m.split(" ")) for m in fields["merges"]]
  bad = [m for m in merges if len(m) != 2]
  if bad:
    raise ValueError(f"{source}: malformed merges, e.g. {bad[0]!r}")
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                        byte_fallback=False))
  if pre == "qwen2":
    tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
  tok.decoder = decoders.ByteLevel()
  types = list(fields.get("token_type") or [])
  special = [tokenizers.AddedToken(t, special=True, normalized=False)
             for t, ty in zip(spelled, types) if ty == _CONTROL]
  user = [tokenizers.AddedToken(t, special=False, normalized=False)
          for t, ty in zip(spelled, types) if ty == _USER_DEFINED]
  if special:
    tok.add_special_tokens(special)
  if user:
    tok.add_tokens(user)
  if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
    raise ValueError(f"{source}: rebuilt tokenizer has "
                     f"{tok.get_vocab_size(with_added_tokens=True)} tokens, the file "
                     f"lists {len(tokens)}")
  return tok
