import pytest
import torch

import regrow
from conftest import TinyMLP, make_batches
from regrow.recovery.lr import constant, cosine
from regrow.schedules import cubic, iterative, one_shot


def test_one_shot():
    assert one_shot(0, final=0.9) == 0.9
    assert one_shot(1000, final=0.9) == 0.9


def test_cubic_values_at_chosen_steps():
    f = lambda t: cubic(t, final=0.9, begin=100, end=200, initial=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(100) == pytest.approx(0.1)
    assert f(150) == pytest.approx(0.9 - 0.8 * 0.125)  # (1 - 1/2)^3 = 1/8 of the gap left
    assert f(175) == pytest.approx(0.9 - 0.8 / 64)
    assert f(200) == pytest.approx(0.9)
    assert f(10_000) == pytest.approx(0.9)


def test_iterative_removes_the_same_fraction_of_survivors_each_round():
    values = [iterative(r, final=0.9, rounds=3) for r in (0, 1, 2, 3)]
    assert values == pytest.approx([0.0, 1 - 0.1 ** (1 / 3), 1 - 0.1 ** (2 / 3), 0.9])


def test_lr_cosine_with_warmup_values():
    from regrow.recovery.lr import LRContext, default_original

    ctx = LRContext(total_steps=110, steps_per_epoch=10, warmup_steps=10, lr=2.0, original=default_original(2.0, 11))
    f = cosine(ctx)
    assert f(0) == pytest.approx(0.2)
    assert f(9) == pytest.approx(2.0)
    assert f(10) == pytest.approx(2.0)
    assert f(60) == pytest.approx(1.0)
    assert f(110) == pytest.approx(0.0)
    g = constant(
        LRContext(total_steps=100, steps_per_epoch=10, warmup_steps=4, lr=1.0, original=default_original(1.0, 10))
    )
    assert [g(0), g(3), g(50)] == pytest.approx([0.25, 1.0, 1.0])


def test_gradual_pruning_reaches_the_final_sparsity_monotonically():
    torch.manual_seed(0)
    model = TinyMLP()
    train, val = make_batches(10), make_batches(2, seed=1)
    masks = regrow.prune(model, 0.0)

    seen = []

    class Watch:
        def on_train_start(self, state):
            pass

        def on_step_end(self, state):
            seen.append((state.step, state.masks.sparsity(), {f: m.clone() for f, m in state.masks.items()}))

        def checkpoint_ready(self, state):
            return True

    gradual = regrow.GradualPruning(final=0.8, every=5, begin=0.0, end=0.5)
    result = regrow.recover(
        model, masks, train, val, method="finetune", epochs=4, progress=False, callbacks=[gradual, Watch()]
    )
    sparsities = [s for _, s, _ in seen]
    assert sparsities == sorted(sparsities)  # never decreases
    assert sparsities[-1] == pytest.approx(0.8, abs=0.01)
    # the ramp ends at step 20 of 40; the update at step 10 follows the cubic curve
    s10 = dict((step, s) for step, s, _ in seen)[10]
    assert s10 == pytest.approx(cubic(10, final=0.8, begin=0, end=20), abs=0.01)
    for (_, _, before), (_, _, after) in zip(seen, seen[1:]):  # a pruned weight never comes back
        assert all(not (after[f] & ~before[f]).any() for f in before)
    # checkpoints only count once the final sparsity is reached
    assert result.best_epoch >= 2
    assert (model.fc1.weight == 0).float().mean() > 0.5
