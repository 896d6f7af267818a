"""Tokenizers: a Hugging Face `tokenizer.json`, a GGUF vocabulary, or bytes (tests).

All expose the same small interface: `encode(text, add_bos=False) -> list[int]`,
`decode(ids) -> str` (stops at EOS, drops special tokens), `bos_id`, `eos_id`,
`pad_id`, `vocab_size`, `chat_template` (a Jinja string or None) and
`fingerprint()` (sha256 of everything that determines the token ids).
"""
import hashlib
import json
import pathlib

import numpy as np
import tokenizers


class Tokenizer:
  """Wraps a `tokenizers.Tokenizer` (tokenizer.json or built from GGUF fields)."""

  def __init__(self, tok: tokenizers.Tokenizer, *, bos_id: int, eos_id: int,
               pad_id: int | None = None, chat_template: str | None = None,
               add_bos: bool = False, name: str = ""):
    self._tok = tok
    self.bos_id, self.eos_id = int(bos_id), int(eos_id)
    self.pad_id = int(eos_id if pad_id is None else pad_id)
    self.chat_template = chat_template
    self.add_bos_default = add_bos
    self.name = name
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    self._special = {self.bos_id, self.eos_id, self.pad_id}
    self._fingerprint = None

  @classmethod
  def from_file(cls, path: str | pathlib.Path, config: dict | None = None
                ) -> "Tokenizer":
    """Loads tokenizer.json; specials from tokenizer_config.json / config.json."""
    path = pathlib.Path(path)
    tok_file = path / "tokenizer.json" if path.is_dir() else path
    if not tok_file.exists():
      raise FileNotFoundError(f"no tokenizer.json at {tok_file}")
    tok = tokenizers.Tokenizer.from_file(str(tok_file))
    folder = tok_file.parent
    tcfg_file = folder / "tokenizer_config.json"
    tcfg = json.loads(tcfg_file.read_text()) if tcfg_file.exists() else {}
    config = config or {}

    def token_id(field, fallback):
      value = tcfg.get(field)
      if isinstance(value, dict):
        value = value.get("content")
      if isinstance(value, str) and tok.token_to_id(value) is not None:
        return tok.token_to_id(value)
      return config.get(f"{field}_id", fallback)

    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    bos = token_id("bos_token", config.get("bos_token_id"))
    eos = token_id("eos_token", eos)
    if eos is None:
      raise ValueError(f"{folder}: cannot find the EOS token id")
    template = tcfg.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.exists():
      template = jinja.read_text()
    bos = bos if bos is not None else eos
    # BOS comes either from tokenizer_config's add_bos_token (Llama 2) or from the
    # tokenizer.json post-processor (Llama 3): ask the tokenizer itself.
    probe = tok.encode("a", add_special_tokens=True).ids
    add_bos = bool(tcfg.get("add_bos_token", False)) or (bool(probe) and probe[0] == bos)
    return cls(tok, bos_id=bos, eos_id=eos, pad_id=token_id("pad_token", None),
               chat_template=template, add_bos=add_bos, name=str(folder))

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    """Token ids of `text` without the tokenizer's own specials; BOS first if
    `add_bos`."""
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return ([self.bos_id] if add_bos else []) + ids

  def decode(self, ids) -> str:
    """Text of `ids` up to the first EOS, with BOS/EOS/PAD dropped."""
    out = []
    for i in np.asarray(ids).tolist():
      if i == self.eos_id:
        break
      if i not in self._special:
        out.append(i)
    return self._tok.decode(out, skip_special_tokens=False)

  def to_str(self) -> str:
    """The tokenizer.json text (tokenizers.Tokenizer.from_str rebuilds it)."""
    return self._tok.to_str()

  def fingerprint(self) -> str:
    """sha256 of the tokenizer.json and the BOS/EOS/PAD ids (what fixes the ids).

    Computed once (0.1-0.4 s for a 49k vocabulary): the wrapped tokenizer and the
    ids never change after construction."""
    if self._fingerprint is None:
      self._fingerprint = hashlib.sha256(
          (self.to_str() + json.dumps([self.bos_id, self.eos_id, self.pad_id])
           ).encode()).hexdigest()
    return self._fingerprint


class ByteTokenizer:
  """UTF-8 bytes as tokens 0-255, then BOS, EOS, PAD: for the tiny random model."""

  def __init__(self):
    self.bos_id, self.eos_id, self.pad_id = 256, 257, 258
    self.vocab_size = 259
    self.chat_template = None
    self.add_bos_default = True
    self.name = "bytes"

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    """The UTF-8 bytes of `text` as ids; BOS first if `add_bos`."""
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    return ([self.bos_id] if add_bos else []) + list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    """UTF-8 text of the byte ids up to the first EOS (other specials dropped;
    invalid bytes replaced)."""
    out = bytearray()
    for i in np.asarray(ids).tolist():
      if i == self.eos_id:
        break
      if i < 256:
        out.append(i)
    return out.decode("utf-8", errors="replace")

  def fingerprint(self) -> str:
    """A constant: the byte tokenizer has no parameters."""
    return hashlib.sha256(b"byte-tokenizer-v1").hexdigest()
