"""Whole runs on small budgets: artifacts, report contents, exact reload, every shipped recipe."""

import json
import logging
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import regrow
from regrow.config import builtin_recipes
from regrow.data.fashion_mnist import available as fashion_mnist_available
from regrow.models import MODELS

FAST = ["evaluate.repeats=2", "evaluate.warmup=1", "sensitivity.batches=1"]  # the fewest timings, one batch a curve


def test_demo_pipeline_on_a_reduced_budget(tmp_path):
    out = tmp_path / "demo"
    report = regrow.run(
        "demo", overrides=["model.train.epochs=4", "recover.epochs=3", *FAST], out_dir=out, progress=False
    )
    for name in ("report.json", "report.md", "config.yaml", "model.safetensors", "masks.safetensors", "curve.png"):
        assert (out / name).is_file(), name

    # sparsity over the targets, recomputed from model.safetensors alone
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        targets = json.loads(fh.metadata()["regrow.targets"])
    weights = load_file(str(out / "model.safetensors"))
    zeros = sum(int((weights[t] == 0).sum()) for t in targets)
    total = sum(weights[t].numel() for t in targets)
    assert zeros / total >= 0.90
    assert targets == ["0.weight", "2.weight", "6.weight"]

    data = json.loads((out / "report.json").read_text())
    assert set(data["snapshots"]) == {"baseline", "pruned", "recovered"}
    assert data["config"]["prune"]["sparsity"] == 0.9
    assert data["environment"]["torch"] == torch.__version__
    assert [h["epoch"] for h in data["recovery"]["history"]] == [0, 1, 2, 3]
    assert set(data["timings"]) >= {"load", "train_baseline", "prune", "recover", "export"}
    assert data["snapshots"]["recovered"]["per_target_sparsity"].keys() == set(targets)
    assert data["export"]["reload_check"]["matches"] is True
    assert data["summary"]["drop"] == pytest.approx(report.drop)

    # reloading the exported weights reproduces the recovered accuracy exactly
    model = MODELS.get("digits_cnn")(**report.config["model"]["kwargs"])
    regrow.load_weights(model, out / "model.safetensors")
    test = regrow.data.DATASETS.get("digits")().test
    snap = regrow.evaluate(model, test, targets=targets, latency=False)
    assert snap.accuracy == report.accuracy("recovered")

    md = (out / "report.md").read_text()
    assert "Unstructured zeros do not make dense kernels faster" in md
    assert "of the drop" in md or "won back all of it" in md or "Pruning cost no test accuracy" in md

    masks = regrow.MaskSet.load(out / "masks.safetensors")
    assert all(torch.equal(masks[t], weights[t] != 0) for t in targets)


