"""Studies without training: the YAML is checked and expanded into cells (counts, ids, the
configuration that pairs arms), cells share teacher caches by group, the t quantile matches scipy
and printed tables, and the report built from hand-written run directories states verdicts that
match an independent numpy computation from its own results.csv."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from hld.config import BudgetConfig, dump_yaml, load_config, to_dict
from hld.errors import HldError
from hld.study import references, stats
from hld.study.pairs import paired, verdict_line, verdicts
from hld.study.report import build_report
from hld.study.results import best_configuration, collect
from hld.study.runner import plan_cells
from hld.study.spec import STUDY_DIR, cell_config, expand, load_study, parse_study
from hld.study.stats import holm, mean_interval, t_cdf, t_quantile, t_quantile_own

# two-sided 95% Student-t quantiles t_{0.975, df} from printed tables
T975 = {
    1: 12.706204736,
    2: 4.302652730,
    3: 3.182446305,
    4: 2.776445105,
    5: 2.570581836,
    10: 2.228138852,
    30: 2.042272456,
}

STUDY = {
    "name": "s",
    "base": "demo",
    "arms": ["ce", "kd", "hld-joint", "hld-first"],
    "students": ["tiny-1l", "tiny-2l"],
    "budgets": [{"tokens": 1024}, {"tokens": 2048}],
    "grid": {"train.lr": [1.0e-3, 3.0e-3], "objective.alpha": [0.5]},
    "seeds": [0, 1, 2],
}


def _write(tmp_path: Path, raw: dict) -> Path:
    import yaml

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# --------------------------------------------------------------------------- grid


def test_shipped_scratch_study_loads_and_expands():
    """The embedded default until issue 33 (students from scratch), shipped as the scratch study."""
    study = load_study("scratch")
    cells = expand(study)
    assert study.name == "scratch" and len(cells) == (4 + 1) * 4 and study.equal_flops == "kd"
    assert not study.score_students and not study.grid and len(study.seeds) >= 3
    for cell in cells:
        cfg = cell_config(study, cell)
        assert (cfg.objective.method, cfg.student.preset, cfg.train.seed, cfg.name) == (
            cell.arm,
            cell.student,
            cell.seed,
            cell.id,
        )
        if cell.flops_of is None:
            assert cfg.budget.tokens == 4096 and cfg.budget.flops is None and cfg.budget.count_teacher
        else:  # ce at the FLOPs its seed's kd cell spends
            assert cell.arm == "ce" and cell.flops_of == f"{cell.match}__s{cell.seed}__kd"
            assert cell.id == f"{cell.match}__eqflops__s{cell.seed}__ce"
    assert {p.stem for p in STUDY_DIR.glob("*.yaml")} >= {"demo", "scratch", "prune-heal"}


def test_the_demo_derives_its_student_from_the_teacher():
    """`hld run`: the teacher's blocks 0-5 and 15-17 healed by ce, kd and hld-joint (each kept block
    matched to its teacher block), ce again at kd's FLOPs, three seeds."""
    study = load_study("demo")
    cells = expand(study)
    assert len(cells) == (3 + 1) * 3 and study.equal_flops == "kd" and study.students == ("depth-9",)
    for cell in cells:
        cfg = cell_config(study, cell)
        assert cfg.student.init.blocks == [0, 1, 2, 3, 4, 5, 15, 16, 17]
        assert cfg.train.freeze_embedding and not cfg.train.keep_final_checkpoint
        assert cfg.objective.hidden.mapping == "kept"


@pytest.mark.parametrize("name", ["demo", "scratch"])
def test_the_demo_study_runs_fp32_everywhere_while_auto_stays_the_default(name):
    from hld.config import RunConfig

    study = load_study(name)
    for cell in expand(study):
        cfg = cell_config(study, cell)
        assert (cfg.train.precision, cfg.teacher.dtype) == ("float32", "float32")  # no machine-dependent `auto`
    defaults = RunConfig()
    assert (defaults.train.precision, defaults.teacher.dtype) == ("auto", "auto")
    assert load_config("demo").train.precision == "auto"  # `hld train --config demo` keeps auto
    undone = load_study("demo", ["train.precision=auto"])  # as `hld run train.precision=auto` passes it
    assert cell_config(undone, expand(undone)[0]).train.precision == "auto"


def test_equal_flops_cells_follow_their_configuration_and_take_the_spent_flops():
    from hld.study.spec import flops_overrides

    study = load_study("demo")
    cells = expand(study)
    for i, cell in enumerate(cells):
        if cell.flops_of:  # after the kd cell it matches, so that cell has trained when it runs
            assert cell.flops_of in [c.id for c in cells[:i]]
    cell = next(c for c in cells if c.flops_of)
    cfg = cell_config(study, cell, flops_overrides(2.5e12))
    assert cfg.budget.flops == 2.5e12 and cfg.budget.tokens is None and cfg.objective.method == "ce"
    with pytest.raises(HldError, match="equal_flops"):
        load_study("demo", ["equal_flops=ce"])


def test_expansion_counts_ids_and_pairing_keys(tmp_path):
    study = load_study(str(_write(tmp_path, STUDY)))
    cells = expand(study)
    assert len(cells) == 4 * 2 * 2 * 2 * 1 * 3
    assert len({c.id for c in cells}) == len(cells)
    assert "tiny-2l__tok2048__lr0.001_alpha0.5__s1__kd" in {c.id for c in cells}
    confs: dict[str, list] = {}
    for c in cells:
        assert c.id == f"{c.configuration}__s{c.seed}__{c.arm}"
        confs.setdefault(c.configuration, []).append(c)
    assert len(confs) == 2 * 2 * 2  # students x budgets x grid points
    for conf, members in confs.items():
        # a configuration holds every (arm, seed) once, and its cells differ only in arm, seed and name
        assert sorted((c.arm, c.seed) for c in members) == sorted(itertools.product(study.arms, study.seeds))
        dicts = [to_dict(cell_config(study, c)) for c in members]
        for d in dicts:
            d.pop("name"), d["objective"].pop("method"), d["train"].pop("seed")
        assert all(d == dicts[0] for d in dicts), conf


