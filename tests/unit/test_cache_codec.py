"""The format-3 codecs against independent computations: bit packing vs numpy's own bit arithmetic,
compact top-k ids exact and values within the quantisation bound, the KD loss of the decoded top-k
within a bound derived from that one, fp8 hidden states within e4m3's rounding bound, compact
caches refused when damaged, format 2 caches still read."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hld.cache.build import ensure_cache
from hld.cache.codec import Codec, decode_window, encode_window, fp8_decode, fp8_encode, pack_bits, unpack_bits
from hld.config import load_config
from hld.distill.losses import kd_sum
from hld.distill.signals.topk import TopK
from hld.errors import HldError
from hld.train.loop import build
from hld.train.resources import Resources

V = 262_144  # Gemma 3's vocabulary: ids need 18 bits
CODEC = Codec(logits="compact", hidden="fp8", value_bits=6, index_bits=18)


def _teacher_topk(seed: int, T: int = 48, k: int = 64):
    """Logits shaped like a LM's (a few large, a long tail), their top-k, and the rest's log-mass."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(T, 4096, generator=g, dtype=torch.float64) * 2.5
    z[:, :16] += 4  # frequent ids: low, so gaps are uneven (some escape their slot)
    ids = torch.randperm(V, generator=g)[:4096]
    ids[:16] = torch.arange(16) * 3
    top = z.topk(k, dim=-1)
    mask = torch.ones_like(z, dtype=torch.bool).scatter_(1, top.indices, False)
    rest = torch.where(mask, z, -torch.inf).logsumexp(-1)
    return top.values.numpy(), ids[top.indices].numpy(), rest.numpy()


def test_bit_packing_round_trip_vs_numpy():
    rng = np.random.default_rng(0)
    for width in (1, 5, 6, 13, 18):
        codes = rng.integers(0, 1 << width, size=1001)
        buf = pack_bits(codes, width)
        assert len(buf) == math.ceil(1001 * width / 8)
        bits = np.unpackbits(buf, bitorder="little")  # bit i of code j sits at position j*width + i
        want = np.array([sum(int(bits[j * width + i]) << i for i in range(width)) for j in range(1001)])
        np.testing.assert_array_equal(want, codes)
        np.testing.assert_array_equal(unpack_bits(buf, width, 1001), codes)
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(buf[:-3], 18, 1001)


@pytest.mark.parametrize("slot_bits", [4, 10, 18])
def test_compact_ids_exact_and_values_within_the_bound(slot_bits):
    v, ids, rest = _teacher_topk(1)
    w = encode_window(v.astype(np.float32), ids, rest, codec=CODEC, slot_bits=slot_bits)
    vals, got_ids, got_rest = decode_window(
        w.values, w.gaps, w.exceptions, w.scale, w.rest, codec=CODEC, slot_bits=slot_bits, k=64
    )
    # ids: the same set per token, exactly
    np.testing.assert_array_equal(np.sort(got_ids, 1), np.sort(ids, 1))
    assert (np.diff(vals, axis=1) <= 0).all() and (vals[:, 0] == 0).all()  # descending, top-1 = 0
    # values: the gap to the top-1 per id; the bound of the module docstring, computed here from scratch
    a, L = CODEC.compand_per_nat, 63
    v32 = v.astype(np.float32).astype(np.float64)
    d_true = {(t, int(i)): v32[t, 0] - v32[t, j] for t in range(len(v)) for j, i in enumerate(ids[t])}
    D = np.array([max(v32[t, 0] - v32[t]) for t in range(len(v))])
    assert (w.scale.astype(np.float64) >= D).all() and (w.scale.astype(np.float64) <= D * (1 + 2**-10)).all()
    fD = 1 - np.exp(-a * w.scale.astype(np.float64))
    for t in range(len(v)):
        for j in range(64):
            d = d_true[(t, int(got_ids[t, j]))]
            u = (1 - math.exp(-a * d)) / fD[t]
            lo = -math.log(1 - max(u - 0.5 / L, 0) * fD[t]) / a
            hi = -math.log(1 - min(u + 0.5 / L, 1) * fD[t]) / a
            assert lo - 1e-5 <= -vals[t, j] <= hi + 1e-5, (t, j, d, -vals[t, j])
    # the rest: exact (float32) relative to the top-1
    np.testing.assert_allclose(got_rest, rest - v32[:, 0], rtol=1e-6, atol=1e-6)
    # with a slot narrower than the gaps, some escaped
    assert (len(w.exceptions) > 0) == (slot_bits < 18)


