"""The calibrated criteria: Wanda and SparseGPT, on hand-sized layers and tiny models, layer by layer."""

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import regrow
import regrow.criteria.calibration as calibration
from regrow.criteria.sparsegpt import sparsegpt_layer
from regrow.errors import RegrowError
from regrow.patterns import get_pattern, pruned_count

pytestmark = pytest.mark.filterwarnings("ignore::regrow.errors.SpeedWarning")


def one_linear(weight: torch.Tensor) -> nn.Sequential:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return nn.Sequential(layer)


def as_batches(x: torch.Tensor, n: int = 1) -> list:
    return [(chunk, torch.zeros(len(chunk), dtype=torch.long)) for chunk in x.chunk(n)]


# Four inputs whose norms over the calibration rows are 1, 2, 0.5 and 4.
X4 = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0.5, 0], [0, 0, 0, 4.0]])
W4 = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]])


def test_wanda_score_and_mask_on_a_hand_sized_layer():
    model = one_linear(W4)
    scores = regrow.criteria.CRITERIA.get("wanda")(model, ["0.weight"], as_batches(X4))
    assert torch.equal(scores["0.weight"], torch.tensor([[1.0, 4.0, 1.5, 2.0], [4.0, 2.0, 0.5, 8.0]]))
    masks = regrow.prune(model, 0.5, criterion="wanda", targets="0.weight", data=as_batches(X4, 2))
    # each row loses its two lowest scores: row 0 columns 0 and 2, row 1 columns 2 and 1
    assert masks.spec.scope == "row"
    assert torch.equal(masks["0.weight"], torch.tensor([[False, True, False, True], [True, False, False, True]]))
    assert torch.equal(model[0].weight, W4 * masks["0.weight"])  # kept weights unchanged
    # magnitude keeps the weight of 3.0 on the weak third input instead of the 0.5 on the strong fourth one
    by_magnitude = regrow.prune(one_linear(W4), 0.5, targets="0.weight")
    assert torch.equal(by_magnitude["0.weight"], torch.tensor([[False, True, True, False], [True, False, False, True]]))


def test_wanda_scope_layer_ranks_the_whole_layer():
    masks = regrow.prune(one_linear(W4), 0.5, criterion="wanda", scope="layer", targets="0.weight", data=as_batches(X4))
    # scores 1, 4, 1.5, 2 / 4, 2, 0.5, 8: the four lowest are 0.5, 1, 1.5, then the first 2 in row-major order
    assert torch.equal(masks["0.weight"], torch.tensor([[False, True, False, False], [True, True, False, True]]))


def test_wanda_n_m_keeps_the_two_best_of_every_four_inputs():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5, 1.0, 1.0, 1.0, 1.0]])
    x = torch.diag(torch.tensor([1.0, 2.0, 0.5, 4.0, 1.0, 3.0, 2.0, 0.1]))  # input norms on the diagonal
    masks = regrow.prune(one_linear(w), pattern="2:4", criterion="wanda", targets="0.weight", data=as_batches(x))
    # scores 1, 4, 1.5, 2 | 1, 3, 2, 0.1
    assert masks["0.weight"].tolist() == [[False, True, False, True, False, True, True, False]]


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_wanda_calibrates_each_layer_on_the_outputs_of_the_pruned_layers_before_it():
    torch.manual_seed(0)
    model = Chain()
    x = torch.randn(40, 6)
    expected = copy.deepcopy(model)
    with torch.no_grad():  # by hand: prune fc1 from x, then fc2 from the pruned fc1's output
        pat = get_pattern("unstructured")
        s1 = expected.fc1.weight.abs() * x.norm(dim=0)
        m1 = pat.make_masks({"a": s1}, sparsity=0.5, threshold=None, scope="row")["a"]
        expected.fc1.weight.mul_(m1)
        h = torch.relu(expected.fc1(x))
        s2 = expected.fc2.weight.abs() * h.norm(dim=0)
        m2 = pat.make_masks({"b": s2}, sparsity=0.5, threshold=None, scope="row")["b"]
        dense_h = torch.relu(model.fc1(x))
        m2_dense = pat.make_masks(
            {"b": expected.fc2.weight.abs() * dense_h.norm(dim=0)}, sparsity=0.5, threshold=None, scope="row"
        )["b"]
    masks = regrow.prune(model, 0.5, criterion="wanda", data=as_batches(x, 4))
    assert torch.equal(masks["fc1.weight"], m1)
    assert torch.equal(masks["fc2.weight"], m2)
    assert not torch.equal(m2, m2_dense)  # the case tells the two orders apart


