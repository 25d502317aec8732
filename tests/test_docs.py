"""The documentation stays true: README.md and docs/ link only to files that exist, every
results table names a committed raw file, every config key is documented, the prose is for
users, and the README stays short.

``python tests/test_docs.py`` rewrites the generated key reference in docs/configuration.md
from the config dataclasses (run it after adding or changing a config key).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
import types
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
CONFIG_PAGE = DOCS / "configuration.md"
BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"

#: pages whose tables are measurements: each such table names its raw file nearby
RESULT_PAGES = [README, DOCS / "results.md", DOCS / "performance.md", DOCS / "world.md"]
#: pages other people write as a record (research notes, the reliability guide): links and
#: paths are checked, the wording is theirs
RECORDS = {DOCS / "one_step.md", DOCS / "reliability.md"}


def pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


# ----------------------------------------------------------------------------- config keys


def _field_comments(cls) -> dict[str, str]:
    """Each dataclass field's comment: the one at the end of its line (with continuation
    lines indented under it), else the comment block just above it."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        pending: list[str] = []
        last, last_indent = None, 0
        for line in src.splitlines()[1:]:
            stripped = line.strip()
            indent = len(line) - len(line.lstrip())
            if stripped.startswith("#"):
                text = stripped.lstrip("#").strip()
                if last is not None and indent > last_indent:  # continues the field above
                    out[last] = f"{out[last]} {text}".strip()
                else:
                    pending.append(text)
                    last = None
                continue
            m = re.match(r"(\s+)(\w+)\s*:\s*[^=#]+?(?:=[^#]*)?(?:#\s*(.*))?$", line)
            if m and not stripped.startswith(("def ", "@", "return", "raise")):
                out[m.group(2)] = (m.group(3) or " ".join(pending)).strip()
                last, last_indent = (m.group(2), len(m.group(1))) if m.group(3) else (None, 0)
            else:
                last = None
            pending = []
    return out


