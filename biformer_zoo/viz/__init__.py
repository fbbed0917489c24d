"""Seeing what the models attend to: the routing of BiFormer's routed attention, the attention weights of one query
token (routed, CrossFormer's grouped, global), and figures in the papers' style.

``record_routing`` hooks the layers during the forwards inside a ``with`` block (``record``); ``attention_map``
recomputes one query's weights from a layer's own weights (``attention``); ``plot_routing``, ``plot_attention`` and
``visualize`` draw them with matplotlib (``plot``, the ``[viz]`` extra). Grad-CAM is the ``grad-cam`` package's, on
the target layers README names.
"""
from .attention import AttentionMap, attention_map, default_layer
from .plot import load_image, plot_attention, plot_routing, preprocess, to_image, visualize
from .record import RoutingRecord, attention_layers, record_routing

__all__ = [
    'AttentionMap', 'RoutingRecord', 'attention_layers', 'attention_map', 'default_layer', 'load_image',
    'plot_attention', 'plot_routing', 'preprocess', 'record_routing', 'to_image', 'visualize']
