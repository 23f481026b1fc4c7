# Two entry points of the README's Quick start; both install what a fresh machine lacks.
PYTHON ?= python3
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install quickstart test test-all

install:
	$(PYTHON) -m pip install -q -r requirements.txt
	@if [ ! -f $(FMNIST) ]; then (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	  || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped"; fi

quickstart: install
	bash scripts/quickstart.sh

test: install
	$(PYTHON) -m pytest -q tests
