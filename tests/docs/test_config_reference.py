"""docs/configuration.md is generated from the config dataclasses and must match them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", DOCS / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_page_is_current():
    gen = _generator()
    committed = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert committed == gen.render(), (
        "docs/configuration.md is out of date with the config schemas; regenerate it with "
        "`python docs/gen_config_reference.py` and commit the result")


def test_every_config_key_is_described():
    missing = _generator().undocumented_keys()
    assert not missing, (f"config keys without a description: {missing}; document them in the Attributes "
                         "section of their config dataclass's docstring, then regenerate docs/configuration.md")


def test_every_schema_key_is_on_the_page():
    """Independent of the generator: each key of each built-in schema appears on the page."""
    import dataclasses

    from dspark.config import FIXED_SCHEMAS, _component_registries

    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    schemas = list(FIXED_SCHEMAS.values())
    for registry in _component_registries().values():
        schemas += [registry.get(name).config_class for name in registry.names()
                    if registry.get(name).__module__.startswith("dspark.")]
    for schema in schemas:
        assert f"`{schema.__module__}.{schema.__qualname__}`" in page, schema
        for field in dataclasses.fields(schema):
            assert f"**`{field.name}`**" in page, f"{schema.__name__}.{field.name} is not documented"
