"""The recovery toolbox: rewinding, one-cycle, dynamic sparsity, weight sharing, stopping, transfer."""

import copy
import math

import pytest
import torch
from torch import nn

import regrow
from conftest import TinyMLP, make_batches
from regrow.errors import RegrowError
from regrow.recovery.dynamic import DynamicSparsity
from regrow.recovery.loop import EpochRecord, TrainState
from regrow.recovery.lr import LR_SCHEDULES, LRContext, OriginalSchedule, default_original
from regrow.recovery.records import early_stop_reason as _early_stop_reason
from regrow.recovery.sharing import kmeans_1d, share


class LrWatch:
    """A step callback that records the optimizer's learning rate after every step."""

    def __init__(self):
        self.seen = []

    def on_train_start(self, state):
        pass

    def on_step_end(self, state):
        self.seen.append(state.optimizer.param_groups[0]["lr"])

    def checkpoint_ready(self, state):
        return True


def trained(epochs=8):
    torch.manual_seed(0)
    model = TinyMLP()
    regrow.recover(
        model,
        regrow.MaskSet({}),
        make_batches(10),
        make_batches(3, seed=1),
        method="finetune",
        epochs=epochs,
        lr=0.01,
        patience=None,
        progress=False,
    )
    return model


# --- learning-rate schedules ---------------------------------------------------------------------


def test_one_cycle_values_at_chosen_steps():
    ctx = LRContext(
        total_steps=100, steps_per_epoch=10, warmup_steps=0, lr=1e-3, original=OriginalSchedule(lr=0.1, epochs=20)
    )
    lr = LR_SCHEDULES.get("one_cycle")(ctx)
    assert lr(0) == pytest.approx(0.1 / 25)  # starts at peak / 25
    assert lr(30) == pytest.approx(0.1)  # the peak, reached after 30 % of the steps
    assert lr(15) == pytest.approx(0.1 / 25 + (0.1 - 0.1 / 25) * 0.5)  # half-way up a cosine ramp
    assert lr(100) == pytest.approx(0.1 / 25 / 1e4)  # annealed
    explicit = LR_SCHEDULES.get("one_cycle")(LRContext(100, 10, 0, 1e-3, default_original(1e-3, 5), peak_lr=0.05))
    assert explicit(30) == pytest.approx(0.05)


