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
    params = sass_report.pw_params("sm_90", {"grad_input": grad_input})
    counts = sass_report.path_counts(insns, first, last, params,
                                     lambda op: sass_report.is_load128(op, "LDG", True))
    (lo, lo_loads), (hi, hi_loads) = counts
    body = last - first + 1
    expected = body if grad_input else body - 2
    assert (lo, hi) == (expected, expected)
    assert lo_loads == hi_loads == 1
