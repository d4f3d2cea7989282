"""`hld plan`: what a config (or every cell of a study) will cost, before anything is loaded. The
teacher is its `config.json` alone and both models are built on the meta device by the one model
assembly (`hld.train.assembly.assemble`), so a 27B teacher is sized in a second, with no weights read.

Per arm: parameters, FLOPs per token (`hld.flops`), steps and tokens at the budget under each
accounting (`budget.count_teacher` true and false), the teacher cache's bytes per token and total size
(docs/cache-format.md), and an estimate of the peak accelerator memory of one process:

  params       P * (4 weight + 4 grad + 8 AdamW exp_avg/exp_avg_sq) bytes, fp32 master weights;
               / world size under fsdp2. P = student + projectors (the tied head counted once); a frozen
               embedding (train.freeze_embedding) 4 bytes per weight
  autocast     P * 2 bytes when the student computes in bf16 (autocast's casts of the weights, the
               fused head's copy of W among them)
  activations  n_layers * micro tokens * (4 (2 n d + 2 q + 2 kv) + b (c d + 4 q + 4 d_ff) + b T)
               + 4 * micro tokens * d * 4, q = n_heads * head_dim, kv = n_kv_heads * head_dim,
               b = 2 (bf16) or 4 (fp32), n = the block's RMSNorms of width d (Gemma 3: 4), the q/k terms
               where the block normalises q and k (Gemma 3, Qwen 3), c = 5 in bf16 (autocast casts the
               fp32 norm output once per q, k, v, gate and up projection) or 2 in fp32: what autograd
               saves per block. In fp32 whatever the precision: the residual stream (the fp32 embedding's
               sum) at the two pre-norms, each norm's normalised product, the fp32 copies of the post-norms'
               inputs and of q and k for their norms. In b: the projections' inputs, q, the expanded k/v
               (repeat_kv), the attention output, the MLP's gate, up, activation and product, and the
               boolean attention mask as SDPA converts it, (micro, 1, T, T) in b per block
  head         the fused head's buffers (src/hld/distill/chunked.py), R = its row block (the whole
               chunk on a GPU, hld.distill.losses.ROWS on a CPU): the chunk's logits (chunk, V) in b, + their
               (R, V) fp32 rows in bf16; p = softmax(z) (R, V) fp32 on a GPU (a CPU's runs in place); q
               (R, V) when T != 1; an online teacher's logits (chunk, V) fp32 + (chunk, V) in its own dtype
               and its rows p_t and the KL's product (2 (R, V) fp32; one for objective.top_k); its dL/dW
               (V * d * 4 bytes) held from forward to backward. The buffers are kept for the whole run
  hidden       HLD: micro tokens * layers * d_t * 2 (teacher states) + pairs * micro tokens * 3 * d_t * 4
  teacher      its weights in its dtype when it runs online, or when a cached run reads them anyway
               (`hld.train.loop.teacher_weights_needed`: the layer diagnostics, on by default, on one
               process); online + its final states (micro tokens * d_t in its dtype) until the head reads
               them, + its forward's working set (micro tokens * (2 d_ff_t + 4 d_t) in its dtype) where that
               exceeds the student's activations (not yet allocated while it runs); cached + the decoded
               signal of a micro-batch (k entries of 12 B compact, 6 B exact, 8 B sampled, + 4, per token)

A student with its own tokenizer (`student.tokenizer`, paired windows, hld.distill.cross_tok.objectives)
changes three terms of a KD/HLD arm; the others are the same formula over the student's own vocabulary V:
  head         the student's blocked head instead of the fused head's buffers, R = train.loss_chunk_tokens:
               max(6 (R, V) fp32 at a block's gradient, 3 (R, V) fp32 + the teacher's rows while they are read
               (alm: the rows alone, read before the blocks)) + (R, V) in b + dL/dh and h's copy in b (micro
               tokens * d * (4 + b)); online, the teacher's head at the rows the loss reads, over its vocabulary
               V_t: (R, V_t) in its dtype + fp32, + (R, V_t) fp32 for uld at T != 1 and for alm (the previous
               block's rows), gold 2 (R, V_t) fp32 (the rows, the one-token chunks' rows) + 2 (32, V_t) fp32
  hidden       the teacher's states at its own rows (micro * teacher_seq_len tokens), or a per-chunk cache's
               pooled states (at most one chunk per student token); the pairs' term as above
  teacher      its forward, final states and working set at micro * teacher_seq_len tokens (the windows are
               `teacher_seq_len` long, hld.plan.cross_sizes); the working set where it exceeds the student's
               activations, head and hidden terms (all allocated after it); a per-chunk cache: its rows, per
               student token uld_top_k * 12 + 8 bytes at most (hld.cache.chunks), and the weights only where
               `teacher_weights_needed` says so, as for a per-token cache

The terms are checked against a trace of the training step itself (`hld.memtrace`: `train_step` under
fake tensors, live bytes counted; benchmarks/memory_trace.py, docs/performance.md "Memory on an 80 GB
card, checked against a trace"): within 0.4% for paper-123m and paper-735m (KD), online and cached, and
Llama, Mistral and Qwen 3 blocks at paper-123m's shape within 1.1%, hld-joint 2-3% over;
tests/unit/test_memtrace.py holds a small config to 20%, and paired runs (kd with uld, alm and gold,
hld-joint; online and from a per-chunk cache) to 20% of a real CPU step's live bytes. It leaves out what is
not a tensor: the CUDA context, the kernels' workspaces and the allocator's rounding and fragmentation (~0.5-1 GiB a
process). tests/unit/test_plan.py compares it with a measured CPU peak.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from hld.config import RunConfig
from hld.config_checks import derived_depth
from hld.distill.signals.registry import CACHE_CODECS
from hld.errors import HldError
from hld.flops import planned_calibration
from hld.models.derive import planned_d_model, planned_kept, planned_widths, residual_text
from hld.models.hooks import CausalLM, decoder_of, text_config
from hld.models.loading import meta_causal_lm, model_config, resolve_model_dir
from hld.models.student import count_params, shape_of
from hld.train.assembly import HLD_METHODS, meta_assembly, vocab_of
from hld.train.budget import EXACT_STEPS, flops_per_token, phase_costs, run_length, spent_flops
from hld.train.resources import Resources

GIB = 1024**3


@dataclass(frozen=True)
class SpecialIds:
    """Stands in for the tokenizer where only its special ids are read (`assembly.special_ids`)."""

    bos_token_id: int
    eos_token_id: int
    pad_token_id: Optional[int]


def teacher_shapes(spec: str) -> tuple[CausalLM, SpecialIds]:
    """The teacher on the meta device, and its special ids, from its config.json (the tokenizer only
    where the config lacks them)."""
    from hld.models.loading import SHIPPED_CONFIGS

    source = spec if spec in SHIPPED_CONFIGS else resolve_model_dir(spec)[0]
    config = model_config(source)
    text = text_config(config)
    ids = [
        getattr(text, k, None) if getattr(text, k, None) is not None else getattr(config, k, None)
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
    ]
    if ids[0] is None or ids[1] is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve_model_dir(spec)[0])
        ids = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
    eos = ids[1][0] if isinstance(ids[1], list) else ids[1]
    return meta_causal_lm(config), SpecialIds(ids[0], eos, ids[2] if ids[2] is not None else eos)


def cache_bytes_per_token(cfg: RunConfig, *, layers: list[int], d_teacher: int, vocab: int) -> dict[str, float]:
    """Bytes per cached token (docs/cache-format.md, Cost): `estimate`, and `bound` (the most it can be).
    The logits' by their signal kind (`cache_logit_bytes` of hld.distill.signals.topk / .sampled); hidden:
    2 d (bf16) or d + 4 (fp8) per layer; + 4 for the token."""
    from hld.cache.build import cache_slots, codec_of

    k, T = cache_slots(cfg, vocab), cfg.data.seq_len
    codec = codec_of(cfg)
    hidden = len(layers) * (2 * d_teacher if codec.hidden == "bfloat16" else d_teacher + 4)
    logits, bound = CACHE_CODECS[codec.logits].cache_logit_bytes(codec, k, T, vocab)
    return {"logits": logits, "hidden": float(hidden), "estimate": logits + hidden + 4, "bound": bound + hidden + 4}


def signal_row(cfg: RunConfig) -> dict:
    """The logit signal of a planned cache: codec and k, or (sampled) draws per token and tau."""
    t = cfg.teacher
    if t.cache_signal != "sampled":
        return {"codec": t.cache_codec, "top_k": t.cache_top_k}
    return {
        "codec": "sampled",
        "signal": "sampled",
        "samples": t.cache_samples,
        "proposal_temperature": t.cache_proposal_temperature,
    }


# assumed for the build-time estimate (docs/cache-format.md, Cost): the teacher's forward at 40% of an
# H100's dense bf16 peak, and the CPU encode rates measured per core on the 2-core EPYC of
# docs/performance.md (issue 20: compact top-128 logits ~57k tokens/s, fp8 ~59k tokens/s per layer)
BUILD_TEACHER_FLOPS_PER_S = 0.4 * 989e12
ENCODE_LOGITS_TOKENS_PER_S, ENCODE_LAYER_TOKENS_PER_S = 57_000, 59_000


def cache_costs(cfg: RunConfig, *, layers: list[int], teacher: CausalLM, tokens: float, world_size: int) -> dict:
    """What building and reading the cache costs besides its bytes: files on disk (fields x build parts
    + a record log per part + manifest, windows index, stamps), the build's hours (the teacher's forward
    at BUILD_TEACHER_FLOPS_PER_S, plus the CPU encode, per process, over `world_size` processes), and
    host RAM per process: a reader's prefetched micro-batches (this step's and the next step's decoded
    signals) and a builder's held shard (compact logits wait for their shard's slot width)."""
    from hld.cache.build import cache_slots, codec_of
    from hld.cache.codec import field_specs
    from hld.flops import forward_flops_per_token

    T, k = cfg.data.seq_len, cache_slots(cfg, vocab_of(teacher))
    d = text_config(teacher.config).hidden_size
    codec = codec_of(cfg)
    fields = len(field_specs(codec, layers, T=T, k=k, d_model=d, slot_bits=1))
    forward_s = tokens * forward_flops_per_token(teacher, T) / BUILD_TEACHER_FLOPS_PER_S
    encode_s = tokens * (
        (1 / ENCODE_LOGITS_TOKENS_PER_S) * (k / 128 if codec.logits == "compact" else 0.1)
        + len(layers) / ENCODE_LAYER_TOKENS_PER_S
    )
    entry = CACHE_CODECS[codec.logits].decoded_entry_bytes(codec)  # decoded bytes per logit entry
    decoded = 4 + k * entry + 4 + len(layers) * 2 * d  # per token
    local = cfg.train.batch_size // world_size
    shard_windows = 256  # build_cache's
    return {
        "files": fields * world_size + world_size + 3,
        "build_hours": (forward_s + encode_s) / world_size / 3600,
        "build_hours_teacher": forward_s / world_size / 3600,
        "build_parts": world_size,
        "host_ram_read_bytes": 2 * local * T * decoded,
        "host_ram_build_bytes": shard_windows * T * (k * 8 + 4) * (2 if codec.logits == "compact" else 0)
        + 8 * T * len(layers) * d * 4,
    }


def _dtype_bytes(dtype: torch.dtype) -> int:
    return dtype.itemsize  # (no tensor: nothing allocated on any device)


def memory_estimate(
    cfg: RunConfig,
    parts: Any,
    teacher: CausalLM,
    *,
    world_size: int = 1,
    device: Optional[torch.device] = None,
    teacher_seq_len: Optional[int] = None,
) -> dict[str, float]:
    """Peak accelerator bytes of one process, by the module docstring's formula (a dict of its terms and
    `total`). `parts`: the meta-device `Assembly`; `device`: where `auto` precision resolves and which
    path the fused head takes (an accelerator unless given); `teacher_seq_len`: a student with its own
    tokenizer, the teacher's window length (`CrossSizes.teacher_seq_len`) of its paired windows."""
    from hld.distill.losses import ROWS
    from hld.distributed import Dist, resolve_mode
    from hld.precision import resolve_dtype
    from hld.train.loop import teacher_weights_needed

    device = device or torch.device("cuda")
    gpu = device.type != "cpu"
    mode = resolve_mode(cfg.train.parallel, world_size)
    compute = resolve_dtype(cfg.train.precision, device)
    b_act = _dtype_bytes(compute)
    low_precision = compute != torch.float32
    local = cfg.train.batch_size // world_size
    micro = cfg.train.micro_batch_size or local
    T = cfg.data.seq_len
    n_tok = micro * T
    shape = shape_of(parts.student)
    V, d = parts.student.get_input_embeddings().weight.shape
    P = count_params(parts.student)["total"] + (parts.projectors.n_params() if parts.projectors is not None else 0)
    out: dict[str, float] = {}
    # a frozen embedding (train.freeze_embedding): its weights alone, no gradient or AdamW state
    frozen = V * d if cfg.train.freeze_embedding else 0
    out["params"] = ((P - frozen) * 16 + frozen * 4) / (world_size if mode == "fsdp2" else 1)
    out["autocast"] = P * 2 if low_precision else 0
    q, kv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    norms, qk_norm = _block_norms(parts.student)
    fp32_saved = 4 * (2 * norms * d + (2 * q + 2 * kv if qk_norm else 0))
    low_saved = b_act * ((5 if low_precision else 2) * d + 4 * q + 4 * shape.d_ff)
    out["activations"] = shape.n_layers * n_tok * (fp32_saved + low_saved + T * b_act) + 4 * n_tok * d * 4
    needs = parts.plan.needs
    online = cfg.objective.method != "ce" and not cfg.teacher.cache
    tc = text_config(teacher.config)
    t_dtype = resolve_dtype(cfg.teacher.dtype, device)
    t_bytes = _dtype_bytes(t_dtype)
    paired = teacher_seq_len is not None and cfg.objective.method != "ce"  # the cross-tokenizer objectives
    n_tok_t = micro * teacher_seq_len if paired else n_tok  # the teacher's rows: its own windows when paired
    chunk = min(cfg.train.loss_chunk_tokens, n_tok)
    R = chunk if gpu else min(ROWS, chunk)  # hld.distill.losses.row_block
    if paired:  # the student's blocked head and the teacher's head at the rows the cross loss reads
        rows = 0
        if online and needs.logits:
            t_low = t_bytes if t_dtype != torch.float32 else 0
            rows = _cross_teacher_rows_bytes(cfg, V_t=vocab_of(teacher), n_tok=n_tok, t_low=t_low)
        head = _cross_head_bytes(cfg, V=V, d=d, n_tok=n_tok, b_act=b_act if low_precision else 0, teacher_rows=rows)
    else:
        head = chunk * V * b_act + (R * V * 4 if low_precision else 0)  # the chunk's logits (+ their fp32 rows)
        head += R * V * 4 if gpu else 0  # p = softmax(z), in place on a CPU
        head += R * V * 4 if cfg.objective.temperature != 1 and needs.logits else 0  # q = softmax(z / T)
        if online and needs.logits:  # the teacher's chunk of logits (fp32, + its matmul's own dtype) and rows
            head += chunk * V * 4 + (chunk * V * t_bytes if t_dtype != torch.float32 else 0)
            head += (2 if cfg.objective.top_k is None else 1) * R * V * 4
    grad_w = 0 if frozen else V * d * 4  # dL/dW, held from forward to backward (none for a frozen head)
    out["head"] = head + grad_w
    out["hidden"] = 0.0
    if cfg.objective.method in HLD_METHODS:
        n_pairs = len(parts.projectors.pairs) if parts.projectors is not None else 0
        # the teacher's states at its own rows; a per-chunk cache's pooled states, at most a chunk a student token
        states = n_tok if paired and not online else n_tok_t
        out["hidden"] = states * len(needs.layers) * tc.hidden_size * 2 + n_pairs * n_tok * 3 * tc.hidden_size * 4
    out["teacher"] = 0.0
    if cfg.objective.method != "ce":
        dist = Dist(world_size=world_size, mode=mode, device=device)
        if online or teacher_weights_needed(cfg, dist):  # a cached run's diagnostics read the teacher too
            out["teacher"] += count_params(teacher)["total"] * t_bytes
        if online:  # its final states, held until the head has read them; its forward's working set
            # where it exceeds the student's activations (which are not yet allocated while it runs)
            working = n_tok_t * (2 * tc.intermediate_size + 4 * tc.hidden_size) * t_bytes
            # paired: nor the cross head's blocks and the pooled hidden loss, which run after it too
            after = out["activations"] + (out["head"] - grad_w + out["hidden"] if paired else 0)
            out["teacher"] += n_tok_t * tc.hidden_size * t_bytes * needs.logits + max(0, working - after)
        elif paired and needs.logits:  # a per-chunk cache's rows (hld.cache.chunks.read_chunks), a chunk at most
            k = cfg.objective.cross_tokenizer.uld_top_k or vocab_of(teacher)  # per student token
            out["teacher"] += n_tok * (k * 12 + 8)  # fp32 values (+ gold's int64 ids), + a loglik and a rest
        elif needs.logits:  # the cached signal of a micro-batch on the device, as the reader decodes it
            from hld.cache.build import cache_slots, codec_of

            codec = codec_of(cfg)
            entry = CACHE_CODECS[codec.logits].decoded_entry_bytes(codec)
            out["teacher"] += n_tok * (cache_slots(cfg, vocab_of(teacher)) * entry + 4)
    out["total"] = sum(out.values())
    return out


