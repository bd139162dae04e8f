"""Rows in other shapes, mapped to the format's own before validation: renamed columns
(data.columns) and chat messages with other keys and role names (data.role_key,
data.content_key, data.roles), e.g. ShareGPT's {"conversations": [{"from": "human", "value":
...}]}. Pure: the launcher and every rank map rows the same way, and errors keep their line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from launcher.config.schema import DataConfig

Row = dict[str, Any]
MESSAGE_LISTS = ("messages", "prompt", "chosen", "rejected", "completion")  # columns of turns


def is_identity(data: DataConfig) -> bool:
    return (
        not data.columns
        and data.role_key == "role"
        and data.content_key == "content"
        and not data.roles
    )


def _message(value: Any, data: DataConfig) -> Any:
    if not isinstance(value, dict) or data.role_key not in value or data.content_key not in value:
        return value  # left for the format's check, which names what is missing
    role = value[data.role_key]
    return {"role": data.roles.get(role, role), "content": value[data.content_key]}


def remap(row: Row, data: DataConfig) -> Row:
    """The row with data.columns renamed and message turns in {role, content} form."""
    if is_identity(data):
        return row
    mapped = {data.columns.get(key, key): value for key, value in row.items()}
    for key in MESSAGE_LISTS:
        if isinstance(mapped.get(key), list):
            mapped[key] = [_message(m, data) for m in mapped[key]]
        elif isinstance(mapped.get(key), dict):  # one message object (LLaMA-Factory's pairs)
            mapped[key] = _message(mapped[key], data)
    return mapped
