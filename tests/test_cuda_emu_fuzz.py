"""The randomized differential tests of test_fuzz.py, run on the CUDA kernels (csrc/cuda,
under the CPU emulator of tests/cuda_emu) instead of the CPU ops: the same drawn shapes,
options, special values and grad_outputs, the same comparison with torch and the float64
result, at the kernel level as csrc/ops.h calls it (contiguous inputs; cross-entropy as
(N, C, D) with class weights in the accumulation dtype; pointwise weights expanded to the
input's shape). The forward's fused gradient (grad_output 1) is checked for mean and sum, and
the backward kernel with the drawn grad_output for every reduction.

Not drawn here (the Python layer's part, covered by test_fuzz.py on the CPU): strided layouts
(ops.h makes inputs contiguous), broadcast targets, zero classes (functional.py hands them to
torch), kl_div's batchmean and the weighted mean of mse/l1 (formed in Python from the sum),
out-of-range targets and BCE inputs (device asserts, tested in test_cuda_emu.py). Buffers are
drawn aligned, 8 bytes off 16, or ending at a guard page; the cross-entropy class weights also on
their own, at any whole element past a 16-byte boundary (read from shifted copies then)."""
import os
import warnings

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from test_fuzz import (PROFILE, _abs_scale, _ce_extras, _ce_reference, _ce_tensors,
                       _grad_output, _pointwise_values, _term_sizes, _torch_call, _weights,
                       assert_matches, ce_grad_scale, ce_mean_denominator, ce_value_scale,
                       cross_entropy_specs, pointwise_specs)