def _cross_head_bytes(cfg: RunConfig, *, V: int, d: int, n_tok: int, b_act: int, teacher_rows: int) -> int:
    """The student's blocked head (hld.distill.cross_tok.objectives._BlockedHead) over its own vocabulary V,
    dL/dW aside, R = train.loss_chunk_tokens rows a block: at a block's gradient 6 (R, V) fp32 (its logits, two
    tensors its loss saved, the gradient and a product in the making, the previous block's gradient, still
    bound); while the teacher's rows are read (`teacher_rows`, `_cross_teacher_rows_bytes`) 3 (the block's
    logits, the previous block's logits and gradient), alm's rows before the blocks; dL/dh (micro tokens, d)
    fp32 and h's copy in the matmul's dtype (b_act, 0 in fp32)."""
    R = min(cfg.train.loss_chunk_tokens, n_tok)  # (a block grows to the end of an ALM span: not counted)
    during_rows = teacher_rows if cfg.objective.cross_tokenizer.loss == "alm" else R * V * 12 + teacher_rows
    return max(R * V * 24, during_rows) + n_tok * d * (4 + b_act)


def _cross_teacher_rows_bytes(cfg: RunConfig, *, V_t: int, n_tok: int, t_low: int) -> int:
    """The online teacher's head at the rows a cross loss reads (`OnlineLogits.at_rows`, at most R =
    train.loss_chunk_tokens a block), over its vocabulary V_t: the rows' logits in its dtype (t_low, 0 in fp32)
    and fp32; uld + softmax(z / T)'s z / T when T != 1; alm + the previous block's rows, still bound while the
    next are computed; gold + the one-token chunks' rows (at most all) and shared_logprobs' BLOCK_ROWS rows
    of z / T and of z off the shared ids."""
    from hld.distill.cross_tok.gold import BLOCK_ROWS  # shared_logprobs' rows at a time

    R, loss = min(cfg.train.loss_chunk_tokens, n_tok), cfg.objective.cross_tokenizer.loss
    if loss == "gold":
        return R * V_t * 8 + 2 * min(BLOCK_ROWS, R) * V_t * 4
    extra = 4 if loss == "alm" or cfg.objective.temperature != 1 else 0
    return R * V_t * (t_low + 4 + extra)