def test_run_refuses_a_non_empty_out_dir_and_overwrites_on_request(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    (out / "allocation.json").write_text("{}")  # as an earlier run with an allocation would leave it
    budget = ["model.train.epochs=1", "recover.epochs=1", "evaluate.latency=false"]
    with pytest.raises(regrow.RegrowError, match="not empty"):
        regrow.run("demo", overrides=budget, out_dir=out, progress=False)
    regrow.run("demo", overrides=budget, out_dir=out, overwrite=True, progress=False)
    assert (out / "mine.txt").read_text() == "x"
    assert (out / "report.json").is_file()
    assert not (out / "allocation.json").exists()  # this run planned no allocation: nothing stale remains


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_run_that_fails_late_leaves_the_earlier_run_untouched(tmp_path, monkeypatch):
    out = tmp_path / "o"
    budget = ["model.train.epochs=1", "recover.epochs=1", "evaluate.latency=false"]
    regrow.run("demo", overrides=budget, out_dir=out, progress=False)
    (out / "mine.txt").write_text("x")
    before = _files(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C during recovery, after the baseline was trained and evaluated

    monkeypatch.setattr("regrow.pipeline.recover.recover", interrupted)
    with pytest.raises(KeyboardInterrupt):
        regrow.run("demo", overrides=budget, out_dir=out, overwrite=True, progress=False)
    # the run files are as they were; the one thing added is the hidden staging folder with the checkpoint
    (kept,) = [p for p in out.iterdir() if p.name not in before]
    assert kept.name.startswith(".regrow-partial-") and (kept / ".regrow-checkpoint" / "state.json").is_file()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p != kept} == before
    with pytest.raises(
        regrow.RegrowError, match="holds the checkpoint of an interrupted run .*continue it with `regrow run"
    ):
        regrow.run("demo", overrides=budget, out_dir=out, progress=False)
    # without checkpoints an interrupted run leaves nothing at all
    quiet = [*budget, "checkpoint.enabled=false"]
    with pytest.raises(KeyboardInterrupt):
        regrow.run("demo", overrides=quiet, out_dir=out, overwrite=True, progress=False)
    assert not kept.exists()  # --overwrite started over: the old checkpoint is gone
    assert _files(out) == before
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        regrow.run("demo", overrides=quiet, out_dir=fresh, progress=False)
    assert not fresh.exists()  # the folder this run created is gone again


def test_overwrite_never_replaces_a_file_the_run_reads(tmp_path):
    out = tmp_path / "o"
    budget = ["model.train.epochs=1", "recover.epochs=1", "evaluate.latency=false"]
    regrow.run("demo", overrides=budget, out_dir=out, progress=False)
    before = _files(out)
    again = [*budget, "model.train=null", f"model.checkpoint={out / 'model.safetensors'}"]
    with pytest.raises(regrow.RegrowError, match="model.checkpoint .* is in the output folder"):
        regrow.run("demo", overrides=again, out_dir=out, overwrite=True, progress=False)
    assert _files(out) == before


def test_a_killed_runs_staging_folder_neither_blocks_nor_survives_the_next_run(tmp_path):
    out = tmp_path / "o"
    (out / ".regrow-partial-abc123").mkdir(parents=True)  # as a run killed with SIGKILL leaves it
    (out / ".regrow-partial-abc123" / "config.yaml").write_text("half")
    budget = ["model.train.epochs=1", "recover.epochs=1", "evaluate.latency=false"]
    regrow.run("demo", overrides=budget, out_dir=out, progress=False)  # not refused as non-empty
    assert not (out / ".regrow-partial-abc123").exists()
    assert (out / "report.json").is_file() and "half" not in (out / "config.yaml").read_text()


def test_an_unreadable_rewind_checkpoint_is_refused_before_training_and_keeps_the_earlier_run(tmp_path, monkeypatch):
    out = tmp_path / "o"
    budget = ["model.train.epochs=1", "recover.epochs=1", "evaluate.latency=false"]
    regrow.run("demo", overrides=budget, out_dir=out, progress=False)
    before = _files(out)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"garbage")
    narrower = tmp_path / "narrower.safetensors"  # the demo's CNN at another width
    save_file({k: v.contiguous() for k, v in MODELS.get("digits_cnn")(width=4).state_dict().items()}, str(narrower))

    def never(*args, **kwargs):
        raise AssertionError("the baseline was trained before the rewind checkpoint was checked")

    monkeypatch.setattr("regrow.pipeline.baseline.train_baseline", never)
    for checkpoint, message in ((corrupt, "is not a readable safetensors file"), (narrower, "have other shapes")):
        weights = ["recover.rewind=weights", f"recover.rewind_checkpoint={checkpoint}"]
        with pytest.raises(regrow.RegrowError, match=message):
            regrow.run("demo", overrides=budget + weights, out_dir=out, overwrite=True, progress=False)
        assert _files(out) == before


@pytest.mark.parametrize("schedule", ["iterative", "gradual"])
def test_schedules_reach_the_final_sparsity(tmp_path, schedule):
    report = regrow.run(
        "demo",
        overrides=[
            "model.train.epochs=2",
            "recover.epochs=3",
            f"schedule.name={schedule}",
            "schedule.every=5",
            "evaluate.latency=false",
        ],
        out_dir=tmp_path / schedule,
        progress=False,
    )
    assert report.snapshots["recovered"].target_sparsity == pytest.approx(0.9, abs=1e-3)
    assert report.snapshots["pruned"].target_sparsity == pytest.approx(0.9, abs=1e-3)
    if schedule == "iterative":
        rounds = report.recovery["rounds"]
        assert [r["epochs"] for r in rounds] == [1, 1, 1]
        assert rounds[-1]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert any("prunes during recovery" in n for n in report.notes)


