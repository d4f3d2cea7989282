"""How a teacher cache stores its arrays (docs/cache-format.md): the codecs of format 3.

Logits (`teacher.cache_codec`):
- `exact`: the top-k logits as float16 (descending), their ids as int32, the rest as float32
  (format 2's arrays).
- `compact`: per token, the k ids sorted ascending and delta-coded (gap_j = id_j - id_{j-1} - 1),
  each gap in a `slot_bits`-wide slot chosen per shard; a gap too wide for its slot is written as the
  escape code 2^slot_bits - 1 and stored apart in `index_bits` = ceil(log2 V) bits (patched frame of
  reference). The values ride in the same id order as `value_bits`-bit codes of the log-prob gap to
  the top-1, d = v_1 - v_j in [0, D], companded by f(d) = 1 - exp(-a d) so that steps are finest
  where the teacher's probability is (an entry's weight in KD is its probability, which falls as
  exp(-d)): code = round(L f(d) / f(D)), L = 2^value_bits - 1, with D (the token's largest gap,
  rounded up to float16) stored per token. The rest is stored exactly (float32) relative to v_1.
  Decoded values are log-probs relative to the top-1 (v_1 - v_1 = 0), which every loss reads the same
  (softmax over [v, rest] is shift invariant); decoding sorts them descending again.
  Bound: |f(d)/f(D) - code/L| <= 1/(2L), so d_hat lies in [g(f(d) - s/2), g(f(d) + s/2)] with
  s = f(D)/L and g = f^-1 (tests/unit/test_cache_codec.py checks it against numpy).

Hidden states (`teacher.cache_hidden_dtype`):
- `bfloat16`: bit patterns in uint16 (format 2).
- `fp8`: float8 e4m3 bit patterns in uint8, each row (token) scaled by s = max|h| / 448 (float32,
  stored apart): 3 mantissa bits, so |h_hat - h| <= 2^-4 |h| + 2^-10 s (the second term: subnormals).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

FP8_MAX = 448.0  # largest finite float8 e4m3fn
COMPAND_PER_NAT = 0.25  # a in f(d) = 1 - exp(-a d); chosen on Gemma 3 270M's top-64 (docs/cache-format.md)


@dataclass(frozen=True)
class Codec:
    """How a cache's arrays are encoded (written to the manifest's `codec`)."""

    logits: str = "exact"  # exact | compact | sampled (drawn ids + weights: distill/signals/sampled.py) | chunks
    # (chunks: what a cross-tokenizer loss reads per chunk of paired windows, hld.cache.chunks)
    hidden: str = "bfloat16"  # bfloat16 | fp8
    value_bits: int = 6  # compact: bits per value code
    compand_per_nat: float = COMPAND_PER_NAT  # compact: a in f(d) = 1 - exp(-a d)
    index_bits: int = 18  # compact: ceil(log2 V), the width of an escaped gap

    def to_json(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------ bit packing


def pack_bits(codes: np.ndarray, width: int) -> np.ndarray:
    """Unsigned integers < 2^width, `width` bits each, little-endian bit order -> uint8 bytes."""
    codes = np.asarray(codes, dtype=np.uint64).reshape(-1)
    bits = ((codes[:, None] >> np.arange(width, dtype=np.uint64)) & 1).astype(np.uint8)  # (N, width)
    return np.packbits(bits.reshape(-1), bitorder="little")


def unpack_bits(buf: np.ndarray, width: int, n: int) -> np.ndarray:
    """The first `n` codes of `width` bits from `pack_bits` output, as int64."""
    need = (n * width + 7) // 8
    if len(buf) < need:
        raise ValueError(f"packed buffer holds {len(buf)} bytes, {need} needed")
    bits = np.unpackbits(np.asarray(buf[:need]), bitorder="little")[: n * width].reshape(n, width)
    return bits.astype(np.int64) @ (np.int64(1) << np.arange(width, dtype=np.int64))


# ------------------------------------------------------------------------------------ values


def _f(d: np.ndarray, a: float) -> np.ndarray:
    return -np.expm1(-a * d)


def _g(u: np.ndarray, a: float) -> np.ndarray:
    return -np.log1p(-np.minimum(u, 1.0)) / a


def round_up_fp16(x: np.ndarray) -> np.ndarray:
    """float16 >= x (so that every gap d <= D_stored and the codes stay within [0, L])."""
    h = x.astype(np.float16)
    low = h.astype(np.float64) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def encode_values(d: np.ndarray, D16: np.ndarray, bits: int, a: float) -> np.ndarray:
    """Codes of gaps d (R, k) >= 0 against each row's D16 (R,) >= max d."""
    L = (1 << bits) - 1
    fD = _f(D16.astype(np.float64), a)[:, None]
    u = np.where(fD > 0, _f(d, a) / np.where(fD > 0, fD, 1.0), 0.0)
    return np.clip(np.rint(u * L), 0, L).astype(np.int64)


