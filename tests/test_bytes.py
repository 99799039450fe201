"""The byte table of benchmarks/byte_table.py against the ops it describes: every tensor an op takes or
returns that the table names has the size the table counts, and every streams- or row-sized
tensor an op takes or returns is in the table (so the table cannot leave out a large read or
write). Runs the ops on the CPU at a small shape, fp32 and bf16."""

import math

import pytest
import torch

import hcext  # noqa: F401
from benchmarks import byte_table as table

T, N, C = 6, 4, 16


def _inputs(dtype):
    torch.manual_seed(0)
    D = N * N + 2 * N
    x = torch.randn(T, N, C, dtype=dtype)
    f = torch.randn(T, C, dtype=dtype)
    phi = torch.randn(N * C, D) / math.sqrt(N * C)
    alpha, bias = torch.rand(3), torch.randn(D) * 0.5
    h_post, h_res = torch.rand(T, N) * 2, torch.rand(T, N, N)
    return dict(x=x, f=f, phi=phi, alpha=alpha, bias=bias, h_post=h_post, h_res=h_res)


def _calls(dtype):
    a = _inputs(dtype)
    ops = torch.ops.hcext
    scalars = (20, 1e-6, 1e-6, 1e-6, 2.0)
    pre = ops.mhc_pre_fwd(a["x"], a["phi"], a["alpha"], a["bias"], *scalars)
    boundary = ops.mhc_post_pre_fwd(a["f"], a["x"], a["h_post"], a["h_res"], a["phi"], a["alpha"], a["bias"], *scalars)
    gy, g_streams = torch.randn(T, C, dtype=dtype), torch.randn(T, N, C, dtype=dtype)
    g_n, g_nn = torch.randn(T, N), torch.randn(T, N, N)
    pre_mix = torch.rand(T, N)
    pre_s = ops.mhc_pre_shifted_fwd(a["x"], pre_mix, a["phi"], a["alpha"], a["bias"], *scalars)
    boundary_s = ops.mhc_post_pre_shifted_fwd(a["f"], a["x"], a["h_post"], a["h_res"], pre_mix, a["phi"], a["alpha"],
                                              a["bias"], *scalars)
    shifted = {
        "mhc_pre_shifted_fwd": (dict(x=a["x"], pre_mix=pre_mix, phi=a["phi"], alpha=a["alpha"], bias=a["bias"]),
                                pre_s),
        "mhc_shifted_backward": (
            dict(x=a["x"], pre_mix=pre_mix, phi=a["phi"], alpha=a["alpha"], bias=a["bias"], proj=pre_s[4],
                 rstd=pre_s[5], grad_layer_input=gy, grad_next_pre_mix=g_n, grad_h_post=g_n, grad_h_res=g_nn),
            ops.mhc_shifted_backward(a["x"], pre_mix, a["phi"], a["alpha"], a["bias"], pre_s[4], pre_s[5], gy, g_n,
                                     g_n, g_nn, 20, 1e-6, 1e-6, 2.0)),
        "mhc_post_pre_shifted_fwd": (dict(f=a["f"], x=a["x"], h_post=a["h_post"], h_res=a["h_res"], pre_mix=pre_mix,
                                          phi=a["phi"], alpha=a["alpha"], bias=a["bias"]), boundary_s),
        "mhc_post_pre_shifted_backward": (
            dict(grad_x_next=g_streams, grad_layer_input=gy, grad_h_post_next=g_n, grad_h_res_next=g_nn,
                 grad_next_pre_mix=g_n, f=a["f"], x=a["x"], h_post=a["h_post"], h_res=a["h_res"], pre_mix=pre_mix,
                 x_next=boundary_s[0], phi=a["phi"], alpha=a["alpha"], bias=a["bias"], proj=boundary_s[5],
                 rstd=boundary_s[6]),
            ops.mhc_post_pre_shifted_backward(g_streams, gy, g_n, g_nn, g_n, a["f"], a["x"], a["h_post"], a["h_res"],
                                              pre_mix, boundary_s[0], a["phi"], a["alpha"], a["bias"], boundary_s[5],
                                              boundary_s[6], 20, 1e-6, 1e-6, 2.0, [True] * 5)),
    }
    return shifted | {
        "mhc_pre_fwd": (dict(x=a["x"], phi=a["phi"], alpha=a["alpha"], bias=a["bias"]), pre),
        "stream_mix_expand": (dict(f=a["f"], x=a["x"], h_post=a["h_post"], h_res=a["h_res"]),
                              ops.stream_mix_expand(a["f"], a["x"], a["h_post"], a["h_res"])),
        "stream_mix_expand_backward": (
            dict(grad=g_streams, f=a["f"], x=a["x"], h_post=a["h_post"], h_res=a["h_res"]),
            ops.stream_mix_expand_backward(g_streams, a["f"], a["x"], a["h_post"], a["h_res"])),
        "mhc_backward": (
            dict(x=a["x"], phi=a["phi"], alpha=a["alpha"], bias=a["bias"], proj=pre[3], rstd=pre[4],
                 grad_layer_input=gy, grad_h_post=g_n, grad_h_res=g_nn),
            ops.mhc_backward(a["x"], a["phi"], a["alpha"], a["bias"], pre[3], pre[4], gy, None, g_n, g_nn, 20, 1e-6,
                             1e-6, 2.0)),
        "mhc_post_pre_fwd": (dict(f=a["f"], x=a["x"], h_post=a["h_post"], h_res=a["h_res"], phi=a["phi"],
                                  alpha=a["alpha"], bias=a["bias"]), boundary),
        "mhc_post_pre_backward": (
            dict(grad_x_next=g_streams, grad_layer_input=gy, grad_h_post_next=g_n, grad_h_res_next=g_nn, f=a["f"],
                 x=a["x"], h_post=a["h_post"], h_res=a["h_res"], x_next=boundary[0], phi=a["phi"], alpha=a["alpha"],
                 bias=a["bias"], proj=boundary[4], rstd=boundary[5]),
            ops.mhc_post_pre_backward(g_streams, gy, g_n, g_nn, a["f"], a["x"], a["h_post"], a["h_res"], boundary[0],
                                      a["phi"], a["alpha"], a["bias"], boundary[4], boundary[5], 20, 1e-6, 1e-6, 2.0,
                                      [True, True, True, True])),
    }


