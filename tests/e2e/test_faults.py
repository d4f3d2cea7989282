"""Issue 23, the generated fault test: every kind of file hld writes and reads back, damaged every way
(emptied, cut to half, bytes flipped, deleted, a key dropped, a value of the wrong type), under every
command that reads it; issue 31 adds what a path can be instead of the file (a directory, a dangling
link, a link to /dev/zero, a FIFO), bytes inverted in place with the size and mtime kept, and the same
file of another build, each under the kind's first reader, and every directory hld writes made a file.
Each case must exit 0 with the right result (the same figures as the undamaged files gave: a damage hld
repairs or may ignore) or exit 2 with one line and no traceback; the user's files beside it are
untouched, and a refusal writes nothing into the damaged directory (but checksum stamps).

The registry (`KINDS`) must name every file a tiny run, study, teacher cache and token store write
(`test_the_registry_names_every_file_hld_writes`): a new file kind written without being listed fails
that test, as the numeric-key range test does for config keys. Damages are made from outside, as a
crash, a full disk or a bad copy would leave them; the teacher cache and the token store are reached
through their public commands only. No case is exempt: none is marked xfail, and every generated case
must pass (the cases once left to other work items were fixed with them, e4d7b32).

One tiny run, one tiny study (its cell and teacher cache), one teacher cache and the validation token
store are built once per module; each case damages a copy."""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import io
import json
import os
import resource
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from helpers import C4_VALIDATION, tiny_overrides, train_argv
from hld.cli import main

RUN_EXTRA = ("objective.method=hld-joint",)  # writes hidden_stats.pt as well
STUDY_RUNS = [o for o in tiny_overrides() if not o.startswith(("student.preset=", "budget."))] + ["data.val_tokens=256"]
STUDY_ARGS = [
    "study",
    "--config",
    "scratch",  # the from-scratch study: the demo's students are blocks of a real teacher
    "budgets=[{tokens: 256}]",
    "tasks=[]",
    "arms=[kd]",
    "seeds=[0]",
    "equal_flops=null",
]
EVAL_DATA = ["--data", C4_VALIDATION, "--seq-len", "32", "--max-docs", "4"]


@dataclass(frozen=True)
class Kind:
    """One kind of file: where it lies (a glob under its root), its format (which damages apply), the key
    a keyed damage drops or retypes, and the commands that read it (none: written, never read back)."""

    root: str  # run | study | cache | store
    pattern: str
    fmt: str  # json | yaml | jsonl | bytes
    readers: tuple[str, ...] = ()
    key: str = ""


