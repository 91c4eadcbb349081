"""In-house port of the Depth Anything 3 networks, official checkpoint layout: the any-view network (multi-view
depth + cameras, net.py) and the monocular metric one (DA3METRIC-LARGE, metric_net.py)."""
from model.geometry.da3.config import DA3Config, load_config
from model.geometry.da3.metric_net import DA3MetricNet, build_tiny_da3_metric, load_da3_metric
from model.geometry.da3.net import DA3Net, DA3Output, build_random_da3, build_tiny_da3, load_da3, save_da3

__all__ = ["DA3Config", "load_config", "DA3Net", "DA3Output", "build_random_da3", "build_tiny_da3", "load_da3", "save_da3",
           "DA3MetricNet", "build_tiny_da3_metric", "load_da3_metric"]
