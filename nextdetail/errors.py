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
