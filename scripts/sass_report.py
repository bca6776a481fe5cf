"""Per-kernel register, spill and hot-loop instruction counts of csrc/cuda/*.cu, from the SASS.

For every .cu file and architecture (sm_90, sm_80 by default) the file is compiled to a cubin
with nvcc (the extension's own flags, -O3 -lineinfo) and -Xptxas -v (registers, spills), and
disassembled with `cuobjdump -sass` (pip: nvidia-cuda-cuobjdump, which calls nvdisasm from
nvidia-cuda-nvdisasm). No GPU is needed.

Hot loop method (static, conservative):
  - a loop is a backward branch, `BRA target` with target < its own address; its body is every
    instruction from target to the branch, inclusive (so cold branches inside the body, such as
    the rare rescale of an online max, are counted too: an upper bound on the issue per
    iteration);
  - the hot loops are the innermost loops holding a 16-byte global load (LDG.E.128), i.e. the
    vectorized streaming loops, or a 16-byte shared-memory load and a 16-byte global store
    (LDS.128 and STG.128: pass 2 of the sm_90 cluster kernel, ce_cluster_kernel, reads its
    slice back from shared memory and writes the gradient); scalar head/tail loops and
    reductions (their LDS.128 loops store nothing to global memory) are not hot;
  - elements per iteration = V x (16-byte loads in the body) / (16-byte loads per vector of
    elements), V = 16 / sizeof(T); a loop reads global or shared memory, not both. Loads
    per vector: cross-entropy class-index kernels 1 (the logits; class weights are
    `LDG.E.128.CONSTANT` loads and count as no elements), probability-target kernels 2 (logits
    and targets) except the pass writing only the target's gradient, which reads the logits: it
    is told apart by its stores, none of which depends on two loaded vectors (a backward slice
    of each 16-byte store's data within one iteration, through the loads' data, not their
    addresses; 16-byte and 64-bit operands as 4 and 2 registers). The same rule for the
    probability-target vector column kernel (ce_column_vec_kernel<T, 1, kCap>). The slice is
    path-insensitive: in the double soft-capped kernels (tanh's two paths inside the loop) it
    still counts that loop at 2 loads per vector, i.e. 2 x its per-element count;
  - instructions per element = body instructions / elements per iteration;
  - the paths through one iteration are followed too (path_counts, every branch both ways):
    where the fewest and the most instructions per element differ, the cell adds "paths
    fewest-most". The row kernels' hot loops have no branch inside (nvcc predicates the rescale
    of a new row maximum): their static count is their issue per iteration;
  - the vector column kernel's pass-1 loop over whole chunks of V classes is followed by the
    C % V tail, straight-line chunks of V / 2, ..., 1 classes (at most one each per position):
    the cell adds "tail chunks" with each chunk's classes and its fewest-most instructions per
    element over its paths (tail_chunks).
Pointwise kernels (pointwise_kernel<Loss, T, kVecPath, kStreams>): their element loads are
`LDG.E.128.CONSTANT` (const __restrict__ streams), and the hot loop is the pair loop of a whole
chunk (2 x the streams' 16-byte loads: x, y and the optional weight, pos_weight, grad_output
streams of kStreams). nvcc unswitched its body on runtime flags (loss wanted, the gradients'
pointers), so the static body holds several copies. The script follows the paths through one
iteration for a given set of kernel parameters (PW_PATHS: reduction mean or none, loss and
grad_input wanted, no grad_target, no grad_output): a branch on a predicate set by comparing a
parameter (read from the constant bank) with zero goes the way the parameters say, a data
branch both ways, and paths through a CALL (division or sqrt slow paths) are left out. It
prints the fewest-most instructions per element over those paths (an iteration's instructions /
its elements); the range comes from the data branches. The loss parameter is the benchmarked
call's (pointwise_param_nonzero: BCE-with-logits' pos_weight flag, delta, beta, margin 1).
Cross-entropy rows held in registers (ce_row_kernel<T, 0, 1, kGroup, kCap, kW, K>, K > 0: the
forward writing the gradient of rows of at most 2048 vectors) have no hot loop: each thread's K
vectors go through both passes in straight-line code. For these the cubin is also disassembled
with `nvdisasm -gi` (each instruction's source line and the calls it was inlined through), and
the path walk runs over one iteration of the kernel's loop over rows, for the benchmarked
forward's parameters (CE_CACHED_PATH; the parameter offsets are checked against the structs by
a host probe built with nvcc), counting the most instructions of each part on a path: the
row's loads, pass 1's and pass 2's vector steps, the scalar head and tail elements, and the
whole row (reductions, statistics and loss included), each per element of a thread's K full
vectors. The data branches go both ways, so these are the heaviest paths (a new maximum's
rescale, an ignored row's reads), not the usual ones.
Bytes in flight per SM = 16 x (16-byte loads in the body, all issued before the first use in
these loops) x resident threads per SM, where residency is what the registers allow for the
block size the launcher uses (cross-entropy row kernels ce_row_kernel<T, kProb, kVec, kGroup,
kCap, kW>: a warp per row, kGroup = 32, in 256-thread blocks, else 512; 65536 registers per SM,
allocated per warp in units of 256, at most 2048 threads and 32 blocks per SM). The launcher's
grid can cap residency lower (noted in benchmarks/NOTES.md).

Usage: python scripts/sass_report.py [--arch sm_90 --arch sm_80] [--filter NAME] [--files F.cu ...]
"""
import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC_FLAGS = ["-std=c++17", "-O3", "-lineinfo", "-Icsrc", "-Xptxas", "-v"]
VEC = {"__nv_bfloat16": 8, "__half": 8, "float": 4, "double": 2}
SHORT_T = {"__nv_bfloat16": "bf16", "__half": "f16", "float": "f32", "double": "f64"}

INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
FUNC = re.compile(r"^\s*Function : (\S+)")
# "BRA 0x1f0", "@!P0 BRA 0x1f0", "BRA P1, 0x1f0", "BRA.DIV UR4, 0x1f0", "BRA !P2, 0x1f0".
BRANCH = re.compile(r"^(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:!?U?[PR]\w+,\s*)?0x([0-9a-f]+)")
PTXAS_FUNC = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers")


def tool_path(name):
    """nvcc from PATH; cuobjdump/nvdisasm from PATH or the nvidia-* pip wheels."""
    found = shutil.which(name)
    if found:
        return found
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for sub in ("cu13", "cu12", "cuda_cuobjdump", "cuda_nvdisasm"):
            cand = os.path.join(base, "nvidia", sub, "bin", name)
            if os.path.exists(cand):
                return cand
    sys.exit(f"sass_report: {name} not found (pip install nvidia-cuda-cuobjdump "
             "nvidia-cuda-nvdisasm, or put the CUDA toolkit on PATH)")


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


def short_name(pretty):
    """ce_row_kernel<bf16, kProb=0, kVec=1, kGroup=0> style names."""
    s = re.sub(r"^void ", "", pretty)
    s = re.sub(r"torch_losses::(cuda::)?(\(anonymous namespace\)::)?", "", s)
    s = re.sub(r"\(.*\)$", "", s)  # parameter list
    for k, v in SHORT_T.items():
        s = re.sub(r"\b%s\b" % re.escape(k), v, s)
    s = re.sub(r"(\w+)<(\w+)>::type<float>|LossOf<PointwiseKind::\w+>::type<\w+>", "", s)
    s = s.replace("(bool)1", "1").replace("(bool)0", "0").replace("true", "1").replace("false", "0")
    return s


def template_args(name):
    """The top-level template arguments of a short kernel name."""
    inner = name[name.index("<") + 1:name.rindex(">")] if "<" in name else ""
    args, depth, cur = [], 0, ""
    for ch in inner:
        depth += (ch == "<") - (ch == ">")
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return args + [cur.strip()] if inner else []


def parse_sass(text):
    funcs, cur = {}, None
    for line in text.splitlines():
        m = FUNC.match(line)
        if m:
            cur = m.group(1)
            funcs[cur] = []
            continue
        m = INSN.match(line)
        if m and cur is not None:
            funcs[cur].append((int(m.group(1), 16), m.group(2)))
    return funcs


LINE_INFO = re.compile(r'//## File "([^"]+)", line (\d+)')
LABEL = re.compile(r"^(\.L_x_\d+):")
SECTION = re.compile(r"^\.text\.(\S+):$")


def parse_sass_lines(text):
    """`nvdisasm -c -gi` output: per function, its instructions as parse_sass gives them (branch
    labels resolved to addresses) and, per instruction, its source lines: a set of (file name,
    line), the line and every call it was inlined through."""
    funcs, cur = {}, None
    for line in text.splitlines():
        m = SECTION.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), {"insns": [], "chains": [], "labels": {}})
            chain, fresh, pending = frozenset(), True, []
            continue
        if cur is None:
            continue
        m = LINE_INFO.search(line)
        if m:  # a block of these lines (one per inlining level) precedes the instructions
            loc = (os.path.basename(m.group(1)), int(m.group(2)))
            chain, fresh = (frozenset([loc]) if fresh else chain | {loc}), False
            continue
        m = LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = INSN.match(line)
        if m:
            addr = int(m.group(1), 16)
            cur["labels"].update((lab, addr) for lab in pending)
            pending, fresh = [], True
            cur["insns"].append((addr, m.group(2)))
            cur["chains"].append(chain)
    out = {}
    for name, f in funcs.items():
        def address(m, labels=f["labels"]):
            return hex(labels[m.group(1)]) if m.group(1) in labels else m.group(0)
        insns = [(a, re.sub(r"`\((\.L_x_\d+)\)", address, op)) for a, op in f["insns"]]
        out[name] = (insns, f["chains"])
    return out


def mnemonic(op):
    """The opcode with its modifiers, without a guard predicate (@P0, @!UP1)."""
    parts = op.split()
    return parts[1] if parts[0].startswith("@") else parts[0]


def is_load128(op, space, const_loads=False):
    """A 16-byte load from global (LDG) or shared (LDS) memory. `.CONSTANT` global loads
    (ld.global.nc) are element loads in the pointwise kernels (their const __restrict__ streams)
    but class weights (`__ldg`) in the cross-entropy ones."""
    m = mnemonic(op)
    if const_loads and m.startswith(space) and m.endswith(".128.CONSTANT"):
        return True
    return m.startswith(space) and m.endswith(".128")


def is_store128(op):
    m = mnemonic(op)
    return m.startswith("STG") and m.endswith(".128")


def hot_loops(insns, const_loads=False):
    """Innermost loops holding a 16-byte load: dicts of first and last index, body (instructions),
    ldg128, lds128, stg128, mufu."""
    addr_index = {a: i for i, (a, _) in enumerate(insns)}
    loops = []
    for i, (addr, op) in enumerate(insns):
        m = BRANCH.match(op)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= addr or target not in addr_index:
            continue
        body = insns[addr_index[target]:i + 1]
        streams = any(is_load128(o, "LDG", const_loads) for _, o in body) or (
            any(is_load128(o, "LDS") for _, o in body) and any(is_store128(o) for _, o in body))
        if streams:
            loops.append((addr_index[target], i, body))
    inner = [l for l in loops
             if not any(o is not l and o[0] >= l[0] and o[1] <= l[1] for o in loops)]
    result = []
    for start, end, body in inner:
        ops = [o for _, o in body]
        result.append({
            "first": start, "last": end,
            "body": len([o for o in ops if mnemonic(o) != "NOP"]),
            "ldg128": sum(1 for o in ops if is_load128(o, "LDG", const_loads)),
            "lds128": sum(1 for o in ops if is_load128(o, "LDS")),
            "stg128": sum(1 for o in ops if is_store128(o)),
            "mufu": sum(1 for o in ops if mnemonic(o).startswith("MUFU")),
        })
    return result


