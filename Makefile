VENV ?= .venv
PY := $(VENV)/bin/python
ENGRAM := $(VENV)/bin/engram
STAMP := $(VENV)/.installed
DEMO := demo-out
SENTENCE := Only Alexander the Great could tame the horse Bucephalus.
# The edit loop: what runs in this process only (markers from tests/conftest.py; `make test` runs all).
FAST := not slow and not subprocess and not multiprocess and not dask

.PHONY: install demo test test-fast lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: install
	mkdir -p $(DEMO)
	$(ENGRAM) compress-vocab -o $(DEMO)/projection.safetensors --overwrite --top 5
	$(ENGRAM) hash "$(SENTENCE)" --projection $(DEMO)/projection.safetensors
	$(ENGRAM) build-tables tables/demo.toml --projection $(DEMO)/projection.safetensors -o $(DEMO)/demo-tables.zarr --overwrite
	$(ENGRAM) export $(DEMO)/demo-tables.zarr --for training -o $(DEMO)/demo-dcp --overwrite
	$(ENGRAM) export $(DEMO)/demo-tables.zarr --for inference -o $(DEMO)/demo-tables.safetensors --overwrite
	$(PY) -c "from engram_cli import EngramTables; t = EngramTables.open('$(DEMO)/demo-tables.safetensors'); ids = t.projection.tokenizer().encode('$(SENTENCE)').ids; out = t.lookup([ids]); print('EngramTables.lookup:', {k: tuple(v.shape) for k, v in out.items()}, 'layer 1, last token, head 0:', [round(x, 3) for x in out[1][0, -1, 0, :4].tolist()])"
	$(ENGRAM) inspect $(DEMO)/demo-tables.zarr --verify
	$(ENGRAM) inspect engram-demo-v1 --projection $(DEMO)/projection.safetensors --corpus "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" --glob '*.py' --max-tokens 2000000 --sweep 1,2,5,10 --plot $(DEMO)/collisions.png --top 3
	@echo "demo done: see $(DEMO)/ (collision plot: $(DEMO)/collisions.png)"

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -x -q -m "$(FAST)"

lint: install
	$(VENV)/bin/ruff check engram_cli tests benchmarks
	$(VENV)/bin/ruff format --check engram_cli tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(DEMO)
