"""Bytes the mHC passes move, counted from what each kernel reads and writes, against the floor.

One table per op (``OPS``): the passes its forward or backward runs (csrc/mhc/mhc_driver.h,
csrc/streams/streams_driver.h), each with the tensors it reads and writes. CUDA (n <= 6) runs
``OPS`` (the fused boundary's mix inside its projection pass); the CPU (``CPU_OPS``) differs in the
forwards of mhc_pre and the fused boundary, whose projection pass also writes the layer input from
the rows it has just read (no aggregate pass), and in the backwards,
which run the layer input's row sums, the epilogue's backward and the grad_x pass block by block
of tokens (x read from memory once) and, in the boundary, the mix's backward on each block of
x_next's gradient (never stored). A tensor is a name and a size in elements times its element size:

    x, out, grad_x ...  T * n * C elements of the streams' dtype (s bytes)
    f, y, gy ...        T * C elements of the streams' dtype
    proj, dproj         T * D elements, D = n² + 2n, compute dtype (4 bytes; 8 for fp64)
    rstd, h_*           T, T * n, T * n² elements, compute dtype
    phi, grad_phi       n * C * D elements, compute dtype (read once per pass: the passes
                        tile it in cache)

Scratch the passes keep on chip (a block of rows in L2, shared-memory tiles) is not traffic; the
workspaces they write and read back (grad_phi's per-chunk partial sums, the projection's split
partials on CUDA) are. ``tests/test_bytes.py`` checks every op's external reads and writes here
against the tensors the op really takes and returns.

The floor of a sub-layer (what must move whatever the design): read x and f, write the layer
input and the new streams (forward); read the incoming gradients and x again, write grad_x and
grad_f (backward). The floor of the boundary (hcext::mhc_post_pre): read x and f, write x_next
and the layer input; backward: read the incoming gradients (of x_next and the layer input), x
and f (and x_next for the coefficient gradients), write grad_x and grad_f.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple


@dataclasses.dataclass(frozen=True)
class Shape:
    T: int
    n: int
    C: int
    s: int  # bytes per element of the streams (x, f, ...)
    c: int = 4  # bytes per element of the coefficients (compute dtype)

    @property
    def D(self) -> int:
        return self.n * self.n + 2 * self.n

    def size(self, kind: str) -> int:
        """Bytes of one tensor of the kind named (see the module docstring)."""
        T, n, C, D = self.T, self.n, self.C, self.D
        return {
            "streams": T * n * C * self.s,  # x, out, grad_x, x_next, ...
            "row": T * C * self.s,  # f, y, gy, grad_f, layer_input
            "proj": T * D * self.c,
            "token": T * self.c,  # rstd, drstd
            "token3": T * 3 * self.c,  # dalpha (per token)
            "coef_n": T * n * self.c,  # h_pre, h_post, their gradients
            "coef_nn": T * n * n * self.c,  # h_res and its gradient
            "phi": n * C * D * self.c,
            "alpha": 3 * self.c,
            "bias": D * self.c,
            # CUDA's grad_x pass: per block of GRAD_CHANNELS channels, each token's sums over them
            # for h_res's and h_post's gradients (n² + n), added in block order by a second pass.
            "mix_partial": -(-C // GRAD_CHANNELS) * T * (n * n + n) * self.c,
            # ... and, for the shifted collapse, each token's Σ_c gy x_i over them (n).
            "rows_partial": -(-C // GRAD_CHANNELS) * T * n * self.c,
        }[kind]


# Channels per block of CUDA's backward pass over x (kGradW in csrc/mhc/mhc_kernels.cu).
GRAD_CHANNELS = 64

# A pass: (name, reads [(tensor, kind)], writes [(tensor, kind)]).
Pass = Tuple[str, List[Tuple[str, str]], List[Tuple[str, str]]]

# grad_phi's partial sums: CPU at most 16 chunks, CUDA at most 16 (grad_tokens_per_chunk); both
# written once and read once by the fixed-order sum. Counted as 16 phi-sized tensors each way.
PARTIALS = 16

OPS: Dict[str, List[Pass]] = {
    # (CUDA rows of n*C*s <= 2.5 KB take the resident pass instead: CPU_OPS' mhc_pre_fwd and boundary.)
    "mhc_pre_fwd": [
        ("project", [("x", "streams"), ("phi", "phi")], [("proj", "proj"), ("rstd", "token")]),
        ("epilogue", [("proj", "proj"), ("rstd", "token"), ("alpha", "alpha"), ("bias", "bias")],
         [("h_pre", "coef_n"), ("h_post", "coef_n"), ("h_res", "coef_nn")]),
        ("aggregate", [("x", "streams"), ("h_pre", "coef_n")], [("layer_input", "row")]),
    ],
    "stream_mix_expand": [
        ("mix", [("f", "row"), ("x", "streams"), ("h_post", "coef_n"), ("h_res", "coef_nn")], [("out", "streams")]),
    ],
    "stream_mix_expand_backward": [
        ("mix_backward", [("grad", "streams"), ("f", "row"), ("x", "streams"), ("h_post", "coef_n"),
                          ("h_res", "coef_nn")],
         [("grad_f", "row"), ("grad_x", "streams"), ("grad_h_post", "coef_n"), ("grad_h_res", "coef_nn")]),
    ],
    "mhc_backward": [
        ("layer_input_grad", [("x", "streams"), ("grad_layer_input", "row"), ("grad_h_pre", "coef_n")],
         [("g_pre", "coef_n")]),
        ("epilogue_backward", [("proj", "proj"), ("rstd", "token"), ("alpha", "alpha"), ("bias", "bias"),
                               ("g_pre", "coef_n"), ("grad_h_post", "coef_n"), ("grad_h_res", "coef_nn")],
         [("dl", "proj"), ("dproj", "proj"), ("dalpha", "token3"), ("drstd", "token")]),
        ("grad_x_phi", [("x", "streams"), ("grad_layer_input", "row"), ("dproj", "proj"), ("proj", "proj"),
                        ("rstd", "token"), ("drstd", "token"), ("phi", "phi")]
         + [(f"partial{i}", "phi") for i in range(PARTIALS)],
         [("grad_x", "streams")] + [(f"partial{i}", "phi") for i in range(PARTIALS)]),
        ("grad_phi_sum", [(f"partial{i}", "phi") for i in range(PARTIALS)], [("grad_phi", "phi")]),
        ("coefficient_sums", [("dl", "proj"), ("dalpha", "token3")], [("grad_alpha", "alpha"), ("grad_bias", "bias")]),
    ],
    # The boundary: x_next is mixed and projected in the same tiles (mhc_project_kernel, n <= 6;
    # the split's partial sums, like the projection's, are proj-sized and not counted).
    "mhc_post_pre_fwd": [
        ("mix+project", [("f", "row"), ("x", "streams"), ("h_post", "coef_n"), ("h_res", "coef_nn"), ("phi", "phi")],
         [("x_next", "streams"), ("proj", "proj"), ("rstd", "token")]),
        ("epilogue", [("proj", "proj"), ("rstd", "token"), ("alpha", "alpha"), ("bias", "bias")],
         [("h_pre", "coef_n"), ("h_post_next", "coef_n"), ("h_res_next", "coef_nn")]),
        ("aggregate", [("x_next", "streams"), ("h_pre", "coef_n")], [("layer_input", "row")]),
    ],
}
# The boundary's backward: x_next's coefficient path (mhc_backward's passes, on x_next, with
# grad_x_next read by the grad_x pass and added before the one rounding); the same pass runs the
# mix's backward on x_next's summed gradient (never stored: mhc_grad_x_phi_kernel's kMix, n <= 6),
# whose per-token sums over channels come out as per-block partial sums added by a pass of their own.
_MIX_BACKWARD = ("mix_backward", [("grad_x_next_total", "streams"), ("f", "row"), ("x", "streams"),
                                  ("h_post", "coef_n"), ("h_res", "coef_nn")],
                 [("grad_f", "row"), ("grad_x", "streams"), ("grad_h_post", "coef_n"), ("grad_h_res", "coef_nn")])
_GRAD_PHI_SUM = OPS["mhc_backward"][3]
_COEFFICIENT_SUMS = OPS["mhc_backward"][4]
OPS["mhc_post_pre_backward"] = [
    ("layer_input_grad", [("x_next", "streams"), ("grad_layer_input", "row")], [("g_pre", "coef_n")]),
    ("epilogue_backward", [("proj", "proj"), ("rstd", "token"), ("alpha", "alpha"), ("bias", "bias"),
                           ("g_pre", "coef_n"), ("grad_h_post_next", "coef_n"), ("grad_h_res_next", "coef_nn")],
     [("dl", "proj"), ("dproj", "proj"), ("dalpha", "token3"), ("drstd", "token")]),
    ("grad_x_phi+mix_backward",
     [("x_next", "streams"), ("grad_x_next", "streams"), ("grad_layer_input", "row"), ("dproj", "proj"),
      ("proj", "proj"), ("rstd", "token"), ("drstd", "token"), ("phi", "phi")]
     + [(f"partial{i}", "phi") for i in range(PARTIALS)]
     + [r for r in _MIX_BACKWARD[1] if r[0] != "grad_x_next_total"],
     [(f"partial{i}", "phi") for i in range(PARTIALS)] + [("grad_f", "row"), ("grad_x", "streams"),
                                                          ("mix_partial", "mix_partial")]),
    ("mix_rows_sum", [("mix_partial", "mix_partial")], [("grad_h_post", "coef_n"), ("grad_h_res", "coef_nn")]),
    _GRAD_PHI_SUM,
    _COEFFICIENT_SUMS,
]


# DeepSeek-V4.1's shifted collapse (layer input = Σ pre_mix[i] x_i; pre_mix does not depend on
# this layer's projection): the projection pass writes the layer input from the rows it reads
# (mhc_project_kernel, n <= 6; the CPU's projection pass), and the backward's pass over x computes
# pre_mix's gradient rows Σ_c gy x_i (per-block partial sums on CUDA) — no pass of their own.
OPS["mhc_pre_shifted_fwd"] = [
    ("project+layer_input", [("x", "streams"), ("pre_mix", "coef_n"), ("phi", "phi")],
     [("proj", "proj"), ("rstd", "token"), ("layer_input", "row")]),
    ("epilogue", [("proj", "proj"), ("rstd", "token"), ("alpha", "alpha"), ("bias", "bias")],
     [("next_pre_mix", "coef_n"), ("h_post", "coef_n"), ("h_res", "coef_nn")]),
]
_SHIFTED_EPILOGUE_BACKWARD = (
    "epilogue_backward", [("proj", "proj"), ("rstd", "token"), ("alpha", "alpha"), ("bias", "bias"),
                          ("grad_next_pre_mix", "coef_n"), ("grad_h_post", "coef_n"), ("grad_h_res", "coef_nn")],
    [("dl", "proj"), ("dproj", "proj"), ("dalpha", "token3"), ("drstd", "token")])
OPS["mhc_shifted_backward"] = [
    _SHIFTED_EPILOGUE_BACKWARD,
    ("grad_x_phi+rows", [r for r in OPS["mhc_backward"][2][1]] + [("pre_mix", "coef_n")],
     OPS["mhc_backward"][2][2] + [("rows_partial", "rows_partial")]),
    ("rows_sum", [("rows_partial", "rows_partial")], [("grad_pre_mix", "coef_n")]),
    _GRAD_PHI_SUM,
    _COEFFICIENT_SUMS,
]
OPS["mhc_post_pre_shifted_fwd"] = [
    ("mix+project+layer_input", OPS["mhc_post_pre_fwd"][0][1] + [("pre_mix", "coef_n")],
     OPS["mhc_post_pre_fwd"][0][2] + [("layer_input", "row")]),
    ("epilogue", OPS["mhc_post_pre_fwd"][1][1], [("next_pre_mix", "coef_n"), ("h_post_next", "coef_n"),
                                                 ("h_res_next", "coef_nn")]),
]
_BOUNDARY_GRAD_PASS = OPS["mhc_post_pre_backward"][2]
OPS["mhc_post_pre_shifted_backward"] = [
    (_SHIFTED_EPILOGUE_BACKWARD[0],
     [({"grad_h_post": "grad_h_post_next", "grad_h_res": "grad_h_res_next"}.get(t, t), k)
      for t, k in _SHIFTED_EPILOGUE_BACKWARD[1]], _SHIFTED_EPILOGUE_BACKWARD[2]),
    ("grad_x_phi+mix_backward+rows", _BOUNDARY_GRAD_PASS[1] + [("pre_mix", "coef_n")],
     _BOUNDARY_GRAD_PASS[2] + [("rows_partial", "rows_partial")]),
    ("mix_rows_sum", [("mix_partial", "mix_partial"), ("rows_partial", "rows_partial")],
     [("grad_h_post", "coef_n"), ("grad_h_res", "coef_nn"), ("grad_pre_mix", "coef_n")]),
    _GRAD_PHI_SUM,
    _COEFFICIENT_SUMS,
]


# The CPU: the layer input from the projection pass's rows (CpuMhcBackend::projection_aggregates).
_PROJECT_LAYER_INPUT = ("project+layer_input", [("x", "streams"), ("phi", "phi"), ("alpha", "alpha"), ("bias", "bias")],
                        [("proj", "proj"), ("rstd", "token"), ("layer_input", "row")])
CPU_OPS: Dict[str, List[Pass]] = dict(OPS)
CPU_OPS["mhc_pre_fwd"] = [_PROJECT_LAYER_INPUT, OPS["mhc_pre_fwd"][1]]
# The boundary: each token's row of x_next is mixed, stored and projected (and aggregated) from
# cache in the same pass.
CPU_OPS["mhc_post_pre_fwd"] = [
    ("mix+project+layer_input", OPS["mhc_post_pre_fwd"][0][1] + _PROJECT_LAYER_INPUT[1][2:],
     OPS["mhc_post_pre_fwd"][0][2] + _PROJECT_LAYER_INPUT[2][2:]),
    OPS["mhc_post_pre_fwd"][1],
]
# The backward (CpuMhcBackend::kFusedBackwardPass): per block of 24 tokens, the layer input's row
# sums read the block's rows of x from memory, the epilogue's backward runs on the block's
# tokens, and the grad_x pass reads the rows again from cache (384 KB for fp32 n=4 C=1024: L2).
_BACKWARD_PASS = [
    ("row_sums+epilogue_backward+grad_x_phi",
     [r for r in OPS["mhc_backward"][0][1] if r[0] != "x"] + [r for r in OPS["mhc_backward"][1][1] if r[0] != "g_pre"]
     + [r for r in OPS["mhc_backward"][2][1] if r[0] not in ("grad_layer_input", "dproj", "proj", "rstd", "drstd")],
     OPS["mhc_backward"][0][2] + OPS["mhc_backward"][1][2] + OPS["mhc_backward"][2][2]),
]
CPU_OPS["mhc_backward"] = _BACKWARD_PASS + OPS["mhc_backward"][3:]
# The boundary: the same pass on x_next, which also reads grad_x_next and runs the mix's backward
# on each block of x_next's summed gradient from a per-thread buffer (never stored; its sums
# over channels finished within the block: no partial sums).
CPU_OPS["mhc_post_pre_backward"] = [
    ("row_sums+epilogue_backward+grad_x_phi+mix_backward",
     [({"x": "x_next", "grad_h_post": "grad_h_post_next", "grad_h_res": "grad_h_res_next"}.get(t, t), k)
      for t, k in _BACKWARD_PASS[0][1] if t != "grad_h_pre"]
     + [("grad_x_next", "streams")] + [r for r in _MIX_BACKWARD[1] if r[0] != "grad_x_next_total"],
     [w for w in _BACKWARD_PASS[0][2] if w[0] != "grad_x"] + _MIX_BACKWARD[2]),
    _GRAD_PHI_SUM,
    _COEFFICIENT_SUMS,
]
# The shifted collapse's backward: the same pass, with pre_mix's gradient rows from the block's
# rows of x (or x_next) while they are read for the row sums.
_FROM_CACHE = ("dproj", "proj", "rstd", "drstd")  # the epilogue's per-token results of the block
CPU_OPS["mhc_shifted_backward"] = [
    ("epilogue_backward+grad_x_phi+rows",
     OPS["mhc_shifted_backward"][0][1] + [r for r in OPS["mhc_shifted_backward"][1][1] if r[0] not in _FROM_CACHE],
     [w for w in OPS["mhc_shifted_backward"][1][2] if w[0] != "rows_partial"] + [("grad_pre_mix", "coef_n")]),
    _GRAD_PHI_SUM,
    _COEFFICIENT_SUMS,
]
CPU_OPS["mhc_post_pre_shifted_backward"] = [
    ("epilogue_backward+grad_x_phi+mix_backward+rows",
     OPS["mhc_post_pre_shifted_backward"][0][1]
     + [r for r in OPS["mhc_post_pre_shifted_backward"][1][1] if r[0] not in _FROM_CACHE],
     [w for w in OPS["mhc_post_pre_shifted_backward"][1][2] if w[0] not in ("rows_partial", "mix_partial")]
     + OPS["mhc_post_pre_shifted_backward"][2][2]),
    _GRAD_PHI_SUM,
    _COEFFICIENT_SUMS,
]
BACKENDS = {"cuda": OPS, "cpu": CPU_OPS}


def op_bytes(op: str, shape: Shape, backend: str = "cuda") -> Dict[str, int]:
    """{'read': bytes, 'write': bytes} of one op's passes."""
    passes = BACKENDS[backend][op]
    read = sum(shape.size(k) for _, reads, _ in passes for _, k in reads)
    write = sum(shape.size(k) for _, _, writes in passes for _, k in writes)
    return {"read": read, "write": write}


