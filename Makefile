# moe_ep -- build, demo and tests.  make | make demo | make test | make clean
# CC, CFLAGS, LDFLAGS belong to you; the flags the project needs are in MOE_EP_CFLAGS.

CC           ?= cc
CLANG        ?= clang
CXX          ?= c++
OPT          ?= -O2
OPENMP_FLAGS ?= -fopenmp
MOE_EP_CFLAGS = -std=c99 -pedantic -Wall -Wextra -Werror
BUILD        ?= build
TEST_TIMEOUT ?= 900

ifeq ($(origin CC),default)
CC = gcc
endif

HEADERS     = moe_ep.h transports/moe_ep_pthreads.h
CHECK_FLAGS = $(shell pkg-config --cflags --libs check 2>/dev/null)
TEST_SRCS   = $(sort $(wildcard tests/check_*.c)) tests/moe_ep_impl.c tests/support/test_support.c
SUPPORT     = tests/support/test_support.c tests/support/test_support.h

.PHONY: all demo layouts-demo test deps check-headers check-core check-demos clean
all: $(BUILD)/seed_demo $(BUILD)/layouts_demo $(BUILD)/check_moe_ep_gcc $(BUILD)/check_moe_ep_clang

$(BUILD):
	@mkdir -p $(BUILD)

# >>deps: what `make test` needs on a fresh Debian machine; installed when root.
DEB_PACKAGES = check pkg-config libopenmpi-dev openmpi-bin mpich libmpich-dev
deps:
	@missing=""; \
	for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing (install them, or run make test as root)"; exit 1; fi; \
	fi

# >>demo
$(BUILD)/seed_demo: examples/seed_demo.c examples/example_util.h $(HEADERS) | $(BUILD)
	$(CC) $(MOE_EP_CFLAGS) $(OPT) $(OPENMP_FLAGS) $(CFLAGS) $< -o $@ -pthread -lm $(LDFLAGS)

demo: $(BUILD)/seed_demo
	./$(BUILD)/seed_demo

$(BUILD)/layouts_demo: examples/layouts_demo.c examples/example_util.h $(HEADERS) | $(BUILD)
	$(CC) $(MOE_EP_CFLAGS) $(OPT) $(OPENMP_FLAGS) $(CFLAGS) $< -o $@ -pthread -lm $(LDFLAGS)

layouts-demo: $(BUILD)/layouts_demo
	./$(BUILD)/layouts_demo

# >>tests: one binary per compiler, every suite in it.
$(BUILD)/check_moe_ep_gcc: $(TEST_SRCS) tests/check_moe_ep.h $(SUPPORT) $(HEADERS) | $(BUILD)
	gcc $(MOE_EP_CFLAGS) $(OPT) $(OPENMP_FLAGS) $(CFLAGS) $(TEST_SRCS) -o $@ $(CHECK_FLAGS) -pthread -lm $(LDFLAGS)

$(BUILD)/check_moe_ep_clang: $(TEST_SRCS) tests/check_moe_ep.h $(SUPPORT) $(HEADERS) | $(BUILD)
	$(CLANG) $(MOE_EP_CFLAGS) $(OPT) $(OPENMP_FLAGS) $(CFLAGS) $(TEST_SRCS) -o $@ $(CHECK_FLAGS) -pthread -lm $(LDFLAGS)

