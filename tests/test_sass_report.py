"""scripts/sass_report.py's path walk on hand-written SASS (no nvcc needed): a branch on a kernel
parameter goes the way the parameters say, also where nvcc kept the parameter's flag as a bit of
a register (around a call that clobbers predicates), so that one path, not a range that skips
the element's own work, is counted."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
import sass_report  # noqa: E402

# grad_input is PointwiseArgs' field at 0x38, from sm_90's parameter base 0x210.
GRAD_INPUT = hex(sass_report.PARAM_BASE["sm_90"] + sass_report.PW_FIELDS["grad_input"])


def loop(save_flag):
    """A pointwise-like loop: the gradient's two instructions run where grad_input is given. The
    flag is tested from a predicate, or saved as bit 2 of R16 (r & ~4, then @P2 r | 4) and
    restored from it inside the loop."""
    ops = [f"ULDC.64 UR40, c[0x0][{GRAD_INPUT}]",
           "ISETP.NE.U32.AND P0, PT, RZ, UR40, PT",
           "ISETP.NE.AND.EX P2, PT, RZ, UR41, PT, P0"]
    if save_flag:
        ops += ["LOP3.LUT R16, R16, 0xfffffffb, RZ, 0xc0, !PT",
                "@P2 LOP3.LUT R16, R16, 0x4, RZ, 0xfc, !PT"]
    first = len(ops)
    ops += ["LDG.E.128.CONSTANT R4, desc[UR36][R2.64]",
            "ISETP.GE.AND P2, PT, R4, RZ, PT"]  # P2 reused for data: the flag must come from R16
    if save_flag:
        ops.append("LOP3.LUT P6, RZ, R16, 0x4, RZ, 0xc0, !PT")
        skip = "@!P6"
    else:
        ops.append("ISETP.NE.AND.EX P6, PT, RZ, UR41, PT, P0")
        skip = "@!P6"
    target = (len(ops) + 3) * 16
    ops += [f"{skip} BRA {hex(target)}",
            "FMUL R0, R5, R6",
            "FADD R0, R0, R7",
            "IADD3 R2, R2, 0x10, RZ",
            f"@P1 BRA {hex(first * 16)}"]
    insns = [(i * 16, op) for i, op in enumerate(ops)]
    return insns, first, len(insns) - 1


@pytest.mark.parametrize("save_flag", [False, True], ids=["predicate", "register-bit"])
@pytest.mark.parametrize("grad_input", [True, False])
def test_parameter_branch_followed_one_way(save_flag, grad_input):
    insns, first, last = loop(save_flag)
    params = sass_report.param_values("sm_90", sass_report.PW_FIELDS, {"grad_input": grad_input})
    counts = sass_report.path_counts(insns, first, last, params,
                                     lambda op: sass_report.is_load128(op, "LDG", True))
    (lo, lo_loads), (hi, hi_loads) = counts
    body = last - first + 1
    expected = body if grad_input else body - 2
    assert (lo, hi) == (expected, expected)
    assert lo_loads == hi_loads == 1


def test_divergence_fallback_and_float_parameter():
    """A warp's BRA.DIV (to the diverged warp's fallback) is not taken, and a float parameter
    compared with zero (FSETP.NEU) steers its branch: CeParams' eps, label smoothing off, skips
    the smoothing block."""
    eps = hex(sass_report.PARAM_BASE["sm_90"] + sass_report.CE_FIELDS["eps"])
    ops = ["MOV R0, R0",  # the loop head
           "UMOV UR4, 0xffffffff",
           "BRA.DIV UR4, 0x100",
           f"LDC R2, c[0x0][{eps}]",
           "FSETP.NEU.AND P0, PT, R2, RZ, PT",
           "@!P0 BRA 0x80",
           "FADD R3, R3, R4",  # the smoothing term
           "FMUL R3, R3, R5",
           "ISETP.NE.AND P1, PT, R6, RZ, PT",  # 0x80
           "@P1 BRA 0x0"]
    insns = [(i * 16, op) for i, op in enumerate(ops)] + [(0x100, "EXIT")]
    for smoothing in (False, True):
        params = sass_report.param_values("sm_90", sass_report.CE_FIELDS, {"eps": smoothing})
        (lo, _), (hi, _) = sass_report.path_counts(insns, 0, len(ops) - 1, params, lambda op: 0)
        expected = len(ops) - (0 if smoothing else 2)
        assert (lo, hi) == (expected, expected)


NVDISASM_GI = """\
.text._Z6kernelv:
	//## File "/src/csrc/cuda/cross_entropy_impl.cuh", line 20 inlined at "/src/csrc/cuda/cross_entropy_impl.cuh", line 90
	//## File "/src/csrc/cuda/cross_entropy_impl.cuh", line 90
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   FADD R2, R2, R3 ;
	//## File "/src/csrc/cuda/cross_entropy_impl.cuh", line 91
        /*0020*/              @P0 BRA `(.L_x_1) ;
        /*0030*/                   EXIT ;
"""


def test_line_info_and_labels():
    """nvdisasm -gi's listing: each instruction carries its line and the calls it was inlined
    through (a header block holds until the next), and branch labels become addresses."""
    insns, chains = sass_report.parse_sass_lines(NVDISASM_GI)["_Z6kernelv"]
    impl = "cross_entropy_impl.cuh"
    assert insns[2] == (0x20, "@P0 BRA 0x10")
    assert chains[0] == chains[1] == {(impl, 20), (impl, 90)}
    assert chains[2] == chains[3] == {(impl, 91)}


def test_loop_exit_by_a_call_to_exit():
    """sm_80 ends a kernel's loop over rows with a guarded call to an EXIT after the loop: the
    path that does not take it goes round the loop (it was left out as a call's path, leaving
    only the path that ends at the inner loop's back edge)."""
    ops = ["MOV R0, R0",  # the loop over rows
           "FADD R3, R3, R4",  # an inner loop (a reduction's)
           "@P1 BRA 0x10",
           "ISETP.GE.U32.AND P0, PT, R17, c[0x0][0x288], PT",
           "@P0 CALL.REL.NOINC 0x60",
           "BRA 0x0",
           "EXIT"]
    insns = [(i * 16, op) for i, op in enumerate(ops)]
    (lo, _), (hi, _) = sass_report.path_counts(insns, 0, 5, lambda off: None, lambda op: 0)
    assert (lo, hi) == (3, 6)
