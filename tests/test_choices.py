"""Each allowed-value list is written once (deqlm.choices): the config refuses anything else, the
registries of code hold exactly those names, and the help shows them."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from deqlm.choices import Arch, Core, DatasetName, SolverName, check_registry, parse_grad, values
from deqlm.config import ConfigError, ExperimentConfig, load_config
from deqlm.data.dataset import BUILDERS
from deqlm.models.build import ARCHS, CORES
from deqlm.solvers import SOLVERS, get_solver, register_solver
from deqlm.train import cli as train_cli


def _choice_settings() -> list[tuple[str, tuple[str, ...]]]:
    """(section.key, allowed values) of every config field typed with a Literal."""
    out = []
    for section in dataclasses.fields(ExperimentConfig):
        sub = section.default_factory() if callable(section.default_factory) else None
        if not dataclasses.is_dataclass(sub):
            continue
        for name, hint in typing.get_type_hints(type(sub)).items():
            if values(hint):
                out.append((f"{section.name}.{name}", values(hint)))
    return out


CHOICE_SETTINGS = _choice_settings()


def test_every_registry_of_code_holds_exactly_the_names_the_config_accepts():
    for registry, choice in ((SOLVERS, SolverName), (ARCHS, Arch), (CORES, Core), (BUILDERS, DatasetName)):
        assert set(registry) == set(values(choice))


def test_a_registry_that_drifts_from_its_choice_fails_naming_both_sides():
    with pytest.raises(AssertionError, match="model.arch.*newton.*transformer"):
        check_registry([*values(Arch), "newton"], Arch, "model.arch")
    with pytest.raises(AssertionError, match="model.arch"):
        check_registry(["transformer"], Arch, "model.arch")


def test_the_config_types_the_settings_that_name_code_with_their_choice():
    hints = dict(CHOICE_SETTINGS)
    assert hints["deq.f_solver"] == hints["deq.b_solver"] == values(SolverName)
    assert hints["model.arch"] == values(Arch) and hints["model.core"] == values(Core)
    assert hints["data.dataset"] == values(DatasetName)
    assert "train.grad_sync" in hints and "deq.stop_mode" in hints


@pytest.mark.parametrize("key,allowed", CHOICE_SETTINGS, ids=[k for k, _ in CHOICE_SETTINGS])
def test_each_allowed_value_loads_and_any_other_is_refused_naming_the_key(key, allowed):
    section, name = key.split(".")
    for value in allowed:
        # the reversible solver loads only with its own gradient (deqlm.choices.check_reversible_pair)
        partner = ["deq.grad=reversible"] if (key, value) == ("deq.f_solver", "reversible") else []
        assert getattr(getattr(load_config(None, [f"{key}={value}", *partner]), section), name) == value
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_config(None, [f"{key}=no_such_choice"])
    assert all(value in str(err.value) for value in allowed)


def test_train_help_shows_the_choices_of_every_choice_setting():
    lines = train_cli.help_text().splitlines()
    for key, allowed in CHOICE_SETTINGS:
        line = next(ln for ln in lines if ln.startswith(f"  {key}="))
        assert "{" + " | ".join(allowed) + "}" in line


def test_grad_is_implicit_or_a_positive_step_count_from_a_string_or_an_int():
    assert parse_grad("implicit") == "implicit"
    assert parse_grad("3") == 3 and parse_grad(2) == 2
    for bad in ("0", "-1", "two", 0, True, "", None):
        with pytest.raises(ValueError, match="deq.grad"):
            parse_grad(bad, "deq.grad")
    assert load_config(None, ["deq.grad=4"]).deq.grad == "4"


def test_a_registered_solver_is_reachable_by_name_and_a_name_is_registered_once():
    def halfway(f, z0, **kwargs):
        return get_solver("fixed_point")(f, z0, **kwargs)

    try:
        assert register_solver(halfway) is halfway and get_solver("halfway") is halfway
        with pytest.raises(ValueError, match="already registered"):
            register_solver(halfway)
    finally:
        SOLVERS.pop("halfway", None)