def decode_values(codes: np.ndarray, D16: np.ndarray, bits: int, a: float) -> np.ndarray:
    """Gaps d_hat (R, k) float64 from codes (R, k)."""
    L = (1 << bits) - 1
    return _g(codes / L * _f(D16.astype(np.float64), a)[:, None], a)


# ------------------------------------------------------------------------------------ indices


def gaps_of(sorted_ids: np.ndarray) -> np.ndarray:
    """(R, k) ascending distinct ids -> gaps id_j - id_{j-1} - 1 (id_{-1} = -1), all >= 0."""
    prev = np.concatenate([np.full((len(sorted_ids), 1), -1, np.int64), sorted_ids[:, :-1]], 1)
    return sorted_ids - prev - 1


def best_slot_bits(gaps: np.ndarray, index_bits: int) -> int:
    """The slot width that minimises slots + escaped gaps, in bits."""
    g = gaps.reshape(-1)
    cost = [(b * g.size + int((g >= (1 << b) - 1).sum()) * index_bits, b) for b in range(1, index_bits + 1)]
    return min(cost)[1]


@dataclass
class CompactWindow:
    """One window's compact logit arrays."""

    values: np.ndarray  # uint8, packed value codes (T*k, id order)
    gaps: np.ndarray  # uint8, packed gap slots (T*k)
    exceptions: np.ndarray  # uint8, packed escaped gaps (index_bits each)
    scale: np.ndarray  # (T,) float16: D
    rest: np.ndarray  # (T,) float32: rest - v_1


def encode_window(
    values: np.ndarray, indices: np.ndarray, rest: np.ndarray, *, codec: Codec, slot_bits: int
) -> CompactWindow:
    """values (T, k) descending logits, indices (T, k), rest (T,) -> compact arrays."""
    v = values.astype(np.float64)
    order = np.argsort(indices, axis=1, kind="stable")
    ids = np.take_along_axis(indices.astype(np.int64), order, 1)  # (T, k) ascending
    d = v[:, :1] - np.take_along_axis(v, order, 1)  # (T, k) >= 0, id order
    D16 = round_up_fp16(d.max(1))
    codes = encode_values(d, D16, codec.value_bits, codec.compand_per_nat)
    g = gaps_of(ids).reshape(-1)
    esc = (1 << slot_bits) - 1
    wide = g >= esc
    return CompactWindow(
        values=pack_bits(codes, codec.value_bits),
        gaps=pack_bits(np.where(wide, esc, g), slot_bits),
        exceptions=pack_bits(g[wide], codec.index_bits),
        scale=D16,
        rest=(rest.astype(np.float64) - v[:, 0]).astype(np.float32),
    )


