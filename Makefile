# moe_ep -- checks, demos, benchmarks and install of a header-only C99 library.
#
#   make test        deps, then check: what CI runs      make deps   apt-get what the checks need (root)
#   make check       TEST_TARGETS with what is installed, then a summary of passed and skipped targets
#   make check-headers | check-core | check-demos | check-bits | check-kernels | check-mpi | check-nccl | check-install
#   make test-cross  the full suites for aarch64, armhf, riscv64 and s390x under qemu-user (not in test)
#   make check-asan | check-ubsan | check-tsan | check-fuzz (in check)   make check-mpi-large (not in check)
#   make demo | layouts-demo | mpi-demo | model-layer  make bench | bench-cpu | bench-mpi | bench-load | bench-faults | bench-nonfinite | bench-bits | bench-edge | bench-barrier
#   make fuzz (fuzz-api and fuzz-safetensors) | fuzz-api | fuzz-safetensors (libFuzzer, FUZZ_TIME s each)
#   make test-gpu | seed-gpu | bench-gpu (GPUs)        make install | uninstall PREFIX=... [DESTDIR=...]
#
# A test program that cannot run here (no GPU) exits 77: its target prints "SKIP: target (reason)"
# and is listed as skipped, not passed. CC, CFLAGS, LDFLAGS are yours; the project's flags are in
# MOE_EP_CFLAGS. CC builds what one compiler builds; what must hold under several compilers is
# built by each in CC_LIST.

.PHONY: all test check deps bench-deps clean check-headers check-core check-demos check-bits check-kernels check-mpi \
        check-mpi-headers check-mpi-large check-nccl check-install check-asan check-ubsan check-tsan demo \
        layouts-demo mpi-demo bench bench-cpu bench-mpi bench-faults bench-bits test-cross cross-deps test-gpu seed-gpu \
        bench-edge bench-gpu install uninstall check-fuzz fuzz fuzz-safetensors fuzz-api model-layer bench-load bench-nonfinite bench-barrier

ifeq ($(origin CC),default)
CC = gcc
endif
CLANG          ?= clang
CC_LIST        ?= gcc $(CLANG)
OPT            ?= -O2
OPENMP_FLAGS   ?= -fopenmp
MOE_EP_CFLAGS   = -std=c99 -pedantic -Wall -Wextra -Werror
BUILD          ?= build
HDR             = $(BUILD)/headers
TEST_TIMEOUT   ?= 900