# The header alone: C99 with gcc and clang, with and without OpenMP, static, and C++ declarations.
check-headers: | $(BUILD)
	@printf '#define MOE_EP_IMPLEMENTATION\n#include "../transports/moe_ep_pthreads.h"\n' > $(BUILD)/hdr_impl.c
	@printf '#define MOE_EP_STATIC\n#define MOE_EP_IMPLEMENTATION\n#include "../moe_ep.h"\nint main(void) { return moe_ep_result_string(MOE_EP_OK)[0] == 0; }\n' > $(BUILD)/hdr_static.c
	@printf '#include "../moe_ep.h"\n#include "../transports/moe_ep_pthreads.h"\nint f(void) { return (int)MOE_EP_RESULT_COUNT; }\n' > $(BUILD)/hdr_decl.cpp
	gcc $(MOE_EP_CFLAGS) -c $(BUILD)/hdr_impl.c -o $(BUILD)/hdr_impl_gcc.o
	gcc $(MOE_EP_CFLAGS) $(OPENMP_FLAGS) -c $(BUILD)/hdr_impl.c -o $(BUILD)/hdr_impl_gcc_omp.o
	gcc $(MOE_EP_CFLAGS) -O3 $(OPENMP_FLAGS) -c $(BUILD)/hdr_impl.c -o $(BUILD)/hdr_impl_gcc_o3.o
	$(CLANG) $(MOE_EP_CFLAGS) -O3 $(OPENMP_FLAGS) -c $(BUILD)/hdr_impl.c -o $(BUILD)/hdr_impl_clang_o3.o
	$(CLANG) $(MOE_EP_CFLAGS) -c $(BUILD)/hdr_impl.c -o $(BUILD)/hdr_impl_clang.o
	$(CLANG) $(MOE_EP_CFLAGS) $(OPENMP_FLAGS) -c $(BUILD)/hdr_impl.c -o $(BUILD)/hdr_impl_clang_omp.o
	gcc $(MOE_EP_CFLAGS) -Wno-unused-function $(BUILD)/hdr_static.c -o $(BUILD)/hdr_static -lm
	$(CXX) -Wall -Wextra -pedantic -Werror -c $(BUILD)/hdr_decl.cpp -o $(BUILD)/hdr_decl.o
	@echo "headers: ok"

# OpenMP suites run without fork (libgomp deadlocks in a forked child); `timeout` bounds a hang.
check-core: deps
	$(MAKE) --no-print-directory $(BUILD)/check_moe_ep_gcc $(BUILD)/check_moe_ep_clang CHECK_FLAGS="$$(pkg-config --cflags --libs check)"
	CK_FORK=no timeout $(TEST_TIMEOUT) ./$(BUILD)/check_moe_ep_gcc
	CK_FORK=no timeout $(TEST_TIMEOUT) ./$(BUILD)/check_moe_ep_clang

# The demos check themselves (exit status): seed layer vs one rank, and the three layouts at 64 ranks.
check-demos: $(BUILD)/seed_demo $(BUILD)/layouts_demo
	./$(BUILD)/seed_demo --ranks 8 --experts 64 --top-k 2 --tokens 64 --d-model 64 --d-ff 128 > $(BUILD)/seed_demo.log
	@tail -1 $(BUILD)/seed_demo.log
	./$(BUILD)/seed_demo --ranks 3 --experts 10 --top-k 3 --tokens 13 --d-model 24 --d-ff 40 --placement round-robin > $(BUILD)/seed_demo_odd.log
	@tail -1 $(BUILD)/seed_demo_odd.log
	./$(BUILD)/layouts_demo > $(BUILD)/layouts_demo.log
	@tail -1 $(BUILD)/layouts_demo.log

# >>kernels: the expert kernel on each path this machine runs (portable; native SIMD with gcc
# and clang; the portable C under native flags; AVX-512 compiled on any x86-64, run where the
# CPU has it) against float64 and against the portable path; MOE_EP_CBLAS compiled if a
# cblas.h is installed. Suites start OpenMP threads: CK_FORK=no.
KERNEL_SRCS  = tests/kernels/check_kernels.c tests/kernels/kernels_portable.c tests/support/test_support.c
KERNEL_BUILD = $(MOE_EP_CFLAGS) $(OPT) $(OPENMP_FLAGS) $(CFLAGS) $(KERNEL_SRCS) $$(pkg-config --cflags --libs check) \
               -pthread -lm $(LDFLAGS)
