"""Celery workers: one process per GPU that runs quant_core for queued jobs and publishes progress.

Importing ``worker.celery_app`` must not import torch or touch CUDA (a test checks it): the prefork
parent forks a fresh child per job, and a CUDA context created before the fork breaks every child.
"""