def test_study_overrides_replace_study_keys_and_append_run_overrides(tmp_path):
    path = _write(tmp_path, STUDY)
    study = load_study(str(path), ["arms=[ce, kd]", "seeds=[7]", "data.seq_len=64"])
    assert study.arms == ("ce", "kd") and study.seeds == (7,) and study.overrides[-1] == "data.seq_len=64"
    cells = expand(study)
    assert len(cells) == 2 * 2 * 2 * 2 and all(cell_config(study, c).data.seq_len == 64 for c in cells)


def test_a_flops_budget_clears_the_base_token_budget():
    if "flops" not in {f.name for f in dataclasses.fields(BudgetConfig)}:
        pytest.skip("BudgetConfig has no flops key")
    study = load_study("demo", ["budgets=[{flops: 1.0e+12}]"])  # the demo base sets budget.tokens
    cell = expand(study)[0]
    cfg = cell_config(study, cell)
    assert cfg.budget.flops == 1e12 and cfg.budget.tokens is None and "fl1e+12" in cell.id


@pytest.mark.parametrize(
    "change, message",
    [
        ({"armz": ["kd"]}, "unknown key 'armz'"),
        ({"arms": ["kd", "dk"]}, "unknown arm 'dk'"),
        ({"arms": []}, "non-empty list"),
        ({"seeds": [0, 0]}, "repeats a value"),
        ({"seeds": ["a"]}, "list of int"),
        ({"budgets": [{"tokenz": 5}]}, "unknown budget key 'tokenz'"),
        ({"budgets": {"tokens": 5}}, "list of mappings"),
        ({"grid": {"train.lrr": [1]}}, "not a run config key"),
        ({"grid": {"train.lr": 0.1}}, "non-empty list of single values"),
        ({"grid": {"train.seed": [1, 2]}}, "use seeds: instead"),
        ({"grid": {"budget.tokens": [1, 2]}}, "use budgets: instead"),
        ({"overrides": ["student.preset=tiny-4l"]}, "use students: instead"),
        ({"overrides": ["train.lr"]}, "'key=value'"),
        ({"name": "a b"}, "not a plain name"),
        ({"tasks": 5}, "should be a list of task names"),
        ({"task_limit": 0}, "positive integer or null"),
        ({"equal_flops": "hld"}, "should name a distilled arm"),
        ({"score_students": "no"}, "should be true or false"),
    ],
)
def test_bad_study_configs_name_the_problem(tmp_path, change, message):
    with pytest.raises(HldError, match=re.escape(message)) as info:
        load_study(str(_write(tmp_path, {**STUDY, **change})))
    assert "\n" not in info.value.line() and info.value.fix


def test_study_tasks_expand_the_shipped_alias(tmp_path):
    study = load_study(str(_write(tmp_path, {**STUDY, "tasks": ["shipped", "hld_mc"], "task_limit": 50})))
    assert study.tasks == ("hld_lambada", "hld_mc") and study.task_limit == 50
    assert load_study(str(_write(tmp_path, STUDY))).tasks == ()


def test_missing_required_key_and_bad_cell_value(tmp_path):
    raw = {k: v for k, v in STUDY.items() if k != "students"}
    with pytest.raises(HldError, match="lacks 'students'"):
        parse_study(raw)
    study = load_study(str(_write(tmp_path, {**STUDY, "grid": {"train.lr": [-1.0]}})))
    with pytest.raises(HldError, match=r"study cell .*train\.lr=-1\.0 is outside \(0, 1\]"):
        cell_config(study, expand(study)[0])
    with pytest.raises(HldError, match="study config .* is neither a file nor a shipped one"):
        load_study("no-such-study")


def test_cache_groups_follow_teacher_data_seed_and_batch(tmp_path):
    study = load_study(
        str(_write(tmp_path, {**STUDY, "grid": {"train.lr": [1.0e-3, 3.0e-3], "train.batch_size": [4, 8]}}))
    )
    planned = plan_cells(study, tmp_path / "out")
    for cell, cfg, group in planned:
        if cell.arm == "ce":
            assert group is None and cfg.teacher.cache is None
        else:
            assert cfg.teacher.cache == str((tmp_path / "out").resolve() / "caches" / group)
    groups = {g for _, _, g in planned if g}
    assert len(groups) == len(STUDY["seeds"]) * 2  # students, budgets, lr and arms share; seed and batch split
    by_group = {}
    for _, cfg, g in planned:
        if g:
            by_group.setdefault(g, set()).add((cfg.train.seed, cfg.train.batch_size))
    assert all(len(v) == 1 for v in by_group.values())


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_the_printed_table(df):
    assert t_quantile_own(0.975, df) == pytest.approx(T975[df], abs=1e-8)
    assert t_quantile(0.975, df) == pytest.approx(T975[df], abs=1e-8)
    assert t_quantile_own(0.025, df) == pytest.approx(-T975[df], abs=1e-8)


def test_t_quantile_and_cdf_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 6.5, 17, 120, 1e5):
        for p in (0.51, 0.8, 0.9, 0.95, 0.99, 0.999):
            assert t_quantile_own(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-7)
        for x in (-4.0, -1.0, 0.3, 2.5):
            assert t_cdf(x, df) == pytest.approx(stats.t.cdf(x, df), abs=1e-10)
    assert t_quantile_own(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)  # the normal limit


def test_mean_interval_by_hand():
    xs = np.array([0.03, -0.01, 0.02, 0.05])
    half = T975[3] * xs.std(ddof=1) / math.sqrt(4)
    i = mean_interval(xs)
    assert (i.n, i.mean) == (4, pytest.approx(xs.mean()))
    assert (i.lo, i.hi) == (pytest.approx(xs.mean() - half), pytest.approx(xs.mean() + half))
    one = mean_interval([0.2])
    assert one.mean == 0.2 and not one.has_ci


