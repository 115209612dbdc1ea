"""Tokenizers: one small interface over SentencePiece ``.model`` files and HF ``tokenizer.json``.

`Tokenizer` is the protocol the pipelines use: ``encode(text) -> list[int]`` (no BOS / EOS added;
the pipeline adds them as ids), ``decode(ids) -> str`` (special / control tokens dropped),
``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id`` (-1 when the tokenizer has no BOS; ``pad_id``
falls back to ``eos_id`` when the tokenizer defines no pad token, since padded positions are always
masked).
"""

from __future__ import annotations

import json
import os
from typing import Protocol, runtime_checkable

import sentencepiece as spm


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipelines need from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file; BOS / EOS / PAD ids come from the model's trainer spec."""

    def __init__(self, path: str):
        self.path = str(path)
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = int(self._sp.get_piece_size())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise ValueError(
                f"{self.path}: SentencePiece model defines no EOS id (train with eos_id>=0)"
            )
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of one id, control tokens included (for display)."""
        return self._sp.id_to_piece(int(token_id))

    def is_special(self, token_id: int) -> bool:
        """A control or unknown token (`decode` drops control tokens)."""
        return bool(self._sp.is_control(int(token_id)) or self._sp.is_unknown(int(token_id)))

    def __getstate__(self):  # the C++ processor does not pickle; reload from the path
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


# Special-token names tried, in order, when no tokenizer_config.json says which token is which.
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|bos|>")
_EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[EOS]", "<|eos|>", "<|im_end|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


class HFTokenizer:
    """An HF ``tokenizer.json`` read with the ``tokenizers`` package.

    BOS / EOS / PAD tokens come from the arguments, else from a ``tokenizer_config.json`` next to
    the file (``bos_token``, ``eos_token``, ``pad_token``), else from common names (``<s>``,
    ``</s>``, ``<|begin_of_text|>``, ``<|endoftext|>``, ``<pad>`` ...). A tokenizer without an EOS
    token is an error.
    """

    def __init__(
        self, path: str, *, bos: str | None = None, eos: str | None = None, pad: str | None = None
    ):
        import tokenizers

        self.path = str(path)
        self._args = {"bos": bos, "eos": eos, "pad": pad}
        self._tok = tokenizers.Tokenizer.from_file(self.path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        cfg = _read_tokenizer_config(
            os.path.join(os.path.dirname(self.path), "tokenizer_config.json")
        )
        self.bos_id = self._find(bos or cfg.get("bos_token"), _BOS_NAMES)
        self.eos_id = self._find(eos or cfg.get("eos_token"), _EOS_NAMES)
        if self.eos_id < 0:
            raise ValueError(f"{self.path}: no EOS token found; pass eos=<token> to load_tokenizer")
        pad_id = self._find(pad or cfg.get("pad_token"), _PAD_NAMES)
        self.pad_id = pad_id if pad_id >= 0 else self.eos_id

    def _find(self, name: str | None, fallbacks: tuple[str, ...]) -> int:
        for cand in ((name,) if name else ()) + fallbacks:
            i = self._tok.token_to_id(cand)
            if i is not None:
                return int(i)
            if cand == name:  # an explicitly named token must exist
                raise ValueError(f"{self.path}: token {name!r} is not in the vocabulary")
        return -1

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of one id, special tokens included (for display)."""
        return self._tok.id_to_token(int(token_id))

    def is_special(self, token_id: int) -> bool:
        """An added token marked special (`decode` drops them)."""
        added = self._tok.get_added_tokens_decoder().get(int(token_id))
        return bool(added is not None and added.special)

    def __getstate__(self):
        return {"path": self.path, "args": self._args}

    def __setstate__(self, state):
        self.__init__(state["path"], **state["args"])


def _read_tokenizer_config(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        cfg = json.load(f)
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        v = cfg.get(key)
        if isinstance(v, dict):  # AddedToken serialisation
            v = v.get("content")
        if isinstance(v, str):
            out[key] = v
    return out


def load_tokenizer(path: str, **kwargs) -> SentencePieceTokenizer | HFTokenizer:
    """Load a SentencePiece ``*.model``, an HF ``tokenizer.json``, or a directory holding one.

    ``kwargs`` (``bos``, ``eos``, ``pad`` token strings) go to `HFTokenizer`.
    """
    path = str(path)
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.exists(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name), **kwargs)
        raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json in this directory")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: tokenizer file not found")
    if path.endswith(".json"):
        return HFTokenizer(path, **kwargs)
    return SentencePieceTokenizer(path)
