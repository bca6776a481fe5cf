// Emulator shim (tests/cuda_emu): see tl_cuda_emu.h.
#pragma once
#include "tl_cuda_emu.h"
