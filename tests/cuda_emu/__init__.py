"""The CUDA-on-CPU emulator, driven from Python: build (build.py), load with ctypes, and call
the launchers of csrc/cuda with buffers that end at a guard page.

    emu = Emulator(build.build())
    with emu.session() as s:            # frees the session's buffers at the end
        out = s.cross_entropy(x, t, label_smoothing=0.1, want_grad=True)

Every kernel error (device assert, barrier misuse, misaligned vector access, access to a guard
page) raises EmulatorError with the emulator's report.
"""
import contextlib
import ctypes
import os

import torch

from . import build  # noqa: F401  (re-exported for the tests)

DTYPE_CODE = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
POINTWISE_KIND = {name: i for i, name in enumerate(
    ["bce_with_logits", "huber", "smooth_l1", "mse", "l1", "bce", "hinge", "kl_div",
     "kl_div_log_target"])}
REDUCTION = {"none": 0, "mean": 1, "sum": 2}
NUM_DEVICES = 8


class EmulatorError(RuntimeError):
    pass


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class Emulator:
    def __init__(self, lib_path):
        lib = ctypes.CDLL(lib_path)
        vp, i64, i32, dbl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
        lib.tl_emu_alloc.restype = vp
        lib.tl_emu_alloc.argtypes = [ctypes.c_size_t, i32]
        lib.tl_emu_free.argtypes = [vp]
        lib.tl_emu_padding_intact.argtypes = [vp]
        lib.tl_emu_take_error.restype = ctypes.c_char_p
        lib.tl_emu_set_device.argtypes = [i32]
        lib.tl_emu_device_sms.argtypes = [i32]
        lib.tl_emu_device_l2.argtypes = [i32]
        lib.tl_emu_device_cc.argtypes = [i32]
        lib.tl_emu_device_smem_optin.argtypes = [i32]
        lib.tl_emu_launch_log.restype = ctypes.c_char_p
        lib.tl_emu_selftest_cluster.argtypes = [i32, i32, i32, i32, i32, i32, vp]
        lib.tl_emu_ce_scratch_size.restype = i64
        lib.tl_emu_ce_scratch_size.argtypes = [i64, i64, ctypes.c_int]
        lib.tl_emu_pointwise_num_partials.restype = i64
        lib.tl_emu_pointwise_num_partials.argtypes = [i32, i64]
        lib.tl_emu_cross_entropy.argtypes = [i32, vp, vp, vp, vp, vp, i32, vp, vp, vp, vp, vp,
                                             i64, i64, i64, i64, dbl, i32, dbl, dbl]
        lib.tl_emu_pointwise.argtypes = [i32, i32, vp, vp, vp, vp, vp, i32, vp, vp, vp, vp, i64,
                                         dbl, i32]
        lib.tl_emu_set_skip_if_grad_output_is_one.argtypes = [i32]
        lib.tl_emu_set_fast_math_direction.argtypes = [i32]
        lib.tl_emu_set_schedule.argtypes = [i32]
        lib.tl_emu_set_ce_rows_strided.argtypes = [i32, i64, i64, i64, i64]
        lib.tl_emu_ce_rows_strided.argtypes = [i64] * 6
        lib.tl_emu_ce_column_vec_fits.argtypes = [i64] * 2
        lib.tl_emu_take_launches.restype = ctypes.c_char_p
        lib.tl_emu_scale_grad.argtypes = [i32, vp, vp, i32, i64, i64, i64, i64]
        self.lib = lib
        # TL_EMU_SCHEDULE=high_first runs every launch that way (a race hunt over the suite).
        self.default_schedule = int(os.environ.get("TL_EMU_SCHEDULE", "") == "high_first")
        lib.tl_emu_set_schedule(self.default_schedule)

    @contextlib.contextmanager
    def session(self, device=0):
        s = Session(self, device)
        try:
            yield s
        finally:
            s.close()

    def set_fast_math_direction(self, direction):
        """The fast intrinsics' error, at its documented worst: +1 up (default), -1 down, 0 none."""
        self.lib.tl_emu_set_fast_math_direction(direction)

    @contextlib.contextmanager
    def high_first_schedule(self):
        """Within the block, the highest-numbered runnable thread runs first (a lower one only when
        every higher one waits), instead of ascending order: a race-free kernel gives the same
        bits; a shared-memory race that ascending order hides shows."""
        self.lib.tl_emu_set_schedule(1)
        try:
            yield
        finally:
            self.lib.tl_emu_set_schedule(self.default_schedule)

    def device_sms(self, device):
        return self.lib.tl_emu_device_sms(device)

    def device_l2(self, device):
        return self.lib.tl_emu_device_l2(device)

    def device_cc(self, device):
        """Compute capability as 10 major + minor (>= 90: thread-block clusters)."""
        return self.lib.tl_emu_device_cc(device)

    def device_smem_optin(self, device):
        return self.lib.tl_emu_device_smem_optin(device)

    def launch_log(self):
        """The kernels launched since the last call, one (name, grid, block, cluster, smem) each."""
        out = []
        for line in self.lib.tl_emu_launch_log().decode().splitlines():
            name, rest = line.rsplit(" grid=", 1)
            grid, block, cluster, smem = (int(f.split("=")[-1]) for f in ("grid=" + rest).split())
            out.append((name, grid, block, cluster, smem))
        return out


