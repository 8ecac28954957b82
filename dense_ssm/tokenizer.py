"""Tokenizers: SentencePiece (`.model`, with a trainer) and Hugging Face (`tokenizer.json`).

`load_file(path)` (also `Tokenizer.from_file`) reads either kind and returns an object with one
interface: `encode(str) -> list[int]` (no BOS/EOS added), `decode(ids) -> str` (special tokens
dropped), `vocab_size`, `bos_id`, `eos_id`, `pad_id`, `file_name` (the file an export stores
it as) and `to_bytes()` (that file's bytes, carried verbatim).

SentencePiece ids follow LLaMA: `<unk>` = 0, `<s>` (BOS) = 1, `</s>` (EOS) = 2. SentencePiece
has no pad piece here; padded positions hold id 0 and are masked out by the data pipeline's
weights, so `pad_id` is 0 for both kinds. Trained models use BPE with byte fallback, identity
normalisation and no whitespace folding, so any text (source code, indentation, newlines,
emoji) round-trips: `decode(encode(s)) == s`.

Hugging Face tokenizers (the optional `tokenizers` library, imported when one is read: `pip
install tokenizers`, or the `hf` extra) name no BOS or EOS in tokenizer.json itself, so:
  - EOS is the special token a template post-processor puts last (`$A </s>`, BERT/RoBERTa's
    sep), else the first of `</s>`, `<|endoftext|>`, `<|end_of_text|>`, `<eos>` in the vocabulary.
  - BOS is the special token a template post-processor puts first (`<s> $A`, LLaMA; BERT/RoBERTa's
    cls), else the first of `<s>`, `<|begin_of_text|>`, `<bos>`, `<|startoftext|>`; else EOS
    itself: GPT-2 and GPT-NeoX (the `state-spaces/mamba-*-hf` checkpoints) have only
    `<|endoftext|>` (id 0 in GPT-NeoX), which separates documents, so a document reads
    `<|endoftext|> text` as in their training data.
  - A tokenizer with neither has `bos_id == eos_id == -1`: training needs data.add_bos=false
    and data.add_eos=false, and generation stops only at max_new_tokens.
An export or converted checkpoint stores its BOS/EOS ids in its config.json; those ids (a
checkpoint's own bos_token_id / eos_token_id) take precedence over the rule at inference.
The vocabulary size is one more than the largest id (added tokens included). Truncation and
padding settings in tokenizer.json are switched off: `encode` returns every token.
"""

from __future__ import annotations

import collections
import io
import json
import os
import re
from typing import Iterable, Iterator, Sequence

from dense_ssm import fs

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
PAD_ID = 0
SP_FILE, HF_FILE = "tokenizer.model", "tokenizer.json"
FILE_NAMES = (SP_FILE, HF_FILE)  # what an export or checkpoint directory may hold, in this order
_MAX_PIECE_TEXT = 2000  # characters per training "sentence" (SentencePiece skips longer ones)


class Tokenizer:
  """A SentencePiece model: `encode(str) -> list[int]` (no BOS/EOS added), `decode(ids) -> str`."""

  file_name = SP_FILE

  def __init__(self, model_proto: bytes, path: str = ""):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    self._proto = bytes(model_proto)
    self.path = path
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    except RuntimeError:
      where = f"tokenizer file {path!r}" if path else "the tokenizer model"
      raise ValueError(f"{where} is not a SentencePiece model ({len(self._proto):,} bytes that "
                       "do not parse as one); give the tokenizer.model the model was trained "
                       "with") from None
    self._byte_values = None

  @classmethod
  def from_file(cls, path: str) -> "Tokenizer | HFTokenizer":
    """`load_file(path)`: a SentencePiece model, or an `HFTokenizer` for a tokenizer.json."""
    del cls
    return load_file(path)

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def model_proto(self) -> bytes:
    return self._proto

  def to_bytes(self) -> bytes:
    return self._proto

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  @property
  def byte_values(self) -> list[int]:
    """Per id: the byte of a byte-fallback piece (`<0xAB>` -> 0xAB), else -1 (the contract
    `IncrementalDecoder` reads; `HFTokenizer.byte_values` states it in general)."""
    if self._byte_values is None:
      self._byte_values = [int(self._sp.id_to_piece(i)[1:-1], 16) if self._sp.is_byte(i) else -1
                           for i in range(self.vocab_size)]
    return self._byte_values

  def plain_piece(self) -> int | None:
    """An id whose piece decodes to its own non-empty text in any context and does not start a
    word (no leading space): a normal piece, not a byte, control or unknown one. None if the
    vocabulary has none."""
    sp = self._sp
    for i in range(self.vocab_size):
      if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
        continue
      piece = sp.id_to_piece(i)
      if piece and not piece.startswith("\u2581") and sp.decode([i]) == piece:
        return i
    return None

  def __getstate__(self):  # picklable, for multiprocess data workers
    return {"proto": self._proto, "path": self.path}

  def __setstate__(self, state):
    self.__init__(state["proto"], path=state["path"])


