"""peft-lab: hand-written LoRA / DoRA / QLoRA (:mod:`peft_utils.core`) and the lab around it. Each name is imported
from the module that defines it (``from peft_utils.core.inject import apply_adapters``): one path per name, and
``python -m peft_utils.plots`` does not pay for importing torch."""
