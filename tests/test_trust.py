"""Trust boundaries: a recipe is code (and says so); arch.json is data, checked against a schema; the recipe's
folder and the working directory never shadow the standard library or installed packages."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import regrow
from regrow.components import import_factory
from regrow.errors import RegrowError

ROOT = Path(__file__).parents[1]


# ------------------------------------------------------------------------------------------------ arch.json


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        self.norm = nn.LayerNorm(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.body(x))


built = []


def factory() -> Net:
    built.append(1)
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def saved(tmp_path):
    regrow.save(factory(), tmp_path)
    return tmp_path


def edit(folder, change):
    path = folder / "arch.json"
    arch = json.loads(path.read_text())
    change(arch)
    path.write_text(json.dumps(arch))


def refused(folder, match):
    built.clear()
    with pytest.raises(RegrowError, match=match) as info:
        regrow.load(folder, factory)
    message = str(info.value)
    assert "\n" not in message and len(message) < 800
    return message


def test_a_saved_model_loads(saved):
    again = regrow.load(saved, factory)
    x = torch.randn(2, 4)
    assert torch.equal(again(x), factory()(x))


@pytest.mark.parametrize(
    "attr", ["_modules", "_parameters", "_buffers", "__dict__", "__class__", "forward", "training"]
)
def test_arch_json_may_not_set_private_or_behaviour_attributes(saved, attr):
    edit(saved, lambda a: a["modules"]["body.0"]["attrs"].__setitem__(attr, 1))
    message = refused(saved, rf"module 'body.0': attribute '{attr}' may not be set")
    assert "names starting with '_'" in message
    assert built == []  # refused before the factory ran


@pytest.mark.parametrize("value", [{"__class__": "os.system"}, {"a": 1}, [[1]], {"__set__": [1.5]}])
def test_arch_json_attribute_values_are_plain_data(saved, value):
    edit(saved, lambda a: a["modules"]["body.0"]["attrs"].__setitem__("in_features", value))
    refused(saved, r"module 'body.0': attribute 'in_features' is .*allowed values: numbers")


@pytest.mark.parametrize("attr", ["config", "in_features"])
def test_a_layers_own_head_counts_stand_only_in_front_of_a_config_it_holds(saved, attr):
    # written for a Phi-3 layer that lost heads (tests/test_transformer_heads.py); a Linear holds no config
    edit(saved, lambda a: a["modules"]["body.0"]["attrs"].__setitem__(attr, {"__layer_config__": {"num_heads": 2}}))
    refused(
        saved,
        rf"module 'body.0': attribute '{attr}' records a layer's own head counts, but the factory's Linear holds no",
    )
    edit(saved, lambda a: a["modules"]["body.0"]["attrs"].__setitem__("config", {"__layer_config__": {"n": "x"}}))
    refused(saved, r"attribute 'config' is .*\{'__layer_config__': \{name: integer\}\}")


class Configured(nn.Module):
    """A layer that reads its head count from a config all layers share."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config, self.proj = config, nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x)[..., : self.config.num_attention_heads]


@pytest.mark.parametrize(
    "own, match",
    [
        ({"num_attention_heads": 0}, r"num_attention_heads = 0, outside 1..4 \(a layer only loses heads\)"),
        ({"num_attention_heads": 5}, r"num_attention_heads = 5, outside 1..4"),
        ({"vocab_size": 8}, r"'vocab_size' is no head count the factory's config holds \(allowed: num_heads, "),
        ({"num_key_value_heads": 1}, r"'num_key_value_heads' is no head count the factory's config holds"),
    ],
)
def test_a_layers_own_head_counts_are_head_counts_the_config_holds_and_only_fewer(tmp_path, own, match):
    def build():
        shared = types.SimpleNamespace(num_attention_heads=4, vocab_size=64)
        return nn.ModuleList([Configured(shared), Configured(shared)])

    regrow.save(build(), tmp_path)
    edit(tmp_path, lambda a: a["modules"]["0"]["attrs"].__setitem__("config", {"__layer_config__": own}))
    with pytest.raises(
        RegrowError, match=rf"module '0': attribute 'config' records a layer's own head counts, but {match}"
    ):
        regrow.load(tmp_path, build)
    edit(
        tmp_path,
        lambda a: a["modules"]["0"]["attrs"].__setitem__("config", {"__layer_config__": {"num_attention_heads": 2}}),
    )
    loaded = regrow.load(tmp_path, build)  # in range: the first layer reads 2, the second the shared 4
    assert [layer(torch.ones(1, 4)).shape[-1] for layer in loaded] == [2, 4]