.PHONY: check-kernels bench bench-cpu bench-deps
check-kernels: deps | $(BUILD)
	gcc $(KERNEL_BUILD) -o $(BUILD)/check_kernels_gcc
	gcc -march=native $(KERNEL_BUILD) -o $(BUILD)/check_kernels_gcc_native
	$(CLANG) -march=native $(KERNEL_BUILD) -o $(BUILD)/check_kernels_clang_native
	$(CLANG) -march=native -DMOE_EP_NO_SIMD $(KERNEL_BUILD) -o $(BUILD)/check_kernels_clang_portable
	for b in gcc gcc_native clang_native clang_portable; do \
	  CK_FORK=no timeout $(TEST_TIMEOUT) ./$(BUILD)/check_kernels_$$b || exit 1; done
	@if [ "$$(uname -m)" = x86_64 ]; then \
	  echo "gcc -mavx512f -mavx2 -mfma ... -o $(BUILD)/check_kernels_avx512"; \
	  gcc -mavx512f -mavx2 -mfma $(KERNEL_BUILD) -o $(BUILD)/check_kernels_avx512 || exit 1; \
	  if grep -qw avx512f /proc/cpuinfo; then CK_FORK=no timeout $(TEST_TIMEOUT) ./$(BUILD)/check_kernels_avx512 || exit 1; \
	  else echo "check-kernels: no AVX-512 on this CPU: that path was compiled, not run"; fi; fi
	@if printf '#include <cblas.h>\n' | gcc -E -x c - >/dev/null 2>&1; then \
	  printf '#define MOE_EP_CBLAS\n#define MOE_EP_IMPLEMENTATION\n#include "../moe_ep.h"\n' > $(BUILD)/hdr_cblas.c && \
	  gcc $(MOE_EP_CFLAGS) $(OPENMP_FLAGS) -c $(BUILD)/hdr_cblas.c -o $(BUILD)/hdr_cblas_gcc.o && \
	  $(CLANG) $(MOE_EP_CFLAGS) -c $(BUILD)/hdr_cblas.c -o $(BUILD)/hdr_cblas_clang.o && \
	  echo "MOE_EP_CBLAS: compiles with gcc and clang"; \
	else echo "check-kernels: no cblas.h: MOE_EP_CBLAS not compiled"; fi

# >>bench: the CPU kernels against OpenBLAS (its OpenMP build, linked into the bench only),
# memcpy and PyTorch, one table per goal (bench/RESULTS.md). Not part of `make test`.
# BENCH_ARGS: sections (gemm cblas comm layer decode) and --reps N --rounds N.
MULTIARCH   := $(shell gcc -print-multiarch 2>/dev/null)
OPENBLAS_OMP = -I/usr/include/$(MULTIARCH)/openblas-openmp -L/usr/lib/$(MULTIARCH)/openblas-openmp \
               -Wl,-rpath,/usr/lib/$(MULTIARCH)/openblas-openmp -lopenblas
BENCH_ARGS  ?=
bench: bench-cpu
bench-deps:
	@missing=""; for p in libopenblas-openmp-dev python3-torch; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing (install them, or run make bench as root)"; exit 1; fi; fi

$(BUILD)/cpu_bench: bench/cpu_bench.c bench/cpu_bench_cblas.c $(SUPPORT) $(HEADERS) | $(BUILD)
	gcc -std=c99 -pedantic -Wall -Wextra -O3 -march=native $(OPENMP_FLAGS) bench/cpu_bench.c bench/cpu_bench_cblas.c \
	  tests/support/test_support.c -o $@ $(OPENBLAS_OMP) -pthread -lm

bench-cpu: bench-deps
	$(MAKE) --no-print-directory $(BUILD)/cpu_bench
	./$(BUILD)/cpu_bench $(BENCH_ARGS)

# >>nccl: the NCCL transport and the GPU layer (nvcc, NCCL, cuBLAS). check-nccl builds them when
# nvcc is there and runs the GPU tests, which say "no GPU, skipped" without a GPU. test-gpu
# requires GPUs; bench-gpu runs the PyTorch anchors and bench_nccl in one job (bench/RESULTS.md).
NVCC         ?= /usr/local/cuda/bin/nvcc
CUDA_HOME    ?= /usr/local/cuda
CUDA_ARCH    ?= -arch=sm_90
MPICC_NCCL   ?= mpicc
MPIRUN_NCCL  ?= mpirun
NCCL_CFLAGS   = -isystem $(CUDA_HOME)/include
NCCL_LIBS     = -L$(CUDA_HOME)/lib64 -lnccl -lcublas -lcudart -lstdc++ -pthread -lm
NCCL_HEADERS  = $(HEADERS) transports/moe_ep_nccl.h $(SUPPORT) tests/gpu/gpu_check.h \
                tests/gpu/gpu_layout_suite.h
