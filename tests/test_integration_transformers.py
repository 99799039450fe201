"""hcext inside Hugging Face transformers' DeepSeek-V4 (issue 15, part 1):
``hcext.integrations.transformers.apply_to_deepseek_v4``.

A tiny ``DeepseekV4ForCausalLM`` (2 decoder layers: one sliding-window, one compressed-sparse
attention; hash-routed and top-k MoE, 4 experts; hidden 64, n = hc_mult = 4 streams), built
from a config here (no downloads), runs with and without hcext: loss, logits and every
gradient compared (fp32: the suite's fp32 tolerance; bf16: "twice the reference's error"
against an fp64 run), training (eager and torch.compile), the state_dict, class-level
patching and its revert, the error cases, gradient checkpointing, greedy generation with
the KV cache, and FSDP2 on 2 gloo processes. CPU only, one thread.

Skipped without transformers (pip install transformers==5.23.0, pinned in
requirements-dev.txt). The inductor variant of the compiled training run costs a cold
inductor compile (1-3 minutes on 2 cores) and is marked slow (it runs in `make test`;
`-m "not slow"` skips it locally); the other compiled run uses aot_eager (dynamo fullgraph + AOTAutograd through hcext's
fake kernels and autograd formulas).

``python tests/test_integration_transformers.py --bench`` times the training step with and
without hcext (the README's numbers).
"""

import copy
import math
import os
import socket
import sys
import time
import warnings

import pytest
import torch

pytest.importorskip("transformers", exc_type=ImportError)
pytest.importorskip("transformers.models.deepseek_v4", exc_type=ImportError)

import transformers  # noqa: E402
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as modeling  # noqa: E402