KINDS = [
    # a run directory (hld train)
    Kind("run", "config.yaml", "yaml", ("resume", "export", "eval"), "train"),
    Kind("run", "summary.json", "json", ("resume", "export", "eval"), "tokens"),
    Kind("run", "metrics.jsonl", "jsonl", ("resume",), "val/loss"),
    Kind("run", "checkpoints/checkpoint.pt", "bytes", ("resume",)),
    Kind("run", "checkpoints/checkpoint.pt.sha256", "json", ("resume",), "sha256"),
    Kind("run", "hidden_stats.pt", "bytes", ("resume",)),
    Kind("run", "hidden_stats.pt.sha256", "json", ("resume",), "sha256"),
    Kind("run", "cka.json", "json"),  # read by hld report: see the study's
    Kind("run", "student/model.safetensors", "bytes", ("eval", "export")),
    Kind("run", "student/config.json", "json", ("eval", "export"), "hidden_size"),
    Kind("run", "student/tokenizer.json", "json", ("eval", "export"), "model"),
    Kind("run", "student/tokenizer_config.json", "json", ("eval", "export"), "tokenizer_class"),
    Kind("run", "student/generation_config.json", "json", ("eval", "export"), "eos_token_id"),
    # a study directory (hld study); its cells' checkpoints and students are the run's kinds above
    Kind("study", "study.json", "json", ("report", "study"), "teacher_reference"),
    Kind("study", "runs/*/config.yaml", "yaml", ("report", "study"), "objective"),
    Kind("study", "runs/*/summary.json", "json", ("report", "study"), "val/loss"),
    Kind("study", "runs/*/metrics.jsonl", "jsonl", ("report",), "val/loss"),
    Kind("study", "runs/*/cell.json", "json", ("report",), "configuration"),
    Kind("study", "runs/*/cka.json", "json", ("report",), "cka"),
    Kind("study", "runs/*/checkpoints/*", "bytes"),
    Kind("study", "runs/*/student/*", "bytes"),
    Kind("study", "runs/*/hidden_stats.pt*", "bytes"),
    Kind("study", "caches/*/*", "bytes"),  # the cache's kinds below
    Kind("study", "caches/.*.lock", "bytes"),  # a cache group's build lock
    Kind("study", "fidelity/*", "bytes"),  # the signal-fidelity measurement's cache (its figure: study.json)
    Kind("study", "fidelity/.*.lock", "bytes"),
    Kind("study", "report.md", "bytes"),
    Kind("study", "results.csv", "bytes"),
    Kind("study", "paired.csv", "bytes"),
    Kind("study", "plots/*.png", "bytes"),
    Kind("study", ".study.lock", "bytes"),
    Kind("study", "locks/*/*.lock", "bytes"),
    # a teacher cache (hld cache-teacher)
    Kind("cache", "manifest.json", "json", ("train-cached", "cache-teacher"), "shards"),
    Kind("cache", "parts/*.bin", "bytes", ("train-cached",)),
    Kind("cache", "parts/*.records.jsonl", "jsonl"),  # the build's commit log: the manifest holds its records
    Kind("cache", "windows.npy", "bytes", ("train-cached",)),
    Kind("cache", "verified.jsonl", "bytes", ("train-cached",)),  # lines: "shard field sha dev:ino size mtime ctime"
    # a token store (what `hld eval --data` and `hld tokenize` read)
    Kind("store", "manifest.json", "json", ("eval-store", "tokenize"), "shards"),
    Kind("store", "identity.json", "json", ("eval-store",), "source"),
    Kind("store", "shards/*.bin", "bytes", ("eval-store", "tokenize")),
    Kind("store", "shards/*.json", "json", ("eval-store",), "sha256"),
    Kind("store", "shards/*.ok", "bytes", ("eval-store",)),
    Kind("store", "shards/*.lock", "bytes"),
    Kind("store", ".manifest.lock", "bytes"),
    Kind("store", ".identity.lock", "bytes"),  # ranks starting on one store take it to write identity.json
]

_BYTE_DAMAGES = ("empty", "half", "flip", "delete")
_KEY_DAMAGES = ("drop_key", "wrong_type")
# issue 31: what a file can be instead of itself; each kind under its first reader. `inplace`: bytes inverted
# with the size and the mtime kept; `swapped`: the same file of another build (a run of another seed, a
# cache of other windows, the store of another source)
_PATH_DAMAGES = ("directory", "dangling", "dev_zero", "fifo", "inplace", "swapped")
_SWAPPABLE = ("run", "cache", "store")

# directories hld writes, each made a regular file (what was at `checkpoints/` at a run's first save)
DIR_KINDS = [
    Kind("run", "checkpoints", "dir", ("resume",)),
    Kind("run", "student", "dir", ("export", "eval")),
    Kind("study", "runs", "dir", ("report",)),
    Kind("cache", "parts", "dir", ("train-cached",)),
    Kind("store", "shards", "dir", ("eval-store",)),
]


def damages(kind: Kind) -> tuple[str, ...]:
    return _BYTE_DAMAGES + (_KEY_DAMAGES if kind.fmt != "bytes" else ())


def _case_id(case) -> str:
    k, d, r = case
    return f"{k.root}:{k.pattern}:{d}:{r}"


CASES = [(k, d, r) for k in KINDS for d in damages(k) for r in k.readers]
PATH_CASES = [
    (k, d, k.readers[0]) for k in KINDS if k.readers for d in _PATH_DAMAGES if d != "swapped" or k.root in _SWAPPABLE
]
DIR_CASES = [(k, "file_for_dir", r) for k in DIR_KINDS for r in k.readers]
PARAMS = [pytest.param(c, id=_case_id(c)) for c in CASES + PATH_CASES + DIR_CASES]


# --------------------------------------------------------------------------- what is damaged


def _wrong(value):
    """A value of another type than `value` (a mapping for a scalar, a string for anything else)."""
    return "garbage" if isinstance(value, (dict, list, int, float)) and not isinstance(value, bool) else {"x": 1}


def fifo(path: Path) -> None:
    """A FIFO at `path`, and a daemon thread that opens its other end whenever hld would be waiting on it
    and closes it at once: a reader reads an empty file, a writer gets EPIPE; a regression fails, never hangs."""
    os.mkfifo(path)

    def unblock() -> None:
        for _ in range(6000):  # 10 minutes, then the thread ends
            for flags in (os.O_WRONLY | os.O_NONBLOCK, os.O_RDONLY | os.O_NONBLOCK):
                try:
                    os.close(os.open(path, flags))
                except OSError:  # ENXIO: no reader yet; the FIFO gone with the test's directory
                    pass
            time.sleep(0.1)

    threading.Thread(target=unblock, daemon=True).start()