CUDA_HEADERS  = $(NCCL_HEADERS) moe_ep_cuda.h moe_ep_cuda_kernels.cuh
NCCL_ONLY_LIBS = -L$(CUDA_HOME)/lib64 -lnccl -lcudart -pthread -lm
ANCHOR_DIR   ?= ../shared/anchors/gpu
NGPU         ?= $(shell n=$$(nvidia-smi -L 2>/dev/null | wc -l); [ "$$n" -gt 0 ] && echo $$n || echo 2)
GPU_CHECK_LIBS = $(shell pkg-config --cflags --libs check 2>/dev/null)

.PHONY: check-nccl test-gpu bench-gpu
test-gpu bench-gpu: export NCCL_NVLS_ENABLE = 0
test-gpu check-nccl: export CK_FORK = no

$(BUILD)/cuda_kernels.o: tests/gpu/cuda_kernels.cu moe_ep_cuda_kernels.cuh | $(BUILD)
	$(NVCC) $(CUDA_ARCH) -O2 -c $< -o $@

# The NCCL transport alone: no CUDA file, no cuBLAS.
$(BUILD)/check_nccl: tests/gpu/check_nccl.c $(NCCL_HEADERS) | $(BUILD)
	$(CC) $(MOE_EP_CFLAGS) $(OPT) $(NCCL_CFLAGS) $(CFLAGS) $< tests/support/test_support.c -o $@ $(NCCL_ONLY_LIBS) \
	  $(GPU_CHECK_LIBS) $(LDFLAGS)

# The GPU layer over NCCL; the _layout one over EP x DP and EP x TP x DP groups.
$(BUILD)/check_cuda: tests/gpu/check_cuda.c $(BUILD)/cuda_kernels.o $(CUDA_HEADERS) | $(BUILD)
	$(CC) $(MOE_EP_CFLAGS) $(OPT) $(NCCL_CFLAGS) $(CFLAGS) $< tests/support/test_support.c $(BUILD)/cuda_kernels.o -o $@ \
	  $(NCCL_LIBS) $(GPU_CHECK_LIBS) $(LDFLAGS)

$(BUILD)/check_cuda_layout: tests/gpu/check_cuda_layout.c $(BUILD)/cuda_kernels.o $(CUDA_HEADERS) | $(BUILD)
	$(CC) $(MOE_EP_CFLAGS) $(OPT) $(NCCL_CFLAGS) $(CFLAGS) $< tests/support/test_support.c $(BUILD)/cuda_kernels.o -o $@ \
	  $(NCCL_LIBS) $(GPU_CHECK_LIBS) $(LDFLAGS)

$(BUILD)/bench_fill.o: bench/bench_fill.cu moe_ep_cuda_kernels.cuh | $(BUILD)
	$(NVCC) $(CUDA_ARCH) -O2 -c $< -o $@

$(BUILD)/bench_nccl: bench/bench_nccl.c $(BUILD)/bench_fill.o $(CUDA_HEADERS) | $(BUILD)
	$(CC) $(MOE_EP_CFLAGS) $(OPT) $(NCCL_CFLAGS) $(CFLAGS) $< $(BUILD)/bench_fill.o -o $@ $(NCCL_LIBS) $(LDFLAGS)

$(BUILD)/nccl_mpi_demo: examples/nccl_mpi_demo.c $(BUILD)/cuda_kernels.o $(CUDA_HEADERS) | $(BUILD)
	$(MPICC_NCCL) $(MOE_EP_CFLAGS) $(OPT) $(NCCL_CFLAGS) $(CFLAGS) $< $(BUILD)/cuda_kernels.o -o $@ $(NCCL_LIBS) $(LDFLAGS)

