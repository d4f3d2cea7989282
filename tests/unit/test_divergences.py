"""How a config names a divergence (hld.distill.divergences.registry.parse, Divergence.spec, param): the
spec grammar, each parameter's range with its open and closed ends, and the error that names what is
wrong. The divergences' values and gradients are test_losses.py's and test_divergence_skew_kl.py's."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from hld.distill.divergences import registry
from hld.distill.divergences.base import Divergence, param
from hld.distill.divergences.forward_kl import ForwardKL
from hld.distill.divergences.jsd import Jsd
from hld.distill.divergences.registry import help_text, parse
from hld.distill.divergences.skew_kl import SkewKL


@dataclass(frozen=True)
class Two(Divergence):
    """Two parameters, one range closed at both ends and one half-open (no registered divergence has either)."""

    name = "two"
    help = "a test divergence"
    a: float = param(0.5, "closed", lo=0.0, hi=1.0)
    b: float = param(2.0, "half-open", lo=1.0, hi=4.0, closed=(True, False))


@pytest.fixture
def two(monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "two", Two)


def test_param_is_a_field_with_its_default_help_and_range():
    f = param(0.3, "the weight", lo=0.0, hi=2.0, closed=(False, True))
    assert f.default == 0.3
    assert dict(f.metadata) == {"help": "the weight", "range": (0.0, 2.0, False, True)}
    assert dict(param(1.0, "h", lo=-1.0, hi=1.0).metadata)["range"] == (-1.0, 1.0, True, True)


def test_spec_names_the_parameters_and_parse_reads_it_back(two):
    assert ForwardKL().spec() == "forward_kl"
    assert Jsd(beta=0.3).spec() == "jsd(beta=0.3)"
    assert SkewKL().spec() == "skew_kl(alpha=0.1)"
    assert Two(a=0.25, b=3.0).spec() == "two(a=0.25,b=3)"
    for d in (ForwardKL(), Jsd(beta=0.3), SkewKL(alpha=0.05), Two(a=0.25, b=3.0), Two()):
        assert parse(d.spec()) == d


def test_parse_defaults_spaces_and_an_empty_item(two):
    assert parse("jsd") == Jsd(beta=0.5)
    assert parse(" jsd ( beta = 0.3 ) ") == Jsd(beta=0.3)
    assert parse("jsd(beta=0.3,)") == Jsd(beta=0.3)
    assert parse("two(b=3)") == Two(a=0.5, b=3.0)
    assert parse("two( a = 0.25 , b = 1.5 )") == Two(a=0.25, b=1.5)


def test_open_and_closed_ends_of_a_range(two):
    # jsd's beta lies in (0, 1): both ends out
    assert parse("jsd(beta=1e-6)").beta == 1e-6 and parse("jsd(beta=0.999999)").beta == 0.999999
    for v in ("0", "1", "-0.5", "1.5"):
        with pytest.raises(ValueError, match=re.escape(f"jsd's beta={float(v):g} is outside (0, 1)")):
            parse(f"jsd(beta={v})")
    # two's a lies in [0, 1], b in [1, 4)
    assert parse("two(a=0,b=1)") == Two(a=0.0, b=1.0)
    assert parse("two(a=1,b=3.99)") == Two(a=1.0, b=3.99)
    for spec, ends in (("a=-0.1", "[0, 1]"), ("a=1.1", "[0, 1]"), ("b=4", "[1, 4)"), ("b=0.99", "[1, 4)")):
        with pytest.raises(ValueError, match=re.escape(f"two's {spec} is outside {ends}")):
            parse(f"two({spec})")


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match=re.escape("is not one of forward_kl, reverse_kl, jsd(beta=0.5), skew_kl")):
        parse("no_such")
    for not_a_string in (None, 3, Jsd()):
        with pytest.raises(ValueError, match="is not one of"):
            parse(not_a_string)
    with pytest.raises(ValueError, match=re.escape("jsd has no parameter 'alpha' (it takes: jsd(beta=0.5))")):
        parse("jsd(alpha=0.1)")
    with pytest.raises(ValueError, match=re.escape("jsd's beta='x' is not a number")):
        parse("jsd(beta=x)")
    with pytest.raises(ValueError, match=re.escape("jsd's beta='=0.3' is not a number")):
        parse("jsd(beta==0.3)")


def test_help_text_lists_each_divergence_with_its_help():
    text = help_text()
    assert text.startswith("KD divergence D(teacher_T, student_T)")
    at = [text.index(f"{c().spec()}: {c.help}") for c in registry.CLASSES]
    assert at == sorted(at) and "the usual KD; reverse_kl: KL(student||teacher)" in text