import hcext  # noqa: E402,F401
from hcext.integrations import transformers as hct  # noqa: E402
from hcext.integrations.transformers import (  # noqa: E402
    UnsupportedTransformersError,
    apply_to_deepseek_v4,
    is_patched,
    revert_deepseek_v4,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import assert_scaled_close, assert_within_twice_reference_error  # noqa: E402

pytestmark = pytest.mark.skipif(
    hct._release(transformers.__version__)[:2] not in hct.SUPPORTED_TRANSFORMERS,
    reason=f"apply_to_deepseek_v4 supports transformers 5.23.x, found {transformers.__version__}",
)

VOCAB, BATCH, SEQ = 128, 4, 16


def tiny_config(**overrides) -> DeepseekV4Config:
    kw = dict(
        vocab_size=VOCAB, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, q_lora_rank=32,
        num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1,
        layer_types=["sliding_attention", "compressed_sparse_attention"], mlp_layer_types=["hash_moe", "moe"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        # index_topk >= SEQ / 4 compressed entries: the indexer keeps them all (no discrete choice)
        sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=16, index_topk=4,
        hc_mult=4, max_position_embeddings=64, use_cache=False,
    )
    kw.update(overrides)
    return DeepseekV4Config(**kw)


@torch.no_grad()
def perturb(model, seed=0):
    """transformers initialises base = 0 and scale = 1, which would leave the permutation of
    base's comb block and the order of scale untested: draw them (and the hash routes)."""
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if hasattr(m, "tid2eid"):
            m.tid2eid.copy_(torch.randint(0, model.config.n_routed_experts, m.tid2eid.shape, generator=g))
        if isinstance(m, hct._original(modeling.DeepseekV4HyperConnection)):
            m.fn.copy_(torch.randn(m.fn.shape, generator=g) * 0.05)
            m.base.copy_(torch.randn(m.base.shape, generator=g) * 0.5)
            m.scale.copy_(torch.rand(m.scale.shape, generator=g) + 0.5)
        if isinstance(m, hct._original(modeling.DeepseekV4HyperHead)):
            m.hc_fn.copy_(torch.randn(m.hc_fn.shape, generator=g) * 0.05)
            m.hc_base.copy_(torch.randn(m.hc_base.shape, generator=g) * 0.5)
            m.hc_scale.copy_(torch.rand(m.hc_scale.shape, generator=g) + 0.5)


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(tiny_config(**overrides))
    perturb(model, seed)
    return model.train()


def tokens(batch=BATCH, seq=SEQ, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(100 + seed))


def loss_logits_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def assert_fp32_equal(got, want, what=""):
    (loss, logits, grads), (want_loss, want_logits, want_grads) = got, want
    assert_scaled_close(loss, want_loss, torch.float32, name=f"{what}loss")
    assert_scaled_close(logits, want_logits, torch.float32, name=f"{what}logits")
    assert grads.keys() == want_grads.keys()
    for name in want_grads:
        assert_scaled_close(grads[name], want_grads[name], torch.float32, name=f"{what}grad of {name}")


def patched_copy(model):
    other = copy.deepcopy(model)
    apply_to_deepseek_v4(other)
    return other


def hcext_ops_in(gm):
    return {n.target for n in gm.graph.nodes if n.op == "call_function"
            and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "hcext"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: intra-op threads only spin-wait on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def class_patch():
    """Class-level patching, always reverted (other tests build unpatched models)."""
    yield apply_to_deepseek_v4
    revert_deepseek_v4()


# ---------------------------------------------------------------------------------------
# numerics


def test_fp32_loss_logits_and_every_gradient_match_transformers():
    model = build()
    patched = patched_copy(model)
    assert is_patched(patched) and not is_patched(model)
    ids = tokens()
    want = loss_logits_grads(model, ids)
    got = loss_logits_grads(patched, ids)
    hc_grads = [n for n in want[2] if "hc" in n]
    assert len(hc_grads) == 2 * 2 * 3 + 3  # every mHC parameter receives a gradient
    assert_fp32_equal(got, want)


def test_hyper_connection_module_contract_and_fused_boundary():
    # The patched module returns what transformers' does; its fused form equals transformers'
    # inline merge followed by the module (the decoder layer's attention/MLP boundary).
    model = build()
    layer = model.model.layers[0]
    ref_attn, ref_ffn = layer.attn_hc, layer.ffn_hc
    attn, ffn = copy.deepcopy(ref_attn), copy.deepcopy(ref_ffn)
    box = torch.nn.ModuleList([attn, ffn])
    report = apply_to_deepseek_v4(box)
    assert report["patched"]["DeepseekV4HyperConnection"] == ["0", "1"]
    x = torch.randn(2, 5, 4, 64)
    f = torch.randn(2, 5, 64)
    post, comb, collapsed = ref_attn(x)
    merged = post.unsqueeze(-1) * f.unsqueeze(-2) + comb.transpose(-1, -2) @ x  # the decoder layer's merge
    want = (*ref_ffn(merged), merged)
    got_post, got_comb, got_collapsed = attn(x)
    for g, w, name in ((got_post, post, "post"), (got_comb, comb, "comb"), (got_collapsed, collapsed, "collapsed")):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert_scaled_close(g, w, torch.float32, name=name)
    got = ffn(x, f, got_post, got_comb)
    for g, w, name in zip(got, want, ("post", "comb", "collapsed", "merged")):
        assert_scaled_close(g, w, torch.float32, name=f"fused {name}")


def test_bf16_from_pretrained_within_twice_transformers_error_against_fp64(tmp_path):
    # A bf16 checkpoint load as users do it: from_pretrained(dtype=bf16) keeps the mHC
    # parameters fp32 (_keep_in_fp32_modules_strict). transformers rounds post and comb to
    # bf16 and merges in bf16; hcext merges in fp32 and rounds once. Both against the
    # unpatched model in fp64 (transformers computes its mHC coefficients in fp32 even there,
    # far below bf16's error).
    fp32 = build()
    fp32.save_pretrained(tmp_path)
    ref = copy.deepcopy(fp32).double()
    ref.set_experts_implementation("eager")  # grouped_mm has no fp64 kernel
    hf = DeepseekV4ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).train()
    ours = DeepseekV4ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).train()
    dtypes = {n: p.dtype for n, p in ours.named_parameters()}
    apply_to_deepseek_v4(ours)
    assert {n: p.dtype for n, p in ours.named_parameters()} == dtypes
    assert dtypes["model.layers.0.attn_hc.fn"] == torch.float32 and dtypes["lm_head.weight"] == torch.bfloat16
    ids = tokens()
    r64, lowp, got = (loss_logits_grads(m, ids) for m in (ref, hf, ours))
    assert got[1].dtype == torch.bfloat16
    assert_within_twice_reference_error(got[0], r64[0], lowp[0], name="loss")
    assert_within_twice_reference_error(got[1], r64[1], lowp[1], name="logits")
    assert got[2].keys() == r64[2].keys()
    for name in r64[2]:
        assert_within_twice_reference_error(got[2][name], r64[2][name], lowp[2][name], name=f"grad of {name}")


def test_greedy_generation_with_kv_cache_is_unchanged():
    model = build(use_cache=True).eval()
    patched = patched_copy(model)
    ids = tokens(2, 10)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False)
        got = patched.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------