def test_holm_by_hand():
    # m = 4; sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([None, 0.5, 0.2]) == [None, pytest.approx(0.5), pytest.approx(0.4)]  # m = 2
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []


@pytest.mark.parametrize("seed", range(5))
def test_holm_equals_the_closed_test_of_bonferroni_tests(seed):
    from helpers import holm_by_hand

    p = list(np.random.default_rng(seed).uniform(0, 0.3, size=6)) + [0.001, 0.5]
    assert holm(p) == pytest.approx(holm_by_hand(p), abs=1e-12)


def test_interval_p_value_matches_scipys_t_test():
    stats = pytest.importorskip("scipy.stats")
    xs = [-0.031, -0.012, -0.025, 0.004]
    assert mean_interval(xs).p == pytest.approx(stats.ttest_1samp(xs, 0.0).pvalue, rel=1e-9)
    assert mean_interval([0.1]).p is None and mean_interval([0.2, 0.2]).p == 0.0


def test_best_configuration_is_the_lowest_seed_mean():
    rows = [
        {"configuration": c, "val_loss": v}
        for c, v in [("a", 1.0), ("a", 3.0), ("b", 1.9), ("b", 2.0), ("c", float("nan"))]
    ]
    assert {r["configuration"] for r in best_configuration(rows)} == {"b"} and best_configuration([]) == []


# --------------------------------------------------------------------------- count-based references


def test_unigram_and_bigram_cross_entropy_by_hand():
    # V = 6, BOS = 2. Training windows [2 3 4], [2 3 3]: predictions 3, 4, 3, 3 with contexts 2, 3, 2, 3
    counts = references.fit([np.array([2, 3, 4]), np.array([2, 3, 3])], vocab_size=6)
    k, n = 0.01, 4
    p = lambda c: (c + k) / (n + 6 * k)  # noqa: E731  add-k unigram; c(3) = 3, c(4) = 1, c(5) = 0
    # validation window [2 3 5]: predicts 3 after BOS, 5 after 3
    # bigram, Witten-Bell: context 2 seen twice with 1 distinct successor; context 3 twice with 2 (4 and 3)
    p3_2 = (2 + 1 * p(3)) / (2 + 1)
    p5_3 = (0 + 2 * p(0)) / (2 + 2)
    got = references.cross_entropy(counts, [np.array([2, 3, 5])], k=k)
    assert got["predictions"] == 2
    assert got["unigram"] == pytest.approx(-(math.log(p(3)) + math.log(p(0))) / 2, rel=1e-12)
    assert got["bigram"] == pytest.approx(-(math.log(p3_2) + math.log(p5_3)) / 2, rel=1e-12)
    # an unseen context falls back to the unigram: [2 5 3] predicts 5 after BOS, 3 after the unseen 5
    got = references.cross_entropy(counts, [np.array([2, 5, 3])], k=k)
    assert got["bigram"] == pytest.approx(-(math.log(1 * p(0) / 3) + math.log(p(3))) / 2, rel=1e-12)


def test_bigram_probabilities_sum_to_one():
    rng = np.random.default_rng(0)
    windows = [np.concatenate([[2], rng.integers(0, 12, size=15)]) for _ in range(6)]
    counts = references.fit(windows, vocab_size=12)
    b = np.arange(12)
    assert references.unigram_prob(counts, b).sum() == pytest.approx(1.0)
    for a in range(12):
        assert references.bigram_prob(counts, np.full(12, a), b).sum() == pytest.approx(1.0)