def test_keep_dense_false_copies_no_dense_model(tmp_path, monkeypatch):
    import regrow.pipeline.baseline as baseline

    def no_copy(model):
        raise AssertionError("prune.keep_dense: false must not copy the model")

    monkeypatch.setattr(baseline, "frozen_copy", no_copy)
    budget = ["model.train.epochs=1", "recover.epochs=1", "recover.method=finetune", "prune.keep_dense=false", *FAST]
    report = regrow.run("demo", overrides=budget, out_dir=tmp_path / "o", progress=False)
    assert report.snapshots["recovered"].target_sparsity == pytest.approx(0.9, abs=1e-3)
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_weight_averaging_set_in_a_recipe_reaches_recover_and_the_report_and_keeps_the_sparsity(tmp_path):
    out = tmp_path / "ema"
    report = regrow.run(
        "demo",
        overrides=[
            "model.train.epochs=2",
            "recover.epochs=3",
            "schedule.name=gradual",
            "schedule.every=5",
            "recover.ema=0.99",
            "evaluate.latency=false",
        ],
        out_dir=out,
        progress=False,
    )
    assert report.snapshots["recovered"].target_sparsity == pytest.approx(0.9, abs=1e-3)
    masks = regrow.MaskSet.load(out / "masks.safetensors")
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.count_nonzero(weights[f][~m]) == 0 for f, m in masks.items())
    _check_recovery_method(report, out)


def test_user_factories_next_to_the_recipe(tmp_path, monkeypatch):
    (tmp_path / "my_project.py").write_text(
        textwrap.dedent("""
        import torch
        from torch import nn

        def build(hidden=32):
            return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 3))

        def data():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(400, 4, generator=g)
            y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
            batches = [(x[i:i + 40], y[i:i + 40]) for i in range(0, 400, 40)]
            return {"train": batches[:8], "test": batches[8:]}
    """)
    )
    (tmp_path / "recipe.yaml").write_text(
        textwrap.dedent("""
        name: custom
        model: {factory: "my_project:build", kwargs: {hidden: 16}, train: {epochs: 5}}
        data: {factory: "my_project:data"}
        prune: {sparsity: 0.5, scope: layer, targets: ["0", "2"]}
        recover: {method: finetune, epochs: 2}
        evaluate: {latency: false}
    """)
    )
    report = regrow.run(tmp_path / "recipe.yaml", out_dir=tmp_path / "out", progress=False)
    assert report.snapshots["recovered"].per_target_sparsity == {"0.weight": 0.5, "2.weight": 0.5}
    assert report.export["reload_check"]["matches"]

    # A checkpoint named relative to its recipe is found from any working directory, and the saved
    # config.yaml names it absolutely, so the run can be repeated from the config alone.
    (tmp_path / "out" / "model.safetensors").rename(tmp_path / "trained.safetensors")
    recipe = (tmp_path / "recipe.yaml").read_text().replace("train: {epochs: 5}", "checkpoint: trained.safetensors")
    (tmp_path / "again.yaml").write_text(recipe)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    first = regrow.run(tmp_path / "again.yaml", out_dir=tmp_path / "a", progress=False)
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["model"]["checkpoint"] == str((tmp_path / "trained.safetensors").resolve())
    assert first.accuracy("baseline") == report.accuracy("recovered")
    # Rerun in a fresh process from a third folder, my_project importable: the checkpoint is found only
    # through its absolute path in config.yaml.
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "regrow.cli", "run", str(tmp_path / "a" / "config.yaml"), "--out", "b", "-q"]
    done = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    again = json.loads((elsewhere / "b" / "report.json").read_text())
    assert again["snapshots"]["recovered"]["accuracy"] == first.accuracy("recovered")


