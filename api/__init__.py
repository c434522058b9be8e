"""The HTTP service: FastAPI routes, SQL job store, artifact store, Redis progress; no torch here.

``api/`` imports only ``quant_core.config`` from the core (torch-free) and enqueues the worker's
``worker.quantize`` task by name; a test checks that importing ``api.main`` leaves torch unloaded.
"""
