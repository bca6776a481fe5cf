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
    per vector: cross-entropy class-index kernels 1 (the logits), probability-target kernels
    2 (logits and targets); the pointwise kernel walks one
    vector per iteration (#pragma unroll 1), so all its loads (x, y and the optional weight,
    pos_weight, grad_output streams) count as one vector;
  - instructions per element = body instructions / elements per iteration.
Bytes in flight per SM = 16 x (16-byte loads in the body, all issued before the first use in
these loops) x resident threads per SM, where residency is what the registers allow for the
block size the launcher uses (65536 registers per SM, allocated per warp in units of 256, at most
2048 threads and 32 blocks per SM). The launcher's grid can cap residency lower (noted in
benchmarks/NOTES.md).

Usage: python scripts/sass_report.py [--arch sm_90 --arch sm_80] [--filter NAME] [--markdown]
"""
import argparse
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
    s = re.sub(r"torch_losses::cuda::(\(anonymous namespace\)::)?", "", s)
    s = re.sub(r"\(.*\)$", "", s)  # parameter list
    for k, v in SHORT_T.items():
        s = re.sub(r"\b%s\b" % re.escape(k), v, s)
    s = re.sub(r"(\w+)<(\w+)>::type<float>|LossOf<PointwiseKind::\w+>::type<\w+>", "", s)
    s = s.replace("(bool)1", "1").replace("(bool)0", "0").replace("true", "1").replace("false", "0")
    return s


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


def mnemonic(op):
    """The opcode with its modifiers, without a guard predicate (@P0, @!UP1)."""
    parts = op.split()
    return parts[1] if parts[0].startswith("@") else parts[0]


def is_load128(op, space):
    """A 16-byte load from global (LDG) or shared (LDS) memory."""
    m = mnemonic(op)
    return m.startswith(space) and m.endswith(".128")


def hot_loops(insns):
    """Innermost loops holding a 16-byte load: (body, ldg128, lds128, stg128, mufu)."""
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
        streams = any(is_load128(o, "LDG") for _, o in body) or (
            any(is_load128(o, "LDS") for _, o in body) and
            any(mnemonic(o).startswith("STG") and mnemonic(o).endswith(".128") for _, o in body))
        if streams:
            loops.append((addr_index[target], i, body))
    inner = [l for l in loops
             if not any(o is not l and o[0] >= l[0] and o[1] <= l[1] for o in loops)]
    result = []
    for start, end, body in inner:
        ops = [mnemonic(o) for _, o in body]
        result.append({
            "body": len([o for o in ops if o != "NOP"]),
            "ldg128": sum(1 for o in ops if o.startswith("LDG") and o.endswith(".128")),
            "lds128": sum(1 for o in ops if o.startswith("LDS") and o.endswith(".128")),
            "stg128": sum(1 for o in ops if o.startswith("STG") and o.endswith(".128")),
            "mufu": sum(1 for o in ops if o.startswith("MUFU")),
        })
    return result


def loads_per_vector(name, loop):
    if name.startswith("ce_row_kernel"):
        return 2 if re.match(r"ce_row_kernel<\w+, 1", name) else 1
    if name.startswith("ce_column_vec_kernel"):  # probability targets: logits and targets
        return 2 if re.match(r"ce_column_vec_kernel<\w+, 1", name) else 1
    if name.startswith("pointwise_kernel"):
        return loop["ldg128"]
    return 1


def block_size(name):
    """The block size the launchers use (for the residency estimate)."""
    if name.startswith("ce_row_kernel"):
        return 256 if name.rstrip(">").endswith("32") else 512
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
    rows = []
    for mangled in sorted(funcs, key=lambda k: short_name(names[k])):
        name = short_name(names[mangled])
        pi = info.get(mangled, {"regs": -1, "spill_st": -1, "spill_ld": -1})
        # T: the first template argument of ce kernels, the second of pointwise_kernel.
        m = re.match(r"\w+<(?:[\w:]+<\w+>, )?(bf16|f16|f32|f64)\b", name)
        tname = next((t for t in VEC if m and SHORT_T[t] == m.group(1)), None)
        threads = block_size(name)
        loops = hot_loops(funcs[mangled]) if tname else []
        resident = resident_threads(pi["regs"], threads)
        loop_txt = []
        for lp in loops:
            elems = VEC[tname] * (lp["ldg128"] + lp["lds128"]) / loads_per_vector(name, lp)
            loop_txt.append({
                "per_elem": lp["body"] / elems, "elems": elems, **lp,
                "kb_in_flight": 16 * lp["ldg128"] * resident / 1024,
            })
        rows.append({"file": os.path.basename(cu), "arch": arch, "kernel": name, **pi,
                     "threads": threads, "resident": resident, "loops": loop_txt})
    return rows


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
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for cu in files:
                for r in report_file(cu, arch, nvcc, cuobjdump, tmp):
                    if args.filter not in r["kernel"]:
                        continue
                    loops = "; ".join(
                        f"{l['per_elem']:.1f} ({l['body']}/{l['elems']:g}, {l['mufu']}, "
                        f"{str(l['lds128']) + ' shared' if l['lds128'] else l['ldg128']})"
                        for l in r["loops"]) or "-"
                    kb = "; ".join(f"{l['kb_in_flight']:.0f}" for l in r["loops"]) or "-"
                    print(f"| {arch} | {r['kernel']} | {r['regs']} | {r['spill_st']}/"
                          f"{r['spill_ld']} | {r['resident']} ({r['threads']}) | {loops} | "
                          f"{kb} |")


if __name__ == "__main__":
    main()
