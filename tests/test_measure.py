import pytest
import torch
from torch import nn

import regrow
from conftest import TinyCNN, TinyMLP, make_batches
from regrow.measure.cost import count_params, dense_macs, size_bytes, sparse_size_bytes
from regrow.measure.latency import measure_latency


def test_params_and_nonzeros_are_exact():
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0, 0, 2], [0, 0, 0, 0], [3, 0, 0, 0]]))
        model.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    assert count_params(model) == (15, 4)


def test_tied_parameters_count_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    assert count_params(model) == (40, 40)


def test_dense_macs_of_linear_and_conv():
    mlp = TinyMLP()  # 8*16 + 16*16 + 16*3 multiply-accumulates per sample
    assert dense_macs(mlp, torch.zeros(1, 8)) == 8 * 16 + 16 * 16 + 16 * 3
    cnn = TinyCNN()  # conv1: 4 out * 9 taps * 1 in * 64 px; conv2: 8 * 9 * 4 * 64; fc: 128 * 3
    assert dense_macs(cnn, torch.zeros(1, 1, 8, 8)) == 4 * 9 * 64 + 8 * 9 * 4 * 64 + 128 * 3


class ClassToken(nn.Module):
    """CaiT's class-attention stage: a learned token, expanded per sample, is an input of a child module."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, 4))
        self.block = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.token.expand(x.shape[0], -1, -1)).squeeze(1) + x.sum()


def test_dense_macs_of_a_module_fed_a_view_of_a_parameter():
    # Was: under no_grad that view requires grad but has no gradient function, the counter's module tracker
    # asserted it had one, and timm's CaiT had "MACs that could not be counted" (no macs= budget at all).
    assert dense_macs(ClassToken(), torch.zeros(2, 5)) == 2 * 4 * 3
    with torch.no_grad():  # the caller's grad mode is its own again afterwards
        assert dense_macs(ClassToken(), torch.zeros(2, 5)) == 2 * 4 * 3 and not torch.is_grad_enabled()


def test_pruning_does_not_change_dense_macs():
    mlp = TinyMLP()
    before = dense_macs(mlp, torch.zeros(1, 8))
    regrow.prune(mlp, 0.9, scope="layer")  # global would empty fc2 (smaller weights) and warn
    assert dense_macs(mlp, torch.zeros(1, 8)) == before


def test_sizes():
    mlp = TinyMLP()
    dense = size_bytes(mlp)
    n_params = sum(p.numel() for p in mlp.parameters())
    assert n_params * 4 < dense < n_params * 4 + 1024  # float32 payload + a small JSON header
    regrow.prune(mlp, 0.9)
    assert size_bytes(mlp) == dense  # zeros are still stored
    targets = ["fc1.weight", "fc2.weight"]
    expected = 0
    for name, t in mlp.state_dict().items():
        if name in targets:
            expected += int((t != 0).sum()) * 4 + (t.numel() + 7) // 8
        else:
            expected += t.numel() * 4
    assert sparse_size_bytes(mlp, targets) == expected


def test_latency_records_how_it_was_measured():
    lat = measure_latency(TinyMLP(), torch.zeros(5, 8), repeats=7, warmup=2, min_seconds=0.0)
    assert lat.batch_size == 5 and lat.repeats == 7 and lat.warmup == 2
    assert lat.threads == torch.get_num_threads() and lat.device == "cpu"
    assert 0 < lat.p10_ms <= lat.median_ms <= lat.p90_ms


def test_fast_models_get_more_repeats_until_enough_time_is_measured(monkeypatch):
    import regrow.measure.latency as latency

    clock = iter(range(0, 10**6))  # a fake clock: every timed forward pass takes exactly 1/1024 s
    monkeypatch.setattr(latency.time, "perf_counter", lambda: next(clock) / 1024.0)
    lat = latency.measure_latency(TinyMLP(), torch.zeros(5, 8), repeats=7, warmup=0, min_seconds=64 / 1024)
    assert lat.repeats == 64 and lat.median_ms == pytest.approx(1000 / 1024)
    capped = latency.measure_latency(
        TinyMLP(), torch.zeros(5, 8), repeats=7, warmup=0, min_seconds=10.0, max_repeats=30
    )
    assert capped.repeats == 30


def test_evaluate_snapshot():
    torch.manual_seed(0)
    model = TinyMLP()
    data = make_batches(3, batch=10)
    masks = regrow.prune(model, 0.5, scope="layer")
    snap = regrow.evaluate(model, data, masks=masks, stage="pruned", latency_batch_size=25, repeats=3)
    assert snap.samples == 30
    assert 0.0 <= snap.accuracy <= 1.0 and snap.loss > 0
    assert snap.per_target_sparsity == {"fc1.weight": 0.5, "fc2.weight": 0.5}
    assert snap.target_sparsity == 0.5
    assert snap.latency.batch_size == 25  # more than one batch: batches are concatenated
    assert snap.macs == 8 * 16 + 16 * 16 + 16 * 3
    assert snap.nonzero_params == count_params(model)[1]


def test_evaluate_accuracy_is_exact():
    class Const(nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, 1.0]]).expand(x.shape[0], 2)

    data = [(torch.zeros(4, 1), torch.tensor([1, 1, 0, 1]))]
    snap = regrow.evaluate(Const(), data, targets=[], latency=False)
    assert snap.accuracy == 0.75
    assert snap.loss == pytest.approx(
        torch.nn.functional.cross_entropy(torch.tensor([[0.0, 1.0]] * 4), torch.tensor([1, 1, 0, 1])).item()
    )


@pytest.mark.parametrize(
    "drop, gained, expected",
    [
        (-0.01, 0.02, "Pruning cost no test accuracy (change +1.00 points)."),
        (0.0, 0.0, "Pruning cost no test accuracy (change +0.00 points)."),  # never "-0.00"
        (0.10, 0.05, "recovery won back 5.00 points, 50.0% of the drop."),
        (0.10, 0.12, "recovery won back all of it and 2.00 points more."),
        (0.10, -0.01, "recovery did not win any of it back (change during recovery -1.00 points)."),
    ],
)
def test_report_sentence_on_the_drop_and_what_recovery_won_back(drop, gained, expected):
    from regrow.report.markdown import recovery_sentence

    frac = None if drop <= 0 else gained / drop
    assert recovery_sentence(drop, gained, frac).endswith(expected)


def test_environment_names_the_regrow_version_also_from_a_source_checkout(monkeypatch):
    from importlib import metadata

    import regrow
    from regrow.report import environment

    assert environment()["regrow"] == metadata.version("regrow")

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    env = environment()
    assert env["regrow"] == f"{regrow.__version__} (source, not installed)" and env["numpy"] is None


@pytest.mark.parametrize("need_weights", [False, True])
def test_dense_macs_of_multihead_attention_by_hand(need_weights):
    from regrow.measure.cost import dense_macs
    from regrow.structural.attention import convert_attention

    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(16, 4, batch_first=True)
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.att(x, x, x, need_weights=need_weights)[0].mean(1))

    # per sample, 5 tokens of width 16, 4 heads of 4: q/k/v projections 5*16*48, scores 4*5*5*4,
    # weighted values 4*5*5*4, output projection 5*16*16, classifier 16*3
    per_sample = 5 * 16 * 48 + 2 * 4 * 5 * 5 * 4 + 5 * 16 * 16 + 16 * 3
    model, x = Attend(), torch.randn(2, 5, 16)
    assert dense_macs(model, x) == 2 * per_sample  # also through the fused inference path of eval mode
    convert_attention(model)  # regrow's head-prunable equivalent counts the same
    assert dense_macs(model, x) == 2 * per_sample


@pytest.mark.parametrize("torch_formula", ["installed", "without grouped-query heads"])
def test_dense_macs_of_grouped_query_attention_by_hand(monkeypatch, torch_formula):
    from torch.nn import functional as F
    from torch.utils import flop_counter

    from regrow.measure.cost import dense_macs

    if "enable_gqa" not in (F.scaled_dot_product_attention.__doc__ or ""):
        pytest.skip("this torch has no enable_gqa")
    if torch_formula != "installed":  # torch before 2.13 asserted that q, k and v have as many heads
        torch_count = flop_counter.sdpa_flop_count

        def strict(query_shape, key_shape, value_shape):
            assert query_shape[1] == key_shape[1] == value_shape[1], "query/key/value shapes are incompatible"
            return torch_count(query_shape, key_shape, value_shape)

        monkeypatch.setattr(flop_counter, "sdpa_flop_count", strict)

    class Grouped(nn.Module):  # 4 query heads share 2 key/value heads, head dim 8, 6 tokens
        def __init__(self):
            super().__init__()
            self.q, self.kv = nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, x):
            q = self.q(x).view(2, 6, 4, 8).transpose(1, 2)
            k, v = self.kv(x).view(2, 6, 2, 2, 8).permute(3, 0, 2, 1, 4)
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    # per sample: projections 6*32*32 twice, scores 4*6*6*8, weighted values 4*6*6*8 (each query head its own)
    per_sample = 2 * 6 * 32 * 32 + 2 * 4 * 6 * 6 * 8
    assert dense_macs(Grouped(), torch.randn(2, 6, 32)) == 2 * per_sample


def test_evaluate_refuses_a_one_shot_iterator():
    batches = make_batches(3)
    with pytest.raises(regrow.RegrowError, match="one-shot iterator"):
        regrow.evaluate(TinyMLP(), iter(batches), latency=False)


def test_the_speed_pair_is_timed_at_batch_1_too_and_a_slower_shrunk_model_is_named():
    import time

    from regrow.config import EvaluateConfig
    from regrow.pipeline.context import Timer
    from regrow.pipeline.measure import compare_speed

    class Slow(torch.nn.Module):  # a "shrunk" model whose every forward pass costs 2 ms more
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            time.sleep(0.002)
            return self.inner(x)

    dense = torch.nn.Sequential(torch.nn.Linear(8, 4))
    test = [(torch.randn(16, 8), torch.zeros(16, dtype=torch.long))]
    ev = EvaluateConfig(repeats=5, warmup=1)
    speed = compare_speed(dense, Slow(dense), test, ev, "cpu", True, Timer())
    assert [r["batch_size"] for r in speed["batches"]] == [16, 1]
    assert speed["speedup"] == speed["batches"][0]["speedup"] < 0.95
    assert len(speed["slower"]) == 2 and "at batch 1 on cpu" in speed["slower"][1]
    masked = compare_speed(dense, Slow(dense), test, ev, "cpu", False, Timer())  # same shapes: no claim either way
    assert masked["slower"] == []
    assert compare_speed(dense, dense, test, EvaluateConfig(latency=False), "cpu", True, Timer()) is None


def test_noisy_timings_withhold_the_speed_up_claim(monkeypatch):
    """Injected noise: every third forward pass, of either model, is held up 20 ms (a busy machine's
    preemptions). The interleaved pairs then disagree, and neither the report nor the summary claims a speed-up."""
    import time

    import regrow.measure.latency as latency
    from regrow.config import EvaluateConfig
    from regrow.pipeline.context import Timer
    from regrow.pipeline.measure import compare_speed
    from regrow.report.speed import measured_speedup

    real, calls = latency.forward, [0]

    def held_up(model, inputs):
        calls[0] += 1
        if calls[0] % 3 == 0:
            time.sleep(0.02)
        return real(model, inputs)

    monkeypatch.setattr(latency, "forward", held_up)
    dense = torch.nn.Sequential(torch.nn.Linear(8, 256), torch.nn.ReLU(), torch.nn.Linear(256, 3))
    shrunk = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    test = [(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))]
    speed = compare_speed(dense, shrunk, test, EvaluateConfig(warmup=1), "cpu", True, Timer())
    assert speed["noisy"].startswith("the speed-ups of the 30 interleaved pairs spread from")
    assert speed["slower"] == []  # no "slower than dense" warning from noise either
    text = "\n".join(measured_speedup(speed))
    assert "**No speed-up claimed:** the CPU timings were noisy (the speed-ups of the 30 interleaved pairs" in text
    assert "speed-up, baseline / recovered" not in text
    # a masked pattern keeps dense shapes: a steady ratio is still only a timing ratio
    steady = dict(speed, noisy=None, shrunk=False)
    (line,) = [t for t in measured_speedup(steady) if t]
    assert line.startswith("Measured CPU timing ratio, baseline / recovered:") and "not a speed-up" in line
