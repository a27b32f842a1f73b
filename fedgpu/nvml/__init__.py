"""GPUs through NVML: what they hold (``devices``), which one a child gets and
whether it may start yet (``placement``), and a child's own peak (``measure``).

Never imports torch and never initialises CUDA: NVML is the driver's management
library, so the long-lived parent side can use it freely.
"""
