"""User-facing errors: one line that names the thing and the fix, never a traceback."""


class UserError(Exception):
    """Bad configuration, input or environment. The CLI prints ``str(err)`` on one line and exits 2.

    Deterministic: retrying the same run gives the same error, so stages never retry it.
    """


CREDENTIALS_HELP = ("give them by the environment or an AWS profile, -o storage.credentials_file=PATH, "
                    "-o storage.credentials_block=NAME (a Prefect Secret block) or storage.options")


def credentials_problem(exc: BaseException) -> str | None:
    """One line for an object store's missing or refused credentials (botocore's NoCredentialsError and kin,
    which are not OSErrors), else None. Walks the cause chain: fsspec and Prefect wrap what they raise."""
    seen = 0
    while exc is not None and seen < 10:
        name = type(exc).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
            return f"the storage needs credentials and has none ({exc}); {CREDENTIALS_HELP}"
        if name in ("InvalidAccessKeyId", "SignatureDoesNotMatch") or any(
                code in str(exc) for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch")):
            return f"the storage refused the credentials given ({name}); {CREDENTIALS_HELP}"
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def storage_problem(exc: BaseException) -> str | None:
    """One line for why a storage URL cannot be reached — cannot resolve host, endpoint unreachable, bucket
    missing, access denied, or credentials (`credentials_problem`) — else None. Walks the cause chain."""
    import socket

    line = credentials_problem(exc)
    if line is not None:
        return line
    seen = 0
    while exc is not None and seen < 10:
        name, text = type(exc).__name__, str(exc)
        if isinstance(exc, socket.gaierror) or "Name or service not known" in text or "nodename nor servname" in text:
            return "cannot resolve host (check the URL's host name)"
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionRefusedError") \
                or "Could not connect to the endpoint URL" in text or "Connection refused" in text:
            return "endpoint unreachable (check the endpoint_url in the storage options, and that it is running)"
        if name == "NoSuchBucket" or "NoSuchBucket" in text or "bucket does not exist" in text.lower():
            return "bucket missing (create it, or fix the bucket name)"
        if name in ("AccessDenied", "PermissionError") or "AccessDenied" in text or "Forbidden" in text:
            return "access denied (these credentials may not read it)"
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None
