import math

import pytest
import torch

import regrow
from conftest import TinyMLP, make_batches
from regrow.errors import RegrowError
from regrow.recovery.losses import distillation_loss


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