def load_file(path: str) -> "Tokenizer | HFTokenizer":
  """Reads a SentencePiece .model or a Hugging Face tokenizer.json (told apart by content: a
  JSON object is the latter). `path` may be a URL (gs://..., dense_ssm/fs.py)."""
  if fs.isdir(path):
    raise ValueError(f"tokenizer file {path!r} is a directory; give the tokenizer file itself "
                     f"(e.g. {os.path.join(path, SP_FILE)!r} or {os.path.join(path, HF_FILE)!r})")
  try:
    data = fs.read_bytes(path)
  except FileNotFoundError:
    raise FileNotFoundError(
        f"tokenizer file {path!r} does not exist; fix the path (for training, "
        "data.tokenizer='' trains a new one)") from None
  if path.endswith(".json") or data.lstrip()[:1] == b"{":
    return HFTokenizer(data, path=path)
  return Tokenizer(data, path=path)


def find_file(directory: str) -> str | None:
  """The tokenizer file of an export or checkpoint directory (FILE_NAMES, first found)."""
  for name in FILE_NAMES:
    path = os.path.join(directory, name)
    if fs.isfile(path):
      return path
  return None


_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


def _byte_level_decoder(spec: dict) -> bool:
  decoder = spec.get("decoder") or {}
  parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
  return any(isinstance(d, dict) and d.get("type") == "ByteLevel" for d in parts)


def _byte_level_alphabet() -> dict[str, int]:
  """Character -> byte of the byte-level BPE alphabet (GPT-2): printable Latin-1 bytes stand for
  themselves; the other 68 bytes, in increasing order, for U+0100, U+0101, ..."""
  shown = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  hidden = [b for b in range(256) if b not in shown]
  return {**{chr(b): b for b in shown}, **{chr(256 + k): b for k, b in enumerate(hidden)}}


def _template_ids(tok, spec: dict) -> tuple[int | None, int | None]:
  """(first, last) special token ids the post-processor adds around a single sequence."""
  pp = spec.get("post_processor") or {}
  procs = pp.get("processors", []) if pp.get("type") == "Sequence" else [pp]
  first = last = None
  for p in procs:
    if not isinstance(p, dict):
      continue
    if p.get("type") in ("BertProcessing", "RobertaProcessing"):
      first, last = p["cls"][1], p["sep"][1]
    elif p.get("type") == "TemplateProcessing" and p.get("single"):
      specials = p.get("special_tokens") or {}

      def special_id(item):
        name = (item.get("SpecialToken") or {}).get("id")
        ids = (specials.get(name) or {}).get("ids") or []
        return ids[0] if len(ids) == 1 else (tok.token_to_id(name) if name else None)

      first = special_id(p["single"][0]) if first is None else first
      last = special_id(p["single"][-1]) if last is None else last
  return first, last