def _dataclass_of(tp):
    """The dataclass a field holds, directly, optionally or as list elements (else None)."""
    if dataclasses.is_dataclass(tp):
        return tp, ""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _dataclass_of(inner[0])
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return args[0], "[]"
    return None, ""


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        inner = [_type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(inner) + (" \\| null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _default(f) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "null"
    if dataclasses.is_dataclass(value):
        return "see below"
    text = repr(value) if isinstance(value, str) else str(value)
    return f"`{text}`" if text else "`''`"


def config_rows(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, comment) for every leaf field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        inner, suffix = _dataclass_of(hints[f.name])
        if inner is not None:
            if suffix or _default(f) == "null":  # a list of sections, or an optional one
                rows.append((key, "list of sections" if suffix else "section or null",
                             _default(f), comments.get(f.name, "")))
            rows += config_rows(inner, key + suffix + ".")
            continue
        rows.append((key, _type_name(hints[f.name]), _default(f), comments.get(f.name, "")))
    return rows


def method_configs() -> dict[str, type]:
    from diffdistill.trainers import TRAINERS

    return {method: getattr(importlib.import_module(module), name).config_class
            for method, (module, name) in TRAINERS.items()}


def config_reference() -> str:
    """The generated key reference: the keys every method shares, then each method's own."""
    from diffdistill.config import BaseConfig

    def table(rows) -> list[str]:
        lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, tp, default, comment in rows:
            comment = comment.replace("|", "\\|")
            lines.append(f"| `{key}` | {tp} | {default} | {comment} |")
        return lines

    base = config_rows(BaseConfig)
    seen = {r[0] for r in base}
    out = ["### Keys every method shares", "", *table(base), ""]
    for method, cls in method_configs().items():
        own = [r for r in config_rows(cls) if r[0] not in seen]
        seen.update(r[0] for r in own)
        shared = sorted({r[0].split(".")[0] for r in config_rows(cls)}
                        - {r[0].split(".")[0] for r in base} - {r[0].split(".")[0] for r in own})
        out += [f"### `method: {method}` ({cls.__name__})", ""]
        if shared:
            out += ["Also reads " + ", ".join(f"`{s}.*`" for s in shared) + " (above).", ""]
        out += [*table(own), ""] if own else ["No keys of its own.", ""]
    return "\n".join(out).rstrip() + "\n"


def write_config_reference() -> None:
    text = CONFIG_PAGE.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    CONFIG_PAGE.write_text(f"{head}{BEGIN}\n\n{config_reference()}\n{END}{tail}")


def test_every_config_key_is_documented():
    text = CONFIG_PAGE.read_text()
    keys = {r[0] for cls in method_configs().values() for r in config_rows(cls)}
    assert len(keys) > 100
    missing = sorted(k for k in keys if f"`{k}`" not in text)
    assert not missing, (f"{len(missing)} config keys are not in docs/configuration.md "
                         f"(run `python tests/test_docs.py`): {missing[:10]}")


# ----------------------------------------------------------------------------- links, paths

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
#: repository paths mentioned in prose or code (configs/…, benchmarks/…, docs/…)
REPO_PATH = re.compile(r"(?<![\w/.-])((?:configs|benchmarks|docs|tests|diffdistill|trainers|eval)"
                       r"/[\w./{},-]*[\w}/])")


def _expand_braces(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",")
            for p in _expand_braces(path[:m.start()] + alt + path[m.end():])]


def _code_blocks_removed(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(_code_blocks_removed(page.read_text())):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_referenced_repository_paths_exist(page):
    missing = []
    for ref in REPO_PATH.findall(page.read_text()):
        ref = ref.rstrip(".,")
        if "<" in ref or "*" in ref:
            continue
        if not (ref.endswith("/") or "." in ref.rsplit("/", 1)[-1]):
            continue  # a metric or module name (eval/fid_fmnist_1step), not a file
        for path in _expand_braces(ref):
            if not (ROOT / path).exists():
                missing.append(path)
    assert not missing, f"{page.name}: these paths do not exist: {sorted(set(missing))}"


def test_docs_pages_are_in_the_site_nav():
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def files(node):
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [f for n in node for f in files(n)]
        return [f for v in node.values() for f in files(v)]

    listed = set(files(nav))
    top = {p.name for p in DOCS.glob("*.md")}
    assert top <= listed, f"pages missing from mkdocs.yml's nav: {sorted(top - listed)}"
    assert all((DOCS / f).exists() or f == "reliability.md" for f in listed)


# ----------------------------------------------------------------------------- raw files

NUMBER_CELL = re.compile(r"^\**[<>≤≥~]?\s*-?\d+\.\d+")
RAW_PATH = re.compile(r"((?:benchmarks/results|docs/one_step|one_step|diffdistill/world/assets)"
                      r"/[\w.{},-]+)")


def _tables(lines: list[str]):
    start = None
    for i, line in enumerate([*lines, ""]):
        if line.lstrip().startswith("|") and start is None:
            start = i
        elif not line.lstrip().startswith("|") and start is not None:
            yield start, i
            start = None


@pytest.mark.parametrize("page", [p for p in RESULT_PAGES if p.exists()],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_results_table_names_its_raw_file(page):
    lines = _code_blocks_removed(page.read_text()).splitlines()
    unsourced = []
    for start, end in _tables(lines):
        cells = [c.strip() for row in lines[start + 2:end] for c in row.strip("| ").split("|")]
        if not any(NUMBER_CELL.match(c) for c in cells):
            continue  # a table of words, not of measurements
        window = "\n".join(lines[max(0, start - 12):min(len(lines), end + 12)])
        raws = [p for line in window.splitlines() if "raw" in line.lower()
                for ref in RAW_PATH.findall(line) for p in _expand_braces(ref)]
        ok = [p for p in raws if (ROOT / p).exists() or (page.parent / p).exists()]
        if not ok:
            unsourced.append(f"line {start + 1}: {lines[start][:60]}")
    assert not unsourced, f"{page.name}: tables of numbers without a raw file: {unsourced}"


# ----------------------------------------------------------------------------- prose

PROCESS_TALK = re.compile(
    r"issue #?\d|#\d{2}\b|goal rows?|across sessions|next (GPU )?session|this session|the VM\b|"
    r"development VM|2-core VM|no GPU (was )?lent|GPU lent|found on the way|the performance issue|"
    r"method issues", re.I)


@pytest.mark.parametrize("page", [p for p in pages() if p not in RECORDS],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_prose_is_for_users(page):
    hits = [m.group(0) for m in PROCESS_TALK.finditer(page.read_text())]
    assert not hits, f"{page.name}: process talk {hits}"


def test_readme_is_short_and_has_what_users_look_for():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for heading in ("## Install", "## Quickstart", "## Distil your own model",
                    "## Load the result in diffusers", "## Methods", "## Python API",
                    "## Documentation", "## Tests and lint", "## Citation and license"):
        assert heading in text, heading
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    write_config_reference()
    print(f"wrote the key reference into {CONFIG_PAGE.relative_to(ROOT)}")