def _block_norms(student: CausalLM) -> tuple[int, bool]:
    """(the RMSNorms of width d_model in a decoder block, whether its attention normalises q and k): Gemma 3
    4 and yes, Llama and Mistral 2 and no, Qwen 3 2 and yes."""
    block = decoder_of(student).layers[0]
    attn = getattr(block, "self_attn", None)
    qk = attn is not None and getattr(attn, "q_norm", None) is not None
    inner = {id(m) for m in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)) if m is not None}
    n = sum(1 for m in block.modules() if type(m).__name__.endswith("RMSNorm") and id(m) not in inner)
    return n, qk


def _with_count_teacher(cfg: RunConfig, value: bool) -> RunConfig:
    return dataclasses.replace(cfg, budget=dataclasses.replace(cfg.budget, count_teacher=value))


def _length(cfg: RunConfig, plan, costs, fixed: float = 0.0, whole_steps: bool = False) -> dict:
    """Steps, tokens and FLOPs of a run; `fixed`: FLOPs spent before step 0 (a derived student's calibration);
    `whole_steps`: paired windows (`run_length`)."""
    B, T = cfg.train.batch_size, cfg.data.seq_len
    n = run_length(cfg, plan, costs, fixed_flops=fixed, whole_steps=whole_steps)
    tokens = (n.steps - 1) * B * T + B * n.last_len
    flops = (
        spent_flops(plan, costs, n.steps, n.last_len, B, T)
        if n.steps <= EXACT_STEPS
        else flops_per_token(plan, costs) * tokens
    )
    return {"steps": n.steps, "tokens": tokens, "flops": flops + fixed}


