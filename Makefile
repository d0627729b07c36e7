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
TEST_SRCS   = $(sort $(wildcard tests/check_*.c)) tests/moe_ep_impl.c

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
$(BUILD)/seed_demo: examples/seed_demo.c $(HEADERS) | $(BUILD)
	$(CC) $(MOE_EP_CFLAGS) $(OPT) $(OPENMP_FLAGS) $(CFLAGS) $< -o $@ -pthread -lm $(LDFLAGS)

demo: $(BUILD)/seed_demo
	./$(BUILD)/seed_demo

$(BUILD)/layouts_demo: examples/layouts_demo.c $(HEADERS) | $(BUILD)
	$(CC) $(MOE_EP_CFLAGS) $(OPT) $(OPENMP_FLAGS) $(CFLAGS) $< -o $@ -pthread -lm $(LDFLAGS)

layouts-demo: $(BUILD)/layouts_demo
	./$(BUILD)/layouts_demo

# >>tests: one binary per compiler, every suite in it.
$(BUILD)/check_moe_ep_gcc: $(TEST_SRCS) tests/check_moe_ep.h $(HEADERS) | $(BUILD)
	gcc $(MOE_EP_CFLAGS) $(OPT) $(OPENMP_FLAGS) $(CFLAGS) $(TEST_SRCS) -o $@ $(CHECK_FLAGS) -pthread -lm $(LDFLAGS)

$(BUILD)/check_moe_ep_clang: $(TEST_SRCS) tests/check_moe_ep.h $(HEADERS) | $(BUILD)
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

TEST_TARGETS = check-headers check-core check-demos check-mpi
TEST_TARGETS += check-nccl
TEST_TARGETS += check-kernels
test: deps
	$(MAKE) --no-print-directory $(TEST_TARGETS)

clean:
	rm -rf $(BUILD)