def decode_window(
    values: np.ndarray,
    gaps: np.ndarray,
    exceptions: np.ndarray,
    scale: np.ndarray,
    rest: np.ndarray,
    *,
    codec: Codec,
    slot_bits: int,
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first T = len(scale) tokens of a window -> values (T, k) float32 descending (top-1 = 0),
    indices (T, k) int64, rest (T,) float32."""
    T = len(scale)
    codes = unpack_bits(values, codec.value_bits, T * k).reshape(T, k)
    g = unpack_bits(gaps, slot_bits, T * k)
    wide = g == (1 << slot_bits) - 1
    g[wide] = unpack_bits(exceptions, codec.index_bits, int(wide.sum()))
    ids = np.cumsum(g.reshape(T, k) + 1, axis=1) - 1
    d = decode_values(codes, scale, codec.value_bits, codec.compand_per_nat)
    order = np.argsort(d, axis=1, kind="stable")  # descending values again
    return (
        (-np.take_along_axis(d, order, 1)).astype(np.float32),
        np.take_along_axis(ids, order, 1),
        np.asarray(rest, dtype=np.float32),
    )


# ------------------------------------------------------------------------------------ hidden states


def fp8_encode(h: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(..., d) -> e4m3 bit patterns (..., d) uint8 and per-row scales (...,) float32."""
    h = h.float()
    s = h.abs().amax(-1, keepdim=True) / FP8_MAX
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = (h / s).to(torch.float8_e4m3fn)
    return q.view(torch.uint8).numpy(), s.squeeze(-1).numpy()


# every e4m3 bit pattern's value (each exact in float32; the two NaN patterns NaN): a host table
FP8_VALUES = torch.arange(256, dtype=torch.uint8, device="cpu").view(torch.float8_e4m3fn).float().numpy()


def fp8_decode(bits: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    """Inverse of `fp8_encode`, as float32: a table lookup then the row's scale (the same floats as
    torch's float8 -> float32 conversion times the scale, ~3x faster on a CPU)."""
    q = torch.from_numpy(np.take(FP8_VALUES, np.asarray(bits, dtype=np.uint8)))
    return q.mul_(torch.from_numpy(np.array(scale, dtype=np.float32))[..., None])


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def bf16_from_bits(bits: np.ndarray) -> torch.Tensor:
    """`bf16_bits` undone: uint16 bit patterns (a writable array: the tensor shares its memory) -> bfloat16."""
    return torch.from_numpy(np.ascontiguousarray(bits, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)


# ------------------------------------------------------------------------------------ one shard


def field_specs(codec: Codec, layers: list, *, T: int, k: int, d_model: int, slot_bits: Optional[int]) -> dict:
    """The arrays of one shard of `rows` windows: key -> (dtype, shape after the row axis). Two keys are
    not per row: `topk_exceptions` (a flat byte run, shape None) and `topk_exception_offsets` (rows + 1
    int64 offsets into it, shape ())."""
    specs: dict[str, tuple[np.dtype, Optional[tuple]]] = {"tokens": (np.dtype(np.int32), (T,))}
    if codec.logits == "sampled":  # k = slots per token: min(samples, V), padded with id 0, weight 0
        specs |= {
            "sampled_ids": (np.dtype(np.int32), (T, k)),
            "sampled_weights": (np.dtype(np.float32), (T, k)),
        }
    elif codec.logits == "exact":
        specs |= {
            "topk_values": (np.dtype(np.float16), (T, k)),
            "topk_indices": (np.dtype(np.int32), (T, k)),
            "topk_rest": (np.dtype(np.float32), (T,)),
        }
    else:
        specs |= {
            "topk_values": (np.dtype(np.uint8), ((T * k * codec.value_bits + 7) // 8,)),
            "topk_indices": (np.dtype(np.uint8), ((T * k * (slot_bits or 0) + 7) // 8,)),
            "topk_exceptions": (np.dtype(np.uint8), None),
            "topk_exception_offsets": (np.dtype(np.int64), ()),
            "topk_scale": (np.dtype(np.float16), (T,)),
            "topk_rest": (np.dtype(np.float32), (T,)),
        }
    for layer in layers:
        if codec.hidden == "fp8":
            specs[f"hidden_L{layer}"] = (np.dtype(np.uint8), (T, d_model))
            specs[f"hidden_L{layer}_scale"] = (np.dtype(np.float32), (T,))
        else:
            specs[f"hidden_L{layer}"] = (np.dtype(np.uint16), (T, d_model))
    return specs


class ShardWriter:
    """Encodes one shard's arrays: `put` a batch of rows at a time (in row order), `finish` at the end.
    Every encoded array goes to `sink(key, rows)` as it is made, in row order per key: tokens, exact
    arrays and hidden states batch by batch; compact logits are held for the shard (its slot width
    depends on all its gaps) and encoded at `finish`."""

    def __init__(
        self, sink: Callable[[str, np.ndarray], None], *, n: int, T: int, k: int, layers: list, codec: Codec
    ) -> None:
        self.sink, self.codec, self.n, self.T, self.k, self.layers = sink, codec, n, T, k, list(layers)
        if codec.logits == "compact":
            self.held = (np.zeros((n, T, k), np.float32), np.zeros((n, T, k), np.int32), np.zeros((n, T), np.float32))
        self.slot_bits: int | None = None

    def put(
        self,
        b: int,
        *,
        tokens: np.ndarray,
        vals: torch.Tensor,
        idx: torch.Tensor,
        rest: torch.Tensor,
        hidden: dict[int, torch.Tensor],
    ) -> None:
        """Rows b.. of the shard: tokens (n, T), vals/idx (n, T, k), rest (n, T), hidden layer -> (n, T, d).
        A sampled signal: vals = the weights, idx = the ids (n, T, slots), rest unused."""
        n = vals.shape[0]
        self.sink("tokens", np.asarray(tokens, dtype=np.int32))
        if self.codec.logits == "sampled":
            self.sink("sampled_ids", idx.numpy().astype(np.int32))
            self.sink("sampled_weights", vals.numpy().astype(np.float32))
        elif self.codec.logits == "exact":
            self.sink("topk_values", vals.numpy().astype(np.float16))
            self.sink("topk_indices", idx.numpy().astype(np.int32))
            self.sink("topk_rest", rest.numpy().astype(np.float32))
        else:
            for held, x in zip(self.held, (vals, idx, rest)):
                held[b : b + n] = x.numpy()
        for layer in self.layers:
            h = hidden[layer]
            if self.codec.hidden == "fp8":
                bits, scale = fp8_encode(h)
                self.sink(f"hidden_L{layer}", bits)
                self.sink(f"hidden_L{layer}_scale", scale)
            else:
                self.sink(f"hidden_L{layer}", bf16_bits(h))

    def finish(self) -> Optional[int]:
        """Encode the compact logit arrays (if held) into the sink; returns the shard's slot width."""
        if self.codec.logits != "compact":
            return None
        vals, idx, rest = self.held
        self.slot_bits = best_slot_bits(
            gaps_of(np.sort(idx.reshape(-1, self.k).astype(np.int64), 1)), self.codec.index_bits
        )
        wins = [
            encode_window(vals[i], idx[i], rest[i], codec=self.codec, slot_bits=self.slot_bits) for i in range(self.n)
        ]
        offsets = np.cumsum([0] + [len(w.exceptions) for w in wins]).astype(np.int64)
        self.sink("topk_values", np.stack([w.values for w in wins]))
        self.sink("topk_indices", np.stack([w.gaps for w in wins]))
        self.sink("topk_exceptions", np.concatenate([w.exceptions for w in wins] + [np.zeros(0, np.uint8)]))
        self.sink("topk_exception_offsets", offsets)
        self.sink("topk_scale", np.stack([w.scale for w in wins]))
        self.sink("topk_rest", np.stack([w.rest for w in wins]))
        return self.slot_bits


def read_logits(
    arrays: dict, r: int, T: int, *, codec: Codec, slot_bits: int, k: int
) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Row r's first T tokens: values (T, k), indices (T, k), rest (T,); a sampled signal: weights (T, k),
    ids (T, k), None."""
    if codec.logits == "sampled":
        return arrays["sampled_weights"][r, :T], arrays["sampled_ids"][r, :T], None
    if codec.logits == "exact":
        return arrays["topk_values"][r, :T], arrays["topk_indices"][r, :T], arrays["topk_rest"][r, :T]
    lo, hi = arrays["topk_exception_offsets"][r : r + 2]
    return decode_window(
        arrays["topk_values"][r],
        arrays["topk_indices"][r],
        arrays["topk_exceptions"][lo:hi],
        arrays["topk_scale"][r, :T],
        arrays["topk_rest"][r, :T],
        codec=codec,
        slot_bits=slot_bits,
        k=k,
    )


def read_hidden(arrays: dict, layer: int, r: int, T: int, *, codec: Codec) -> torch.Tensor:
    """Row r's first T tokens of layer `layer`, (T, d) bfloat16."""
    if codec.hidden == "fp8":
        return fp8_decode(arrays[f"hidden_L{layer}"][r, :T], arrays[f"hidden_L{layer}_scale"][r, :T]).to(torch.bfloat16)
    return bf16_from_bits(np.array(arrays[f"hidden_L{layer}"][r, :T]))  # a copy: the shard is memory-mapped
