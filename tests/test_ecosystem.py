"""mcloss_cuda in the PyTorch ecosystem: the attention-map helper, torch.compile (one graph, no
recompilation as the random mask changes), AMP (autocast, GradScaler), CUDA graphs, the example
script and the snippets of docs/ecosystem.md. DDP is tested in test_ddp.py.

Random inputs are fresh every run: each test seeds torch from the OS entropy pool and prints
the seed. The torch.compile test with inductor is the slow one (code generation on 2 cores).
"""

import copy
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mcloss_cuda as mc
from helpers import DEVICES, HAS_CUDA, child_env, counts_of, offsets_of

ROOT = Path(__file__).resolve().parent.parent
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


# ----------------------------------------------------------------------------------------------
# mc.channel_attention_maps


def attention_oracle(x, counts):
    """max over each group of the per-channel softmax over the H*W positions, group by group."""
    p = torch.softmax(x.double().flatten(2), dim=-1).view(x.shape)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return torch.stack([p[:, s : s + n].amax(dim=1) for s, n in zip(starts, counts)], dim=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "K, cnum, C", [(4, 3, 12), (4, None, 10), (3, [1, 4, 2], 7), (5, None, 15)]
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_attention_maps(device, K, cnum, C, channels_last):
    x = torch.randn(3, C, 5, 6, device=device, requires_grad=True)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    maps = mc.channel_attention_maps(xin, K, cnum)
    counts = counts_of(K, cnum, C)
    assert maps.shape == (3, K, 5, 6) and maps.dtype == x.dtype and maps.device == x.device
    assert not maps.requires_grad
    torch.testing.assert_close(
        maps.double(), attention_oracle(x.detach(), counts), rtol=1e-5, atol=1e-7
    )
    # the per-group sums are the h[b, i] of the diversity term, in [1, n_i]
    h = maps.sum(dim=(2, 3))
    n = torch.tensor(counts, dtype=h.dtype, device=device)
    assert ((h >= 1 - 1e-5) & (h <= n + 1e-5)).all()
    div = 1 - (h / n).mean()
    torch.testing.assert_close(div, mc.diversity_loss(x.detach(), K, cnum), rtol=1e-5, atol=1e-6)


def test_channel_attention_maps_half_and_errors():
    x = torch.randn(2, 6, 4, 4)
    maps = mc.channel_attention_maps(x.bfloat16(), 3)
    assert maps.dtype == torch.bfloat16
    torch.testing.assert_close(
        maps.double(), attention_oracle(x.bfloat16(), [2, 2, 2]), rtol=2e-2, atol=1e-3
    )
    with pytest.raises(ValueError, match="cnum"):
        mc.channel_attention_maps(x, 4, 2)
    with pytest.raises(ValueError, match="features"):
        mc.channel_attention_maps(x[0, 0], 3)  # no spatial dimension
    # a sequence (B, C, L) is a map too: its maps are (B, K, L)
    seq = x.flatten(2)
    torch.testing.assert_close(
        mc.channel_attention_maps(seq, 3), mc.channel_attention_maps(x, 3).flatten(2)
    )
    assert "channel_attention_maps" in mc.__all__


# ----------------------------------------------------------------------------------------------
# torch.compile


def tiny_net(K, C):
    return nn.ModuleDict(
        {
            "body": nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, C, 3, padding=1)
            ),
            "head": nn.Linear(C, K),
        }
    )


def make_train_step(net, crit, lr=0.1):
    """forward, MC-Loss + cross-entropy, backward and an SGD update, as one function.

    The update is written out: torch.optim's step() breaks the graph on purpose (see
    torch/optim/optimizer.py); compile it separately when using an optimizer."""
    params = list(net.parameters())

    def step(x, y):
        features = net["body"](x)
        out = crit(features, y)
        loss = F.cross_entropy(net["head"](features.amax(dim=(2, 3))), y) + out.loss
        loss.backward()
        with torch.no_grad():
            for p in params:
                p.sub_(lr * p.grad)
                p.grad = None
        return loss.detach(), out.logits.detach()

    return step


def mask_a_step_draws(impl, counts, shape):
    """The mask MCLoss(K) draws for features of ``shape`` from the default generator's state:
    random_channel_mask's on the reference path; on the fused path the loss op draws it itself
    (another stream of numbers), so ask the op."""
    if impl == "reference":
        return mc.random_channel_mask(len(counts), counts)
    offsets = offsets_of(counts)
    x, y = torch.zeros(shape), torch.zeros(shape[0], dtype=torch.long)
    return torch.ops.mcloss_cuda.mc_loss(
        x, y, offsets, max(counts), None, -1, 0.5, False, None, 1.5, 20.0
    )[5]


