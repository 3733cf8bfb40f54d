"""Sensitivity analysis, allocation, strategy auto and BatchNorm recalibration."""

import json
import math

import pytest
import torch
from torch import nn

import regrow
from conftest import TinyMLP, make_batches
from regrow.allocation import Allocation, allocate, clamps_from, scaled, sensitivity_allocation, uniform_allocation
from regrow.errors import RegrowError
from regrow.measure.sensitivity import SensitivityResult, UnitCurve
from regrow.strategy import Facts, decide
from regrow.structural.batchnorm import recalibrate_batchnorm
from zoo import ResidualCNN, images


def trained_mlp():
    torch.manual_seed(0)
    model = TinyMLP()
    regrow.recover(
        model,
        regrow.MaskSet({}),
        make_batches(10),
        make_batches(3, seed=1),
        method="finetune",
        epochs=8,
        lr=0.01,
        patience=None,
        progress=False,
    )
    return model


def synthetic(levels=(0.5, 0.9)):
    """Two targets of 100 weights: `fragile` loses a lot when pruned, `robust` almost nothing."""
    return SensitivityResult(
        "unstructured",
        "magnitude",
        list(levels),
        1.0,
        0.9,
        100,
        [
            UnitCurve("fragile", "target", 100, [2.0, 4.0], [0.5, 0.2], [50, 90], [0, 0]),
            UnitCurve("robust", "target", 100, [1.01, 1.05], [0.9, 0.89], [50, 90], [0, 0]),
        ],
        total_params=200,
    )


