"""The engines a policy trains under (``train.sharding``), one module each, behind ``base.Engine``:
``none`` (``base.py``: a whole policy per process, DDP over several), ``fsdp`` (``fsdp.py``: FSDP2
shards a full fine-tune's weights, gradients and AdamW states) and ``zero3`` (``zero3.py``:
DeepSpeed ZeRO-3 does the same). ``registry.py`` holds the closed registry and ``build``."""