RATIO_DOCS = 64  # documents of data.train whose tokens give the teacher/student ratio when no paired store exists


@dataclass(frozen=True)
class CrossSizes:
    """A student with its own tokenizer, as a plan sizes it: both tokenizers, and the teacher's window
    length from the teacher/student token ratio (of the paired training store, else measured on the
    training text's first documents)."""

    teacher_tok: Any
    student_tok: Any
    ratio: float
    teacher_seq_len: int
    measured_on: str


def cross_sizes(cfg: RunConfig, resources: Optional[Resources] = None) -> CrossSizes:
    from hld.data.paired import default_teacher_seq_len, open_paired
    from hld.data.sources import iter_unit
    from hld.models.loading import EMBEDDED_TEACHER, SHIPPED_CONFIGS

    res = resources or Resources()  # `hld train`'s own: the run then loads neither tokenizer again
    note = ""
    try:
        teacher_tok = res.tokenizer(cfg.teacher.model)
    except HldError:  # a Gemma 3 hub id offline: every Gemma 3 size has the one tokenizer the embedded teacher has
        if cfg.teacher.model not in SHIPPED_CONFIGS:
            raise
        teacher_tok, note = res.tokenizer(EMBEDDED_TEACHER), f" ({EMBEDDED_TEACHER}'s tokenizer, Gemma 3's)"
    student_tok = res.tokenizer(str(cfg.student.tokenizer), "student.tokenizer")
    d = cfg.data
    try:
        store = open_paired(
            d.train, teacher_tok, student_tok, text_field=d.text_field, store_dir=d.store_dir, may_build=False
        )
        ratio, where = store.token_ratio, f"the paired store {store.path}"
    except HldError:  # none yet: the first documents of the training text, each with its EOS on both sides
        try:
            source, texts = d.train, [t for _, t in zip(range(RATIO_DOCS), iter_unit(d.train, 0, d.text_field))]
        except HldError:  # a hub corpus offline: the shipped sample of C4 stands in
            source, texts = "sample:train", [t for _, t in zip(range(RATIO_DOCS), iter_unit("sample:train", 0))]
        n_t = sum(len(x) + 1 for x in teacher_tok(texts, add_special_tokens=False)["input_ids"])
        n_s = sum(len(x) + 1 for x in student_tok(texts, add_special_tokens=False)["input_ids"])
        ratio, where = n_t / max(n_s, 1), f"the first {len(texts)} documents of {source}"
    return CrossSizes(teacher_tok, student_tok, ratio, default_teacher_seq_len(d.seq_len, ratio), where + note)


