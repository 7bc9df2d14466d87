"""The reference path reproduces, bit for bit, the results recorded before the step engine
was rebuilt (see tests/golden.py for the scenarios and when the record may change)."""

import json

import golden
import pytest

RECORDED = json.loads(golden.PATH.read_text())


@pytest.mark.parametrize("name", sorted(golden.scenarios()))
def test_reference_path_reproduces_the_recorded_results(name):
    spec = golden.scenarios()[name]
    if spec["bits"] == 8:
        pytest.importorskip("bitsandbytes")
    assert golden.fingerprint(*golden.run(spec, foreach=False)) == RECORDED[name]


def test_every_scenario_is_recorded():
    assert set(golden.scenarios()) == set(RECORDED)