def test_sensitivity_of_targets_leaves_the_model_unchanged():
    model = trained_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = regrow.sensitivity(model, make_batches(3, seed=1), levels=[0.5, 0.9], batches=2, progress=False)
    assert [c.name for c in result.curves] == ["fc1.weight", "fc2.weight"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for c in result.curves:
        assert len(c.loss) == len(c.accuracy) == 2
        assert c.params_removed == [c.size // 2, math.ceil(0.9 * c.size)]
    assert result.samples == 32


def test_sensitivity_of_coupled_groups(tmp_path):
    torch.manual_seed(0)
    model = ResidualCNN().eval()
    data = [(images(8), torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(i))) for i in range(3)]
    result = regrow.sensitivity(model, data, pattern="channel", levels=[0.5], batches=2, progress=False)
    names = [c.name for c in result.curves]
    assert "stem.0" in names and all(c.kind == "group" for c in result.curves)
    assert all(c.macs_removed[0] > 0 and c.params_removed[0] > 0 for c in result.curves)
    assert isinstance(model.c1, nn.Conv2d) and model.c1.out_channels == 8  # the model itself is untouched
    result.save(tmp_path / "s.json")
    assert SensitivityResult.load(tmp_path / "s.json").to_dict() == result.to_dict()
    assert result.plot(tmp_path / "s.png").stat().st_size > 0


def test_sensitivity_rejects_bad_levels():
    with pytest.raises(RegrowError, match=r"levels must be numbers in \(0, 1\)"):
        regrow.sensitivity(TinyMLP(), make_batches(2), levels=[0.5, 1.0])


def test_sensitivity_allocation_puts_sparsity_where_it_costs_least():
    per = sensitivity_allocation(synthetic(), "sparsity", 0.5, max_sparsity=0.9)
    assert per["robust"] == pytest.approx(0.9) and per["fragile"] < per["robust"]
    removed = 100 * per["robust"] + 100 * per["fragile"]
    assert removed >= 100  # half of the 200 weights
    uni = uniform_allocation(synthetic(), "sparsity", 0.5)
    assert uni["fragile"] == uni["robust"] == pytest.approx(0.5, abs=1e-3)


def test_clamps_bound_the_allocation():
    clamps = clamps_from({"rob*": [0.0, 0.6]}, ["fragile", "robust"])
    per = sensitivity_allocation(synthetic(), "sparsity", 0.5, max_sparsity=0.9, clamps=clamps)
    assert per["robust"] <= 0.6 + 1e-9 and per["fragile"] >= 0.4 - 1e-9
    with pytest.raises(RegrowError, match="matches no target"):
        clamps_from({"nope": [0, 1]}, ["fragile"])
    uni = uniform_allocation(synthetic(), "sparsity", 0.5, clamps=clamps_from({"rob*": [0.0, 0.4]}, ["robust"]))
    assert uni["robust"] == pytest.approx(0.4) and uni["fragile"] == pytest.approx(0.6, abs=1e-3)
    with pytest.raises(RegrowError, match="cannot be met"):
        uniform_allocation(synthetic(), "sparsity", 0.8, clamps=clamps_from({"*": [0.0, 0.6]}, ["fragile", "robust"]))


def test_search_candidates_meet_the_budget_within_their_clamps():
    clamps = clamps_from({"rob*": [0.0, 0.7]}, ["fragile", "robust"])
    seen = []

    def score(candidate):
        seen.append(dict(candidate))
        return candidate["fragile"]  # any deterministic score

    allocate("search", synthetic(), "sparsity", 0.5, score=score, candidates=10, max_sparsity=0.9, clamps=clamps)
    assert len(seen) == 10
    for c in seen:  # 100 weights each: the mean sparsity is the budget, the clamp holds
        assert (c["fragile"] + c["robust"]) / 2 == pytest.approx(0.5, abs=2e-3)
        assert c["robust"] <= 0.7 + 1e-9
    with pytest.raises(RegrowError, match=r"cannot be met with every target at most 30%"):
        sensitivity_allocation(synthetic(), "sparsity", 0.5, max_sparsity=0.3)


def test_search_keeps_the_best_scored_candidate():
    calls = []

    def score(candidate):  # prefers sparsity in "robust"
        calls.append(candidate)
        return candidate["fragile"] - candidate["robust"]

    plan = allocate("search", synthetic(), "sparsity", 0.5, score=score, candidates=10)
    assert len(calls) == 10
    best = min(calls, key=lambda c: c["fragile"] - c["robust"])
    assert plan.per_target == {k: round(v, 4) for k, v in best.items()}
    assert "scored 10 candidates" in plan.notes[0]


def test_allocation_file_round_trip_and_errors(tmp_path):
    plan = allocate("sensitivity", synthetic(), "sparsity", 0.5)
    plan.save(tmp_path / "allocation.json")
    assert Allocation.load(tmp_path / "allocation.json") == plan
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(RegrowError, match="not a regrow allocation file"):
        Allocation.load(tmp_path / "other.json")
    with pytest.raises(RegrowError, match="unknown allocation 'random'"):
        allocate("random", synthetic(), "sparsity", 0.5)
    with pytest.raises(RegrowError, match="0 <= min_sparsity <= max_sparsity < 1; got min 0.6, max 0.4"):
        allocate("uniform", synthetic(), "sparsity", 0.5, min_sparsity=0.6, max_sparsity=0.4)


def test_scaled_meets_the_budget_exactly():
    per = scaled({"a": 1.0, "b": 0.5}, {"a": 300, "b": 100}, 0.6)
    assert (per["a"] * 300 + per["b"] * 100) / 400 == pytest.approx(0.6, abs=1e-6)
    assert per["a"] == pytest.approx(2 * per["b"])


def test_an_allocation_that_cannot_reach_the_budget_or_is_not_shares_is_refused(tmp_path):
    sizes = {"a": 300, "b": 100}
    with pytest.raises(RegrowError, match=r"only b carry a share, and at most 0.99 of each removes 0.247"):
        scaled({"a": 0.0, "b": 1.0}, sizes, 0.9)
    with pytest.raises(RegrowError, match="every target's share is 0"):
        scaled({"a": 0.0, "b": 0.0}, sizes, 0.5)
    with pytest.raises(RegrowError, match=r"at most 0.8 of each removes 0.8 .* raise the cap"):
        scaled({"a": 1.0, "b": 1.0}, sizes, 0.9, cap=0.8)
    per = scaled({"a": 0.1, "b": 1.0}, sizes, 0.5, cap=0.92)  # the cap binds b; a takes the rest
    assert per["b"] == 0.92 and (per["a"] * 300 + per["b"] * 100) / 400 == pytest.approx(0.5, abs=1e-6)
    for tiny in (1e-17, 1e-19, 5e-324):  # a share near zero still lets the others meet the budget exactly
        per = scaled({"a": 1.0, "b": tiny}, {"a": 100, "b": 100}, 0.3)
        assert (per["a"] + per["b"]) / 2 == pytest.approx(0.3, abs=1e-12)
    for bad in ({"a": -0.5}, {"a": float("nan")}, {"a": "0.5"}, {"a": True}):
        with pytest.raises(RegrowError, match="sparsities in \\[0, 1\\]; these are not"):
            scaled(bad, sizes, 0.5)
    model = trained_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RegrowError, match="cannot reach sparsity 0.9"):
        regrow.prune(model, 0.9, allocation={"fc2.weight": 1.0})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    shares = {"fc1.weight": 1.0, "fc2.weight": 0.1}
    with pytest.raises(RegrowError, match="at most 0.5 of each"):
        regrow.prune(model, 0.6, allocation=shares, max_sparsity=0.5)  # the cap is the one given
    masks = regrow.prune(model, 0.5, allocation=shares, max_sparsity=0.55)
    assert max(masks.per_target().values()) <= 0.55 + 1 / 128  # within one weight of the cap (rounding up)
    plan = allocate("sensitivity", synthetic(), "sparsity", 0.5)
    plan.per_target = {name: "high" for name in plan.per_target}
    plan.save(tmp_path / "bad.json")
    with pytest.raises(RegrowError, match="allocation file .* must map target names to sparsities"):
        Allocation.load(tmp_path / "bad.json")


