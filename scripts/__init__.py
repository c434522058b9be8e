"""Tooling around the service: start a local stack (Redis, API, one worker) and the demo client."""
