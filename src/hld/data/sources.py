"""Text sources: each yields documents (strings) in a fixed order.

Spec forms (one string, so that configs and the CLI stay simple):
- `sample:train` / `sample:validation` — the corpus shipped in `hld/assets/sample_corpus` (C4 format);
- a path or glob of C4 shards (`c4-train.00000-of-01024.json.gz`, records with text/timestamp/url),
  or of any `.jsonl` / `.jsonl.gz` / `.json.gz` file with a text field;
- a path or glob of `.txt` files (blank-line separated paragraphs are one document each);
- `hf:NAME:CONFIG:SPLIT` — streamed with `datasets` (e.g. `hf:allenai/c4:en:train`); `NAME` may
  also be a local dataset directory saved with `save_to_disk` or a local data files folder.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

from hld.data import token_files
from hld.errors import HldError, exc_line
from hld.files import MAX_LINE_BYTES, regular_file
from hld.fingerprint import files_fingerprint

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "assets" / "sample_corpus"


def resolve_files(spec: str) -> list[Path]:
    """The files a path/glob spec names, sorted (so the document order is fixed)."""
    if spec.startswith("sample:"):
        split = spec.split(":", 1)[1]
        if split not in ("train", "validation"):
            raise HldError(f"unknown sample split {split!r}", "use sample:train or sample:validation")
        files = sorted(SAMPLE_DIR.glob(f"c4-{split}.*.json.gz"))
        if not files:
            raise HldError(f"the shipped sample corpus is missing from {SAMPLE_DIR}", "reinstall hld")
        return files
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _kind(p) is not None)
    else:
        files = sorted(Path(p) for p in glob.glob(str(path)))
    if not files:
        raise HldError(
            f"data source {spec!r} matches no file",
            "check the path or glob (C4 shards: c4-train.*.json.gz, or .jsonl/.txt)",
        )
    for f in files:
        if _kind(f) is None:
            raise HldError(
                f"data file {f} has an unsupported extension", "use .json.gz/.jsonl/.jsonl.gz (JSON lines) or .txt"
            )
        # before any open: a FIFO blocks its open forever, /dev/zero never ends, a dangling link has no size
        regular_file(f, "data file", "give data files that are regular files (check the path or glob)")
    return files


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".json.gz", ".jsonl.gz", ".jsonl", ".json")):
        return "jsonl"
    if name.endswith((".txt", ".txt.gz")):
        return "txt"
    return None


def _open_text(path: Path) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict")


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The lines of a data file, numbered; a line over `MAX_LINE_BYTES` characters is refused (a file without
    newlines, or a gzip bomb, is never read whole into memory)."""
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(iter(lambda: fh.readline(MAX_LINE_BYTES + 1), ""), start=1):
                if len(line) > MAX_LINE_BYTES:
                    raise HldError(
                        f"{path}:{lineno} is longer than {MAX_LINE_BYTES:,} characters, the most a data line may hold",
                        "split the file into one document per line (JSON lines) or paragraphs (.txt)",
                    )
                yield lineno, line
    except UnicodeDecodeError as exc:
        raise HldError(
            f"{path} is not valid UTF-8 ({exc.reason} at byte {exc.start})", "re-encode the file as UTF-8"
        ) from exc
    except (gzip.BadGzipFile, EOFError, OSError) as exc:
        raise HldError(f"cannot read {path}: {exc}", "the file is truncated or not gzip; re-download it") from exc


def iter_jsonl(path: Path, text_field: str = "text") -> Iterator[str]:
    for lineno, line in _read_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HldError(
                f"{path}:{lineno} is not a JSON object ({exc.msg})", "fix or drop that line (one JSON object per line)"
            ) from exc
        if not isinstance(record, dict) or text_field not in record:
            raise HldError(
                f"{path}:{lineno} has no {text_field!r} field", "set data.text_field to the field that holds the text"
            )
        text = record[text_field]
        if not isinstance(text, str):
            raise HldError(f"{path}:{lineno} field {text_field!r} is not a string", "fix that record")
        if text.strip():
            yield text


