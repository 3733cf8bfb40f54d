import re

import pytest

from regrow.config import apply_overrides, load_config, read_recipe, validate
from regrow.errors import RegrowError

BASE = {"model": {"name": "digits_cnn"}, "data": {"name": "digits"}, "prune": {"sparsity": 0.5}}


def test_defaults_are_filled_in():
    cfg = validate(BASE)
    assert cfg.recover.method == "distill" and cfg.schedule.name == "one_shot"
    assert cfg.prune.resolved_pattern == "unstructured" and cfg.prune.scope == "global"
    assert cfg.auto()  # a recipe that states only a budget gets strategy auto
    assert not validate(apply_overrides(BASE, ["prune.pattern=unstructured"])).auto()
    assert not validate(apply_overrides(BASE, ["strategy=manual"])).auto()
    assert (
        validate(apply_overrides(BASE, ["prune.macs=0.5", "prune.sparsity=null"])).prune.resolved_pattern == "channel"
    )


def test_unknown_key_names_the_key_and_lists_allowed_ones():
    with pytest.raises(RegrowError, match=r"unknown key 'prune\.sparsty'; allowed keys here: sparsity, threshold"):
        validate(apply_overrides(BASE, ["prune.sparsty=0.3"]))


@pytest.mark.parametrize(
    "override, message",
    [
        ("prune.sparsity=1.5", r"sparsity must be a number in \[0, 1\)"),
        ("prune.threshold=0.1", "exactly one of sparsity"),
        ("prune.pattern=2:2", "0 < n < m"),
        ("prune.criterion=best", "unknown criterion 'best'"),
        ("recover.method=prayer", "unknown recovery method 'prayer'"),
        ("schedule.name=weekly", "unknown schedule 'weekly'; allowed values: gradual, iterative, one_shot"),
        ("model.factory=a:b", "exactly one of 'name'"),
        ("recover.epochs=ten", "'recover.epochs'"),
    ],
)
def test_bad_values(override, message):
    with pytest.raises(RegrowError, match=message):
        validate(apply_overrides(BASE, [override]))


def test_overrides_parse_yaml_values():
    out = apply_overrides(BASE, ["prune.targets=[a, 'b.*']", "recover.patience=null", "new.deep.key=3"])
    assert out["prune"]["targets"] == ["a", "b.*"]
    assert out["recover"]["patience"] is None
    assert out["new"] == {"deep": {"key": 3}}
    assert BASE["prune"] == {"sparsity": 0.5}  # the input is not modified
    with pytest.raises(RegrowError, match="must look like key=value"):
        apply_overrides(BASE, ["prune.sparsity"])


