# One-command entry points for a fresh machine: each target sets up what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch first and pinned: pip then takes the CPU wheel this machine serves instead of a
# multi-GB CUDA build that an open range would pull.
TORCH_PIN ?= torch==2.13.0
DEMO_OUT ?= demo-out
# The one image for head, workers and RayJob submitters (Dockerfile; cluster/*.yaml name this
# tag: <project version>-ray<Ray version>). Point it at your registry: make image IMAGE=...
IMAGE ?= registry.example.com/engram-ray:0.1.0-ray2.60.0

.PHONY: install demo test lint bench image clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q $(TORCH_PIN) -e ".[test,cluster,peft]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/engram-ray demo --out $(DEMO_OUT)

test: install
	$(VENV)/bin/ruff check engram_ray pipelines jobs tests benchmarks
	bash scripts/pytest.sh $(VENV)

lint: install
	$(VENV)/bin/ruff check engram_ray pipelines jobs tests benchmarks

# The peer (the paper's reference implementation) is a benchmark-only dependency.
bench: install
	$(PIP) install -q $(TORCH_PIN) ai-engram==0.11.0
	$(PY) benchmarks/extract_throughput.py --out docs/benchmarks.md

# Needs a Docker daemon (none in CI: tests/test_cluster_manifests.py checks the Dockerfile).
image:
	docker build --build-arg TORCH_PIN=$(TORCH_PIN) -t $(IMAGE) .

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