def damage_path(path: Path, how: str, other: Path | None) -> None:
    """What `path` (a file, or a directory for `file_for_dir`) becomes under a path damage."""
    if how == "inplace":
        before = path.stat()
        with open(path, "r+b") as fh:
            for i in (before.st_size // 3, before.st_size // 2):
                fh.seek(i)
                b = fh.read(1)
                fh.seek(i)
                fh.write(bytes([(b[0] if b else 0) ^ 0xFF]))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        return
    if how == "swapped":
        assert other is not None
        shutil.copy2(other, path)  # another build's file, its own mtime
        return
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    if how == "file_for_dir":
        path.write_text("a regular file where hld keeps a directory\n")
    elif how == "directory":
        path.mkdir()
    elif how == "dangling":
        path.symlink_to(path.parent / ".gone")
    elif how == "dev_zero":
        path.symlink_to("/dev/zero")
    elif how == "fifo":
        fifo(path)


def damage(path: Path, how: str, kind: Kind) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "half":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":  # three bytes inverted in the middle: a torn sector, a bad copy
        b = bytearray(data)
        for i in (len(b) // 3, len(b) // 2, 2 * len(b) // 3):
            b[i] ^= 0xFF
        path.write_bytes(bytes(b))
    elif how == "delete":
        path.unlink()
    elif kind.fmt == "jsonl":  # the keyed damages hit the last line (the final validation)
        lines = data.decode().splitlines()
        row = json.loads(lines[-1])
        if how == "drop_key":
            row.pop(kind.key, None)
        else:
            row[kind.key] = _wrong(row.get(kind.key))
        path.write_text("\n".join([*lines[:-1], json.dumps(row)]) + "\n")
    else:
        obj = yaml.safe_load(data) if kind.fmt == "yaml" else json.loads(data)
        assert kind.key in obj, (path, kind.key, list(obj))
        if how == "drop_key":
            del obj[kind.key]
        else:
            obj[kind.key] = _wrong(obj[kind.key])
        path.write_text(yaml.safe_dump(obj) if kind.fmt == "yaml" else json.dumps(obj))


# --------------------------------------------------------------------------- the module's files


def _quiet_main(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


def _json_tail(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _cache_argv(out: Path) -> list[str]:
    return ["cache-teacher", "--config", "smoke", "--out", str(out), *tiny_overrides(), "--quiet"]


def _cached_argv(run: Path, cache: Path) -> list[str]:
    return train_argv(run, "objective.method=kd", f"teacher.cache={cache}", "--json")


def _results(study: Path) -> dict:
    return {r["cell"]: float(r["val_loss"]) for r in csv.DictReader(open(study / "results.csv"))}


@dataclass
class World:
    roots: dict[str, Path]  # run, study, cache, store
    cache_dir: Path  # the HLD_CACHE_DIR all of them were built with
    summary: dict  # the run's summary.json
    eval_ppl: float  # hld eval --model RUN on EVAL_DATA
    results: dict  # the study's results.csv: cell -> val_loss
    cached_val: float  # val/loss of a kd run on the cache
    others: dict[str, Path]  # another build of run, cache and store (the `swapped` damage's source)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    base = tmp_path_factory.mktemp("faults")
    cache_dir = base / "hld-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HLD_CACHE_DIR", str(cache_dir))
        run, study, cache = base / "run", base / "study", base / "cache"
        assert main(train_argv(run, *RUN_EXTRA)) == 0
        rc, out = _quiet_main(["eval", "--model", str(run), *EVAL_DATA, "--json", "--quiet"])
        assert rc == 0
        eval_ppl = _json_tail(out)["ppl"]
        assert _quiet_main([*STUDY_ARGS, *STUDY_RUNS, "--out", str(study), "--quiet"])[0] == 0
        assert main(_cache_argv(cache)) == 0
        assert main([*train_argv(base / "run-seed1", *RUN_EXTRA), "train.seed=1"]) == 0  # another build of each
        assert main([*_cache_argv(base / "cache-seed1"), "train.seed=1"]) == 0
        rc, out = _quiet_main(_cached_argv(base / "cached", cache))
        assert rc == 0
        cached_val = _json_tail(out)["val/loss"]
    manifests = sorted((cache_dir / "stores").glob("*/manifest.json"))
    stores = [p.parent for p in manifests if C4_VALIDATION in p.read_text()]
    other_stores = [p.parent for p in manifests if C4_VALIDATION not in p.read_text()]  # the training text's
    assert len(stores) == 1 and other_stores, manifests
    return World(
        roots={"run": run, "study": study, "cache": cache, "store": stores[0]},
        cache_dir=cache_dir,
        summary=json.loads((run / "summary.json").read_text()),
        eval_ppl=eval_ppl,
        results=_results(study),
        cached_val=cached_val,
        others={"run": base / "run-seed1", "cache": base / "cache-seed1", "store": other_stores[0]},
    )


@pytest.fixture(autouse=True)
def hld_cache_dir(world, monkeypatch) -> Path:
    """The module's HLD_CACHE_DIR (conftest's gives each test an empty one): its stores are built once."""
    monkeypatch.setenv("HLD_CACHE_DIR", str(world.cache_dir))
    return world.cache_dir


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _snapshot(root: Path, skip: str = "") -> dict:
    """Every file's bytes but `skip`'s and the checksum stamps' (a copied cache is another inode: checking it
    before a refusal appends its verdicts to verified.jsonl, which is bookkeeping, not the user's data)."""
    stamp = lambda r: r.endswith(("verified.jsonl", ".ok"))  # noqa: E731
    return {r: (root / r).read_bytes() for r in _files(root) if r != skip and not stamp(r)}


@pytest.mark.slow
def test_the_registry_names_every_file_hld_writes(world):
    """Every file of a tiny run, study, teacher cache and token store matches a listed kind, and every
    listed kind (but the optional ones) matches a file: a new kind of file must be added to KINDS."""
    # a cache of an hld config's layers holds hidden arrays; a study cell of an hld arm its statistics
    optional = {("cache", "shard-*.hidden_*.npy"), ("study", "runs/*/hidden_stats.pt*")}
    for name, root in world.roots.items():
        patterns = [k.pattern for k in KINDS if k.root == name]
        unlisted = [f for f in _files(root) if not any(fnmatch.fnmatch(f, p) for p in patterns)]
        assert not unlisted, f"{name} files not in the fault test's KINDS: {unlisted}"
        stale = [
            p for p in patterns if (name, p) not in optional and not any(fnmatch.fnmatch(f, p) for f in _files(root))
        ]
        assert not stale, f"KINDS lists {name} files that no longer exist: {stale}"


# --------------------------------------------------------------------------- the commands that read


def _check_resume(world: World, root: Path, stdout: str, tmp: Path) -> None:
    got = _json_tail(stdout)
    assert got["steps"] == world.summary["steps"] and got["tokens"] == world.summary["tokens"]
    assert got["val/loss"] == pytest.approx(world.summary["val/loss"], rel=1e-4)


def _check_export(world: World, root: Path, stdout: str, tmp: Path) -> None:
    from hld.fingerprint import file_sha256

    assert file_sha256(tmp / "export" / "model.safetensors") == world.summary["student_sha256"]["model.safetensors"]
    assert (tmp / "export" / "README.md").is_file()


def _check_eval(world: World, root: Path, stdout: str, tmp: Path) -> None:
    assert _json_tail(stdout)["ppl"] == pytest.approx(world.eval_ppl, rel=1e-4)


def _check_report(world: World, root: Path, stdout: str, tmp: Path) -> None:
    got = _results(root)
    assert got.keys() == world.results.keys()
    assert all(got[c] == pytest.approx(v, rel=1e-6) for c, v in world.results.items())


def _check_cached(world: World, root: Path, stdout: str, tmp: Path) -> None:
    assert _json_tail(stdout)["val/loss"] == pytest.approx(world.cached_val, rel=1e-4)


def _check_cache_rebuilt(world: World, root: Path, stdout: str, tmp: Path) -> None:
    """A reused or rebuilt cache must serve a run as the intact one did."""
    rc, out = _quiet_main(_cached_argv(tmp / "after", root))
    assert rc == 0
    _check_cached(world, root, out, tmp)


def _check_store(world: World, root: Path, stdout: str, tmp: Path) -> None:
    """The store serves the same windows: the eval perplexity is the intact one's."""
    rc, out = _quiet_main(["eval", "--model", str(world.roots["run"]), *EVAL_DATA, "--json", "--quiet"])
    assert rc == 0
    _check_eval(world, root, out, tmp)


def command(reader: str, world: World, root: Path, tmp: Path) -> tuple[list[str], object]:
    """(argv, the check of an exit-0 result) of `reader` on the damaged copy `root`."""
    run = world.roots["run"] if reader in ("eval-store", "tokenize") else root
    return {
        "resume": ([*train_argv(root, *RUN_EXTRA), "--resume", "--json"], _check_resume),
        "export": (["export", str(root), str(tmp / "export"), "--quiet"], _check_export),
        "eval": (["eval", "--model", str(run), *EVAL_DATA, "--json", "--quiet"], _check_eval),
        "eval-store": (["eval", "--model", str(run), *EVAL_DATA, "--json", "--quiet"], _check_eval),
        "report": (["report", str(root), "--quiet"], _check_report),
        "study": ([*STUDY_ARGS, *STUDY_RUNS, "--out", str(root), "--quiet"], _check_report),
        "train-cached": (_cached_argv(tmp / "r", root), _check_cached),
        "cache-teacher": (_cache_argv(root), _check_cache_rebuilt),
        "tokenize": (
            ["tokenize", "--config", "smoke", *tiny_overrides(), "--split", "validation", "--quiet"],
            _check_store,
        ),
    }[reader]


@contextlib.contextmanager
def _bounded(seconds: int = 300, data_bytes: int = 8 << 30):
    """A case that reads /dev/zero or waits on a FIFO by mistake fails (MemoryError past 8 GiB of heap,
    TimeoutError after 5 minutes) instead of filling the machine's memory or hanging the suite."""
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = data_bytes if hard == resource.RLIM_INFINITY else min(data_bytes, hard)

    def timeout(signum, frame):
        raise TimeoutError(f"the command ran past {seconds} s: a blind read?")

    old = signal.signal(signal.SIGALRM, timeout)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def _copy_root(world: World, name: str, tmp: Path, monkeypatch) -> Path:
    """A private copy of the root to damage; a store is copied with its whole HLD_CACHE_DIR."""
    if name == "store":
        shutil.copytree(world.cache_dir, tmp / "hld-cache")
        monkeypatch.setenv("HLD_CACHE_DIR", str(tmp / "hld-cache"))
        return tmp / "hld-cache" / world.roots["store"].relative_to(world.cache_dir)
    shutil.copytree(world.roots[name], tmp / name, symlinks=True)
    return tmp / name


@pytest.mark.parametrize("case", PARAMS)
@pytest.mark.slow
def test_a_damaged_file_is_repaired_ignored_or_refused_in_one_line(tmp_path, capsys, monkeypatch, world, case):
    kind, how, reader = case
    root = _copy_root(world, kind.root, tmp_path, monkeypatch)
    target = sorted(root.glob(kind.pattern))[0]
    rel = str(target.relative_to(root))
    user = tmp_path / "user"  # the user's own files beside
    user.mkdir()
    (user / "notes.txt").write_text("mine\n")
    if how in _PATH_DAMAGES or how == "file_for_dir":
        other = world.others[kind.root] / rel if how == "swapped" else None
        if other is not None and not other.is_file():
            pytest.skip(f"the other build holds no {rel}")
        damage_path(target, how, other)
    else:
        damage(target, how, kind)
    before = _snapshot(root, skip=rel)
    argv, check = command(reader, world, root, tmp_path)
    capsys.readouterr()
    with _bounded():
        rc, stdout = _quiet_main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert (user / "notes.txt").read_text() == "mine\n"
    if rc == 2:
        lines = [ln for ln in err.strip().splitlines() if ln]
        assert len(lines) == 1 and lines[0].startswith("hld: error: ") and " — " in lines[0], err
        if kind.root in ("run", "study"):  # a refusal writes nothing into the damaged directory
            assert _snapshot(root, skip=rel) == before, "a refused command changed the directory"
        return
    assert rc == 0, err
    check(world, root, stdout, tmp_path)


def test_the_fault_test_size():
    """Its size as reported in the issue's closing note: kinds read back x damages x their readers."""
    read_back = [k for k in KINDS if k.readers]
    assert len(CASES) == sum(len(damages(k)) * len(k.readers) for k in read_back)
    assert len(CASES) >= 100 and len({k.root for k in read_back}) == 4
    swapped = sum(k.root in _SWAPPABLE for k in read_back)
    assert len(PATH_CASES) == len(read_back) * (len(_PATH_DAMAGES) - 1) + swapped
    assert len(PARAMS) == len(CASES) + len(PATH_CASES) + len(DIR_CASES)