# Reduced budgets for every shipped recipe; the recipes themselves stay as users run them.
RECIPE_BUDGET = {
    "demo": ["model.train.epochs=2", "recover.epochs=2"],
    "python_docs_gpt": [
        "model.train.epochs=1",
        "data.kwargs.train_limit=96",
        "data.kwargs.eval_limit=64",  # the first 64 validation and test sequences: the whole parts took half the test
        "recover.epochs=1",
        "prune.calibration={batches: 2}",
        "evaluate.latency_batch_size=4",  # timed at 4 and 1 sequences, not at the loader's 32
    ],
    "digits_gradual": ["model.train.epochs=2", "recover.epochs=2"],
    "digits_2to4": ["model.train.epochs=2", "recover.epochs=2"],
    "digits_resnet_channel": ["model.train.epochs=1", "recover.epochs=2"],
    "digits_vit_heads": ["model.train.epochs=3", "recover.epochs=1"],  # 1 epoch leaves it at chance level
    "fashion_mnist_resnet_channel": [
        "model.train.epochs=2",  # fewer steps (1 epoch of 512 images, or 3) leave it at chance level
        "recover.epochs=1",
        "data.kwargs.train_limit=2048",
        "data.kwargs.val_size=256",
        "data.kwargs.test_limit=256",
        "model.kwargs.width=8",
    ],
    "digits_rewind_lr": ["model.train.epochs=3", "recover.epochs=2"],
    "digits_rewind_weights": ["model.train.epochs=2", "recover.epochs=1"],
    "digits_one_cycle": ["model.train.epochs=2", "recover.epochs=1"],
    "digits_rigl": ["model.train.epochs=2", "recover.epochs=2", "recover.dynamic.update_every=5"],
    "digits_set_scratch": ["recover.epochs=2", "recover.dynamic.update_every=5"],
    "digits_share": ["model.train.epochs=1", "recover.epochs=1", "recover.share.epochs=1"],
    "digits_stop_within": ["model.train.epochs=2", "recover.epochs=3"],
    "digits_transfer": ["model.train.epochs=2", "recover.epochs=1"],
    "digits_auto": ["model.train.epochs=2", "strategy=auto", "recover.epochs=1"],
    "digits_resnet_search": [
        "model.train.epochs=1",
        "recover.epochs=1",
        "prune.search_candidates=3",
        "sensitivity.batches=1",
    ],
    "minilm_sentences": [  # the real encoder: a few sentences, one epoch
        "data.kwargs.train_limit=64",
        "data.kwargs.eval_limit=64",
        "data.kwargs.docstrings=false",
        "recover.epochs=1",
        "evaluate.latency_batch_size=4",  # timed at 4 and 1 sentences: at the loader's 32, timing took half the test
    ],
    "fashion_mnist_lenet": [
        "model.train.epochs=1",
        "recover.epochs=3",
        "data.kwargs.train_limit=2000",
        "data.kwargs.val_size=500",
        "data.kwargs.test_limit=1000",
    ],
}


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_shipped_recipe_runs(tmp_path, name, caplog):
    if name.startswith("fashion_mnist") and not fashion_mnist_available():
        pytest.skip("Fashion-MNIST IDX files are not installed (apt-get install dataset-fashion-mnist)")
    assert name in RECIPE_BUDGET, f"add a reduced budget for the new recipe {name!r}"
    with caplog.at_level(logging.WARNING, logger="regrow"):
        report = regrow.run(name, overrides=[*RECIPE_BUDGET[name], *FAST], out_dir=tmp_path / name, progress=False)
    # a shipped recipe warns about nothing, except what latency timings measured on this machine say (too noisy,
    # or slower): with other work on the cores they describe the machine's load, not the recipe
    timing = ("too noisy", "slower than the dense one")
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and not any(t in r.getMessage() for t in timing)
    ]
    assert warned == [], warned
    cfg = report.config["prune"]
    structure = report.prune["structure"]
    if cfg["pattern"] in ("channel", "head", "channel+head"):
        assert structure["equivalence"]["passed"]
        if cfg["within"] is not None:  # the budget counts the submodule only
            assert structure["within"] == cfg["within"]
            assert structure["params_ratio"] == pytest.approx(cfg["params"], rel=0.02)
        summary = json.loads((tmp_path / name / "report.json").read_text())["summary"]
        assert summary["target_sparsity"] is None  # smaller, not sparse
        if cfg["macs"] is not None:
            baseline, recovered = report.snapshots["baseline"].macs, report.snapshots["recovered"].macs
            assert recovered / baseline == pytest.approx(cfg["macs"], rel=0.05)  # rounds compound the 2 %
            # the report describes the whole run (all rounds), not its last round
            assert structure["macs_ratio"] == pytest.approx(recovered / baseline, rel=1e-6)
            assert structure["budget"] == {"macs": cfg["macs"]}
            if report.config["schedule"]["name"] == "iterative":
                assert structure["rounds"] == report.config["schedule"]["rounds"]
                assert "In 2 rounds of shrink -> recover" in (tmp_path / name / "report.md").read_text()
                # every round rounds the groups that were wide before the first one (the device's multiple)
                for g in structure["groups"]:
                    if g["excluded"] is None and g["channels_before"] >= 32 and structure["round_to_auto"]:
                        kept = g["units_after"] * g["unit_size"]
                        assert kept % structure["round_to"] == 0, g
        else:
            assert structure["units_removed"] > 0
    else:
        expected = cfg["sparsity"] if cfg["sparsity"] is not None else 0.5
        # Read from the weights: a kept weight may also be exactly zero (e.g. regrown by SET into a dead unit)
        measured = report.snapshots["recovered"].target_sparsity
        assert expected - 1e-3 <= measured <= expected + 0.01
        masks = regrow.MaskSet.load(tmp_path / name / "masks.safetensors")  # the masks themselves: exact
        assert masks.sparsity() == pytest.approx(expected, abs=1e-3)
        weights = load_file(str(tmp_path / name / "model.safetensors"))
        assert all(torch.count_nonzero(weights[f][~m]) == 0 for f, m in masks.items())
    if name == "minilm_sentences":  # an encoder without labels: measured by its embeddings' cosine similarity
        snaps = report.snapshots
        assert {s.metric for s in snaps.values()} == {"cosine similarity"}
        assert snaps["baseline"].accuracy == pytest.approx(1.0, abs=1e-5) and snaps["pruned"].accuracy < 0.95
        assert "## Test cosine similarity" in (tmp_path / name / "report.md").read_text()
        assert report.export["hf"]["written"] is False and "attention heads" in report.export["hf"]["why"]
    if name == "python_docs_gpt":  # a language model: scored per token, reported in perplexity
        snaps = report.snapshots
        assert all(s.perplexity == pytest.approx(math.exp(s.loss)) for s in snaps.values())
        assert "## Perplexity" in (tmp_path / name / "report.md").read_text()
    assert (tmp_path / name / "arch.json").is_file()
    assert report.export["reload_check"]["matches"]
    _check_recovery_method(report, tmp_path / name)


