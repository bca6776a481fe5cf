"""The benchmark's cases: the losses (ours and torch's reference), their inputs, the default
suites per device and the --loss/--dtype/--sizes filters."""
import math
import re
import sys
import warnings

import torch
import torch.nn.functional as F

import torch_losses.functional as TLF

# kl_div(reduction='mean') warns on every call (torch's and ours): the benchmark means it.
warnings.filterwarnings("ignore", message="reduction: 'mean' divides the total loss")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.float64: "fp64"}
POINTWISE = ["bce_logits", "huber", "mse", "l1", "smooth_l1", "bce", "kl_div", "hinge"]
ALL_LOSSES = ["ce"] + POINTWISE
# Not a case of this table: linear + cross-entropy has its own row (tlbench/linear_ce.py).
LINEAR_CE = "linear_ce"
TITLES = {"ce": "CE", "bce_logits": "BCE-with-logits", "huber": "Huber", "mse": "MSE",
          "l1": "L1", "smooth_l1": "smooth-L1", "bce": "BCE", "kl_div": "KL", "hinge": "hinge"}


def _hinge_torch(x, y, margin=1.0):
    return (margin - y * x).clamp_min(0).mean()


# (ours, torch reference); both called as f(x, y) and return the mean-reduced loss.
LOSS_FNS = {
    "ce": (lambda x, y: TLF.cross_entropy(x, y), lambda x, y: F.cross_entropy(x, y)),
    "bce_logits": (lambda x, y: TLF.binary_cross_entropy_with_logits(x, y),
                   lambda x, y: F.binary_cross_entropy_with_logits(x, y)),
    "huber": (lambda x, y: TLF.huber_loss(x, y), lambda x, y: F.huber_loss(x, y)),
    "mse": (lambda x, y: TLF.mse_loss(x, y), lambda x, y: F.mse_loss(x, y)),
    "l1": (lambda x, y: TLF.l1_loss(x, y), lambda x, y: F.l1_loss(x, y)),
    "smooth_l1": (lambda x, y: TLF.smooth_l1_loss(x, y), lambda x, y: F.smooth_l1_loss(x, y)),
    "bce": (lambda x, y: TLF.binary_cross_entropy(x, y),
            lambda x, y: F.binary_cross_entropy(x, y)),
    "kl_div": (lambda x, y: TLF.kl_div(x, y, reduction="mean"),
               lambda x, y: F.kl_div(x, y, reduction="mean")),
    "hinge": (lambda x, y: TLF.hinge_loss(x, y), _hinge_torch),
}


