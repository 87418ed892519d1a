#!/usr/bin/env bash
# The test suite, as CI runs it (.ci/run calls exactly this): install the pinned requirements and the test-only
# references (mistral-common with --no-deps: only its tokenizer.model is used), then pytest.
#   bash tests/run.sh                              # everything
#   bash tests/run.sh tests/test_model.py -x -q    # arguments replace the default `tests`
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt -r requirements-test.txt
python3 -m pip install -q --no-deps mistral-common==1.13.1   # ships the real Mistral v1 tokenizer.model
# 2 pytest-xdist workers (one thread each, tests/conftest.py), whole files per worker so that module fixtures run
# once, the longest files first in conftest's order (--no-loadscope-reorder keeps it); PYTEST_WORKERS=0: serial.
python3 -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "${@:-tests}"
