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
    from regrow.pipeline import _with_found_files

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