def _check_recovery_method(report, out):
    """What each recovery option a recipe sets must leave behind in the report and the exported files."""
    r, rec = report.config["recover"], report.recovery
    details = rec.get("details") or {}
    if r["rewind"] != "none":
        assert details["rewind"]["kind"] == r["rewind"]
        original = details["rewind"]["original"]  # the baseline's real schedule: the recipe trains it
        assert original["epochs"] == report.config["model"]["train"]["epochs"]
        assert details["rewind"]["start"] == max(0.0, original["epochs"] - rec["epochs_run"])
        pace = min(1.0, (original["epochs"] - details["rewind"]["start"]) / rec["epochs_run"])
        assert details["rewind"]["pace"] == pytest.approx(pace)
        text = (out / "report.md").read_text()
        assert f"from epoch {details['rewind']['start']:g}" in text
        assert (f"replayed {1 / pace:.2f}x slower" in text) == (pace < 1)
        assert details["rewind"]["assumed"] is False and "assumed" not in text
    if r["method"] in ("rigl", "set"):
        dynamic = details["dynamic"]
        assert dynamic["regrow"] == ("gradient" if r["method"] == "rigl" else "random")
        assert dynamic["updates"] > 0 and dynamic["weights_replaced"] > 0
        weights = load_file(str(out / "model.safetensors"))
        kept_zeros = sum(
            int(((weights[f] == 0) & m).sum()) for f, m in regrow.MaskSet.load(out / "masks.safetensors").items()
        )
        assert dynamic["kept_zeros"] == kept_zeros
        assert (f"{kept_zeros} kept weights are exactly zero" in (out / "report.md").read_text()) == (kept_zeros > 0)
    if r["share"].get("after"):
        assert report.export["shared"] == "shared.safetensors" and (out / "shared.safetensors").is_file()
        assert rec["sharing"]["shared_bits"] < rec["sharing"]["sparse_bits"] < rec["sharing"]["dense_bits"]
        weights = load_file(str(out / "model.safetensors"))
        for fqn in regrow.MaskSet.load(out / "masks.safetensors"):
            assert torch.unique(weights[fqn][weights[fqn] != 0]).numel() <= r["share"]["k"]
        # the summary describes both phases: the model handed back is the sharing phase's
        assert rec["epochs_run"] == rec["history"][-1]["epoch"] == r["epochs"] + r["share"]["epochs"]
        assert rec["phases"] == {"recovery": r["epochs"], "sharing": r["share"]["epochs"]}
        text = (out / "report.md").read_text()
        assert f"then weight sharing: {rec['epochs_run']} epochs run ({r['epochs']} + {r['share']['epochs']})" in text
        assert "of weight sharing (" in rec["stop_reason"] and rec["stop_reason"] in text
        kept = {h["epoch"]: h["val_accuracy"] for h in rec["history"]}
        if rec["best_epoch"] > r["epochs"]:  # a fine-tuned epoch of the shared values: its row is the kept one
            assert rec["best_val_accuracy"] == kept[rec["best_epoch"]] and "best_note" not in rec
        else:  # the values right after clustering, which have no row of their own
            assert rec["best_epoch"] == r["epochs"] and "right after clustering" in rec["best_note"]
    if r["ema"] is not None:
        assert details["ema"] == {"decay": r["ema"]}
        assert f"average of the weights (decay {r['ema']:g})" in (out / "report.md").read_text()
    if r["stop_when"] is not None:  # the report says which condition ended recovery
        assert rec["stop_reason"].startswith(("target reached", "wall-time budget", "epoch budget", "early stopping"))
        assert rec["stop_reason"] in (out / "report.md").read_text()