def test_prune_with_an_allocation_gives_each_target_its_share():
    model = trained_mlp()
    masks = regrow.prune(model, 0.5, allocation={"fc1.weight": 1.0, "fc2.weight": 0.25})
    per = masks.per_target()
    n1, n2 = model.fc1.weight.numel(), model.fc2.weight.numel()
    assert (per["fc1.weight"] * n1 + per["fc2.weight"] * n2) / (n1 + n2) == pytest.approx(0.5, abs=0.01)
    assert per["fc1.weight"] == pytest.approx(4 * per["fc2.weight"], rel=0.05)
    with pytest.raises(RegrowError, match="not targets"):
        regrow.prune(trained_mlp(), 0.5, allocation={"head.weight": 1.0})


def test_structural_allocation_shapes_the_cut_and_meets_the_budget():
    torch.manual_seed(0)
    model = ResidualCNN().eval()
    report = regrow.prune(
        model, pattern="channel", macs=0.6, example_inputs=images(), allocation={"c1": 1.0, "stem.0": 0.0}
    ).structure
    groups = {g["name"]: g for g in report.groups}
    assert groups["stem.0"]["units_after"] == groups["stem.0"]["units_before"]  # allocation 0: untouched
    assert groups["c1"]["units_after"] < groups["c1"]["units_before"]
    assert report.macs_ratio == pytest.approx(0.6, rel=0.1)
    with pytest.raises(RegrowError, match="allocation names groups the model does not have"):
        regrow.prune(
            ResidualCNN().eval(), pattern="channel", macs=0.6, example_inputs=images(), allocation={"nope": 1.0}
        )


def test_latency_budget_uses_measured_latency(macs_as_latency):
    report = regrow.prune(ResidualCNN().eval(), pattern="channel", latency=0.6, example_inputs=images()).structure
    assert report.budget == {"latency": 0.6}
    assert report.macs_ratio == pytest.approx(0.6, rel=0.05)


def test_batchnorm_recalibration_reestimates_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    x = torch.randn(64, 4) * 3 + 1
    used = recalibrate_batchnorm(model, [(x[:32], torch.zeros(32)), (x[32:], torch.zeros(32))])
    assert used == 2
    h = model[0](x).detach()
    torch.testing.assert_close(model[1].running_mean, h.mean(0), rtol=1e-4, atol=1e-5)
    assert not model.training and model[1].momentum == 0.1


# --- strategy auto -------------------------------------------------------------------------------


