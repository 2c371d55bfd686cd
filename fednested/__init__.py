"""fednested: federated, multi-timescale training of Mixture-of-Experts language models (pure PyTorch core).

This package never imports Django: it is shared by the control plane's workers, Tier-1 and the edge client.
"""

import logging

__version__ = "0.1.0"


class _MissingKernelsFilter(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning, nothing else.

    On CPUs with AVX512-BF16, importing bitsandbytes (PEFT does, whoever imports PEFT) tries the optional `kernels`
    package, which would download a fused bf16 4-bit GEMV from a model hub at run time. We never call that GEMV (the
    edge snapshots dequantize per expert, fednested.quantization) and nothing may download at run time, so the
    warning is noise on every process start. Installed here, before anything can import bitsandbytes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_MissingKernelsFilter())