# parameters, state_dict, class-level patching, errors


def test_state_dict_parameters_and_names_unchanged(tmp_path):
    model = build()
    before = {k: (v.shape, v.dtype, v.clone()) for k, v in model.state_dict().items()}
    params_before = [(n, p.shape, p.dtype) for n, p in model.named_parameters()]
    report = apply_to_deepseek_v4(model)
    assert report["transformers"] == transformers.__version__
    assert report["patched"] == {
        "DeepseekV4HyperConnection": [f"model.layers.{i}.{h}" for i in range(2) for h in ("attn_hc", "ffn_hc")],
        "DeepseekV4DecoderLayer": ["model.layers.0", "model.layers.1"],
        "DeepseekV4HyperHead": ["model.hc_head"],
    }
    after = model.state_dict()
    assert list(after) == list(before)
    for k, (shape, dtype, value) in before.items():
        assert after[k].shape == shape and after[k].dtype == dtype and torch.equal(after[k], value), k
    assert [(n, p.shape, p.dtype) for n, p in model.named_parameters()] == params_before
    # Same class names (``_no_split_modules``, FSDP auto-wrap by name) and isinstance.
    layer = model.model.layers[0]
    assert type(layer).__name__ == "DeepseekV4DecoderLayer" and isinstance(layer, modeling.DeepseekV4DecoderLayer)
    # An unpatched checkpoint loads strictly into the patched model, and back.
    fresh = build(seed=1)
    apply_to_deepseek_v4(fresh)
    fresh.load_state_dict(build().state_dict(), strict=True)
    model.save_pretrained(tmp_path)
    reloaded = DeepseekV4ForCausalLM.from_pretrained(tmp_path)
    assert not is_patched(reloaded)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, after[k]), k
    # Patching twice is a no-op; revert restores transformers' classes.
    apply_to_deepseek_v4(model)
    revert_deepseek_v4(model)
    assert not is_patched(model)
    assert type(model.model.layers[0]) is hct._original(modeling.DeepseekV4DecoderLayer)


def test_class_level_patching_affects_models_built_afterwards_and_reverts(class_patch, tmp_path):
    before = build()
    report = class_patch()
    assert report["target"] == "classes"
    after = build()  # same seed: same parameters as ``before``
    assert is_patched(after) and not is_patched(before)
    assert list(after.state_dict()) == list(before.state_dict())
    for k, v in before.state_dict().items():
        assert torch.equal(after.state_dict()[k], v), k
    ids = tokens()
    assert_fp32_equal(loss_logits_grads(after, ids), loss_logits_grads(before, ids))
    before.save_pretrained(tmp_path)
    assert is_patched(DeepseekV4ForCausalLM.from_pretrained(tmp_path))  # checkpoints load into hcext

    revert_deepseek_v4()
    assert not is_patched(build())
    assert is_patched(after)  # built while patched: stays patched until reverted explicitly
    revert_deepseek_v4(after)
    assert not is_patched(after)


def test_unsupported_transformers_version_raises(monkeypatch):
    # transformers' lazy module may have been replaced in sys.modules since this file imported it
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.22.1")
    with pytest.raises(UnsupportedTransformersError, match=r"supports transformers 5\.23\.x.*found .* 5\.22\.1"):
        apply_to_deepseek_v4()
    with pytest.raises(UnsupportedTransformersError, match="5.22.1"):
        apply_to_deepseek_v4(build())


