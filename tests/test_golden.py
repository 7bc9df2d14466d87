"""The reference path reproduces the results recorded in float64 on any x86-64 CPU, within
the bound tests/golden.py derives (see there for the scenarios and when the record may
change)."""

import json

import golden
import pytest

RECORDED = json.loads(golden.PATH.read_text())


@pytest.mark.parametrize("name", sorted(golden.scenarios()))
def test_reference_path_reproduces_the_recorded_results(name):
    spec = golden.scenarios()[name]
    if spec["bits"] == 8:
        pytest.importorskip("bitsandbytes")
    got = golden.fingerprint(*golden.run(spec, foreach=False), spec)
    assert not golden.mismatches(got, RECORDED[name])


def test_every_scenario_is_recorded():
    assert set(golden.scenarios()) == set(RECORDED)


def test_the_bounds_see_small_changes():
    """A float64 scenario sees every weight of a tensor moved by one fp32 rounding (2**-24
    relative); a float32 one sees them moved by 2**-16 (a few hundred fp32 roundings; its
    bound is a hundred). The scenarios' precisions are as said."""
    for name, precision in (("GaLoreAdamW-galore", "float64"),
                            ("SubspaceAdamW-galore-bits8", "float32")):
        spec = golden.scenarios()[name]
        params, opt = golden.run(spec, foreach=False)
        recorded = golden.fingerprint(params, opt, spec)
        assert recorded["precision"] == precision
        assert not golden.mismatches(golden.fingerprint(params, opt, spec), recorded)
        params["wide"].data *= 1 + (2.0**-24 if precision == "float64" else 2.0**-16)
        assert golden.mismatches(golden.fingerprint(params, opt, spec), recorded)
