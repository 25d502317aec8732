"""An offline CLIP tokenizer built from the BPE vocabulary that ships inside open_clip_torch.

OpenAI CLIP's vocabulary is: the 256 byte-level unicode symbols, the same with ``</w>``,
the first 48,894 BPE merges, then ``<|startoftext|>`` and ``<|endoftext|>`` (49,408 ids).
Writing that as ``vocab.json`` + ``merges.txt`` gives a transformers ``CLIPTokenizer``
whose ids equal open_clip's — with no download.
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


def write_clip_tokenizer(out_dir: str | os.PathLike, model_max_length: int = 77) -> Path:
    """Write a ``CLIPTokenizer`` folder (vocab.json, merges.txt, configs) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : _NUM_MERGES + 1]]
    units = list(_bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
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
