"""Tests of api/ (HTTP service)."""
