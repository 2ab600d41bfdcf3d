VENV ?= .venv
PY := $(VENV)/bin/python
ENGRAM := $(VENV)/bin/engram
STAMP := $(VENV)/.installed
DEMO := demo-out

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: install
	mkdir -p $(DEMO)
	$(ENGRAM) compress-vocab -o $(DEMO)/projection.safetensors --overwrite --top 5
	$(ENGRAM) build-tables tables/demo.toml --projection $(DEMO)/projection.safetensors -o $(DEMO)/demo-tables.zarr --overwrite

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO)
