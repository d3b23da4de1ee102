"""SettingError: one argument out of range, named the way the caller spelled it. The Python API raises it with the
parameter's name; the CLI prints the matching flag (`max_new_tokens` -> `--max-new-tokens`)."""
from __future__ import annotations


class SettingError(ValueError):
    def __init__(self, owner: str, name: str, value, requirement: str):
        self.owner, self.name, self.value, self.requirement = owner, name, value, requirement
        super().__init__(f"{owner}{'.' if owner else ''}{name}={value!r} is invalid: {requirement}")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")