def correlated_inputs(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols // 4, generator=g)
    mix = torch.randn(cols // 4, cols, generator=g)
    return base @ mix + 0.3 * torch.randn(rows, cols, generator=g)


def output_error(x: torch.Tensor, w: torch.Tensor, new: torch.Tensor) -> float:
    return float((x @ (new - w).t()).norm() / (x @ w.t()).norm())


def test_sparsegpt_with_an_identity_hessian_is_magnitude_pruning():
    torch.manual_seed(1)
    w = torch.randn(6, 16)
    gram = torch.eye(16) * 3.0  # uncorrelated inputs of equal norm: no error to spread
    keep, new = sparsegpt_layer(w, gram, sparsity=0.5, block_size=4)
    by_magnitude = get_pattern("unstructured").make_masks({"w": w.abs()}, sparsity=0.5, threshold=None, scope="layer")
    # the same count per block of 4 columns: compare within each block
    for start in range(0, 16, 4):
        block = w[:, start : start + 4].abs()
        lowest = torch.sort(block.reshape(-1), stable=True).indices[: block.numel() // 2]
        expect = torch.ones(block.numel(), dtype=torch.bool)
        expect[lowest] = False
        assert torch.equal(keep[:, start : start + 4].reshape(-1), expect)
    assert torch.equal(new, w * keep)  # kept weights unchanged
    assert int((~keep).sum()) == int((~by_magnitude["w"]).sum()) == 48


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_the_output_better_than_magnitude_and_wanda(pattern):
    torch.manual_seed(2)
    x = correlated_inputs(1024, 64)
    w = torch.randn(24, 64)
    nm = (2, 4) if pattern == "2:4" else None
    keep, new = sparsegpt_layer(w, x.t() @ x, sparsity=0.5, nm=nm, block_size=16)
    pat = get_pattern(pattern)
    magnitude = pat.make_masks({"w": w.abs()}, sparsity=0.5, threshold=None, scope="layer")["w"]
    wanda = pat.make_masks({"w": w.abs() * x.norm(dim=0)}, sparsity=0.5, threshold=None, scope="row")["w"]
    errors = {
        "sparsegpt": output_error(x, w, new),
        "magnitude": output_error(x, w, w * magnitude),
        "wanda": output_error(x, w, w * wanda),
    }
    assert int((~keep).sum()) == int((~magnitude).sum()) == 24 * 32
    assert torch.equal(new == 0, ~keep | (new == 0))  # pruned weights are exactly zero
    assert bool((new[~keep] == 0).all())
    assert errors["sparsegpt"] < 0.75 * errors["wanda"] < errors["magnitude"], errors
    if nm:
        assert bool((keep.reshape(24, 16, 4).sum(-1) == 2).all())


@pytest.mark.parametrize("scope", ["layer", "row"])
def test_sparsegpt_counts_add_up_over_uneven_blocks(scope):
    torch.manual_seed(3)
    x = correlated_inputs(256, 50)
    w = torch.randn(7, 50)
    keep, _ = sparsegpt_layer(w, x.t() @ x, sparsity=0.7, scope=scope, block_size=16)  # blocks 16, 16, 16, 2
    if scope == "layer":
        assert int((~keep).sum()) == pruned_count(0.7, 350)
    else:
        assert (~keep).sum(1).tolist() == [pruned_count(0.7, 50)] * 7


def test_sparsegpt_keeps_earlier_masks_pruned():
    torch.manual_seed(4)
    x = correlated_inputs(256, 32)
    w = torch.randn(8, 32)
    forced = torch.zeros(8, 32, dtype=torch.bool)
    forced[:, :3] = True  # the three first inputs were pruned before, whatever their saliency
    keep, new = sparsegpt_layer(w, x.t() @ x, sparsity=0.5, forced=forced, block_size=8)
    assert not bool(keep[:, :3].any())
    assert int((~keep).sum()) == 128


def test_sparsegpt_refuses_a_hessian_it_cannot_factor():
    gram = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # indefinite: no Cholesky factor even with 1 % dampening
    with pytest.raises(RegrowError, match="raise the calibration dampening"):
        sparsegpt_layer(torch.ones(2, 2), gram, sparsity=0.5)


class Block(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, h, scale):
        return h + scale * self.down(torch.relu(self.up(self.norm(h))))


class Stack(nn.Module):
    """Embedding, a ModuleList of blocks called as a chain (with a shared keyword argument), and a head."""

    def __init__(self, layers: int = 3, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(layers))
        self.proj = nn.Linear(width, width)
        self.head = nn.Linear(width, 32)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        scale = torch.ones(())
        for layer in self.layers:
            h = layer(h, scale=scale)
        return self.head(torch.relu(self.proj(h)))


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_cached_block_inputs_give_what_full_passes_give(monkeypatch, criterion, pattern):
    torch.manual_seed(5)
    model = Stack()
    data = [{"input_ids": torch.randint(0, 32, (4, 12))} for _ in range(3)]
    sparsity = 0.5 if pattern == "unstructured" else None
    order = calibration._call_order
    seen = []

    def spy(*args, **kwargs):
        result = order(*args, **kwargs)
        seen.append(result[1])
        return result

    monkeypatch.setattr(calibration, "_call_order", spy)
    fast = copy.deepcopy(model)
    masks = regrow.prune(fast, sparsity, pattern=pattern, criterion=criterion, data=data)
    monkeypatch.setattr(calibration, "_call_order", lambda *a, **k: (order(*a, **k)[0], False))
    slow = copy.deepcopy(model)
    masks_slow = regrow.prune(slow, sparsity, pattern=pattern, criterion=criterion, data=data)
    assert seen == [True]  # the blocks were recognised as a chain and their inputs cached
    assert sorted(masks) == [
        "layers.0.down.weight",
        "layers.0.up.weight",
        "layers.1.down.weight",
        "layers.1.up.weight",
        "layers.2.down.weight",
        "layers.2.up.weight",
        "proj.weight",
    ]
    for f in masks:
        assert torch.equal(masks[f], masks_slow[f]), f
        assert torch.allclose(fast.get_parameter(f), slow.get_parameter(f), atol=1e-6), f


def test_blocks_not_called_as_a_chain_take_full_passes():
    class Twice(Stack):
        def forward(self, input_ids):
            h = self.embed(input_ids)
            for layer in [*self.layers, self.layers[0]]:  # the first block runs twice
                h = layer(h, scale=torch.ones(()))
            return self.head(self.proj(h))

    torch.manual_seed(6)
    model = Twice()
    data = [torch.randint(0, 32, (4, 12))]
    order, chain = calibration._call_order(
        model,
        calibration.target_modules(model, ["layers.0.up.weight"], "wanda"),
        calibration._blocks(model, ["layers.0.up.weight"]),
        data[0],
    )
    assert order == ["layers.0.up.weight"] and chain is False
    masks = regrow.prune(model, 0.5, criterion="wanda", data=[(d, d) for d in data])
    assert all(abs(1 - float(m.float().mean()) - 0.5) < 0.02 for m in masks.values())


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_conv_n_m_groups_run_across_input_channels(tiny_cnn_batches, criterion):
    model, data = tiny_cnn_batches
    masks = regrow.prune(model, pattern="2:4", criterion=criterion, targets="conv2.weight", data=data)
    keep = masks["conv2.weight"]  # (8 outputs, 4 inputs, 3, 3): at each kernel position, 2 of the 4 channels
    assert keep.shape == (8, 4, 3, 3)
    assert bool((keep.sum(1) == 2).all())
    if criterion == "wanda":
        x = torch.cat([torch.relu(model.conv1(b[0])) for b in data])  # conv1 is not a target: dense
        cols = torch.nn.functional.unfold(x, 3, padding=1).reshape(len(x), 4, 9, -1)
        norms = cols.pow(2).sum((0, 3)).sqrt().reshape(4, 3, 3)
        score = masks.dense.get_parameter("conv2.weight").abs() * norms
        expect = get_pattern("2:4").make_masks({"c": score}, sparsity=None, threshold=None, scope="row")["c"]
        assert torch.equal(keep, expect)


@pytest.fixture
def tiny_cnn_batches():
    from conftest import TinyCNN

    torch.manual_seed(7)
    return TinyCNN(), [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))) for _ in range(2)]


