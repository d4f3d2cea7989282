"""study.json, the study record `hld study` writes beside its runs: read for the report and the
runner, and refused when its records do not have the types they read."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hld.atomic import read_json_object, write_json
from hld.errors import HldError
from hld.locks import file_lock


def read_report_meta(study_dir: Path) -> dict:
    """study.json ({} without one: a report is built from the run directories alone), refused when damaged."""
    path = study_dir / "study.json"
    if not path.exists():
        return {}
    fix = f"delete {path}: `hld study` writes it again (the report is built from the run directories)"
    return checked_meta(read_json_object(path, "study record", fix), path, fix)


# what the report reads of study.json's records: the fields that must be numbers (None allowed: `or None`)
_RECORD_NUMBERS = {
    "teacher_reference": ("val_loss", "val_ppl", "predictions"),
    "ngram_reference": ("val_loss", "predictions", "fit_tokens or None", "add_k or None"),
    "derived_reference": ("val_loss", "val_ppl", "predictions"),
}


def checked_meta(meta: dict, path: Path, fix: str) -> dict:
    """`meta` (study.json) when its records have the types the study and the report read, else one line."""

    def number(v, optional: bool) -> bool:
        return (optional and v is None) or (isinstance(v, (int, float)) and not isinstance(v, bool))

    def bad(what: str) -> HldError:
        return HldError(f"study record {path} is damaged ({what})", fix)

    if not isinstance(meta.get("name", ""), str):
        raise bad("name is not a string")
    for key in ("study", "caches"):
        if not isinstance(meta.get(key) or {}, dict):
            raise bad(f"{key} is not a mapping")
    for key, fields in _RECORD_NUMBERS.items():
        refs = meta.get(key) or []
        if not isinstance(refs, list) or not all(isinstance(r, dict) and isinstance(r.get("model"), str) for r in refs):
            raise bad(f"{key} is not a list of records with a model")
        for r in refs:
            if key == "ngram_reference" and not isinstance(r.get("fit"), str):
                raise bad(f"{key}: the fit of {r['model']} is not a string")
            for f in fields:
                name = f.split()[0]
                if not number(r.get(name), f.endswith("or None")):
                    raise bad(f"{key}: {name} of {r['model']} is {r.get(name)!r}, not a number")
    for name, cache in (meta.get("caches") or {}).items():
        ok = isinstance(cache, dict) and all(
            number(cache.get(k), True) for k in ("tokens", "build_flops", "build_seconds")
        )
        if not ok or cache.get("tokens") and not isinstance(cache.get("dir"), str):
            raise bad(f"caches: the record of {name} is not a cache record")
    return meta


def read_meta(out: Path) -> dict:
    path = out / "study.json"
    fix = f"delete {path}: it is rebuilt from the run directories"
    return checked_meta(read_json_object(path, "study record", fix), path, fix) if path.exists() else {}


def update_meta(out: Path, change: Callable[[dict], None]) -> dict:
    """Read study.json, apply `change`, write it back, under the study lock (other processes update
    it too: without the lock one's cache record could overwrite another's)."""
    with file_lock(out / ".study.lock"):
        meta = read_meta(out)
        change(meta)
        write_json(out / "study.json", meta)
    return meta
