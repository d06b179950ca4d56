# acmoe-megatron: the two commands of the README, and the setup they share.
#   make quickstart   set up .venv, build the embedded corpus, pretrain configs/tiny_cpu.yaml (2 procs, EP=2)
#   make test         set up .venv (and .venv-bridge with Megatron-Bridge: make bridge), run the whole test suite
# Both re-use an existing .venv (re-installed only when pyproject.toml changes).
# Override the interpreter with PYTHON=/path/to/python3.12.

PYTHON ?=
VENV   ?= .venv
NPROC  ?= 2
CONFIG ?= configs/tiny_cpu.yaml
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.acmoe-installed
BRIDGE_VENV ?= .venv-bridge
BRIDGE_STAMP = $(BRIDGE_VENV)/.acmoe-bridge-installed
BRIDGE  = megatron-bridge==0.6.2
NEMO_RUN = .venv-nemo-run

.PHONY: setup bridge nemo-run quickstart test test-gpu clean-runs

$(STAMP): pyproject.toml
	@set -e; \
	if [ ! -x "$(PY)" ]; then \
	  interp=$$(tools/find-python $(PYTHON)); \
	  echo "[setup] creating $(VENV) with $$interp"; \
	  "$$interp" -m venv $(VENV); \
	fi
	$(PY) -m pip install --quiet --upgrade pip
	@# megatron-core's wheel needs no compiler; torch comes from PyPI (CUDA build, runs on CPU too).
	$(PY) -m pip install --quiet -e '.[dev]'
	@# NVIDIA Transformer Engine and Apex are deliberately NOT installed here (see README).
	touch $(STAMP)

setup: $(STAMP)

# Megatron-Bridge for examples/bridge_pretrain_acmoe.py and its parity test: its pure-Python
# requirements from our [bridge] extra, Bridge itself without its declared GPU-only dependencies
# (pyproject.toml says which and why). They go into $(BRIDGE_VENV), a venv layered on $(VENV) (a .pth
# file adds $(VENV)'s site-packages after its own, so torch and megatron-core are shared and pip installs
# only what Bridge adds or pins differently), and not into $(VENV): with nvidia-modelopt importable,
# megatron.training imports it (and transformers, diffusers) in every process, 7-9 s of CPU per start
# measured here. Run Bridge with $(BRIDGE_VENV)/bin/python; its bin/torchrun is the same torchrun.
$(BRIDGE_STAMP): $(STAMP)
	@set -e; \
	if [ ! -x "$(BRIDGE_VENV)/bin/python" ]; then \
	  $(PY) -m venv --without-pip $(BRIDGE_VENV); \
	fi; \
	base=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	layer=$$($(BRIDGE_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	echo "import site; site.addsitedir('$$base')" > "$$layer/_acmoe_base_venv.pth"; \
	printf '#!/bin/sh\nexec "$$(dirname "$$0")/python" -m torch.distributed.run "$$@"\n' > $(BRIDGE_VENV)/bin/torchrun; \
	chmod +x $(BRIDGE_VENV)/bin/torchrun
	$(BRIDGE_VENV)/bin/python -m pip install --quiet -e '.[bridge]'
	$(BRIDGE_VENV)/bin/python -m pip install --quiet --no-deps '$(BRIDGE)'
	touch $(BRIDGE_STAMP)

bridge: $(BRIDGE_STAMP)

# NeMo-Run for examples/nemo_run_acmoe.py: 0.11.1 with leptonai 0.27.3 (0.47 breaks `import nemo_run`).
# It pins urllib3<1.27, httpx==0.27.2 and anyio<=4.9 (through torchx and leptonai), so it goes into its
# own --target directory; the launcher runs with PYTHONPATH=$(NEMO_RUN), the training keeps .venv's set.
$(NEMO_RUN)/.installed: $(STAMP)
	$(PY) -m pip install --quiet --upgrade --target $(NEMO_RUN) 'nemo-run==0.11.1' 'leptonai==0.27.3'
	touch $(NEMO_RUN)/.installed

nemo-run: $(NEMO_RUN)/.installed

quickstart: setup
	$(VENV)/bin/acmoe-pretrain --config $(CONFIG) --nproc $(NPROC)

test: setup bridge nemo-run
	$(PY) -m pytest

test-gpu: setup
	$(PY) -m pytest -m gpu tests/gpu

clean-runs:
	rm -rf runs