def _returns(op, out):
    names = [r.name or "out" for r in getattr(torch.ops.hcext, op).default._schema.returns]
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return dict(zip(names, outs))


@pytest.mark.parametrize("backend", sorted(table.BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", sorted(table.OPS))
def test_table_matches_the_ops_tensors(op, dtype, backend):
    # The ops run on the CPU; both backends' tables name the same external tensors (they differ
    # in the passes between them), so both are checked against the same calls.
    shape = table.Shape(T=T, n=N, C=C, s=torch.empty((), dtype=dtype).element_size())
    inputs, out = _calls(dtype)[op]
    outputs = _returns(op, out)
    passes = table.BACKENDS[backend][op]
    reads = {t: k for _, rs, _ in passes for t, k in rs}
    writes = {t: k for _, _, ws in passes for t, k in ws}
    large = shape.size("row")
    for name, tensor in inputs.items():
        if name in reads:
            assert shape.size(reads[name]) == tensor.nbytes, (op, name, reads[name])
        else:
            assert tensor.nbytes < large, f"{op}: input {name} ({tensor.nbytes} bytes) is not in the byte table"
    for name, tensor in outputs.items():
        if name in writes:
            assert shape.size(writes[name]) == tensor.nbytes, (op, name, writes[name])
        else:
            assert tensor.nbytes < large, f"{op}: output {name} ({tensor.nbytes} bytes) is not in the byte table"


def test_floor_is_below_the_design():
    for s in (2, 4):
        shape = table.Shape(T=4096, n=4, C=1024, s=s)
        for backend in table.BACKENDS:
            for row in table.table(shape, backend):
                assert row["floor_bytes"] <= row["design_bytes"], row


def test_cpu_forward_passes_read_less():
    # mhc_pre: the CPU's projection pass writes the layer input (CUDA's aggregate reads x and h_pre
    # again; the CPU pass reads alpha and bias instead). The boundary: the same (both backends
    # write x_next in the projection pass, neither reads it back for the projection).
    shape = table.Shape(T=4096, n=4, C=1024, s=4)
    saved = {"mhc_pre_fwd": 1, "mhc_post_pre_fwd": 1}  # streams-sized reads saved
    for op, reads in saved.items():
        cuda, cpu = table.op_bytes(op, shape, "cuda"), table.op_bytes(op, shape, "cpu")
        assert cuda["read"] - cpu["read"] == (reads * shape.size("streams") + shape.size("coef_n")
                                              - shape.size("alpha") - shape.size("bias")), op
        assert cuda["write"] == cpu["write"], op


def test_cpu_backward_passes_read_less():
    # The CPU's backward pass reads x once per block (the row sums; grad_x reads the block again
    # from cache) and keeps the epilogue's per-token results of a block in cache. Both backends'
    # boundary runs the mix's backward on x_next's gradient without storing it; CUDA's grad_x pass
    # splits the channels over blocks, so its sums over channels go through partial sums.
    shape = table.Shape(T=4096, n=4, C=1024, s=4)
    small = shape.size("row") + shape.size("coef_n") + 2 * shape.size("proj") + 2 * shape.size("token")
    partial = shape.size("mix_partial")
    saved = {"mhc_backward": (1, 0, 0), "mhc_post_pre_backward": (1, 0, partial)}  # (reads, writes) in streams
    for op, (reads, writes, extra) in saved.items():
        cuda, cpu = table.op_bytes(op, shape, "cuda"), table.op_bytes(op, shape, "cpu")
        assert cuda["read"] - cpu["read"] == reads * shape.size("streams") + small + extra, op
        assert cuda["write"] - cpu["write"] == writes * shape.size("streams") + extra, op


def test_cuda_boundary_backward_never_stores_x_next_gradient():
    # mhc_grad_x_phi_kernel's kMix (n <= 6): x_next's summed gradient is neither written nor read.
    for backend in table.BACKENDS:
        passes = table.BACKENDS[backend]["mhc_post_pre_backward"]
        assert not any(t == "grad_x_next_total" for _, rs, ws in passes for t, _ in rs + ws), backend