def tail_chunks(insns, loops, loop, per_vector):
    """The vector column kernel's pass-1 C % V tail after the pass-1 loop `loop`
    (lanes_walk_tail): straight-line chunks of fewer classes, up to the next hot loop. A chunk is
    an innermost block that a forward conditional branch skips, holding 16-byte global loads and
    neither a loop nor an unconditional branch. Each as (classes, fewest, most instructions
    over its paths, path_counts; a chunk's elements are V x its classes)."""
    addr_index = {a: i for i, (a, _) in enumerate(insns)}
    stop = min((l["first"] for l in loops if l["first"] > loop["last"]), default=len(insns))
    blocks = []
    for i in range(loop["last"] + 1, stop):
        m = BRANCH.match(insns[i][1])
        if not m or guard(insns[i][1]) is None:
            continue
        end = addr_index.get(int(m.group(1), 16))
        if end is None or end <= i or end > stop:
            continue
        ops = [op for _, op in insns[i + 1:end]]
        loads = sum(1 for op in ops if is_load128(op, "LDG"))
        jumps = any(BRANCH.match(op) and guard(op) is None for op in ops)
        if loads and not jumps:
            blocks.append((i, end, loads))
    chunks = []
    for i, end, loads in blocks:
        if any((j, e) != (i, end) and i <= j and e <= end for j, e, _ in blocks):
            continue  # holds a smaller chunk
        counts = path_counts(insns, i + 1, end, lambda off: None, lambda op: 0)
        if counts is not None:
            chunks.append((loads // per_vector, counts[0][0], counts[1][0]))
    return chunks


def registers(token):
    """The 32-bit registers an operand names: R4 -> {R4}, R4.64 -> {R4, R5}; [R4.64+0x10] too."""
    out = set()
    for m in re.finditer(r"\b(R)(\d+)(\.64)?\b", token):
        n = int(m.group(2))
        out.update({f"R{n}", f"R{n + 1}"} if m.group(3) else {f"R{n}"})
    return out


# Double-precision arithmetic: its register operands are pairs (R4 names R4 and R5).
DOUBLE_OPS = ("DADD", "DMUL", "DFMA", "DMNMX")


def wide(token, mn):
    """The registers of a data operand of instruction mn: 4 from R8 of a 16-byte load or store
    (LDG.E.128.CONSTANT R8 is R8..R11), 2 of a 64-bit one (IMAD.WIDE, LDG.E.64, DADD), else
    as written."""
    m = re.fullmatch(r"-?\|?R(\d+)\|?", token)
    n = 4 if re.search(r"\.128\b", mn) else \
        2 if re.search(r"\.(WIDE|64)\b", mn) or mn.startswith(DOUBLE_OPS) else 1
    if m is None or n == 1:
        return registers(token)
    return {f"R{int(m.group(1)) + i}" for i in range(n)}


def loads_feeding(body, k):
    """The 16-byte global loads of the loop body whose values reach the data of the store
    body[k] within one iteration (a backward slice in program order). A value depends on a load
    through the load's data only: the slice stops at every load (its address is no data of the
    store) and takes the 64-bit results of .64/.WIDE instructions as register pairs."""
    ops = operands(body[k])
    need = set().union(*(wide(t, mnemonic(body[k])) for t in ops[1:])) if len(ops) > 1 else set()
    loads = set()
    for j in range(k - 1, -1, -1):
        op = body[j]
        ops = operands(op)
        mn = mnemonic(op)
        if not ops or mn.startswith(("ST", "BRA", "BSSY", "BSYNC")):
            continue
        dest = wide(ops[0], mn) if not ops[0].startswith("[") else set()
        if not dest & need:
            continue
        if is_load128(op, "LDG"):
            loads.add(j)
        if not op.startswith("@"):
            need -= dest
        if mn.startswith("LD"):
            continue  # its data comes from memory, not from its address registers
        srcs = ops[1:]
        if mn.startswith("PRMT") and srcs and srcs[-1] == ops[0]:
            # PRMT d, a, 0x7632, d: the high half of a moved down, d's bytes as filler that
            # the unpacking shift discards (not a dependency on d).
            srcs = srcs[:-1]
        # Double arithmetic reads register pairs; other sources are as written (R4.64 a pair).
        pairs = mn.startswith(DOUBLE_OPS)
        need |= set().union(set(), *(wide(t, mn) if pairs else registers(t) for t in srcs))
    return loads


def loads_per_vector(name, loop, insns):
    """16-byte loads per vector of elements in a loop."""
    prob = (name.startswith("ce_row_kernel<") or name.startswith("ce_column_vec_kernel<")) and \
        template_args(name)[1] == "1"
    if prob:
        # Probability targets read logits and targets, except the pass that writes only the
        # target's gradient, which reads the logits: there no stored value depends on two
        # loaded vectors (the input's gradient depends on x and t, stored or not with it).
        body = [op for _, op in insns[loop["first"]:loop["last"] + 1]]
        stores = [k for k, op in enumerate(body) if is_store128(op)]
        if stores and max(len(loads_feeding(body, k)) for k in stores) == 1:
            return 1
        return 2
    return 1


# --- Per-path counts of a loop whose body the compiler unswitched on runtime flags ------------
# The pointwise kernel tests kernel parameters (output pointers, reduction) inside its vector
# loop; nvcc turns these tests into branches between copies of the body. A path through the loop
# body is followed for one assignment of those parameters: a predicate set by comparing a
# kernel parameter (loaded from the constant bank c[0x0][...]) with zero takes the value the
# assignment gives, every other branch (data-dependent: the log series of |x - 1| < 2^-6, a
# division's slow path) may go either way. The fewest and the most instructions issued on the
# paths from the loop head to its backward branch bound one iteration's issue.

PRED = re.compile(r"^!?(U?P[0-6T])$")
CALL_TARGET = re.compile(r"^(?:@!?U?P\w+\s+)?CALL\.\w+(?:\.\w+)*\s+0x([0-9a-f]+)$")
CONST_LOAD = re.compile(
    r"^U?LDC(?:\.(64|U8|S8|U16|S16))?\s+(U?R)(\d+),\s*c\[0x0\]\[(0x[0-9a-f]+)\]")
SETP = re.compile(r"^(?:U?ISETP|DSETP|FSETP)\.(NE|EQ)U?(?:\.U32)?\.(AND|OR)(\.EX)?$")


def operands(op):
    parts = op.split(None, 2 if op.startswith("@") else 1)
    rest = parts[-1] if len(parts) > (2 if op.startswith("@") else 1) else ""
    return [t.strip() for t in rest.split(",")] if rest else []


def guard(op):
    """(predicate, negated) of a guard such as @!P1, or None."""
    if not op.startswith("@"):
        return None
    g = op.split()[0][1:]
    return (g.lstrip("!"), g.startswith("!"))


def pred_value(state, token):
    """True/False/None (unknown) of a predicate operand such as !P2, PT, UP0."""
    neg = token.startswith("!")
    name = token.lstrip("!")
    if name in ("PT", "UPT"):
        v = True
    else:
        v = state.get(name)
    return None if v is None else (v != neg)


def flag_bits(bits, mask):
    """(r & mask) != 0 for a register holding saved predicate bits, None if unknown."""
    if not isinstance(bits, dict):
        return None
    sel = [bits.get(k) for k in range(7) if mask >> k & 1]
    if any(v is True for v in sel):
        return True
    return False if all(v is False for v in sel) else None


def step(state, consts, op, params):
    """The predicate state after op; consts: register -> constant-bank offset, or -> {bit:
    value} for a register holding saved predicates (P2R)."""
    m = CONST_LOAD.match(mnemonic(op) + " " + ", ".join(operands(op)))
    ops = operands(op)
    mn = mnemonic(op)
    if m:
        width, kind, reg, off = m.group(1), m.group(2), int(m.group(3)), int(m.group(4), 16)
        consts[f"{kind}{reg}"] = off
        if width == "64":
            consts[f"{kind}{reg + 1}"] = off + 4
        return state
    g = guard(op)
    unguarded = g is None or pred_value(state, ("!" if g[1] else "") + g[0]) is True
    if mn == "P2R" and len(ops) == 4 and ops[1] == "PR" and unguarded:
        # Predicates saved as bits of a register (nvcc keeps flags there under register
        # pressure): bit k is Pk where the mask has it, else the bit of the third operand.
        mask = int(ops[3], 16)
        old = {} if ops[2] == "RZ" else consts.get(ops[2])
        if isinstance(old, dict):
            bits = {k: v for k, v in old.items() if not mask >> k & 1}
            for k in range(7):
                if mask >> k & 1:
                    bits[k] = state.get(f"P{k}")
            consts[ops[0]] = bits
        else:
            consts.pop(ops[0], None)
        return state
    if (mn == "LOP3.LUT" and len(ops) == 6 and re.match(r"^R\d+$", ops[0])
            and re.match(r"^0x[0-9a-f]+$", ops[2]) and ops[3] == "RZ"
            and ops[4] in ("0xc0", "0xfc") and ops[5] == "!PT"):
        # The other idiom for saved predicates: r & ~bit clears a flag's bit, then a guarded
        # r | bit sets it (around calls, such as a device assert's, that clobber predicates).
        imm, is_or = int(ops[2], 16), ops[4] == "0xfc"
        old = consts.get(ops[1])
        bits = dict(old) if isinstance(old, dict) else {}
        guard_v = True if g is None else pred_value(state, ("!" if g[1] else "") + g[0])
        for k in range(7):
            changes = (imm >> k & 1) if is_or else not (imm >> k & 1)
            if not changes or guard_v is False:
                continue
            if guard_v is True:
                bits[k] = is_or
            elif bits.get(k) is not is_or:
                bits.pop(k, None)
        if guard_v is False and ops[0] != ops[1]:
            bits = dict(consts.get(ops[0])) if isinstance(consts.get(ops[0]), dict) else {}
        consts[ops[0]] = bits
        return state
    if mn == "MOV" and len(ops) == 2 and ops[1] in consts:
        # A copy of a parameter (nvcc moves a uniform register to a vector one to compare it).
        if unguarded:
            consts[ops[0]] = consts[ops[1]]
        else:
            consts.pop(ops[0], None)
        return state
    dests = [t for t in ops[:2] if PRED.match(t) and t not in ("PT", "UPT")]
    if mn.startswith(("R2P", "R2UR")) or "PR" in ops[:1]:
        return {}
    if not dests:
        # A register written from anything but the constant bank is no parameter any more.
        if ops and re.match(r"^U?R\d+$", ops[0]) and ops[0] in consts:
            consts.pop(ops[0])
        return state
    new = dict(state)
    for d in dests:
        new.pop(d, None)
    if not unguarded:
        return new
    if mn == "PLOP3.LUT" and ops[1:4] == ["PT", "PT", "PT"] and ops[5:] == ["0x80", "0x0"]:
        new[dests[0]] = pred_value(state, ops[4])  # a copy of a (uniform) predicate
        if new[dests[0]] is None:
            new.pop(dests[0])
        return new
    if mn == "LOP3.LUT" and len(ops) == 7 and ops[1] == "RZ" and ops[4:] == ["RZ", "0xc0", "!PT"]:
        v = flag_bits(consts.get(ops[2]), int(ops[3], 16))  # (r & mask) != 0
        if v is not None:
            new[dests[0]] = v
        return new
    sm = SETP.match(mn)
    if not sm:
        return new
    cmp_, comb, ex = sm.groups()
    a, b = ops[2], ops[3]
    srcs = [t for t in (a, b) if t not in ("RZ", "URZ", "0x0")]
    bank = re.match(r"^c\[0x0\]\[(0x[0-9a-f]+)\]$", srcs[0]) if len(srcs) == 1 else None
    if bank:  # sm_80 compares the constant bank directly
        src = int(bank.group(1), 16)
    elif len(srcs) != 1 or srcs[0] not in consts:
        return new
    else:
        src = consts[srcs[0]]
    field = flag_bits(src, 0x7f) if isinstance(src, dict) else params(src)
    if field is None:
        return new
    v = field if cmp_ == "NE" else not field
    if ex:  # the high word of a 64-bit compare, chained to the low word's predicate
        lo = pred_value(state, ops[5]) if len(ops) > 5 else None
        if lo is None:
            return new
        v = (v or lo) if cmp_ == "NE" else (v and lo)
    c = pred_value(state, ops[4])
    if c is None:
        return new
    v = (v and c) if comb == "AND" else (v or c)
    new[dests[0]] = v
    return new


def path_counts(insns, first, last, params, elem_load, calls=False, weight=None):
    """(fewest, most) instructions and the element loads on those paths from insns[first] to
    the loop's backward branch insns[last], for the parameter values params(offset) gives.
    Paths through a CALL (the out-of-line slow path of a division or of sqrt for operands near
    the exponent range's ends) are left out unless no other path exists."""
    addr_index = {a: i for i, (a, _) in enumerate(insns)}
    state, consts = {}, {}
    for _, op in insns[:first]:
        state = step(state, consts, op, params)
    memo = {}
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20 * (last - first) + 1000))

    def walk(i, state, consts):
        key = (i, tuple(sorted(state.items())),
               tuple(sorted((r, tuple(sorted(v.items())) if isinstance(v, dict) else v)
                            for r, v in consts.items())))
        if key in memo:
            return memo[key]
        n = loads = 0
        consts = dict(consts)
        while True:
            addr, op = insns[i]
            n += mnemonic(op) != "NOP" if weight is None else weight(i)
            loads += elem_load(op)
            if i == last:
                res = ((n, loads), (n, loads))
                break
            mn = mnemonic(op)
            g = guard(op)
            taken = None if g is None else pred_value(state, ("!" if g[1] else "") + g[0])
            # sm_80 leaves a loop over rows by a guarded call to an EXIT: an exit, not a call.
            call = CALL_TARGET.match(op)
            exits = call is not None and mnemonic(
                insns[addr_index.get(int(call.group(1), 16), i)][1]).startswith("EXIT")
            if mn.startswith("CALL") and not calls and not exits:
                res = None
                break
            if mn.startswith("EXIT") or mn == "RET" or mn.startswith("RET.") or exits:
                if g is None or taken is True:
                    res = None
                    break
            m = BRANCH.match(op)
            if m:
                extra = [t for t in operands(op)[:-1] if PRED.match(t)]
                cond = True if g is None else taken
                if mn.startswith("BRA.DIV"):
                    cond = False  # to the diverged warp's fallback: a converged warp goes on
                for t in extra:
                    v = pred_value(state, t)
                    # "BRA !P2, target" under a guard: taken when both hold.
                    if cond is False or v is False:
                        cond = False
                    elif cond is None or v is None:
                        cond = None
                tgt = addr_index.get(int(m.group(1), 16))
                succ = []
                if cond is not False:
                    succ.append(tgt if tgt is not None and first <= tgt <= last else None)
                if cond is not True:
                    succ.append(i + 1)
                # A branch back into the loop from inside (a `continue` to the head) ends the
                # iteration there.
                outs = [((0, 0), (0, 0)) if s <= i else walk(s, state, consts)
                        for s in succ if s is not None]
                outs = [o for o in outs if o is not None]
                if not outs:
                    res = None
                else:
                    lo = min((o[0] for o in outs))
                    hi = max((o[1] for o in outs))
                    res = ((lo[0] + n, lo[1] + loads), (hi[0] + n, hi[1] + loads))
                break
            state = step(state, consts, op, params)
            i += 1
        memo[key] = res
        return res

    res = walk(first, state, consts)
    return res if res is not None or calls else path_counts(insns, first, last, params,
                                                            elem_load, calls=True, weight=weight)


