"""Tests of worker/ (Celery task, progress publisher)."""