def test_unsupported_config_raises_naming_the_setting(class_patch):
    model = build()
    for m in model.modules():
        if hasattr(m, "hc_sinkhorn_iters"):
            m.hc_sinkhorn_iters = 0
    model.config.hc_sinkhorn_iters = 0
    with pytest.raises(ValueError, match=r"hc_sinkhorn_iters = 0 is not supported"):
        apply_to_deepseek_v4(model)
    assert not is_patched(model)  # nothing half-patched
    with pytest.raises(ValueError, match=r"hc_mult = 33 is not supported.*1 <= hc_mult <= 32"):
        hct.check_config(tiny_config(hc_mult=33))
    with pytest.raises(ValueError, match=r"hc_eps = -1e-06 is not supported"):
        hct.check_config(tiny_config(hc_eps=-1e-6))
    with pytest.raises(ValueError, match="contains no DeepSeek-V4 mHC module"):
        apply_to_deepseek_v4(torch.nn.Linear(2, 2))
    # Class-level: a model built afterwards with an unsupported config raises when built.
    class_patch()
    with pytest.raises(ValueError, match=r"hc_sinkhorn_iters = 0 is not supported"):
        build(hc_sinkhorn_iters=0)


# ---------------------------------------------------------------------------------------
# gradient checkpointing, training, torch.compile


def test_gradient_checkpointing_recomputes_and_gives_identical_gradients():
    model = build()
    patched = patched_copy(model)
    ids = tokens()
    want = loss_logits_grads(patched, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # renamed activation_checkpointing_enable in 5.x
        patched.gradient_checkpointing_enable()
    calls = []
    hook = patched.model.layers[0].ffn_hc.register_forward_hook(lambda *a: calls.append(1))
    got = loss_logits_grads(patched, ids)
    hook.remove()
    assert len(calls) == 2, "the layer should be recomputed in backward"
    # The recompute runs the same kernels on the same inputs: bitwise up to 1e-6.
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], atol=1e-6, rtol=1e-6, msg=name)
    assert_fp32_equal(got, loss_logits_grads(model, ids), "checkpointed vs transformers: ")


def _train(model, steps=20, lr=3e-3):
    # Repeated-pattern data (a random shift of one period-8 pattern): learnable in a few steps.
    g = torch.Generator().manual_seed(0)
    pattern = torch.randperm(VOCAB, generator=g)[:8]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        ids = pattern[(torch.randint(0, 8, (BATCH, 1), generator=g) + torch.arange(SEQ)) % 8]
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    return losses


def _assert_learns(losses):
    assert all(map(math.isfinite, losses)), losses
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_train_20_steps_eager_loss_decreases():
    model = build()
    apply_to_deepseek_v4(model)
    losses = _train(model)
    _assert_learns(losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())


