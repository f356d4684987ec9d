"""PEFT methods of safety-peft; importing this package registers them with PEFT."""

from .safety_freeze import SafetyFreezeConfig, SafetyFreezeModel

__all__ = ["SafetyFreezeConfig", "SafetyFreezeModel"]
