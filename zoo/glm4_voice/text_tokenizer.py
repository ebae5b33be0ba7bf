"""GLM-4-Voice-9B's text tokenizer: the published ``tokenizer.model`` (tiktoken BPE ranks, base64
lines) and ``tokenizer_config.json`` (the added tokens: ``<|begin_of_audio|>``, the 16384
``<|audio_N|>``, ...), encoded as the reference ``ChatGLM4Tokenizer`` does through transformers'
slow-tokenizer path: added tokens in the text are split out first (leftmost, then longest match),
the rest goes through tiktoken with no special tokens, and ``[gMASK]<sop>`` is prepended.
Nothing is hard-coded: every id is read from the two files."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")
# the GLM-4 pre-tokenizer regex, as the reference's tokenization_chatglm.py
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
# numbered from len(ranks) by the reference, in this order
BUILTIN_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                    "<|begin_of_video|>", "<|end_of_video|>")
_AUDIO = re.compile(r"<\|audio_(\d+)\|>")
AUDIO_TOKENS = 16384  # <|audio_0|> .. <|audio_16383|>: the speech tokenizer's codebook


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_text().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class GlmTokenizer:
    def __init__(self, ranks: dict[bytes, int], added: dict[str, int]) -> None:
        import tiktoken

        specials = {token: len(ranks) + i for i, token in enumerate(BUILTIN_SPECIALS)}
        for token, index in specials.items():
            if added.get(token, index) != index:
                raise ValueError(f"tokenizer_config.json gives {token} id {added[token]}, tokenizer.model implies {index}")
        self.added = {**specials, **added}
        self._bpe = tiktoken.Encoding(name="glm-4-voice", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})
        self._strings = {index: token for token, index in self.added.items()}
        self._ordinary = frozenset(ranks.values())
        self.audio_offset = self.added["<|audio_0|>"]
        audio_ids = [self.added.get(f"<|audio_{i}|>") for i in range(AUDIO_TOKENS)]
        if audio_ids != list(range(self.audio_offset, self.audio_offset + AUDIO_TOKENS)):
            raise ValueError("tokenizer_config.json: <|audio_0|> .. <|audio_16383|> are not consecutive ids")
        # Audio tokens are matched by a pattern of their own; the other added tokens by alternation,
        # longest first so that at any position the longest added token wins (as transformers' trie).
        others = sorted((t for t in self.added if not _AUDIO.fullmatch(t)), key=len, reverse=True)
        self._split = re.compile(r"<\|audio_(?:\d+)\|>|" + "|".join(map(re.escape, others)))

    @classmethod
    def load(cls, folder: Path) -> GlmTokenizer:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        added = {entry["content"]: int(index) for index, entry in config.get("added_tokens_decoder", {}).items()}
        return cls(read_ranks(folder / "tokenizer.model"), added)

    def id(self, token: str) -> int:
        return self.added[token]

    def has_entry(self, index: int) -> bool:
        """Whether ``index`` is in the vocabulary (a BPE rank or an added token). The LLM's output
        layer is wider: it can emit ids with no entry, which have no text and no audio."""
        return index in self._ordinary or index in self._strings

    def encode(self, text: str, prefix: bool = True) -> list[int]:
        """``prefix``: prepend ``[gMASK]<sop>`` as ``tokenizer([text])`` does."""
        ids = [self.added["[gMASK]"], self.added["<sop>"]] if prefix else []
        start = 0
        for match in self._split.finditer(text):
            if match.group(0) not in self.added:  # an <|audio_N|> outside the vocabulary is plain text
                continue
            ids += self._bpe.encode_ordinary(text[start:match.start()])
            ids.append(self.added[match.group(0)])
            start = match.end()
        return ids + self._bpe.encode_ordinary(text[start:])

    def decode(self, ids: list[int]) -> str:
        """As ``tokenizer.decode(ids, spaces_between_special_tokens=False)``: byte runs between added
        tokens are decoded as UTF-8 with replacement characters."""
        parts, run = [], []
        for index in ids:
            if index in self._strings:
                if run:
                    parts.append(self._bpe.decode(run, errors="replace"))
                    run = []
                parts.append(self._strings[index])
            else:
                run.append(index)
        if run:
            parts.append(self._bpe.decode(run, errors="replace"))
        return "".join(parts)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The raw bytes of ordinary (non-added) ids, for incremental UTF-8 text streaming."""
        return self._bpe.decode_bytes([i for i in ids if i not in self._strings])