@pytest.fixture
def dynamo_clean():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def assert_one_graph(counters):
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.skipif(
    not hasattr(torch._dynamo.config, "trace_autograd_ops"),
    reason="this torch cannot trace backward() inside a compiled function",
)
@pytest.mark.parametrize(
    "impl, compile_backend",
    [
        pytest.param(
            "fused",
            "inductor",
            marks=pytest.mark.skipif(
                mc.backend("cpu") != "cpu", reason="needs the fused CPU backend"
            ),
        ),
        # inductor's code generation takes the time here, and what it would test is torch's, not
        # ours: for the pure-PyTorch path, Dynamo + AOTAutograd (one graph, forward and backward)
        ("reference", "aot_eager"),
    ],
)
def test_compile_train_step_fullgraph_matches_eager(
    impl, compile_backend, dynamo_clean, monkeypatch, fresh_seed
):
    """The whole step in one graph (fullgraph=True), no recompilation over steps as the mask
    changes. With inductor's fallback_random the compiled step draws the same masks as eager
    for the same seed (inductor's own RNG would draw others), so every step must match eager."""
    if impl == "reference":
        monkeypatch.setenv("MCLOSS_BACKEND", "reference")
    assert mc.backend("cpu") == ("cpu" if impl == "fused" else "reference")
    K, C = 4, 14  # uneven groups (cnum=None): 4, 4, 3, 3 channels
    counts = counts_of(K, None, C)
    net_c = tiny_net(K, C)
    net_e = copy.deepcopy(net_c)
    crit = mc.MCLoss(K)
    step_c = torch.compile(make_train_step(net_c, crit), fullgraph=True, backend=compile_backend)
    step_e = make_train_step(net_e, crit)
    masks = []
    with (
        torch._dynamo.config.patch(error_on_recompile=True, trace_autograd_ops=True),
        torch._inductor.config.patch(fallback_random=True),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        for i in range(3):
            x, y = torch.randn(2, 3, 8, 6), torch.randint(0, K, (2,))
            seed = fresh_seed + 1 + i
            torch.manual_seed(seed)
            masks.append(mask_a_step_draws(impl, counts, (2, C, 8, 6)))
            torch.manual_seed(seed)
            loss_c, logits_c = step_c(x, y)
            torch.manual_seed(seed)
            loss_e, logits_e = step_e(x, y)
            torch.testing.assert_close(logits_c, logits_e, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    # the mask changed between steps (324 masks: all three equal has odds ~1e-5)
    assert not all(torch.equal(m, masks[0]) for m in masks[1:])
    for p_c, p_e in zip(net_c.parameters(), net_e.parameters()):
        torch.testing.assert_close(p_c, p_e, rtol=1e-5, atol=1e-6)
    assert_one_graph(dynamo_clean)
    # the cached group tensors are built in the graph, not looked up through functools.lru_cache
    # (which Dynamo bypasses with a warning)
    assert not [w for w in caught if "lru_cache" in str(w.message)]


# ----------------------------------------------------------------------------------------------
# AMP

AMP_CASES = [
    ("cpu", torch.bfloat16),
    ("cpu", torch.float16),
    pytest.param("cuda", torch.float16, marks=cuda_only),
    pytest.param("cuda", torch.bfloat16, marks=cuda_only),
]


@pytest.mark.parametrize("device, amp_dtype", AMP_CASES)
def test_autocast(device, amp_dtype):
    K, cnum = 3, 4
    conv = nn.Conv2d(3, K * cnum, 3, padding=1).to(device)
    x = torch.randn(4, 3, 7, 5, device=device)
    y = torch.randint(0, K, (4,), device=device)
    mask = mc.random_channel_mask(K, cnum, device=device)
    with torch.autocast(device, dtype=amp_dtype):
        features = conv(x)
        features.retain_grad()
        out = mc.MCLoss(K, cnum)(features, y, mask=mask)
    assert features.dtype == amp_dtype
    for t in out:
        assert t.dtype == torch.float32
    out.loss.backward()
    assert features.grad.dtype == amp_dtype and torch.isfinite(features.grad).all()
    assert conv.weight.grad.dtype == torch.float32
    # no autocast rule of its own: the same numbers outside the autocast region
    outside = mc.MCLoss(K, cnum)(features.detach(), y, mask=mask)
    for a, b in zip(out, outside):
        assert torch.equal(a, b)
    # the same numbers as the fp32 reference on the low-precision features
    ref = mc.reference.mc_loss(features.detach().float(), y, K, cnum, mask=mask)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "device, amp_dtype",
    [("cpu", torch.bfloat16), pytest.param("cuda", torch.float16, marks=cuda_only)],
)
def test_grad_scaler_skips_steps_with_inf(device, amp_dtype):
    try:
        scaler = torch.amp.GradScaler(device, init_scale=2.0**12)
    except Exception as e:  # pragma: no cover - older torch: GradScaler is CUDA-only
        pytest.skip(f"torch.amp.GradScaler({device!r}) unavailable: {e}")
    K, cnum = 3, 4
    conv = nn.Conv2d(3, K * cnum, 3, padding=1).to(device)
    head = nn.Linear(K * cnum, K).to(device)
    params = list(conv.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.05)
    crit = mc.MCLoss(K, cnum)
    bad_step = 2
    for step in range(5):
        x = torch.randn(4, 3, 6, 6, device=device)
        y = torch.randint(0, K, (4,), device=device)
        with torch.autocast(device, dtype=amp_dtype):
            features = conv(x)
            if step == bad_step:  # an overflow in the features
                inf = torch.zeros_like(features)
                inf[1, 5, 2, 3] = float("inf")
                features = features + inf
            out = crit(features, y)
            loss = F.cross_entropy(head(features.amax(dim=(2, 3))).float(), y) + out.loss
        before = [p.detach().clone() for p in params]
        scale = scaler.get_scale()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        changed = [not torch.equal(b, p) for b, p in zip(before, params)]
        if step == bad_step:
            assert not torch.isfinite(out.loss)
            assert not torch.isfinite(conv.weight.grad).all()
            assert not any(changed), "the step with an inf in the features was not skipped"
            assert scaler.get_scale() == scale * 0.5
        else:
            assert torch.isfinite(out.loss)
            assert all(changed)
            assert scaler.get_scale() == scale
        assert all(torch.isfinite(p).all() for p in params)


# ----------------------------------------------------------------------------------------------
# CUDA graphs


@cuda_only
def test_cuda_graph_training_step(fresh_seed):
    """A training step (random mask drawn inside, from torch's CUDA generator, which CUDA graphs
    handle) captured once and replayed: the replays give the eager steps' results for the same
    seed, and the mask changes from one replay to the next."""
    dev = "cuda"
    K, cnum, lr = 4, 4, 0.1
    torch.manual_seed(fresh_seed)
    net_g = tiny_net(K, K * cnum).to(dev)
    net_e = copy.deepcopy(net_g)
    start = copy.deepcopy(net_g.state_dict())
    crit = mc.MCLoss(K, cnum)
    xs = torch.randn(4, 2, 3, 8, 8, device=dev)
    ys = torch.randint(0, K, (4, 2), device=dev)
    static_x, static_y = xs[0].clone(), ys[0].clone()

    def step(net, x, y):
        params = list(net.parameters())
        features = net["body"](x)
        out = crit(features, y)
        loss = F.cross_entropy(net["head"](features.amax(dim=(2, 3))), y) + out.loss
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
        return loss.detach(), out.logits.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: caches, allocator, cuBLAS/cuDNN plans
        for _ in range(3):
            step(net_g, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_logits = step(net_g, static_x, static_y)
    with torch.no_grad():  # back to the start (in place: the graph's tensors)
        for name, p in net_g.named_parameters():
            p.copy_(start[name])

    seed = fresh_seed + 1
    torch.cuda.manual_seed(seed)  # the masks the four steps will draw
    masks = [mc.random_channel_mask(K, cnum, device=dev) for _ in range(4)]
    assert not all(torch.equal(m, masks[0]) for m in masks[1:])

    torch.cuda.manual_seed(seed)
    replayed = []
    for i in range(4):
        static_x.copy_(xs[i])
        static_y.copy_(ys[i])
        graph.replay()
        replayed.append((static_loss.clone(), static_logits.clone()))
    torch.cuda.manual_seed(seed)
    eager = [step(net_e, xs[i], ys[i]) for i in range(4)]
    for i, ((lg, zg), (le, ze)) in enumerate(zip(replayed, eager)):
        torch.testing.assert_close(zg, ze, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {i}: {m}")
        torch.testing.assert_close(lg, le, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {i}: {m}")
    for pg, pe in zip(net_g.parameters(), net_e.parameters()):
        torch.testing.assert_close(pg, pe, rtol=1e-5, atol=1e-6)
    # with the weights and input held fixed, replays still differ: only the mask changed
    with torch.no_grad():
        for name, p in net_g.named_parameters():
            p.copy_(start[name])
    static_x.copy_(xs[0])
    static_y.copy_(ys[0])
    logits = []
    for _ in range(4):
        graph.replay()
        logits.append(static_logits.clone())
        with torch.no_grad():
            for name, p in net_g.named_parameters():
                p.copy_(start[name])
    assert any(not torch.equal(z, logits[0]) for z in logits[1:])


# ----------------------------------------------------------------------------------------------
# the example script and the documentation


def test_example_train_synthetic_quick(tmp_path):
    png = tmp_path / "maps.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "train_synthetic.py"),
            "--quick",
            "--save-maps",
            str(png),
        ],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(
        r"test accuracy: cross-entropy only [0-9.]+, with MC-Loss [0-9.]+", proc.stdout
    ), proc.stdout
    assert "[CE+MC] epoch 2/2" in proc.stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # not a blank canvas


def doc_snippets(name):
    text = (ROOT / name).read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("name,at_least", [("docs/ecosystem.md", 4), ("README.md", 2)])
def test_docs_snippets_run(tmp_path, name, at_least):
    """Every python block of docs/ecosystem.md and README.md runs as a script, one after the
    other."""
    snippets = doc_snippets(name)
    assert len(snippets) >= at_least
    failures = []
    for i, code in enumerate(snippets):
        path = tmp_path / f"snippet{i}.py"
        path.write_text(code)
        env = child_env()
        env["OMP_NUM_THREADS"] = "1"
        proc = subprocess.run(
            [sys.executable, str(path)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            failures.append(f"--- snippet {i}:\n{code}\n--- output:\n{proc.stdout}{proc.stderr}")
    assert not failures, "\n".join(failures)