COMPILE_BACKENDS = [
    "aot_eager",
    # A cold inductor compile of two DeepSeek-V4 layers: 1-3 minutes on 2 cores. It runs in
    # `make test` (CI); deselect it locally with -m "not slow".
    pytest.param("inductor", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_train_20_steps_compiled_decoder_layers_fullgraph(backend, fresh_dynamo):
    import torch._inductor.config

    model = build()
    apply_to_deepseek_v4(model)
    eager = copy.deepcopy(model)
    for layer in model.model.layers:
        layer.compile(backend=backend, fullgraph=True)  # fullgraph: no graph break anywhere in a layer
    with torch._inductor.config.patch(compile_threads=1):
        ids = tokens()
        assert_fp32_equal(loss_logits_grads(model, ids), loss_logits_grads(eager, ids), "compiled vs eager: ")
        losses = _train(model)
    _assert_learns(losses)


def test_decoder_layers_and_head_trace_without_graph_breaks_into_hcext_ops(fresh_dynamo):
    model = build()
    apply_to_deepseek_v4(model)
    seen = {}

    def grab(module, args, kwargs):
        seen[module] = (args, kwargs)

    modules = [*model.model.layers, model.model.hc_head]
    hooks = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in modules]
    model(input_ids=tokens())
    for h in hooks:
        h.remove()
    layer_ops = {torch.ops.hcext.mhc_pre.default, torch.ops.hcext.mhc_post_pre.default,
                 torch.ops.hcext.stream_mix_expand.default}
    for m in modules:
        args, kwargs = seen[m]
        explained = torch._dynamo.explain(m)(*args, **kwargs)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        assert explained.graph_count == 1
        ops = hcext_ops_in(explained.graphs[0])
        assert ops == (layer_ops if m is not model.model.hc_head else {torch.ops.hcext.mhc_pre.default}), ops


# ---------------------------------------------------------------------------------------
# FSDP2 over gloo on the CPU, 2 processes


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_worker(rank, world_size, port, ids, out_dir):
    """Each rank takes its half of the global batch: the patched tiny model, fully_shard per
    decoder layer and at the root; rank 0 saves the mean loss and the full gradients."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        result = {}
        try:
            from torch.distributed.fsdp import fully_shard

            model = build()
            apply_to_deepseek_v4(model)  # before sharding
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            local = ids.chunk(world_size)[rank]
            loss = model(input_ids=local, labels=local).loss
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total)
            grads, sharded = {}, []
            for name, p in model.named_parameters():
                g = p.grad
                if g is None:  # not on the differentiable path (as in one process: see loss_logits_grads)
                    continue
                sharded.append(hasattr(g, "full_tensor"))
                grads[name] = (g.full_tensor() if sharded[-1] else g).detach().clone()
            result.update(loss=total / world_size, grads=grads, sharded=all(sharded),
                          patched=is_patched(model), layer_class=type(model.model.layers[0]).__name__)
        except Exception as e:  # recorded, so the test can say why FSDP2 did not run
            result["error"] = f"{type(e).__name__}: {e}"
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "result.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_gloo_processes_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    ids = tokens()
    ctx = mp.start_processes(fsdp_worker, args=(2, _free_port(), ids, str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 150
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the FSDP2 run did not finish within 150 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    result = torch.load(os.path.join(tmp_path, "result.pt"))
    if "error" in result:
        pytest.skip(f"FSDP2 (fully_shard) does not run on the CPU with gloo in torch {torch.__version__}: "
                    f"{result['error']}")
    assert result["patched"] and result["sharded"]
    assert result["layer_class"] == "FSDPDeepseekV4DecoderLayer"
    # One process, the whole batch, unpatched transformers: the mean of the halves' losses
    # and the gradient of the mean (equal halves) are the single-process ones.
    want_loss, _, want_grads = loss_logits_grads(build(), ids)
    assert_scaled_close(result["loss"], want_loss, torch.float32, name="loss")
    assert result["grads"].keys() == want_grads.keys()
    for name in want_grads:
        assert_scaled_close(result["grads"][name], want_grads[name], torch.float32, name=f"grad of {name}")


# ---------------------------------------------------------------------------------------
# python tests/test_integration_transformers.py --bench: the README's step times


def bench(rounds=15, threads=1, batch=BATCH, seq=SEQ):
    """Training-step time (forward + backward + AdamW) of the tiny model, transformers vs
    hcext, interleaved: min and median over ``rounds`` rounds (after 3 warm-up steps each)."""
    torch.set_num_threads(threads)
    models = {"transformers": build(), "hcext": build()}
    apply_to_deepseek_v4(models["hcext"])
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    ids = tokens(batch, seq)

    def step(k):
        opts[k].zero_grad(set_to_none=True)
        models[k](input_ids=ids, labels=ids).loss.backward()
        opts[k].step()

    for k in models:
        for _ in range(3):
            step(k)
    times = {k: [] for k in models}
    for _ in range(rounds):
        for k in models:
            t = time.perf_counter()
            step(k)
            times[k].append(time.perf_counter() - t)
    for k, ts in times.items():
        ts.sort()
        print(f"{k:>12}: min {ts[0] * 1e3:7.2f} ms  median {ts[len(ts) // 2] * 1e3:7.2f} ms "
              f"(threads {threads}, batch {batch}, seq {seq}, {rounds} interleaved rounds)")


if __name__ == "__main__":
    if "--bench" in sys.argv:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   "?")
        print(f"CPU: {cpu}; torch {torch.__version__}; transformers {transformers.__version__}")
        for batch, seq in ((BATCH, SEQ), (8, 64)):
            bench(rounds=40, threads=1, batch=batch, seq=seq)