def test_sparsegpt_of_an_allocation_gives_each_target_its_share(mlp, batches):
    allocation = {"fc1.weight": 0.2, "fc2.weight": 0.8}
    masks = regrow.prune(mlp, 0.5, criterion="sparsegpt", allocation=allocation, data=batches)
    per_target = masks.spec.per_target(mlp)
    for f, m in masks.items():
        assert int((~m).sum()) == pruned_count(per_target[f], m.numel())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"criterion": "wanda"}, "criterion 'wanda' needs calibration data"),
        ({"criterion": "sparsegpt", "data": []}, "got an empty data iterable"),
        ({"criterion": "wanda", "targets": "fc1.bias", "data": True}, "target 'fc1.bias' is the 'bias' of a Linear"),
        ({"criterion": "sparsegpt", "threshold": 0.1, "data": True}, "a threshold on them means nothing"),
        ({"criterion": "magnitude", "calibration": {"batches": 4}}, "criterion 'magnitude' takes none"),
        ({"criterion": "wanda", "calibration": {"batches": 0}, "data": True}, "calibration batches must be a whole"),
        (
            {"criterion": "sparsegpt", "calibration": {"dampening": -1}, "data": True},
            "dampening must be a number above",
        ),
        ({"criterion": "wanda", "scope": "columns", "data": True}, "unknown scope 'columns'"),
    ],
)
def test_bad_calibrated_requests_are_refused(mlp, batches, kwargs, message):
    kwargs = {("sparsity" if "threshold" not in kwargs else "threshold"): 0.5, **kwargs}
    if kwargs.get("data") is True:
        kwargs["data"] = batches
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(RegrowError, match=message):
        regrow.prune(mlp, **kwargs)
    assert all(torch.equal(v, mlp.state_dict()[k]) for k, v in before.items())  # nothing changed


