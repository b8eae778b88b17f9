"""Small shared utilities: logging, seeding, devices, atomic I/O, images and visualisation."""
from .device import DeviceUnavailableError, resolve_device
from .io import atomic_open, atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text
from .logging import get_logger, get_rank, get_world_size, setup_logger
from .seed import seed_everything
