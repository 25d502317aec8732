"""An offline CLIP tokenizer built from the BPE vocabulary that ships inside open_clip_torch.

OpenAI CLIP's vocabulary is: the 256 byte-level unicode symbols, the same with ``</w>``,
the first 48,894 BPE merges, then ``<|startoftext|>`` and ``<|endoftext|>`` (49,408 ids).
Writing that as ``vocab.json`` + ``merges.txt`` gives a transformers ``CLIPTokenizer``
whose ids equal open_clip's — with no download.

``merges=0`` writes the same tokenizer without merges: every word becomes its characters
(the last with ``</w>``), 514 ids in all — a ``CLIPTokenizer`` whose text encoder's token
table is 96x smaller (the embedded world's flow teacher uses it to fit the size budget).
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

_NUM_MERGES = 49152 - 256 - 2  # CLIP's SimpleTokenizer keeps merges[1 : 48895]


@lru_cache()
def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte <-> printable-unicode table of GPT-2 / CLIP BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def open_clip_bpe_path() -> Path:
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(
            f"open_clip's bundled BPE vocabulary is missing ({path}); reinstall open_clip_torch"
        )
    return path


def write_clip_tokenizer(out_dir: str | os.PathLike, model_max_length: int = 77,
                         merges: int = _NUM_MERGES) -> Path:
    """Write a ``CLIPTokenizer`` folder (vocab.json, merges.txt, configs) into ``out_dir``
    with CLIP's first ``merges`` BPE merges (all of them by default; 0: characters only)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not 0 <= merges <= _NUM_MERGES:
        raise ValueError(f"merges must be in [0, {_NUM_MERGES}], got {merges}")
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : merges + 1]]
    units = list(_bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in merges)
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": model_max_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
            }
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        )
    )
    return out


def load_clip_tokenizer(folder: str | os.PathLike):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))