def _kd_numpy(v, rest, s):
    """Bucket forward KL over the k ids + the rest, float64: teacher (v, rest), student logits s."""
    t = np.concatenate([v, rest[:, None]], 1)
    lp = t - np.logaddexp.reduce(t, 1, keepdims=True)
    lq = s - np.logaddexp.reduce(s, 1, keepdims=True)
    return (np.exp(lp) * (lp - lq)).sum(1), lp - lq


def test_kd_from_decoded_topk_within_the_derived_bound():
    """|KL(p'||q) - KL(p||q)| <= 2e + (e^{2e} - 1)(max rho - min rho)/2 per token, where every teacher
    logit moved by at most e (so every log-prob by at most 2e) and rho = log p/q: the first term bounds
    sum p' (log p' - log p), the second sum (p' - p)(rho - c) with c the midrange of rho."""
    v, ids, rest = _teacher_topk(2)
    T, k = v.shape
    w = encode_window(v.astype(np.float32), ids, rest, codec=CODEC, slot_bits=10)
    vals, got_ids, got_rest = decode_window(
        w.values, w.gaps, w.exceptions, w.scale, w.rest, codec=CODEC, slot_bits=10, k=k
    )
    g = np.random.default_rng(3)
    student = g.normal(size=(T, V)).astype(np.float32) * 2  # a full-vocabulary student
    v32 = v.astype(np.float32).astype(np.float64) - v.astype(np.float32)[:, :1]
    # the exact top-k in the decoded order (ids matched), and the student's k+1 outcomes in that order
    pos = {(t, int(i)): j for t in range(T) for j, i in enumerate(ids[t])}
    exact = np.array([[v32[t, pos[(t, int(i))]] for i in got_ids[t]] for t in range(T)])
    s_k = np.take_along_axis(student.astype(np.float64), got_ids, 1)
    mask = np.ones((T, V), bool)
    np.put_along_axis(mask, got_ids, False, 1)
    s_rest = np.logaddexp.reduce(np.where(mask, student.astype(np.float64), -np.inf), 1)
    s = np.concatenate([s_k, s_rest[:, None]], 1)
    kd_exact, rho = _kd_numpy(exact, got_rest.astype(np.float64), s)
    kd_comp, _ = _kd_numpy(vals.astype(np.float64), got_rest.astype(np.float64), s)
    e = np.abs(vals - exact).max(1)
    bound = 2 * e + np.expm1(2 * e) * (rho.max(1) - rho.min(1)) / 2
    assert (np.abs(kd_comp - kd_exact) <= bound + 1e-9).all()
    # hld's KD on the decoded top-k signal is that same numpy number (sum over tokens)
    got = kd_sum(
        torch.from_numpy(student),
        TopK(values=torch.from_numpy(vals), indices=torch.from_numpy(got_ids), rest=torch.from_numpy(got_rest)),
        torch.ones(T, dtype=torch.bool),
    )
    assert float(got) == pytest.approx(kd_comp.sum(), rel=1e-5)


