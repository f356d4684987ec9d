"""The ``safety_freeze`` PEFT method: train an update of each target weight while locked entries keep their base bits.

Importing this package registers the method with PEFT, so ``get_peft_model``, ``PeftModel.from_pretrained``
and transformers' ``load_adapter`` know ``SafetyFreezeConfig`` adapters.
"""

from ..registration import register_outside_peft_method
from .config import PEFT_METHOD_NAME, SafetyFreezeConfig
from .layer import Linear, Lock, SafetyFreezeLayer
from .model import SafetyFreezeModel, count_only_what_trains

__all__ = ["Linear", "Lock", "SafetyFreezeConfig", "SafetyFreezeLayer", "SafetyFreezeModel"]

register_outside_peft_method(name=PEFT_METHOD_NAME, config_cls=SafetyFreezeConfig, model_cls=SafetyFreezeModel)
count_only_what_trains()
