"""CLIP's byte-level BPE tokenizer, offline: prompts -> int32 [B, 77] token ids for the text
encoder, as transformers' (Rust-backed) `CLIPTokenizer` makes them.

The pipeline (Radford et al. 2021, after GPT-2's byte-level BPE; normalisation as in
transformers): special tokens are split out of the raw text; the rest is NFC-normalised,
whitespace runs folded to one space and lower-cased; CLIP's pattern cuts it into words
(contractions, runs of letters, single digits, runs of other non-space characters); each
word's UTF-8 bytes are mapped to printable characters, "</w>" marks its last one, and the
ranked merges join symbols until none applies. A prompt becomes
[start] + tokens[:75] + [end] + [pad] * (77 - n).

Files: a diffusers-format Stable Diffusion directory's `tokenizer/` (`vocab.json` + `merges.txt`,
or `tokenizer.json`; the special tokens and length from `special_tokens_map.json` /
`tokenizer_config.json`: SD 2.x pads with "!", id 0), or the standard CLIP merges file
`bpe_simple_vocab_16e6.txt.gz`, which ships with jdiff (`CLIPTokenizer.default()`).
"""

from __future__ import annotations

import functools
import gzip
import itertools
import json
import pathlib
import unicodedata
from collections.abc import Sequence

import numpy as np
import regex

DEFAULT_MERGES = pathlib.Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
START, END = "<|startoftext|>", "<|endoftext|>"
# CLIP's word pattern, then GPT-2's within each word (transformers' byte-level step applies
# it too): it only matters for "<|endoftext|>" written in capitals, which reaches the words as
# one and leaves them as "<|", "endoftext", "|>" (the special tokens proper are split out first)
_WORDS = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
_GPT2_WORDS = regex.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)
_WHITESPACE = regex.compile(r"\s+")


