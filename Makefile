# Two commands do everything on a fresh machine:
#   make demo   set up .venv, train MoE vs dense on the built-in corpus, write the report
#   make test   set up .venv, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.moekit-installed

.PHONY: demo test setup bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a looser requirement would pull a multi-GB CUDA build (see DEVELOPERS.md)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# a second `make demo` is refused with the two ways on: RESUME=1 finishes an interrupted demo (or rewrites
# a finished one's summary and report), OVERWRITE=1 starts over
DEMO_HINT = finish an interrupted demo (or redo a finished one's report) with \`make demo RESUME=1\`, start over with \`make demo OVERWRITE=1\`
demo: $(STAMP)
	MOEKIT_DEMO_HINT="$(DEMO_HINT)" $(BIN)/moekit train --compare --jobs 2 $(if $(RESUME),--resume,--out) runs/compare $(if $(OVERWRITE),--overwrite)

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/moekit bench layer --shape all

clean:
	rm -rf $(VENV) runs