def test_original_schedules():
    cos = OriginalSchedule(lr=0.1, epochs=10)
    assert cos.lr_at(0) == pytest.approx(0.1) and cos.lr_at(5) == pytest.approx(0.05) and cos.lr_at(10) == 0
    step = OriginalSchedule(lr=0.1, epochs=30, schedule="step", milestones=(10, 20), gamma=0.1)
    assert [step.lr_at(e) for e in (0, 9.9, 10, 25)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    warm = OriginalSchedule(lr=0.1, epochs=10, warmup=0.2)
    assert warm.lr_at(1) == pytest.approx(0.05)


def test_lr_rewinding_replays_the_tail_of_the_original_schedule():
    original = OriginalSchedule(lr=0.1, epochs=30, schedule="step", milestones=(10, 20))
    ctx = LRContext(total_steps=100, steps_per_epoch=10, warmup_steps=0, lr=1e-3, original=original)
    lr = LR_SCHEDULES.get("rewind")(ctx)  # 10 recovery epochs: replay epochs 20..30
    assert lr(0) == pytest.approx(0.001) and lr(99) == pytest.approx(0.001)
    lr = LR_SCHEDULES.get("rewind")(LRContext(100, 10, 0, 1e-3, original, rewind_epoch=5.0))
    assert lr(0) == pytest.approx(0.1) and lr(50) == pytest.approx(0.01) and lr(99) == pytest.approx(0.01)


def test_lr_rewinding_longer_than_the_rest_of_the_original_is_slowed_down_not_run_past_its_end():
    original = OriginalSchedule(lr=0.1, epochs=30, schedule="cosine")
    # 60 recovery epochs, default rewind point 0: the whole 30-epoch schedule at half pace
    lr = LR_SCHEDULES.get("rewind")(LRContext(600, 10, 0, 1e-3, original))
    assert lr(0) == pytest.approx(0.1)
    assert lr(300) == pytest.approx(0.05)  # original epoch 15, the cosine's midpoint
    assert lr(599) == pytest.approx(original.lr_at(29.95)) and lr(599) > 0
    # rewind point 20, 20 recovery epochs: the 10 epochs left at half pace
    lr = LR_SCHEDULES.get("rewind")(LRContext(200, 10, 0, 1e-3, original, rewind_epoch=20.0))
    assert lr(0) == pytest.approx(0.05 * (1 + math.cos(math.pi * 2 / 3)))
    assert lr(100) == pytest.approx(original.lr_at(25.0))
    with pytest.raises(RegrowError, match="rewind_epoch 30 is not inside the original training"):
        LR_SCHEDULES.get("rewind")(LRContext(200, 10, 0, 1e-3, original, rewind_epoch=30.0))


def test_recover_refuses_rewinding_with_another_schedule_or_outside_the_original_before_touching_the_model():
    model = trained()
    masks = regrow.prune(model, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original = {"lr": 0.1, "epochs": 6}
    with pytest.raises(RegrowError, match="lr_schedule 'one_cycle' would be ignored"):
        regrow.recover(
            model, masks, make_batches(3), rewind="lr", lr_schedule="one_cycle", original=original, progress=False
        )
    with pytest.raises(RegrowError, match="rewind_epoch 6 is not inside"):
        regrow.recover(model, masks, make_batches(3), rewind="lr", rewind_epoch=6, original=original, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_lr_rewinding_drives_the_optimizer():
    model = trained()
    masks = regrow.prune(model, 0.5)
    watch = LrWatch()
    seen = watch.seen

    original = {"lr": 0.2, "epochs": 6, "schedule": "step", "milestones": [4], "gamma": 0.5}
    regrow.recover(
        model,
        masks,
        make_batches(5),
        make_batches(2, seed=1),
        method="finetune",
        epochs=3,
        rewind="lr",
        original=original,
        callbacks=[watch],
        progress=False,
    )
    # 3 recovery epochs of 5 steps replay epochs 3..6 of the original: 0.2 for one epoch, then 0.1
    assert seen[:4] == pytest.approx([0.2] * 4) and seen[-5:] == pytest.approx([0.1] * 5)


def test_weight_rewinding_restores_the_snapshot_on_surviving_weights():
    torch.manual_seed(0)
    model = TinyMLP()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    regrow.recover(
        model,
        regrow.MaskSet({}),
        make_batches(6),
        make_batches(2, seed=1),
        method="finetune",
        epochs=3,
        lr=0.05,
        patience=None,
        progress=False,
    )
    masks = regrow.prune(model, 0.6)
    regrow.recover(
        model,
        masks,
        make_batches(6),
        make_batches(2, seed=1),
        method="finetune",
        epochs=0,
        rewind="weights",
        rewind_state=snapshot,
        progress=False,
    )
    for fqn, mask in masks.items():
        w = model.get_parameter(fqn)
        assert torch.equal(w[mask], snapshot[fqn][mask])  # exactly the snapshot where weights survive
        assert torch.count_nonzero(w[~mask]) == 0  # and still pruned elsewhere
    assert torch.equal(model.head.weight, snapshot["head.weight"])


def test_weight_rewinding_needs_a_snapshot_of_matching_shapes():
    model = trained(2)
    masks = regrow.prune(model, 0.5)
    with pytest.raises(RegrowError, match="needs a snapshot of this model's architecture"):
        regrow.recover(
            model,
            masks,
            make_batches(4),
            method="finetune",
            rewind="weights",
            epochs=1,
            rewind_state={"fc1.weight": torch.zeros(3, 3)},
            progress=False,
        )
    with pytest.raises(RegrowError, match="pass rewind_state="):
        regrow.recover(model, masks, make_batches(4), method="finetune", rewind="weights", epochs=1, progress=False)


# --- dynamic sparse training ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_dynamic_sparsity_keeps_exact_sparsity_and_regrows_the_right_count(method):
    model = trained()
    masks = regrow.prune(model, 0.7, scope="layer")
    counts = {f: int(m.sum()) for f, m in masks.items()}
    changed_steps = []

    class Check:
        def on_train_start(self, state):
            self.before = {f: m.clone() for f, m in state.masks.items()}

        def on_step_end(self, state):
            for f, m in state.masks.items():
                assert int(m.sum()) == counts[f]  # same number of active weights after every step
                assert torch.count_nonzero(state.model.get_parameter(f)[~m]) == 0
                if not torch.equal(m, self.before[f]):
                    changed_steps.append(state.step)
                    # the number dropped equals the number regrown, and it follows the cosine decay
                    dropped = int((self.before[f] & ~m).sum())
                    assert dropped == int((m & ~self.before[f]).sum())
                    n = int(dyn.fraction(state.step) * counts[f])
                    assert dropped == n
            self.before = {f: m.clone() for f, m in state.masks.items()}

        def checkpoint_ready(self, state):
            return True

    dyn = DynamicSparsity("gradient" if method == "rigl" else "random", update_every=4, drop_fraction=0.3, end=0.75)
    result = regrow.recover(
        model,
        masks,
        make_batches(8),
        make_batches(2, seed=1),
        method="finetune",
        epochs=4,
        callbacks=[dyn, Check()],
        progress=False,
    )
    assert changed_steps and all(s % 4 == 0 and s < 0.75 * 32 for s in changed_steps)
    assert result.steps == 32
    via_method = regrow.recover(
        model,
        masks,
        make_batches(8),
        make_batches(2, seed=1),
        method=method,
        epochs=2,
        dynamic={"update_every": 4},
        progress=False,
    )
    assert via_method.details["dynamic"]["updates"] > 0


@pytest.mark.parametrize("regrow_by", ["gradient", "random"])
def test_dynamic_sparsity_on_a_lightly_pruned_target_replaces_at_most_its_inactive_weights(regrow_by):
    model = trained()
    masks = regrow.prune(model, 0.1, scope="layer")  # 0.3 / 2 * (1 + cos) of the active > the inactive
    counts = {f: int(m.sum()) for f, m in masks.items()}
    inactive = {f: m.numel() - counts[f] for f, m in masks.items()}
    dyn = DynamicSparsity(regrow_by, update_every=4, drop_fraction=0.3, end=0.75)
    regrow.recover(
        model,
        masks,
        make_batches(8),
        make_batches(2, seed=1),
        method="finetune",
        epochs=4,
        patience=None,
        callbacks=[dyn],
        progress=False,
    )
    assert {f: int(m.sum()) for f, m in masks.items()} == counts  # sparsity kept exactly
    first = dyn.updates[0]
    assert all(int(dyn.fraction(4) * counts[f]) > inactive[f] for f in counts)  # the case under test
    assert first["step"] == 4 and first["replaced"] == sum(inactive.values())  # every inactive weight regrown
    for f, m in masks.items():
        assert torch.count_nonzero(model.get_parameter(f)[~m]) == 0


class _MasksAtEpochEnds:
    """Copies the masks after every 8th step (the end of an epoch of ``make_batches(8)``)."""

    def __init__(self):
        self.seen = {}

    def on_train_start(self, state):
        self.seen[0] = {f: m.clone() for f, m in state.masks.items()}

    def on_step_end(self, state):
        if state.step % 8 == 0:
            self.seen[state.step // 8] = {f: m.clone() for f, m in state.masks.items()}

    def checkpoint_ready(self, state):
        return True


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_kept_checkpoint_restores_the_masks_of_its_epoch(method):
    model = trained()
    masks = regrow.prune(model, 0.7, scope="layer")
    record = _MasksAtEpochEnds()
    result = regrow.recover(  # a learning rate this large wrecks training: which epoch is kept is left to chance
        model,
        masks,
        make_batches(8),
        make_batches(2, seed=1),
        method=method,
        epochs=3,
        lr=50.0,
        guard={"explode_factor": None},  # the divergence guard would roll the wreck back: let it through
        dynamic={"update_every": 2},  # updates at steps 2, 4, ..., 16 (before 0.75 of 24; late ones may move none)
        patience=None,
        progress=False,
        callbacks=[record],
    )
    assert result.best_epoch >= 1  # never the masks from before the first update
    dynamic = result.details["dynamic"]
    assert dynamic["updates"] >= 1 and dynamic["weights_replaced"] > 0  # counted up to the kept epoch
    kept = record.seen[result.best_epoch]
    for f, m in masks.items():
        assert torch.equal(m, kept[f])  # the masks of the kept epoch, not of the last update
        assert torch.count_nonzero(model.get_parameter(f)[~m]) == 0


def test_regrown_weights_start_at_zero_with_fresh_optimizer_state():
    torch.manual_seed(0)
    w = nn.Parameter(torch.tensor([[5.0, 4.0, 0.0, 0.0], [0.1, 3.0, 0.0, 0.0]]))
    model = nn.Module()
    model.w = w
    masks = regrow.MaskSet({"w": torch.tensor([[True, True, False, False], [True, True, False, False]])})
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    w.grad = torch.ones_like(w)
    opt.step()  # momentum everywhere
    w.grad = torch.tensor([[0.0, 0.0, 9.0, 1.0], [0.0, 0.0, 2.0, 8.0]])
    with torch.no_grad():
        w.mul_(masks["w"])
    dyn = DynamicSparsity("gradient", update_every=1, drop_fraction=0.5, end=1.0)
    state = TrainState(model, masks, opt, [], total_steps=10)
    dyn.on_train_start(state)
    dyn.on_after_backward(state)  # fraction(1) = 0.25 * (1 + cos(pi / 10)) -> int(0.49 * 4) = 1 weight
    # drop: the smallest active weight (0.1 at [1, 0]); grow: the largest inactive gradient (9.0 at [0, 2])
    assert masks["w"].tolist() == [[True, True, True, False], [False, True, False, False]]
    assert w[0, 2] == 0 and w[1, 0] == 0
    buf = opt.state[w]["momentum_buffer"]
    assert buf[0, 2] == 0 and buf[1, 0] == 0 and buf[0, 0] != 0


# --- weight sharing --------------------------------------------------------------------------------


def test_kmeans_on_hand_values():
    codebook, index = kmeans_1d(torch.tensor([0.0, 0.1, 1.0, 1.1, 10.0, 10.2]), 3)
    assert codebook.tolist() == pytest.approx([0.05, 1.05, 10.1])
    assert index.tolist() == [0, 0, 1, 1, 2, 2]


def test_weight_sharing_trains_each_shared_value_by_its_clusters_summed_gradient():
    from types import SimpleNamespace

    from regrow.recovery.sharing import WeightSharing

    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.2, 0.0], [4.0, 4.2, 5.0]]))
    masks = regrow.MaskSet({"weight": torch.tensor([[True, True, False], [True, True, True]])})
    state = SimpleNamespace(model=layer, masks=masks)
    sharing = WeightSharing(k=2)
    sharing.on_train_start(state)  # two clusters: {1.0, 1.2} -> 1.1 and {4.0, 4.2, 5.0} -> 4.4
    index = sharing.shared.indices["weight"]
    assert index.tolist() == [[0, 0, -1], [1, 1, 1]]
    assert sharing.shared.codebooks["weight"].tolist() == pytest.approx([1.1, 4.4])
    x = torch.tensor([[1.0, 2.0, 3.0]])
    (layer(x) * torch.tensor([[1.0, -2.0]])).sum().backward()  # dL/dW[i, j] = c_i * x_j
    raw = layer.weight.grad.clone()
    sharing.on_after_backward(state)
    summed = {0: float(raw[0, 0] + raw[0, 1]), 1: float(raw[1].sum())}  # 1 + 2 = 3 and -2 * 6 = -12
    assert summed == {0: 3.0, 1: -12.0}
    for (i, j), c in [((0, 0), 0), ((0, 1), 0), ((1, 0), 1), ((1, 1), 1), ((1, 2), 1)]:
        assert float(layer.weight.grad[i, j]) == summed[c]
    with torch.no_grad():
        layer.weight.grad[~masks["weight"]] = 0.0  # what the loop does to pruned weights
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    sharing.sync(layer)
    assert sharing.shared.codebooks["weight"].tolist() == pytest.approx([1.1 - 0.3, 4.4 + 1.2])
    assert layer.weight[0, 2] == 0.0 and torch.unique(layer.weight[1]).numel() == 1


