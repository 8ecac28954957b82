"""SentencePiece tokenizer: a small wrapper and a trainer (LLaMA id conventions).

Ids follow LLaMA: `<unk>` = 0, `<s>` (BOS) = 1, `</s>` (EOS) = 2. SentencePiece has no pad
piece here; padded positions hold id 0 and are masked out by the data pipeline's weights, so
`pad_id` is 0. Trained models use BPE with byte fallback, identity normalisation and no
whitespace folding, so any text (source code, indentation, newlines, emoji) round-trips:
`decode(encode(s)) == s`.
"""

from __future__ import annotations

import collections
import io
import os
from typing import Iterable, Iterator, Sequence

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
PAD_ID = 0
_MAX_PIECE_TEXT = 2000  # characters per training "sentence" (SentencePiece skips longer ones)


class Tokenizer:
  """A SentencePiece model: `encode(str) -> list[int]` (no BOS/EOS added), `decode(ids) -> str`."""

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
  def from_file(cls, path: str) -> "Tokenizer":
    if os.path.isdir(path):
      raise ValueError(f"tokenizer file {path!r} is a directory; give the SentencePiece .model "
                       f"file itself (e.g. {os.path.join(path, 'tokenizer.model')!r})")
    try:
      with open(path, "rb") as f:
        return cls(f.read(), path=path)
    except FileNotFoundError:
      raise FileNotFoundError(
          f"tokenizer file {path!r} does not exist; fix data.tokenizer or set it to '' to "
          "train one") from None

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

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  @property
  def byte_values(self) -> list[int]:
    """Per id: the byte of a byte-fallback piece (`<0xAB>` -> 0xAB), else -1."""
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
        f"tokenizer training text ({sum(map(len, sentences))} chars) supports at most {limit} "
        f"pieces but vocab_size={vocab_size}; lower model.vocab_size (data.tokenizer_vocab_size), "
        "raise data.tokenizer_train_chars, or give a trained data.tokenizer") from None
  return Tokenizer(model.getvalue(), path=path)


def _too_many_chars(sentences: list[str], vocab_size: int) -> str:
  """The message for text whose distinct characters do not fit `vocab_size` pieces."""
  counts = collections.Counter()
  for s in sentences:
    counts.update(s)
  total = sum(counts.values())
  replaced = counts.get("\ufffd", 0)
  why = ""
  if replaced or any(ord(c) < 32 and c not in "\t\n\r" for c in counts):
    why = (f" ({replaced:,} of its {total:,} characters are U+FFFD, i.e. bytes that are not "
           "UTF-8, or control characters: the data looks binary)")
  return (f"tokenizer training text has {len(counts):,} distinct characters, too many for "
          f"vocab_size={vocab_size}{why}; point data.source at UTF-8 text, give a trained "
          "data.tokenizer, or raise model.vocab_size")


class IncrementalDecoder:
  """Text of a growing id sequence, decoding only a bounded window per update.

  `update(ids)` returns the text added since the last call; `finish(ids)` returns the rest, so
  that the concatenation of everything returned equals `tokenizer.decode(ids)`. A trailing
  incomplete UTF-8 character (byte-fallback pieces decode it to up to 3 U+FFFD) is held back
  until it completes or `finish`. Works for SentencePiece decoding, where the text of ids after
  a cut k is context-free (given a preceding plain piece) unless a UTF-8 byte sequence spans k:
  the window then starts at the last such clean cut whose text has been shown.
  """

  WINDOW = 64  # tokens kept in the window before its start moves forward

  def __init__(self, tokenizer: Tokenizer):
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
    return self._bytes[i] if 0 <= i < len(self._bytes) else -1

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


__all__ = ["IncrementalDecoder", "Tokenizer", "train_tokenizer", "UNK_ID", "BOS_ID", "EOS_ID", "PAD_ID"]