def facts(**kw):
    base = {
        "params": 100000,
        "macs": 10**6,
        "layers": {"conv": 2, "linear": 2, "attention": 0, "norm": 0},
        "train_samples": 1400,
        "image_inputs": True,
        "budget": {"sparsity": 0.95},
    }
    return Facts(**{**base, **kw})


def test_strategy_for_a_high_sparsity_budget_on_small_image_data():
    strategy = decide(facts(steps_per_epoch=250), given={})
    chosen = strategy.settings()
    assert chosen["prune.pattern"] == "unstructured" and chosen["schedule.name"] == "gradual"
    assert chosen["recover.method"] == "distill" and chosen["recover.augment"] == "none"
    assert "recover.label_smoothing" not in chosen  # the teacher's soft targets already regularize
    assert chosen["recover.epochs"] == 10
    reasons = {d.key: d.line() for d in strategy.decisions}
    assert "0.95 is at least 0.8" in reasons["schedule.name"] and "2500 steps" in reasons["schedule.name"]
    assert "only 1400 samples" in reasons["recover.method"]


def test_strategy_keeps_one_shot_when_recovery_is_too_short_to_ramp():
    strategy = decide(facts(steps_per_epoch=11, teacher=False), given={})
    chosen = strategy.settings()
    assert chosen["schedule.name"] == "one_shot" and chosen["recover.method"] == "finetune"
    assert chosen["recover.label_smoothing"] == 0.1  # small data and no teacher
    reasons = {d.key: d.line() for d in strategy.decisions}
    assert "only 110 optimizer steps" in reasons["schedule.name"]


def test_strategy_for_a_macs_budget_and_given_keys():
    strategy = decide(
        facts(budget={"macs": 0.35}, train_samples=50000, image_inputs=False), given={"recover.epochs": 3}
    )
    chosen = strategy.settings()
    assert chosen["prune.pattern"] == "channel" and chosen["prune.allocation"] == "sensitivity"
    assert "recover.epochs" not in chosen and chosen["recover.augment"] == "none"
    assert any(d.given and d.key == "recover.epochs" and d.value == 3 for d in strategy.decisions)


def test_strategy_shifts_larger_images_when_distilling():
    big = decide(facts(image_side=28, train_samples=55000, steps_per_epoch=430), given={})
    assert big.settings()["recover.augment"] == "shift"
    assert (
        "sparsity 0.95, images of 28 pixels a side and a teacher"
        in {d.key: d.line() for d in big.decisions}["recover.augment"]
    )
    assert decide(facts(image_side=8), given={}).settings()["recover.augment"] == "none"  # the digits
    assert decide(facts(image_side=28, teacher=False), given={}).settings()["recover.augment"] == "none"
    low = facts(image_side=28, budget={"sparsity": 0.5})
    assert decide(low, given={}).settings()["recover.augment"] == "none"
    assert decide(facts(image_side=28, image_inputs=False), given={}).settings()["recover.augment"] == "none"
    stated = decide(facts(image_side=28), given={"recover.augment": "noise"})
    assert "recover.augment" not in stated.settings()  # what the recipe states is kept


def test_strategy_fits_the_time_allowed():
    strategy = decide(facts(seconds=10.0, step_seconds=0.1, steps_per_epoch=20), given={})
    assert strategy.settings()["recover.epochs"] == 3  # 2.6 s per epoch with validation and teacher


def test_auto_strategy_in_a_run_explains_itself(tmp_path):
    recipe = tmp_path / "only_budget.yaml"
    recipe.write_text(
        "name: auto\nmodel: {name: digits_cnn, kwargs: {width: 8}, train: {epochs: 2}}\n"
        "data: {name: digits}\nprune: {sparsity: 0.85}\nevaluate: {latency: false}\n"
    )
    report = regrow.run(recipe, overrides=["recover.epochs=2"], out_dir=tmp_path / "out", progress=False)
    decisions = {d["key"]: d for d in report.prune["strategy"]["decisions"]}
    assert decisions["schedule.name"]["value"] == "one_shot"  # 2 epochs of digits: too few steps to ramp
    assert decisions["recover.epochs"]["given"]  # --set recover.epochs counts as stated, and auto stays on
    assert report.config["strategy"] == "auto"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Strategy (auto)" in md and "Why accuracy dropped" in md
    assert "image inputs (8 pixels on the shorter side)" in md  # the digits: too small to shift
    assert (tmp_path / "out" / "sensitivity.json").is_file()
    saved = (tmp_path / "out" / "config.yaml").read_text()
    assert "augment: none" in saved and "method: distill" in saved  # the config as decided