def row_path_counts(insns, lp, elems_per_load):
    """(fewest, most) instructions per element over the paths through one iteration of a
    cross-entropy loop, every branch followed both ways: the fewest is the path that skips the
    cold blocks (the rescale of a new row maximum, the all -inf/NaN prefix), i.e. the issue of
    all but a few iterations of a row. None where no path reaches the backward branch."""
    counts = path_counts(insns, lp["first"], lp["last"], lambda off: None,
                         lambda op: is_load128(op, "LDG") or is_load128(op, "LDS"))
    if counts is None or not counts[0][1] or not counts[1][1]:
        return None
    (lo, lo_loads), (hi, hi_loads) = counts
    return lo / (lo_loads * elems_per_load), hi / (hi_loads * elems_per_load)


# PointwiseArgs field offsets (csrc/cuda/launchers.h) from the start of the kernel parameters.
PW_FIELDS = {"grad_output": 0x20, "grad_output_scalar": 0x28, "skip_if_grad_output_is_one": 0x29,
             "loss": 0x30, "grad_input": 0x38, "grad_target": 0x40, "partials": 0x48,
             "n": 0x50, "param": 0x58, "reduction": 0x60}
# CeParams<T> (csrc/cuda/cross_entropy_impl.cuh, its CrossEntropyArgs a first) for bf16, fp16
# and fp32 (float statistics; double's differ and are not walked): the fields that the
# cached row kernels' branches test.
CE_FIELDS = {"a.input": 0x0, "a.target_index": 0x8, "a.target_prob": 0x10, "a.weight": 0x18,
             "a.grad_output": 0x20, "a.grad_output_scalar": 0x28,
             "a.skip_if_grad_output_is_one": 0x29, "a.loss": 0x30, "a.row_stats": 0x38,
             "a.grad_input": 0x40, "a.grad_target": 0x48, "a.rows_strided": 0x70,
             "a.label_smoothing": 0xa0, "a.reduction": 0xa8, "a.z_loss": 0xb0,
             "a.softcap": 0xb8, "eps": 0xc0, "eps_c": 0xc4, "W": 0xd0, "Wsum": 0xd8,
             "row_loss": 0xe0, "split": 0xe8, "z": 0xf0, "cap": 0xf4, "fwd": 0x120}
