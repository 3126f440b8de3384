"""Credentials in the configuration: held as secrets, revealed only where fsspec opens a filesystem.

A flow's parameters (the whole config) are stored by the Prefect server and shown in its UI; configs are
printed (`nextdetail config`), hashed into identities and written into lineage. So every credential-like
value of an fsspec options mapping (`storage.options`, `tokens.cache_options`, `eval.reference_cache_options`)
is a pydantic `SecretStr`: JSON, `repr` and `str` show ``**********``; `reveal` gives fsspec the real values
(`storage.fs.Store`). Pickles keep them: Dask workers get them over the Dask connection, never through Prefect.

Credentials from outside the config (resolved at run time, never stored in a deployment):
- the environment / an AWS profile / fsspec's own config files — nothing to do here;
- ``storage.credentials_file``: a JSON or YAML mapping of fsspec options merged into `storage.options`;
- ``storage.credentials_block``: the name of a Prefect Secret block whose value is such a mapping as a JSON
  string (a dict-valued Secret is refused: Prefect's API lists its values in clear).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from nextdetail.errors import UserError

if TYPE_CHECKING:
    from nextdetail.conf.schema import PipelineConfig

SECRET_NAMES = frozenset({
    "key", "secret", "token", "password", "passwd", "session_token", "security_token", "sas_token", "account_key",
    "client_secret", "connection_string", "credential", "credentials", "access_key", "secret_key",
})
_SECRET_NAME = re.compile(r"^aws_|(_key|_secret|_token|_password)$")


def is_secret_name(name: str) -> bool:
    """fsspec / botocore / adlfs / gcsfs credential keys: `key`, `secret`, `token`, `client_kwargs.aws_*`, …"""
    name = name.lower()
    return name in SECRET_NAMES or bool(_SECRET_NAME.search(name))


def wrap(options: Any, everything: bool = False) -> Any:
    """`options` with every credential-like value (all string values with `everything`) a `SecretStr`."""
    if isinstance(options, dict):
        return {k: (SecretStr(v) if isinstance(v, str) and (everything or is_secret_name(str(k))) else
                    wrap(v, everything)) for k, v in options.items()}
    if isinstance(options, list):
        return [wrap(v, everything) for v in options]
    return options


def reveal(options: Any) -> Any:
    """`options` with the real values: for fsspec, and nothing else."""
    if isinstance(options, SecretStr):
        return options.get_secret_value()
    if isinstance(options, dict):
        return {k: reveal(v) for k, v in options.items()}
    if isinstance(options, list):
        return [reveal(v) for v in options]
    return options


def override_has_secret(keys: list[str], value: Any) -> bool:
    """Whether an ``-o`` override (parsed: key path, value) sets a credential inline, as
    ``storage.options.secret=…`` or ``storage.options={key: …, secret: …}`` do."""
    def has(v: Any) -> bool:
        return isinstance(v, dict) and any((is_secret_name(str(k)) and isinstance(x, str)) or has(x)
                                           for k, x in v.items())

    for i, part in enumerate(keys):
        if part.endswith("options"):
            nested = value
            for p in reversed(keys[i + 1:]):
                nested = {p: nested}
            return has(nested)
    return False


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_credentials_file(path: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).expanduser().read_text())
    except OSError as err:
        raise UserError(f"storage.credentials_file {path}: cannot read it ({err.strerror}); give a JSON or YAML "
                        "file of fsspec options, e.g. {key: …, secret: …}") from None
    except yaml.YAMLError:
        raise UserError(f"storage.credentials_file {path}: not JSON or YAML; give a mapping of fsspec options, "
                        "e.g. {key: …, secret: …}") from None
    if not isinstance(data, dict):
        raise UserError(f"storage.credentials_file {path}: holds a {type(data).__name__}, not a mapping of fsspec "
                        "options (e.g. {key: …, secret: …})")
    return data


def credentials_from_secret(name: str, value: Any) -> dict[str, Any]:
    """The mapping of fsspec options a Secret block's stored value holds: a JSON object as a string. A value stored
    as a mapping is refused, not read: Prefect 3.8's API lists a dict-valued Secret's keys and values in clear
    (a string one obfuscated), so those credentials are exposed already and must be stored again as a string."""
    example = f"prefect.blocks.system.Secret(value=json.dumps({{'key': …, 'secret': …}})).save({name!r}, overwrite=True)"
    if isinstance(value, dict):
        raise UserError(f"storage.credentials_block {name!r}: its value is a mapping, which Prefect's API lists in "
                        f"clear; store it as a JSON string ({example}) and rotate those credentials")
    try:
        mapping = json.loads(value) if isinstance(value, str) else None
    except json.JSONDecodeError:
        mapping = None
    if not isinstance(mapping, dict):
        raise UserError(f"storage.credentials_block {name!r}: its value must be a JSON object of fsspec options, as "
                        f"a string ({example})")
    return mapping


def read_credentials_block(name: str) -> dict[str, Any]:
    """The mapping a Prefect Secret block holds (a JSON object as a string: `credentials_from_secret`). Needs the
    Prefect API: PREFECT_API_URL, or the ephemeral server (`flows.runtime.prefect_api`)."""
    import logging

    from prefect.blocks.system import Secret

    # Loading a block queues an event; a command that then ends at once (a refusal) would print Prefect's
    # "Still processing items" drain warning (its queue services log under their class names) under its one line.
    logging.getLogger("EventsWorker").setLevel(logging.ERROR)
    try:
        block = Secret.load(name)
    except ValueError as err:
        raise UserError(f"storage.credentials_block {name!r}: no such Secret block on the Prefect server "
                        f"({str(err).splitlines()[0][:100]}); create it (prefect.blocks.system.Secret(value="
                        "json.dumps({'key': …, 'secret': …})).save(NAME)) or drop the setting") from None
    # the stored value, not Secret.get(): that parses a JSON string into a dict, hiding how it is stored
    return credentials_from_secret(name, block.value.get_secret_value())


def with_credentials(options: dict[str, Any], file: str | None, block: str | None) -> dict[str, Any]:
    """`options` with the credentials file's and the Secret block's mappings merged in (every value a secret)."""
    for extra in ([read_credentials_file(file)] if file else []) + ([read_credentials_block(block)] if block else []):
        options = _merge(options, wrap(extra, everything=True))
    return options



def resolve_credentials(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` with `storage.credentials_file` / `credentials_block` merged into `storage.options` (and into the
    token and reference caches' options where those follow `storage.options`). At run time, every time: a
    deployment stores the names, never the values."""
    s = cfg.storage
    if not (s.credentials_file or s.credentials_block):
        return cfg
    return cfg.model_copy(update={"storage": s.model_copy(update={
        "options": with_credentials(s.options, s.credentials_file, s.credentials_block)})})
