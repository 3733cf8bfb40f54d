import copy
import math

import pytest
import torch

import regrow
from conftest import TinyMLP, make_batches
from regrow.errors import RegrowError
from regrow.tasks import distillation_loss


class CheckEveryStep:
    """After every optimizer step: masked weights are exactly zero, and so is their optimizer state."""

    def __init__(self) -> None:
        self.steps = 0
        self.state_keys: set[str] = set()

    def on_train_start(self, state):
        pass

    def checkpoint_ready(self, state):
        return True

    def on_step_end(self, state):
        self.steps += 1
        for fqn, mask in state.masks.items():
            p = state.model.get_parameter(fqn)
            assert torch.count_nonzero(p[~mask]) == 0, f"{fqn} revived at step {state.step}"
            opt_state = state.optimizer.state[p]
            for key, value in opt_state.items():
                if torch.is_tensor(value) and value.shape == mask.shape:
                    self.state_keys.add(key)
                    assert torch.count_nonzero(value[~mask]) == 0, f"{key} of {fqn} leaked at step {state.step}"


@pytest.mark.parametrize(
    "optimizer, expected_state",
    [("sgd", {"momentum_buffer"}), ("adamw", {"exp_avg", "exp_avg_sq"})],
)
def test_masks_hold_through_recovery(optimizer, expected_state):
    torch.manual_seed(0)
    model = TinyMLP()
    train, val = make_batches(8), make_batches(2, seed=1)
    masks = regrow.prune(model, 0.7)
    check = CheckEveryStep()
    regrow.recover(
        model,
        masks,
        train,
        val,
        method="finetune",
        optimizer=optimizer,
        lr=0.05,
        weight_decay=0.05,
        epochs=3,
        patience=None,
        callbacks=[check],
        progress=False,
    )
    assert check.steps == 24
    assert check.state_keys == expected_state
    assert masks.sparsity() == pytest.approx(0.7, abs=0.01)
    for fqn, mask in masks.items():  # also after the best checkpoint is restored
        assert torch.count_nonzero(model.get_parameter(fqn)[~mask]) == 0


def test_recovery_improves_a_pruned_model_and_keeps_the_best_epoch():
    torch.manual_seed(0)
    model = TinyMLP()
    train, val = make_batches(20), make_batches(4, seed=1)
    regrow.recover(
        model, regrow.MaskSet({}), train, val, method="finetune", epochs=15, lr=0.01, patience=None, progress=False
    )
    masks = regrow.prune(model, 0.8)
    result = regrow.recover(model, masks, train, val, epochs=8, lr=0.01, progress=False)
    accs = [h.val_accuracy for h in result.history]
    assert result.best_val_accuracy == max(accs)
    assert result.best_val_accuracy >= accs[0]
    assert result.method == "distill"
    from regrow.measure.metrics import classification_metrics

    assert classification_metrics(model, val)["accuracy"] == result.best_val_accuracy


def test_early_stopping_with_patience():
    torch.manual_seed(0)
    model = TinyMLP()
    train, val = make_batches(4), make_batches(2, seed=1)
    masks = regrow.prune(model, 0.5)
    # lr=1e-9 changes nothing: validation never improves, so training stops after `patience` epochs
    result = regrow.recover(
        model,
        masks,
        train,
        val,
        method="finetune",
        lr=1e-9,
        epochs=20,
        patience=2,
        lr_schedule="constant",
        warmup=0.0,
        progress=False,
    )
    assert result.epochs_run == 2
    assert result.stop_reason.startswith("early stopping")


def test_validation_is_carved_from_train_when_missing(batches):
    torch.manual_seed(0)
    model = TinyMLP()
    masks = regrow.prune(model, 0.5)
    result = regrow.recover(model, masks, batches, epochs=1, progress=False)
    # 6 batches -> 1 held out for validation, 5 trained on
    assert result.steps == 5


def test_one_shot_iterators_are_refused(batches):
    model = TinyMLP()
    masks = regrow.prune(model, 0.5)
    with pytest.raises(RegrowError, match="one-shot iterator"):
        regrow.recover(model, masks, iter(batches), progress=False)


def test_distill_without_any_teacher_is_refused(batches):
    model = TinyMLP()
    masks = regrow.prune(model, 0.5, keep_dense=False)
    with pytest.raises(RegrowError, match="needs a teacher"):
        regrow.recover(model, masks, batches, progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "magic"}, "unknown recovery method 'magic'; allowed values: distill, finetune"),
        ({"alpha": 1.5}, "'alpha'"),
        ({"optimizer": "lion"}, "'optimizer'"),
        ({"epochs": -1}, "'epochs'"),
        ({"ema": 1.0}, "'ema'"),
    ],
)
def test_bad_recovery_options(batches, kwargs, message):
    model = TinyMLP()
    masks = regrow.prune(model, 0.5)
    with pytest.raises(RegrowError, match=message):
        regrow.recover(model, masks, batches, progress=False, **kwargs)


