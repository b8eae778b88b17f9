"""Configuration: the structured schema, loading with overrides, and the Detectron2 YAML importer."""
from .loader import CONFIGS_DIR, ConfigKeyError, load_config, save_config, suggest_key
from .schema import CutlerConfig, MaskCutConfig

__all__ = ["CONFIGS_DIR", "ConfigKeyError", "CutlerConfig", "MaskCutConfig", "load_config", "save_config",
           "suggest_key", "add_config_arguments", "config_from_args"]


def add_config_arguments(parser, default_config: str | None = None):
    """Add ``--config-file`` and trailing ``key=value`` overrides to an argparse parser."""
    parser.add_argument("--config-file", default=default_config, metavar="FILE",
                        help="our YAML, a CutLER/Detectron2 YAML, or a name under configs/")
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Hydra-style overrides, e.g. solver.base_lr=0.01")
    return parser


def config_from_args(args, extra_overrides=(), freeze: bool = True):
    """Load the config named by parsed ``--config-file`` + overrides (``extra_overrides`` apply first)."""
    return load_config(args.config_file, list(extra_overrides) + list(args.overrides), freeze=freeze)