def iter_txt(path: Path) -> Iterator[str]:
    paragraph: list[str] = []
    for _, line in _read_lines(path):
        if line.strip():
            paragraph.append(line.rstrip("\n"))
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def iter_hf(spec: str, text_field: str = "text") -> Iterator[str]:
    """`hf:NAME:CONFIG:SPLIT`, streamed with `datasets` (needs the hub, or a local dataset path)."""
    yield from _hf_records(spec, _hf_dataset(spec), text_field)


def _hf_dataset(spec: str):
    """The `datasets` IterableDataset an `hf:` spec names (a hub name, streamed, or a local dataset dir)."""
    parts = spec.split(":")[1:]
    if len(parts) != 3:
        raise HldError(f"hf source {spec!r} is not hf:NAME:CONFIG:SPLIT", "e.g. hf:allenai/c4:en:train")
    name, config, split = parts
    try:
        import datasets
    except ImportError as exc:
        raise HldError("the hf: data source needs the `datasets` package", "pip install 'hld[hub]'") from exc
    try:
        if is_local_dataset(spec):
            ds = datasets.load_from_disk(name)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
            return ds.to_iterable_dataset()
        return datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as exc:  # network, missing dataset: one line for the user
        raise HldError(
            f"cannot stream {name} ({config}, {split}): {exc_line(exc)}",
            "check the name and network, or download the shards and give their glob",
        ) from exc


def is_local_dataset(spec: str) -> bool:
    """An `hf:` spec naming a dataset saved on this machine (`save_to_disk`), not one on the hub."""
    local = Path(spec.split(":")[1]) if spec.count(":") >= 1 else None
    return bool(
        local is not None
        and local.is_dir()
        and any((local / n).exists() for n in ("dataset_dict.json", "dataset_info.json"))
    )


def _hf_records(spec: str, ds, text_field: str) -> Iterator[str]:
    name, split = spec.split(":")[1], spec.split(":")[3]
    for record in ds:
        if text_field not in record:  # as for JSONL: a wrong field is named, not read as an empty corpus
            raise HldError(
                f"{name} ({split}) has no {text_field!r} field (fields: {', '.join(record)})",
                "set data.text_field to the field that holds the text",
            )
        text = record[text_field]
        if isinstance(text, str) and text.strip():
            yield text


def source_units(spec: str) -> list[str]:
    """The units a source tokenises in, in document order: its files (local), or the shards a
    `datasets` source streams from (C4 on the hub: its 1,024 train files). One token-store shard each."""
    if spec.startswith("hf:"):
        return [f"{spec}#{i}" for i in range(_hf_dataset(spec).n_shards)]
    if token_files.is_token_file(spec):
        return [str(p) for p in token_files.files(spec)]
    return [str(p) for p in resolve_files(spec)]


def iter_unit(spec: str, index: int, text_field: str = "text") -> Iterator[str]:
    """The documents of unit `index` of `source_units(spec)`, in order."""
    if spec.startswith("hf:"):
        ds = _hf_dataset(spec)
        if ds.n_shards > 1:
            ds = ds.shard(num_shards=ds.n_shards, index=index)
        yield from _hf_records(spec, ds, text_field)
        return
    yield from _iter_file(resolve_files(spec)[index], text_field)


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    yield from (iter_jsonl(path, text_field) if _kind(path) == "jsonl" else iter_txt(path))


def iter_documents(spec: str, text_field: str = "text") -> Iterator[str]:
    """Every document of `spec`, in a fixed order (files sorted by name, records in file order)."""
    if spec.startswith("hf:"):
        yield from iter_hf(spec, text_field)
        return
    for path in resolve_files(spec):
        yield from _iter_file(path, text_field)


def fingerprint(spec: str) -> str:
    """A cheap identity of a local source (names, sizes, mtimes) for caching its tokenisation."""
    if spec.startswith("hf:"):
        return hashlib.sha256(spec.encode()).hexdigest()[:16]
    if token_files.is_token_file(spec):
        return token_files.fingerprint(spec)
    return files_fingerprint(resolve_files(spec))
