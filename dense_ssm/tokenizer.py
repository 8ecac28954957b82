"""SentencePiece tokenizer: a small wrapper and a trainer (LLaMA id conventions).

Ids follow LLaMA: `<unk>` = 0, `<s>` (BOS) = 1, `</s>` (EOS) = 2. SentencePiece has no pad
piece here; padded positions hold id 0 and are masked out by the data pipeline's weights, so
`pad_id` is 0. Trained models use BPE with byte fallback, identity normalisation and no
whitespace folding, so any text (source code, indentation, newlines, emoji) round-trips:
`decode(encode(s)) == s`.
"""

from __future__ import annotations

import io
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
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)

  @classmethod
  def from_file(cls, path: str) -> "Tokenizer":
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
    if "Vocabulary size too high" not in str(e):
      raise
    limit = str(e).split("<=")[-1].strip(" .")
    raise ValueError(
        f"tokenizer training text ({sum(map(len, sentences))} chars) supports at most {limit} "
        f"pieces but vocab_size={vocab_size}; lower model.vocab_size (data.tokenizer_vocab_size), "
        "raise data.tokenizer_train_chars, or give a trained data.tokenizer") from None
  return Tokenizer(model.getvalue(), path=path)


__all__ = ["Tokenizer", "train_tokenizer", "UNK_ID", "BOS_ID", "EOS_ID", "PAD_ID"]