# Every program depends on every header: coarse, and never stale.
PUBLIC_HEADERS  = $(wildcard moe_ep*.h moe_ep*.cuh transports/*.h transports/*.cuh)
HEADERS         = $(PUBLIC_HEADERS) $(wildcard tests/*.h tests/*/*.h examples/*.h bench/*.h)
TEST_SUPPORT    = tests/support/test_support.c
CHECK_LIBS      = $(shell pkg-config --cflags --libs check 2>/dev/null || echo -lcheck)
BUILD_FLAGS     = $(MOE_EP_CFLAGS) $(OPT) $(OPENMP_FLAGS) $(CFLAGS)
CHECK_LINK      = $(CHECK_LIBS) -pthread -lm $(LDFLAGS)
SOURCES         = $(filter %.c %.o,$^)
VERSION        := $(shell awk '/^\#define MOE_EP_VERSION_(MAJOR|MINOR|PATCH) /{v = v s $$3; s = "."} END{print v}' moe_ep.h)

# A stem compiler_variant (gcc_omp) names a compiler and the flags VARIANT_omp.
compiler = $(word 1,$(subst _, ,$(1)))
variant  = $(VARIANT_$(word 2,$(subst _, ,$(1))))
VARIANT_omp      = $(OPENMP_FLAGS)
VARIANT_o3       = -O3 $(OPENMP_FLAGS)
VARIANT_native   = -march=native
VARIANT_portable = -march=native -DMOE_EP_NO_SIMD
VARIANT_avx512   = -mavx512f -mavx2 -mfma

# $(call skip,NAME,REASON): NAME is a target (then listed as skipped) or target/part (a part of a
# target that passed). $(call run_test,TARGET,PROGRAM ARGS): without fork (OpenMP, MPI and NCCL
# threads do not survive it), bounded by `timeout`; exit status 77 is a skip of TARGET.
SKIP_LOG = $(BUILD)/skipped.log
skip     = echo "SKIP: $(1) ($(2))"; echo "$(1) ($(2))" >> $(SKIP_LOG)
run_test = echo "CK_FORK=no $(2)"; rc=0; CK_FORK=no timeout $(TEST_TIMEOUT) $(2) || rc=$$?; if [ $$rc = 77 ]; then \
  $(call skip,$(1),$(notdir $(word 1,$(2))) exited 77: cannot run here); elif [ $$rc != 0 ]; then exit $$rc; fi

all: $(BUILD)/seed_demo $(BUILD)/layouts_demo $(BUILD)/cpp_demo $(CC_LIST:%=$(BUILD)/check_moe_ep_%)
$(BUILD) $(HDR):
	@mkdir -p $@

# >>test: deps first, in a make of its own, so that check's probes (pkg-config, nvcc) see them.
TEST_TARGETS ?= check-headers check-core check-demos check-bits check-mpi check-nccl check-kernels check-asan \
                check-ubsan check-tsan check-fuzz check-install
test: deps
	@$(MAKE) --no-print-directory check
check: | $(BUILD)
	@: > $(SKIP_LOG); passed=""; for target in $(TEST_TARGETS); do \
	  $(MAKE) --no-print-directory $$target || { echo "== passed:$$passed"; echo "== FAILED: $$target"; exit 1; }; \
	  grep -q "^$$target " $(SKIP_LOG) || passed="$$passed $$target"; \
	done; echo "== passed:$$passed"; sed 's/^/== skipped: /' $(SKIP_LOG)

# >>deps: installed when root, named otherwise.
DEB_PACKAGES   = check pkg-config clang libomp-dev libopenblas-dev libopenmpi-dev openmpi-bin mpich libmpich-dev g++ tcc \
                 $(if $(filter x86_64,$(shell uname -m)),gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf gcc-i686-linux-gnu qemu-user)
BENCH_PACKAGES = libopenblas-openmp-dev python3-torch
apt_install = missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
  if [ -z "$$missing" ]; then :; elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
    echo "installing:$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
  else echo "missing Debian packages:$$missing (install them, or run make as root)"; exit 1; fi
deps: ; @$(call apt_install,$(DEB_PACKAGES))
bench-deps: ; @$(call apt_install,$(BENCH_PACKAGES))

# >>headers: the core with the pthreads transport under each compiler, C99 alone, with OpenMP and
# -O3, and with -Wcast-qual; MOE_EP_STATIC linked with -Wall -Wextra -Werror (no unused-function
# errors) by each compiler and tcc; the declarations as C++, and the implementation as C++ with the
# AVX-512 kernel (g++ 12's false positive in avx512fintrin.h); the headers vendored into one flat
# folder, included core first or through MOE_EP_CORE_HEADER.
VARIANT_castqual = -Wcast-qual
CXX_WARN         = -Wall -Wextra -pedantic -Werror
FLAT             = $(HDR)/flat
check-headers: $(foreach cc,$(CC_LIST),$(HDR)/pthreads_$(cc)_c99.o $(HDR)/pthreads_$(cc)_omp.o $(HDR)/pthreads_$(cc)_o3.o \
                 $(HDR)/pthreads_$(cc)_castqual.o $(HDR)/static_$(cc)) $(HDR)/static_tcc $(HDR)/decl.o $(HDR)/impl_cxx.o \
               $(HDR)/flat_first $(HDR)/flat_macro
$(HDR)/pthreads_%.o: tests/headers/impl_pthreads.c $(HEADERS) | $(HDR)
	$(call compiler,$*) $(MOE_EP_CFLAGS) $(call variant,$*) -c $< -o $@
$(HDR)/static_%: tests/headers/static.c $(HEADERS) | $(HDR)
	$(if $(filter tcc,$*),$(TCC) -Wall -Werror,$* $(MOE_EP_CFLAGS)) $< -o $@ -pthread -lm
$(HDR)/decl.o: tests/headers/decl.cpp $(HEADERS) | $(HDR)
	$(CXX) $(CXX_WARN) -c $< -o $@
$(HDR)/impl_cxx.o: tests/headers/impl_pthreads.c $(HEADERS) | $(HDR)
	$(CXX) -x c++ $(CXX_WARN) -O2 $(if $(filter x86_64,$(shell uname -m)),-mavx512f -mavx2 -mfma,-march=native) -c $< -o $@
$(FLAT): $(PUBLIC_HEADERS)
	rm -rf $@ && mkdir -p $@ && cp $(PUBLIC_HEADERS) $@/
$(HDR)/flat_first: tests/headers/flat.c $(FLAT) | $(HDR)
	$(CC) $(MOE_EP_CFLAGS) -I$(FLAT) $< -o $@ -pthread -lm && ./$@
$(HDR)/flat_macro: tests/headers/flat.c $(FLAT) | $(HDR)
	$(CC) $(MOE_EP_CFLAGS) -I$(FLAT) -DFLAT_TRANSPORT_ONLY '-DMOE_EP_CORE_HEADER="moe_ep.h"' $< -o $@ -pthread -lm && ./$@

# >>core: every suite in one Check binary per compiler.
CORE_SRCS = $(sort $(wildcard tests/check_*.c)) tests/moe_ep_impl.c $(TEST_SUPPORT)
$(BUILD)/check_moe_ep_%: $(CORE_SRCS) $(HEADERS) | $(BUILD)
	$* $(BUILD_FLAGS) $(SOURCES) -o $@ $(CHECK_LINK)
HAVE_AVX512_BF16 := $(shell grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null && echo yes)
check-core: $(CC_LIST:%=$(BUILD)/check_moe_ep_%)
	@$(foreach b,$^,$(call run_test,$@,./$(b));)
	@$(if $(HAVE_AVX512_BF16),,$(call skip,$@/bf16-dot,no AVX512-BF16 on this CPU: the BF16_DOT model not held against vdpbf16ps))

# >>sanitizers: every core suite under clang's AddressSanitizer, UndefinedBehaviorSanitizer and
# ThreadSanitizer (the pthreads transport's ranks and barriers), about 20 s each. TSan builds without
# OpenMP: it does not see libgomp's barriers and reports what they order as races. clang's TSan is used
# because gcc 12's may not start on a kernel with more mmap randomness than it knows.
SANITIZE_asan  = -fsanitize=address -fno-omit-frame-pointer $(OPENMP_FLAGS)
SANITIZE_ubsan = -fsanitize=undefined -fno-sanitize-recover=all $(OPENMP_FLAGS)
SANITIZE_tsan  = -fsanitize=thread
$(BUILD)/%/check_moe_ep: $(CORE_SRCS) $(HEADERS)
	@mkdir -p $(@D)
	$(CLANG) $(MOE_EP_CFLAGS) -O1 -g $(SANITIZE_$*) $(CFLAGS) $(SOURCES) -o $@ $(CHECK_LINK)
check-asan check-ubsan check-tsan: check-%: $(BUILD)/%/check_moe_ep
	@$(call run_test,$@,env TSAN_OPTIONS=halt_on_error=1 ./$<)

# >>fuzz-api: tests/fuzz/fuzz_api.c, the public API from bytes (desc, routing, sizes; create, forward,
# the stages, destroy at 1-3 ranks). check-fuzz replays its corpus (tests/fuzz/corpus_api) under
# clang's ASan and UBSan with a plain main (no libFuzzer runtime); fuzz-api runs libFuzzer from the
# corpus into $(BUILD)/fuzz/work for FUZZ_TIME seconds (new inputs worth keeping go to the corpus by hand).
FUZZ_API_FLAGS = -std=c99 -O1 -g -fno-sanitize-recover=all
$(BUILD)/fuzz/replay: tests/fuzz/fuzz_api.c $(HEADERS)
	@mkdir -p $(@D)
	$(CLANG) $(MOE_EP_CFLAGS) $(FUZZ_API_FLAGS) -fsanitize=address,undefined -DFUZZ_REPLAY $< -o $@ -pthread -lm
$(BUILD)/fuzz/fuzz_api: tests/fuzz/fuzz_api.c $(HEADERS)
	@mkdir -p $(@D)
	$(CLANG) $(FUZZ_API_FLAGS) -fsanitize=fuzzer,address,undefined $< -o $@ -pthread -lm
fuzz-api: $(BUILD)/fuzz/fuzz_api
	@mkdir -p $(BUILD)/fuzz/work && cp -n tests/fuzz/corpus_api/* $(BUILD)/fuzz/work/
	./$< -max_total_time=$(FUZZ_TIME) -max_len=4096 -print_final_stats=1 $(BUILD)/fuzz/work

# >>demos: they check themselves: the seed layer against one rank, the three layouts at 64 ranks,
# the C++ example (examples/cpp_demo.cpp) against one rank.
$(BUILD)/%_demo: examples/%_demo.c $(HEADERS) | $(BUILD)
	$(CC) $(BUILD_FLAGS) $< -o $@ -pthread -lm $(LDFLAGS)
demo: $(BUILD)/seed_demo
	./$<
layouts-demo: $(BUILD)/layouts_demo
	./$<
$(BUILD)/cpp_demo: examples/cpp_demo.cpp $(HEADERS) | $(BUILD)
	$(CXX) -std=c++11 $(CXX_WARN) $(OPT) $(OPENMP_FLAGS) $(CXXFLAGS) $< -o $@ -pthread -lm $(LDFLAGS)
check-demos: $(BUILD)/seed_demo $(BUILD)/layouts_demo $(BUILD)/model_layer $(BUILD)/cpp_demo
	./$(BUILD)/cpp_demo
	./$< --ranks 8 --experts 64 --top-k 2 --tokens 64 --d-model 64 --d-ff 128 > $<.log && tail -1 $<.log
	./$< --ranks 3 --experts 10 --top-k 3 --tokens 13 --d-model 24 --d-ff 40 --placement round-robin \
	  > $<_odd.log && tail -1 $<_odd.log
	./$(BUILD)/layouts_demo > $(BUILD)/layouts_demo.log && tail -1 $(BUILD)/layouts_demo.log
	$(MODEL_LAYER_RUN) > $(BUILD)/model_layer.log && tail -1 $(BUILD)/model_layer.log

# >>model-layer: one layer of a test model written by transformers, on 8 ranks, against its reference.
MODEL_LAYER_RUN = ./$(BUILD)/model_layer tests/data/deepseek_v3 --layer 1 --ranks 8 --tokens 24 \
                  --check tests/data/deepseek_v3/reference.safetensors
$(BUILD)/model_layer: examples/model_layer.c $(HEADERS) | $(BUILD)
	$(CC) $(BUILD_FLAGS) $< -o $@ -pthread -lm $(LDFLAGS)
$(BUILD)/model_layer_mpi: examples/model_layer.c $(HEADERS) | $(BUILD)
	$(MPICC_openmpi) $(BUILD_FLAGS) -DMODEL_LAYER_MPI $< -o $@ -pthread -lm $(LDFLAGS)
model-layer: $(BUILD)/model_layer
	$(MODEL_LAYER_RUN)

# >>fuzz: the JSON reader and the safetensors header parser (tests/fuzz). check-fuzz replays the
# committed corpus through a plain main under ASan and UBSan (no libFuzzer needed); fuzz-safetensors
# runs libFuzzer (clang) for FUZZ_TIME seconds, new inputs into $(BUILD)/fuzz_corpus.
FUZZ_TIME ?= 60
FUZZ_SANITIZE = -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1
$(BUILD)/fuzz_replay: tests/fuzz/fuzz_safetensors.c $(HEADERS) | $(BUILD)
	$(CC) $(MOE_EP_CFLAGS) $(FUZZ_SANITIZE) $< -o $@ -lm
$(BUILD)/fuzz_safetensors: tests/fuzz/fuzz_safetensors.c $(HEADERS) | $(BUILD)
	$(CLANG) $(MOE_EP_CFLAGS) -DMOE_EP_FUZZ_LIBFUZZER -fsanitize=fuzzer $(FUZZ_SANITIZE) $< -o $@ -lm
check-fuzz: $(BUILD)/fuzz_replay $(BUILD)/fuzz/replay
	./$< tests/fuzz/corpus
	./$(BUILD)/fuzz/replay tests/fuzz/corpus_api/*
fuzz: fuzz-safetensors fuzz-api
fuzz-safetensors: $(BUILD)/fuzz_safetensors
	@mkdir -p $(BUILD)/fuzz_corpus
	./$< -max_total_time=$(FUZZ_TIME) -max_len=4096 -timeout=10 $(BUILD)/fuzz_corpus tests/fuzz/corpus

# >>kernels: the expert kernel per compiler, portable C, native SIMD and the portable C under
# native flags, against float64 and the portable path; AVX-512 compiled on x86-64, run where the
# CPU has it; MOE_EP_CBLAS compiled where there is a cblas.h.
KERNEL_SRCS   = tests/kernels/check_kernels.c tests/kernels/kernels_portable.c $(TEST_SUPPORT)
KERNEL_BUILDS = $(foreach cc,$(CC_LIST),$(cc)_generic $(cc)_native $(cc)_portable)
AVX512_BUILD  = $(if $(filter x86_64,$(shell uname -m)),$(firstword $(CC_LIST))_avx512)
HAVE_AVX512  := $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo yes)
HAVE_CBLAS   := $(shell printf '\#include <cblas.h>\n' | $(CC) -E -x c - >/dev/null 2>&1 && echo yes)
$(BUILD)/check_kernels_%: $(KERNEL_SRCS) $(HEADERS) | $(BUILD)
	$(call compiler,$*) $(BUILD_FLAGS) $(call variant,$*) $(SOURCES) -o $@ $(CHECK_LINK)
$(HDR)/cblas_%.o: tests/headers/impl_cblas.c $(HEADERS) | $(HDR)
	$(call compiler,$*) $(MOE_EP_CFLAGS) $(call variant,$*) -c $< -o $@
check-kernels: $(addprefix $(BUILD)/check_kernels_,$(KERNEL_BUILDS) $(AVX512_BUILD)) \
               $(if $(HAVE_CBLAS),$(foreach cc,$(CC_LIST),$(HDR)/cblas_$(cc)_c99.o $(HDR)/cblas_$(cc)_omp.o))
	@$(foreach b,$(KERNEL_BUILDS) $(if $(HAVE_AVX512),$(AVX512_BUILD)),$(call run_test,$@,./$(BUILD)/check_kernels_$(b));)
	@$(if $(HAVE_AVX512),,$(if $(AVX512_BUILD),$(call skip,$@/avx512,no AVX-512 on this CPU: compiled only)))
	@$(if $(HAVE_CBLAS),echo "MOE_EP_CBLAS: compiles with $(CC_LIST)",$(call skip,$@/cblas,no cblas.h))

# >>bits: the same output bits from every build. tests/bits/fingerprint.c prints the output
# fingerprint of five seeded layers (every activation and scoring); each build below must print
# the same lines: gcc and clang at -O0, -O2 and -O3 -march=native (with OpenMP), with gcc's and
# clang's -ffp-contract=fast, the portable kernel under native flags, the AVX2 kernel, tcc, g++ and
# clang++ (the file as C++), i686 with SSE2, and aarch64 (NEON) and armhf (software fmaf) cross
# builds under qemu-user; -ffast-math and i686's x87 must stop at the header's #error, and build and
# run with MOE_EP_ALLOW_DIFFERENT_BITS. The seed demo's printed fingerprint must be the fingerprint's seed line.
# The plain -O2 builds choose their kernel at run time (gcc and clang on x86): each path this CPU runs
# is also forced (fingerprint --kernel), and so is aarch64's portable path beside its NEON one. The
# fingerprint's layers include bf16, fp16 and int8 weights.
# tests/bits/check_math.c checks the library's fmaf, exp, log and GELU on the same builds' targets,
# and nm the implementation's calls into libm (LIBM_INEXACT).
BITS          = $(BUILD)/bits
BITS_WARN     = -pedantic -Wall -Wextra -Werror
BITS_C        = -std=c99 $(BITS_WARN)
BITS_CXX      = -x c++ -std=c++11 $(BITS_WARN)
HOST_ARCH    := $(shell uname -m)
BITS_NATIVE   = gcc_O0 gcc_O2 gcc_native gcc_contract gcc_portable clang_O0 clang_O2 clang_native clang_contract \
                g++_native clang++_native tcc_O2 $(if $(filter x86_64,$(HOST_ARCH)),gcc_avx2 i686-linux-gnu-gcc_sse2)
BITS_CROSS    = $(if $(filter x86_64,$(HOST_ARCH)),aarch64 armhf)
HAVE_AVX2    := $(shell grep -qw avx2 /proc/cpuinfo 2>/dev/null && grep -qw fma /proc/cpuinfo && grep -qw f16c /proc/cpuinfo && echo yes)
BITS_KERNELS  = portable $(if $(filter x86_64,$(HOST_ARCH)),$(if $(HAVE_AVX2),avx2) $(if $(HAVE_AVX512),avx512))
BITS_FORCED   = $(foreach b,gcc_O2 clang_O2,$(foreach k,$(BITS_KERNELS),$(b):$(k))) $(if $(BITS_CROSS),aarch64:portable)
BITS_FLAGS_O0       = $(BITS_C) -O0
BITS_FLAGS_O2       = $(BITS_C) -O2
BITS_FLAGS_native   = $(BITS_C) -O3 -march=native $(OPENMP_FLAGS)
BITS_FLAGS_contract = -std=gnu99 $(BITS_WARN) -O3 -march=native -ffp-contract=fast
BITS_FLAGS_portable = $(BITS_C) -O3 -march=native -DMOE_EP_NO_SIMD
BITS_FLAGS_avx2     = $(BITS_C) -O3 -mavx2 -mfma
BITS_FLAGS_sse2     = $(BITS_C) -O2 -msse2 -mfpmath=sse -static
# Builds that cannot give the same bits must stop at the header's #error, not build.
BITS_REFUSED  = "$(CC) -O2 -ffast-math" $(if $(filter x86_64,$(HOST_ARCH)),"i686-linux-gnu-gcc -O2 -mfpmath=387")
BITS_CXX_native     = $(BITS_CXX) -O3 -march=native $(OPENMP_FLAGS)
TCC          ?= tcc
CROSS_CC_aarch64  = aarch64-linux-gnu-gcc
CROSS_CC_armhf    = arm-linux-gnueabihf-gcc
CROSS_CC_riscv64  = riscv64-linux-gnu-gcc
CROSS_CC_s390x    = s390x-linux-gnu-gcc
QEMU_aarch64      = qemu-aarch64
QEMU_armhf        = qemu-arm
QEMU_riscv64      = qemu-riscv64
QEMU_s390x        = qemu-s390x
# gcc on s390x evaluates float in double in ISO C mode (FLT_EVAL_METHOD 1), which the header refuses.
CROSS_FLAGS_s390x = -fexcess-precision=fast
bits_build = $(if $(filter g++ clang++,$(call compiler,$(1))),$(call compiler,$(1)) $(BITS_CXX_$(word 2,$(subst _, ,$(1)))),$(if \
  $(filter tcc,$(call compiler,$(1))),$(TCC) -Wall -Werror,$(call compiler,$(1)) $(BITS_FLAGS_$(word 2,$(subst _, ,$(1))))))
$(BITS) $(BITS)/cross:
	@mkdir -p $@
$(BITS)/fingerprint_%: $(HEADERS) tests/bits/fingerprint.c | $(BITS)
	$(call bits_build,$*) tests/bits/fingerprint.c -o $@ -lm
$(BITS)/check_math_%: $(HEADERS) tests/bits/check_math.c | $(BITS)
	$(call bits_build,$*) tests/bits/check_math.c -o $@ -lm
$(BITS)/cross/fingerprint_% $(BITS)/cross/check_math_%: $(HEADERS) tests/bits/fingerprint.c tests/bits/check_math.c | $(BITS)/cross
	$(CROSS_CC_$*) $(BITS_C) -O2 $(CROSS_FLAGS_$*) -static tests/bits/fingerprint.c -o $(BITS)/cross/fingerprint_$* -lm
	$(CROSS_CC_$*) $(BITS_C) -O2 $(CROSS_FLAGS_$*) -static tests/bits/check_math.c -o $(BITS)/cross/check_math_$* -lm
# The implementation may call only the C library's exact functions (fma, ceil, ldexpf, ...); one
# whose last bits differ between C libraries (exp, log, erf, tanh, pow, ...) must not come back.
LIBM_INEXACT = (a?(sin|cos|tan)h?|atan2|exp(2|10|m1)?|log(2|10|1p)?|pow|erfc?|cbrt|[lt]gamma|hypot)[fl]?
$(BITS)/impl_O0.o: tests/moe_ep_impl.c $(HEADERS) | $(BITS)
	$(CC) $(BITS_C) -O0 -c $< -o $@
bits_prog = $(if $(filter $(1),aarch64 armhf riscv64 s390x),$(QEMU_$(1)) $(BITS)/cross/$(2)_$(1),./$(BITS)/$(2)_$(1))
check-bits: $(BITS_NATIVE:%=$(BITS)/fingerprint_%) $(BITS)/check_math_gcc_O2 $(BITS)/check_math_gcc_native \
            $(BITS_CROSS:%=$(BITS)/cross/fingerprint_%) $(BUILD)/seed_demo $(BITS)/impl_O0.o
	@calls=$$(nm -u $(BITS)/impl_O0.o | awk '{print $$NF}' | grep -xE '$(LIBM_INEXACT)' | tr '\n' ' '); \
	  [ -z "$$calls" ] || { echo "check-bits: the implementation calls $$calls(libm: last bits differ between C libraries)"; exit 1; }; \
	  echo "libm: the implementation calls $$(nm -u $(BITS)/impl_O0.o | awk '{print $$NF}' | grep -xE '(fma|ceil|floor|ldexp|sqrt|fabs|frexp)f?' | tr '\n' ' ')and nothing inexact"
	@$(foreach b,$(BITS_NATIVE) $(BITS_CROSS),$(call bits_prog,$(b),fingerprint) > $(BITS)/$(b).txt || exit 1; \
	  printf '%-16s %-24s %s\n' $(b) "$$(sed -n '1s/.*kernel path: //p' $(BITS)/$(b).txt)" "$$(tail -1 $(BITS)/$(b).txt)";)
	@tail -n +2 $(BITS)/gcc_O2.txt > $(BITS)/reference.txt; $(foreach b,$(BITS_NATIVE) $(BITS_CROSS),\
	  tail -n +2 $(BITS)/$(b).txt | diff $(BITS)/reference.txt - || { echo "check-bits: $(b) gives other bits than gcc_O2"; exit 1; };)
	@$(foreach f,$(BITS_FORCED),$(call bits_prog,$(word 1,$(subst :, ,$(f))),fingerprint) --kernel $(word 2,$(subst :, ,$(f))) \
	  > $(BITS)/forced_$(subst :,_,$(f)).txt || exit 1; printf '%-16s %-24s %s\n' $(f) \
	  "$$(sed -n '1s/.*kernel path: //p' $(BITS)/forced_$(subst :,_,$(f)).txt)" "$$(tail -1 $(BITS)/forced_$(subst :,_,$(f)).txt)"; \
	  tail -n +2 $(BITS)/forced_$(subst :,_,$(f)).txt | diff $(BITS)/reference.txt - || \
	  { echo "check-bits: $(f) (a forced kernel path) gives other bits than gcc_O2"; exit 1; };)
	@$(foreach b,gcc_O2 gcc_native $(BITS_CROSS),echo "check_math ($(b)):"; \
	  $(call bits_prog,$(b),check_math) > $(BITS)/math_$(b).txt || { cat $(BITS)/math_$(b).txt; exit 1; }; \
	  sed 's/^/  /' $(BITS)/math_$(b).txt;)
	@for build in $(BITS_REFUSED); do if $$build -std=c99 -fsyntax-only tests/bits/fingerprint.c 2> $(BITS)/refused.log; then \
	  echo "check-bits: $$build compiled; the header must refuse it"; exit 1; fi; \
	  grep -q 'error: #error "moe_ep.h' $(BITS)/refused.log || { cat $(BITS)/refused.log; exit 1; }; \
	  echo "refused, as it must be: $$build: $$(grep -o '#error "moe_ep.h: [^(]*' $(BITS)/refused.log | head -1)"; \
	  $$build -std=c99 -static -DMOE_EP_ALLOW_DIFFERENT_BITS tests/bits/fingerprint.c -o $(BITS)/allowed -lm && \
	  ./$(BITS)/allowed > $(BITS)/allowed.txt || { echo "check-bits: $$build with MOE_EP_ALLOW_DIFFERENT_BITS does not build and run"; exit 1; }; \
	  echo "  with -DMOE_EP_ALLOW_DIFFERENT_BITS it builds and runs: $$(tail -1 $(BITS)/allowed.txt)"; done
	./$(BUILD)/seed_demo --ranks 8 --experts 64 --top-k 2 --tokens 64 --d-model 64 --d-ff 128 > $(BITS)/seed_demo.log
	@demo=$$(sed -n 's/^output fingerprint: \([0-9a-f]*\).*/\1/p' $(BITS)/seed_demo.log); \
	  seed=$$(awk '$$1 == "seed" {print $$2}' $(BITS)/gcc_O2.txt); echo "seed demo: $$demo, the fingerprint's seed layer: $$seed"; \
	  [ -n "$$demo" ] && [ "$$demo" = "$$seed" ]

# >>cross: the core and kernel suites, the fingerprint and check_math for aarch64, armhf, riscv64 and
# s390x (big-endian), built by Debian's cross gcc, linked statically and run under qemu-user; the
# fingerprint must be the native gcc -O2 one (make check-bits' reference). Check for each target
# is built from Debian's source of check (apt-get source, with a deb-src list of its own under
# $(BUILD): the source index of bookworm main and the 0.8 MB package from deb.debian.org, once,
# checked by apt against the signed index). Not Debian's binary packages through multiarch
# (check:arm64, ...): Debian 12 has no riscv64 archive (a port only), and they would add foreign
# architectures to the machine's dpkg; one source build serves all four targets and writes nothing
# outside $(BUILD). As root it installs the cross compilers and qemu-user. Times: bench/RESULTS.md.
CROSS_ARCHS     ?= aarch64 armhf riscv64 s390x
# armhf has no FMA instruction: its every fmaf is the header's software one, which qemu runs at
# ~9 M/s, so its kernel suite takes the emulated size of the row-determinism test (136 rows, not 1024:
# tests/kernels/check_kernels.c, DETERMINISM_ROWS); the full size took most of an hour there.
CROSS_KERNEL_FLAGS_armhf = -DKERNELS_EMULATED
CROSS_TIMEOUT   ?= 3600
CROSS_TRIPLE_aarch64 = aarch64-linux-gnu
CROSS_TRIPLE_armhf   = arm-linux-gnueabihf
CROSS_TRIPLE_riscv64 = riscv64-linux-gnu
CROSS_TRIPLE_s390x   = s390x-linux-gnu
CROSS          = $(abspath $(BUILD)/cross)
CROSS_APT      = -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts=$(CROSS)/apt/sources.list.d \
                 -o Dir::State::Lists=$(CROSS)/apt/lists
cross-deps:
	@$(call apt_install,qemu-user $(foreach a,$(CROSS_ARCHS),gcc-$(CROSS_TRIPLE_$(a))))
$(CROSS)/check-src/configure:
	@mkdir -p $(CROSS)/apt/sources.list.d $(CROSS)/apt/lists/partial $(CROSS)/check-src
	printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
	  > $(CROSS)/apt/sources.list.d/src.sources
	cd $(CROSS)/apt && { apt-get $(CROSS_APT) update -qq && apt-get $(CROSS_APT) source --download-only -qq check; } || \
	  { echo "test-cross: could not fetch check's source from deb.debian.org (needed once, to build Check for the targets)"; exit 1; }
	tar xzf $(CROSS)/apt/check_*.orig.tar.gz -C $(CROSS)/check-src --strip-components=1
$(CROSS)/%/lib/libcheck.a: $(CROSS)/check-src/configure
	rm -rf $(CROSS)/$*/check-build && mkdir -p $(CROSS)/$*/check-build
	cd $(CROSS)/$*/check-build && $(CROSS)/check-src/configure --host=$(CROSS_TRIPLE_$*) --prefix=$(CROSS)/$* \
	  --disable-shared --enable-static --disable-subunit > configure.log && $(MAKE) -s -C lib > make.log && \
	  $(MAKE) -s -C src install >> make.log && cp check_stdint.h $(CROSS)/$*/include/
# (static libgomp draws a linker warning about dlopen, kept in the .log beside each program)
.PRECIOUS: $(CROSS)/%/lib/libcheck.a
CROSS_BUILD = $(CROSS_CC_$(1)) $(MOE_EP_CFLAGS) -O2 $(OPENMP_FLAGS) $(CROSS_FLAGS_$(1)) -static -I$(CROSS)/$(1)/include
cross-%: $(CROSS)/%/lib/libcheck.a $(CORE_SRCS) $(KERNEL_SRCS) $(HEADERS) tests/bits/fingerprint.c tests/bits/check_math.c \
         $(BITS)/fingerprint_gcc_O2
	$(call CROSS_BUILD,$*) $(CORE_SRCS) -o $(CROSS)/$*/check_moe_ep -L$(CROSS)/$*/lib -lcheck -pthread -lm 2> $(CROSS)/$*/check_moe_ep.log || { cat $(CROSS)/$*/check_moe_ep.log; exit 1; }
	$(call CROSS_BUILD,$*) $(CROSS_KERNEL_FLAGS_$*) $(KERNEL_SRCS) -o $(CROSS)/$*/check_kernels -L$(CROSS)/$*/lib -lcheck -pthread -lm 2> $(CROSS)/$*/check_kernels.log || { cat $(CROSS)/$*/check_kernels.log; exit 1; }
	$(call CROSS_BUILD,$*) tests/bits/fingerprint.c -o $(CROSS)/$*/fingerprint -lm 2> $(CROSS)/$*/fingerprint.log || { cat $(CROSS)/$*/fingerprint.log; exit 1; }
	$(call CROSS_BUILD,$*) tests/bits/check_math.c -o $(CROSS)/$*/check_math -lm 2> $(CROSS)/$*/check_math.log || { cat $(CROSS)/$*/check_math.log; exit 1; }
	CK_FORK=no OMP_NUM_THREADS=2 timeout $(CROSS_TIMEOUT) $(QEMU_$*) $(CROSS)/$*/check_moe_ep
	CK_FORK=no OMP_NUM_THREADS=2 timeout $(CROSS_TIMEOUT) $(QEMU_$*) $(CROSS)/$*/check_kernels
	$(QEMU_$*) $(CROSS)/$*/check_math
	./$(BITS)/fingerprint_gcc_O2 | tail -n +2 > $(CROSS)/reference.txt
	$(QEMU_$*) $(CROSS)/$*/fingerprint | tee $(CROSS)/$*/fingerprint.txt | sed -n '1p;$$p'
	tail -n +2 $(CROSS)/$*/fingerprint.txt | diff $(CROSS)/reference.txt - || { echo "test-cross: $* gives other bits than x86-64"; exit 1; }
test-cross: cross-deps
	@$(MAKE) --no-print-directory $(CROSS_ARCHS:%=cross-%)

# >>mpi: built by each MPI's wrapper and run by its own launcher (the other's would start N
# singletons; the binaries assert the size). Open MPI as root needs the ALLOW variables, and
# --oversubscribe past one process per core; ob1 over self,vader keeps it in shared memory;
# OMP_WAIT_POLICY=PASSIVE stops the OpenMP threads of oversubscribed processes spinning.
MPI_LIST          = openmpi mpich
MPICC_openmpi    ?= mpicc.openmpi
MPICC_mpich      ?= mpicc.mpich
MPIRUN_openmpi    = OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 300 mpirun.openmpi \
                    --oversubscribe --mca pml ob1 --mca btl self,vader --timeout 240 -x OMP_WAIT_POLICY=PASSIVE
MPIRUN_mpich      = MPIEXEC_TIMEOUT=240 OMP_WAIT_POLICY=PASSIVE timeout 300 mpiexec.mpich
MPI_SIZES_openmpi ?= 1 2 3 4
MPI_SIZES_mpich   ?= 1 2 4
$(BUILD)/check_mpi_%: tests/mpi/check_mpi.c $(TEST_SUPPORT) $(HEADERS) | $(BUILD)
	$(MPICC_$*) $(BUILD_FLAGS) $(SOURCES) -o $@ $(CHECK_LINK)
$(BUILD)/large_mpi_%: tests/mpi/large_mpi.c $(TEST_SUPPORT) $(HEADERS) | $(BUILD)
	$(MPICC_$*) $(MOE_EP_CFLAGS) $(OPT) $(CFLAGS) $(SOURCES) -o $@ -pthread -lm $(LDFLAGS)
$(BUILD)/mpi_demo: examples/mpi_demo.c $(HEADERS) | $(BUILD)
	$(MPICC_openmpi) $(BUILD_FLAGS) $(SOURCES) -o $@ -pthread -lm $(LDFLAGS)
$(BUILD)/mpi_bench: bench/mpi_bench.c $(TEST_SUPPORT) $(HEADERS) | $(BUILD)
	$(MPICC_openmpi) $(BUILD_FLAGS) $(SOURCES) -o $@ -pthread -lm $(LDFLAGS)
$(BUILD)/fault_bench: bench/fault_bench.c $(TEST_SUPPORT) $(HEADERS) | $(BUILD)
	$(MPICC_openmpi) $(BUILD_FLAGS) $(SOURCES) -o $@ -pthread -lm $(LDFLAGS)

# The MPI header under each MPI's wrapper and under clang with that MPI's flags, with and without
# OpenMP; the declarations as C++.
MPI_HEADER_CC = openmpi mpich clang-openmpi clang-mpich
MPICC_clang-openmpi = $(CLANG) $$(pkg-config --cflags ompi-c)
MPICC_clang-mpich   = $(CLANG) $$(pkg-config --cflags mpich)
$(HDR)/mpi_%.o: tests/headers/impl_mpi.c $(HEADERS) | $(HDR)
	$(MPICC_$(call compiler,$*)) $(MOE_EP_CFLAGS) $(call variant,$*) -c $< -o $@
# As C++ (the header sets OMPI_SKIP_MPICXX and MPICH_SKIP_MPICXX itself): the declarations, and the
# implementation under each MPI's flags; the headers flat, the core included first.
$(HDR)/decl_mpi.o: tests/headers/decl_mpi.cpp $(HEADERS) | $(HDR)
	$(CXX) $(CXX_WARN) $$(pkg-config --cflags ompi-c) -c $< -o $@
$(HDR)/impl_mpi_cxx_%.o: tests/headers/impl_mpi.c $(HEADERS) | $(HDR)
	$(CXX) -x c++ $(CXX_WARN) -O2 $$(pkg-config --cflags $(if $(filter openmpi,$*),ompi-c,mpich)) -c $< -o $@
$(HDR)/flat_mpi.o: tests/headers/flat_mpi.c $(FLAT) | $(HDR)
	$(MPICC_openmpi) $(MOE_EP_CFLAGS) -I$(FLAT) -c $< -o $@
check-mpi-headers: $(foreach m,$(MPI_HEADER_CC),$(HDR)/mpi_$(m)_c99.o $(HDR)/mpi_$(m)_omp.o) $(HDR)/decl_mpi.o \
                   $(MPI_LIST:%=$(HDR)/impl_mpi_cxx_%.o) $(HDR)/flat_mpi.o

# Open MPI at 1-4 processes, MPICH at 1, 2, 4, then the demo at 8 against one rank.
check-mpi: check-mpi-headers $(MPI_LIST:%=$(BUILD)/check_mpi_%) $(BUILD)/mpi_demo $(BUILD)/model_layer_mpi $(BUILD)/fault_bench
	for n in $(MPI_SIZES_openmpi); do $(MPIRUN_openmpi) -x CK_FORK=no -n $$n ./$(BUILD)/check_mpi_openmpi $$n || exit 1; done
	for n in $(MPI_SIZES_mpich); do CK_FORK=no $(MPIRUN_mpich) -n $$n ./$(BUILD)/check_mpi_mpich $$n || exit 1; done
	$(MPIRUN_openmpi) -n 8 ./$(BUILD)/mpi_demo --tokens 64 --d-model 64 --d-ff 128 > $(BUILD)/mpi_demo.log \
	  && tail -1 $(BUILD)/mpi_demo.log
	$(MPIRUN_openmpi) -n 4 ./$(BUILD)/model_layer_mpi tests/data/deepseek_v3 --layer 1 --ranks 4 --transport mpi \
	  --reps 2 --check tests/data/deepseek_v3/reference.safetensors > $(BUILD)/model_layer_mpi.log \
	  && tail -1 $(BUILD)/model_layer_mpi.log

# About 2.3 GiB per process: more than 2^31 bytes for real.
check-mpi-large: $(MPI_LIST:%=$(BUILD)/large_mpi_%)
	$(MPIRUN_openmpi) -n 2 ./$(BUILD)/large_mpi_openmpi 2
	$(MPIRUN_mpich) -n 2 ./$(BUILD)/large_mpi_mpich 2
mpi-demo: $(BUILD)/mpi_demo
	$(MPIRUN_openmpi) -n 8 ./$<
bench-mpi: $(BUILD)/mpi_bench
	$(MPIRUN_openmpi) -n 2 ./$<
# What moe_ep_forward_args.nonfinite_tokens costs: forward with and without it (bench/RESULTS.md).
$(BUILD)/nonfinite_bench: bench/nonfinite_bench.c $(TEST_SUPPORT) $(HEADERS) | $(BUILD)
	$(CC) $(BUILD_FLAGS) $(SOURCES) -o $@ -lm $(LDFLAGS)
bench-nonfinite: $(BUILD)/nonfinite_bench
	./$< --reps 30

# Rank faults (bench/RESULTS.md): how long the others wait after a rank's dispatch fails, and
# what the survivors of a killed process return (Open MPI 4.1 lets them live with the MCA setting).
bench-faults: $(BUILD)/fault_bench
	$(MPIRUN_openmpi) -n 4 ./$< fail --reps 50
	$(MPIRUN_openmpi) -n 8 ./$< fail --reps 50
	-$(MPIRUN_openmpi) --mca orte_abort_on_non_zero_status 0 -n 4 ./$< kill --timeout-ms 1000

# >>gpu: the NCCL transport (check_nccl) and the GPU layer (check_cuda; check_cuda_layout: EP x DP
# and EP x TP x DP), built by CC against nvcc's kernels and compiled by clang too, as bench_nccl
# is; the GPU layer's header as one nvcc (C++) file. Without a GPU the programs exit 77. NCCL_NVLS_ENABLE=0 on GPUs.
CUDA_HOME   ?= /usr/local/cuda
NVCC        ?= $(CUDA_HOME)/bin/nvcc
# sm_90a machine code (the Hopper grouped GEMM's wgmma and tensor copies) and sm_90 PTX for the rest
CUDA_ARCH   ?= -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_90,code=compute_90
MPICC_NCCL  ?= mpicc
MPIRUN_NCCL ?= mpirun
# The NCCL transport links NCCL and the CUDA runtime; the GPU layer also cuBLAS and C++ (nvcc's kernels).
GPU_FLAGS    = $(MOE_EP_CFLAGS) $(OPT) -isystem $(CUDA_HOME)/include $(CFLAGS)
GPU_LIBS     = -L$(CUDA_HOME)/lib64 -lnccl -lcudart -pthread -lm $(LDFLAGS)
CUDA_LIBS    = -L$(CUDA_HOME)/lib64 -lnccl -lcublas -lcudart -lstdc++ -pthread -lm $(LDFLAGS)
GPU_TESTS    = check_nccl check_cuda check_cuda_layout check_cuda_families check_cuda_gemm check_cuda_lowlat
HAVE_NVCC   := $(shell command -v $(NVCC) 2>/dev/null)
HAVE_MPI_NCCL := $(and $(shell command -v $(MPICC_NCCL) 2>/dev/null),$(shell command -v $(MPIRUN_NCCL) 2>/dev/null))
# ANCHOR_DIR: the anchor scripts bench-gpu runs beside ours (raw NCCL all-to-all, the PyTorch EP layer)
ANCHOR_DIR  ?= bench/anchors
NGPU        ?= $(shell n=$$(nvidia-smi -L 2>/dev/null | wc -l); [ "$$n" -gt 0 ] && echo $$n || echo 2)
test-gpu seed-gpu bench-gpu: export NCCL_NVLS_ENABLE = 0
vpath %.c tests/gpu bench
vpath %.cu tests/gpu bench
$(BUILD)/%.o: %.cu $(HEADERS) | $(BUILD)
	$(NVCC) $(CUDA_ARCH) -O2 -c $< -o $@
$(GPU_TESTS:%=$(BUILD)/%): $(BUILD)/%: tests/gpu/%.c $(TEST_SUPPORT) $(HEADERS) | $(BUILD)
	$(CC) $(GPU_FLAGS) $(SOURCES) -o $@ $(CHECK_LIBS) $(GPU_LIBS)
CUDA_TESTS   = $(BUILD)/check_cuda $(BUILD)/check_cuda_layout $(BUILD)/check_cuda_families $(BUILD)/check_cuda_gemm \
               $(BUILD)/check_cuda_lowlat
$(CUDA_TESTS): GPU_LIBS = $(CUDA_LIBS)
$(CUDA_TESTS) $(BUILD)/nccl_mpi_demo: $(BUILD)/cuda_kernels.o
$(BUILD)/nccl_mpi_demo: examples/nccl_mpi_demo.c $(HEADERS) | $(BUILD)
	$(MPICC_NCCL) $(GPU_FLAGS) $(SOURCES) -o $@ $(CUDA_LIBS)
$(BUILD)/bench_nccl: bench/bench_nccl.c $(BUILD)/bench_fill.o $(HEADERS) | $(BUILD)
	$(CC) $(GPU_FLAGS) $(SOURCES) -o $@ $(CUDA_LIBS)
$(BUILD)/bench_gemm: bench/bench_gemm.c $(BUILD)/bench_fill.o $(HEADERS) | $(BUILD)
	$(CC) $(GPU_FLAGS) $(SOURCES) -o $@ $(CUDA_LIBS)
$(BUILD)/bench_lowlat: bench/bench_lowlat.c $(BUILD)/bench_fill.o $(HEADERS) | $(BUILD)
	$(CC) $(GPU_FLAGS) $(SOURCES) -o $@ $(CUDA_LIBS)
$(HDR)/gpu_clang_%.o: %.c $(HEADERS) | $(HDR)
	$(CLANG) $(GPU_FLAGS) -c $< -o $@
$(HDR)/nccl_%.o: tests/headers/impl_nccl.c $(HEADERS) | $(HDR)
	$* $(GPU_FLAGS) -c $< -o $@
$(HDR)/cuda.o: tests/headers/impl_cuda.cu $(HEADERS) | $(HDR)
	$(NVCC) $(CUDA_ARCH) -O2 -Xcompiler -Wall,-Wextra,-Werror -c $< -o $@

ifeq ($(HAVE_NVCC),)
check-nccl: | $(BUILD)
	@$(call skip,$@,no nvcc: $(NVCC))
else
check-nccl: $(GPU_TESTS:%=$(BUILD)/%) $(GPU_TESTS:%=$(HDR)/gpu_clang_%.o) $(HDR)/gpu_clang_bench_nccl.o $(HDR)/cuda.o \
            $(HDR)/gpu_clang_bench_lowlat.o $(CC_LIST:%=$(HDR)/nccl_%.o) $(BUILD)/bench_nccl $(BUILD)/bench_gemm \
            $(BUILD)/bench_lowlat $(if $(HAVE_MPI_NCCL),$(BUILD)/nccl_mpi_demo)
	@$(foreach t,$(GPU_TESTS),$(call run_test,$@,./$(BUILD)/$(t));)
endif

# Every GPU test (world sizes 1, 2, 4, 8 up to the GPUs there are), then the MPI demo (one process
# per GPU) in fp32, bf16 and bf16 on the direct path (CUDA IPC between the processes).
test-gpu: $(GPU_TESTS:%=$(BUILD)/%) $(if $(HAVE_MPI_NCCL),$(BUILD)/nccl_mpi_demo)
	for t in $(GPU_TESTS); do CK_FORK=no timeout $(TEST_TIMEOUT) ./$(BUILD)/$$t --require-gpu || exit 1; done
ifeq ($(HAVE_MPI_NCCL),)
	@$(call skip,$@/mpi-demo,no $(MPICC_NCCL) or $(MPIRUN_NCCL))
else
	for args in "" --bf16 "--bf16 --direct"; do $(MPIRUN_NCCL) -np $(NGPU) ./$(BUILD)/nccl_mpi_demo $$args || exit 1; done
endif

# The seed scenario at full size, one process per GPU (64 experts, top-2, bf16, 4096 tokens per
# rank, d_model 2048, d_ff 1408): checked against the CPU layer; traffic matrix, time per layer.
seed-gpu: $(BUILD)/nccl_mpi_demo
	$(MPIRUN_NCCL) -np $(NGPU) ./$< --seed

# The PyTorch anchors (ANCHOR_DIR) and ours on the same GPUs; the PyTorch layer before and after;
# then one GPU's: transformers' MoE block with grouped_mm experts, and the experts stage alone.
TORCHRUN = python3 -m torch.distributed.run --nproc_per_node=$(NGPU)
bench-gpu: $(BUILD)/bench_nccl $(BUILD)/bench_gemm
	@mkdir -p bench/out
	$(TORCHRUN) $(ANCHOR_DIR)/nccl_a2a.py 2>&1 | tee bench/out/nccl_a2a.log
	$(TORCHRUN) $(ANCHOR_DIR)/torch_ep_moe.py 2>&1 | tee bench/out/torch_ep_moe.log
	./$< --gpus $(NGPU) --torch-log bench/out/torch_ep_moe.log | tee bench/out/bench_nccl.log
	$(TORCHRUN) $(ANCHOR_DIR)/torch_ep_moe.py 2>&1 | tee bench/out/torch_ep_moe_after.log
	python3 $(ANCHOR_DIR)/hf_grouped_moe.py 2>&1 | tee bench/out/hf_grouped_moe.log
	./$(BUILD)/bench_gemm | tee bench/out/bench_gemm.log

# >>bench: the CPU kernels against OpenBLAS's OpenMP build (linked into the bench only), memcpy
# and PyTorch (bench/RESULTS.md). BENCH_ARGS: sections (gemm cblas comm layer decode), --reps N.
MULTIARCH   := $(shell $(CC) -print-multiarch 2>/dev/null)
OPENBLAS_OMP = -I/usr/include/$(MULTIARCH)/openblas-openmp -L/usr/lib/$(MULTIARCH)/openblas-openmp \
               -Wl,-rpath,/usr/lib/$(MULTIARCH)/openblas-openmp -lopenblas
$(BUILD)/cpu_bench: bench/cpu_bench.c bench/cpu_bench_cblas.c $(TEST_SUPPORT) $(HEADERS) | $(BUILD)
	$(CC) -std=c99 -pedantic -Wall -Wextra -O3 -march=native $(OPENMP_FLAGS) $(SOURCES) -o $@ $(OPENBLAS_OMP) -pthread -lm
bench: bench-cpu
# >>bench-load: a rank's experts through the loader against read() of the same bytes (bench/RESULTS.md).
$(BUILD)/load_bench: bench/load_bench.c $(HEADERS) | $(BUILD)
	$(CC) $(MOE_EP_CFLAGS) -O2 $< -o $@ -lm
bench-load: $(BUILD)/load_bench
	./$< $(BENCH_ARGS)
bench-cpu: bench-deps
	$(MAKE) --no-print-directory $(BUILD)/cpu_bench
	./$(BUILD)/cpu_bench $(BENCH_ARGS)

# >>bench-barrier: the pthreads transport's barrier polling before it sleeps, against sleeping at once.
$(BUILD)/barrier_bench: bench/barrier_bench.c $(HEADERS) | $(BUILD)
	$(CC) $(MOE_EP_CFLAGS) -O2 $< -o $@ -pthread -lm
bench-barrier: $(BUILD)/barrier_bench
	./$< $(BENCH_ARGS)

# >>bench-edge: the default build against -march=native, and the weight formats at the memory limit.
# The seed demo built as `make demo` builds it (no -march) and with -march=native, run in turn
# EDGE_ROUNDS times (its 1-rank layer time, median); then bench/edge_bench.c (decode 1, 4, 16 tokens
# and prefill for fp32, bf16, fp16, int8 and bf16 with the BF16_DOT arithmetic, against a plain read
# loop), plain and native builds; bench/bf16_peak.c (one core's vfmadd231ps against vdpbf16ps, x86-64
# with AVX512-BF16); then the PyTorch layer in bf16 and fp32 on the prefill (bench/torch_moe_cpu.py,
# 2 threads, its BLAS the pthreads OpenBLAS, installed when root).
EDGE        = $(BUILD)/edge
EDGE_ROUNDS ?= 5
EDGE_ARGS   ?=
PYTHON      ?= /usr/bin/python3
bench-edge:
	@$(call apt_install,python3-torch libopenblas0-pthread)
	@mkdir -p $(EDGE)
	$(CC) $(BUILD_FLAGS) examples/seed_demo.c -o $(EDGE)/seed_demo -pthread -lm
	$(CC) $(BUILD_FLAGS) -march=native examples/seed_demo.c -o $(EDGE)/seed_demo_native -pthread -lm
	$(CC) $(BUILD_FLAGS) bench/edge_bench.c -o $(EDGE)/edge_bench -lm
	$(CC) $(BUILD_FLAGS) -march=native bench/edge_bench.c -o $(EDGE)/edge_bench_native -lm
	$(CC) $(MOE_EP_CFLAGS) -O2 bench/bf16_peak.c -o $(EDGE)/bf16_peak
	@uptime
	@for i in $$(seq $(EDGE_ROUNDS)); do for b in seed_demo seed_demo_native; do \
	  ./$(EDGE)/$$b | awk -v b=$$b '/^1 rank:/ {print b, $$3}'; done; done > $(EDGE)/demo.txt; \
	  for b in seed_demo seed_demo_native; do awk -v b=$$b '$$1 == b {print $$2}' $(EDGE)/demo.txt | sort -g | \
	  awk -v b=$$b '{v[NR] = $$1} END {m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print b, m}'; \
	  done > $(EDGE)/demo_median.txt; cat $(EDGE)/demo.txt | tr '\n' ' '; echo; \
	  awk '{t[$$1] = $$2} END {printf "seed demo, 1-rank layer: default build %.3f s, -march=native %.3f s: %.2fx\n", \
	  t["seed_demo"], t["seed_demo_native"], t["seed_demo_native"] / t["seed_demo"]}' $(EDGE)/demo_median.txt
	./$(EDGE)/edge_bench $(EDGE_ARGS)
	./$(EDGE)/edge_bench_native $(EDGE_ARGS)
	./$(EDGE)/bf16_peak
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) bench/torch_moe_cpu.py 2 --tokens 1024 --reps 5 --dtype bf16
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) bench/torch_moe_cpu.py 2 --tokens 1024 --reps 5 --dtype fp32
	@uptime

