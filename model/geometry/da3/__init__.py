"""In-house port of the Depth Anything 3 network (multi-view depth + cameras), official checkpoint layout."""
from model.geometry.da3.config import DA3Config, load_config
from model.geometry.da3.net import DA3Net, DA3Output, build_random_da3, build_tiny_da3, load_da3, save_da3

__all__ = ["DA3Config", "load_config", "DA3Net", "DA3Output", "build_random_da3", "build_tiny_da3", "load_da3", "save_da3"]