def test_distillation_loss_on_known_logits():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    # T = 1: p_teacher = (3/4, 1/4), p_student = (1/2, 1/2)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert distillation_loss(student, teacher, 1.0).item() == pytest.approx(kl, rel=1e-6)
    # T = 2: teacher logits halve; the loss is scaled by T^2 = 4
    pt = math.sqrt(3) / (math.sqrt(3) + 1)
    kl2 = pt * math.log(pt / 0.5) + (1 - pt) * math.log((1 - pt) / 0.5)
    assert distillation_loss(student, teacher, 2.0).item() == pytest.approx(4 * kl2, rel=1e-6)


def test_distill_method_mixes_soft_and_task_loss():
    from regrow.config import RecoverConfig
    from regrow.recovery.methods import DistillLoss

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.nn.Parameter(logits)

        def forward(self, x):
            return self.logits.expand(x.shape[0], -1)

    student, teacher = Fixed(torch.tensor([[0.0, 0.0]])), Fixed(torch.tensor([[math.log(3.0), 0.0]]))
    method = DistillLoss(RecoverConfig(alpha=0.25, temperature=1.0), teacher)
    losses, _ = method.losses(student, torch.zeros(1, 1), torch.tensor([0]))
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert losses["kd_loss"].item() == pytest.approx(kl, rel=1e-6)
    assert losses["task_loss"].item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert losses["loss"].item() == pytest.approx(0.25 * kl + 0.75 * math.log(2.0), rel=1e-6)


# --- weight averaging (ema) -----------------------------------------------------------------------


def test_weight_average_on_hand_values():
    from regrow.recovery.average import WeightAverage

    model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.BatchNorm1d(2))
    weight = model[0].weight
    mask = torch.tensor([[True, False], [True, True]])
    masks = regrow.MaskSet({"0.weight": mask})
    with torch.no_grad():
        weight.copy_(torch.tensor([[1.0, 0.0], [3.0, 4.0]]))
    average = WeightAverage(model, masks, decay=0.5)
    assert "1.num_batches_tracked" not in average.average  # integer buffers are not averaged

    with torch.no_grad():
        weight.copy_(torch.tensor([[3.0, 0.0], [5.0, 6.0]]))
    average.update(step=100)  # decay min(0.5, 101/110) = 0.5
    assert torch.equal(average.average["0.weight"], torch.tensor([[2.0, 0.0], [4.0, 5.0]]))

    mask[1, 0] = False  # the mask moves (gradual pruning, dynamic sparsity): the average follows at once
    with torch.no_grad():
        weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    average.update(step=100)
    assert torch.equal(average.average["0.weight"], torch.tensor([[1.5, 0.0], [0.0, 3.5]]))

    # warm-up: at step 0 the decay is min(0.5, 1/10) = 0.1, so the new weights count 0.9
    with torch.no_grad():
        weight.copy_(torch.tensor([[11.5, 0.0], [0.0, 13.5]]))
    average.update(step=0)
    assert torch.allclose(average.average["0.weight"], torch.tensor([[10.5, 0.0], [0.0, 12.5]]))

    # floating-point buffers are averaged like weights
    model[1].running_mean.copy_(torch.tensor([4.0, -2.0]))  # the average still holds the initial zeros
    average.update(step=100)
    assert torch.equal(average.average["1.running_mean"], torch.tensor([2.0, -1.0]))

    trained = weight.detach().clone()
    with average.swapped_in(model):
        assert torch.equal(weight, average.average["0.weight"])
        assert torch.equal(model[1].running_mean, torch.tensor([2.0, -1.0]))
    assert torch.equal(weight, trained)
    assert torch.equal(model[1].running_mean, torch.tensor([4.0, -2.0]))


def test_weight_average_of_a_tied_weight_is_masked_whichever_name_the_mask_uses():
    from regrow.recovery.average import WeightAverage

    model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False))
    model[1].weight = model[0].weight  # tied: the state dict lists it as 0.weight and 1.weight
    mask = torch.ones(2, 2, dtype=torch.bool)
    masks = regrow.MaskSet({"1.weight": mask})  # named by its second name
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    average = WeightAverage(model, masks, decay=0.5)
    assert list(average.average) == ["0.weight"]  # averaged once
    mask[0, 1] = False
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 0.0], [5.0, 6.0]]))
    average.update(step=100)
    with average.swapped_in(model):
        assert torch.equal(model[1].weight, torch.tensor([[2.0, 0.0], [4.0, 5.0]]))
        assert model[1].weight is model[0].weight


def test_weight_average_of_half_precision_weights_keeps_small_updates():
    from regrow.recovery.average import WeightAverage

    model = torch.nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average = WeightAverage(model, regrow.MaskSet({}), decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.05)
    for step in range(10_000, 12_000):
        average.update(step)
    # float32 average: 1 + (w - 1) * (1 - 0.999 ** 2000), where bf16 would round each 5e-5 step away
    live = model.weight.detach().float()[0, 0].item()
    expected = 1.0 + (live - 1.0) * (1 - 0.999**2000)
    assert average.average["weight"].dtype == torch.float32
    assert average.average["weight"][0, 0].item() == pytest.approx(expected, abs=1e-4)