class HFTokenizer:
  """A Hugging Face tokenizer.json behind `Tokenizer`'s interface (BOS/EOS: module docstring)."""

  file_name = HF_FILE

  def __init__(self, data: bytes, path: str = ""):
    try:
      from tokenizers import Tokenizer as _Tokenizer  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ValueError(f"{path or 'a tokenizer.json'} needs the tokenizers library: pip install "
                       "tokenizers (or pip install -e '.[hf]')") from None
    self._data = bytes(data)
    self.path = path
    where = f"tokenizer file {path!r}" if path else "the tokenizer"
    try:
      spec = json.loads(self._data.decode("utf-8"))
      self._tok = _Tokenizer.from_str(self._data.decode("utf-8"))
    except Exception as e:  # pylint: disable=broad-except  # tokenizers raises plain Exception
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise ValueError(f"{where} is not a Hugging Face tokenizer.json ({first}); give the "
                       "tokenizer.json the model was trained with") from None
    self._tok.no_truncation()
    self._tok.no_padding()
    self._vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    first, last = _template_ids(self._tok, spec)
    named = lambda names: next((i for i in map(self._tok.token_to_id, names) if i is not None),
                               None)
    eos = last if last is not None else named(_EOS_NAMES)
    bos = first if first is not None else named(_BOS_NAMES)
    self._eos = -1 if eos is None else int(eos)
    self._bos = self._eos if bos is None else int(bos)
    self._byte_level = _byte_level_decoder(spec)
    self._byte_values = None

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def bos_id(self) -> int:
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def pad_id(self) -> int:
    return PAD_ID

  def to_bytes(self) -> bytes:
    return self._data

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  @property
  def byte_values(self) -> list[int]:
    """Per id: -1 for a piece whose text is whole characters; else a byte >= 0 for a piece that
    holds part of a UTF-8 character: its first byte, which is a continuation byte (0x80-0xBF)
    when the piece may continue a character begun before it. Byte-fallback pieces (`<0xAB>`)
    give their byte; byte-level BPE pieces their first raw byte; other pieces that decode to
    U+FFFD give 0x80 if the text starts with it, else 0xC0; pieces that decode to nothing
    (special tokens, which `decode` drops) give 0x80, as the bytes around them join."""
    if self._byte_values is None:
      n, tok = self.vocab_size, self._tok
      texts = tok.decode_batch([[i] for i in range(n)], skip_special_tokens=True)
      alphabet = _byte_level_alphabet() if self._byte_level else {}
      values = []
      for i, text in enumerate(texts):
        piece = tok.id_to_token(i) or ""
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
          values.append(int(piece[3:5], 16))
        elif not text:  # a special token: the bytes on either side of it join
          values.append(0x80)
        elif "\ufffd" not in text:
          values.append(-1)
        elif piece and all(c in alphabet for c in piece):
          values.append(alphabet[piece[0]])
        else:
          values.append(0x80 if text.startswith("\ufffd") else 0xC0)
      self._byte_values = values
    return self._byte_values

  def plain_piece(self) -> int | None:
    """An id whose text is non-empty, starts with no whitespace and repeats itself when the
    piece is repeated (context-free); None if the vocabulary has none."""
    values = self.byte_values
    for i in range(self.vocab_size):
      if values[i] >= 0:
        continue
      text = self.decode([i])
      if text and not text[0].isspace() and self.decode([i, i]) == text + text:
        return i
    return None

  def __getstate__(self):  # picklable, for multiprocess data workers
    return {"data": self._data, "path": self.path}

  def __setstate__(self, state):
    self.__init__(state["data"], path=state["path"])