# Also: the programs and the transport header under clang, the transport header alone in strict
# C99, and moe_ep_cuda.h as one nvcc (C++) file with the kernels inside. The programs exit 77
# (skipped) without a GPU.
GPU_RUN = rc=0; CK_FORK=no ./$(BUILD)/$(1) || rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 77 ] || exit $$rc
check-nccl: | $(BUILD)
	@if [ ! -x "$(NVCC)" ]; then echo "check-nccl: $(NVCC) not found, NCCL/CUDA build skipped"; exit 0; fi; \
	printf '#define MOE_EP_IMPLEMENTATION\n#include "../moe_ep_cuda.h"\n' > $(BUILD)/hdr_cuda.cu; \
	printf '#define MOE_EP_IMPLEMENTATION\n#include "../transports/moe_ep_nccl.h"\n' > $(BUILD)/hdr_nccl.c; \
	set -ex; \
	$(MAKE) --no-print-directory $(BUILD)/check_nccl $(BUILD)/check_cuda $(BUILD)/check_cuda_layout $(BUILD)/bench_nccl; \
	for f in tests/gpu/check_nccl.c tests/gpu/check_cuda.c tests/gpu/check_cuda_layout.c bench/bench_nccl.c; do \
	  $(CLANG) $(MOE_EP_CFLAGS) $(NCCL_CFLAGS) -c $$f -o $(BUILD)/clang_$$(basename $$f .c).o; done; \
	$(CC) $(MOE_EP_CFLAGS) $(NCCL_CFLAGS) -c $(BUILD)/hdr_nccl.c -o $(BUILD)/hdr_nccl_gcc.o; \
	$(CLANG) $(MOE_EP_CFLAGS) $(NCCL_CFLAGS) -c $(BUILD)/hdr_nccl.c -o $(BUILD)/hdr_nccl_clang.o; \
	$(NVCC) $(CUDA_ARCH) -O2 -Xcompiler -Wall,-Wextra,-Werror -c $(BUILD)/hdr_cuda.cu -o $(BUILD)/hdr_cuda.o; \
	if command -v $(MPICC_NCCL) >/dev/null 2>&1; then $(MAKE) --no-print-directory $(BUILD)/nccl_mpi_demo; fi; \
	$(call GPU_RUN,check_nccl); \
	$(call GPU_RUN,check_cuda); \
	$(call GPU_RUN,check_cuda_layout)

# On a machine with GPUs: every GPU test (world sizes 1, 2, 4, 8 up to the GPUs there are; the layout
# tests EP x TP x DP over NCCL groups), and the MPI demo (one process per GPU) in fp32, bf16 and bf16 on
# the direct path (CUDA IPC between the processes).
test-gpu: $(BUILD)/check_nccl $(BUILD)/check_cuda $(BUILD)/check_cuda_layout
	timeout $(TEST_TIMEOUT) ./$(BUILD)/check_nccl --require-gpu
	timeout $(TEST_TIMEOUT) ./$(BUILD)/check_cuda --require-gpu
	timeout $(TEST_TIMEOUT) ./$(BUILD)/check_cuda_layout --require-gpu
	@if command -v $(MPICC_NCCL) >/dev/null 2>&1 && command -v $(MPIRUN_NCCL) >/dev/null 2>&1; then set -ex; \
	  $(MAKE) --no-print-directory $(BUILD)/nccl_mpi_demo; \
	  $(MPIRUN_NCCL) -np $(NGPU) ./$(BUILD)/nccl_mpi_demo; \
	  $(MPIRUN_NCCL) -np $(NGPU) ./$(BUILD)/nccl_mpi_demo --bf16; \
	  $(MPIRUN_NCCL) -np $(NGPU) ./$(BUILD)/nccl_mpi_demo --bf16 --direct; \
	else echo "test-gpu: no $(MPICC_NCCL)/$(MPIRUN_NCCL), MPI demo skipped"; fi

# The seed scenario at full size over MPI, one process per GPU (64 experts, top-2, bf16, 4096 tokens
# per rank, d_model 2048, d_ff 1408): checked against the CPU layer, traffic matrix, time per layer.
.PHONY: seed-gpu
seed-gpu: export NCCL_NVLS_ENABLE = 0
seed-gpu: $(BUILD)/nccl_mpi_demo
	$(MPIRUN_NCCL) -np $(NGPU) ./$(BUILD)/nccl_mpi_demo --seed