# >>bench-bits: what the same-bits arithmetic costs (bench/bits_bench.c, one thread): this header
# against the one before the portable kernel fused (BITS_BASE), built for x86-64 without FMA
# instructions (MOE_EP_NO_SIMD: gcc would otherwise choose a SIMD path at run time), the portable
# kernel with hardware FMA, the native SIMD path, and armhf (baseline
# VFPv3: software fmaf; and -mfpu=neon-vfpv4: hardware) under qemu-user. Builds run in turn,
# BITS_ROUNDS rounds, so each pair is measured side by side.
BITS_BASE   ?= 566a606
BITS_ROUNDS ?= 3
BB           = $(BUILD)/bench_bits
BB_FLAGS     = -std=c99 -pedantic -Wall -Wextra -O3
BB_NATIVE    = nofma:-march=x86-64@-DMOE_EP_NO_SIMD portable_hw:-march=native@-DMOE_EP_NO_SIMD simd:-march=native
BB_ARM       = armhf: armhf_vfpv4:-mfpu=neon-vfpv4
$(BB)/before/moe_ep.h:
	@mkdir -p $(@D) && git show $(BITS_BASE):moe_ep.h > $@
bench-bits: $(BB)/before/moe_ep.h
	@set -e; for v in $(BB_NATIVE); do n=$${v%%:*}; f=$$(echo $${v#*:} | tr @ ' '); \
	  $(CC) $(BB_FLAGS) $$f -I. bench/bits_bench.c -o $(BB)/$${n}_now -lm; \
	  $(CC) $(BB_FLAGS) $$f -I$(BB)/before bench/bits_bench.c -o $(BB)/$${n}_before -lm; done; \
	for v in $(BB_ARM); do n=$${v%%:*}; f=$${v#*:}; \
	  arm-linux-gnueabihf-gcc $(BB_FLAGS) $$f -static -I. bench/bits_bench.c -o $(BB)/$${n}_now -lm; \
	  arm-linux-gnueabihf-gcc $(BB_FLAGS) $$f -static -I$(BB)/before bench/bits_bench.c -o $(BB)/$${n}_before -lm; done; \
	for r in $$(seq $(BITS_ROUNDS)); do echo "round $$r"; \
	  for v in $(BB_NATIVE) $(BB_ARM); do n=$${v%%:*}; run=""; case $$n in armhf*) run=qemu-arm;; esac; \
	    for h in now before; do printf '  %-20s ' $${n}_$$h; $$run ./$(BB)/$${n}_$$h 5; done; done; done

# >>install: the headers under $(INCLUDEDIR)/moe_ep in the source tree's layout (the transports
# include ../moe_ep.h), and moe_ep.pc with the header's version.
PREFIX       ?= /usr/local
INCLUDEDIR   ?= $(PREFIX)/include
PKGCONFIGDIR ?= $(PREFIX)/share/pkgconfig
install:
	for h in $(PUBLIC_HEADERS); do install -D -m 644 $$h $(DESTDIR)$(INCLUDEDIR)/moe_ep/$$h || exit 1; done
	install -d $(DESTDIR)$(PKGCONFIGDIR)
	sed -e 's|@PREFIX@|$(PREFIX)|; s|@INCLUDEDIR@|$(INCLUDEDIR)|; s|@VERSION@|$(VERSION)|' moe_ep.pc.in \
	  > $(DESTDIR)$(PKGCONFIGDIR)/moe_ep.pc
uninstall:
	rm -f $(PUBLIC_HEADERS:%=$(DESTDIR)$(INCLUDEDIR)/moe_ep/%) $(DESTDIR)$(PKGCONFIGDIR)/moe_ep.pc
	rmdir $(DESTDIR)$(INCLUDEDIR)/moe_ep/transports $(DESTDIR)$(INCLUDEDIR)/moe_ep 2>/dev/null || true

# Install under DESTDIR=$(BUILD)/stage (pkg-config's sysroot), build and run a program with
# pkg-config's flags, uninstall, and find nothing left.
STAGE = $(abspath $(BUILD)/stage)
check-install: export PKG_CONFIG_SYSROOT_DIR = $(STAGE)
check-install: export PKG_CONFIG_LIBDIR = $(STAGE)$(PKGCONFIGDIR)
check-install: | $(BUILD)
	rm -rf $(STAGE) && $(MAKE) --no-print-directory install DESTDIR=$(STAGE)
	$(CC) $(MOE_EP_CFLAGS) $$(pkg-config --cflags moe_ep) tests/install/use_moe_ep.c -o $(BUILD)/use_moe_ep \
	  $$(pkg-config --libs moe_ep) -pthread
	./$(BUILD)/use_moe_ep "$$(pkg-config --modversion moe_ep)"
	$(MAKE) --no-print-directory uninstall DESTDIR=$(STAGE)
	@left=$$(find $(STAGE) -type f); [ -z "$$left" ] || { echo "uninstall left: $$left"; exit 1; }

clean:
	rm -rf $(BUILD)
