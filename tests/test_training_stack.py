"""Proof that hcext survives what a production training loop does to a model (issue 6,
"Proof in a real training stack"): a tiny pre-norm transformer LM built only from
``hcext.nn`` (tests/tiny_lm.py: attention + MLP sub-layers, each a HyperConnection with
n = 4 streams) under torch.compile (inductor, dynamic shapes), torch.export, bf16
autocast, activation checkpointing, DDP and FSDP2 over gloo, state_dict round trips,
dtype / device moves, CUDA graphs, and a 200-step training run.

CPU everywhere (CI); the CUDA variants skip without a GPU. Models are tiny (dim 32, two
layers, seq <= 24, batch 4) and there is one inductor compile, so the file runs in well
under two minutes on a small machine.
"""

import math
import os
import socket
import time

import pytest
import torch
import torch._inductor.config
from torch._dynamo.testing import CompileCounterWithBackend

import tiny_lm
from helpers import TOLERANCES, requires_cuda
from hcext.nn import HyperConnection
from tiny_lm import batch, build, lm_loss, loss_and_grads

# The cheap tests run for both dynamic kinds; mHC is covered everywhere.
KINDS = ["mhc", "hc"]


def assert_grads_close(got, want, **tol):
    assert got.keys() == want.keys()
    tol = tol or TOLERANCES[torch.float32]
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol, msg=lambda m: f"grad of {name}: {m}")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are far too small to gain from intra-op threads, and on a shared CI
    # machine OpenMP threads that spin-wait for busy cores make a step 10-50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def inductor_in_process():
    # Compile in this process: a worker pool costs more than it saves for one tiny model.
    with torch._inductor.config.patch(compile_threads=1):
        yield


# ---------------------------------------------------------------------------------------
# torch.compile and torch.export


def test_compile_inductor_fullgraph_matches_eager_and_new_length_does_not_recompile(
    device, fresh_dynamo, inductor_in_process
):
    # The one inductor compile of the file (mHC): loss and every parameter gradient equal
    # eager's; with dynamic shapes a second sequence length (and batch size) reuses the
    # graph. Lengths 12 and 20 differ from every parameter dim (no duck-sizing collisions).
    model = build("mhc").to(device)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)

    def compiled_loss(tokens):
        return lm_loss(compiled(tokens), tokens)

    def step(fn, tokens):
        model.zero_grad(set_to_none=True)
        loss = fn(tokens)
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    def eager_loss(tokens):
        return lm_loss(model(tokens), tokens)

    first = batch(4, 12).to(device)
    loss, grads = step(compiled_loss, first)
    want_loss, want_grads = step(eager_loss, first)
    torch.testing.assert_close(loss, want_loss, **TOLERANCES[torch.float32])
    assert_grads_close(grads, want_grads)
    frames = counter.frame_count
    assert frames >= 1

    second = batch(2, 20, seed=2).to(device)
    with torch.compiler.set_stance("fail_on_recompile"):
        loss, grads = step(compiled_loss, second)
    assert counter.frame_count == frames
    want_loss, want_grads = step(eager_loss, second)
    torch.testing.assert_close(loss, want_loss, **TOLERANCES[torch.float32])
    assert_grads_close(grads, want_grads)


@pytest.mark.parametrize("kind", KINDS)
def test_compile_aot_eager_fullgraph_matches_eager(kind, fresh_dynamo):
    # The autograd-traced path (fake kernels + registered autograd) for each kind, without
    # the cost of an inductor compile.
    model = build(kind)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    tokens = batch(4, 16)
    model.zero_grad(set_to_none=True)
    loss = lm_loss(compiled(tokens), tokens)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    want_loss, want_grads = loss_and_grads(model, tokens)
    torch.testing.assert_close(loss.detach(), want_loss, **TOLERANCES[torch.float32])
    assert_grads_close(grads, want_grads)


EXPECTED_OPS = {
    "mhc": {torch.ops.hcext.mhc_pre.default, torch.ops.hcext.stream_mix_expand.default},
    "hc": {torch.ops.hcext.hc_coeffs.default, torch.ops.hcext.stream_aggregate.default,
           torch.ops.hcext.stream_mix_expand.default},
}