def test_run_with_sensitivity_allocation_writes_a_reusable_file(tmp_path):
    common = ["model.train.epochs=2", "recover.epochs=1", "evaluate.latency=false"]
    first = regrow.run(
        "demo", overrides=[*common, "prune.allocation=sensitivity"], out_dir=tmp_path / "a", progress=False
    )
    plan = json.loads((tmp_path / "a" / "allocation.json").read_text())
    assert plan["method"] == "sensitivity" and set(plan["per_target"]) == {"0.weight", "2.weight", "6.weight"}
    assert first.snapshots["pruned"].target_sparsity == pytest.approx(0.9, abs=2e-3)
    second = regrow.run(
        "demo",
        overrides=[*common, f"prune.allocation_file={tmp_path / 'a' / 'allocation.json'}"],
        out_dir=tmp_path / "b",
        progress=False,
    )
    assert second.snapshots["pruned"].per_target_sparsity == first.snapshots["pruned"].per_target_sparsity


def test_structural_allocation_file_with_unknown_groups_is_refused_before_training(tmp_path, monkeypatch):
    import regrow.pipeline.baseline

    plan = {"format": "regrow.allocation", "method": "sensitivity", "pattern": "channel", "budget": {"macs": 0.5}}
    (tmp_path / "allocation.json").write_text(json.dumps({**plan, "per_target": {"0": 0.5, "nope": 0.5}, "notes": []}))

    def no_training(*args, **kwargs):
        raise AssertionError("the baseline was trained before the allocation file was checked")

    monkeypatch.setattr(regrow.pipeline.baseline, "train_baseline", no_training)
    overrides = [
        "prune.pattern=channel",
        "prune.sparsity=null",
        "prune.macs=0.5",
        f"prune.allocation_file={tmp_path / 'allocation.json'}",
    ]
    with pytest.raises(
        RegrowError, match=r"names groups this model does not have: \['nope'\]; its groups are: 6, 2, 0\."
    ):
        regrow.run("demo", overrides=overrides, out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_sensitivity_command(tmp_path, capsys):
    from regrow.cli import main

    code = main(
        [
            "sensitivity",
            "demo",
            "--set",
            "model.train.epochs=1",
            "--set",
            "sensitivity.batches=1",
            "--out",
            str(tmp_path / "s"),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "loss at 0.25" in out
    assert {p.name for p in (tmp_path / "s").iterdir()} == {"sensitivity.json", "sensitivity.png", "sensitivity.md"}


def test_auto_strategy_measures_without_changing_the_training_order():
    from regrow.config import validate
    from regrow.data import DATASETS
    from regrow.models import MODELS
    from regrow.pipeline.plan import auto_strategy as _auto_strategy

    cfg = validate({"model": {"name": "digits_cnn"}, "data": {"name": "digits"}, "prune": {"sparsity": 0.9}})
    train = DATASETS.get("digits")().train
    before = train.generator.get_state()
    first = [b[1] for b in train]
    train.generator.set_state(before)
    _auto_strategy(cfg, MODELS.get("digits_cnn")(), train, True, "cpu")
    assert torch.equal(train.generator.get_state(), before)
    assert all(torch.equal(a, b[1]) for a, b in zip(first, train, strict=True))  # the same batch order


def test_strategy_plans_no_allocation_for_an_n_m_pattern():
    strategy = decide(facts(steps_per_epoch=250), given={"prune.pattern": "2:4"})
    keys = [d.key for d in strategy.decisions]
    assert "prune.pattern" in keys and "prune.allocation" not in keys
    assert strategy.settings()["schedule.name"] == "one_shot"  # n:m fixes the sparsity: no ramp either
