"""Typed configs: omegaconf structured dataclasses, merged from defaults, presets, YAML and dotlists.

Each component's config dataclass lives next to its builder; this module only loads and saves them.
A typo or a wrong type is a ``ValueError`` that names the key, raised before any work starts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def load_config(
    schema: type[T],
    *,
    presets: Sequence[Mapping[str, Any]] = (),
    yaml_path: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Merge ``schema``'s defaults <- each preset <- the YAML file <- dotlist overrides; return a ``schema``."""
    cfg = OmegaConf.structured(schema)
    layers: list[tuple[str, Any]] = [(f"preset {i}", p) for i, p in enumerate(presets)]
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist; pass an existing YAML path")
        layers.append((str(path), lambda: OmegaConf.load(path)))
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer() if callable(layer) else layer)
        except OmegaConfBaseException as err:
            raise ValueError(_explain(err, source, schema)) from None
    try:  # merge_with_dotlist, unlike a merged from_dotlist, understands list indices (sets.0.root=...)
        cfg.merge_with_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ValueError(_explain(err, "command line", schema)) from None
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ValueError(_explain(err, "resolved config", schema)) from None


def _explain(err: OmegaConfBaseException, source: str, schema: type) -> str:
    key = getattr(err, "full_key", None) or "?"
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    return (
        f"config error in {source} at key {key!r}: {first_line}. "
        f"Check the spelling and type against {schema.__name__} (see --help)."
    )


def split_cli(argv: Sequence[str]) -> tuple[str | None, str | None, list[str]]:
    """Split ``preset=NAME``, ``config=FILE.yaml`` and the remaining ``key=value`` overrides."""
    preset, yaml_path, overrides = None, None, []
    for arg in argv:
        if "=" not in arg:
            raise ValueError(f"argument {arg!r} is not key=value; write overrides like attack.steps=3")
        key, value = arg.split("=", 1)
        if key == "preset":
            preset = value
        elif key == "config":
            yaml_path = value
        else:
            overrides.append(arg)
    return preset, yaml_path, overrides


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (every run saves it beside its outputs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


@dataclass(frozen=True)
class Preset:
    """A named starting point of a recipe: an overlay of config values, optionally with its own schema (a
    subclass of the recipe's, adding the preset's sections, e.g. the local stages) and a ``prepare(cfg)``
    step run before the job (it may fill fields such as the data paths, and returns what the job needs)."""

    overlay: Mapping[str, Any]
    schema: type | None = None
    prepare: Callable[[Any], Any] | None = None


def recipe_main(argv: Sequence[str], *, doc: str, schema: type[T], presets: Mapping[str, Preset],
                run: Callable[[T, Any], Any]) -> Any:
    """A recipe's command line: ``--help`` prints ``doc`` and the defaults; otherwise merge
    ``[preset=NAME] [config=FILE.yaml] [key=value ...]`` into ``schema`` (or the preset's own schema),
    run the preset's ``prepare`` and return ``run(cfg, prepared)`` (``prepared`` is None without a
    preset). A ``ValueError`` (a user error, with what to do) exits with its message, not a traceback."""
    if {"-h", "--help"} & set(argv):
        print(doc + "\nDefaults:\n\n" + to_yaml(schema()))
        return None
    try:
        name, yaml_path, overrides = split_cli(list(argv))
        if name is not None and name not in presets:
            raise ValueError(f"unknown preset {name!r}; available: {sorted(presets)}")
        preset = presets[name] if name is not None else None
        cfg = load_config((preset.schema or schema) if preset else schema, presets=[preset.overlay] if preset else [],
                          yaml_path=yaml_path, overrides=overrides)
        prepared = preset.prepare(cfg) if preset and preset.prepare else None
        return run(cfg, prepared)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