@pytest.mark.parametrize("kind", KINDS)
def test_export_keeps_hcext_ops_and_runs(kind):
    model = build(kind).eval()
    tokens = batch(4, 16)
    seq = torch.export.Dim("seq", min=2, max=tiny_lm.MAX_LEN)
    ep = torch.export.export(model, (tokens,), dynamic_shapes={"tokens": {1: seq}})
    targets = [node.target for node in ep.graph.nodes if node.op == "call_function"]
    hcext_ops = {t for t in targets if isinstance(t, torch._ops.OpOverload) and t.namespace == "hcext"}
    assert hcext_ops == EXPECTED_OPS[kind]
    # One hyper-connection per sub-layer: each of the 4 sub-layers calls the mixing op once.
    assert targets.count(torch.ops.hcext.stream_mix_expand.default) == len(model.sublayers)
    exported = ep.module()
    with torch.no_grad():
        for t in (tokens, batch(4, 20, seed=3)):  # the exported sequence dim is dynamic
            torch.testing.assert_close(exported(t), model(t), **TOLERANCES[torch.float32])


# ---------------------------------------------------------------------------------------
# Mixed precision and activation checkpointing



@pytest.mark.parametrize(
    "kind", ["mhc", "hc"]
)
def test_bf16_autocast_trains_and_matches_fp32(device, kind):
    model = build(kind).to(device)
    tokens = batch(4, 16).to(device)
    with torch.no_grad():
        want = model(tokens)
        with torch.autocast(device, dtype=torch.bfloat16):
            got = model(tokens)
    # Streams stay fp32 (the embedding's dtype); the branches' matmuls run in bf16. Four
    # sub-layers of bf16 rounding: a few bf16 ulps of the logits' scale.
    scale = want.abs().max().item()
    torch.testing.assert_close(got.float(), want, atol=2e-2 * scale, rtol=0)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = lm_loss(model(tokens), tokens)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert all(map(math.isfinite, losses)), losses
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("kind", KINDS)
def test_activation_checkpointing_gives_identical_gradients(kind):
    tokens = batch(4, 16)
    loss, grads = loss_and_grads(build(kind, checkpointing=True), tokens)
    want_loss, want_grads = loss_and_grads(build(kind), tokens)
    # The recompute runs the same kernels on the same inputs: bitwise (up to 1e-6 slack).
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=0)
    assert_grads_close(grads, want_grads, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Distributed: DDP and FSDP2 over gloo on the CPU, 2 processes


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_distributed(kind, tokens, out_dir, world_size=2, timeout_s=150):
    """Spawns ``world_size`` ranks of :func:`tiny_lm.distributed_worker`; returns rank 0's
    results. Bounded: ranks still alive after ``timeout_s`` are killed and the test fails."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        tiny_lm.distributed_worker, args=(world_size, _free_port(), kind, tokens, str(out_dir)),
        nprocs=world_size, join=False, start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed run did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return torch.load(os.path.join(out_dir, "result.pt"))


@pytest.fixture(scope="module")
def distributed_mhc(tmp_path_factory):
    """One 2-rank run (DDP then FSDP2) shared by the distributed tests, and the
    single-process gradients on the same global batch."""
    tokens = batch(4, 16)
    result = _run_distributed("mhc", tokens, tmp_path_factory.mktemp("dist"))
    _, want = loss_and_grads(build("mhc"), tokens)
    return result, want


def test_ddp_gloo_two_processes_matches_single_process(distributed_mhc):
    # Each rank's loss is the mean over its half; DDP averages the gradients, which is the
    # gradient of the mean over the global batch (equal halves).
    result, want = distributed_mhc
    assert_grads_close(result["ddp"], want)


def test_fsdp2_fully_shard_gloo_cpu_matches_single_process(distributed_mhc):
    result, want = distributed_mhc
    if "fsdp_error" in result:
        pytest.skip(f"FSDP2 (fully_shard) does not run on the CPU with gloo in torch {torch.__version__}: "
                    f"{result['fsdp_error']}")
    assert result["fsdp_sharded"], "every gradient should be a DTensor shard under fully_shard"
    assert_grads_close(result["fsdp"], want)


# ---------------------------------------------------------------------------------------
# state_dict, dtype and device moves, CUDA graphs


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_save_load_round_trip(kind, tmp_path):
    model = build(kind)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = build(kind, seed=123)  # different parameters until loaded
    tokens = batch(4, 16)
    assert not torch.equal(fresh(tokens), model(tokens))
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(tokens), model(tokens))


@pytest.mark.parametrize("kind", KINDS)
def test_model_to_float64_runs_and_matches_fp32(kind):
    model = build(kind)
    tokens = batch(4, 16)
    with torch.no_grad():
        want = model(tokens)
        got = model.to(torch.float64)(tokens)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), want, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("kind", KINDS)
def test_model_to_bfloat16_forward_matches_fp32(kind):
    model = build(kind)
    tokens = batch(4, 16)
    with torch.no_grad():
        want = model(tokens)
        got = model.to(torch.bfloat16)(tokens)
    assert got.dtype == torch.bfloat16
    # The streams themselves are bf16 now (only the coefficients are computed in fp32).
    scale = want.abs().max().item()
    torch.testing.assert_close(got.float(), want, atol=2e-2 * scale, rtol=0)


@requires_cuda
@pytest.mark.parametrize("kind", KINDS)
def test_model_to_cuda_matches_cpu(kind):
    model = build(kind)
    tokens = batch(4, 16)
    loss, grads = loss_and_grads(model, tokens)
    cuda_loss, cuda_grads = loss_and_grads(model.to("cuda"), tokens.cuda())
    torch.testing.assert_close(cuda_loss.cpu(), loss, atol=1e-4, rtol=1e-4)
    assert_grads_close({n: g.cpu() for n, g in cuda_grads.items()}, grads, atol=1e-4, rtol=1e-3)


@requires_cuda
def test_cuda_graph_capture_and_replay_of_forward():
    model = build("mhc").cuda().eval()
    static_tokens = batch(4, 16).cuda()
    with torch.no_grad():
        side = torch.cuda.Stream()  # warm up on a side stream (allocator, lazy init)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                model(static_tokens)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = model(static_tokens)
        for seed in (5, 6):
            new_tokens = batch(4, 16, seed=seed).cuda()
            static_tokens.copy_(new_tokens)
            graph.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(static_logits, model(new_tokens), **TOLERANCES[torch.float32])


# ---------------------------------------------------------------------------------------
# A short training run


@pytest.mark.parametrize("kind", KINDS)
def test_training_200_steps_loss_decreases_and_mhc_stays_doubly_stochastic(kind):
    # Repeated-pattern data: every sequence is a random shift of one period-8 pattern, so
    # next-token prediction is learnable (loss -> ~0) by a model that attends back.
    torch.manual_seed(0)
    model = build(kind, perturb=False)  # from the Pre-Norm-equivalent init
    pattern = torch.randperm(tiny_lm.VOCAB)[:8]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):
        shifts = torch.randint(0, 8, (4, 1), generator=g)
        tokens = pattern[(shifts + torch.arange(16)) % 8]
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model(tokens), tokens)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(math.isfinite, losses)), "NaN/inf loss"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.1 * first, (first, last)

    if kind == "mhc":
        # Every layer's H_res on the streams it actually sees: rows sum to 1 (Sinkhorn ends
        # with a row normalisation; off by at most its eps).
        seen = []
        hooks = [hc.register_forward_pre_hook(lambda m, args: seen.append((m, args[0]))) for hc in model.sublayers]
        with torch.no_grad():
            model(tokens)
        for h in hooks:
            h.remove()
        assert len(seen) == len(model.sublayers)
        for hc, streams in seen:
            assert isinstance(hc, HyperConnection)
            _, _, h_res = hc.coefficients(streams)
            rows = h_res.sum(-1)
            torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-5, rtol=0)
            assert (h_res >= 0).all()