def vocabulary_row(cfg: RunConfig, parts, cross: CrossSizes, teacher_lm: CausalLM, ids: SpecialIds) -> dict:
    """What the student's own vocabulary saves against the same student at its teacher's: its parameters and
    its training FLOPs per token (CE, the student's step alone)."""
    from hld.flops import step_cost

    same = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, tokenizer=None))
    same = dataclasses.replace(same, objective=dataclasses.replace(cfg.objective, method="ce"))
    wide = meta_assembly(same, teacher_lm, ids).student
    T = cfg.data.seq_len
    own, teachers = parts.student, wide
    return {
        "student_vocab": int(own.get_input_embeddings().weight.shape[0]),
        "teacher_vocab": vocab_of(teacher_lm),
        "student_params": count_params(own)["total"],
        "student_params_at_teacher_vocab": count_params(teachers)["total"],
        "student_flops_per_token": step_cost(own, T).student,
        "student_flops_per_token_at_teacher_vocab": step_cost(teachers, T).student,
        "token_ratio": cross.ratio,
        "teacher_seq_len": cross.teacher_seq_len,
        "ratio_measured_on": cross.measured_on,
    }


def plan_run(cfg: RunConfig, *, world_size: int = 1, teacher: Optional[tuple[CausalLM, SpecialIds]] = None) -> dict:
    """The numbers of one run config (see the module docstring); `teacher`: `teacher_shapes`, if at hand."""
    teacher_lm, ids = teacher or teacher_shapes(cfg.teacher.model)
    cross = cross_sizes(cfg) if cfg.student.tokenizer else None
    parts = meta_assembly(cfg, teacher_lm, cross.teacher_tok if cross else ids, cross.student_tok if cross else None)
    t_len = cross.teacher_seq_len if cross else None
    counted = phase_costs(
        _with_count_teacher(cfg, True), parts.plan, student=parts.student, teacher=teacher_lm, teacher_seq_len=t_len
    )
    row: dict[str, Any] = {
        "name": cfg.name,
        "arm": cfg.objective.method,
        "student": cfg.student.preset,
        "teacher": cfg.teacher.model,
    }
    s, t = count_params(parts.student), count_params(teacher_lm)
    row["student_params"], row["student_params_non_embedding"] = s["total"], s["non_embedding"]
    row["teacher_params"], row["teacher_params_non_embedding"] = t["total"], t["non_embedding"]
    row["projector_params"] = parts.projectors.n_params() if parts.projectors is not None else 0
    row["origin"], row["calibration_flops"] = origin_row(cfg, teacher_lm)
    row["flops_per_token"] = {
        name: {"student": c.student, "teacher": c.teacher, "projectors": c.projectors} for name, c in counted.items()
    }
    row["budget"] = {k: v for k, v in dataclasses.asdict(cfg.budget).items() if k != "count_teacher"}
    row["count_teacher"] = cfg.budget.count_teacher
    row["length"] = {}
    for value in (True, False):
        c = _with_count_teacher(cfg, value)
        row["length"]["teacher_counted" if value else "teacher_not_counted"] = _length(
            c,
            parts.plan,
            phase_costs(c, parts.plan, student=parts.student, teacher=teacher_lm, teacher_seq_len=t_len),
            row["calibration_flops"],
            whole_steps=cross is not None,
        )
    row["vocabulary"] = vocabulary_row(cfg, parts, cross, teacher_lm, ids) if cross else None
    run = row["length"]["teacher_counted" if cfg.budget.count_teacher else "teacher_not_counted"]
    row["cache"] = None
    if cfg.objective.method != "ce" and cross is None:  # (own tokenizer: a per-chunk cache, unsized)
        layers = sorted(parts.plan.needs.layers)
        per = cache_bytes_per_token(
            cfg, layers=layers, d_teacher=text_config(teacher_lm.config).hidden_size, vocab=vocab_of(teacher_lm)
        )
        windows = run["steps"] * cfg.train.batch_size  # a cache holds whole windows
        row["cache"] = {
            **signal_row(cfg),
            "hidden_dtype": cfg.teacher.cache_hidden_dtype,
            "layers": layers,
            "bytes_per_token": per,
            "tokens": windows * cfg.data.seq_len,
            "bytes": per["estimate"] * windows * cfg.data.seq_len,
            "bytes_bound": per["bound"] * windows * cfg.data.seq_len,
        } | cache_costs(
            cfg, layers=layers, teacher=teacher_lm, tokens=windows * cfg.data.seq_len, world_size=world_size
        )
    row["data"] = data_plan(cfg, windows=run["steps"] * cfg.train.batch_size, cross=cross)
    row["parallel"], row["world_size"] = cfg.train.parallel, world_size
    row["micro_batch_size"] = cfg.train.micro_batch_size or cfg.train.batch_size // world_size
    row["memory_bytes"] = memory_estimate(cfg, parts, teacher_lm, world_size=world_size, teacher_seq_len=t_len)
    cached = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache="(cache)"))
    row["memory_bytes_cached"] = (  # own tokenizer: a per-chunk cache (hld.cache.chunks)
        memory_estimate(cached, parts, teacher_lm, world_size=world_size, teacher_seq_len=t_len)["total"]
        if cfg.objective.method != "ce"
        else None
    )
    return row


