"""Configuration: typed models (`schema`), shipped presets (`presets/*.yaml`) and dotted-key overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from nextdetail.conf.schema import PipelineConfig
from nextdetail.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"

__all__ = ["MODELS", "MODEL_OVERRIDES", "PipelineConfig", "available_presets", "load_branches", "load_config",
           "parse_models", "parse_override"]

MODEL_OVERRIDES: dict[str, list[str]] = {
    "cart": ["ar.model=cart"],
    "ndp": ["ar.model=ndp", "tokenizer.order=0", "tokenizer.truncation=0.5", "tokenizer.patch_nums=auto"],
}
"""What choosing a model sets (`--model`): NDP needs the dyadic-pyramid tokenizer (no detail layers, the scales
1, 2, 4, … that `auto` derives for it) trained to decode truncated quadtrees; -o overrides given with it still
win."""
MODELS = tuple(MODEL_OVERRIDES)


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise UserError(f"config: cannot read {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UserError(f"config: {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config: {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"shard.resolution=64"`` → (["shard", "resolution"], 64); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override {text!r}: expected KEY=VALUE, e.g. -o shard.resolution=64")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _allowed_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    """Field names (by alias) of the section that `path` points into."""
    for part in path:
        field = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None
        )
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        model = ann
    return sorted(f.alias or name for name, f in model.model_fields.items())


def _one_line(err: ValidationError, data: dict[str, Any]) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    key = ".".join(loc) or "config"
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(PipelineConfig, loc[:-1]))
        return f"config: unknown key {key!r} (allowed here: {allowed})"
    if first["type"] == "value_error" and (not loc or isinstance(first.get("input"), dict)):
        # a section's own check: its message names the keys; the whole section's values would bury it
        return f"config: {key + ': ' if loc else ''}{first['msg'].removeprefix('Value error, ')}"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    shown = "'**********'" if any(p.endswith("options") for p in loc) else repr(first.get("input"))  # credentials
    return f"config: {key}={shown} is invalid: {first['msg']}{more}"


def load_config(
    preset: str | None = "tiny", config_file: str | Path | None = None, overrides: list[str] = (),
    until: str | None = None, model: str | None = None,
) -> PipelineConfig:
    """Preset or YAML file, then ``-o key=value`` overrides, validated into one `PipelineConfig`. With `until`
    (the last stage a command runs) only the checks of that stage and its upstream refuse; a later stage's
    problem becomes one of `cfg.warnings()`. With `model` (`--model`), the model's settings (`MODEL_OVERRIDES`)
    and then the preset's own for it (its `models:` section, e.g. a longer tokenizer training on `tiny`) come
    before `overrides`."""
    if config_file is not None:
        data = _read_yaml(Path(config_file))
    elif preset is not None:
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.exists():
            raise UserError(f"config: no preset {preset!r} (available: {', '.join(available_presets())})")
        data = _read_yaml(path)
        data.setdefault("preset", preset)
    else:
        data = {}
    per_model = data.pop("models", None) or {}
    if not isinstance(per_model, dict) or any(m not in MODEL_OVERRIDES or not isinstance(v, dict)
                                              for m, v in per_model.items()):
        raise UserError(f"config: models: must map a model ({', '.join(MODELS)}) to its settings "
                        "(dotted keys, e.g. ndp: {tokenizer.steps: 1000})")
    if model is not None:
        own = [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
               for key, value in per_model.get(model, {}).items()]
        overrides = [*MODEL_OVERRIDES[model], *own, *overrides]
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for part in keys[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[keys[-1]] = value
    try:
        return PipelineConfig.model_validate(data, context={"until": until})
    except ValidationError as err:
        raise UserError(_one_line(err, data)) from None


def parse_models(text: str | list[str] | None) -> list[str]:
    """``"cart,ndp"`` (or a list) → ["cart", "ndp"]; None or "" → [] (the config's own `ar.model`)."""
    if not text:
        return []
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in names if m not in MODEL_OVERRIDES]
    if unknown:
        raise UserError(f"--model {unknown[0]!r}: no such model (models: {', '.join(MODELS)}; several: --model cart,ndp)")
    return list(dict.fromkeys(names))


def load_branches(
    preset: str | None = "tiny", config_file: str | Path | None = None, overrides: list[str] = (),
    models: list[str] = (), until: str | None = None,
) -> dict[str, PipelineConfig]:
    """One config per model, each the preset/file + the model's settings (`MODEL_OVERRIDES`, then the preset's
    `models:` section for it) + `overrides`:
    the branches of one pipeline run. Stages whose identity comes out the same in several branches (shard,
    decompose) are built once. No models: the config's own `ar.model`, one branch."""
    if not models:
        cfg = load_config(preset, config_file, list(overrides), until)
        return {cfg.ar.model: cfg}
    return {m: load_config(preset, config_file, list(overrides), until, model=m) for m in models}