# The sub-layer of benchmarks/bench_mhc.py (mhc_pre, then stream_mix_expand) and the boundary
# of benchmarks/bench_boundary.py. Backward: autograd also adds the two gradients of x (the
# sub-layer's x feeds both ops): one more read of two and write of one streams-sized tensor.
# shifted: the same with DeepSeek-V4.1's shifted collapse (mhc_pre_shifted, mhc_post_pre_shifted).
def sublayer_bytes(shape: Shape, backward: bool, backend: str = "cuda", shifted: bool = False) -> int:
    pre, pre_backward = ("mhc_pre_shifted_fwd", "mhc_shifted_backward") if shifted else ("mhc_pre_fwd", "mhc_backward")
    total = sum(sum(op_bytes(op, shape, backend).values()) for op in (pre, "stream_mix_expand"))
    if backward:
        total += sum(sum(op_bytes(op, shape, backend).values())
                     for op in (pre_backward, "stream_mix_expand_backward"))
        total += 3 * shape.size("streams")  # autograd's sum of x's two gradients
    return total


def boundary_bytes(shape: Shape, backward: bool, backend: str = "cuda", shifted: bool = False) -> int:
    fwd, bwd = ("mhc_post_pre_shifted_fwd", "mhc_post_pre_shifted_backward") if shifted else (
        "mhc_post_pre_fwd", "mhc_post_pre_backward")
    total = sum(op_bytes(fwd, shape, backend).values())
    if backward:
        total += sum(op_bytes(bwd, shape, backend).values())
    return total