def test_unused_target_is_named(batches):
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)
            self.spare = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(RegrowError, match="target 'spare.weight' was never called"):
        regrow.prune(Unused(), 0.5, criterion="wanda", targets=["spare.weight"], data=batches)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, torch, warnings
    from pathlib import Path
    from torch import nn
    import regrow
    warnings.simplefilter("ignore")
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(64, 1024), nn.Linear(1024, 64)
        def forward(self, h):
            return h + self.down(torch.relu(self.up(h)))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(8))
            self.head = nn.Linear(64, 4)
        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return self.head(x)

    model = Model()
    data = [(torch.randn(32, 64, 64), torch.zeros(32, dtype=torch.long)) for _ in range(16)]
    with torch.no_grad():
        model(data[0][0])  # torch's one-time set-up is not the pruning's
    def kib(field):
        lines = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in lines if line.startswith(field))

    Path("/proc/self/clear_refs").write_text("5")  # the peak resident size restarts from the current one
    before = kib("VmRSS:")
    regrow.prune(model, 0.5, criterion=sys.argv[1], data=data, keep_dense=False, calibration={"batches": 16})
    print((kib("VmHWM:") - before) / 1024)
    """
)


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_layer_by_layer_peak_memory_stays_far_below_the_full_activations(tmp_path, criterion):
    # 16 batches x 2,048 tokens: the inputs of every target over all calibration tokens take 8 x (64 + 1,024)
    # x 32,768 x 4 bytes = 1,088 MiB; layer by layer holds the blocks' inputs and outputs (2 x 8 MiB), one
    # batch's activations in a block (a few 8 MiB tensors) and, for sparsegpt, one 1,024² Gram matrix and its
    # float64 factorisation (4 + 3 x 8 MiB). Measured: about 45 MiB (wanda) and 60 MiB (sparsegpt).
    full_mib = 8 * (64 + 1024) * 32768 * 4 / 2**20
    bound_mib = 128
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident size")
    script = tmp_path / "peak.py"
    script.write_text(MEMORY_SCRIPT)
    # A fixed mmap threshold makes glibc return every freed buffer of 1 MiB or more at once, so that the peak
    # resident size follows the live tensors (by default it keeps recycled 8 MiB buffers and grows regardless).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(script), criterion], capture_output=True, text=True, timeout=300, check=True, env=env
    )
    grown = float(out.stdout.strip().splitlines()[-1])
    assert full_mib > 8 * bound_mib
    assert grown < bound_mib, f"peak memory grew by {grown:.0f} MiB while pruning"


def test_a_llama_decoder_is_pruned_block_by_block(monkeypatch):
    from conftest import tiny_llama

    model = tiny_llama(seed=8)
    data = [{"input_ids": torch.randint(0, 64, (2, 16))} for _ in range(2)]
    order = calibration._call_order
    seen = []
    monkeypatch.setattr(calibration, "_call_order", lambda *a, **k: seen.append(order(*a, **k)) or seen[-1])
    masks = regrow.prune(model, pattern="2:4", criterion="sparsegpt", data=data)
    assert seen[0][1] is True  # the decoder layers run as a chain: their inputs were cached, not recomputed
    assert len(masks) == 14 and "lm_head.weight" not in masks  # 7 projections per layer; the head is left
    for f, keep in masks.items():
        assert bool((keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()), f
    assert model.config.use_cache is True  # switched off while calibrating, then restored


def test_a_recipe_runs_with_a_calibrated_criterion_and_sensitivity(tmp_path, capsys):
    from regrow.cli import main

    out = tmp_path / "run"
    argv = ["--set", "prune.criterion=sparsegpt", "--set", "prune.allocation=sensitivity"]
    code = main(
        ["run", "demo", *argv, "--set", "recover.epochs=1", "--set", "prune.calibration={batches: 4}"]
        + ["--out", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    report = (out / "report.md").read_text()
    assert "criterion `sparsegpt`, scope `layer`" in report
    import json

    prune = json.loads((out / "report.json").read_text())["prune"]
    assert prune["calibration"] == {"batches": 4, "dampening": 0.01, "block_size": 128}
    assert prune["sensitivity"]["criterion"] == "sparsegpt"


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 layer as it is written there: a Linear whose weight is stored (inputs, outputs)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class TwoConv1D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = Conv1D(12, 8)  # 8 inputs -> 12 outputs
        self.b = Conv1D(4, 12)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
def test_transposed_linear_layers_get_n_m_groups_along_their_inputs(criterion):
    torch.manual_seed(9)
    model = TwoConv1D()
    assert regrow.select.default_targets(model) == ["a.weight"]  # b is the final classifier
    data = [(torch.randn(16, 8), torch.zeros(16, dtype=torch.long)) for _ in range(2)]
    masks = regrow.prune(model, pattern="2:4", criterion=criterion, data=data)
    keep = masks["a.weight"]  # (8 inputs, 12 outputs): for each output, 2 of every 4 consecutive inputs
    assert keep.shape == (8, 12) and bool((keep.reshape(2, 4, 12).sum(1) == 2).all())
    if criterion == "magnitude":
        expect = get_pattern("2:4").make_masks(
            {"w": model.a.weight.t().abs()}, sparsity=None, threshold=None, scope="layer"
        )
        assert torch.equal(keep, expect["w"].t())


def test_row_scope_on_a_transposed_linear_counts_per_output():
    torch.manual_seed(10)
    model = TwoConv1D()
    masks = regrow.prune(model, 0.25, scope="row", targets="a.weight")
    assert (~masks["a.weight"]).sum(0).tolist() == [2] * 12  # each of the 12 outputs loses 2 of its 8 inputs


def test_gpt2_conv1d_layers_are_default_targets_and_pruned_along_their_inputs():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                     eos_token_id=0)  # fmt: skip
    torch.manual_seed(11)
    model = transformers.GPT2LMHeadModel(config).eval()
    targets = regrow.select.default_targets(model)
    assert len(targets) == 8 and all(t.startswith("transformer.h.") for t in targets)  # c_attn, c_proj, c_fc, c_proj
    data = [{"input_ids": torch.randint(0, 64, (2, 16))} for _ in range(2)]
    masks = regrow.prune(model, pattern="2:4", criterion="sparsegpt", data=data)
    for f, keep in masks.items():
        rows, cols = keep.shape  # stored (inputs, outputs)
        assert bool((keep.reshape(rows // 4, 4, cols).sum(1) == 2).all()), f


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_a_rising_schedule_only_ever_removes_more(mlp, batches, criterion):
    from regrow.prune import compute_masks

    first = regrow.prune(mlp, 0.5, criterion=criterion, data=batches)
    more = compute_masks(mlp, first.spec.with_sparsity(0.8), batches, previous=first)
    for f, keep in more.items():
        assert not bool((keep & ~first[f]).any()), f  # nothing pruned before comes back
        if criterion == "sparsegpt":  # layer scope: exactly the budget
            assert int((~keep).sum()) == pruned_count(0.8, keep.numel()), f
        else:  # row scope: each row rounds up on its own
            assert int((~keep).sum()) == keep.shape[0] * pruned_count(0.8, keep[0].numel()), f


def test_a_failure_halfway_leaves_the_model_as_it_was(monkeypatch):
    torch.manual_seed(12)
    model = Chain()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = calibration.Statistics.add
    calls = []

    def fail_on_the_second_layer(self, x):
        calls.append(x.shape[-1])
        if x.shape[-1] == 8:  # fc2's inputs: fc1 is already pruned by now
            raise RuntimeError("boom")
        real(self, x)

    monkeypatch.setattr(calibration.Statistics, "add", fail_on_the_second_layer)
    with pytest.raises(RuntimeError, match="boom"):
        regrow.prune(model, 0.5, criterion="sparsegpt", data=as_batches(torch.randn(40, 6), 2))
    assert 6 in calls and 8 in calls
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_conv_padding_the_statistics_cannot_follow_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding="same"), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    data = [(torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(RegrowError, match=r"Conv2d \(groups 1, zero padding given as numbers\)"):
        regrow.prune(model, 0.5, criterion="wanda", data=data)


@pytest.mark.parametrize("scope", ["layer", "row"])
def test_an_uneven_earlier_mask_is_not_pruned_past_the_request(scope):
    torch.manual_seed(13)
    x = correlated_inputs(512, 64)
    w = torch.randn(16, 64)
    earlier = get_pattern("unstructured").make_masks({"w": w.abs()}, sparsity=0.45, threshold=None, scope="layer")["w"]
    keep, _ = sparsegpt_layer(w, x.t() @ x, sparsity=0.5, scope=scope, forced=~earlier, block_size=16)
    assert not bool((keep & ~earlier).any())  # what was pruned stays pruned
    if scope == "layer":
        assert int((~keep).sum()) == pruned_count(0.5, w.numel())  # 45 % forced, unevenly: still exactly 50 %
    else:
        forced_rows = (~earlier).sum(1)
        assert (~keep).sum(1).tolist() == torch.maximum(forced_rows, torch.tensor(32)).tolist()  # exactly that


@pytest.mark.parametrize("progress", [True, False])
def test_the_calibration_bar_can_be_turned_off(monkeypatch, progress):
    shown = []
    real_bar = calibration.bar

    def bar(iterable, desc, *, enabled=True, total=None):
        shown.append((desc, enabled))
        return real_bar(iterable, desc, enabled=enabled, total=total)

    monkeypatch.setattr(calibration, "bar", bar)
    regrow.prune(one_linear(W4), 0.5, criterion="wanda", targets="0.weight", data=as_batches(X4), progress=progress)
    assert shown == [("calibrating", progress)]
