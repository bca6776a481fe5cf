"""Timing: CUDA events with an L2 flush, or perf_counter on the CPU; implementations take turns
rep by rep. Also the copy bandwidth and CUDA peak memory of one step."""
import statistics
import time

import torch

class Timer:
    def __init__(self, device):
        self.device = device
        self.flush = None
        if device == "cuda":
            self.flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")

    def run(self, step, setup, reps, warmup):
        """Median ms of step() over reps after warmup; setup() runs before each, untimed."""
        (ms, times), = self.run_interleaved({"step": (step, setup)}, reps, warmup).values()
        return ms, times

    def run_interleaved(self, steps, reps, warmup):
        """{name: (step, setup)} -> {name: (median ms, times)}. The implementations take turns,
        rep by rep, so that drifts of the machine (a fresh process faulting in memory, clock
        changes) fall on all of them alike instead of on whichever runs first."""
        for _ in range(warmup):
            for step, setup in steps.values():
                setup()
                step()
        times = {name: [] for name in steps}
        if self.device == "cuda":
            torch.cuda.synchronize()
            events = {name: [] for name in steps}
            for _ in range(reps):
                for name, (step, setup) in steps.items():
                    setup()
                    self.flush.zero_()  # evict L2
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    step()
                    end.record()
                    events[name].append((start, end))
            torch.cuda.synchronize()
            for name, pairs in events.items():
                times[name] = [s.elapsed_time(e) for s, e in pairs]
        else:
            for _ in range(reps):
                for name, (step, setup) in steps.items():
                    setup()
                    t0 = time.perf_counter()
                    step()
                    times[name].append((time.perf_counter() - t0) * 1e3)
        return {name: (statistics.median(t), t) for name, t in times.items()}


def copy_bandwidth(timer, device, nbytes, reps, warmup):
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms, _ = timer.run(lambda: dst.copy_(src), lambda: None, reps, warmup)
    gbs = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    del src, dst
    return gbs, ms


def write_bandwidths(timer, device, nbytes, reps, warmup):
    """GB/s of filling a fresh tensor (allocated in the step: first-touch page faults on the
    CPU, as every fresh gradient pays) and of filling one allocated before."""
    numel = nbytes // 4
    ms_fresh, _ = timer.run(lambda: torch.empty(numel, device=device).fill_(1.0), lambda: None,
                            reps, warmup)
    kept = torch.empty(numel, device=device)
    ms_kept, _ = timer.run(lambda: kept.fill_(1.0), lambda: None, reps, warmup)
    del kept
    return nbytes / (ms_fresh * 1e-3) / 1e9, nbytes / (ms_kept * 1e-3) / 1e9


def peak_extra_mb(step, setup):
    """CUDA only: peak memory allocated during one step beyond what existed before it."""
    setup()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