class Buffer:
    """A tensor in memory that ends at a guard page. ptr is what the kernels get (for 0 bytes:
    the guard page itself, so any access faults)."""

    def __init__(self, ptr, tensor):
        self.ptr = ptr
        self.t = tensor


class Session:
    """Buffers and launches of one test; `layout` of each buffer:
    "tight"   its last byte touches the guard page (the start falls where it falls),
    int k     its start is k bytes past a 16-byte boundary (k = 0: aligned, as torch allocates),
              the end within 16 bytes of the guard page, the gap checked for stray writes."""

    def __init__(self, emu, device):
        self.emu = emu
        self.lib = emu.lib
        self.buffers = []
        if self.lib.tl_emu_set_device(device) != 0:
            raise ValueError(f"no emulated device {device}")

    def close(self):
        for b in self.buffers:
            self.lib.tl_emu_free(b.ptr)
        self.buffers = []

    # ---- buffers ------------------------------------------------------------------------------
    def empty(self, shape, dtype, layout=0):
        shape = tuple(shape)
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        offset = -1 if layout == "tight" else int(layout)
        elem = torch.empty((), dtype=dtype).element_size()
        if offset > 0 and offset % elem:
            raise ValueError(f"offset {offset} is not a multiple of the {elem}-byte element "
                             "(no tensor has such a pointer)")
        ptr = self.lib.tl_emu_alloc(nbytes, offset)
        if not ptr:
            raise MemoryError("tl_emu_alloc failed")
        if nbytes == 0:
            t = torch.empty(shape, dtype=dtype)
        else:
            raw = (ctypes.c_ubyte * nbytes).from_address(ptr)
            t = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).view(shape)
        b = Buffer(ptr, t)
        self.buffers.append(b)
        return b

    def poisoned(self, shape, dtype, layout=0):
        """An output buffer filled with NaN (or 0x7f.. bytes for integers): a value the kernel
        did not write shows."""
        b = self.empty(shape, dtype, layout)
        if b.t.numel():
            b.t.fill_(float("nan") if b.t.is_floating_point() else -7)
        return b

    def copy(self, t, layout=0):
        b = self.empty(t.shape, t.dtype, layout)
        if t.numel():
            b.t.copy_(t)
        return b

    def _storage_copy(self, t, layout):
        """A copy of t's whole storage (what t's view does not cover: NaN) starting `layout`
        bytes past a 16-byte boundary, and the byte offset of t's first element in it."""
        elem = t.element_size()
        span = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1
        flat = torch.full((span,), float("nan"), dtype=t.dtype)
        flat.as_strided(t.shape, t.stride(), t.storage_offset()).copy_(t)
        return self.copy(flat, layout), t.storage_offset() * elem

    def check_padding(self):
        for b in self.buffers:
            if self.lib.tl_emu_padding_intact(b.ptr) != 1:
                raise EmulatorError(f"a write past the end of the buffer at {b.ptr:#x} "
                                    "(its padding changed)")

    def _check(self, rc):
        err = self.lib.tl_emu_take_error().decode()
        if rc != 0 or err:
            raise EmulatorError(err or "launch failed")
        self.check_padding()

    @staticmethod
    def _ptr(b):
        return None if b is None else b.ptr

    # ---- launchers ----------------------------------------------------------------------------
    def cross_entropy(self, x, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                      reduction="mean", want_grad=False, want_target_grad=False, inplace=False,
                      grad_output=None, row_stats=None, layout=0, target_layout=None,
                      out_layout=None, z_loss=0.0, softcap=None, keep_strides=False,
                      weight_layout=0):
        """One launch_cross_entropy call, set up as csrc/ops.h does. x: (N, C, D) or (N, C).
        Forward: grad_output None; returns loss, row_stats (K, N, D) (K = 3 for probability
        targets, else 2), lse (row_stats[0] + row_stats[1], as torch_losses' lse_of) and the
        gradients asked for (grad_output 1). Backward: grad_output (0-dim, or (N, D) for
        'none') and the forward's row_stats.
        z_loss, softcap: the LLM-training extras (softcap None: off).
        keep_strides: x (and a probability target) as csrc/ops.h passes them on CUDA: where
        ce_rows_strided says so, in place in a copy of their whole storage (the elements outside
        the view NaN, so that a read outside it shows), starting `layout` bytes past a 16-byte
        boundary, with their strides; the gradients then come back in (n, d, c) order.
        r["rows_strided"] says which; r["kernels"] lists the kernels launched. weight_layout: the
        class weights' buffer's offset past a 16-byte boundary (as `layout`)."""
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(2)
            if target.dim() == 2 and target.is_floating_point():
                target = target.unsqueeze(2)
            elif not target.is_floating_point():
                target = target.unsqueeze(1)
            if grad_output is not None and grad_output.dim() == 1:
                grad_output = grad_output.unsqueeze(1)
        N, C, D = x.shape
        dt = x.dtype
        prob = target.is_floating_point()
        target_layout = layout if target_layout is None else target_layout
        out_layout = layout if out_layout is None else out_layout
        by_rows = bool(keep_strides) and self.lib.tl_emu_ce_rows_strided(
            N, C, D, x.stride(0), x.stride(1), x.stride(2)) == 1
        if by_rows:
            xb, x_off = self._storage_copy(x, layout)
            if prob and target.stride(1) != 1:  # ops.h: copied in (n, d, c) order
                target = target.transpose(1, 2).contiguous().transpose(1, 2)
            if prob:
                tb, t_off = self._storage_copy(target, target_layout)
            else:
                tb, t_off = self.copy(target.contiguous(), target_layout), 0
            x_ptr, t_ptr = xb.ptr + x_off, tb.ptr + t_off
            self.lib.tl_emu_set_ce_rows_strided(1, x.stride(0), x.stride(2),
                                                target.stride(0) if prob else 0,
                                                target.stride(2) if prob else 0)
        else:
            xb = self.copy(x.contiguous(), layout)
            tb = self.copy(target.contiguous(), target_layout)
            x_ptr, t_ptr = xb.ptr, tb.ptr
            self.lib.tl_emu_set_ce_rows_strided(0, 0, 0, 0, 0)
        self.lib.tl_emu_take_launches()
        wb = None if weight is None else self.copy(weight.to(acc_dtype(dt)), weight_layout)
        fwd = grad_output is None
        gob = None
        if not fwd:
            gob = self.copy(grad_output.to(dt).contiguous())
        rows = N * D
        loss = None
        stats_shape = (3 if prob else 2, N, D)  # csrc/ops.h: row_stats
        if fwd:
            loss = self.poisoned((N, D) if reduction == "none" else (), dt, out_layout)
            statsb = self.poisoned(stats_shape, acc_dtype(dt), out_layout)
        else:
            statsb = self.copy(row_stats.reshape(stats_shape).contiguous())
        grad_shape = (N, D, C) if by_rows else (N, C, D)
        gi = None
        if inplace:
            gi = xb
        elif want_grad:
            gi = self.poisoned(grad_shape, dt, out_layout)
        gt = self.poisoned(grad_shape, dt, out_layout) if want_target_grad else None
        ls = label_smoothing if label_smoothing > 0 else 0.0
        per_class_weights = int(wb is not None and (prob or ls != 0.0))
        scratch = self.poisoned((self.lib.tl_emu_ce_scratch_size(rows, C, per_class_weights),),
                                acc_dtype(dt), "tight")
        rc = self.lib.tl_emu_cross_entropy(
            DTYPE_CODE[dt], x_ptr, None if prob else t_ptr, t_ptr if prob else None,
            self._ptr(wb), self._ptr(gob), int(gob is not None and grad_output.dim() == 0),
            self._ptr(loss), statsb.ptr, self._ptr(gi), self._ptr(gt), scratch.ptr, N, C, D,
            ignore_index, ls, REDUCTION[reduction], float(z_loss),
            0.0 if softcap is None else float(softcap))
        self.lib.tl_emu_set_ce_rows_strided(0, 0, 0, 0, 0)
        kernels = self.lib.tl_emu_take_launches().decode().splitlines()
        self._check(rc)

        def out(b, row_shaped=False):
            if b is None:
                return None
            t = b.t.clone()
            if by_rows and not row_shaped and t.dim() == 3:
                t = t.transpose(1, 2)
            if squeeze and t.dim() > 0:
                t = t.squeeze(1 if row_shaped else 2)
            return t
        r = {"grad_input": out(gi), "grad_target": out(gt), "rows_strided": by_rows,
             "kernels": kernels}
        if fwd:
            r["loss"] = out(loss, row_shaped=True)
            stats = statsb.t.clone()
            r["row_stats"] = stats.squeeze(2) if squeeze else stats
            r["lse"] = r["row_stats"][0] + r["row_stats"][1]
        return r

    def pointwise(self, kind, x, y, weight=None, aux=None, param=0.0, reduction="mean",
                  want_grad_input=False, want_grad_target=False, grad_output=None,
                  layouts=None):
        """One launch_pointwise call. layouts: per array (x, y, weight, aux, grad_output, loss,
        grad_input, grad_target), default 0 (aligned)."""
        lay = dict.fromkeys(["x", "y", "weight", "aux", "grad_output", "loss", "grad_input",
                             "grad_target"], 0)
        lay.update(layouts or {})
        if kind == "bce_with_logits":
            param = float(aux is not None)  # as csrc/ops.h: the functor's "pos_weight given"
        if kind == "smooth_l1" and (param == 0 or (x.dtype != torch.float64 and
                                               float(torch.tensor(param).float()) == 0)):
            kind = "l1"  # as csrc/ops.h: a beta 0 in the accumulation type runs the L1 kernels
        dt = x.dtype
        n = x.numel()
        xb = self.copy(x.contiguous().view(-1), lay["x"])
        yb = self.copy(y.contiguous().view(-1), lay["y"])
        wb = None if weight is None else self.copy(weight.contiguous().view(-1), lay["weight"])
        ab = None if aux is None else self.copy(aux.contiguous().view(-1), lay["aux"])
        gob = None
        loss = partials = None
        if grad_output is None:
            loss = self.poisoned((n,) if reduction == "none" else (), dt, lay["loss"])
            if reduction != "none":
                partials = self.poisoned(
                    (max(1, self.lib.tl_emu_pointwise_num_partials(DTYPE_CODE[dt], n)),),
                    acc_dtype(dt), "tight")
        else:
            go = grad_output.to(dt)
            gob = self.copy(go.contiguous().view(-1) if go.dim() else go, lay["grad_output"])
        gi = self.poisoned((n,), dt, lay["grad_input"]) if want_grad_input else None
        gt = self.poisoned((n,), dt, lay["grad_target"]) if want_grad_target else None
        rc = self.lib.tl_emu_pointwise(
            POINTWISE_KIND[kind], DTYPE_CODE[dt], xb.ptr, yb.ptr, self._ptr(wb), self._ptr(ab),
            self._ptr(gob), int(gob is not None and grad_output.dim() == 0), self._ptr(loss),
            self._ptr(gi), self._ptr(gt), self._ptr(partials), n, float(param),
            REDUCTION[reduction])
        self._check(rc)
        shape = x.shape
        r = {"grad_input": None if gi is None else gi.t.clone().view(shape),
             "grad_target": None if gt is None else gt.t.clone().view(shape)}
        if loss is not None:
            r["loss"] = loss.t.clone().view(shape if reduction == "none" else ())
        return r

    def scale_grad(self, grad, grad_output, layout=0):
        """launch_scale_grad as csrc/ops_cuda.cpp calls it; returns the scaled copy of grad."""
        gb = self.copy(grad.contiguous(), layout)
        gob = self.copy(grad_output.contiguous())
        numel = grad.numel()
        mode, N, C, D = 2, 0, 0, 0
        if grad_output.dim() == 0:
            mode = 0
        elif grad_output.shape == grad.shape:
            mode = 1
        else:
            N, C = grad.shape[0], grad.shape[1]
            D = 0 if N * C == 0 else numel // (N * C)
        if numel:
            rc = self.lib.tl_emu_scale_grad(DTYPE_CODE[grad.dtype], gb.ptr, gob.ptr, mode, numel,
                                            N, C, D)
            self._check(rc)
        return gb.t.clone()