def test_shared_weights_take_at_most_k_values_after_fine_tuning(tmp_path):
    model = trained()
    masks = regrow.prune(model, 0.5)
    result = regrow.recover(
        model,
        masks,
        make_batches(8),
        make_batches(2, seed=1),
        method="share",
        share={"k": 4},
        epochs=3,
        lr=0.01,
        progress=False,
    )
    for fqn, mask in masks.items():
        alive = model.get_parameter(fqn)[mask]
        assert len(torch.unique(alive)) <= 4
        assert torch.count_nonzero(model.get_parameter(fqn)[~mask]) == 0
    sizes = result.details["sharing"]
    assert sizes["shared_bits"] < sizes["sparse_bits"] < sizes["dense_bits"]
    index_bits = 2  # log2(4)
    alive_total = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert sizes["shared_bits"] == alive_total * index_bits + 2 * 4 * 32 + total
    result.shared.save(tmp_path / "shared.safetensors")
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "shared.safetensors"))
    rebuilt = stored["fc1.weight.codebook"][stored["fc1.weight.indices"].long()] * stored["fc1.weight.mask"]
    torch.testing.assert_close(rebuilt, model.fc1.weight.detach())


def test_share_clusters_in_place():
    model = TinyMLP()
    masks = regrow.prune(model, 0.5)
    shared = share(model, masks, 3)
    assert all(len(torch.unique(model.get_parameter(f)[masks[f]])) <= 3 for f in masks)
    assert (shared.indices["fc1.weight"][~masks["fc1.weight"]] == -1).all()