# The floor, as (streams-sized, row-sized) tensors moved: forward (read x, f; write the new streams
# and the layer input), then what the backward adds: sub-layer (read grad_out, grad_layer_input, x;
# write grad_x, grad_f), boundary (read grad_x_next, grad_layer_input, x, x_next, f; write grad_x,
# grad_f).
FLOORS = {"sub-layer": ((2, 2), (3, 2)), "boundary": ((2, 2), (4, 3))}


def floor_bytes(kind: str, shape: Shape, backward: bool) -> int:
    parts = FLOORS[kind][: 2 if backward else 1]
    return sum(streams * shape.size("streams") + rows * shape.size("row") for streams, rows in parts)


def table(shape: Shape, backend: str = "cuda") -> List[Dict]:
    """Rows of the byte table for one shape and backend: design bytes, floor, ratio, in copies of x."""
    copy = 2 * shape.size("streams")  # a same-size copy reads and writes x once
    rows = []
    b = backend
    for name, design, floor in (
            ("sub-layer fwd", sublayer_bytes(shape, False, b), floor_bytes("sub-layer", shape, False)),
            ("sub-layer fwd+bwd", sublayer_bytes(shape, True, b), floor_bytes("sub-layer", shape, True)),
            ("boundary fwd", boundary_bytes(shape, False, b), floor_bytes("boundary", shape, False)),
            ("boundary fwd+bwd", boundary_bytes(shape, True, b), floor_bytes("boundary", shape, True)),
            ("shifted sub-layer fwd", sublayer_bytes(shape, False, b, True), floor_bytes("sub-layer", shape, False)),
            ("shifted sub-layer fwd+bwd", sublayer_bytes(shape, True, b, True),
             floor_bytes("sub-layer", shape, True)),
            ("shifted boundary fwd", boundary_bytes(shape, False, b, True), floor_bytes("boundary", shape, False)),
            ("shifted boundary fwd+bwd", boundary_bytes(shape, True, b, True),
             floor_bytes("boundary", shape, True))):
        rows.append({"row": name, "design_bytes": design, "floor_bytes": floor, "ratio": design / floor,
                     "design_copies": design / copy, "floor_copies": floor / copy})
    return rows


def markdown(shape: Shape, title: str, backend: str = "cuda") -> str:
    lines = [f"{title}: T={shape.T}, n={shape.n}, C={shape.C}, {shape.s}-byte streams, {backend.upper()} passes",
             "", "| row | design (GB) | floor (GB) | design / floor | design (copies of x) | floor (copies) |",
             "|---|---|---|---|---|---|"]
    for r in table(shape, backend):
        lines.append(f"| {r['row']} | {r['design_bytes'] / 1e9:.3f} | {r['floor_bytes'] / 1e9:.3f} | "
                     f"{r['ratio']:.2f} | {r['design_copies']:.1f} | {r['floor_copies']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(Shape(T=16384, n=4, C=4096, s=2), "GPU shape, bf16"))
    print()
    print(markdown(Shape(T=4096, n=4, C=1024, s=4), "CPU benchmark shape, fp32", "cpu"))
    print()
    print(markdown(Shape(T=4096, n=4, C=1024, s=2), "CPU benchmark shape, bf16", "cpu"))