# The kernel parameters start at c[0x0][0x210] on sm_90, c[0x0][0x160] on sm_80.
PARAM_BASE = {"sm_90": 0x210, "sm_80": 0x160}
# The paths reported: the forward with the gradient (reduction mean, the benchmarked case) and
# reduction 'none' with the gradient. Fields absent here are unknown (both branches followed).
PW_PATHS = {
    "mean+grad": {"loss": True, "grad_input": True, "grad_target": False, "reduction": True,
                  "partials": True, "grad_output": False, "n": True},
    "none+grad": {"loss": True, "grad_input": True, "grad_target": False, "reduction": False,
                  "partials": False, "grad_output": False, "n": True},
}
# The cached row kernels' path: the benchmarked forward writing the gradient (class index,
# reduction mean, no label smoothing or z-loss; class weights: cached_row_counts).
CE_CACHED_PATH = {
    "a.input": True, "a.target_index": True, "a.target_prob": False, "a.weight": False,
    "a.grad_output": False, "a.grad_output_scalar": False, "a.skip_if_grad_output_is_one": False,
    "a.loss": True, "a.row_stats": True, "a.grad_input": True, "a.grad_target": False,
    "a.rows_strided": False, "a.label_smoothing": False, "a.reduction": True, "a.z_loss": False,
    "a.softcap": False, "eps": False, "eps_c": False, "W": True, "Wsum": False,
    "row_loss": True, "split": False, "z": False, "cap": False, "fwd": True}