# --- stopping and over-fitting --------------------------------------------------------------------


def test_stop_when_within_the_baseline():
    model = trained()
    masks = regrow.prune(model, 0.3)
    result = regrow.recover(
        model, masks, make_batches(6), make_batches(2, seed=1), epochs=20, stop_when={"within": 100.0}, progress=False
    )
    assert result.epochs_run == 1 and result.stop_reason.startswith("target reached")
    assert "baseline_val_accuracy" in result.details


def test_stop_when_within_counts_points_below_the_baseline():
    model = trained()
    masks = regrow.prune(model, 0.3)

    def run(**kw):
        torch.manual_seed(0)
        m, k = copy.deepcopy(model), copy.deepcopy(masks)
        data = (make_batches(6), make_batches(2, seed=1))
        return regrow.recover(m, k, *data, method="finetune", epochs=3, patience=None, progress=False, **kw)

    first = run().history[1].val_accuracy
    baseline = first + 0.004  # the first epoch ends 0.4 points below this baseline
    hit = run(stop_when={"within": 0.5}, baseline_val_accuracy=baseline)
    assert hit.epochs_run == 1 and "within 0.5 points" in hit.stop_reason
    miss = run(stop_when={"within": 0.3}, baseline_val_accuracy=baseline)
    assert miss.history[1].val_accuracy == first and miss.epochs_run > 1