@pytest.mark.parametrize("cap_windows", [None, 37])
def test_split_fit_streams_in_blocks_and_caps_its_tokens(monkeypatch, cap_windows):
    # counts by hand (collections.Counter over every (input, target) pair) against the blockwise fit,
    # with merges forced every few blocks; a cap reads only the first windows that hold that many tokens
    from collections import Counter

    monkeypatch.setattr(references, "_MERGE_PAIRS", 5000)
    rng = np.random.default_rng(1)
    windows = np.concatenate([np.full((9000, 1), 2), rng.integers(0, 40, size=(9000, 12))], axis=1)
    cap = 10**9 if cap_windows is None else cap_windows * 13
    counts, n = references.fit_split(windows, vocab_size=40, max_tokens=cap)
    read = windows if cap_windows is None else windows[:cap_windows]
    assert n == len(read)
    pairs = Counter((int(a), int(b)) for w in read for a, b in zip(w[:-1], w[1:]))
    assert counts.pair_codes.tolist() == sorted(a * 40 + b for a, b in pairs)
    assert counts.pair_counts.tolist() == [pairs[(c // 40, c % 40)] for c in counts.pair_codes.tolist()]
    assert counts.unigram.tolist() == [sum(int((w[1:] == t).sum()) for w in read) for t in range(40)]
    assert counts.context.tolist() == [sum(v for (a, _), v in pairs.items() if a == t) for t in range(40)]
    assert counts.successors.tolist() == [len({b for a, b in pairs if a == t}) for t in range(40)]


def test_read_windows_cut_the_last_step():
    from hld.data.loader import BatchOrder

    order = BatchOrder(np.arange(40).reshape(10, 4), batch_size=2, seed=3)
    read = references.read_windows(order, steps=3, last_len=2)
    assert [len(w) for w in read] == [4, 4, 4, 4, 2, 2]
    assert [int(w[0]) // 4 for w in read] == [int(i) for k in range(3) for i in order.indices(k)]


def test_paired_differences_by_hand():
    rng = np.random.default_rng(0)
    confs, seeds = ["a", "b", "c"], [0, 1]
    loss = {(c, s, arm): 3 + rng.normal() * 0.05 for c in confs for s in seeds for arm in ("ce", "kd", "hld-first")}
    del loss[("c", 1, "hld-first")]  # a missing cell: that pair drops out, the others stay
    rows = [{"configuration": c, "seed": s, "arm": a, "val_loss": v} for (c, s, a), v in loss.items()]
    comps = {(x.arm, x.baseline): x for x in paired(rows)}
    assert set(comps) == {("hld-first", "kd"), ("kd", "ce")}  # no hld-joint cells
    hf = comps[("hld-first", "kd")]
    per = {
        c: np.mean([loss[(c, s, "hld-first")] - loss[(c, s, "kd")] for s in seeds if (c, s, "hld-first") in loss])
        for c in confs
    }
    assert {c: i.mean for c, i in hf.per_config.items()} == pytest.approx(per)
    assert hf.per_config["c"].n == 1 and hf.per_config["a"].n == 2
    means = np.array([per[c] for c in confs])
    half = T975[2] * means.std(ddof=1) / math.sqrt(3)
    assert (hf.overall.mean, hf.overall.lo, hf.overall.hi) == pytest.approx(
        (means.mean(), means.mean() - half, means.mean() + half)
    )
    assert hf.wins == int((means < 0).sum()) and hf.over == "configurations"
    (line,) = [verdict_line(v) for v in verdicts([hf])]  # "c" has one seed: one line, pooled and labelled
    assert f"in {hf.wins} of 3 configurations" in line and f"{means.mean():+.4f} nats" in line
    assert "not independent replicates" in line


def test_one_configuration_uses_seeds_and_one_pair_has_no_interval():
    rows = [
        {"configuration": "x", "seed": s, "arm": a, "val_loss": v}
        for s, (a, v) in itertools.product([0, 1, 2], [("kd", 3.0)])
    ]
    rows += [
        {"configuration": "x", "seed": s, "arm": "hld-joint", "val_loss": 3.0 + d}
        for s, d in zip([0, 1, 2], [-0.02, -0.021, -0.019])
    ]
    (c,) = paired(rows)
    assert c.over == "seeds" and c.overall.n == 3 and c.overall.hi < 0
    (v,) = verdicts([c])
    assert "hld-joint is better" in verdict_line(v) and "over 3 seeds" in verdict_line(v)
    assert v.p_holm == pytest.approx(v.interval.p)  # a family of one
    (single,) = paired([r for r in rows if r["seed"] == 0])
    (v,) = verdicts([single])
    assert not single.overall.has_ci and "no interval" in verdict_line(v)


def test_holm_adjusts_across_every_line_of_a_report():
    rows = [
        {"configuration": conf, "seed": s, "arm": a, "val_loss": 3.0 + d}
        for conf in ("x", "y")
        for s, d in zip([0, 1, 2], [0.0, 0.001, -0.002])
        for a in ("kd",)
    ]
    rows += [
        {"configuration": conf, "seed": s, "arm": "hld-joint", "val_loss": 3.0 + d}
        for conf, ds in (("x", [-0.02, -0.021, -0.019]), ("y", [0.01, -0.03, 0.02]))
        for s, d in zip([0, 1, 2], ds)
    ]
    lines = verdicts(paired(rows))
    assert [v.configuration for v in lines] == ["x", "y"] and all(v.over == "seeds" for v in lines)
    assert [v.p_holm for v in lines] == pytest.approx(holm([v.interval.p for v in lines]))
    assert lines[0].p_holm == pytest.approx(2 * lines[0].interval.p)  # the smaller p, times m = 2


# --------------------------------------------------------------------------- power


def _scipy_power(effect: float, sd: float, n: int, alpha: float) -> float:
    """The two-sided one-sample t-test's power, from scipy's t quantile and noncentral t."""
    from scipy.stats import nct, t

    crit, nc = t.ppf(1 - alpha / 2, n - 1), abs(effect) * math.sqrt(n) / sd
    lower = float(nct.cdf(-crit, n - 1, nc))  # nan where scipy fails far in the tail: there it is < 1e-15
    return float(nct.sf(crit, n - 1, nc)) + (lower if math.isfinite(lower) else 0.0)


@pytest.mark.parametrize(
    ("t", "df", "nc"), [(1.3, 1, 0.5), (4.3, 2, 2.0), (-4.3, 2, 2.0), (2.5, 5, 3.3), (2.0, 60, 1.0)]
)
def test_own_noncentral_t_matches_scipy(t, df, nc):
    from scipy.stats import nct

    assert stats.nct_cdf_own(t, df, nc) == pytest.approx(float(nct.cdf(t, df, nc)), abs=1e-9)


@pytest.mark.parametrize("own", [False, True])
@pytest.mark.parametrize(("sd", "n", "alpha"), [(0.092, 3, 0.05), (0.116, 3, 0.0125), (0.05, 10, 0.05), (1.0, 2, 0.05)])
def test_detectable_effect_and_seeds_needed_match_scipy_power(monkeypatch, own, sd, n, alpha):
    if own:  # hld's own noncentral t and t quantile, as without scipy
        monkeypatch.setattr(stats, "nct_cdf", stats.nct_cdf_own)
        monkeypatch.setattr(stats, "t_quantile", t_quantile_own)
    mde = stats.detectable_effect(sd, n, alpha)
    assert _scipy_power(mde, sd, n, alpha) == pytest.approx(0.8, abs=1e-6)
    assert stats.paired_power(mde, sd, n, alpha) == pytest.approx(_scipy_power(mde, sd, n, alpha), abs=1e-8)
    for effect in (0.5 * mde, mde / math.sqrt(n)):
        need = stats.seeds_needed(effect, sd, alpha)
        assert _scipy_power(effect, sd, need, alpha) >= 0.8 > _scipy_power(effect, sd, need - 1, alpha)


def test_power_of_a_textbook_case():
    # Cohen's d = 0.5, two-sided alpha 0.05: 34 pairs give 80% power (33 do not), as tabled for the one-sample t-test
    assert stats.seeds_needed(0.5, 1.0, 0.05) == 34
    assert stats.paired_power(0.5, 1.0, 34, 0.05) == pytest.approx(0.8078, abs=5e-4)


def test_pooled_sd_and_holm_levels_by_hand():
    groups = [(3, 0.1), (3, 0.2), (5, 0.05), (1, None)]
    want = math.sqrt((2 * 0.01 + 2 * 0.04 + 4 * 0.0025) / 8)
    assert stats.pooled_sd(groups) == pytest.approx(want)
    assert stats.holm_levels([0.04, None, 0.001, 0.2], 0.05) == pytest.approx([0.05 / 2, None, 0.05 / 3, 0.05])


def test_an_underpowered_line_says_so_and_a_decided_one_does_not():
    from scipy.stats import nct, t  # noqa: F401  (the reference below is scipy's)

    deltas = {"hld-joint": [0.10, -0.04, 0.15], "kd": [-0.80, -0.78, -0.83]}
    rows = [{"configuration": "x", "seed": s, "arm": "ce", "val_loss": 8.0} for s in range(3)]
    rows += [{"configuration": "x", "seed": s, "arm": "kd", "val_loss": 8.0 + d} for s, d in enumerate(deltas["kd"])]
    rows += [
        {"configuration": "x", "seed": s, "arm": "hld-joint", "val_loss": 8.0 + dk + d}
        for s, (dk, d) in enumerate(zip(deltas["kd"], deltas["hld-joint"]))
    ]
    lines = {(v.comparison.arm, v.comparison.baseline): v for v in verdicts(paired(rows))}
    hj, kd = lines[("hld-joint", "kd")], lines[("kd", "ce")]
    d = np.array(deltas["hld-joint"])
    sd = d.std(ddof=1)
    assert hj.interval.sd == pytest.approx(sd)
    assert hj.power.holm_level == pytest.approx(0.05)  # the larger p of two lines: tested at alpha / 1
    mde = hj.power.mde_holm
    assert _scipy_power(mde, sd, 3, 0.05) == pytest.approx(0.8, abs=1e-6)
    text = verdict_line(hj)
    assert f"underpowered: cannot tell differences below {mde:.3f} nats with 3 seeds" in text
    assert "no clear difference" not in text
    assert f"{hj.power.seeds_holm} seeds would decide" in text
    assert "kd is better (Holm-adjusted p ≤ 0.05)." in verdict_line(kd) and not kd.power.underpowered
    assert kd.power.holm_level == pytest.approx(0.025)


def test_lines_of_one_kind_get_a_pooled_detectable_effect(tmp_path):
    rng = np.random.default_rng(3)
    rows = []
    for conf in ("x", "y", "z"):
        for s in range(4):
            rows.append({"configuration": conf, "seed": s, "arm": "kd", "val_loss": 5.0 + 0.1 * rng.normal()})
            rows.append({"configuration": conf, "seed": s, "arm": "hld-joint", "val_loss": 5.0 + 0.1 * rng.normal()})
    comps = paired(rows)
    lines = verdicts(comps)
    assert len(lines) == 3
    sds = [
        np.std(
            [
                r["val_loss"] - q["val_loss"]
                for r in rows
                for q in rows
                if r["configuration"] == q["configuration"] == c
                and r["seed"] == q["seed"]
                and r["arm"] == "hld-joint"
                and q["arm"] == "kd"
            ],
            ddof=1,
        )
        for c in ("x", "y", "z")
    ]
    pooled = math.sqrt(sum(x * x for x in sds) / 3)  # equal n: the mean variance
    for v in lines:
        assert v.power.pooled_sd == pytest.approx(pooled) and v.power.pooled_lines == 3
        assert _scipy_power(v.power.mde_pooled, pooled, 4, 0.05) == pytest.approx(0.8, abs=1e-6)
    from hld.study.results import write_paired_csv

    write_paired_csv(comps, tmp_path / "paired.csv", lines)
    out = [r for r in csv.DictReader(open(tmp_path / "paired.csv")) if r["configuration"] != "ALL"]
    assert [float(r["mde_pooled"]) for r in out] == pytest.approx([v.power.mde_pooled for v in lines])


# --------------------------------------------------------------------------- report from run directories


RAN = {
    "student_dtype": "float32",
    "teacher_dtype": "bfloat16",
    "device": "cpu",
    "machine": "AMD EPYC",
    "cpu_flags": "avx2 avx512f avx512_bf16",
    "cpu_kernels": "AVX512",
    "torch": "2.13.0+cpu",
    "transformers": "5.24.0",
}


def _fake_study(root: Path, *, seeds=(0, 1, 2), cell_json: bool = True, ran=lambda cell: RAN) -> list[dict]:
    """Run directories written by hand, as `hld study` would leave them (no training)."""
    study = parse_study({**STUDY, "budgets": [{"tokens": 1024}], "seeds": list(seeds)})
    rng = np.random.default_rng(1)
    effect = {"ce": 0.0, "kd": -0.05, "hld-joint": -0.04, "hld-first": -0.06}
    written = []
    for cell in expand(study):
        cfg = cell_config(study, cell)
        run = root / "runs" / cell.id
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(dump_yaml(cfg))
        loss = 5.0 - 0.2 * (cell.student == "tiny-2l") + effect[cell.arm] + 0.01 * rng.normal()
        flops = 1e9 * (1 + (cell.student == "tiny-2l")) * (1.0 if cell.arm == "ce" else 1.2)
        summary = {
            "name": cell.id,
            "arm": cell.arm,
            "student": cell.student,
            "steps": 8,
            "tokens": 1024,
            "flops": flops,
            "student_params": 90000 + 60000 * (cell.student == "tiny-2l"),
            "student_params_non_embedding": 60000 + 60000 * (cell.student == "tiny-2l"),
            "train_seconds": 1.5,
            "val/loss": loss,
            "val/ppl": math.exp(loss),
            "ran": ran(cell),
        }
        (run / "summary.json").write_text(json.dumps(summary))
        lines = [
            {"step": k, "tokens": 128 * k, "flops": flops * k / 8, "train/ce": 6.2 - 0.1 * k + 0.02 * rng.normal()}
            for k in range(1, 9)
        ]
        lines[-1].update({"val/loss": loss, "val/ppl": math.exp(loss)})
        (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
        if cell_json:
            (run / "cell.json").write_text(json.dumps(cell.describe()))
        written.append({"cell": cell.id, "val_loss": loss})
    return written


VERDICT = re.compile(
    r"^- \*\*(?P<arm>[\w-]+) vs (?P<base>[\w-]+), [\w ,-]+\*\*(?: \((?P<conf>[^)]+)\))?(?:; FLOPs ×[\d.]+ of "
    r"[\w-]+'s)?: \S+ better in (?P<wins>\d+) of (?P<n>\d+) (?P<over>\w+); mean Δ val loss (?P<mean>[+-]\d+\.\d+) "
    r"nats \(unadjusted 95% CI \[(?P<lo>[+-]\d+\.\d+), (?P<hi>[+-]\d+\.\d+)\] over \d+ \w+; Holm-adjusted p = "
    r"(?P<p>[0-9.e+-]+)\), val ppl ratio (?P<ratio>\d+\.\d+)"
)


def parse_verdicts(report: str) -> dict:
    out = {}
    for line in report.splitlines():
        m = VERDICT.match(line)
        if m:
            out[(m["arm"], m["base"], m["conf"])] = m.groupdict()
    return out


def verdicts_from_csv(path: Path, t975: dict) -> dict:
    """The verdicts recomputed from results.csv alone with numpy (printed t quantiles; scipy's t test
    and Holm written out for the p-values): one per comparison and configuration, over its seeds."""
    from scipy import stats

    rows = list(csv.DictReader(open(path)))
    loss = {(r["configuration"], r["seed"], r["arm"]): float(r["val_loss"]) for r in rows}
    out = {}
    for arm, base in (("hld-joint", "kd"), ("hld-first", "kd"), ("kd", "ce")):
        for conf in sorted({c for c, _, a in loss if a == arm}):
            d = np.array(
                [
                    v - loss[(c, s, base)]
                    for (c, s, a), v in loss.items()
                    if c == conf and a == arm and (c, s, base) in loss
                ]
            )
            half = t975[len(d) - 1] * d.std(ddof=1) / math.sqrt(len(d))
            out[(arm, base, conf)] = {
                "wins": int((d < 0).sum()),
                "n": len(d),
                "mean": d.mean(),
                "lo": d.mean() - half,
                "hi": d.mean() + half,
                "ratio": math.exp(d.mean()),
                "p": stats.ttest_1samp(d, 0.0).pvalue,
            }
    order = sorted(out, key=lambda k: out[k]["p"])
    running = 0.0
    for i, key in enumerate(order):  # Holm: the i-th smallest (0-based) times m - i, running maximum, at most 1
        running = max(running, (len(order) - i) * out[key]["p"])
        out[key]["p_holm"] = min(1.0, running)
    return out


def check_verdicts_match_csv(study_dir: Path, t975: dict) -> None:
    said = parse_verdicts((study_dir / "report.md").read_text())
    want = verdicts_from_csv(study_dir / "results.csv", t975)
    assert said.keys() == want.keys() and want
    for key, w in want.items():
        s = said[key]
        assert (int(s["wins"]), int(s["n"]), s["over"]) == (w["wins"], w["n"], "seeds"), key
        for name in ("mean", "lo", "hi", "ratio"):
            assert float(s[name]) == pytest.approx(w[name], abs=6e-5), (key, name)
        assert float(s["p"]) == pytest.approx(w["p_holm"], rel=2e-3, abs=1e-6), key


@pytest.mark.slow
def test_report_from_run_directories(tmp_path):
    written = _fake_study(tmp_path)
    fidelity = {"signal": "cache top-64 + remaining mass (compact codec)", "dtype": "float32", "temperature": 1.0}
    fidelity.update({"teacher_dtype": "float32", "kl_per_token": 0.51234, "predictions": 1016})
    (tmp_path / "study.json").write_text(json.dumps({"name": "s", "signal_fidelity": [fidelity]}))
    result = build_report(tmp_path)
    budget_cols = sorted(f"budget.{f.name}" for f in dataclasses.fields(BudgetConfig))
    header = next(csv.reader(open(tmp_path / "results.csv")))
    assert header == [
        "cell",
        "configuration",
        "match",
        "accounting",
        "arm",
        "student",
        "student_params",
        "student_params_non_embedding",
        *budget_cols,
        "train.lr",
        "objective.alpha",
        "seed",
        "steps",
        "tokens",
        "flops",
        "val_loss",
        "val_ppl",
        "train_seconds",
        *RAN,
    ]
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert all({k: r[k] for k in RAN} == RAN for r in rows)
    assert len(rows) == len(written) == result["cells"] == 4 * 2 * 2 * 3
    by_cell = {r["cell"]: r for r in rows}
    for w in written:
        assert float(by_cell[w["cell"]]["val_loss"]) == pytest.approx(w["val_loss"])
    check_verdicts_match_csv(tmp_path, T975)
    report = (tmp_path / "report.md").read_text()
    assert "selected on the validation windows it is reported on" in report  # a grid: selection, labelled
    # the effects written above are 5x the noise: kd wins every seed of every configuration
    assert report.count("kd better in 3 of 3 seeds") == 4 and "Holm-adjusted over the 12 lines" in report
    assert "| tiny-2l | 2 × 64 | 120,000 | 150,000 |" in report
    assert (
        "- **Ran on**: cpu `AMD EPYC` (flags: avx2 avx512f avx512_bf16; torch's kernels AVX512), torch 2.13.0+cpu,"
        " transformers 5.24.0." in report
    )
    assert "- **Precision that ran** (resolved, not `auto`): students `float32`; teacher `bfloat16`." in report
    assert "did not all run under the same precision" not in report
    assert "| cache top-64 + remaining mass (compact codec) | `float32` | 1 | 1,016 | 0.5123 |" in report
    assert "Power of each line" in report and "| detectable at Holm level |" in report
    assert "not** FLOP-matched" in report and "kd ×1.200" in report
    for name in ("loss_vs_flops", "training_curves", "paired_differences"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plots/{name}.png" in report
    paired_rows = list(csv.DictReader(open(tmp_path / "paired.csv")))
    assert sum(r["configuration"] == "ALL" for r in paired_rows) == 3
    assert all(r["p_holm"] for r in paired_rows if r["configuration"] != "ALL")


@pytest.mark.slow
def test_a_study_whose_cells_ran_under_different_precisions_says_so(tmp_path):
    _fake_study(tmp_path, seeds=(0, 1), ran=lambda cell: {**RAN, "student_dtype": "bfloat16"} if cell.seed else RAN)
    build_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "students `bfloat16`, `float32`" in report
    assert "**The cells did not all run under the same precision and machine**" in report
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {(r["seed"], r["student_dtype"]) for r in rows} == {("0", "float32"), ("1", "bfloat16")}


@pytest.mark.slow
def test_unfinished_runs_are_listed_and_grid_keys_inferred_without_cell_json(tmp_path):
    _fake_study(tmp_path, seeds=(0, 1), cell_json=False)
    unfinished = next((tmp_path / "runs").iterdir())
    (unfinished / "summary.json").unlink()
    table = collect(tmp_path)
    assert table.grid_keys == ["train.lr"]  # objective.alpha has one value: not recoverable from configs alone
    assert table.pending == [unfinished.name] and len(table.rows) == 4 * 2 * 2 * 2 - 1
    assert {r["configuration"] for r in table.rows} >= {"tiny-1l__tok1024__lr0.001", "tiny-2l__tok1024__lr0.003"}
    result = build_report(tmp_path)
    assert f"left out: {unfinished.name}" in (tmp_path / "report.md").read_text() and result["pending"]


def test_report_of_an_empty_directory_is_a_user_error(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(HldError, match="no finished runs"):
        build_report(tmp_path)


@pytest.mark.parametrize("name", ["demo", "scratch", "prune-heal"])
def test_shipped_study_cells_resolve_without_the_network(name):
    # every cell of the shipped study resolves to a valid run config (nothing is loaded)
    study = load_study(name)
    assert all(load_config(study.base, list(study.overrides) + list(c.overrides)) for c in expand(study))


def test_an_arm_that_ignores_a_grid_key_runs_once_and_pairs_with_every_point(tmp_path):
    """KD reads no objective.hidden key, CE no objective key: over a grid of hidden losses KD and CE run
    once per seed, each serving every grid point; hld-joint pairs with that KD cell at each point, and
    kd vs ce counts its one pair per seed once (not once per grid point)."""
    raw = {
        "name": "v",
        "base": "demo",
        "arms": ["ce", "kd", "hld-joint"],
        "students": ["tiny-1l"],
        "budgets": [{"tokens": 1024}],
        "grid": {"objective.hidden.loss": ["mse", "cosine", "relation"]},
        "seeds": [0, 1],
    }
    study = load_study(str(_write(tmp_path, raw)))
    cells = expand(study)
    assert len(cells) == 2 * (1 + 1 + 3)
    kd = [c for c in cells if c.arm == "kd"]
    assert [c.id for c in kd] == ["tiny-1l__tok1024__s0__kd", "tiny-1l__tok1024__s1__kd"]
    points = sorted({c.configuration for c in cells if c.arm == "hld-joint"})
    assert all(sorted(c.serves) == points for c in kd)
    assert to_dict(cell_config(study, kd[0]))["objective"]["hidden"]["loss"] == "mse"  # the base's default
    # pairing, by hand: hld-joint at each point minus the one kd of its seed; kd minus ce once per seed
    loss = {("kd", 0): 7.0, ("kd", 1): 7.2, ("ce", 0): 7.5, ("ce", 1): 7.6}
    rows = []
    for c in cells:
        v = loss.get(
            (c.arm, c.seed), 6.0 + 0.1 * points.index(c.configuration) + 0.01 * c.seed if c.arm == "hld-joint" else None
        )
        rows.append(
            {
                "cell": c.id,
                "configuration": c.configuration,
                "match": c.match,
                "serves": list(c.serves),
                "arm": c.arm,
                "seed": c.seed,
                "val_loss": v,
                "flops": 1.0,
                "accounting": "budget",
            }
        )
    comps = {(c.arm, c.baseline): c for c in paired(rows)}
    hld = comps[("hld-joint", "kd")]
    assert sorted(hld.diffs) == points
    for i, p in enumerate(points):
        assert hld.diffs[p] == pytest.approx([6.0 + 0.1 * i - 7.0, 6.0 + 0.1 * i + 0.01 - 7.2])
    kdce = comps[("kd", "ce")]
    assert sum(len(d) for d in kdce.diffs.values()) == 2  # one pair per seed
    assert sorted(x for d in kdce.diffs.values() for x in d) == pytest.approx([-0.5, -0.4])


def test_a_lens_cell_ignores_the_target_normalisation(tmp_path):
    """The logit lens reads the teacher's raw state: at loss=lens an HLD arm runs once per seed over a
    grid of normalize_teacher values, serving each; the other losses run at every normalisation."""
    raw = {
        "name": "v",
        "base": "demo",
        "arms": ["kd", "hld-joint"],
        "students": ["tiny-1l"],
        "budgets": [{"tokens": 1024}],
        "seeds": [0],
        "grid": {
            "objective.hidden.normalize_teacher": ["none", "rms", "standardize"],
            "objective.hidden.loss": ["mse", "lens"],
        },
    }
    study = load_study(str(_write(tmp_path, raw)))
    hld = [c for c in expand(study) if c.arm == "hld-joint"]
    lens = [c for c in hld if c.point.get("objective.hidden.loss") == "lens"]
    assert len(hld) == 3 + 1 and len(lens) == 1
    assert "objective.hidden.normalize_teacher" not in lens[0].point and len(lens[0].serves) == 3
    assert sorted(c.point["objective.hidden.normalize_teacher"] for c in hld if c not in lens) == [
        "none",
        "rms",
        "standardize",
    ]
    # paired with kd once, and named by the lens cell's own configuration, not the first it serves
    rows = [
        {
            "cell": c.id,
            "configuration": c.configuration,
            "match": c.match,
            "serves": list(c.serves),
            "arm": c.arm,
            "seed": c.seed,
            "val_loss": 7.0 if c.arm == "kd" else 7.5 if c in lens else 6.9,
            "flops": 1.0,
            "accounting": "budget",
        }
        for c in expand(study)
    ]
    comp = next(c for c in paired(rows) if c.arm == "hld-joint")
    assert comp.diffs[lens[0].configuration] == pytest.approx([0.5])
    assert sorted(comp.diffs) == sorted([lens[0].configuration] + [c.configuration for c in hld if c not in lens])


def test_a_verdict_line_gives_its_own_configurations_flops_ratio(tmp_path):
    """Lines per configuration carry the FLOP ratio of that configuration's pairs, not the comparison's
    mean over every configuration (a costly variant once inflated every line of hld-variants)."""
    rows = []
    for conf, hld_flops in (("a", 2.0), ("b", 8.0)):
        for seed in (0, 1):
            rows.append(
                {
                    "cell": f"{conf}{seed}kd",
                    "configuration": conf,
                    "match": conf,
                    "arm": "kd",
                    "seed": seed,
                    "val_loss": 7.0 + seed,
                    "flops": 1.0,
                    "accounting": "budget",
                }
            )
            rows.append(
                {
                    "cell": f"{conf}{seed}h",
                    "configuration": conf,
                    "match": conf,
                    "arm": "hld-joint",
                    "seed": seed,
                    "val_loss": 6.9 + seed,
                    "flops": hld_flops,
                    "accounting": "budget",
                }
            )
    comp = next(c for c in paired(rows) if c.arm == "hld-joint")
    lines = {v.configuration: verdict_line(v) for v in verdicts([comp])}
    assert "FLOPs ×2.000 of kd's" in lines["a"] and "FLOPs ×8.000 of kd's" in lines["b"]
    assert comp.flops_ratio == pytest.approx(5.0)


def test_the_equal_flops_view_pairs_only_flops_matched_ce_cells():
    """A grid over a key kd reads and ce ignores (the cross-tokenizer loss): ce runs once per seed at equal
    tokens, and at kd's FLOPs only for the grid point its flops cell matched. The other points have no
    equal-FLOPs pair: their budget ce cell spent ~1/171 of kd's FLOPs and is not stood in for one."""
    from hld.study.pairs import paired

    rows = []
    for seed in range(3):
        ce = {"arm": "ce", "seed": seed, "configuration": "c__ce", "match": "c__ce", "accounting": "budget"}
        rows.append(
            {**ce, "serves": ["c__uld", "c__alm"], "val_loss": 7.0 + seed / 100, "flops": 1.0, "cell": f"ce{seed}"}
        )
        for point, loss in (("c__uld", 7.2), ("c__alm", 6.9)):
            rows.append(
                {
                    "arm": "kd",
                    "seed": seed,
                    "configuration": point,
                    "match": point,
                    "accounting": "budget",
                    "val_loss": loss + seed / 50,
                    "flops": 171.0,
                    "cell": f"{point}{seed}",
                }
            )
        rows.append(
            {
                "arm": "ce",
                "seed": seed,
                "configuration": "c__eqflops",
                "match": "c__uld",
                "accounting": "flops",
                "val_loss": 5.1 + seed / 100,
                "flops": 171.0,
                "cell": f"eq{seed}",
            }
        )
    for r in rows:
        r["budget"] = "tokens=16384" if r["accounting"] == "budget" else "kd's flops=171"
    by = {(c.arm, c.baseline, c.view): c for c in paired(rows)}
    flops = by[("kd", "ce", "flops")]
    assert set(flops.per_config) == {"c__uld"}  # alm has no flops-matched ce: no pair, not the budget ce
    assert flops.per_config["c__uld"].mean == pytest.approx(2.11)  # (7.2 + s/50) - (5.1 + s/100), mean over s
    assert flops.flops_ratio == pytest.approx(1.0)
    assert set(by[("kd", "ce", "budget")].per_config) == {"c__uld", "c__alm"}


def test_a_grid_over_a_key_ce_ignores_and_kd_reads_gets_a_flops_cell_per_kd_point():
    """cross-tok's grid over objective.cross_tokenizer.loss: ce runs once per seed at equal tokens (it
    ignores the key), but at equal FLOPs once per kd cell, each at its own kd's FLOPs and paired with it."""
    from hld.study.spec import expand, load_study

    cells = expand(load_study("cross-tok", ["seeds=[0]"]))
    flops = {c.id: c for c in cells if c.accounting == "flops"}
    kd = {c.id: c for c in cells if c.arm == "kd"}
    assert len(flops) == len(kd) == 3
    assert sorted(c.flops_of for c in flops.values()) == sorted(kd)
    assert all(c.match == kd[c.flops_of].configuration for c in flops.values())
    assert len([c for c in cells if c.arm == "ce" and c.accounting == "budget"]) == 1
    # a study without such a grid keeps its cell names (the shipped demo's)
    assert [c.id for c in expand(load_study("demo", ["seeds=[0]"])) if c.accounting == "flops"] == [
        "depth-9__tok4096__eqflops__s0__ce"
    ]
