"""The kernel benchmarks' shared input recipe and accuracy rule (bench_kernels on the CPU, gpu_sections on a GPU)."""

UNIFORM_MIX = 1e-3  # uniform mass mixed into every attention-like row, so that no entry is below the floor
TIE_RTOL = 1e-4  # rows whose float64 best and second-best distances are this close count as near ties
