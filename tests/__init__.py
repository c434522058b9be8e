"""Test suite; a package so that `python -m tests.fixtures.<script>` works from the repo root."""
