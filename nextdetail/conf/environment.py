"""Where a pipeline reads and writes, and what it runs on: the storage root, the Dask cluster, the source data
(with the embedded dataset). Also the base every settings section shares (`Section`: unknown keys fail)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Section(BaseModel):
    """A settings section: unknown keys fail loudly, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


def secret_options(value: Any) -> Any:
    """fsspec options with their credential-like values held as secrets (conf/secrets.py)."""
    from nextdetail.conf.secrets import wrap

    return wrap(value) if isinstance(value, dict) else value


class StorageConfig(Section):
    """Where every artifact lives: a local path or an fsspec URL (``s3://bucket/prefix``)."""

    root: str = "./nextdetail-data"
    # Passed to fsspec (e.g. {"client_kwargs": {"endpoint_url": ...}}). Credentials: the environment / an AWS
    # profile, `credentials_file`, `credentials_block`, or inline here (held as secrets: never shown or stored).
    options: dict[str, object] = Field(default_factory=dict)
    credentials_file: str | None = Field(default=None, description="a JSON/YAML file of fsspec options (key, "
                                         "secret, …) merged into `options` at run time")
    credentials_block: str | None = Field(default=None, description="a Prefect Secret block (its value a mapping "
                                          "of fsspec options as a JSON string) merged into `options` at run time")

    _wrap_options = field_validator("options", mode="after")(secret_options)


def check_resources_setting(resources: dict[str, float] | None) -> dict[str, float] | None:
    """A Dask resources mapping (`{GPU: 1}`): names a worker can declare, amounts above zero."""
    for name, amount in (resources or {}).items():
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"resource name {name!r}: letters, digits, '_' or '-' (as `dask worker --resources`)")
        if not amount > 0:
            raise ValueError(f"resource {name}={amount}: must be above 0")
    return resources


class DaskConfig(Section):
    """Dask cluster for the parallel stages: a LocalCluster unless `address` names a running scheduler."""

    address: str | None = None
    n_workers: int | None = Field(default=None, ge=1, description="None: one per CPU core")
    threads_per_worker: int = Field(default=1, ge=1)
    memory_limit: str = "auto"
    resources: dict[str, float] | None = Field(default=None, description="what each LocalCluster worker offers, as "
                                               "`dask worker --resources GPU=1` (a stage's `resources` asks for it); "
                                               "with `address`, the cluster's workers say")

    _check_resources = field_validator("resources", mode="after")(check_resources_setting)


class EmbeddedConfig(Section):
    """The embedded dataset: crops of real photographs that ship inside scikit-image, one class per photo."""

    per_class: int = Field(default=200, ge=1, description="training images per class")
    val_per_class: int = Field(default=20, ge=0, description="validation images per class")
    image_size: int = Field(default=32, ge=8, le=1024, description="side of the square crops, pixels")
    min_crop: float = Field(default=0.25, gt=0, le=1, description="smallest crop side, fraction of the shorter side")
    image_format: Literal["png", "jpg"] = "png"
    seed: int = 0


class DataConfig(Section):
    """The source dataset: `embedded`, or a path/URL to an ImageNet-layout or class-folder dataset."""

    source: str = "embedded"
    layout: Literal["auto", "imagenet", "class_folders"] = "auto"
    splits: list[str] = Field(default_factory=lambda: ["train", "val"], min_length=1)
    embedded: EmbeddedConfig = Field(default_factory=EmbeddedConfig)
