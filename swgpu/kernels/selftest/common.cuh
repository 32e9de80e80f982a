// The self-test's kernel header (the real kernels/common.cuh is not needed here).
#pragma once
typedef unsigned long long u64;
#define FULL_MASK 0xffffffffu