# The anchors (ANCHOR_DIR: shared/anchors/gpu) and ours on the same GPUs; the PyTorch layer before and after ours.
bench-gpu: $(BUILD)/bench_nccl
	@mkdir -p bench/out
	python3 -m torch.distributed.run --nproc_per_node=$(NGPU) $(ANCHOR_DIR)/nccl_a2a.py 2>&1 | tee bench/out/nccl_a2a.log
	python3 -m torch.distributed.run --nproc_per_node=$(NGPU) $(ANCHOR_DIR)/torch_ep_moe.py 2>&1 | tee bench/out/torch_ep_moe.log
	./$(BUILD)/bench_nccl --gpus $(NGPU) --torch-log bench/out/torch_ep_moe.log | tee bench/out/bench_nccl.log
	python3 -m torch.distributed.run --nproc_per_node=$(NGPU) $(ANCHOR_DIR)/torch_ep_moe.py 2>&1 | tee bench/out/torch_ep_moe_after.log

# >>mpi: the MPI transport, built with each MPI's wrapper (gcc underneath) and run by its own
# launcher (a launcher of the other MPI would start N singletons; the binaries assert the size).
MPI_HEADERS   = $(HEADERS) transports/moe_ep_mpi.h
MPICC_OMPI   ?= mpicc.openmpi
MPICC_MPICH  ?= mpicc.mpich
MPIRUN_OMPI   = OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 300 mpirun.openmpi \
                --oversubscribe --mca pml ob1 --mca btl self,vader --timeout 240 -x OMP_WAIT_POLICY=PASSIVE
MPIEXEC_MPICH = MPIEXEC_TIMEOUT=240 OMP_WAIT_POLICY=PASSIVE timeout 300 mpiexec.mpich
MPI_SIZES_OMPI  ?= 1 2 3 4
MPI_SIZES_MPICH ?= 1 2 4

.PHONY: check-mpi check-mpi-headers check-mpi-large mpi-demo bench-mpi

$(BUILD)/check_mpi_openmpi: tests/mpi/check_mpi.c tests/support/test_mpi.h $(SUPPORT) $(MPI_HEADERS) | $(BUILD)
	$(MPICC_OMPI) $(MOE_EP_CFLAGS) $(OPT) $(OPENMP_FLAGS) $(CFLAGS) $< tests/support/test_support.c -o $@ $(CHECK_FLAGS) -pthread -lm $(LDFLAGS)

$(BUILD)/check_mpi_mpich: tests/mpi/check_mpi.c tests/support/test_mpi.h $(SUPPORT) $(MPI_HEADERS) | $(BUILD)
	$(MPICC_MPICH) $(MOE_EP_CFLAGS) $(OPT) $(OPENMP_FLAGS) $(CFLAGS) $< tests/support/test_support.c -o $@ $(CHECK_FLAGS) -pthread -lm $(LDFLAGS)

$(BUILD)/mpi_demo: examples/mpi_demo.c examples/example_util.h $(MPI_HEADERS) | $(BUILD)
	$(MPICC_OMPI) $(MOE_EP_CFLAGS) $(OPT) $(OPENMP_FLAGS) $(CFLAGS) $< -o $@ -lm $(LDFLAGS)

$(BUILD)/mpi_bench: bench/mpi_bench.c $(SUPPORT) $(MPI_HEADERS) | $(BUILD)
	$(MPICC_OMPI) $(MOE_EP_CFLAGS) $(OPT) $(OPENMP_FLAGS) $(CFLAGS) $< tests/support/test_support.c -o $@ -pthread -lm $(LDFLAGS)

