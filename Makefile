# Entry points named in the README. `make install` is idempotent: each step leaves a stamp in the
# virtual environment and reruns only when its inputs change.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install test demo bench device-payload clean-venv FORCE

install: $(VENV)/.stamp-thyroid_det

$(PYTHON):
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip

# Variables are inputs too: each is recorded in a file rewritten only when its value changes, so
# a new torch pin, or `DETECTRON2_SOURCE=DIR make install` after a first install, reruns its step.
$(VENV)/.var-%: FORCE | $(PYTHON)
	@echo '$($*)' | cmp -s - $@ || echo '$($*)' > $@

$(VENV)/.stamp-torch: $(VENV)/.var-TORCH | $(PYTHON)
	$(PYTHON) -m pip install $(TORCH)
	touch $@

$(VENV)/.stamp-detectron2: scripts/install_detectron2.py $(VENV)/.stamp-torch $(VENV)/.var-DETECTRON2_SOURCE
	$(PYTHON) scripts/install_detectron2.py
	touch $@

$(VENV)/.stamp-thyroid_det: setup.py $(VENV)/.stamp-detectron2
	$(PYTHON) -m pip install -e '.[dev]'
	touch $@

test: install
	$(PYTHON) -m pytest -q tests

demo: install
	$(PYTHON) tools/train_net.py --config-file configs/mccnn_synthetic.yaml

bench: install
	$(PYTHON) tools/benchmark.py

# What a borrowed GPU machine needs for scripts/device_run_mccnn.sh (README, "TN5000 on one GPU").
device-payload: install
	$(PYTHON) scripts/prepare_device_run.py

clean-venv:
	rm -rf $(VENV)