def test_stop_when_time_is_up():
    model = trained()
    masks = regrow.prune(model, 0.3)
    result = regrow.recover(
        model, masks, make_batches(6), make_batches(2, seed=1), epochs=20, stop_when={"seconds": 1e-6}, progress=False
    )
    assert result.epochs_run == 1 and result.stop_reason.startswith("wall-time budget")


def test_early_stopping_names_over_fitting():
    def rec(epoch, train_acc, val_acc, val_loss):
        return EpochRecord(epoch, 0.1, 0.5, train_acc, val_loss, val_acc, 0.0, 1.0)

    history = [rec(0, None, 0.8, 0.5), rec(1, 0.85, 0.9, 0.3), rec(2, 0.95, 0.88, 0.4), rec(3, 0.99, 0.87, 0.5)]
    assert "over-fitting" in _early_stop_reason(history, 2)
    flat = [rec(0, None, 0.8, 0.5), rec(1, 0.9, 0.9, 0.3), rec(2, 0.9, 0.9, 0.3), rec(3, 0.9, 0.9, 0.3)]
    assert "over-fitting" not in _early_stop_reason(flat, 2)


# --- transfer -----------------------------------------------------------------------------------


def test_transfer_with_a_new_head_and_feature_distillation():
    source = trained()
    masks = regrow.prune(source, 0.5)
    dense = masks.dense
    name = regrow.recovery.new_head(source, 5)
    assert name == "head" and source.head.out_features == 5
    g = torch.Generator().manual_seed(3)
    target = [(torch.randn(16, 8, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(6)]
    result = regrow.recover(source, masks, target, epochs=2, method="transfer", teacher=dense, progress=False)
    parts = result.history[1].parts
    assert "feature_loss" in parts and "task_loss" in parts
    for fqn, mask in masks.items():  # masks kept through transfer
        assert torch.count_nonzero(source.get_parameter(fqn)[~mask]) == 0
    assert source(torch.zeros(2, 8)).shape == (2, 5)
    # the teacher's head is for the source classes: its accuracy is no baseline for the new task
    with pytest.raises(RegrowError, match="Pass baseline_val_accuracy="):
        regrow.recover(
            source, masks, target, method="transfer", teacher=dense, stop_when={"within": 0.5}, progress=False
        )
    done = regrow.recover(
        source,
        masks,
        target,
        epochs=1,
        method="transfer",
        teacher=dense,
        stop_when={"within": 100.0},
        baseline_val_accuracy=0.5,
        progress=False,
    )
    assert done.stop_reason.startswith("target reached")


def test_unknown_options_are_refused():
    model = trained(1)
    masks = regrow.prune(model, 0.5)
    with pytest.raises(RegrowError, match="'rewind'"):
        regrow.recover(model, masks, make_batches(4), rewind="sometimes", progress=False)
    with pytest.raises(RegrowError, match="unknown key 'dynamic.every'"):
        regrow.recover(model, masks, make_batches(4), method="rigl", dynamic={"every": 3}, progress=False)
    with pytest.raises(RegrowError, match="unknown lr_schedule 'triangle'"):
        regrow.recover(model, masks, make_batches(4), lr_schedule="triangle", progress=False)


def test_one_cycle_drives_the_optimizer():
    model = trained()
    masks = regrow.prune(model, 0.5)
    watch = LrWatch()
    seen = watch.seen
    result = regrow.recover(
        model,
        masks,
        make_batches(8),
        make_batches(2, seed=1),
        lr_schedule="one_cycle",
        max_lr=0.05,
        epochs=2,
        callbacks=[watch],
        progress=False,
    )
    # 16 steps: a cosine rise from 0.05 / 25 to the peak 0.05 over the first 30 %, then annealed to ~0
    assert seen[0] < 0.01 and max(seen) == pytest.approx(0.05, rel=1e-2) and seen.index(max(seen)) == 4
    assert seen[-1] == pytest.approx(0.05 / 25 / 1e4) and not math.isnan(result.best_val_accuracy)


def test_masked_patterns_warn_that_they_cannot_speed_up_dense_kernels():
    with pytest.warns(regrow.errors.SpeedWarning, match="cannot make dense kernels faster"):
        regrow.prune(TinyMLP(), 0.5)


def test_recipe_only_share_options_and_transfer_distill_are_refused_in_python():
    model = trained(1)
    masks = regrow.prune(model, 0.5)
    with pytest.raises(RegrowError, match="share.after and share.epochs are recipe settings"):
        regrow.recover(model, masks, make_batches(4), method="share", share={"after": True}, progress=False)
    with pytest.raises(RegrowError, match="does not apply to method 'transfer'"):
        regrow.recover(model, masks, make_batches(4), method="transfer", distill=True, progress=False)


def test_bad_python_arguments_get_a_regrow_error_before_any_training():
    model = trained(1)
    masks = regrow.prune(model, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, val = make_batches(4), make_batches(2, seed=1)

    def refused(message, **kwargs):
        with pytest.raises(RegrowError, match=message):
            regrow.recover(model, masks, kwargs.pop("train", train), val, progress=False, **kwargs)

    refused("stop_when is empty", stop_when={})
    refused("max_lr is the peak of lr_schedule 'one_cycle'", max_lr=0.1)
    with pytest.raises(RegrowError, match=r"val_fraction must be in \(0, 1\)"):
        regrow.recover(model, masks, train, val_fraction=1.5, progress=False)
    refused("unknown augment 'sideways'", augment="sideways")
    refused("the training data has no batches", train=[])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was trained

    with pytest.raises(RegrowError, match="needs 0 <= initial < final < 1"):
        regrow.GradualPruning(final=1.5)
    with pytest.raises(RegrowError, match="every >= 1 optimizer steps"):
        regrow.GradualPruning(final=0.5, every=0)
    with pytest.raises(RegrowError, match=r"lr > 0 \(got -1.0\)"):
        OriginalSchedule(lr=-1.0, epochs=4)


def test_dynamic_sparsity_is_refused_on_n_m_masks_and_sharing_beside_a_gradual_ramp():
    model = trained(1)
    masks = regrow.prune(model, pattern="2:4")
    with pytest.raises(RegrowError, match="needs masks of pattern 'unstructured'; these have pattern '2:4'"):
        regrow.recover(model, masks, make_batches(4), method="rigl", progress=False)
    dense = regrow.prune(trained(1), 0.0)
    with pytest.raises(RegrowError, match="'share' cannot run beside GradualPruning"):
        regrow.recover(
            model, dense, make_batches(4), method="share", callbacks=[regrow.GradualPruning(0.5)], progress=False
        )


def test_distilling_from_a_teacher_with_other_classes_is_a_clear_error():
    model = trained(1)
    masks = regrow.prune(model, 0.5)
    teacher = TinyMLP(classes=5)
    with pytest.raises(RegrowError, match=r"the teacher gives \(16, 5\), the student \(16, 3\)"):
        regrow.recover(model, masks, make_batches(4), make_batches(2, seed=1), teacher=teacher, progress=False)


def test_a_named_augmentation_is_accepted_in_python(monkeypatch):
    from regrow.components import AUGMENTS

    seen = []

    def spy(x):
        seen.append(x.shape)
        return x

    monkeypatch.setitem(AUGMENTS._items, "hflip", spy)
    model = trained(1)
    masks = regrow.prune(model, 0.5)
    regrow.recover(model, masks, make_batches(2), make_batches(1, seed=1), augment="hflip", epochs=1, progress=False)
    assert seen == [torch.Size([16, 8])] * 2  # the registered function, on every training batch


def test_sharing_with_more_values_than_surviving_weights_counts_the_values_it_stores():
    model = TinyMLP()
    masks = regrow.prune(model, 0.9, scope="layer")
    shared = share(model, masks, 65536)
    alive = {f: int(m.sum()) for f, m in masks.items()}  # 10 % of fc1's 128 and fc2's 256 weights
    assert sorted(alive.values()) == [12, 25]
    assert {f: shared.codebooks[f].numel() for f in masks} == alive  # one value per surviving weight at most
    assert shared.values() == max(alive.values())
    expected = sum(n * math.ceil(math.log2(n)) + n * 32 + masks[f].numel() for f, n in alive.items())
    assert shared.bits() == expected  # each target's indices are as wide as its own codebook needs
    sizes = regrow.recovery.sharing.sizes(model, masks, shared)
    assert sizes["k"] == 65536 and sizes["values"] == 25 and sizes["index_bits"] == 5


def test_an_assumed_original_schedule_is_marked_as_assumed():
    model = trained(1)
    masks = regrow.prune(model, 0.5)
    train, val = make_batches(4), make_batches(2, seed=1)
    assumed = regrow.recover(model, masks, train, val, rewind="lr", epochs=1, progress=False)
    assert assumed.details["rewind"]["assumed"] is True
    assert assumed.details["rewind"]["original"]["epochs"] == 2.0  # twice the recovery epochs, from lr
    stated = regrow.recover(
        model, masks, train, val, rewind="lr", epochs=1, original={"lr": 0.01, "epochs": 4}, progress=False
    )
    assert stated.details["rewind"]["assumed"] is False


def test_masks_reloaded_from_a_file_keep_their_spec_and_its_checks(tmp_path):
    model = trained(1)
    masks = regrow.prune(model, pattern="2:4")
    masks.save(tmp_path / "masks.safetensors")
    again = regrow.MaskSet.load(tmp_path / "masks.safetensors")
    assert again.spec == masks.spec and again.spec.pattern == "2:4"
    with pytest.raises(RegrowError, match="these have pattern '2:4'"):
        regrow.recover(model, again, make_batches(4), method="rigl", progress=False)