# The MPI header: C99 with both MPIs under gcc and clang, OpenMP, and C++ declarations.
check-mpi-headers: deps | $(BUILD)
	@printf '#define MOE_EP_IMPLEMENTATION\n#include "../transports/moe_ep_mpi.h"\n' > $(BUILD)/hdr_mpi.c
	@printf '#include "../transports/moe_ep_mpi.h"\nint f(void) { return (int)MOE_EP_RESULT_COUNT; }\n' > $(BUILD)/hdr_mpi_decl.cpp
	$(MPICC_OMPI) $(MOE_EP_CFLAGS) -c $(BUILD)/hdr_mpi.c -o $(BUILD)/hdr_mpi_ompi.o
	$(MPICC_MPICH) $(MOE_EP_CFLAGS) $(OPENMP_FLAGS) -c $(BUILD)/hdr_mpi.c -o $(BUILD)/hdr_mpi_mpich.o
	$(CLANG) $(MOE_EP_CFLAGS) $$(pkg-config --cflags ompi-c) -c $(BUILD)/hdr_mpi.c -o $(BUILD)/hdr_mpi_clang_ompi.o
	$(CLANG) $(MOE_EP_CFLAGS) $(OPENMP_FLAGS) $$(pkg-config --cflags mpich) -c $(BUILD)/hdr_mpi.c -o $(BUILD)/hdr_mpi_clang_mpich.o
	$(CXX) -Wall -Wextra -pedantic -Werror -DOMPI_SKIP_MPICXX -DMPICH_SKIP_MPICXX $$(pkg-config --cflags ompi-c) \
	  -c $(BUILD)/hdr_mpi_decl.cpp -o $(BUILD)/hdr_mpi_decl.o
	@echo "mpi header: ok"

# Open MPI at 1-4 processes (oversubscribed on small machines), MPICH at 1, 2, 4, then the demo at 8.
check-mpi: deps check-mpi-headers
	$(MAKE) --no-print-directory $(BUILD)/check_mpi_openmpi $(BUILD)/check_mpi_mpich $(BUILD)/mpi_demo \
	  CHECK_FLAGS="$$(pkg-config --cflags --libs check)"
	for n in $(MPI_SIZES_OMPI); do $(MPIRUN_OMPI) -x CK_FORK=no -n $$n ./$(BUILD)/check_mpi_openmpi $$n || exit 1; done
	for n in $(MPI_SIZES_MPICH); do CK_FORK=no $(MPIEXEC_MPICH) -n $$n ./$(BUILD)/check_mpi_mpich $$n || exit 1; done
	$(MPIRUN_OMPI) -n 8 ./$(BUILD)/mpi_demo --tokens 64 --d-model 64 --d-ff 128 > $(BUILD)/mpi_demo.log
	@tail -1 $(BUILD)/mpi_demo.log

# Not part of `make test` (about 2.3 GiB per process, seconds): more than 2^31 bytes for real.
check-mpi-large: | $(BUILD)
	$(MPICC_OMPI) $(MOE_EP_CFLAGS) $(OPT) $(CFLAGS) tests/mpi/large_mpi.c tests/support/test_support.c \
	  -o $(BUILD)/large_mpi_openmpi -pthread -lm $(LDFLAGS)
	$(MPICC_MPICH) $(MOE_EP_CFLAGS) $(OPT) $(CFLAGS) tests/mpi/large_mpi.c tests/support/test_support.c \
	  -o $(BUILD)/large_mpi_mpich -pthread -lm $(LDFLAGS)
	$(MPIRUN_OMPI) -n 2 ./$(BUILD)/large_mpi_openmpi 2
	$(MPIEXEC_MPICH) -n 2 ./$(BUILD)/large_mpi_mpich 2

mpi-demo: $(BUILD)/mpi_demo
	$(MPIRUN_OMPI) -n 8 ./$(BUILD)/mpi_demo

# Not part of `make test`: dispatch + combine against raw MPI_Alltoallv, 2 processes (bench/RESULTS.md).
bench-mpi: $(BUILD)/mpi_bench
	$(MPIRUN_OMPI) -n 2 ./$(BUILD)/mpi_bench

TEST_TARGETS = check-headers check-core check-demos check-mpi
TEST_TARGETS += check-nccl
TEST_TARGETS += check-kernels
test: deps
	$(MAKE) --no-print-directory $(TEST_TARGETS)

clean:
	rm -rf $(BUILD)
