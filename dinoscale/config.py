"""The typed configuration of dinoscale: composition, loading and validation.

Each package declares the sections it owns (`dinoscale.models.config`, `dinoscale.data.config`,
`dinoscale.train.config`, `dinoscale.curation.config`, `dinoscale.eval.config`,
`dinoscale.demo.config`); `Config` composes them into one schema, loaded with OmegaConf
structured configs, so that a misspelt key or a wrong type fails at load time. Section and knob
names follow the DINOv2/DINOv3 reference configs (`student`, `teacher`, `dino`, `ibot`, `gram`,
`crops`, `optim`, `train`) so a user moving from the reference code recognises them;
`curation`, `eval` and `demo` are dinoscale's.

Every knob is declared with `knob(default, help=..., choices=..., min=..., max=...)`
(dinoscale/utils/knobs.py); the metadata drives validation and the configuration reference in
the README.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from dinoscale.curation.config import CurationConfig
from dinoscale.data.config import CropsConfig
from dinoscale.demo.config import DemoConfig
from dinoscale.distill.config import DistillConfig
from dinoscale.errors import ConfigError
from dinoscale.eval.config import EvalConfig
from dinoscale.models.config import StudentConfig
from dinoscale.train.config import DinoConfig, GramConfig, IbotConfig, OptimConfig, TeacherConfig, TrainConfig
from dinoscale.utils.knobs import knob

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class Config:
    seed: int = knob(0, "seed of every random choice")
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    curation: CurationConfig = field(default_factory=CurationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


# ----------------------------------------------------------------------------- loading
def list_presets() -> list[str]:
    return sorted(str(p.relative_to(PRESET_DIR).with_suffix("")) for p in PRESET_DIR.rglob("*.yaml"))


def _resolve_preset(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    names = list_presets()
    hint = difflib.get_close_matches(name_or_path, names, n=1)
    suggestion = f"did you mean '{hint[0]}'? " if hint else ""
    raise ConfigError(f"no config file or preset named '{name_or_path}'; {suggestion}presets: {', '.join(names)}")


def _valid_keys(node: Any) -> list[str]:
    if dataclasses.is_dataclass(node):
        return [f.name for f in dataclasses.fields(node)]
    return []


def _schema_at(path: Sequence[str]) -> Any:
    """The dataclass type found at a dotted key path of the schema (None past a leaf)."""
    node: Any = Config
    for part in path:
        if not dataclasses.is_dataclass(node):
            return None
        if part not in {f.name for f in dataclasses.fields(node)}:
            return None
        node = _field_types(node)[part]
    return node


def _field_types(node: Any) -> dict[str, Any]:
    """The resolved types of a section's fields (its module's annotations may be strings)."""
    return typing.get_type_hints(node)


def _type_name(tp: Any) -> str:
    """`int` for int and Optional[int] alike."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return getattr(args[0] if args else tp, "__name__", str(tp))


def _unknown_key_error(full_key: str, source: str) -> ConfigError:
    parts = full_key.split(".")
    # walk to the deepest valid parent
    parent_parts: list[str] = []
    for part in parts[:-1]:
        if _schema_at(parent_parts + [part]) is None or not dataclasses.is_dataclass(_schema_at(parent_parts + [part])):
            break
        parent_parts.append(part)
    bad = parts[len(parent_parts)]
    candidates = _valid_keys(_schema_at(parent_parts))
    hint = difflib.get_close_matches(bad, candidates, n=1, cutoff=0.5)
    prefix = ".".join(parent_parts + [bad])
    msg = f"unknown config key '{prefix}' (from {source})"
    if hint:
        msg += f"; did you mean '{'.'.join(parent_parts + [hint[0]])}'?"
    elif candidates:
        msg += f"; valid keys here: {', '.join(candidates)}"
    return ConfigError(msg)


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        raise _unknown_key_error(str(err.full_key), source) from None
    except ValidationError as err:
        expected = _type_of(str(err.full_key))
        raise ConfigError(
            f"config key '{err.full_key}' (from {source}) got {err.value!r}, which is not a valid {expected}"
        ) from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config (from {source}): {err}") from None


def _type_of(dotted: str) -> str:
    """The name of the declared type of a key ("its declared type" when the key is not in the schema)."""
    parts = dotted.split(".")
    parent = _schema_at(parts[:-1])
    if not dataclasses.is_dataclass(parent) or parts[-1] not in _field_types(parent):
        return "its declared type"
    return _type_name(_field_types(parent)[parts[-1]])