def test_arch_json_sets_only_attributes_the_module_already_holds(saved):
    edit(saved, lambda a: a["modules"]["body.0"]["attrs"].__setitem__("extra_repr", "x"))  # a method
    message = refused(
        saved, r"module 'body.0': attribute 'extra_repr' is not a plain attribute of the factory's Linear"
    )
    assert "allowed: in_features, out_features" in message
    regrow.save(factory(), saved, overwrite=True)
    edit(saved, lambda a: a["modules"]["norm"]["attrs"].__setitem__("anything_new", 3))
    refused(saved, r"module 'norm': attribute 'anything_new' is not a plain attribute")


@pytest.mark.parametrize("cls", ["os.system", "builtins.eval", "torch.nn.modules.conv.Conv2d"])
def test_arch_json_classes_are_those_of_the_factorys_model(saved, cls):
    edit(saved, lambda a: a["modules"]["body.0"].__setitem__("class", cls))
    refused(
        saved, rf"module 'body.0': its class is '{cls}', but the factory's model has torch.nn.modules.linear.Linear"
    )


@pytest.mark.parametrize("dtype", ["float99", "object", "torch.float32", "finfo"])
def test_arch_json_dtypes_come_from_a_list(saved, dtype):
    edit(saved, lambda a: a["modules"]["body.0"]["parameters"]["weight"].__setitem__(1, dtype))
    refused(saved, rf"module 'body.0': parameter 'weight' has dtype '{dtype}'; allowed dtypes: float64")
    assert built == []


@pytest.mark.parametrize("shape", [[-1, 4], [2**41], "8x4", [1] * 17, [True, 4]])
def test_arch_json_shapes_are_small_lists_of_non_negative_ints(saved, shape):
    edit(saved, lambda a: a["modules"]["body.0"]["parameters"]["weight"].__setitem__(0, shape))
    refused(saved, r"module 'body.0': parameter 'weight' must be \[shape, dtype\]")


@pytest.mark.parametrize("depth", [100, 200_000])
def test_deeply_nested_arch_json_is_refused_without_recursion_error(saved, depth):
    edit(saved, lambda a: a["modules"]["body.0"]["attrs"].__setitem__("in_features", "NESTED"))
    text = (saved / "arch.json").read_text()
    (saved / "arch.json").write_text(text.replace('"NESTED"', "[" * depth + "]" * depth))
    refused(saved, "nested more than 64 levels deep")


def test_arch_json_unknown_keys_and_shapes_are_refused(saved):
    edit(saved, lambda a: a.__setitem__("hooks", ["os:system"]))
    refused(saved, "must hold exactly 'format', 'version' and 'modules'")
    edit(saved, lambda a: a.pop("hooks") and None)
    edit(saved, lambda a: a["modules"]["body.0"].__setitem__("code", "print(1)"))
    refused(saved, r"module 'body.0': unknown key\(s\) \['code'\]; allowed keys: class, attrs")
    (saved / "arch.json").write_text(json.dumps({"format": "regrow.arch", "version": 1, "modules": {"": []}}))
    refused(saved, "module '': each module must be an object with a 'class' string")


def test_arch_json_larger_than_the_limit_is_refused(saved, monkeypatch):
    monkeypatch.setattr("regrow.structural.arch.MAX_BYTES", 100)
    refused(saved, "larger than")


# -------------------------------------------------------------------------------------------- import path


FACTORIES = """
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))

def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    batches = [(x[i:i + 40], y[i:i + 40]) for i in range(0, 400, 40)]
    return {"train": batches[:8], "test": batches[8:]}
"""


