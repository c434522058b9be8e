"""spinquant-client: the SpinQuant service's client library and ``spinquant`` CLI (httpx + tqdm only).

    from spinquant_client import Client
    with Client("http://127.0.0.1:8000", token) as c:
        job = c.wait(c.submit("local:llama-tiny", settings={"w_bits": 4})["id"])
        c.download(job["id"], "out/")   # every file checked against the API's sha256 and SHA256SUMS

See ``spinquant_client.client`` for the exit codes and the retry rules.
"""

from .client import (
    DEFAULT_URL,
    TERMINAL,
    ChecksumMismatch,
    Client,
    ClientError,
    Event,
    RequestRefused,
    Unreachable,
    WaitTimeout,
    verify_checksums,
)

__version__ = "0.1.0"
__all__ = ["DEFAULT_URL", "TERMINAL", "ChecksumMismatch", "Client", "ClientError", "Event", "RequestRefused",
           "Unreachable", "WaitTimeout", "verify_checksums"]
