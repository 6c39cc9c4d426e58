# make demo: set up .venv and run the main job on the embedded dataset.
# make test: set up .venv and run lint + the test suite (what CI runs).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: demo test lint format bench-aug bench-models clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/semiseg demo

test: $(BIN)/.installed
	$(BIN)/ruff check semiseg tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check semiseg tests benchmarks
	$(BIN)/ruff format --check semiseg tests benchmarks

format: $(BIN)/.installed
	$(BIN)/ruff format semiseg tests benchmarks
	$(BIN)/ruff check --fix semiseg tests benchmarks

bench-aug: $(BIN)/.installed
	$(BIN)/python benchmarks/augment_speed.py

bench-models: $(BIN)/.installed
	$(BIN)/python benchmarks/model_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
