"""What the API and the workers share: settings, the SQL job store and its migrations, the Celery queue's
names and limits, live progress in Redis, the artifact store, and the job's input sources.

No FastAPI, no Celery tasks, no torch: both server processes import it, and tests/test_imports.py holds it
to that.
"""