def test_yaml_syntax_error_names_the_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  name: digits_cnn\nprune: [unclosed\n")
    with pytest.raises(RegrowError, match="not valid YAML at line 4"):
        read_recipe(recipe)


def test_builtin_recipe_by_name_and_missing_recipe():
    cfg, path = load_config("demo")
    assert cfg.name == "demo" and path.name == "demo.yaml"
    with pytest.raises(RegrowError, match="neither a file nor a built-in recipe; built-in recipes: .*demo"):
        load_config("no-such-recipe.yaml")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = validate(BASE)
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    again, _ = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_found_files_become_absolute_and_leave_the_given_keys_alone(tmp_path, monkeypatch):
    from regrow.pipeline.load import with_found_files as _with_found_files

    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "alloc.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    # No prune section in the recipe: the budget comes from --set, so strategy auto decides from the keys set.
    cfg = validate(apply_overrides({k: v for k, v in BASE.items() if k != "prune"}, ["prune.macs=0.5"]))
    assert cfg.auto()
    same = _with_found_files(cfg, [tmp_path / "recipes"])
    assert same.auto() and same.prune.model_fields_set == {"macs"}

    cfg = validate(apply_overrides(BASE, ["prune.allocation_file=alloc.json"]))
    found = _with_found_files(cfg, [tmp_path / "recipes"])
    assert found.prune.allocation_file == str((tmp_path / "recipes" / "alloc.json").resolve())
    assert found.model_fields_set == cfg.model_fields_set

    (tmp_path / "alloc.json").write_text("{}")  # the same name in the working directory: which one is meant?
    with pytest.raises(RegrowError, match="'alloc.json' names two different files: .* give an absolute path"):
        _with_found_files(cfg, [tmp_path / "recipes"])


NEW_TASK = {"name": "digits", "kwargs": {"classes": [0, 1, 2, 3, 4]}}
RULE_EXAMPLES = {  # one recipe each rule refuses (overrides on the demo recipe), and a part of its message
    "_needs_the_dense_copy": (
        ["prune.keep_dense=false", "recover.method=distill"],
        "prune.keep_dense false keeps no copy of the dense model, but recover.method 'distill'",
    ),
    "_within": (["prune.within=encoder"], "prune.within scopes the budget of a structural pattern"),
    "_embedding_needs_no_labels": (
        ["recover.objective.kind=embedding", "prune.criterion=taylor"],
        "recover.objective.kind 'embedding' trains and measures without labels, but criterion 'taylor'",
    ),
    "_schedule": (["schedule.name=iterative", "prune.threshold=0.1", "prune.sparsity=null"], "not prune.threshold"),
    "_dynamic_needs_unstructured": (["recover.method=rigl", "prune.pattern=2:4", "prune.sparsity=null"], "'2:4'"),
    "_cap_reaches_the_budget": (["prune.max_sparsity=0.8"], "prune.max_sparsity 0.8 is below prune.sparsity 0.9"),
    "_rewind_weights_keeps_shapes": (
        ["prune.pattern=channel", "prune.sparsity=null", "prune.macs=0.5", "recover.rewind=weights"],
        "only rewind 'lr' applies",
    ),
    "_rewind_replays_its_schedule": (
        ["recover.rewind=lr", "recover.lr_schedule=constant"],
        "'constant' would be ignored",
    ),
    "_bn_scale_scores_channels": (["prune.criterion=bn_scale"], "needs pattern 'channel'"),
    "_calibrated_masks": (["prune.calibration={batches: 4}"], "criterion 'magnitude' takes none"),
    "_gradual_rises": (["schedule.name=gradual", "schedule.initial=0.95"], "must be below the target"),
    "_clamps_bound_a_plan": (["prune.clamps={'0.*': [0, 0.5]}"], "give prune.allocation"),
    "_latency_in_one_shot": (
        ["prune.pattern=channel", "prune.sparsity=null", "prune.latency=0.8", "schedule.name=iterative"],
        "met in one shot",
    ),
    "_transfer": (["recover.method=transfer", "recover.distill=true"], "does not apply to method 'transfer'"),
    "_share_once": (["schedule.name=gradual", "recover.method=share"], "clusters the surviving weights once"),
    "_within_needs_a_baseline": (["model.train=null", "recover.stop_when={within: 1}"], "untrained network"),
    "_ignored_keys": (["recover.max_lr=0.01"], "recover.max_lr is given but applies only"),
    "_rewind_point_inside": (["recover.rewind=lr", "recover.rewind_epoch=500"], "is not inside the original"),
    "_accelerate_needs_2_4_on_cuda": (["accelerate.enabled=true"], "has no 2:4 weights"),
    "_transfer_is_not_compiled": (["recover.method=transfer", "recover.compile=true"], "does not apply to method"),
    "_transfer_is_not_distill": ([f"model.train.data={NEW_TASK}", "recover.method=distill"], "cannot teach it"),
    "_rewind_weights_has_weights": (["model.train=null", "recover.rewind=weights"], "needs the weights at the rewind"),
}


def test_every_refused_combination_is_refused_when_the_recipe_is_read():
    """Each rule of regrow.config.checks fires on its example, before anything is built (load_config only)."""
    from regrow.config import RunConfig
    from regrow.config.checks import RULES

    assert sorted(r.check.__name__ for r in RULES) == sorted(RULE_EXAMPLES)
    for name, (overrides, message) in RULE_EXAMPLES.items():
        with pytest.raises(RegrowError, match=re.escape(message)):
            load_config("demo", overrides)
        cfg = RunConfig.model_validate(apply_overrides(read_recipe("demo")[0], overrides))  # the rules not applied
        first = next(r for r in RULES if list(r.check(cfg)))
        assert first.check.__name__ == name


def test_a_valid_recipe_passes_every_rule():
    from regrow.config.checks import RULES

    cfg, _ = load_config("demo")

    assert all(list(r.check(cfg)) == [] for r in RULES)


def test_acceleration_is_refused_on_the_cpu_with_the_reason():
    overrides = ["accelerate.enabled=true", "prune.pattern=2:4", "prune.sparsity=null", "device=cpu"]
    message = "needs a CUDA device .recipe device: 'cpu'.. regrow.accelerate needs an NVIDIA"
    with pytest.raises(RegrowError, match=message):
        load_config("demo", overrides)