def _training_sentences(texts: Iterable[str], max_chars: int) -> Iterator[str]:
  """Cuts documents into runs of whole lines of <= _MAX_PIECE_TEXT chars, newlines kept.

  Keeping the newlines lets BPE learn pieces such as '):\\n' and '\\n\\n'.
  """
  total = 0
  for text in texts:
    buf = ""
    for line in text.splitlines(keepends=True):
      line = line[:_MAX_PIECE_TEXT]
      if buf and len(buf) + len(line) > _MAX_PIECE_TEXT:
        yield buf
        total += len(buf)
        buf = ""
        if max_chars and total >= max_chars:
          return
      buf += line
    if buf:
      yield buf
      total += len(buf)
    if max_chars and total >= max_chars:
      return


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, max_chars: int = 2_000_000,
                    path: str = "") -> Tokenizer:
  """Trains a byte-fallback BPE SentencePiece model on at most `max_chars` of `texts`.

  Raises ValueError when the text is too small to give `vocab_size` distinct pieces.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  sentences = list(_training_sentences(texts, max_chars))
  if not sentences:
    raise ValueError("no text to train the tokenizer on; give data.tokenizer or non-empty data")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True,
        max_sentence_length=4 * _MAX_PIECE_TEXT, input_sentence_size=0, num_threads=2,
        minloglevel=2)
  except RuntimeError as e:
    if "required_chars" in str(e):
      raise ValueError(_too_many_chars(sentences, vocab_size)) from None
    if "Vocabulary size too high" not in str(e):
      raise
    limit = str(e).split("<=")[-1].strip(" .")
    raise ValueError(
        f"tokenizer training text ({sum(map(len, sentences))} chars{_binary_note(sentences)}) "
        f"supports at most {limit} pieces but vocab_size={vocab_size}; lower model.vocab_size "
        "(data.tokenizer_vocab_size), raise data.tokenizer_train_chars, or give a trained "
        "data.tokenizer") from None
  return Tokenizer(model.getvalue(), path=path)


def _char_counts(sentences: list[str]) -> collections.Counter:
  counts = collections.Counter()
  for s in sentences:
    counts.update(s)
  return counts


def _binary_note(sentences: list[str], counts: collections.Counter | None = None) -> str:
  """', N of them U+FFFD ...' when the text holds bytes that were not UTF-8 (or control
  characters), else ''."""
  counts = _char_counts(sentences) if counts is None else counts
  replaced = counts.get("\ufffd", 0)
  if not replaced and not any(ord(c) < 32 and c not in "\t\n\r\f" for c in counts):
    return ""
  return (f", {replaced:,} of its {sum(counts.values()):,} characters are U+FFFD (bytes that "
          "are not UTF-8) or control characters: the data looks binary or not UTF-8")


def _too_many_chars(sentences: list[str], vocab_size: int) -> str:
  """The message for text whose distinct characters do not fit `vocab_size` pieces."""
  counts = _char_counts(sentences)
  return (f"tokenizer training text has {len(counts):,} distinct characters"
          f"{_binary_note(sentences, counts)}; too many for vocab_size={vocab_size}: point "
          "data.source at UTF-8 text, give a trained data.tokenizer, or raise model.vocab_size")


class IncrementalDecoder:
  """Text of a growing id sequence, decoding only a bounded window per update.

  `update(ids)` returns the text added since the last call; `finish(ids)` returns the rest, so
  that the concatenation of everything returned equals `tokenizer.decode(ids)`. A trailing
  incomplete UTF-8 character (byte-fallback pieces decode it to up to 3 U+FFFD, byte-level BPE
  to one) is held back until it completes or `finish`. Works for decoders where the text of ids
  after a cut k is context-free (given a preceding plain piece) unless a UTF-8 byte sequence
  spans k (the tokenizer's `byte_values` tell): SentencePiece, and Hugging Face byte-level BPE
  or Metaspace/byte-fallback decoders. The window then starts at the last such clean cut whose
  text has been shown; without a plain piece it never moves (the whole sequence is decoded).
  """

  WINDOW = 64  # tokens kept in the window before its start moves forward

  def __init__(self, tokenizer: "Tokenizer | HFTokenizer"):
    self._tok = tokenizer
    self._anchor = tokenizer.plain_piece()
    self._anchor_len = len(tokenizer.decode([self._anchor])) if self._anchor is not None else 0
    self._bytes = tokenizer.byte_values
    self._start = 0  # window start: 0 or a clean cut
    self._shown = 0  # characters of the window's text already returned

  def _text(self, ids: Sequence[int], start: int, end: int) -> str:
    if start == 0:
      return self._tok.decode(ids[:end])
    return self._tok.decode([self._anchor, *ids[start:end]])[self._anchor_len:]

  def _byte(self, i: int) -> int:
    # Ids past the tokenizer (an embedding padded beyond it) decode to nothing, like specials.
    return self._bytes[i] if 0 <= i < len(self._bytes) else 0x80

  def _clean(self, ids: Sequence[int], k: int) -> bool:
    """No UTF-8 character spans the cut before ids[k] (byte pieces decode greedily byte by
    byte, so a byte that is not a continuation byte always starts a new character)."""
    prev, cur = self._byte(ids[k - 1]), self._byte(ids[k])
    return prev < 0 or cur < 0 or not 0x80 <= cur < 0xC0

  def update(self, ids: Sequence[int], end: int | None = None, final: bool = False) -> str:
    """The new text of ids[:end] (end None: all); `final`: nothing is held back."""
    n = len(ids) if end is None else end
    text = self._text(ids, self._start, n)
    visible = len(text)
    if not final and n and self._byte(ids[n - 1]) >= 0:
      while visible > len(text) - 3 and visible > 0 and text[visible - 1] == "\ufffd":
        visible -= 1
    delta = text[self._shown:visible]
    self._shown = max(self._shown, visible)
    if self._anchor is not None and n - self._start > self.WINDOW:
      k = next((k for k in range(n - 4, self._start, -1) if self._clean(ids, k)), None)
      if k is not None:
        head = len(self._text(ids, self._start, k))
        if head <= self._shown:
          self._start, self._shown = k, self._shown - head
    return delta

  def finish(self, ids: Sequence[int], end: int | None = None) -> str:
    return self.update(ids, end, final=True)


__all__ = ["FILE_NAMES", "HFTokenizer", "IncrementalDecoder", "Tokenizer", "find_file", "load_file",
           "train_tokenizer", "UNK_ID", "BOS_ID", "EOS_ID", "PAD_ID"]
