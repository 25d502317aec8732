"""Evaluation prompts: prompt ``i`` of a bench is a caption from a file (COCO) or the world's
class ``i % 10`` (a caption template for text models, a class label for pixel models)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from diffdistill.config import ConfigError

if TYPE_CHECKING:
    from diffdistill.eval.bench_config import BenchConfig


def read_captions(path) -> list[str]:
    """Captions, in order, from ``.txt`` (one per line), ``.jsonl`` (a string or an object with
    caption / text / prompt per line), a JSON list, or COCO annotations (first caption of each
    image, ascending image id)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"captions file {p} does not exist")
    text = p.read_text(encoding="utf-8")

    def pick(item) -> str:
        if isinstance(item, str):
            return item
        if isinstance(item, dict):
            for key in ("caption", "text", "prompt"):
                if isinstance(item.get(key), str):
                    return item[key]
        raise ValueError(f"{p}: cannot read a caption from {str(item)[:80]!r}")

    if p.suffix == ".jsonl":
        out = [pick(json.loads(line)) for line in text.splitlines() if line.strip()]
    elif p.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict) and "annotations" in data:
            first: dict = {}
            for ann in data["annotations"]:
                first.setdefault(int(ann["image_id"]), ann["caption"])
            out = [first[k] for k in sorted(first)]
        elif isinstance(data, list):
            out = [pick(item) for item in data]
        else:
            raise ValueError(f"{p}: expected a JSON list or COCO annotations")
    else:
        out = [line.strip() for line in text.splitlines() if line.strip()]
    return [c.strip() for c in out]


@dataclass
class EvalPrompts:
    """Prompt ``i`` of an evaluation: ``captions[i]``, or the world's class ``i % 10`` with
    caption template ``template`` (text models) / label ``i % num_classes`` (pixel models)."""

    captions: list[str] | None = None
    template: int = 0

    def caption(self, i: int) -> str:
        from diffdistill.fmnist import caption_for_class

        if self.captions is not None:
            return self.captions[i]
        return caption_for_class(i % 10, self.template)

    def label(self, i: int, num_classes: int) -> int:
        if self.captions is not None:
            raise ValueError("a class-conditional pixel model takes class labels, not captions: "
                             "use prompts.kind=classes")
        return i % num_classes

    def world_class(self, i: int, backbone) -> int | None:
        """The world (Fashion-MNIST) class sample i asks for: class i % 10 with world-class
        prompts, for text models and for 10-class pixel models; None otherwise (captions)."""
        if self.captions is not None:
            return None
        if backbone.kind != "pixel" or backbone.num_classes == 10:
            return i % 10
        return None

    def clip_caption(self, i: int, backbone) -> str | None:
        """The text CLIP compares sample i with (None: no CLIP score for this model)."""
        if backbone.kind != "pixel" or self.world_class(i, backbone) is not None:
            return self.caption(i)
        return None


def build_eval_prompts(cfg: BenchConfig) -> EvalPrompts:
    file = cfg.prompts.file or cfg.reference.captions
    kind = cfg.prompts.kind
    if kind == "auto":
        kind = "captions" if file else "classes"
    if kind == "classes":
        return EvalPrompts(template=cfg.prompts.template)
    captions = read_captions(file)
    if len(captions) < cfg.num_samples:
        raise ConfigError(f"prompts: {file} holds {len(captions)} captions but num_samples="
                          f"{cfg.num_samples}; give at least as many captions (or lower "
                          "num_samples)")
    return EvalPrompts(captions=captions[:cfg.num_samples])