def _check_values(node: Any, cfg: DictConfig, prefix: str = "") -> None:
    """Check choices and numeric ranges declared with `knob`."""
    types = _field_types(node)
    for f in dataclasses.fields(node):
        key = f"{prefix}{f.name}"
        value = cfg[f.name]
        ftype = types[f.name]
        if dataclasses.is_dataclass(ftype):
            _check_values(ftype, value, key + ".")
            continue
        choices, lo, hi = f.metadata.get("choices"), f.metadata.get("min"), f.metadata.get("max")
        if value is None:
            continue
        if choices is not None and value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            msg = f"config key '{key}' = {value!r} is not allowed; choose one of {', '.join(map(str, choices))}"
            raise ConfigError(msg + (f" (did you mean '{hint[0]}'?)" if hint else ""))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
                raise ConfigError(f"config key '{key}' = {value!r} is out of range; allowed: {bounds}")


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {err}") from None


def _merge_preset(cfg: DictConfig, path: Path, including: tuple[Path, ...] = ()) -> DictConfig:
    """Merge the YAML file at `path` into `cfg`, after the presets named in its `defaults:` list
    (Hydra's convention: a preset builds on others and overrides what it repeats)."""
    if path.resolve() in including:
        chain = " -> ".join(p.name for p in (*including, path.resolve()))
        raise ConfigError(f"presets include each other in a cycle: {chain}")
    data = OmegaConf.load(path)
    bases = data.pop("defaults", [])
    if isinstance(bases, str) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"'defaults' in {path.name} must be a list of preset names, e.g. [train/small_pool]")
    for base in bases:
        relative = path.parent / base
        base_path = relative if relative.suffix in (".yaml", ".yml") and relative.exists() else _resolve_preset(base)
        cfg = _merge_preset(cfg, base_path, (*including, path.resolve()))
    return _merge(cfg, data, path.name)


def load_config(preset: str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Schema defaults <- preset or YAML file <- `key.sub=value` overrides, then validated."""
    cfg = OmegaConf.structured(Config)
    if preset:
        cfg = _merge_preset(cfg, _resolve_preset(preset))
    return apply_overrides(cfg, overrides, "command line")


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], source: str) -> DictConfig:
    """`cfg` with `key.sub=value` overrides (named `source` in errors) merged in, validated."""
    if overrides:
        cfg = _merge(cfg, _parse_overrides(overrides), source)
    _check_values(Config, cfg)
    return cfg


def config_hash(cfg: Any) -> str:
    """A short stable hash of a config section (or any JSON-able value)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class KeyDoc:
    """One config key as the reference shows it: dotted key, default (JSON), allowed values, meaning."""

    key: str
    default: str
    allowed: str
    help: str


def config_keys(prefix: str = "") -> list[KeyDoc]:
    """Every key of the schema whose dotted name starts with `prefix`, in schema order."""
    docs: list[KeyDoc] = []

    def walk(node: Any, path: str) -> None:
        instance, types = node(), _field_types(node)
        for f in dataclasses.fields(node):
            ftype = types[f.name]
            if dataclasses.is_dataclass(ftype):
                walk(ftype, f"{path}{f.name}.")
                continue
            meta = f.metadata
            allowed = ", ".join(map(str, meta["choices"])) if meta.get("choices") else ""
            if meta.get("min") is not None or meta.get("max") is not None:
                allowed = f"[{meta.get('min', '')}, {meta.get('max', '')}]".replace("None", "")
            default = json.dumps(getattr(instance, f.name), default=lambda o: dataclasses.asdict(o))
            docs.append(KeyDoc(f"{path}{f.name}", default, allowed, meta.get("help", "")))

    walk(Config, "")
    return [doc for doc in docs if doc.key.startswith(prefix)]


def keys_text(prefix: str = "") -> str:
    """`dinoscale config keys [PREFIX]`: one line per key (key = default, allowed values, meaning)."""
    docs = config_keys(prefix)
    if not docs:
        sections = sorted({doc.key.split(".")[0] for doc in config_keys()})
        hint = difflib.get_close_matches(prefix.split(".")[0], sections, n=1)
        suggestion = f"did you mean '{hint[0]}'? " if hint else ""
        raise ConfigError(f"no config key starts with '{prefix}'; {suggestion}sections: {', '.join(sections)}")
    width = max(len(f"{doc.key} = {doc.default}") for doc in docs)
    lines = []
    for doc in docs:
        allowed = f"  (allowed: {doc.allowed})" if doc.allowed else ""
        lines.append(f"{f'{doc.key} = {doc.default}':<{width}}  {doc.help}{allowed}")
    return "\n".join(lines)


def reference_markdown() -> str:
    """The configuration reference, generated from the schema (used by the README)."""
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    lines += [f"| `{d.key}` | `{d.default}` | {d.allowed} | {d.help} |" for d in config_keys()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
