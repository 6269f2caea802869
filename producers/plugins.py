"""Robots and teleoperation devices from outside SOP: a class (or any factory) named on the command line, or
registered by an installed package under an entry-point group.

    robot = load_robot("my_lab.arms:UR5Adapter", {"host": "10.0.0.5", "task": "fold-towel"})
    robot = load_robot("ur5", {...})                  # entry point `ur5` of group `sop.robots`
    operator = load_operator("my_lab.teleop:SpaceMouse", {"device": "/dev/hidraw3"})

A package offers its robot to every ``sop actor`` on the machine with, in its ``pyproject.toml``::

    [project.entry-points."sop.robots"]
    ur5 = "my_lab.arms:UR5Adapter"
    [project.entry-points."sop.operators"]
    spacemouse = "my_lab.teleop:SpaceMouse"

The factory is called with the settings as keyword arguments (``Factory(**settings)``) and must return an
object that has everything :class:`~producers.interfaces.Robot` (or ``Operator``) has; what is missing is
named in the error. See ``docs/robots.md``.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from producers.interfaces import Operator, Robot

ROBOT_GROUP = "sop.robots"
OPERATOR_GROUP = "sop.operators"


class PluginError(ValueError):
    """A robot or operator could not be found, built, or does not have what the actor loop calls."""


def parse_settings(text: str | None, *, option: str = "--robot-config") -> dict[str, Any]:
    """JSON object text, or ``@path`` of a JSON file, -> dict (``None`` or empty -> {})."""
    if not text:
        return {}
    source = "JSON text"
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise PluginError(f"{option}: cannot read {path}: {exc}") from None
        source = str(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PluginError(f"{option}: {source} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise PluginError(f"{option}: {source} must be a JSON object of settings, got {type(value).__name__}")
    return value


def find_factory(spec: str, group: str) -> Callable[..., Any]:
    """``package.module:Attr`` (``Attr`` may be dotted), or the name of an entry point in ``group``."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise PluginError(f"{spec}: cannot import {module_name!r} ({exc}); is it installed or on PYTHONPATH?") from None
        for part in attr.split("."):
            try:
                target = getattr(target, part)
            except AttributeError:
                raise PluginError(f"{spec}: module {module_name!r} has no {attr!r}") from None
    else:
        found = [ep for ep in entry_points(group=group) if ep.name == spec]
        if not found:
            known = sorted(ep.name for ep in entry_points(group=group))
            raise PluginError(f"{spec!r} is neither package.module:Factory nor an entry point of group {group!r} "
                              f"(installed: {', '.join(known) or 'none'})")
        try:
            target = found[0].load()
        except Exception as exc:  # a broken plugin package: say which one
            raise PluginError(f"entry point {spec!r} ({found[0].value}) of {group!r} failed to load: {exc}") from exc
    if not callable(target):
        raise PluginError(f"{spec}: {target!r} is not a class or factory function")
    return target


def _missing(obj: object, protocol: type) -> list[str]:
    """What ``obj`` lacks of ``protocol``: its methods (callable) and attributes."""
    names = [n for n in dir(protocol) if not n.startswith("_")] + list(getattr(protocol, "__annotations__", {}))
    out = []
    for name in dict.fromkeys(names):
        if not hasattr(obj, name):
            out.append(name)
        elif inspect.isfunction(getattr(protocol, name, None)) and not callable(getattr(obj, name)):
            out.append(f"{name}()")
    return out


def _build(spec: str, settings: Mapping[str, Any], group: str, protocol: type, what: str) -> Any:
    factory = find_factory(spec, group)
    try:
        obj = factory(**settings)
    except TypeError as exc:
        raise PluginError(f"{spec}({', '.join(f'{k}=…' for k in settings)}): {exc}") from exc
    missing = _missing(obj, protocol)
    if missing:
        raise PluginError(f"{spec} built a {type(obj).__name__}, which is not {what}: it lacks {', '.join(missing)} "
                          f"(see producers/interfaces.py)")
    return obj


def load_robot(spec: str, settings: Mapping[str, Any] | None = None) -> Robot:
    """Build the robot ``spec`` names with ``settings``; it must have ``task``, ``action_dim``, ``reset``,
    ``observe`` and ``act`` (``close()`` is called at exit when it has one)."""
    robot: Robot = _build(spec, settings or {}, ROBOT_GROUP, Robot, "a Robot")
    if not isinstance(robot.action_dim, int) or robot.action_dim < 1:
        raise PluginError(f"{spec}: action_dim must be a positive int, got {robot.action_dim!r}")
    if not isinstance(robot.task, str) or not robot.task:
        raise PluginError(f"{spec}: task must be a non-empty name, got {robot.task!r}")
    return robot


def load_operator(spec: str, settings: Mapping[str, Any] | None = None) -> Operator:
    """Build the operator (teleoperation device) ``spec`` names; it must have ``operator_id``, ``reset`` and
    ``decide``."""
    return _build(spec, settings or {}, OPERATOR_GROUP, Operator, "an Operator")