def test_a_latency_budget_runs_through_the_pipeline(tmp_path, macs_as_latency):
    overrides = [
        "model.train.epochs=1",
        "recover.epochs=1",
        "schedule.name=one_shot",
        "prune.macs=null",
        "prune.latency=0.7",
        "evaluate.repeats=3",
    ]
    report = regrow.run("digits_resnet_channel", overrides=overrides, out_dir=tmp_path / "o", progress=False)
    structure = report.prune["structure"]
    assert structure["budget"] == {"latency": 0.7} and structure["macs_ratio"] == pytest.approx(0.7, rel=0.05)
    assert structure["equivalence"]["passed"] and report.export["reload_check"]["matches"]


def test_measuring_more_does_not_change_what_is_trained(tmp_path):
    budget = ["model.train.epochs=2", "recover.epochs=2", "evaluate.repeats=2"]
    a = regrow.run("demo", overrides=[*budget, "evaluate.latency=true"], out_dir=tmp_path / "a", progress=False)
    b = regrow.run("demo", overrides=[*budget, "evaluate.latency=false"], out_dir=tmp_path / "b", progress=False)
    assert a.snapshots["recovered"].loss == b.snapshots["recovered"].loss
    assert a.snapshots["recovered"].latency is not None and b.snapshots["recovered"].latency is None


def test_runs_use_deterministic_gpu_kernels_and_give_the_callers_settings_back():
    from regrow.pipeline import reproducible_kernels, run, run_sensitivity

    cudnn = torch.backends.cudnn
    seen = []

    @reproducible_kernels
    def body(fail):
        seen.append((cudnn.deterministic, cudnn.benchmark))
        if fail:
            raise regrow.RegrowError("stop")

    before = cudnn.deterministic, cudnn.benchmark
    try:
        cudnn.deterministic, cudnn.benchmark = False, True
        body(False)
        with pytest.raises(regrow.RegrowError):
            body(True)
        assert seen == [(True, False), (True, False)]
        assert (cudnn.deterministic, cudnn.benchmark) == (False, True)  # restored, also after an error
    finally:
        cudnn.deterministic, cudnn.benchmark = before
    assert run.__wrapped__ and run_sensitivity.__wrapped__  # both entry points are wrapped