def make_inputs(loss, shape, dtype, device, seed=0):
    """Returns (x, y): x a fresh leaf that requires grad, y the target in the loss's domain."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    kw = dict(device=device, generator=g)
    if loss == "ce":
        n, c, *spatial = shape  # (N, C) rows, or (N, C, d1, ...) as segmentation logits
        x = torch.randn(n, c, *spatial, dtype=dtype, **kw)
        y = torch.randint(0, c, (n, *spatial), dtype=torch.long, **kw)
    else:
        (n,) = shape
        if loss == "kl_div":
            # log-probabilities over rows of 1024 (one row when n is not a multiple)
            cols = 1024 if n % 1024 == 0 else n
            shp = (n // cols, cols)
            x = torch.log_softmax(torch.randn(shp, dtype=torch.float32, **kw), -1).to(dtype)
            y = torch.softmax(torch.randn(shp, dtype=torch.float32, **kw), -1).to(dtype)
        else:
            x = torch.randn(n, dtype=dtype, **kw)
            if loss in ("bce_logits", "bce"):
                y = torch.rand(n, dtype=dtype, **kw)
            elif loss == "hinge":
                y = (torch.randint(0, 2, (n,), **kw) * 2 - 1).to(dtype)
            else:
                y = torch.randn(n, dtype=dtype, **kw)
            if loss == "bce":
                x = torch.sigmoid(x.float()).clamp_(0.01, 0.99).to(dtype)  # in (0, 1)
    return x.requires_grad_(True), y


def min_bytes(loss, shape, dtype):
    es = torch.empty((), dtype=dtype).element_size()
    if loss == "ce":
        numel = math.prod(shape)
        return 2 * numel * es + numel // shape[1] * 8  # read logits, write grad; targets
    return 3 * shape[0] * es  # read x, y; write grad

def default_suite(device, quick):
    f32, bf16 = torch.float32, torch.bfloat16
    if device == "cuda":
        # The last two: segmentation logits (N, C, H, W), classes of (VOC's 21, Cityscapes'
        # 19) at a stride of H W (the vector column kernel).
        ce_shapes = [((4096, 32000), bf16), ((8192, 128256), bf16), ((8192, 32000), f32),
                     ((1024, 256000), bf16), ((65536, 1000), f32),
                     ((16, 21, 512, 512), bf16), ((8, 19, 512, 1024), f32)]
        pw = [(loss, (1 << 27,), dt) for loss in POINTWISE for dt in (f32, bf16)]
        if quick:
            ce_shapes = [((256, 4096), bf16), ((256, 4096), f32)]
            pw = [(loss, (1 << 20,), dt) for loss, _, dt in pw]
    else:
        # segmentation logits (N, C, H, W): the blocks across H W (IndexColumns); and rows of
        # few classes: the same blocks on transposed tiles of rows (row_block)
        ce_shapes = [((4096, 32000), f32), ((4096, 32000), bf16),
                     ((8, 21, 128, 128), f32), ((8, 21, 128, 128), bf16),
                     ((524288, 10), f32), ((524288, 10), bf16)]
        pw = []
        for loss in POINTWISE:
            pw.append((loss, (1 << 24,), f32))
            if loss in ("bce_logits", "huber"):
                pw.append((loss, (1 << 24,), bf16))
        if quick:
            ce_shapes = [((256, 2048), f32), ((256, 2048), bf16)]
            pw = [(loss, (1 << 16,), dt) for loss, _, dt in pw]
    return [("ce", s, dt) for s, dt in ce_shapes] + pw


def parse_size(tok):
    tok = tok.strip().lower()
    if "x" in tok:
        return tuple(parse_size(t)[0] for t in tok.split("x"))
    m = re.fullmatch(r"(\d+)\s*(?:\^|\*\*)\s*(\d+)", tok)
    return (int(m.group(1)) ** int(m.group(2)),) if m else (int(tok),)


def build_cases(args, device):
    cases = default_suite(device, args.quick)
    losses = ALL_LOSSES if args.loss in (None, "all") else [s.strip() for s in args.loss.split(",")]
    for loss in losses:
        if loss not in ALL_LOSSES + [LINEAR_CE]:
            sys.exit(f"unknown loss {loss!r}; choose from {','.join(ALL_LOSSES + [LINEAR_CE])}")
    dtypes = None
    if args.dtype:
        dtypes = []
        for name in args.dtype.split(","):
            if name.strip() not in DTYPES:
                sys.exit(f"unknown dtype {name!r}; choose from {','.join(DTYPES)}")
            dtypes.append(DTYPES[name.strip()])
    if args.sizes:
        sizes = [parse_size(t) for t in args.sizes.split(",") if t.strip()]
        ce_sizes = [s for s in sizes if len(s) == 2 or len(s) >= 4]
        pw_sizes = [s for s in sizes if len(s) == 1]
        new = []
        for loss in ALL_LOSSES:
            override = ce_sizes if loss == "ce" else pw_sizes
            old = [c for c in cases if c[0] == loss]
            if not override:
                new += old
                continue
            dts = list(dict.fromkeys(dt for _, _, dt in old))
            new += [(loss, s, dt) for s in override for dt in dts]
        cases = new
    out = []
    for loss in losses:
        mine = [c for c in cases if c[0] == loss]
        if dtypes is not None:
            kept = [c for c in mine if c[2] in dtypes]
            if not kept and args.loss not in (None, "all"):
                # an explicitly requested loss in a dtype the suite lacks: run it at suite sizes
                shapes = list(dict.fromkeys(s for _, s, _ in mine))
                kept = [(loss, s, dt) for s in shapes for dt in dtypes]
            mine = kept
        out += mine
    return out


def linear_ce_request(args):
    """(wanted, size or None, dtype name or None) of the linear + cross-entropy row: wanted
    by default and with --loss naming linear_ce; --sizes NxHxV and a --dtype naming one dtype
    apply to it."""
    wanted = args.loss in (None, "all") or LINEAR_CE in [s.strip() for s in args.loss.split(",")]
    size = None
    if args.sizes:
        sizes = [parse_size(t) for t in args.sizes.split(",") if t.strip()]
        size = next((s for s in sizes if len(s) == 3), None)
    names = [n.strip() for n in args.dtype.split(",")] if args.dtype else []
    return wanted, size, names[0] if len(names) == 1 else None