def origin_row(cfg: RunConfig, teacher: CausalLM) -> tuple[str, float]:
    """Where the student comes from, and the FLOPs that costs before training (counted in both accountings)."""
    if derived_depth(cfg.student.preset) is None:
        return "scratch (random init)", 0.0
    kept = planned_kept(cfg.student, teacher)
    rank, flops = planned_calibration(cfg.student, teacher, cfg.data.seq_len)
    n_t = len(decoder_of(teacher).layers)
    w = cfg.student.init.calibration_windows
    how = "given: " + str(list(kept)) if rank == "explicit" else f"ranked by {rank} on {w} training windows"
    widths = planned_widths(cfg.student, teacher)
    if widths is not None:
        how += (
            f"; narrowed to {widths.n_heads} heads ({widths.n_kv_heads} kv), d_ff {widths.d_ff} by activation "
            f"importance on {w} training windows"
        )
    d_model = planned_d_model(cfg.student, teacher)
    if d_model is not None:
        how += f"; {residual_text(cfg.student.init.residual, d_model)} on {w} training windows"
    return f"{len(kept)} of {n_t} teacher blocks, {how}", flops


def data_plan(cfg: RunConfig, *, windows: int, cross: Optional[CrossSizes] = None) -> dict:
    """The data path of a run (src/hld/data/store.py): tokens to tokenise (a hub corpus: what the budget
    reads; a local corpus: all of it, or what its token store already holds), the store's bytes, the
    time `hld tokenize` takes at the measured rate per core, and the host memory one process holds for
    its data (the batch order's permutation and one batch; the shards are memory-mapped page cache).
    A student with its own tokenizer (`cross`) reads paired stores (src/hld/data/paired.py): its tokens are
    the student's, and `paired` says what is built (`paired_data`)."""
    import os

    from hld.data.store import DTYPE, read_manifest
    from hld.data.tokenize import TOKENS_PER_CORE_S, is_remote, stores_of
    from hld.study.references import MAX_FIT_TOKENS

    d = cfg.data
    out: dict[str, Any] = {}
    for what, spec, need in (
        ("train", d.train, windows * (d.seq_len - 1)),
        ("validation", d.validation, max(1, d.val_tokens // d.seq_len) * (d.seq_len - 1)),
    ):
        held = []
        paired = _paired_store(spec, cfg, cross) if cross is not None else None
        for path in stores_of(spec, d.store_dir) if cross is None else ():
            try:
                held.append(int(read_manifest(path)["tokens"]))
            except HldError:
                continue
        if paired is not None:
            held.append(paired["student_tokens"])
        whole = not is_remote(spec) and what == "train"  # a local corpus is tokenised whole on first use
        out[what] = {"source": spec, "reads": need, "stored": max(held) if held else None, "whole_source": whole}
        if cross is not None:
            out[what]["paired_store"] = paired
    tokens = [_to_tokenise(v) for v in out.values()]
    known = [t for t in tokens if t is not None]
    cores = os.cpu_count() or 1
    n_windows = out["train"]["stored"] // (d.seq_len - 1) if out["train"]["stored"] else windows
    out["tokenize_tokens"] = sum(known) if len(known) == len(tokens) else None
    out["store_bytes"] = None if out["tokenize_tokens"] is None else out["tokenize_tokens"] * DTYPE.itemsize
    hours = None if out["tokenize_tokens"] is None else out["tokenize_tokens"] / TOKENS_PER_CORE_S / 3600
    out["tokenize_core_hours"], out["tokenize_hours_here"] = hours, None if hours is None else hours / cores
    out["cores_here"] = cores
    out["host_bytes"] = 4 * n_windows + 2 * cfg.train.batch_size * d.seq_len * 8
    out["ngram_fit_tokens"] = min(MAX_FIT_TOKENS, n_windows * d.seq_len)
    if cross is not None:
        out["paired"] = paired_data(out, ratio=cross.ratio)
    return out


def _to_tokenise(split: dict) -> Optional[int]:
    """The tokens a split's store holds once built: a local corpus whole (None: not known before it is), else
    what the run reads or the store already holds, the more."""
    return split["stored"] if split["whole_source"] else max(split["reads"], split["stored"] or 0)


def _paired_store(spec: str, cfg: RunConfig, cross: CrossSizes) -> Optional[dict]:
    """A built paired store of `spec` for the run's tokenizer pair, from its manifest: its counts, and the bytes
    of its shard files (src/hld/data/paired.py's record layout); None when there is none yet."""
    from hld.data.paired import open_paired, shard_bytes

    d = cfg.data
    try:
        store = open_paired(
            spec, cross.teacher_tok, cross.student_tok, text_field=d.text_field, store_dir=d.store_dir, may_build=False
        )
    except HldError:
        return None
    m = store.manifest
    keys = ("student_tokens", "teacher_tokens", "chunks")
    return {"path": str(store.path), **{k: int(m[k]) for k in keys}, "bytes": shard_bytes(m)}


def paired_bytes_per_token(ratio: float) -> float:
    """A paired store's bytes per student token at most, by its record layout (src/hld/data/paired.py): the
    student's token and `ratio` teacher tokens (uint32 each) and a chunk-table row, a chunk holding at least one
    token a side (its EOS pair one)."""
    from hld.data.paired import CHUNK_BYTES, DTYPE

    return DTYPE.itemsize * (1 + ratio) + CHUNK_BYTES


def paired_data(data: dict, *, ratio: float) -> dict:
    """What a paired run builds, per split: a built store's own counts and bytes (whole, or holding what the
    run reads), else its student tokens (`data_plan`'s) at `paired_bytes_per_token`; and their sum."""
    per = paired_bytes_per_token(ratio)
    out: dict[str, Any] = {"bytes_per_student_token": per, "ratio": ratio}
    total: Optional[float] = 0.0
    for what in ("train", "validation"):
        v = data[what]
        built = v["paired_store"]
        enough = built is not None and (v["whole_source"] or built["student_tokens"] >= v["reads"])
        tokens = _to_tokenise(v)
        size = built["bytes"] if enough else None if tokens is None else tokens * per
        out[what] = {"built": enough, "bytes": size}
        total = None if total is None or size is None else total + size
    out["bytes"] = total
    return out


def plan_study(name_or_path: str, overrides: list[str], *, world_size: int = 1) -> dict:
    """One block per arm x student x budget of a study (grid points and seeds that give the same numbers
    are counted, not repeated), and its teacher caches (one per group of cells sharing windows)."""
    from hld.cache.build import cache_share_key
    from hld.study.spec import cell_config, expand, flops_overrides, load_study

    study = load_study(name_or_path, overrides)
    teachers: dict[str, tuple] = {}
    blocks: dict[str, dict] = {}
    caches: dict[str, dict] = {}
    spent: dict[str, float] = {}  # cell id -> its planned FLOPs, teacher counted (what equal_flops cells match)
    for cell in expand(study):
        # an equal-FLOPs cell trains at the FLOPs its matched cell spends: planned here, measured in a study
        extra = flops_overrides(spent[cell.flops_of]) if cell.flops_of in spent else []
        cfg = cell_config(study, cell, extra)
        teacher = teachers.setdefault(cfg.teacher.model, teacher_shapes(cfg.teacher.model))
        row = plan_run(cfg, world_size=world_size, teacher=teacher)
        spent[cell.id] = row["length"]["teacher_counted"]["flops"]
        key = repr({k: v for k, v in row.items() if k != "name"})
        block = blocks.setdefault(key, {**row, "cells": []})
        block["cells"].append(cell.id)
        if row["cache"] is not None and cell.signal != "online":  # a group's cache (study.runner); online: none
            group = caches.setdefault(
                cache_share_key(cfg), {"cfg": cfg, "teacher": teacher[0], "layers": set(), "tokens": 0}
            )
            group["layers"] |= set(row["cache"]["layers"])
            group["tokens"] = max(group["tokens"], row["cache"]["tokens"])
    out = []
    for g in caches.values():
        layers = sorted(g["layers"])
        per = cache_bytes_per_token(
            g["cfg"],
            layers=layers,
            d_teacher=text_config(g["teacher"].config).hidden_size,
            vocab=vocab_of(g["teacher"]),
        )
        out.append(
            {
                **signal_row(g["cfg"]),
                "hidden_dtype": g["cfg"].teacher.cache_hidden_dtype,
                "layers": layers,
                "bytes_per_token": per,
                "tokens": g["tokens"],
                "bytes": per["estimate"] * g["tokens"],
                "bytes_bound": per["bound"] * g["tokens"],
            }
        )
    cells = sum(len(b["cells"]) for b in blocks.values())
    return {
        "study": study.name,
        "blocks": list(blocks.values()),
        "caches": out,
        "cache_bytes": sum(c["bytes"] for c in out),
        # each cell's student/ (hld.train.loop.export_student): its weights as trained, float32, 4 B a parameter
        "student_bytes": sum(4 * b["student_params"] * len(b["cells"]) for b in blocks.values()),
        "cells": cells,
    }


# --------------------------------------------------------------------------- printing


def _n(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _bytes(x: float) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


def format_run(row: dict) -> list[str]:
    """A plan block as text lines."""
    cells = f" ({len(row['cells'])} cells)" if "cells" in row else ""
    out = [
        f"{row['name']}: {row['arm']}, student {row['student']}, teacher {row['teacher']}{cells}",
        f"  params: student {_n(row['student_params'])} ({_n(row['student_params_non_embedding'])} non-embedding)"
        f", teacher {_n(row['teacher_params'])} ({_n(row['teacher_params_non_embedding'])} non-embedding)"
        + (f", projectors {_n(row['projector_params'])}" if row["projector_params"] else ""),
        f"  student origin: {row['origin']}"
        + (
            f"; calibration {row['calibration_flops']:.3e} FLOPs (teacher forwards, counted in both accountings)"
            if row["calibration_flops"]
            else ""
        ),
    ]
    for phase, c in row["flops_per_token"].items():
        out.append(
            f"  FLOPs/token [{phase}]: student step {c['student']:.3e}, teacher forward {c['teacher']:.3e}, "
            f"projectors {c['projectors']:.3e}"
        )
    budget = (
        ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["budget"].items() if v is not None
        )
        or "default tokens"
    )
    for key, label in (("teacher_counted", "teacher counted"), ("teacher_not_counted", "teacher not counted")):
        n = row["length"][key]
        mark = " <- this config" if (key == "teacher_counted") == row["count_teacher"] else ""
        out.append(
            f"  at {budget}, {label}: {n['steps']:,} steps, {_n(n['tokens'])} tokens, {n['flops']:.3e} FLOPs{mark}"
        )
    v = row.get("vocabulary")
    if v:
        saved = 1 - v["student_flops_per_token"] / v["student_flops_per_token_at_teacher_vocab"]
        out.append(
            f"  own vocabulary: {v['student_vocab']:,} ids against the teacher's {v['teacher_vocab']:,}: student "
            f"{_n(v['student_params'])} params (at the teacher's vocabulary "
            f"{_n(v['student_params_at_teacher_vocab'])}), "
            f"step {v['student_flops_per_token']:.3e} FLOPs/token ({saved:.0%} less than "
            f"{v['student_flops_per_token_at_teacher_vocab']:.3e}); teacher windows of {v['teacher_seq_len']} tokens "
            f"({v['token_ratio']:.3f} teacher tokens per student token, measured on {v['ratio_measured_on']})"
        )
    c = row["cache"]
    if c is not None:
        per = c["bytes_per_token"]
        out.append(
            f"  cache ({_signal_text(c)}, {c['hidden_dtype']} hidden, layers {c['layers']}): "
            f"~{per['estimate']:,.0f} B/token (at most {per['bound']:,.0f}), {_n(c['tokens'])} tokens: "
            f"~{_bytes(c['bytes'])}; {c['files']} files; build ~{c['build_hours']:.3g} h on {c['build_parts']} "
            f"GPU(s) (teacher {c['build_hours_teacher']:.3g} h); host RAM per process "
            f"~{_bytes(c['host_ram_read_bytes'])} reading, ~{_bytes(c['host_ram_build_bytes'])} building"
        )
    out.append(_format_data(row["data"]))
    m = row["memory_bytes"]
    terms = ", ".join(f"{k} {m[k] / GIB:.2f}" for k in m if k != "total" and m[k])
    cached = f"; reading a cache {row['memory_bytes_cached'] / GIB:.2f} GiB" if row["memory_bytes_cached"] else ""
    out.append(
        f"  peak memory per process (micro-batch {row['micro_batch_size']}, parallel={row['parallel']}, "
        f"world {row['world_size']}): ~{m['total'] / GIB:.2f} GiB ({terms}){cached}"
    )
    return out


def _format_data(d: dict) -> str:
    from hld.data.tokenize import TOKENS_PER_CORE_S

    t = d["train"]
    if "paired" in d:
        return _format_paired(d)
    if d["tokenize_tokens"] is None:
        size = "the whole local corpus (no token store yet: its size is not known)"
        time = f"at {_n(TOKENS_PER_CORE_S)} tokens/s per core"
    else:
        size = f"{_n(d['tokenize_tokens'])} tokens, {_bytes(d['store_bytes'])} of token store"
        hours, here = d["tokenize_core_hours"], d["tokenize_hours_here"]
        time = f"~{hours:.3g} core-hours, ~{here:.3g} h on this machine's {d['cores_here']} cores"
    return (
        f"  data: reads {_n(t['reads'])} training tokens of {t['source']}; tokenise {size} ({time}); "
        f"host memory per process for the data ~{_bytes(d['host_bytes'])} (shards memory-mapped)"
    )


def _format_paired(d: dict) -> str:
    """A paired run's data line: the student tokens it reads and the paired stores it builds (or has)."""
    p, parts = d["paired"], []
    for what in ("train", "validation"):
        s = d[what]["paired_store"]
        if p[what]["built"]:
            parts.append(
                f"{what} {_n(s['student_tokens'])} student + {_n(s['teacher_tokens'])} teacher tokens in "
                f"{_n(s['chunks'])} chunks, {_bytes(s['bytes'])} on disk"
            )
        elif p[what]["bytes"] is not None:
            parts.append(f"{what} to build: at most ~{_bytes(p[what]['bytes'])}")
        else:
            parts.append(f"{what} to build: the whole local corpus (its size is not known until it is aligned)")
    return (
        f"  data: reads {_n(d['train']['reads'])} student training tokens of {d['train']['source']}; paired store "
        f"(both tokenisations aligned in chunks, at most {p['bytes_per_student_token']:.1f} B per student token "
        f"at {p['ratio']:.3f} teacher tokens per student token): {'; '.join(parts)}; host memory per process for "
        f"the data ~{_bytes(d['host_bytes'])} (shards memory-mapped)"
    )


def format_study(result: dict) -> list[str]:
    lines = [f"study {result['study']}: {result['cells']} cells"]
    for block in result["blocks"]:
        lines += format_run(block)
    for c in result["caches"]:
        lines.append(
            f"teacher cache (layers {c['layers']}, {_signal_text(c)}): {_n(c['tokens'])} tokens, "
            f"~{c['bytes_per_token']['estimate']:,.0f} B/token, ~{_bytes(c['bytes'])}"
        )
    lines.append(f"teacher caches in all: ~{_bytes(result['cache_bytes'])}")
    lines.append(
        f"exported students in all: ~{_bytes(result['student_bytes'])} of float32 weights, each cell's student/ "
        f"({result['cells']} cells; their tokenizers and checkpoints apart)"
    )
    return lines


def _signal_text(c: dict) -> str:
    if c.get("signal") == "sampled":
        return f"sampled logits, {c['samples']} draws/token at tau {c['proposal_temperature']:g}"
    return f"{c['codec']} logits top-{c['top_k']}"


def check_world_size(world_size: int, cfg: RunConfig) -> None:
    """The processes `hld plan --world-size` sizes for must split the config's batch as torchrun's would."""
    from hld.distributed import check_batch, resolve_mode

    if world_size < 1:
        raise HldError(f"--world-size {world_size} is not a positive number", "give 1 or more")
    resolve_mode(cfg.train.parallel, world_size)
    check_batch(cfg.train, world_size)


def machine_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what) one process may use: a GPU's total memory, or RAM (the smaller of physical memory and
    the cgroup's `memory.max`, a container's limit)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, "GPU memory"
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text(encoding="ascii")[:32].strip()
        ram = min(ram, int(limit)) if limit.isdigit() else ram
    except OSError:
        pass
    return ram, "RAM"


