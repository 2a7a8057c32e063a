"""chadthrottle: per-process network bandwidth limits with eBPF, driven over D-Bus."""

__version__ = "0.1.0"