def trap(path, marker):
    """A module that, if it is ever imported, leaves a marker and breaks the import."""
    path.write_text(f"open({str(marker)!r}, 'w').write('imported')\nraise ImportError('shadowed {path.name}')\n")


def trapped_folders(tmp_path):
    """A working directory with a trapped colorsys.py and a recipe folder with a trapped matplotlib.py beside
    the factories module; the markers they would leave are tmp_path / "colorsys-ran" and "matplotlib-ran"."""
    work, recipes = tmp_path / "work", tmp_path / "recipes"
    work.mkdir()
    recipes.mkdir()
    trap(work / "colorsys.py", tmp_path / "colorsys-ran")
    trap(recipes / "matplotlib.py", tmp_path / "matplotlib-ran")
    (recipes / "trust_factories.py").write_text(FACTORIES)
    return work, recipes


def test_the_recipe_folder_and_working_directory_come_after_the_standard_library_and_packages(tmp_path, monkeypatch):
    work, recipes = trapped_folders(tmp_path)
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", list(sys.path))
    fn = import_factory("trust_factories:build", "model", [recipes])
    assert isinstance(fn(), nn.Module)  # the recipe's own module is found
    stdlib, packages = str(Path(os.__file__).parent), str(Path(torch.__file__).parents[1])
    assert sys.path.index(str(recipes)) > max(sys.path.index(stdlib), sys.path.index(packages))
    assert sys.path.index(str(work)) > max(sys.path.index(stdlib), sys.path.index(packages))
    assert Path(importlib.util.find_spec("colorsys").origin).parent != work
    assert Path(importlib.util.find_spec("matplotlib").origin).parent.parent != recipes
    assert not (tmp_path / "colorsys-ran").exists() and not (tmp_path / "matplotlib-ran").exists()


def test_a_factory_module_named_like_a_standard_module_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "colorsys.py").write_text("def build():\n    return None\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(RegrowError, match=r"module 'colorsys' has no function 'build'.*standard library.*Rename"):
        import_factory("colorsys:build", "model", [tmp_path])


def _regrow_command():
    script = Path(sys.executable).with_name("regrow")
    # the installed command puts its own folder first, not the working directory; else: python -P -m
    return [str(script)] if script.is_file() else [sys.executable, "-P", "-m", "regrow.cli"]


@pytest.mark.skipif(shutil.which("true") is None, reason="POSIX")
def test_a_whole_run_never_executes_files_that_shadow_the_standard_library_or_packages(tmp_path):
    """The issue's two cases: colorsys.py in the working directory (imported by matplotlib when the curve is
    drawn, after training) and matplotlib.py beside the recipe."""
    work, recipes = trapped_folders(tmp_path)
    (recipes / "recipe.yaml").write_text(
        textwrap.dedent("""
        name: trusted
        model: {factory: "trust_factories:build", train: {epochs: 1}}
        data: {factory: "trust_factories:data"}
        prune: {sparsity: 0.5, scope: layer}
        recover: {method: finetune, epochs: 1}
        evaluate: {latency: false}
        """)
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [*_regrow_command(), "-q", "run", str(recipes / "recipe.yaml"), "--out", "out", "--no-progress"]
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (work / "out" / "curve.png").is_file() and (work / "out" / "report.json").is_file()
    assert not (tmp_path / "colorsys-ran").exists() and not (tmp_path / "matplotlib-ran").exists()


# ----------------------------------------------------------------------------------------------- the docs


def test_the_docs_say_that_a_recipe_runs_code():
    readme = (ROOT / "README.md").read_text()
    trust = readme[readme.index("### Trust") :]
    trust = trust[: trust.index("\n## ")]
    for phrase in ("trusted like a Python script", "--set model.factory", "config.yaml", "arch.json", "pickle"):
        assert phrase in trust, phrase
    recipes = (ROOT / "docs" / "recipes.md").read_text()
    assert "A recipe runs code" in recipes and "trusted like a Python script" in recipes