def check_memory(
    cfg: RunConfig,
    *,
    device: torch.device,
    world_size: int = 1,
    local_processes: int = 1,
    resources: Optional[Resources] = None,
) -> None:
    """`hld train`'s fail-fast: refuse, before anything is allocated, a run whose memory estimate (the one
    `hld plan` prints, for `device`) exceeds the machine's (`machine_memory`; on CPU shared by the
    `local_processes` of this node). `train.memory_check=false` skips it."""
    if not cfg.train.memory_check:
        return
    teacher_lm, ids = teacher_shapes(cfg.teacher.model)
    cross = cross_sizes(cfg, resources) if cfg.student.tokenizer else None
    parts = meta_assembly(cfg, teacher_lm, cross.teacher_tok if cross else ids, cross.student_tok if cross else None)
    t_len = cross.teacher_seq_len if cross else None
    need = memory_estimate(cfg, parts, teacher_lm, world_size=world_size, device=device, teacher_seq_len=t_len)["total"]
    have, what = machine_memory(device)
    share = local_processes if device.type != "cuda" else 1
    if need * share > have:
        per = f" for each of {share} processes" if share > 1 else ""
        raise HldError(
            f"this run needs ~{need / GIB:,.1f} GiB of {what}{per} by hld plan's estimate, and this machine has "
            f"{have / GIB:,.1f} GiB",
            "lower data.seq_len, train.micro_batch_size or the student (hld plan --config ... shows the terms), "
            "or set train.memory_check=false to start anyway",
        )
