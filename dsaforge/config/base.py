"""The strict base every config section derives from, and the error users see when a config is wrong."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config value, key, preset, file or override is wrong; the message names which one."""


class Section(BaseModel):
    # extra="forbid": a typo is an error that names the field, never a silently ignored key.
    model_config = ConfigDict(extra="forbid", validate_default=True)