def check_field_offsets(nvcc, tmp):
    """PW_FIELDS and CE_FIELDS against the structs' real layout (a host probe built with nvcc,
    no GPU needed): a field moved in launchers.h or cross_entropy_impl.cuh stops the report
    instead of steering its path walks by the wrong parameters."""
    probe = os.path.join(tmp, "field_offsets.cu")
    checks = [("torch_losses::cuda::PointwiseArgs<float>", PW_FIELDS),
              ("torch_losses::cuda::CeParams<float>", CE_FIELDS)]
    lines = [f'  std::printf("%s %zu\\n", "{t} {f}", offsetof({t}, {f}));'
             for t, fields in checks for f in fields]
    with open(probe, "w") as out:
        out.write("#include <cstddef>\n#include <cstdio>\n"
                  '#include "cuda/cross_entropy_impl.cuh"\n'
                  "int main() {\n" + "\n".join(lines) + "\n}\n")
    exe = os.path.join(tmp, "field_offsets")
    subprocess.run([nvcc, "-std=c++17", "-Icsrc", "-o", exe, probe], cwd=ROOT, check=True,
                   capture_output=True)
    real = dict(line.rsplit(" ", 1) for line in subprocess.run(
        [exe], check=True, capture_output=True, text=True).stdout.splitlines())
    wrong = [f"{k}: {int(v)} (the script has {fields[k.split()[-1]]})" for t, fields in checks
             for k, v in real.items() if k.startswith(t + " ")
             and int(v) != fields[k.split()[-1]]]
    if wrong:
        sys.exit("sass_report: kernel parameter offsets changed, update PW_FIELDS/CE_FIELDS:\n  "
                 + "\n  ".join(wrong))


def param_values(arch, fields, values):
    """The lookup path_counts takes: constant-bank offset -> the value `values` gives the field
    there (True: nonzero), or None."""
    base = PARAM_BASE.get(arch)
    at = {base + off: name for name, off in fields.items()} if base is not None else {}

    def lookup(off):
        for start in (off, off - 4):  # the high word of a 64-bit field
            if start in at and at[start] in values:
                return values[at[start]]
        return None
    return lookup


CE_IMPL = "cross_entropy_impl.cuh"


def cached_row_lines():
    """The lines of csrc/cuda/cross_entropy_impl.cuh that tell a cached row's parts apart in the
    line info: RowCache::load's call (the row's loads), RowCache::walk's step over a whole
    vector and over its scalar head and tail elements, and ce_row's walk_row calls by pass (the
    functor declared last before each)."""
    lines = {"load": set(), "vector": set(), "scalar": set(), 1: set(), 2: set()}
    functor = None
    with open(os.path.join(ROOT, "csrc/cuda", CE_IMPL)) as src:
        for n, text in enumerate(src, 1):
            if "cache.load(" in text:
                lines["load"].add(n)
            if "f.template compute<V>(c, xv[j], xv[j])" in text:
                lines["vector"].add(n)
            if "compute<1>(gt, xh, xh)" in text or "compute<1>(end + gt, xt, xt)" in text:
                lines["scalar"].add(n)
            m = re.search(r"\bPass([12])\w*<", text)
            if m:
                functor = int(m.group(1))
            if "walk_row<" in text and "(f, cache" in text and functor:
                lines[functor].add(n)
    if not all(lines.values()):
        sys.exit(f"sass_report: {CE_IMPL} changed: cached_row_lines found {lines}")
    return lines


