# Developer tasks. Each target is self-contained.
.PHONY: cuda-check

# Compile the CUDA kernels (sm_80, sm_90) against torch==2.14.1 in .cuda-venv,
# in a temporary build directory; nothing runs, no GPU needed. See the script.
cuda-check:
	bash scripts/cuda_check.sh
