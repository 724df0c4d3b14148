# make demo   install if needed, build the demo index if missing, serve the API and the web console on :8000
# make test   the test suite (the same command as README "Set up", docs/install.md, and .ci/run)
# Variables: PAIRS, IMAGES (an image,caption CSV and its images; default: Flickr8k from ../shared/data), INDEX
# (default runs/demo), PORT, IMAGE_ENCODER, TEXT_ENCODER, PYTHON.
PYTHON ?= python3
VENV ?= .venv
PAIRS ?= ../shared/data/flickr8k/captions.csv
IMAGES ?= ../shared/data/flickr8k/images
INDEX ?= runs/demo
PORT ?= 8000
IMAGE_ENCODER ?= effnet-lite0
TEXT_ENCODER ?= minilm
export HF_HUB_OFFLINE := 1

.PHONY: demo test install

demo: $(VENV)/bin/asif $(INDEX)/manifest.json
	@echo "asif: serving $(INDEX); open http://127.0.0.1:$(PORT)/ for the console (Ctrl-C stops)"
	$(VENV)/bin/asif serve --index $(INDEX) --port $(PORT)

install: $(VENV)/bin/asif

$(VENV)/bin/asif:
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	. $(VENV)/bin/activate && python -m pip install --quiet --upgrade pip && docker/install.sh -e ".[dev]"

$(INDEX)/manifest.json: | $(VENV)/bin/asif
	@echo "asif: building $(INDEX) from $(PAIRS) (once; Flickr8k takes ~6 min on 2 cores, 2.5 of them choosing k and the weighting)"
	$(VENV)/bin/asif build --pairs $(PAIRS) --images-root $(IMAGES) --out $(INDEX) \
		--image-encoder $(IMAGE_ENCODER) --text-encoder $(TEXT_ENCODER)

test: $(VENV)/bin/asif
	$(VENV)/bin/python -m pytest -q