def cached_row_counts(arch, name, insns, chains, lines):
    """A cached row kernel (ce_row_kernel<..., K > 0>, straight-line code: no hot loop) on the
    path CE_CACHED_PATH sets, each data branch both ways: the most instructions one thread
    issues for one row, in all ("row": reductions, loss and statistics included) and by part
    (the instructions inlined from RowCache's loads and from pass 1's and pass 2's vector
    steps), over the paths through one iteration of the kernel's loop over rows (its widest
    backward branch; a warp's divergent fallback, BRA.DIV, is not taken). "row" leaves out the
    scalar head and tail elements (a row that does not start or end on a 16-byte boundary),
    given on their own. Class weights: where the kernel takes them as vectors (kW 2), else
    none."""
    addr_index = {a: i for i, (a, _) in enumerate(insns)}
    back = [(addr_index[int(m.group(1), 16)], i) for i, (a, op) in enumerate(insns)
            for m in [BRANCH.match(op)] if m and int(m.group(1), 16) < a
            and int(m.group(1), 16) in addr_index]
    if not back:
        return None
    first, last = max(back, key=lambda b: b[1] - b[0])
    weights = template_args(name)[5] == "2"
    params = param_values(arch, CE_FIELDS, {**CE_CACHED_PATH, "a.weight": weights,
                                            "Wsum": weights})

    def has(chain, part):
        return any((CE_IMPL, n) in chain for n in lines[part])

    parts = {"loads": lambda ch: has(ch, "load"),
             "pass 1": lambda ch: has(ch, "vector") and has(ch, 1),
             "pass 2": lambda ch: has(ch, "vector") and has(ch, 2),
             "row": lambda ch: not has(ch, "scalar"),
             "scalar head/tail": lambda ch: has(ch, "scalar")}
    out = {}
    for part, inside in parts.items():
        weight = [int(mnemonic(op) != "NOP" and inside(ch)) for (_, op), ch in zip(insns, chains)]
        counts = path_counts(insns, first, last, params, lambda op: 0,
                             weight=lambda i: weight[i])
        out[part] = None if counts is None else counts[1][0]
    return out


def pointwise_param_nonzero(name):
    """The loss parameter of the benchmarked calls: BCE-with-logits passes whether a pos_weight
    stream is given (kAuxStream), Huber's delta, SmoothL1's beta and the hinge margin default
    to 1; the other losses ignore it."""
    args = template_args(name)
    if args[0].startswith("BCEWithLogitsUsing"):
        return args[2] == "1" and bool(int(args[3]) & 2)
    return True


def pointwise_streams(name):
    """Streams a pointwise_kernel<Loss, T, kVecPath, kStreams> vector iteration reads."""
    args = template_args(name)
    return 2 + bin(int(args[3])).count("1") if args[2] == "1" else None


def cached_vectors(name):
    """K of a row kernel that holds its rows in registers (ce_row_kernel<T, kProb, kVec, kGroup,
    kCap, kW, K>, K > 0), else 0."""
    args = template_args(name) if name.startswith("ce_row_kernel<") else []
    return int(args[6]) if len(args) > 6 else 0


def block_size(name):
    """The block size the launchers use (for the residency estimate)."""
    if name.startswith("ce_row_kernel<"):
        # ce_row_kernel<T, kProb, kVec, kGroup, kCap, kW>: kGroup 32 is a warp per row in 256-thread
        # blocks; the block per row (kGroup 0) runs up to 512 threads (launch_main: 64-512 by C).
        return 256 if template_args(name)[3] == "32" else 512
    if name.startswith("final_sum_kernel"):
        return 1024
    return 256