# The emulator runs every thread of every block on the CPU: fewer examples than test_fuzz.py.
EXAMPLES = max(1, PROFILE.max_examples // int(os.environ.get("TL_EMU_FUZZ_DIVISOR", 3)))


@st.composite
def kernel_specs(draw):
    spec = draw(cross_entropy_specs())
    shape = spec["shape"]
    if len(shape) == 1:  # unbatched: one row
        shape = (1,) + shape
    if shape[1] == 0:  # zero classes never reach the kernels
        shape = (shape[0], 1) + shape[2:]
    spec.update(shape=shape, layout="contiguous", bad_target_rate=0.0, one_element_target=False)
    spec["buffers"] = draw(st.sampled_from([0, 0, "off", "tight"]))
    acc_bytes = 8 if spec["dtype"] == torch.float64 else 4
    spec["weight_offset"] = draw(st.sampled_from([0, 0] + list(range(acc_bytes, 16, acc_bytes))))
    return spec


def run_kernels(s, spec):
    dtype = spec["dtype"]
    x, t, w, gen = _ce_tensors(spec, "cpu")
    probs = spec["probs"]
    kw = dict(ignore_index=spec["ignore_index"], label_smoothing=spec["label_smoothing"],
              reduction=spec["reduction"])
    wd = None if w is None else w.to(dtype)
    w64 = None if w is None else wd.double()
    # "off": 8 bytes, a whole element of every buffer (int64 targets too), half a vector
    layout = {0: 0, "off": 8, "tight": "tight"}[spec["buffers"]]

    xt = x.detach().clone().requires_grad_()
    tt = t.detach().clone().requires_grad_(spec["want_target"])
    xr = x.detach().double().requires_grad_()
    tr = (t.detach().double() if probs else t.detach().clone()).requires_grad_(
        spec["want_target"])
    try:
        theirs = _ce_reference(spec)(xt, tt, wd, **kw)
    except RuntimeError:  # an input torch rejects never reaches the kernels (test_fuzz.py)
        return
    ref = _ce_reference(spec, float64=True)(xr, tr, w64, **kw)
    extras = _ce_extras(spec)  # z-loss and soft-capping

    N, C = x.shape[0], x.shape[1]
    rest = x.shape[2:]
    D = 1
    for d in rest:
        D *= d
    xk = x.reshape(N, C, D)
    tk = t.reshape(N, C, D) if probs else t.reshape(N, D)
    fused = spec["reduction"] != "none"
    lay = dict(layout=layout, weight_layout=spec["weight_offset"])
    fwd = s.cross_entropy(xk, tk, weight=wd, **kw, **extras, want_grad=fused,
                          want_target_grad=fused and spec["want_target"], **lay)
    loss = fwd["loss"].reshape(theirs.shape)
    denominator = ce_mean_denominator(spec, x, tr, w64)
    assert_matches(loss, theirs, ref, "cuda cross_entropy value",
                   ce_value_scale(spec, x, xr, tr, w64, kw, ref, denominator))

    wanted = [0] + ([1] if spec["want_target"] else [])
    g = _grad_output(spec["grad_output"], theirs, gen)
    grads_t = torch.autograd.grad(theirs, [(xt, tt)[i] for i in wanted], g)
    grads_r = torch.autograd.grad(ref, [(xr, tr)[i] for i in wanted], g.double())
    results = []
    if fused and g.item() == 1.0:  # the forward wrote these, for grad_output 1
        results.append(("forward", [fwd["grad_input"], fwd["grad_target"]]))
    # The backward kernel: a scalar grad_output (an expanded one is read as its scalar, as
    # csrc/ops.h does), else one per row.
    go = g.reshape(N, D) if g.dim() and g.stride() != (0,) * g.dim() else (
        g.reshape(-1)[0] if g.numel() else g.reshape(()))
    if g.numel() == 0:
        go = torch.ones((), dtype=dtype)
    bwd = s.cross_entropy(xk, tk, weight=wd, **kw, **extras, grad_output=go,
                          row_stats=fwd["row_stats"], want_grad=True,
                          want_target_grad=spec["want_target"], **lay)
    results.append(("backward", [bwd["grad_input"], bwd["grad_target"]]))
    for kind, outs in results:
        for i, b, c in zip(wanted, grads_t, grads_r):
            ours = outs[i].reshape(N, C, *rest)
            assert_matches(ours, b, c,
                           f"cuda cross_entropy {kind} grad {'input' if i == 0 else 'target'}",
                           ce_grad_scale(spec, x, tr, w64, g, c, denominator))


@settings(PROFILE, max_examples=EXAMPLES)
@given(spec=kernel_specs())
def test_cross_entropy_kernels_against_torch(emu, spec):
    with emu.session() as s:
        run_kernels(s, spec)


BUFFERS = {0: 0, "off": 8, "tight": "tight"}


@st.composite
def pointwise_kernel_specs(draw):
    spec = draw(pointwise_specs())
    spec.update(layout_x="contiguous", layout_y="contiguous", broadcast_target=False)
    weighted_mean = spec["loss"] in ("mse", "l1") and "weight" in spec["opts"]
    if spec["reduction"] == "batchmean" or (weighted_mean and spec["reduction"] == "mean"):
        spec["reduction"] = "sum"
    spec["buffers"] = draw(st.sampled_from([0, 0, "off", "tight"]))
    return spec


def run_pointwise_kernels(s, spec):
    name, dtype, reduction = spec["loss"], spec["dtype"], spec["reduction"]
    x64, y64 = _pointwise_values(spec, "cuda")  # "cuda": no out-of-range BCE values
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    kw = _weights(spec, tuple(x64.shape), dtype, "cpu", gen)
    kw.update({k: v for k, v in spec["opts"].items() if k not in ("weight", "pos_weight")})
    kw["reduction"] = reduction
    kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    x, y = x64.to(dtype), y64.to(dtype)
    xt, yt = x.clone().requires_grad_(), y.clone().requires_grad_()
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _torch_call(name, xt, yt, kw)
        ref = _torch_call(name, xr, yr, kw64)
    terms = _term_sizes(xr.detach(), yr.detach(), kw64)
    scale = (_abs_scale(name, xr.detach(), yr.detach(), kw64, reduction)
             if reduction != "none" else terms)
    kind = "kl_div_log_target" if spec["opts"].get("log_target") else name
    param = spec["opts"].get("delta", spec["opts"].get("beta", spec["opts"].get("margin", 0.0)))
    weight = kw.get("weight")
    aux = kw.get("pos_weight")
    args = (kind, x, y, None if weight is None else weight.expand(x.shape),
            None if aux is None else aux.expand(x.shape), param, reduction)
    layouts = dict.fromkeys(["x", "y", "weight", "aux", "grad_output", "loss", "grad_input",
                             "grad_target"], BUFFERS[spec["buffers"]])
    fused = reduction != "none"
    fwd = s.pointwise(*args, want_grad_input=fused, want_grad_target=fused, layouts=layouts)
    assert_matches(fwd["loss"], theirs, ref, f"cuda {name} value", scale)
    g = _grad_output(spec["grad_output"], theirs, gen)
    gt = torch.autograd.grad(theirs, [xt, yt], g)
    gr = torch.autograd.grad(ref, [xr, yr], g.double())
    results = []
    if fused and g.item() == 1.0:  # the forward wrote these, for grad_output 1
        results.append(("forward", [fwd["grad_input"], fwd["grad_target"]]))
    # a scalar grad_output (an expanded one is read as its scalar, as csrc/ops.h does)
    go = g if g.dim() and g.stride() != (0,) * g.dim() else g.reshape(-1)[:1].reshape(())
    if g.numel() == 0:
        go = torch.ones((), dtype=dtype)
    bwd = s.pointwise(*args, want_grad_input=True, want_grad_target=True, grad_output=go,
                      layouts=layouts)
    results.append(("backward", [bwd["grad_input"], bwd["grad_target"]]))
    factor = 1 / max(x.numel(), 1) if reduction == "mean" else 1.0
    g_terms = terms * g.double().abs() * factor
    for kind_of_run, outs in results:
        for i, (a, b, c) in enumerate(zip(outs, gt, gr)):
            assert_matches(a, b, c,
                           f"cuda {name} {kind_of_run} grad {'input' if i == 0 else 'target'}",
                           g_terms)


@settings(PROFILE, max_examples=EXAMPLES * 3)
@given(spec=pointwise_kernel_specs())
def test_pointwise_kernels_against_torch(emu, spec):
    with emu.session() as s:
        run_pointwise_kernels(s, spec)