class MirrorAverage:
    """A second, independent average with the documented formula, and the trained weights, at each epoch end."""

    def __init__(self, decay, steps_per_epoch):
        self.decay, self.steps_per_epoch = decay, steps_per_epoch
        self.average, self.at_epoch = None, {}

    def on_train_start(self, state):
        self.average = {k: v.detach().clone() for k, v in state.model.state_dict().items()}

    def checkpoint_ready(self, state):
        return True

    def on_step_end(self, state):
        d = min(self.decay, (1 + state.step) / (10 + state.step))
        live = state.model.state_dict()
        for k in self.average:
            self.average[k] = d * self.average[k] + (1 - d) * live[k].detach()
            if k in state.masks:
                self.average[k] = self.average[k] * state.masks[k]
        if state.step % self.steps_per_epoch == 0:
            self.at_epoch[state.step // self.steps_per_epoch] = (
                {k: v.clone() for k, v in self.average.items()},
                {k: v.detach().clone() for k, v in live.items()},
            )


def _recover_with_ema(sparsity, epochs, callback):
    """Recover TinyMLP with ema=0.9 beside a mirror average; six steps per epoch."""
    torch.manual_seed(0)
    model = TinyMLP()
    train, val = make_batches(6), make_batches(3, seed=1)
    masks = regrow.prune(model, sparsity)
    mirror = MirrorAverage(0.9, steps_per_epoch=6)
    result = regrow.recover(
        model,
        masks,
        train,
        val,
        method="finetune",
        epochs=epochs,
        lr=0.05,
        ema=0.9,
        patience=None,
        callbacks=[callback, mirror],
        progress=False,
    )
    return model, masks, val, result, mirror


def test_ema_validates_keeps_and_returns_the_averaged_weights_with_the_masks_kept():
    from regrow.measure.metrics import classification_metrics

    gradual = regrow.GradualPruning(final=0.8, every=2, end=0.5)
    model, masks, val, result, mirror = _recover_with_ema(0.0, 6, gradual)
    assert masks.sparsity() == pytest.approx(0.8, abs=0.01)
    assert result.best_epoch >= 3  # the ramp ends at epoch 3; only then may an epoch be kept
    averaged, trained = mirror.at_epoch[result.best_epoch]
    for k, v in model.state_dict().items():
        assert torch.allclose(v, averaged[k], atol=1e-6), k
    assert any(not torch.allclose(model.state_dict()[k], trained[k]) for k in trained)
    for fqn, mask in masks.items():
        assert torch.count_nonzero(model.get_parameter(fqn)[~mask]) == 0
    metrics = classification_metrics(model, val)
    assert metrics["accuracy"] == result.best_val_accuracy
    assert metrics["loss"] == pytest.approx(result.history[result.best_epoch].val_loss, rel=1e-6)
    # validation saw the average, not the trained weights: their loss differs
    trained_model = copy.deepcopy(model)
    trained_model.load_state_dict(trained)
    assert classification_metrics(trained_model, val)["loss"] != pytest.approx(metrics["loss"], rel=1e-6)


class NeverReady:
    def on_train_start(self, state):
        pass

    def on_step_end(self, state):
        pass

    def checkpoint_ready(self, state):
        return False


def test_ema_with_no_epoch_kept_hands_back_the_last_average():
    from regrow.measure.metrics import classification_metrics

    model, _, val, result, mirror = _recover_with_ema(0.5, 3, NeverReady())
    averaged, _ = mirror.at_epoch[3]
    for k, v in model.state_dict().items():
        assert torch.allclose(v, averaged[k], atol=1e-6), k
    assert classification_metrics(model, val)["loss"] == pytest.approx(result.history[-1].val_loss, rel=1e-6)


def test_rigl_keeps_no_checkpoint_from_before_its_first_mask_update():
    # 30 steps an epoch, 5 epochs: updates every 60 steps until 0.75 of 150 = step 112, so one update, at step
    # 60, the end of epoch 2: epochs 0 and 1 (the pruned masks, untouched by the method) cannot be kept. The
    # validation labels are shifted, so training makes validation worse and epoch 0 would win without the rule.
    torch.manual_seed(0)
    model = TinyMLP()
    train, val = make_batches(30), [(x, (y + 1) % 3) for x, y in make_batches(4)]
    masks = regrow.prune(model, 0.8)
    dynamic = {"update_every": 60}
    result = regrow.recover(
        model, masks, train, val, method="rigl", epochs=5, patience=None, progress=False, dynamic=dynamic
    )
    kept = result.history[result.best_epoch]
    assert result.history[0].val_accuracy > max(h.val_accuracy for h in result.history[1:])
    assert kept.step == 60 and result.best_epoch == 2
    dynamic = result.details["dynamic"]
    assert dynamic["updates"] == 1 and dynamic["updates_after_kept_epoch"] == 0 and dynamic["weights_replaced"] > 0
    assert [h.step for h in result.history] == [0, 30, 60, 90, 120, 150]