def resident_threads(regs, threads):
    regs_per_warp = ((max(regs, 1) * 32 + 255) // 256) * 256
    warps = threads // 32
    by_regs = 65536 // (regs_per_warp * warps)
    blocks = min(by_regs, 2048 // threads, 32)
    return blocks * threads


def ptxas_info(stderr):
    info, cur = {}, None
    for line in stderr.splitlines():
        m = PTXAS_FUNC.search(line)
        if m:
            cur = m.group(1)
            info[cur] = {"regs": 0, "spill_st": 0, "spill_ld": 0}
            continue
        if cur is None:
            continue
        m = PTXAS_SPILL.search(line)
        if m:
            info[cur]["spill_st"], info[cur]["spill_ld"] = int(m.group(1)), int(m.group(2))
        m = PTXAS_REGS.search(line)
        if m:
            info[cur]["regs"] = int(m.group(1))
    return info


def report_file(cu, arch, nvcc, cuobjdump, tmp):
    cubin = os.path.join(tmp, os.path.basename(cu) + f".{arch}.cubin")
    proc = subprocess.run([nvcc, *NVCC_FLAGS, f"-arch={arch}", "-cubin", "-o", cubin, cu],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"nvcc failed on {cu}:\n{proc.stderr}")
    info = ptxas_info(proc.stderr)
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(tool_path("nvdisasm")) + os.pathsep + env.get("PATH", "")
    sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, env=env,
                          check=True).stdout
    funcs = parse_sass(sass)
    names = demangle(sorted(set(funcs) | set(info)))
    cached = {m for m in funcs if cached_vectors(short_name(names[m]))}
    lined, lines = {}, None
    if cached:  # line info tells a cached row's parts apart (nvdisasm -gi)
        lined = parse_sass_lines(subprocess.run([tool_path("nvdisasm"), "-c", "-gi", cubin],
                                                capture_output=True, text=True,
                                                check=True).stdout)
        lines = cached_row_lines()
    rows = []
    for mangled in sorted(funcs, key=lambda k: short_name(names[k])):
        name = short_name(names[mangled])
        pi = info.get(mangled, {"regs": -1, "spill_st": -1, "spill_ld": -1})
        # T: the first template argument of ce kernels, the second of pointwise_kernel.
        args = template_args(name)
        targ = args[1] if name.startswith("pointwise_kernel<") else (args[0] if args else "")
        tname = next((t for t in VEC if SHORT_T[t] == targ), None)
        threads = block_size(name)
        pointwise = name.startswith("pointwise_kernel<")
        insns = funcs[mangled]
        resident = resident_threads(pi["regs"], threads)
        if mangled in cached:
            K = cached_vectors(name)
            walked = tname != "double" and mangled in lined
            counts = cached_row_counts(arch, name, *lined[mangled], lines) if walked else None
            rows.append({"file": os.path.basename(cu), "arch": arch, "kernel": name, **pi,
                         "threads": threads, "resident": resident, "loops": [],
                         "cached": {"elems": K * VEC[tname], "counts": counts,
                                    "kb_in_flight": 16 * K * resident / 1024}})
            continue
        loops = hot_loops(insns, const_loads=pointwise) if tname else []
        loop_txt = []
        for lp in loops:
            entry = {**lp, "kb_in_flight": 16 * lp["ldg128"] * resident / 1024}
            if pointwise:
                streams = pointwise_streams(name)
                if streams is None or lp["ldg128"] != 2 * streams:
                    continue  # the last chunk's loops: not the hot pair loop
                entry["paths"] = {}
                for path, values in PW_PATHS.items():
                    values = {**values, "param": pointwise_param_nonzero(name)}
                    counts = path_counts(insns, lp["first"], lp["last"],
                                         param_values(arch, PW_FIELDS, values),
                                         lambda op: is_load128(op, "LDG", True))
                    if counts is None:
                        continue
                    (lo, lo_loads), (hi, hi_loads) = counts
                    entry["paths"][path] = (lo / (VEC[tname] * lo_loads / streams),
                                            hi / (VEC[tname] * hi_loads / streams))
                entry["elems"] = VEC[tname] * lp["ldg128"] / streams
            else:
                per_vector = loads_per_vector(name, lp, insns)
                entry["elems"] = VEC[tname] * (lp["ldg128"] + lp["lds128"]) / per_vector
                entry["hot_path"] = row_path_counts(insns, lp, VEC[tname] / per_vector)
                if (name.startswith("ce_column_vec_kernel<") and lp["stg128"] == 0
                        and lp["ldg128"] == VEC[tname] * per_vector):  # pass 1's whole chunks
                    entry["tails"] = [(n, lo / (n * VEC[tname]), hi / (n * VEC[tname]))
                                      for n, lo, hi in tail_chunks(insns, loops, lp, per_vector)]
            entry["per_elem"] = lp["body"] / entry["elems"]
            loop_txt.append(entry)
        rows.append({"file": os.path.basename(cu), "arch": arch, "kernel": name, **pi,
                     "threads": threads, "resident": resident, "loops": loop_txt})
    return rows


def cached_cell(c):
    """Per element of a thread's K vectors, the heaviest path of the benchmarked forward."""
    if c["counts"] is None:
        return f"cached row, {c['elems']} elements per thread (not walked)"
    per = {k: v / c["elems"] for k, v in c["counts"].items() if v is not None}
    parts = ", ".join(f"{k} {v:.1f}" for k, v in per.items())
    return f"cached row, {c['elems']} elements per thread, heaviest fwd+grad path: {parts}"


def loop_cell(l):
    """body / elems per element, or per path (fewest-most instructions per element)."""
    loads = f"{l['lds128']} shared" if l["lds128"] else f"{l['ldg128']}"
    if "paths" in l:
        paths = ", ".join(f"{p} {lo:.1f}-{hi:.1f}" for p, (lo, hi) in l["paths"].items())
        return (f"{paths} (loop {l['body']}/{l['elems']:g}: all copies, {l['mufu']}, "
                f"{loads})")
    hot = l.get("hot_path")
    paths = f", paths {hot[0]:.1f}-{hot[1]:.1f}" if hot and hot[0] != hot[1] else ""
    tails = "".join(f", {n}: {lo:.1f}-{hi:.1f}" for n, lo, hi in l.get("tails", []))
    tails = f" + tail chunks (classes: paths){tails}" if tails else ""
    return (f"{l['per_elem']:.1f} ({l['body']}/{l['elems']:g}, {l['mufu']}, {loads}{paths})"
            f"{tails}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", action="append", help="sm_90 and sm_80 by default")
    ap.add_argument("--filter", default="", help="only kernels whose name contains this")
    ap.add_argument("--files", nargs="*", help="the .cu files (default csrc/cuda/*.cu)")
    args = ap.parse_args()
    archs = args.arch or ["sm_90", "sm_80"]
    nvcc, cuobjdump = tool_path("nvcc"), tool_path("cuobjdump")
    files = args.files or sorted(
        os.path.join("csrc/cuda", f) for f in os.listdir(os.path.join(ROOT, "csrc/cuda"))
        if f.endswith(".cu"))
    print("| arch | kernel | regs | spill st/ld B | threads/SM (block) | hot loop: instr/elem "
          "(body / elems, MUFU, 16-B loads: global or shared) | KB in flight/SM |")
    print("|---|---|---|---|---|---|---|")
    pairs = [(arch, cu) for arch in archs for cu in files]
    # One nvcc per core (the cross-entropy kernels are four files, one per dtype); the rows
    # print in the order of the pairs.
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(
            max_workers=os.cpu_count() or 1) as pool:
        check_field_offsets(nvcc, tmp)
        reports = pool.map(lambda p: report_file(p[1], p[0], nvcc, cuobjdump, tmp), pairs)
        for (arch, _), rows in zip(pairs, reports):
            for r in rows:
                if args.filter not in r["kernel"]:
                    continue
                loops = "; ".join(loop_cell(l) for l in r["loops"]) or "-"
                kb = "; ".join(f"{l['kb_in_flight']:.0f}" for l in r["loops"]) or "-"
                if "cached" in r:
                    loops, kb = cached_cell(r["cached"]), f"{r['cached']['kb_in_flight']:.0f}"
                print(f"| {arch} | {r['kernel']} | {r['regs']} | {r['spill_st']}/"
                      f"{r['spill_ld']} | {r['resident']} ({r['threads']}) | {loops} | "
                      f"{kb} |")


if __name__ == "__main__":
    main()
