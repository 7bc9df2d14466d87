"""The registry of tests/optim_db.py covers every projector and every public optimizer class."""

import optim_db

import subspace_optim as so


def test_every_registered_projector_has_a_record():
    assert set(so.registered_projectors()) == set(optim_db.PROJECTORS)


def test_every_public_optimizer_class_has_a_record():
    assert optim_db.public_optimizer_classes() == {r.cls for r in optim_db.OPTIMIZERS.values()}


def test_records_name_real_variants():
    for record in optim_db.PROJECTORS.values():
        assert "default" in record.variants, record.name
        assert record.needs_lr <= set(record.variants), record.name


def test_each_projector_names_the_class_that_uses_it():
    for record in optim_db.PROJECTORS.values():
        assert getattr(so, record.named).default_projector == record.name