def test_sharing_with_k_above_the_surviving_weights_reports_the_values_it_stores(tmp_path):
    overrides = ["model.train.epochs=1", "recover.epochs=1", "evaluate.latency=false"]
    overrides += ["recover.method=share", "recover.share.k=65536"]
    report = regrow.run("demo", overrides=overrides, out_dir=tmp_path / "o", progress=False)
    sharing = report.recovery["details"]["sharing"]
    stored = load_file(str(tmp_path / "o" / "shared.safetensors"))
    values = max(t.numel() for name, t in stored.items() if name.endswith(".codebook"))
    assert sharing["k"] == 65536 and sharing["values"] == values < 65536
    text = (tmp_path / "o" / "report.md").read_text()
    bits = math.ceil(math.log2(values))
    assert f"k = 65536 asked, at most {values} values per target" in text and f"up to {bits}-bit indices" in text


def test_the_sharing_post_step_is_merged_into_the_recovery_summary():
    from regrow.pipeline.recover import merge_shared as _merge_shared
    from regrow.recovery import RecoveryResult

    def result(best_epoch, epochs, reason, method):
        return RecoveryResult(
            history=[],
            best_epoch=best_epoch,
            best_val_accuracy=0.5 + best_epoch / 100,
            epochs_run=epochs,
            steps=10 * epochs,
            stop_reason=reason,
            seconds=float(epochs),
            method=method,
            details={"sharing": {"k": 4}} if method == "share" else {},
        )

    for shared_best, note in ((2, None), (0, "the shared values right after clustering, before their fine-tuning")):
        main = result(3, 4, "epoch budget used", "distill")
        info = main.to_dict()
        merged = _merge_shared(
            main, result(shared_best, 1 if shared_best == 0 else 2, "epoch budget used", "share"), info, 4
        )
        n = 1 if shared_best == 0 else 2
        assert (
            merged.stop_reason
            == f"epoch budget used; then {n} epoch{'' if n == 1 else 's'} of weight sharing (epoch budget used)"
        )
        assert info["phases"] == {"recovery": 4, "sharing": n} and info["epochs_run"] == 4 + n
        assert info["steps"] == 40 + 10 * n and info["seconds"] == 4.0 + n
        assert info["best_epoch"] == 4 + shared_best and info["best_val_accuracy"] == 0.5 + shared_best / 100
        assert info.get("best_note") == note and info["sharing"] == {"k": 4}


def test_the_acceleration_stage_reports_its_layers_speed_and_accuracy(tmp_path, monkeypatch):
    """The stage's plumbing on the CPU, with the packing faked (real kernels: tests/test_gpu.py on a GPU)."""
    import regrow.config.checks as checks
    from regrow.accelerate import AccelerationReport, LayerRow, SpeedResult

    calls = []

    def fake_accelerate(model, masks, *, backend, dtype, example_inputs, cuda_graph):
        calls.append((sorted(masks), backend, dtype, tuple(example_inputs.shape)))
        model.to(dtype)
        rows = [LayerRow(f, tuple(model.get_parameter(f).shape), "bfloat16", "cpu", True, True) for f in masks]
        speed = SpeedResult(2.0, 1.6, 1.25, 1e-3, "eager", 50, 10, "fake", "cpu")
        return AccelerationReport("cusparselt", "bfloat16", {"name": "fake GPU"}, rows, speed)

    monkeypatch.setattr("regrow.pipeline.accelerate.accelerate", fake_accelerate)
    monkeypatch.setattr(checks, "RULES", [r for r in checks.RULES if "accelerate" not in r.check.__name__])
    overrides = ["prune.pattern=2:4", "prune.sparsity=null", "prune.ignore=[0.weight]", "model.train.epochs=1"]
    overrides += ["recover.epochs=1", "evaluate.latency=false", "accelerate.enabled=true"]
    report = regrow.run("demo", overrides=overrides, out_dir=tmp_path / "run", progress=False)
    (targets, backend, dtype, shape) = calls[0]
    assert targets == report.prune["targets"] and backend == "auto" and dtype == torch.bfloat16 and shape[0] == 64
    acc = report.prune["acceleration"]
    assert acc["speed"]["speedup"] == 1.25 and 0 < acc["accuracy"] <= 1
    text = (tmp_path / "run" / "report.md").read_text()
    assert "## 2:4 on sparse tensor cores" in text and "Test accuracy of the packed copy" in text
    assert "model.safetensors" in os.listdir(tmp_path / "run")
