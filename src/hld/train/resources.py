"""Things several runs share in one process (`hld run` trains four arms): the tokenizer, the
teacher's weights and the tokenised corpora are loaded once."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Optional

import numpy as np

from hld.config import DataConfig, StudentConfig
from hld.data.paired import PairedSample, PairedWindows, open_paired_windows
from hld.data.store import Windows
from hld.data.tokenize import open_windows
from hld.errors import HldError
from hld.models.hooks import text_config
from hld.models.loading import SHIPPED_TOKENIZERS, LoadedModel, freeze, load_causal_lm, model_config, resolve_model_dir
from hld.precision import resolve_dtype


def tokenizer_dir(path: Path, spec: str, what: str):
    """The tokenizer in a directory that holds one alone (no model), or one line naming what is wrong."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise HldError(
            f"{what} {spec} holds no tokenizer (no tokenizer.json or tokenizer_config.json)",
            "give a tokenizer directory (hld train-tokenizer writes one), a model directory or a hub id",
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # a damaged tokenizer.json: one line
        raise HldError(
            f"cannot load the tokenizer in {spec}: {type(exc).__name__}", "give a working tokenizer directory"
        ) from exc


class Resources:
    def __init__(self) -> None:
        self._teachers: dict[tuple[str, str], LoadedModel] = {}
        self._tokenizers: dict[str, object] = {}
        self._windows: dict[tuple, Windows] = {}
        self._paired: dict[tuple, PairedWindows] = {}
        self.build_stores = True  # False on the ranks that only read what rank 0 tokenised (torchrun)
        self._states: Optional[tuple[tuple, object]] = None  # the latest diagnostics windows' teacher states
        self._derivations: dict[tuple, object] = {}  # derived students' kept blocks (`derivation`)

    def tokenizer(self, spec: str, what: str = "teacher.model"):
        """The tokenizer of a model spec (`teacher.model`'s forms), or of a directory holding a tokenizer
        alone (`hld train-tokenizer` writes one; `student.tokenizer`, `--student-tokenizer`)."""
        if spec not in self._tokenizers:
            path = SHIPPED_TOKENIZERS.get(spec) or Path(spec).expanduser()
            if path.is_dir() and not (path / "config.json").exists() and not (path / "config.yaml").exists():
                self._tokenizers[spec] = tokenizer_dir(path, spec, what)
            elif any(k[0] == spec for k in self._teachers):
                self._tokenizers[spec] = next(v.tokenizer for k, v in self._teachers.items() if k[0] == spec)
            else:
                from transformers import AutoTokenizer

                source, _ = resolve_model_dir(spec)
                try:
                    self._tokenizers[spec] = AutoTokenizer.from_pretrained(source)
                except Exception as exc:
                    raise HldError(
                        f"cannot load the tokenizer of {spec!r}: {type(exc).__name__}",
                        "give a model directory that includes its tokenizer",
                    ) from exc
        return self._tokenizers[spec]

    def teacher_config(self, spec: str):
        """The teacher's language-model config (a multimodal checkpoint's text config), without its weights."""
        loaded = next((v for k, v in self._teachers.items() if k[0] == spec), None)
        if loaded is not None:
            return text_config(loaded.model.config)
        return text_config(model_config(resolve_model_dir(spec)[0]))

    def teacher(self, spec: str, dtype: str) -> LoadedModel:
        torch_dtype = resolve_dtype(dtype)
        key = (spec, str(torch_dtype))
        if key not in self._teachers:
            loaded = load_causal_lm(spec, dtype=torch_dtype, tokenizer=self._tokenizers.get(spec))
            freeze(loaded.model)
            self._teachers[key] = loaded
            self._tokenizers.setdefault(spec, loaded.tokenizer)
        return self._teachers[key]

    def derivation(self, student: StudentConfig, spec: str, dtype: str, train_windows: Windows, *, device):
        """How a derived student is made from `spec` (`hld.models.derive.derive`): ranked once per process for
        the same teacher, preset, init and windows (`hld run`'s cells share it; each still counts its cost)."""
        from hld.flops import calibration_flops
        from hld.models.derive import derive

        sizes = tuple(getattr(student, k) for k in ("d_model", "n_heads", "n_kv_heads", "d_ff"))  # they narrow it
        key = (spec, dtype, student.preset, repr(student.init), sizes, id(train_windows))
        if key not in self._derivations:
            lm = self.teacher(spec, dtype).model.to(device)
            got = derive(student, teacher=lm, teacher_name=spec, train_windows=train_windows)
            T = int(train_windows[:1].shape[1])
            width = got.widths is not None
            cost = calibration_flops(
                lm,
                got.rank,
                windows=got.calibration_windows,
                seq_len=T,
                width=width,
                residual=got.residual.how if got.residual is not None else None,
                kept_blocks=len(got.kept),
            )
            self._derivations[key] = dataclasses.replace(got, calibration_flops=cost)
        return self._derivations[key]

    def teacher_states(self, spec: str, dtype: str, windows: np.ndarray, *, skip_first: bool, device):
        """The teacher's layer states on the diagnostics windows (`hld.eval.cka.TeacherStates`), shared
        by the runs that validate on the same windows; only the latest windows' are kept."""
        from hld.eval.cka import TeacherStates

        key = (spec, dtype, skip_first, str(device), windows.shape, hashlib.sha256(windows.tobytes()).hexdigest())
        if self._states is None or self._states[0] != key:
            self._states = None  # the previous windows' states go before the new ones are computed
            lm = self.teacher(spec, dtype).model.to(device)
            self._states = (key, TeacherStates(lm, windows, skip_first))
        return self._states[1]

    def windows(
        self,
        source: str,
        tokenizer,
        *,
        seq_len: int,
        text_field: str,
        max_docs: Optional[int] = None,
        store_dir: Optional[str] = None,
        need_windows: Optional[int] = None,
        what: str = "data.train",
    ) -> Windows:
        """The windows of `source`, read lazily from its token store (built on first use for a local
        source): `hld.data.tokenize.open_windows`."""
        key = (source, id(tokenizer), seq_len, text_field, max_docs, store_dir, need_windows)
        if key not in self._windows:
            self._windows[key] = open_windows(
                source,
                tokenizer,
                seq_len=seq_len,
                text_field=text_field,
                store_dir=store_dir,
                max_docs=max_docs,
                need_windows=need_windows,
                may_build=self.build_stores,
                what=what,
            )
        return self._windows[key]

    def train_windows(self, data: DataConfig, tokenizer) -> Windows:
        """The training windows of a run: all of `data.train` (or its first `data.max_train_docs` documents)."""
        return self.windows(
            data.train,
            tokenizer,
            seq_len=data.seq_len,
            text_field=data.text_field,
            max_docs=data.max_train_docs,
            store_dir=data.store_dir,
        )

    def paired_windows(
        self, data: DataConfig, teacher_tok, student_tok, *, validation: bool = False, n: Optional[int] = None
    ) -> PairedWindows:
        """The paired windows of a student with its own tokenizer (`hld.data.paired`): all of `data.train` (or
        its first `data.max_train_docs` documents), or with `validation` the start of `data.validation` that
        holds its first `n` windows (the student's length `data.seq_len`, the teacher's from the store's ratio)."""
        source = data.validation if validation else data.train
        key: tuple = (source, id(teacher_tok), id(student_tok), data.seq_len, data.text_field, data.store_dir)
        key += (n,) if validation else (data.max_train_docs,)
        if key not in self._paired:
            self._paired[key] = open_paired_windows(
                source,
                teacher_tok,
                student_tok,
                seq_len=data.seq_len,
                text_field=data.text_field,
                store_dir=data.store_dir,
                max_docs=None if validation else data.max_train_docs,
                need_windows=n if validation else None,
                may_build=self.build_stores,
                what="data.validation" if validation else "data.train",
            )
        return self._paired[key]

    def paired_validation(self, data: DataConfig, teacher_tok, student_tok) -> PairedSample:
        """What a run with its own student tokenizer validates on: the first `data.val_tokens // data.seq_len`
        paired windows of `data.validation` (at least one), held whole, as `validation_windows` counts them."""
        n = max(1, data.val_tokens // data.seq_len)
        return self.paired_windows(data, teacher_tok, student_tok, validation=True, n=n).sample(n)

    def validation_windows(self, data: DataConfig, tokenizer, n: Optional[int] = None) -> np.ndarray:
        """The validation windows a run (and a study's teacher reference) scores: the first
        `data.val_tokens // data.seq_len` of `data.validation` (at least one), or the first `n`; only
        those are read."""
        n = n or max(1, data.val_tokens // data.seq_len)
        windows = self.windows(
            data.validation,
            tokenizer,
            seq_len=data.seq_len,
            text_field=data.text_field,
            store_dir=data.store_dir,
            need_windows=n,
            what="data.validation",
        )
        return windows[:n]