@functools.cache
def byte_table() -> dict[int, str]:
    """The printable character that stands for each byte (GPT-2's table): printable Latin-1
    bytes stand for themselves, the others for code points from 256 up. In the table's order
    (printable bytes first), which is the order of the first 256 vocabulary entries."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


@functools.cache
def byte_characters() -> tuple[str, ...]:
    """byte_table() indexed by byte value 0..255."""
    table = byte_table()
    return tuple(table[b] for b in range(256))


class CLIPTokenizer:
    """`tokenizer(prompts) -> int32 [len(prompts), max_length]`; `encode(text)` gives the
    tokens of one text without start, end or padding."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        bos_token: str = START,
        eos_token: str = END,
        pad_token: str = END,
        unk_token: str = END,
        max_length: int = 77,
    ):
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token),
                            ("pad_token", pad_token), ("unk_token", unk_token)):  # fmt: skip
            if token not in vocab:
                raise ValueError(f"{name} {token!r} is not in the vocabulary")
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for start and end tokens")
        self.vocab, self.max_length = vocab, max_length
        self.merges = [tuple(pair) for pair in merges]
        self.special_tokens = {"bos_token": bos_token, "eos_token": eos_token,
                               "pad_token": pad_token, "unk_token": unk_token}  # fmt: skip
        self.ranks = {tuple(pair): i for i, pair in enumerate(merges)}
        self.bos_id, self.eos_id = vocab[bos_token], vocab[eos_token]
        self.pad_id, self.unk_id = vocab[pad_token], vocab[unk_token]
        # transformers splits its special tokens out of the raw text first (exact matches)
        specials = sorted({bos_token, eos_token, pad_token, unk_token}, key=len, reverse=True)
        self._specials = regex.compile("|".join(regex.escape(s) for s in specials))
        self._bpe = functools.lru_cache(maxsize=65536)(self._merge)

    # construction from files

    @classmethod
    def default(cls, **kwargs) -> CLIPTokenizer:
        """From the standard CLIP merges file shipped with jdiff (SD 1.x's tokenizer)."""
        return cls.from_merges_file(DEFAULT_MERGES, **kwargs)

    @classmethod
    def from_merges_file(cls, path: str | pathlib.Path, **kwargs) -> CLIPTokenizer:
        """From CLIP's `bpe_simple_vocab_16e6.txt(.gz)`: its first 48,894 merges; the vocabulary
        is the 256 byte characters, the same with "</w>", the merged symbols, start and end."""
        path = pathlib.Path(path)
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        lines = raw.decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        symbols = list(byte_table().values())
        tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges),
                  START, END]  # fmt: skip
        return cls({t: i for i, t in enumerate(tokens)}, merges, **kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | pathlib.Path, **kwargs) -> CLIPTokenizer:
        """From a tokenizer folder (`vocab.json` + `merges.txt`, or `tokenizer.json`), with the
        special tokens and `model_max_length` of its `special_tokens_map.json` /
        `tokenizer_config.json` (capped at 77 when they give none sensible); `kwargs`
        override them."""
        directory = pathlib.Path(directory)
        if (directory / "tokenizer").is_dir() and not (directory / "merges.txt").exists():
            directory = directory / "tokenizer"  # the root of a diffusers SD directory
        if (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
            vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
            lines = (directory / "merges.txt").read_text(encoding="utf-8").split("\n")
            merges = [tuple(line.split()) for line in lines
                      if line and not line.startswith("#version")]  # fmt: skip
        elif (directory / "tokenizer.json").exists():
            model = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
                raise ValueError(f"{directory / 'tokenizer.json'} is not a CLIP BPE tokenizer")
            vocab = model["vocab"]
            merges = [tuple(m.split()) if isinstance(m, str) else tuple(m)
                      for m in model["merges"]]  # fmt: skip
        else:
            raise FileNotFoundError(
                f"{directory} has neither vocab.json + merges.txt nor tokenizer.json; pass a "
                "Stable Diffusion directory's tokenizer/ folder, or use CLIPTokenizer.default()"
            )
        settings = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the map wins
            if (directory / name).exists():
                settings |= json.loads((directory / name).read_text(encoding="utf-8"))
        found = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = settings.get(key)
            if isinstance(token, dict):
                token = token.get("content")
            if token:
                found[key] = token
        length = settings.get("model_max_length")
        if isinstance(length, int) and 2 <= length <= 4096:
            found["max_length"] = length
        return cls(vocab, merges, **(found | kwargs))

    def save_pretrained(self, directory: str | pathlib.Path) -> pathlib.Path:
        """Write the folder `from_pretrained` (and transformers' `CLIPTokenizer`) reads:
        vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False),
                                              encoding="utf-8")  # fmt: skip
        merges = "\n".join(" ".join(pair) for pair in self.merges)
        (directory / "merges.txt").write_text(f"#version: 0.2\n{merges}\n", encoding="utf-8")
        (directory / "special_tokens_map.json").write_text(json.dumps(self.special_tokens))
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length,
                  "do_lower_case": True, **self.special_tokens}  # fmt: skip
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        return directory

    # tokenization

    def _merge(self, word: str) -> tuple[str, ...]:
        """BPE of one word (byte characters): apply the best-ranked merge until none applies."""
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = set(itertools.pairwise(symbols))
            best = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)

    def _encode_plain(self, text: str) -> list[int]:
        text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
        text = "".join(c.lower() for c in text)  # by character: no final-sigma rule, as in Rust
        table = byte_characters()
        ids = []
        words = (w for piece in _WORDS.findall(text) for w in _GPT2_WORDS.findall(piece))
        for word in words:
            chars = "".join(table[b] for b in word.encode("utf-8"))
            ids += [self.vocab.get(s, self.unk_id) for s in self._bpe(chars)]
        return ids

    def encode(self, text: str) -> list[int]:
        """The token ids of `text`, without start, end or padding, untruncated."""
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a str, got {type(text).__name__}")
        ids, start = [], 0
        for match in self._specials.finditer(text):
            ids += [*self._encode_plain(text[start : match.start()]), self.vocab[match.group()]]
            start = match.end()
        return ids + self._encode_plain(text[start:])

    def __call__(
        self, prompts: str | Sequence[str], *, max_length: int | None = None
    ) -> np.ndarray:
        """int32 [B, max_length]: start, the first max_length - 2 tokens, end, padding."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ValueError("no prompts: pass a list of at least one string ('' is allowed)")
        length = max_length or self.max_length
        out = np.full((len(prompts), length), self.pad_id, np.int32)
        for row, prompt in zip(out, prompts, strict=True):
            ids = [self.bos_id, *self.encode(prompt)[: length - 2], self.eos_id]
            row[: len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (start, end and padding dropped; "</w>" becomes a space)."""
        inverse = getattr(self, "_inverse", None) or {i: t for t, i in self.vocab.items()}
        self._inverse = inverse
        byte_of = {c: b for b, c in enumerate(byte_characters())}
        skip = {self.bos_id, self.eos_id, self.pad_id}
        text = "".join(inverse[int(i)] for i in ids if int(i) not in skip)
        pieces = bytearray()
        for c in text.replace("</w>", " "):
            pieces += bytes([byte_of[c]]) if c in byte_of else c.encode("utf-8")
        return pieces.decode("utf-8", errors="replace").strip()