def test_fp8_hidden_round_trip_within_e4m3_rounding():
    """e4m3 keeps 3 mantissa bits: rounding a normal number moves it by at most 2^-4 of itself; below
    2^-6 (subnormal) the step is 2^-9, so by at most 2^-10. In stored units x / s, s = max|h| / 448."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 40, 640, generator=g) * torch.logspace(-3, 2, 640)  # outlier channels, as in LMs
    bits, scale = fp8_encode(h)
    assert bits.dtype == np.uint8 and bits.shape == (3, 40, 640) and scale.shape == (3, 40)
    np.testing.assert_allclose(scale, h.abs().amax(-1).numpy() / 448, rtol=1e-6)
    back = fp8_decode(bits, scale)
    s = torch.from_numpy(scale)[..., None]
    assert ((back - h).abs() <= 2**-4 * h.abs() + 2**-10 * s + 1e-12).all()
    assert ((back - h).abs() / h.abs()).max() > 2**-6  # the bound is not vacuous: fp8 is lossy


def test_fp8_table_decode_is_the_float8_conversion_bit_for_bit():
    """Every one of the 256 e4m3 patterns, times scales of every size: the table lookup gives torch's
    float8 -> float32 conversion times the scale exactly (NaN patterns included), and the e4m3 values
    by hand: (-1)^s 2^(e-7) (1 + m/8), subnormals 2^-6 m/8."""
    bits = np.tile(np.arange(256, dtype=np.uint8), (5, 1))  # (5, 256)
    scale = np.array([1.0, 3e-7, 0.37, 1e5, 2.0**-30], dtype=np.float32)
    want = torch.from_numpy(bits.copy()).view(torch.float8_e4m3fn).float() * torch.from_numpy(scale)[:, None]
    got = fp8_decode(bits, scale)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    sgn, e, m = bits[0] >> 7, (bits[0] >> 3) & 15, bits[0] & 7
    by_hand = np.where(e > 0, 2.0 ** (e.astype(np.float64) - 7) * (1 + m / 8), 2.0**-6 * m / 8) * (-1.0) ** sgn
    nan = (bits[0] & 0x7F) == 0x7F
    np.testing.assert_array_equal(got[0].numpy()[~nan], by_hand[~nan])
    assert got[0].isnan().numpy()[nan].all()


# ------------------------------------------------------------------------------------ caches on disk


def _cache(tmp_path, overrides, *extra):
    cfg = load_config("smoke", [*overrides, "objective.method=hld-joint", *extra])
    ensure_cache([cfg], tmp_path / "cache", Resources(), quiet=True)
    return cfg


def _open(overrides, path):
    return build(load_config("smoke", [*overrides, "objective.method=hld-joint", f"teacher.cache={path}"]), Resources())


def test_compact_cache_is_smaller_and_gives_the_teachers_topk(tmp_path, overrides):
    _cache(tmp_path / "a", overrides, "teacher.cache_codec=exact", "teacher.cache_hidden_dtype=bfloat16")
    _cache(tmp_path / "b", overrides)  # the defaults: compact, fp8
    m = json.loads((tmp_path / "b" / "cache" / "manifest.json").read_text())
    assert m["format_version"] == 4 and m["codec"]["logits"] == "compact" and m["codec"]["hidden"] == "fp8"
    assert m["codec"]["index_bits"] == 9  # the tiny vocabulary of 512
    parts = lambda d: tmp_path / d / "cache" / "parts"  # noqa: E731
    size = lambda d, part: sum(f.stat().st_size for f in parts(d).glob(f"*.{part}*.bin"))  # noqa: E731
    assert size("b", "topk") < 0.5 * size("a", "topk") and size("b", "hidden") < 0.6 * size("a", "hidden")
    a, b = _open(overrides, tmp_path / "a" / "cache"), _open(overrides, tmp_path / "b" / "cache")
    batch = a.order.batch(1)
    sa, sb = a.teacher(batch, a.plan.needs), b.teacher(batch, b.plan.needs)
    ta, tb = sa.source, sb.source
    for t, logits in ((ta, "exact"), (tb, "compact")):  # what the plan's memory estimate counts per entry
        assert t.values.element_size() + t.indices.element_size() == TopK.decoded_entry_bytes(Codec(logits=logits))
    np.testing.assert_array_equal(np.sort(ta.indices.numpy(), -1), np.sort(tb.indices.numpy(), -1))
    rel = ta.values.float() - ta.values.float()[..., :1]  # log-probs relative to the top-1
    assert (tb.values[..., 0] == 0).all()
    torch.testing.assert_close(tb.values.float().sort(-1).values, rel.sort(-1).values, atol=0.25, rtol=0)
    torch.testing.assert_close(tb.rest, ta.rest - ta.values[..., 0].float(), atol=1e-2, rtol=1e-3)
    for layer in sa.hidden:
        # fp8's rounding (2^-4 relative, 2^-10 s below the normals) plus both copies' bf16 rounding (2^-9 each)
        x, y = sa.hidden[layer].float(), sb.hidden[layer].float()
        s = x.abs().amax(-1, keepdim=True) / 448
        assert ((y - x).abs() <= (2**-4 + 2**-7) * x.abs() + 2**-10 * s * 1.01).all()


@pytest.mark.parametrize("part", ["topk_indices", "topk_exceptions", "topk_values", "hidden_L2_scale"])
def test_damaged_compact_shard_is_refused(tmp_path, overrides, part):
    _cache(tmp_path, overrides)
    shard = tmp_path / "cache" / "parts" / f"p00000of00001.{part}.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(HldError, match="corrupt"):  # at the run's first read (HLD's fit reads layers at build)
        s = _open(overrides, tmp_path / "cache")
        s.teacher(s.order.batch(0), s.plan.needs)
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(HldError, match="truncated or replaced"):
        _open(overrides, tmp_path / "cache")


def test_truncated_compact_arrays_with_matching_checksums_are_refused(tmp_path, overrides):
    """A shard whose exception offsets point past its exceptions (checksums rewritten to match) fails on
    read with the one-line error, not an IndexError."""
    import hashlib

    _cache(tmp_path, overrides)
    path = tmp_path / "cache" / "manifest.json"
    m = json.loads(path.read_text())
    f = m["shards"][0]["fields"]["topk_exception_offsets"]
    part = tmp_path / "cache" / "parts" / "p00000of00001.topk_exception_offsets.bin"
    data = bytearray(part.read_bytes())
    offsets = np.frombuffer(bytes(data[f["offset"] : f["offset"] + f["nbytes"]]), np.int64).copy()
    offsets[1:] += 10**6  # past the exceptions' end
    data[f["offset"] : f["offset"] + f["nbytes"]] = offsets.tobytes()
    part.write_bytes(bytes(data))
    f["sha256"] = hashlib.sha256(offsets.tobytes()).hexdigest()
    path.write_text(json.dumps(m))
    s = _open(overrides, tmp_path / "cache")
    with pytest.raises(HldError, match="truncated or unreadable"):
        s.teacher(s.order.batch(0), s.plan.needs)


def test_older_formats_and_unknown_codecs_are_refused(tmp_path, overrides):
    """Formats 1-3 (a .npy per shard and field) and a codec this hld does not know: rebuild."""
    _cache(tmp_path, overrides, "teacher.cache_codec=exact", "teacher.cache_hidden_dtype=bfloat16")
    path = tmp_path / "cache" / "manifest.json"
    v4 = json.loads(path.read_text())
    path.write_text(json.dumps(v4 | {"format_version": 3}))
    with pytest.raises(HldError, match="format 3.*rebuild it with `hld cache-teacher`"):
        _open(overrides, tmp_path / "cache")
    path.write_text(json.dumps(v4 | {"format_version": 1}))
    with pytest.raises(HldError, match="without a leading BOS"):
        _open(overrides, tmp_path / "cache")
    path.write_text(json.dumps(v4 | {"codec": v4["codec"] | {"logits": "zstd"}}))
    with pytest.raises(HldError, match="codec this hld does not know"):
        _open(overrides, tmp_path / "cache")
