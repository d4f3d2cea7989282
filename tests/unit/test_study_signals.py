"""Studies over teacher signals (`signals: [topk, sampled, online]`, hld.study.signals): the default
keeps every shipped cell as it was (checked against the cells recorded before the key existed), the
signal splits cells and cache groups, online cells read no cache, ce runs once per seed, and the
report's cross-signal lines (kd[topk] vs kd[online], ...) match scipy's paired t-test and a numpy
float64 computation on a synthetic results table. The rows of docs/errors.md on `signals` are
test_bad_signals_name_the_problem (and one through the CLI: exit 2, one line)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from hld.config import RunConfig, dump_yaml, field_help
from hld.errors import HldError
from hld.study.pairs import paired, signal_comparisons, verdict_line, verdicts
from hld.study.report import build_report
from hld.study.runner import cache_group, plan_cells
from hld.study.spec import cell_config, expand, load_study, parse_study

BEFORE = Path(__file__).resolve().parents[1] / "assets" / "study_cells_before_signals.json"
HAS_SAMPLED = "teacher.cache_signal" in {k for k, _, _ in field_help(RunConfig)}
STUDY = {
    "name": "sig",
    "base": "demo",
    "arms": ["ce", "kd", "hld-joint"],
    "students": ["tiny-2l"],
    "budgets": [{"tokens": 1024}],
    "seeds": [0, 1],
    "signals": ["topk", "online"],
}


def _cells(raw: dict) -> list:
    return expand(parse_study(raw))


RECORDED_GRID = {
    "hld-variants": [
        "grid={objective.hidden.normalize_teacher: [none, rms, standardize], "
        "objective.hidden.loss: [mse, cosine, relation, lens], objective.hidden.beta_schedule.kind: [constant, cosine]}"
    ],
    "scratch": ["seeds=[0, 1, 2]"],  # recorded as the demo, with three seeds (four since; scratch since issue 33)
}


@pytest.mark.parametrize("name, recorded", [("scratch", "demo"), ("hld-variants", "hld-variants")])
def test_the_default_signal_keeps_every_shipped_cell_as_before(name, recorded):
    """Ids, pairing keys and overrides of the shipped studies, recorded before `signals` existed."""
    before = json.loads(BEFORE.read_text())[recorded]
    # the studies as they were recorded (cka was added to hld-variants' losses after, a seed to the demo)
    grid = RECORDED_GRID.get(name, [])
    for study in (load_study(name, grid), load_study(name, ["signals=[topk]", *grid])):
        now = [
            {
                "cell": c.id,
                "configuration": c.configuration,
                "match": c.match,
                "serves": list(c.serves),
                "flops_of": c.flops_of,
                "accounting": c.accounting,
                "overrides": list(c.overrides),
            }
            for c in expand(study)
        ]
        assert now == before


def test_signals_multiply_the_distilled_cells_and_ce_serves_every_signal():
    cells = _cells(STUDY)
    assert len(cells) == 2 * (1 + 2 * 2)  # per seed: one ce, kd and hld-joint on each signal
    ids = {c.id for c in cells}
    assert "tiny-2l__tok1024__online__s1__kd" in ids and "tiny-2l__tok1024__topk__s0__hld-joint" in ids
    for c in cells:
        if c.arm == "ce":
            assert c.id == f"tiny-2l__tok1024__s{c.seed}__ce" and c.signal is None
            assert c.serves == ("tiny-2l__tok1024__topk", "tiny-2l__tok1024__online")
        else:
            assert c.configuration == f"tiny-2l__tok1024__{c.signal}" and c.serves == ()
            assert not any(o.startswith("teacher.cache_signal") for o in c.overrides)  # topk, online: none
        assert c.describe()["signal"] == c.signal
    # kd vs ce pairs on each signal with the same ce cells
    rows = [
        {"configuration": c.configuration, "match": c.match, "serves": list(c.serves), "seed": c.seed, "arm": c.arm}
        | {"val_loss": 5.0 - 0.1 * (c.arm != "ce") + 0.01 * c.seed * (c.signal == "online"), "cell": c.id}
        for c in cells
    ]
    kd_ce = [x for x in paired(rows) if (x.arm, x.baseline) == ("kd", "ce")]
    assert len(kd_ce) == 1 and set(kd_ce[0].per_config) == {"tiny-2l__tok1024__topk", "tiny-2l__tok1024__online"}


def test_sampled_cells_carry_the_signal_and_its_own_overrides():
    raw = {**STUDY, "signals": ["topk", "sampled"], "signal_overrides": {"sampled": ["teacher.cache_samples=20"]}}
    if not HAS_SAMPLED:  # the keys come with the sampled cache: a study naming them cannot load before
        with pytest.raises(HldError, match="teacher.cache_samples"):
            _cells(raw)
        raw = {**raw, "signal_overrides": {}}
    for c in _cells(raw):
        sampled = [o for o in c.overrides if o.startswith("teacher.cache_s")]
        if c.signal == "sampled":
            assert sampled[0] == "teacher.cache_signal=sampled" and c.id.endswith(f"__sampled__s{c.seed}__{c.arm}")
            assert sampled[1:] == (["teacher.cache_samples=20"] if HAS_SAMPLED else [])
        else:
            assert sampled == []
    # a sampled-only key is not checked while the study runs without `sampled` (e.g. before that cache exists)
    study = parse_study({**raw, "signals": ["topk", "online"], "signal_overrides": {"sampled": ["x.y=1"]}})
    assert all("x.y=1" not in c.overrides for c in expand(study))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"signals": ["topk", "full"]}, "unknown teacher signal 'full'"),
        ({"signals": ["online", "online"]}, "repeat a value"),
        ({"signals": []}, "non-empty list of signals"),
        ({"signal_overrides": {"exact": ["train.lr=0.1"]}}, "should map teacher signals"),
        ({"signal_overrides": {"online": ["train.lrr=0.1"]}}, "not a run config key"),
        ({"overrides": ["teacher.cache_signal=sampled"]}, "use signals: instead"),
    ],
)
def test_bad_signals_name_the_problem(change, message):
    with pytest.raises(HldError, match=message) as info:
        parse_study({**STUDY, **change})
    assert "\n" not in info.value.line() and info.value.fix


def test_a_bad_signal_at_the_cli_is_one_line(capsys, tmp_path):
    from helpers import one_line_error

    argv = ["study", "--config", "kd-signals", "--out", str(tmp_path / "s"), "--list", "signals=[topk, full]"]
    one_line_error(capsys, argv, "unknown teacher signal 'full'")


def test_online_cells_have_no_cache_group_and_groups_split_by_signal(tmp_path):
    planned = plan_cells(parse_study(STUDY), tmp_path / "out")
    groups = {}
    for cell, cfg, group in planned:
        if cell.arm == "ce" or cell.signal == "online":
            assert group is None and cfg.teacher.cache is None  # online: the teacher runs in the loop
        else:
            assert cfg.teacher.cache == str((tmp_path / "out").resolve() / "caches" / group)
            groups.setdefault(group, set()).add((cell.seed, cell.signal))
    assert sorted(groups.values(), key=sorted) == [{(0, "topk")}, {(1, "topk")}]  # one cache per seed, topk only
    cfg = next(cfg for _, cfg, g in planned if g)
    assert cache_group(cfg, "sampled") == cache_group(cfg) + "-sampled" and cache_group(cfg, None) == cache_group(cfg)
    if HAS_SAMPLED:
        both = plan_cells(parse_study({**STUDY, "signals": ["topk", "sampled"]}), tmp_path / "out2")
        by = {}
        for cell, _, g in both:
            if g:
                by.setdefault(g, set()).add((cell.seed, cell.signal))
        assert len(by) == 4 and all(len(v) == 1 for v in by.values())


def test_an_equal_flops_ce_cell_matches_the_first_signal_and_serves_the_others():
    cells = _cells({**STUDY, "arms": ["ce", "kd"], "equal_flops": "kd"})
    flops = [c for c in cells if c.flops_of]
    assert [c.id for c in flops] == [f"tiny-2l__tok1024__eqflops__s{s}__ce" for s in (0, 1)]
    for c in flops:
        assert c.flops_of == f"tiny-2l__tok1024__topk__s{c.seed}__kd" and c.match == "tiny-2l__tok1024__topk"
        assert c.serves == ("tiny-2l__tok1024__online",)
        assert [x.id for x in cells].index(c.flops_of) < [x.id for x in cells].index(c.id)


def test_the_shipped_signals_study_lists_its_cells():
    study = load_study("kd-signals", [] if HAS_SAMPLED else ["signals=[topk,online]"])
    cells = expand(study)
    n_signals = len(study.signals)
    assert len(cells) == len(study.seeds) * (1 + n_signals) and len(study.seeds) == 3
    assert all(cell_config(study, c).name == c.id for c in cells)
    assert study.signal_overrides == {"sampled": ("teacher.cache_samples=20",)}
    from hld.config import read_yaml
    from hld.study.spec import resolve_study_path

    assert read_yaml(resolve_study_path("kd-signals"))["signals"] == ["topk", "sampled", "online"]


# --------------------------------------------------------------------------- the report's cross-signal lines


def _synthetic_rows(rng) -> tuple[list[dict], dict]:
    """Two configurations (budgets) x 4 seeds x kd on three signals, plus ce; losses with a signal effect."""
    rows, loss = [], {}
    effect = {"topk": 0.15, "sampled": 0.05, "online": 0.0}
    for conf in ("tiny-2l__tok1024", "tiny-2l__tok2048"):
        for seed in range(4):
            noise = rng.normal() * 0.05  # shared by the seed's cells: pairing removes it
            rows.append({"configuration": conf, "seed": seed, "arm": "ce", "signal": "", "val_loss": 6.0 + noise})
            for signal, e in effect.items():
                v = 5.5 + noise + e + rng.normal() * 0.03
                loss[(conf, seed, signal)] = v
                rows.append(
                    {
                        "configuration": f"{conf}__{signal}",
                        "seed": seed,
                        "arm": "kd",
                        "signal": signal,
                        "val_loss": v,
                        "flops": 2e9,
                    }
                )
    return rows, loss


def test_cross_signal_pairs_match_scipy_ttest_rel():
    from scipy import stats

    rows, loss = _synthetic_rows(np.random.default_rng(7))
    comps = {(c.arm, c.baseline): c for c in signal_comparisons(rows)}
    assert set(comps) == {("kd[topk]", "kd[online]"), ("kd[sampled]", "kd[online]"), ("kd[topk]", "kd[sampled]")}
    for (arm, base), c in comps.items():
        a, b = arm[3:-1], base[3:-1]
        assert set(c.per_config) == {"tiny-2l__tok1024", "tiny-2l__tok2048"} and c.flops_ratio == pytest.approx(1.0)
        for conf, i in c.per_config.items():
            x = np.array([loss[(conf, s, a)] for s in range(4)], dtype=np.float64)
            y = np.array([loss[(conf, s, b)] for s in range(4)], dtype=np.float64)
            d = x - y
            half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / math.sqrt(4)
            assert (i.n, i.mean, i.lo, i.hi) == pytest.approx((4, d.mean(), d.mean() - half, d.mean() + half))
            assert i.p == pytest.approx(stats.ttest_rel(x, y).pvalue, rel=1e-6)
            assert c.seed_wins[conf] == int((d < 0).sum())
        means = np.array([np.mean([loss[(k, s, a)] - loss[(k, s, b)] for s in range(4)]) for k in sorted(c.per_config)])
        assert c.overall.mean == pytest.approx(means.mean()) and c.over == "configurations"
    # Holm over every line of the report: the arm-vs-arm lines (kd vs ce on each signal) and these
    all_comps = paired(rows) + signal_comparisons(rows)
    lines = verdicts(all_comps)
    p = np.array([v.interval.p for v in lines])
    order = np.argsort(p)
    holm = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        holm[i] = running
    assert [v.p_holm for v in lines] == pytest.approx(list(holm))
    topk_online = [v for v in lines if v.comparison.arm == "kd[topk]" and v.comparison.baseline == "kd[online]"]
    assert len(topk_online) == 2 and all(v.power is not None for v in topk_online)
    said = verdict_line(topk_online[0])
    assert said.startswith("**kd[topk] vs kd[online], equal budget** (tiny-2l__tok1024)")
    assert "kd[online] is better" in said  # +0.15 nats against 0.03 noise over 4 seeds


def test_a_pair_needs_both_signals_of_the_same_seed():
    rows, _ = _synthetic_rows(np.random.default_rng(1))
    rows = [r for r in rows if not (r["signal"] == "online" and r["seed"] == 3)]
    c = next(c for c in signal_comparisons(rows) if c.baseline == "kd[online]")
    assert all(i.n == 3 for i in c.per_config.values())
    assert not signal_comparisons([r for r in rows if r["signal"] in ("", "topk")])  # one signal: no line


def test_the_report_writes_cross_signal_lines_to_paired_csv_and_report_md(tmp_path):
    """Run directories written by hand (no training) for a signals study; the report's cross-signal
    rows recomputed from its own results.csv with scipy."""
    from scipy import stats

    study = parse_study({**STUDY, "arms": ["ce", "kd"], "seeds": [0, 1, 2]})
    rng = np.random.default_rng(2)
    for cell in expand(study):
        run = tmp_path / "runs" / cell.id
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(dump_yaml(cell_config(study, cell)))
        loss = 5.0 + {"ce": 0.3, "kd": 0.0}[cell.arm] + 0.1 * (cell.signal == "topk") + 0.02 * rng.normal()
        summary = {"steps": 8, "tokens": 1024, "flops": 1e9, "train_seconds": 1.0, "val/loss": loss}
        summary |= {"val/ppl": math.exp(loss), "student_params": 150000, "student_params_non_embedding": 120000}
        (run / "summary.json").write_text(json.dumps(summary))
        curve = [{"step": k, "tokens": 128 * k, "flops": 1e9 * k / 8, "train/ce": 6.0 - 0.1 * k} for k in range(1, 9)]
        curve[-1] |= {"val/loss": loss, "val/ppl": math.exp(loss)}
        (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in curve))
        (run / "cell.json").write_text(json.dumps(cell.describe()))
    build_report(tmp_path)
    results = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {r["signal"] for r in results} == {"", "topk", "online"}
    loss = {(r["signal"], int(r["seed"])): float(r["val_loss"]) for r in results if r["arm"] == "kd"}
    x = np.array([loss[("topk", s)] for s in range(3)])
    y = np.array([loss[("online", s)] for s in range(3)])
    (row,) = [r for r in csv.DictReader(open(tmp_path / "paired.csv")) if r["comparison"] == "kd[topk] vs kd[online]"]
    assert float(row["mean_diff"]) == pytest.approx((x - y).mean())
    assert float(row["p"]) == pytest.approx(stats.ttest_rel(x, y).pvalue, rel=1e-6)
    assert row["configuration"] == "tiny-2l__tok1024" and row["p_holm"] and row["mde_holm"]
    report = (tmp_path / "report.md").read_text()
    assert "- **kd[topk] vs kd[online], equal student tokens**" in report
    assert "cached-KD vs full-KD cell difference" in report
    assert "| tiny-2l | tokens=1024 | kd[online] |" in report and "| tiny-2l | tokens=1024 | kd[topk] |" in report
    # the per-cell results table names each cell's signal too (one "kd" row per signal and seed before)
    for sig in ("topk", "online"):
        assert f"| tiny-2l | tokens=1024 | 0 | kd[{sig}] | 1,024 |" in report
    assert "| tiny-2l | tokens=1024 | 0 | ce | 1,024 |" in report
    cell_json = next((tmp_path / "runs").glob("*__kd/cell.json"))
    cell_json.write_text(json.dumps(json.loads(cell_json.read_text()) | {"signal": ["topk"]}))
    with pytest.raises(HldError, match="is damaged \\(its signal is not a name\\)"):
        build_report(tmp_path)


def test_each_paired_panel_lists_its_own_configurations(tmp_path, monkeypatch):
    """A signal study's kd − ce panel has one row per signal, its kd[topk] − kd[online] panel one
    configuration: one shared row list gave each panel the other's rows, empty. Panels that list the
    same rows keep one shared axis (the demo's plot is unchanged)."""
    import matplotlib

    matplotlib.use("Agg")
    from hld.study import figures
    from hld.study.pairs import Comparison
    from hld.study.stats import Interval

    def cmp(arm, base, confs):
        per = {c: Interval(n=2, mean=-0.1, lo=-0.2, hi=0.0, p=0.1, sd=0.01) for c in confs}
        return Comparison(
            arm, base, per, Interval(n=len(confs), mean=-0.1), "seeds", 1, diffs={c: [-0.1, -0.1] for c in confs}
        )

    figs = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: figs.append(fig) or path)
    signals = [cmp("kd", "ce", ["s__online", "s__topk"]), cmp("kd[topk]", "kd[online]", ["s"])]
    figures.plot_paired(signals, tmp_path)
    ticks = [[t.get_text() for t in ax.get_yticklabels()] for ax in figs[0].axes]
    assert ticks == [["s__online", "s__topk", figures.ALL], ["s"]], ticks
    figures.plot_paired([cmp("kd", "ce", ["a", "b"]), cmp("hld-joint", "kd", ["a", "b"])], tmp_path)
    assert figs[1].axes[0].get_shared_y_axes().joined(figs[1].axes[0], figs[1].axes[1])
    # more comparisons than a row holds wrap onto further rows (a signal study's 21 lines were one strip)
    many = [cmp(f"a{i}", "ce", ["a", "b"]) for i in range(figures.PAIRED_COLUMNS + 1)]
    figures.plot_paired(many, tmp_path)
    shown = [ax for ax in figs[2].axes if ax.get_visible()]
    grid = {(ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start) for ax in shown}
    assert len(shown) == len(many) and grid == {*((0, c) for c in range(figures.PAIRED_COLUMNS)), (1, 0)}
    assert [ax.get_title().split(" −")[0] for ax in shown] == [c.arm for c in many]


def test_a_curve_label_leaves_out_the_grid_keys_its_arm_ignores():
    """The bold curve of the cell ce shares across a grid over a key it ignores (the cross-tokenizer loss) is
    labelled without it; kd's cell names its point; an arm that reads every grid key names them all."""
    from hld.study.figures import _point

    keys = ["objective.cross_tokenizer.loss", "train.lr"]
    ce = {"arm": "ce", "configuration": "tiny-2l__tok16384", keys[0]: "uld", keys[1]: 0.01}
    kd = {**ce, "arm": "kd", keys[0]: "gold"}
    assert _point(ce, keys) == "lr 0.01"
    assert _point(ce, keys[:1]) == "tiny-2l__tok16384"
    assert _point(kd, keys) == "loss gold, lr 0.01"
